"""Tests for checkpoints on object storage, against a real S3-compatible server on 127.0.0.1.

The server is moto in server mode (real HTTP); the client is s3fs/botocore, as users run it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import manifest_ckpt as mc
from manifest_ckpt.cli import run
from manifest_ckpt.storage import remote
from manifest_ckpt.storage.store import is_url
from tests._models import TiedNet, assert_bitwise_equal

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")


class S3:
    """A moto S3 server on 127.0.0.1 and the storage options that reach it."""

    def __init__(self) -> None:
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, self.port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"
        # Fail fast when the server is gone (the kill test): no retries, short timeouts.
        self.options: dict[str, Any] = {
            "key": "testing",
            "secret": "testing",
            "endpoint_url": self.endpoint,
            "skip_instance_cache": True,
            "use_listings_cache": False,
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5},
        }
        self.fs = self.filesystem()

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**self.options)

    def restart(self) -> None:
        # moto keeps its buckets in process memory, so objects survive a restart on the same port.
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    server = S3()
    server.fs.mkdir("bucket")
    yield server
    server.server.stop()


@pytest.fixture
def url(s3: S3, request: pytest.FixtureRequest) -> str:
    return f"s3://bucket/{request.node.name}"


def trained() -> TiedNet:
    torch.manual_seed(0)
    model = TiedNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_()
    return model


def counting(monkeypatch: pytest.MonkeyPatch) -> list[remote.FsspecStore]:
    """Record every remote store the library opens, to read its byte counter."""
    opened: list[remote.FsspecStore] = []
    original = remote.open_remote_store

    def spy(url: str, storage_options: Any = None) -> remote.FsspecStore:
        store = original(url, storage_options)
        opened.append(store)
        return store

    monkeypatch.setattr(remote, "open_remote_store", spy)
    return opened


def test_urls_are_told_from_local_paths() -> None:
    """Schemes with ``://`` are URLs; relative, absolute and Windows-drive paths are not."""
    assert [is_url(p) for p in ["s3://b/k", "memory://x", "file:///tmp/x", "hf://org/repo", "gcs+x://a"]] == [True] * 5
    assert [is_url(p) for p in ["ck", "/tmp/ck", "C:\\ck", "C:/ck", Path("s3://b")]] == [False] * 5


def test_local_paths_never_import_fsspec(tmp_path: Path) -> None:
    """Saving, checking and loading local checkpoints leaves fsspec unimported (it is an optional extra)."""
    code = (
        "import sys, torch, manifest_ckpt as mc\n"
        "m = torch.nn.Linear(2, 2)\n"
        f"mc.save(m, {str(tmp_path / 'ck')!r}, record_code=False)\n"
        f"mc.load(torch.nn.Linear(2, 2), {str(tmp_path / 'ck')!r})\n"
        "assert 'fsspec' not in sys.modules, 'fsspec imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_round_trip_through_s3_is_bit_exact(s3: S3, url: str, tmp_path: Path) -> None:
    """save to s3://, then read_manifest, check, verify and load give the local results bit for bit."""
    model = trained()
    local = mc.save(model, tmp_path / "ck", record_code=False)
    manifest = mc.save(model, url, storage_options=s3.options, record_code=False)
    assert manifest.digest == local.digest
    assert mc.read_manifest(url, storage_options=s3.options).digest == local.digest
    assert mc.check(TiedNet(), url, storage_options=s3.options).ok
    mc.verify(url, storage_options=s3.options)
    target = TiedNet()
    result = mc.load(target, url, storage_options=s3.options)
    assert result.manifest.digest == local.digest
    assert_bitwise_equal(target.state_dict(), model.state_dict())
    assert target.head.weight is target.emb.weight
    # The uploaded objects are byte-identical to the local checkpoint's files.
    for name in ["manifest.json", *local.files]:
        assert s3.fs.cat_file(f"{url[5:]}/{name}") == (tmp_path / "ck" / name).read_bytes()


def test_check_reads_no_tensor_data_and_load_reads_each_byte_once(
    s3: S3, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check fetches manifest.json and each file's header (binding); load fetches every byte once."""
    model = trained()
    manifest = mc.save(model, url, storage_options=s3.options, record_code=False, max_file_size=256)
    opened = counting(monkeypatch)
    assert mc.check(TiedNet(), url, storage_options=s3.options).ok
    manifest_size = len(s3.fs.cat_file(f"{url[5:]}/manifest.json"))
    headers = 0
    for name in manifest.files:
        prefix = s3.fs.cat_file(f"{url[5:]}/{name}", start=0, end=8)
        headers += 8 + int.from_bytes(prefix, "little")
    assert headers < sum(entry.size for entry in manifest.files.values())
    assert [store.bytes_read for store in opened] == [manifest_size + headers]

    opened.clear()
    mc.load(TiedNet(), url, storage_options=s3.options)
    (store,) = opened
    # The manifest, then each file's header (binding, before any copy), then the rest of each
    # file: every byte once.
    assert len(manifest.files) > 1
    assert store.bytes_read == manifest_size + sum(entry.size for entry in manifest.files.values())

    # Verifying digests hashes the fetched bytes, the ones then copied: still every byte once.
    opened.clear()
    target = TiedNet()
    mc.load(target, url, storage_options=s3.options, verify_digests=True)
    (store,) = opened
    assert store.bytes_read == manifest_size + sum(entry.size for entry in manifest.files.values())
    assert_bitwise_equal(target.state_dict(), model.state_dict())


def test_a_flipped_byte_in_an_object_fails_verify_and_names_the_tensor(s3: S3, url: str) -> None:
    """Tampering with one stored byte on the server is caught by verify, which names the tensor and file."""
    manifest = mc.save(trained(), url, storage_options=s3.options, record_code=False)
    name = "fc.weight"
    chunk = manifest.tensors[name].pieces()[0]
    key = f"{url[5:]}/{chunk.file}"
    data = bytearray(s3.fs.cat_file(key))
    data[chunk.byte_range[0]] ^= 0x01
    s3.fs.pipe_file(key, bytes(data))
    with pytest.raises(mc.IntegrityError) as info:
        mc.verify(url, storage_options=s3.options)
    assert info.value.key == name and info.value.file == chunk.file
    assert name in str(info.value)
    with pytest.raises(mc.IntegrityError):
        mc.load(TiedNet(), url, storage_options=s3.options, verify_digests=True)


def test_overwrite_commits_the_manifest_last_and_deletes_replaced_objects(s3: S3, url: str) -> None:
    """A second save needs overwrite=True; afterwards only the new manifest's objects remain."""
    first = mc.save(trained(), url, storage_options=s3.options, record_code=False)
    with pytest.raises(mc.CheckpointExistsError, match="overwrite=True"):
        mc.save(TiedNet(), url, storage_options=s3.options, record_code=False)
    torch.manual_seed(5)
    second_model = TiedNet()
    second = mc.save(second_model, url, storage_options=s3.options, record_code=False, overwrite=True)
    assert second.digest != first.digest
    names = sorted(p.rsplit("/", 1)[1] for p in s3.fs.ls(url[5:], detail=False))
    assert names == sorted(["manifest.json", *second.files])
    target = TiedNet()
    mc.load(target, url, storage_options=s3.options)
    assert_bitwise_equal(target.state_dict(), second_model.state_dict())


def test_a_missing_bucket_gives_typed_errors_naming_the_url(s3: S3) -> None:
    """Reads from and writes to a bucket that does not exist raise typed errors that name the URL."""
    missing = "s3://no-such-bucket/ck"
    with pytest.raises(mc.CheckpointNotFoundError, match="bucket 'no-such-bucket' does not exist") as found:
        mc.read_manifest(missing, storage_options=s3.options)
    assert found.value.file == f"{missing}/manifest.json"
    with pytest.raises(mc.StorageError, match="no-such-bucket") as info:
        mc.save(TiedNet(), missing, storage_options=s3.options, record_code=False)
    assert info.value.url == missing


@pytest.fixture(scope="module")
def s3_with_auth() -> Iterator[str]:
    """A second moto server that checks credentials (none are registered, so every key is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the moto server with authentication did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_bad_credentials_give_a_typed_error_naming_the_url_and_the_fix(s3_with_auth: str) -> None:
    """A server that refuses the access key: reads and writes raise StorageError naming the URL and credentials."""
    options = {"key": "wrong", "secret": "wrong", "endpoint_url": s3_with_auth, "skip_instance_cache": True}
    ck = "s3://bucket/ck"
    with pytest.raises(mc.StorageError, match="credentials") as info:
        mc.read_manifest(ck, storage_options=options)
    assert info.value.url == f"{ck}/manifest.json"
    with pytest.raises(mc.StorageError, match="access denied") as info:
        mc.save(TiedNet(), ck, storage_options=options, record_code=False)
    assert info.value.url == ck


def test_a_prefix_without_a_manifest_is_not_a_checkpoint(s3: S3, url: str) -> None:
    """Objects under the prefix but no manifest.json: check says so and names the URL."""
    s3.fs.pipe_file(f"{url[5:]}/weights-0123456789abcdef.safetensors", b"partial upload")
    with pytest.raises(mc.CheckpointNotFoundError, match=r"no manifest\.json"):
        mc.check(TiedNet(), url, storage_options=s3.options)


def test_server_killed_mid_upload_leaves_no_checkpoint_and_a_retry_succeeds(s3: S3, url: str) -> None:
    """The server dies after the first weights file: no manifest appears, the error is typed, a retry works."""
    model = trained()
    uploaded: list[int] = []

    def kill_after_first(n: int) -> None:
        uploaded.append(n)
        if len(uploaded) == 1:
            s3.server.stop()

    original = remote.upload_checkpoint

    def upload(local: Path, dest: str, **kwargs: Any) -> None:
        original(local, dest, **{**kwargs, "progress": kill_after_first})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(remote, "upload_checkpoint", upload)
        try:
            with pytest.raises(mc.StorageError, match=url):
                mc.save(model, url, storage_options=s3.options, record_code=False, max_file_size=256)
        finally:
            s3.restart()
    assert len(uploaded) == 1
    assert not s3.filesystem().exists(f"{url[5:]}/manifest.json")
    with pytest.raises(mc.CheckpointNotFoundError):
        mc.read_manifest(url, storage_options=s3.options)
    # Leftover weights objects of the interrupted upload do not block the retry, and are removed.
    manifest = mc.save(model, url, storage_options=s3.options, record_code=False, max_file_size=256)
    mc.verify(url, storage_options=s3.options)
    names = sorted(p.rsplit("/", 1)[1] for p in s3.filesystem().ls(url[5:], detail=False))
    assert names == sorted(["manifest.json", *manifest.files])


def test_memory_urls_work_without_a_server(tmp_path: Path) -> None:
    """fsspec's memory:// file system is a store like any other."""
    model = trained()
    manifest = mc.save(model, "memory://ckpts/one", record_code=False)
    target = TiedNet()
    mc.load(target, "memory://ckpts/one")
    assert_bitwise_equal(target.state_dict(), model.state_dict())
    local = mc.save(model, tmp_path / "ck", record_code=False)
    assert mc.diff("memory://ckpts/one", tmp_path / "ck").identical
    assert local.digest == manifest.digest
    assert mc.read_manifest("memory://ckpts/one/manifest.json").digest == manifest.digest


def test_cli_reads_urls_with_storage_options_and_the_endpoint_from_the_environment(
    s3: S3, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inspect/verify --json take --storage-option KEY=VALUE, and AWS_ENDPOINT_URL supplies the endpoint."""
    manifest = mc.save(trained(), url, storage_options=s3.options, record_code=False)
    out, err = io.StringIO(), io.StringIO()
    opts = ["--storage-option", "key=testing", "--storage-option", "secret=testing"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert run(["verify", url, "--json", *opts], out, err) == 0, err.getvalue()
    assert json.loads(out.getvalue())["digest"] == manifest.digest
    out = io.StringIO()
    assert run(["inspect", url, "--json", *opts], out, err) == 0, err.getvalue()
    assert json.loads(out.getvalue())["digest"] == manifest.digest
    out, err = io.StringIO(), io.StringIO()
    assert run(["inspect", url, "--storage-option", "novalue"], out, err) == 2
    assert "KEY=VALUE" in err.getvalue()


def _objects(s3: S3, url: str) -> dict[str, bytes]:
    """The objects directly under ``url``, by name, read through a fresh client (no listing cache)."""
    fs = s3.filesystem()
    return {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.ls(url[5:], detail=False)}


def test_export_hf_to_s3_writes_the_bytes_of_a_local_export_and_replaces_only_with_overwrite(
    s3: S3, url: str, tmp_path: Path
) -> None:
    """export_hf to s3://: the local export's objects, byte for byte; refused over weights; stale shards removed."""
    mc.save(trained(), tmp_path / "ck", record_code=False)
    local = mc.export_hf(tmp_path / "ck", tmp_path / "hf", max_shard_size=100)
    result = mc.export_hf(tmp_path / "ck", url, max_shard_size=100, storage_options=s3.options)
    assert len(local.files) > 1 and result.index == "model.safetensors.index.json"
    assert result.directory == url
    assert dataclasses.replace(result, directory=local.directory) == local
    assert _objects(s3, url) == {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}

    # Weights already there: refused before anything is read or written, naming the URL and files.
    s3.fs.pipe_file(f"{url[5:]}/config.json", b"{}")
    before = _objects(s3, url)
    with pytest.raises(mc.CheckpointExistsError, match=rf"{url}: already holds weights \(model-00001-of-") as info:
        mc.export_hf(tmp_path / "ck", url, storage_options=s3.options)
    assert "overwrite=True" in str(info.value)
    assert _objects(s3, url) == before

    # With overwrite, one unsharded file replaces the shards and the index; config.json stays.
    single = mc.export_hf(tmp_path / "ck", url, overwrite=True, storage_options=s3.options)
    mc.export_hf(tmp_path / "ck", tmp_path / "hf1")
    assert single.files == ("model.safetensors",) and single.index is None
    assert _objects(s3, url) == {"config.json": b"{}", "model.safetensors": (tmp_path / "hf1" / "model.safetensors").read_bytes()}

    # The CLI takes a URL as DIR, with the storage options.
    out, err = io.StringIO(), io.StringIO()
    opts = [f"--storage-option={k}={v}" for k, v in s3.options.items() if k in ("key", "secret", "endpoint_url")]
    assert run(["export-hf", str(tmp_path / "ck"), url, "--overwrite", "--max-shard-size", "100", "--json", *opts], out, err) == 0, err.getvalue()
    assert json.loads(out.getvalue())["directory"] == url
    assert _objects(s3, url) == {"config.json": b"{}", **{p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}}


def test_pack_and_unpack_to_and_from_s3_keep_the_bytes_and_digest(s3: S3, url: str, tmp_path: Path) -> None:
    """pack s3:// -> s3:// archive, unpack it back to s3:// and to disk: same digest, same archive bytes."""
    model = trained()
    manifest = mc.save(model, url, storage_options=s3.options, record_code=False)
    mc.save(model, tmp_path / "ck", record_code=False)
    mc.pack(tmp_path / "ck", tmp_path / "local.tar")
    archive = f"{url}-archive.tar"
    assert mc.pack(url, archive, storage_options=s3.options).digest == manifest.digest
    assert s3.fs.cat_file(archive[5:]) == (tmp_path / "local.tar").read_bytes()
    with pytest.raises(mc.CheckpointExistsError, match="overwrite"):
        mc.pack(url, archive, storage_options=s3.options)
    # An archive on S3 is one object; unpack brings it back as a directory, locally or under a prefix.
    assert mc.unpack(archive, tmp_path / "out", storage_options=s3.options).digest == manifest.digest
    mc.verify(tmp_path / "out")
    assert mc.unpack(archive, f"{url}-unpacked", storage_options=s3.options).digest == manifest.digest
    mc.verify(f"{url}-unpacked", storage_options=s3.options)


def test_ancestry_finds_parents_under_an_s3_prefix(s3: S3, url: str) -> None:
    """A child's recorded parent is found by digest under a search URL, and verified there."""
    parent = mc.save(trained(), f"{url}/runs/parent", storage_options=s3.options, record_code=False)
    torch.manual_seed(9)
    child = mc.save(TiedNet(), f"{url}/runs/child", storage_options=s3.options, record_code=False,
                    parents=[parent.digest])
    chain = mc.ancestry(f"{url}/runs/child", search=[f"{url}/runs"], storage_options=s3.options)
    assert chain.ok and chain.digest == child.digest
    (ancestor,) = chain.ancestors
    assert (ancestor.digest, ancestor.status, ancestor.location) == (parent.digest, "verified", f"{url}/runs/parent")


def test_block_plan_covers_each_range_once_in_order() -> None:
    """Blocks cover the union of the ranges, at most BLOCK_BYTES each, and list every range they serve."""
    block = remote.BLOCK_BYTES
    ranges = [("b", 0, 10), ("a", 5, 3 * block), ("a", 0, 5), ("a", 4 * block, 4 * block + 1), ("a", 7, 7)]
    plan = remote._plan_blocks(ranges)
    spans = [(b.file, b.start, b.end) for b in plan]
    assert spans == [("a", 0, block), ("a", block, 2 * block), ("a", 2 * block, 3 * block),
                     ("a", 4 * block, 4 * block + 1), ("b", 0, 10)]
    assert [sorted(i for i, _, _ in b.parts) for b in plan] == [[1, 2], [1], [1], [3], [0]]


def test_verify_streams_with_bounded_blocks_and_reads_each_byte_once(
    s3: S3, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify hashes while streaming: no request exceeds BLOCK_BYTES and every byte is fetched once."""
    monkeypatch.setattr(remote, "BLOCK_BYTES", 1024)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    manifest = mc.save(model, url, storage_options=s3.options, record_code=False)
    opened = counting(monkeypatch)
    requests: list[int] = []
    original = remote.FsspecStore._fetch

    def fetch(self: remote.FsspecStore, name: str, start: int, end: int) -> bytes:
        requests.append(end - start)
        return original(self, name, start, end)

    monkeypatch.setattr(remote.FsspecStore, "_fetch", fetch)
    mc.verify(url, storage_options=s3.options)
    (store,) = opened
    size = sum(f.size for f in manifest.files.values())
    manifest_size = store.bytes_read - sum(requests)
    assert len(requests) > 10 and max(requests) <= 1024
    # Each byte once, except the header, which binding reads first and the blocks may read again.
    header = 8 + int.from_bytes(s3.fs.cat_file(f"{url[5:]}/{next(iter(manifest.files))}", start=0, end=8), "little")
    assert size <= store.bytes_read - manifest_size <= size + header
    assert not store._buffers  # nothing was held whole


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A plain HTTP server (no Range support) on 127.0.0.1 serving ``tmp_path``."""
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_urls_are_read_only_checkpoints(http_root: tuple[Path, str]) -> None:
    """check, load (verifying) and verify work over plain HTTP; a save there is a typed refusal."""
    root, base = http_root
    model = trained()
    mc.save(model, root / "ck", record_code=False)
    assert mc.check(TiedNet(), f"{base}/ck").ok
    target = TiedNet()
    mc.load(target, f"{base}/ck", verify_digests=True)
    assert_bitwise_equal(target.state_dict(), model.state_dict())
    mc.verify(f"{base}/ck")
    with pytest.raises(mc.CheckpointNotFoundError, match=r"no manifest\.json"):
        mc.read_manifest(f"{base}/absent")
    with pytest.raises(mc.StorageError):
        mc.save(model, f"{base}/new", record_code=False)
    assert not (root / "new").exists()


def test_convert_reads_from_and_writes_to_s3(s3: S3, url: str, tmp_path: Path) -> None:
    """convert s3://.../model.safetensors -> s3://.../ck equals the local conversion, digest and bytes."""
    from safetensors.torch import save_file

    model = trained()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    save_file(state, tmp_path / "model.safetensors")
    s3.fs.put_file(str(tmp_path / "model.safetensors"), f"{url[5:]}-src/model.safetensors")
    local = mc.convert(tmp_path / "model.safetensors", tmp_path / "ck", module=TiedNet())
    remote_manifest = mc.convert(
        f"{url}-src/model.safetensors", url, module=TiedNet(), storage_options=s3.options
    )
    assert remote_manifest.digest == local.digest
    assert s3.fs.cat_file(f"{url[5:]}/manifest.json") == (tmp_path / "ck" / "manifest.json").read_bytes()
    with pytest.raises(mc.CheckpointExistsError):
        mc.convert(f"{url}-src/model.safetensors", url, module=TiedNet(), storage_options=s3.options)
    target = TiedNet()
    mc.load(target, url, storage_options=s3.options)
    assert_bitwise_equal(target.state_dict(), model.state_dict())


def test_async_save_to_s3_matches_a_synchronous_save(s3: S3, url: str, tmp_path: Path) -> None:
    """async_save to an s3:// URL returns the same manifest as a local save, and the upload loads bit-exact."""
    model = trained()
    local = mc.save(model, tmp_path / "ck", record_code=False)
    future = mc.async_save(model, url, storage_options=s3.options, record_code=False)
    assert future.result().digest == local.digest
    target = TiedNet()
    mc.load(target, url, storage_options=s3.options, verify_digests=True)
    assert_bitwise_equal(target.state_dict(), model.state_dict())


_STREAMED_LOAD = """
import hashlib, json, sys, tracemalloc
import torch
import manifest_ckpt as mc
from manifest_ckpt.storage import remote
url, options = sys.argv[1], json.loads(sys.argv[2])
options.pop("skip_instance_cache")  # one client: botocore loads its 13 MB service model once
remote.BLOCK_BYTES, remote.CONCURRENCY = 128 << 10, 2
opened = []
original = remote.open_remote_store
remote.open_remote_store = lambda u, o=None: opened.append(original(u, o)) or opened[-1]
def meta_model():
    with torch.device("meta"):
        return torch.nn.Sequential(*[torch.nn.Linear(512, 512, bias=False) for _ in range(4)])
mc.load(meta_model(), url, storage_options=options)  # imports, the client, its connections
opened.clear()
model = meta_model()
tracemalloc.start()
mc.load(model, url, storage_options=options, verify_digests=True)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
digests = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
           for k, v in model.state_dict().items()}
print(json.dumps({"peak": peak, "bytes_read": opened[0].bytes_read, "digests": digests}))
"""


def test_remote_load_streams_into_the_tensors_with_bounded_memory(s3: S3, url: str) -> None:
    """A verifying load of a 4 MiB file into a meta module: every byte fetched once, at most a window held.

    Measured in a fresh process with tracemalloc (Python buffers: fetched blocks, the client's
    own; the materialised tensors are torch's): 0.8 MiB measured with a window of 2 x 128 KiB,
    where holding the file whole takes over 4 MiB.
    """
    torch.manual_seed(4)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512, bias=False) for _ in range(4)])
    manifest = mc.save(model, url, storage_options=s3.options, record_code=False)
    (size,) = [f.size for f in manifest.files.values()]
    assert size > 4 << 20
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", _STREAMED_LOAD, url, json.dumps(s3.options)],
        check=True, capture_output=True, text=True, env=env, timeout=300,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    manifest_size = len(s3.fs.cat_file(f"{url[5:]}/manifest.json"))
    assert result["bytes_read"] == manifest_size + size
    assert result["peak"] < (2 << 20), result["peak"]
    want = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in model.state_dict().items()}
    assert result["digests"] == want


def test_a_corrupt_object_found_while_streaming_leaves_the_module_as_it_was(s3: S3, url: str) -> None:
    """The stream writes into the module's tensors; a digest mismatch puts every byte back and names the tensor."""
    model = trained()
    manifest = mc.save(model, url, storage_options=s3.options, record_code=False)
    key = "emb.weight"
    entry = manifest.tensors[key]
    path = f"{url[5:]}/{entry.file}"
    data = bytearray(s3.fs.cat_file(path))
    data[entry.byte_range[0] + 5] ^= 0x10
    s3.fs.pipe_file(path, bytes(data))
    target = TiedNet()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(mc.IntegrityError, match=key) as info:
        mc.load(target, url, storage_options=s3.options, verify_digests=True)
    assert info.value.key == key
    assert_bitwise_equal(target.state_dict(), before)


@pytest.mark.distributed
def test_distributed_save_and_resharded_load_through_s3(
    s3: S3, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 gloo ranks: a rank whose upload fails leaves no checkpoint; the retry commits; a resharded load is bit-exact."""
    from tests.test_distributed import Model, expected_values, run_ranks

    monkeypatch.setenv("MANIFEST_CKPT_TEST_S3", json.dumps({"url": url, "options": s3.options}))
    ranks = run_ranks("remote", 2, tmp_path)
    for r in ranks:
        assert r["failed"]["type"] == "StorageError"
        assert url in r["failed"]["message"] and "connection reset" in r["failed"]["message"]
    # Rank 0 uploaded its file; rank 1 did not; the manifest was never written.
    left = ranks[0]["left"]
    assert len(left) == 1 and left[0].endswith("-rank0.safetensors")
    assert ranks[0]["verify_after_failure"]["type"] == "CheckpointNotFoundError"
    # The retry needs no overwrite=True, gives the digest of the same save to a directory, and
    # leaves exactly the manifest's objects.
    assert [r["digest"] for r in ranks] == [ranks[0]["local_digest"]] * 2
    manifest = mc.read_manifest(url, storage_options=s3.options)
    assert manifest.digest == ranks[0]["local_digest"]
    names = sorted(p.rsplit("/", 1)[1] for p in s3.filesystem().ls(url[5:], detail=False))
    assert names == sorted(["manifest.json", *manifest.files])
    assert [r["load_digest"] for r in ranks] == [manifest.digest] * 2
    assert all(all(r["exact"].values()) and r["exact"] for r in ranks)
    # A non-verifying resharded load streams ranged reads: bit for bit, and each rank reads less
    # than the manifest plus every weights file (only the spans of its regions, and headers).
    assert all(all(r["exact_streamed"].values()) and r["exact_streamed"] for r in ranks)
    whole = len(s3.fs.cat_file(f"{url[5:]}/manifest.json")) + sum(f.size for f in manifest.files.values())
    assert all(0 < r["bytes_read"] < whole for r in ranks), ([r["bytes_read"] for r in ranks], whole)
    # A connection dropped on rank 1 while it fetches its spans (during planning) fails the load
    # on both ranks, typed and naming the object, before any rank copied a byte.
    for r in ranks:
        assert r["dropped"]["type"] == "StorageError", r["dropped"]
        assert url in r["dropped"]["message"] and "connection reset" in r["dropped"]["message"]
        assert r["dropped_untouched"] is True
    mc.verify(url, storage_options=s3.options)
    single = Model()
    mc.load(single, url, storage_options=s3.options)
    assert_bitwise_equal(single.state_dict(), expected_values())


def _race(monkeypatch: pytest.MonkeyPatch, rival: Any) -> None:
    """Make the next save run ``rival()`` (another writer's whole save) after checking its destination."""
    original = remote.upload_files
    calls: list[int] = []

    def upload(*args: Any, **kwargs: Any) -> None:
        if not calls:
            calls.append(1)
            with monkeypatch.context() as inner:
                inner.setattr(remote, "upload_files", original)
                rival()
        original(*args, **kwargs)

    monkeypatch.setattr(remote, "upload_files", upload)


@pytest.mark.parametrize("existing", [False, True], ids=["new-url", "overwrite"])
def test_a_concurrent_writer_makes_the_second_commit_fail_typed(
    s3: S3, url: str, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    """Two saves racing to one URL: the later commit raises ConcurrentWriteError; the first's checkpoint stays whole."""
    if existing:
        mc.save(TiedNet(), url, storage_options=s3.options, record_code=False)
    torch.manual_seed(1)
    winner, loser = TiedNet(), trained()
    committed: list[mc.Manifest] = []
    _race(monkeypatch, lambda: committed.append(
        mc.save(winner, url, storage_options=s3.options, record_code=False, overwrite=existing)
    ))
    with pytest.raises(mc.ConcurrentWriteError, match="another writer") as info:
        mc.save(loser, url, storage_options=s3.options, record_code=False, overwrite=existing)
    assert info.value.url == url
    assert isinstance(info.value, mc.CheckpointExistsError)
    monkeypatch.undo()
    # The winner's checkpoint is the one there, complete and bit for bit.
    assert mc.verify(url, storage_options=s3.options) is None
    target = TiedNet()
    assert mc.load(target, url, storage_options=s3.options).manifest.digest == committed[0].digest
    assert_bitwise_equal(target.state_dict(), winner.state_dict())
    # The loser's uploaded weights are unreferenced leftovers; the next save removes them.
    names = {p.rsplit("/", 1)[1] for p in s3.fs.ls(url[5:], detail=False)}
    assert names > {"manifest.json", *committed[0].files}
    again = mc.save(loser, url, storage_options=s3.options, record_code=False, overwrite=True)
    names = {p.rsplit("/", 1)[1] for p in s3.fs.ls(url[5:], detail=False)}
    assert names == {"manifest.json", *again.files}


def test_an_overwrite_race_is_caught_for_a_manifest_s3fs_would_upload_in_parts(
    s3: S3, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If-Match holds only on a single PUT: a manifest past 2 x s3fs's chunk size must not go multipart.

    S3 ignores If-Match on CreateMultipartUpload, so a big manifest's overwrite would replace a
    rival's commit silently. s3fs's chunk size is lowered here so a small manifest stands in for one
    of over 100 MiB (its default threshold).
    """
    import s3fs

    mc.save(TiedNet(), url, storage_options=s3.options, record_code=False)
    monkeypatch.setattr(s3fs.S3FileSystem._pipe_file, "__defaults__", (1024, None, "overwrite"))
    torch.manual_seed(1)
    winner = TiedNet()
    committed: list[mc.Manifest] = []
    _race(monkeypatch, lambda: committed.append(
        mc.save(winner, url, storage_options=s3.options, record_code=False, overwrite=True)
    ))
    with pytest.raises(mc.ConcurrentWriteError, match="another writer replaced the checkpoint"):
        mc.save(trained(), url, storage_options=s3.options, record_code=False, overwrite=True)
    monkeypatch.undo()
    assert mc.read_manifest(url, storage_options=s3.options).digest == committed[0].digest


def test_a_concurrent_writer_to_a_new_memory_url_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores without S3's conditional writes still refuse a second create (fsspec's mode='create')."""
    url = "memory://race/new"
    torch.manual_seed(2)
    winner = TiedNet()
    _race(monkeypatch, lambda: mc.save(winner, url, record_code=False))
    with pytest.raises(mc.ConcurrentWriteError, match="memory://race/new"):
        mc.save(trained(), url, record_code=False)
    target = TiedNet()
    mc.load(target, url)
    assert_bitwise_equal(target.state_dict(), winner.state_dict())


class _Separate(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(8, 8, bias=False) for _ in range(3))
        self.out = torch.nn.Linear(8, 6, bias=False)


class _Fused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24, bias=False)
        self.out = torch.nn.Linear(6, 8, bias=False)  # stored transposed


_FUSE = [mc.Concatenate(("q.weight", "k.weight", "v.weight"), "qkv.weight", 0), mc.Transpose("out.weight")]


def _sizes(s3: S3, url: str, manifest: mc.Manifest) -> tuple[int, int]:
    """(manifest.json bytes, header bytes of every weights file)."""
    headers = sum(
        8 + int.from_bytes(s3.fs.cat_file(f"{url[5:]}/{name}", start=0, end=8), "little") for name in manifest.files
    )
    return len(s3.fs.cat_file(f"{url[5:]}/manifest.json")), headers


def test_a_transformed_remote_load_streams_each_byte_once_into_the_regions(
    s3: S3, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transforms= from S3: each source goes into its region of the fused tensor, verified, bit for bit as locally."""
    torch.manual_seed(6)
    source = _Separate()
    manifest = mc.save(source, url, storage_options=s3.options, record_code=False)
    mc.save(source, tmp_path / "ck", record_code=False)
    local = _Fused()
    mc.load(local, tmp_path / "ck", transforms=_FUSE, check_classes=False)
    opened = counting(monkeypatch)
    target = _Fused()
    mc.load(target, url, storage_options=s3.options, transforms=_FUSE, check_classes=False, verify_digests=True)
    assert_bitwise_equal(target.state_dict(), local.state_dict())
    assert torch.equal(target.qkv.weight[8:16], source.k.weight)
    (store,) = opened
    assert store.bytes_read == _sizes(s3, url, manifest)[0] + sum(f.size for f in manifest.files.values())

    # A flipped byte in one source is found while streaming; the module is put back.
    entry = manifest.tensors["v.weight"]
    path = f"{url[5:]}/{entry.file}"
    data = bytearray(s3.fs.cat_file(path))
    data[entry.byte_range[0] + 3] ^= 0x01
    s3.fs.pipe_file(path, bytes(data))
    fresh = _Fused()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(mc.IntegrityError, match=r"v\.weight") as info:
        mc.load(fresh, url, storage_options=s3.options, transforms=_FUSE, check_classes=False, verify_digests=True)
    assert info.value.key == "v.weight"
    assert_bitwise_equal(fresh.state_dict(), before)


class _WithState(torch.nn.Module):
    """A layer whose extra state holds a tensor (read as a value before anything is copied)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.table = torch.zeros(64)

    def get_extra_state(self) -> Any:
        return {"table": self.table, "name": "t"}

    def set_extra_state(self, state: Any) -> None:
        self.table = state["table"]


def test_a_remote_load_needing_values_reads_just_the_tensors_involved(
    s3: S3, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Extra state and a skipped large tensor: only the needed tensors' byte ranges are fetched, each once."""
    torch.manual_seed(7)
    model = _WithState()
    model.table = torch.randn(64)
    model.unused = torch.nn.Linear(1024, 64, bias=False)
    manifest = mc.save(model, url, storage_options=s3.options, record_code=False)
    opened = counting(monkeypatch)
    target = _WithState()
    result = mc.load(
        target, url, storage_options=s3.options, allow_unexpected=[r"unused\..*"], verify_digests=True,
        check_classes=False,
    )
    assert result.allowed
    assert torch.equal(target.table, model.table) and torch.equal(target.lin.weight, model.lin.weight)
    (store,) = opened
    needed = sum(
        t.byte_range[1] - t.byte_range[0] for k, t in manifest.tensors.items() if not k.startswith("unused.")
    )
    manifest_size, headers = _sizes(s3, url, manifest)
    assert store.bytes_read == manifest_size + headers + needed
    assert needed < manifest.tensors["unused.weight"].byte_range[1] - manifest.tensors["unused.weight"].byte_range[0]


def test_a_remote_load_whose_machinery_computes_values_is_exact_and_reads_once(
    s3: S3, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BatchNorm's _version migration (a derived key) from S3: values read once by range, loaded as torch does."""
    torch.manual_seed(8)
    source = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    with torch.no_grad():
        source[1].running_mean.normal_()
    old = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    manifest = mc.save(old, url, storage_options=s3.options, record_code=False)
    ours = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    theirs = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    for m in (ours, theirs):
        m[1].num_batches_tracked.fill_(5)
    theirs.load_state_dict(old)
    opened = counting(monkeypatch)
    result = mc.load(ours, url, storage_options=s3.options, verify_digests=True)
    assert "1.num_batches_tracked" in result.loaded
    assert_bitwise_equal(ours.state_dict(), theirs.state_dict())
    (store,) = opened
    assert store.bytes_read == _sizes(s3, url, manifest)[0] + sum(f.size for f in manifest.files.values())


def test_server_killed_mid_overwrite_leaves_the_old_checkpoint_whole(s3: S3, url: str) -> None:
    """overwrite=True interrupted after the first new weights object: the old checkpoint still verifies and loads."""
    old_model = trained()
    old = mc.save(old_model, url, storage_options=s3.options, record_code=False, max_file_size=256)
    torch.manual_seed(9)
    new_model = TiedNet()
    uploaded: list[int] = []

    def kill_after_first(n: int) -> None:
        uploaded.append(n)
        if len(uploaded) == 1:
            s3.server.stop()

    original = remote.upload_checkpoint

    def upload(local: Path, dest: str, **kwargs: Any) -> None:
        original(local, dest, **{**kwargs, "progress": kill_after_first})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(remote, "upload_checkpoint", upload)
        try:
            with pytest.raises(mc.StorageError, match=url):
                mc.save(new_model, url, storage_options=s3.options, record_code=False, max_file_size=256, overwrite=True)
        finally:
            s3.restart()
    assert len(uploaded) == 1
    assert mc.read_manifest(url, storage_options=s3.options).digest == old.digest
    mc.verify(url, storage_options=s3.options)
    target = TiedNet()
    mc.load(target, url, storage_options=s3.options, verify_digests=True)
    assert_bitwise_equal(target.state_dict(), old_model.state_dict())
    # The retry replaces it and removes the old files and the interrupted upload's leftovers.
    new = mc.save(new_model, url, storage_options=s3.options, record_code=False, max_file_size=256, overwrite=True)
    names = sorted(p.rsplit("/", 1)[1] for p in s3.filesystem().ls(url[5:], detail=False))
    assert names == sorted(["manifest.json", *new.files])


def test_an_archive_object_is_read_in_place_by_range(s3: S3, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An archive at a URL (pack's output) loads, checks and verifies like a local one, reading no tensor data to check."""
    model = trained()
    manifest = mc.save(model, f"{url}/ck", storage_options=s3.options, record_code=False)
    archive = f"{url}/ck.tar"
    mc.pack(f"{url}/ck", archive, storage_options=s3.options)
    opened = counting(monkeypatch)
    assert mc.read_manifest(archive, storage_options=s3.options).digest == manifest.digest
    opened.clear()
    assert mc.check(TiedNet(), archive, storage_options=s3.options).ok
    manifest_size, headers = _sizes(s3, f"{url}/ck", manifest)
    assert [store.bytes_read for store in opened] == [manifest_size + headers]  # no tensor data
    mc.verify(archive, storage_options=s3.options)
    target = TiedNet()
    mc.load(target, archive, storage_options=s3.options, verify_digests=True)
    assert_bitwise_equal(target.state_dict(), model.state_dict())
    assert target.head.weight is target.emb.weight
    # An object that is not an archive, and a tar archive of something else, are typed refusals.
    s3.fs.pipe_file(f"{url[5:]}/notes.txt", b"hello" * 200)
    with pytest.raises(mc.CheckpointNotFoundError, match=r"notes\.txt"):
        mc.read_manifest(f"{url}/notes.txt", storage_options=s3.options)
    buf = io.BytesIO()
    import tarfile

    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("readme.md")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    s3.fs.pipe_file(f"{url[5:]}/other.tar", buf.getvalue())
    with pytest.raises(mc.CheckpointNotFoundError, match=r"without manifest\.json"):
        mc.check(TiedNet(), f"{url}/other.tar", storage_options=s3.options)
