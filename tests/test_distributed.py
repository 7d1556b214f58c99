"""Sharded checkpoints on torch.distributed.checkpoint: real gloo process groups on 127.0.0.1.

Two module-scoped runs start real process groups: 2 ranks save (sync and async), then 3
ranks load with another sharding, with a rank whose state differs, and with a damaged rank
file. Each rank writes what it saw to a JSON file; the tests assert on those. The rest runs
in this process, without a process group.

Run as a script, this file is one rank of such a run:
``python tests/test_distributed.py SCENARIO RANK WORLD PORT DIRECTORY``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt import distributed as mcd
from manifest_ckpt.comparison.report import Problem, Report
from manifest_ckpt.distributed.reader import merge_reports
from manifest_ckpt.errors import UnsupportedValueError
from tests import _ranks

ROOT = Path(__file__).resolve().parents[1]


# -- the model every run shares ----------------------------------------------------------------
class Model(nn.Module):
    """Dense layers, a bf16 layer, int64 and 0-dim buffers, a tied head, a tiny parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.layer = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(6)
        self.half = nn.Linear(3, 5, bias=False).to(torch.bfloat16)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("step", torch.zeros(4, dtype=torch.int64))
        self.register_buffer("scale", torch.tensor(0.0))
        self.tiny = nn.Parameter(torch.zeros(2))  # on 3 ranks, one shard is empty


def expected_values() -> dict[str, torch.Tensor]:
    """The values every run saves, built from fixed seeds (the same on every rank)."""
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in Model().state_dict().items() if k != "head.weight"}
    values = {}
    for key, (shape, dtype) in shapes.items():
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        if dtype == torch.int64:
            values[key] = torch.randint(-(2**40), 2**40, shape, generator=gen, dtype=torch.int64)
        else:
            values[key] = torch.randn(shape, generator=gen).to(dtype)
    values["head.weight"] = values["embed.weight"]
    return values


# -- the ranks' side ---------------------------------------------------------------------------
def _sharded(
    values: dict[str, torch.Tensor], placements: dict[str, str], mesh: Any, *, zeros: bool
) -> dict[str, torch.Tensor]:
    """A state dict in Model's key order; "S0"/"S1"/"R" make DTensors, "-" a plain tensor."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    kinds = {"S0": Shard(0), "S1": Shard(1), "R": Replicate()}
    out: dict[str, torch.Tensor] = {}
    for key, full in values.items():
        if key == "head.weight":
            out[key] = out["embed.weight"]  # the tie: the very same object
            continue
        value = torch.zeros_like(full) if zeros else full.clone()
        kind = placements[key]
        # src_data_rank=None: every rank cuts its shard from its own copy, no communication.
        out[key] = value if kind == "-" else distribute_tensor(value, mesh, [kinds[kind]], src_data_rank=None)
    return out


SAVE_PLACEMENT = {
    "embed.weight": "S0",
    "layer.weight": "S1",
    "layer.bias": "S0",
    "norm.weight": "R",
    "norm.bias": "-",
    "half.weight": "S0",
    "step": "-",
    "scale": "-",
    "tiny": "S0",
}
LOAD_PLACEMENT = {
    "embed.weight": "S1",
    "layer.weight": "S0",
    "layer.bias": "R",
    "norm.weight": "S0",
    "norm.bias": "S0",
    "half.weight": "S1",
    "step": "-",
    "scale": "-",
    "tiny": "S0",
}


def _local(value: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


def _untouched(state: dict[str, torch.Tensor]) -> bool:
    return all(not _local(v).any() for v in state.values())


def _bit_exact(state: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Per key: does the loaded whole tensor equal the saved one in dtype and bits?"""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, want in expected_values().items():
        value = state[key]
        full = value.full_tensor() if isinstance(value, DTensor) else value
        out[key] = full.dtype == want.dtype and torch.equal(
            full.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
        )
    return out


def _expect_failure(run: Callable[[], Any]) -> dict[str, Any]:
    try:
        run()
    except mc.ModelMismatchError as exc:
        problems = [[p.kind, p.key, p.expected, p.found] for p in exc.report.problems]
        return {"type": type(exc).__name__, "message": str(exc), "problems": problems, "hints": exc.report.hints}
    except mc.ManifestCkptError as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": "none", "message": ""}


class _BrokenStateful:
    """A Stateful whose state_dict raises (user code failing on one rank)."""

    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError("lost the dataloader state (injected)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise AssertionError("not loaded")


def _scenario_save(rank: int, mesh: Any, directory: Path) -> dict[str, Any]:
    values = expected_values()
    state = _sharded(values, SAVE_PLACEMENT, mesh, zeros=False)
    manifest = mcd.save(state, directory / "ck", module=Model(), record_code=False, lineage={"step": 7})
    pending = mcd.async_save(state, directory / "ck_async", record_code=False)
    async_manifest = pending.result(timeout=60)
    again = _expect_failure(lambda: mcd.save(state, directory / "ck", record_code=False))
    app = {"model": state, "progress": {"step": 7, "losses": [0.5, 0.25]}, "blob": io.BytesIO(b"same on all")}
    app_digest = mcd.save(app, directory / "ck_app", record_code=False).digest
    out = {"digest": manifest.digest, "async_digest": async_manifest.digest, "again": again, "app_digest": app_digest}

    # Rank 1's disk fills while it writes: every rank raises one typed error naming rank 1 (not
    # DCP's CheckpointException, which is no Exception), and the checkpoint at the path stays.
    import torch.distributed as dist

    from manifest_ckpt.distributed.writer import ManifestStorageWriter

    dist.barrier()
    before = sorted(os.listdir(directory))
    original = ManifestStorageWriter.write_data
    if rank == 1:

        def full(self: Any, *args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

        ManifestStorageWriter.write_data = full  # type: ignore[method-assign]
    out["disk_full"] = _expect_failure(lambda: mcd.save(state, directory / "ck", overwrite=True, record_code=False))
    pending = mcd.async_save(state, directory / "ck", overwrite=True, record_code=False)
    out["disk_full_async"] = _expect_failure(lambda: pending.result(timeout=60))
    ManifestStorageWriter.write_data = original  # type: ignore[method-assign]
    # A value only rank 1 cannot store: async_save refuses on both ranks at once (no rank hangs).
    odd = {**state, "bad": object()} if rank == 1 else state
    out["refused_async"] = _expect_failure(lambda: mcd.async_save(odd, directory / "ck_odd", record_code=False).result(timeout=60))
    broken = {**state, "extra": _BrokenStateful()} if rank == 1 else {**state, "extra": {"n": 1}}
    out["stateful_async"] = _expect_failure(lambda: mcd.async_save(broken, directory / "ck_odd", record_code=False).result(timeout=60))
    out["stateful_sync"] = _expect_failure(lambda: mcd.save(broken, directory / "ck_odd", record_code=False))
    dist.barrier()
    out["left_as_before"] = sorted(os.listdir(directory)) == before
    out["digest_after_disk_full"] = mc.read_manifest(directory / "ck").digest
    mc.verify(directory / "ck")
    return out


def _scenario_load(rank: int, mesh: Any, directory: Path) -> dict[str, Any]:
    import torch.distributed as dist

    values = expected_values()
    out: dict[str, Any] = {}

    state = _sharded(values, LOAD_PLACEMENT, mesh, zeros=True)
    out["digest"] = mcd.load(state, directory / "ck", verify_digests=True, module=Model()).digest
    out["exact"] = _bit_exact(state)
    state = _sharded(values, LOAD_PLACEMENT, mesh, zeros=True)
    mcd.load(state, directory / "ck_async")
    out["exact_async"] = _bit_exact(state)
    app = {"model": _sharded(values, LOAD_PLACEMENT, mesh, zeros=True), "progress": {"step": 0}, "blob": io.BytesIO()}
    mcd.load(app, directory / "ck_app", allow_unexpected=[r"progress\.losses"])
    out["app_exact"] = _bit_exact(app["model"])
    out["app_values"] = [app["progress"], app["blob"].getvalue().decode()]

    # Rank 2 expects another shape and an extra key, rank 1 another dtype: all ranks hear of all.
    wrong = dict(values)
    if rank == 2:
        wrong["layer.weight"] = torch.zeros(8, 6)
        wrong["extra"] = torch.zeros(3)
    if rank == 1:
        wrong["norm.bias"] = torch.zeros(6, dtype=torch.float64)
    state = _sharded(wrong, {**LOAD_PLACEMENT, "extra": "-"}, mesh, zeros=True)
    out["mismatch"] = _expect_failure(lambda: mcd.load(state, directory / "ck"))
    out["mismatch_untouched"] = _untouched(state)

    if rank == 0:
        manifest = mc.read_manifest(directory / "ck")
        shutil.copytree(directory / "ck", directory / "ck_bad")
        chunk = next(c for c in manifest.tensors["embed.weight"].pieces() if "-rank1" in c.file)
        with open(directory / "ck_bad" / chunk.file, "r+b") as f:
            f.seek(chunk.byte_range[0] + 3)
            byte = f.read(1)
            f.seek(chunk.byte_range[0] + 3)
            f.write(bytes([byte[0] ^ 0xFF]))
        shutil.copytree(directory / "ck", directory / "ck_short")
        victim = next(name for name in manifest.files if "-rank0" in name)
        os.truncate(directory / "ck_short" / victim, manifest.files[victim].size - 100)
    dist.barrier()
    state = _sharded(values, LOAD_PLACEMENT, mesh, zeros=True)
    out["corrupt"] = _expect_failure(lambda: mcd.load(state, directory / "ck_bad", verify_digests=True))
    out["corrupt_untouched"] = _untouched(state)
    out["short"] = _expect_failure(lambda: mcd.load(state, directory / "ck_short"))
    out["short_untouched"] = _untouched(state)

    # A Stateful failing on rank 2 only: every rank raises RankFailedError naming it, none waits.
    state = _sharded(values, LOAD_PLACEMENT, mesh, zeros=True)
    app = {"model": state, "progress": _BrokenStateful() if rank == 2 else {"step": 0}, "blob": io.BytesIO()}
    out["stateful"] = _expect_failure(lambda: mcd.load(app, directory / "ck_app", allow_unexpected=[r"progress\..*"]))
    out["stateful_untouched"] = _untouched(state)
    return out


class _ResettingFs:
    """An fsspec file system whose uploads fail as a dropped connection does."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def put_file(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionResetError("connection reset by peer (injected)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fs, name)


class _DroppingFs:
    """An fsspec file system whose ranged reads of tensor data (past a file's header) fail as a dropped connection does."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        if path.endswith(".safetensors") and start is not None:
            header = 8 + int.from_bytes(self.fs.cat_file(path, start=0, end=8), "little")
            if start >= header:
                raise ConnectionResetError("connection reset by peer (injected)")
        return bytes(self.fs.cat_file(path, start=start, end=end, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fs, name)


def _scenario_remote(rank: int, mesh: Any, directory: Path) -> dict[str, Any]:
    """2 ranks against the S3 server in ``MANIFEST_CKPT_TEST_S3``: a failed upload, a retry, a resharded load."""
    import torch.distributed as dist

    from manifest_ckpt.storage import remote

    where = json.loads(os.environ["MANIFEST_CKPT_TEST_S3"])
    url, options = where["url"], where["options"]
    values = expected_values()
    state = _sharded(values, SAVE_PLACEMENT, mesh, zeros=False)
    out: dict[str, Any] = {"local_digest": mcd.save(state, directory / "ck_remote_ref", record_code=False).digest}

    # Rank 1's upload fails; rank 0's file is already up by then (writes finish before DCP gathers).
    original = remote._filesystem
    if rank == 1:
        remote._filesystem = lambda u, o: (_ResettingFs(original(u, o)[0]), original(u, o)[1])  # type: ignore[assignment]
    out["failed"] = _expect_failure(lambda: mcd.save(state, url, record_code=False, storage_options=options))
    remote._filesystem = original  # type: ignore[assignment]
    dist.barrier()
    if rank == 0:
        fs = remote._filesystem(url, options)[0]
        out["left"] = sorted(p.rsplit("/", 1)[1] for p in fs.ls(url[5:], detail=False))
        out["verify_after_failure"] = _expect_failure(lambda: mc.verify(url, storage_options=options))
    dist.barrier()

    out["digest"] = mcd.save(state, url, record_code=False, storage_options=options).digest
    loaded = _sharded(values, LOAD_PLACEMENT, mesh, zeros=True)
    out["load_digest"] = mcd.load(loaded, url, verify_digests=True, storage_options=options).digest
    out["exact"] = _bit_exact(loaded)
    # Without verification each rank streams just the byte spans of the regions it reads.
    stores: list[remote.FsspecStore] = []
    opener = remote.open_remote_store
    remote.open_remote_store = lambda u, o=None: stores.append(opener(u, o)) or stores[-1]  # type: ignore[assignment]
    streamed = _sharded(values, LOAD_PLACEMENT, mesh, zeros=True)
    mcd.load(streamed, url, storage_options=options)
    remote.open_remote_store = opener  # type: ignore[assignment]
    out["exact_streamed"] = _bit_exact(streamed)
    out["bytes_read"] = sum(store.bytes_read for store in stores)

    # Rank 1's connection drops while it fetches tensor data: every rank raises, none copied a byte.
    if rank == 1:
        remote._filesystem = lambda u, o: (_DroppingFs(original(u, o)[0]), original(u, o)[1])  # type: ignore[assignment]
    dropped = _sharded(values, LOAD_PLACEMENT, mesh, zeros=True)
    out["dropped"] = _expect_failure(lambda: mcd.load(dropped, url, storage_options=options))
    remote._filesystem = original  # type: ignore[assignment]
    out["dropped_untouched"] = _untouched(dropped)
    return out


SCENARIOS = {"save": _scenario_save, "load": _scenario_load, "remote": _scenario_remote}


def _with_mesh(scenario: Callable[[int, Any, Path], dict[str, Any]]) -> _ranks.Scenario:
    """A scenario given a 1-D CPU mesh of all ranks."""

    def run(rank: int, world: int, directory: Path) -> dict[str, Any]:
        from torch.distributed.device_mesh import init_device_mesh

        return scenario(rank, init_device_mesh("cpu", (world,)), directory)

    return run


def run_ranks(scenario: str, world: int, directory: Path, *, timeout: float = 150) -> list[dict[str, Any]]:
    """Start ``world`` processes of this file as one gloo group and collect each rank's JSON."""
    return _ranks.run_ranks(Path(__file__).resolve(), scenario, world, directory, timeout=timeout)


# -- multi-process runs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """A 2-rank save (sync and async) of the sharded model."""
    directory = tmp_path_factory.mktemp("dcp")
    return directory, run_ranks("save", 2, directory)


@pytest.fixture(scope="module")
def loaded(saved: tuple[Path, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """3-rank loads of the 2-rank checkpoint: resharded, mismatched, damaged."""
    directory, _ = saved
    return run_ranks("load", 3, directory)


@pytest.mark.distributed
def test_two_ranks_commit_one_manifest(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    """Both ranks return the same manifest, whose files are one per rank and verify offline."""
    directory, results = saved
    manifest = mc.read_manifest(directory / "ck")
    assert [r["digest"] for r in results] == [manifest.digest, manifest.digest]
    assert sorted(n.rsplit("-", 1)[1] for n in manifest.files) == ["rank0.safetensors", "rank1.safetensors"]
    assert sorted(os.listdir(directory / "ck")) == sorted(["manifest.json", *manifest.files])
    mc.verify(directory / "ck")


@pytest.mark.distributed
def test_sharded_tensors_are_chunked_and_whole_ones_are_plain(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    """Shards become chunks with global offsets; replicated and plain tensors are stored whole, once."""
    directory, _ = saved
    manifest = mc.read_manifest(directory / "ck")
    bias = manifest.tensors["layer.bias"]
    assert bias.chunks is not None
    assert [(c.offsets, c.shape) for c in bias.chunks] == [((0,), (4,)), ((4,), (3,))]
    assert [(c.offsets, c.shape) for c in manifest.tensors["layer.weight"].pieces()] == [
        ((0, 0), (7, 3)),
        ((0, 3), (7, 3)),
    ]
    assert manifest.tensors["norm.weight"].chunks is None
    assert manifest.tensors["scale"].shape == ()
    assert manifest.aliases == {"head.weight": "embed.weight"}
    assert manifest.modules is not None and manifest.modules["layer"].cls == "torch.nn.modules.linear.Linear"
    assert manifest.lineage["user"] == {"step": 7}


@pytest.mark.distributed
def test_whole_tensors_have_the_digest_single_process_save_gives(
    saved: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """A tensor stored whole by the ranks has the same digest as in mc.save of the same values."""
    directory, _ = saved
    model = Model()
    model.load_state_dict(expected_values())
    single = mc.save(model, tmp_path / "single", record_code=False)
    sharded = mc.read_manifest(directory / "ck")
    for key in ("norm.weight", "norm.bias", "step", "scale"):
        assert sharded.tensors[key].digest == single.tensors[key].digest, key


@pytest.mark.distributed
def test_single_process_load_assembles_the_chunks(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    """mc.load fills an unsharded module from the 2-rank checkpoint, bit for bit."""
    directory, _ = saved
    model = Model()
    result = mc.load(model, directory / "ck", verify_digests=True)
    assert result.retied == ["head.weight"]
    for key, want in expected_values().items():
        assert torch.equal(model.state_dict()[key], want), key


@pytest.mark.distributed
def test_async_save_writes_the_same_checkpoint(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    """async_save commits a checkpoint with the same tensors as save (no module tree given)."""
    directory, results = saved
    sync, async_ = mc.read_manifest(directory / "ck"), mc.read_manifest(directory / "ck_async")
    assert results[0]["async_digest"] == results[1]["async_digest"] == async_.digest
    assert {k: t.digest for k, t in async_.tensors.items()} == {k: t.digest for k, t in sync.tensors.items()}
    assert async_.aliases == sync.aliases
    mc.verify(directory / "ck_async")


@pytest.mark.distributed
def test_a_stateful_failing_on_one_rank_fails_the_load_on_every_rank(loaded: list[dict[str, Any]]) -> None:
    """Rank 2's Stateful raises in state_dict(): RankFailedError naming rank 2 on all three ranks, nothing loaded."""
    for r in loaded:
        assert r["stateful"]["type"] == "RankFailedError", r["stateful"]
        assert "ck_app failed on rank 2: RuntimeError: lost the dataloader state (injected)" in r["stateful"]["message"]
        assert r["stateful_untouched"] is True


@pytest.mark.distributed
def test_a_rank_whose_disk_fills_fails_the_save_typed_on_every_rank(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    """An OSError on rank 1 while writing: RankFailedError on both ranks (sync and async); the checkpoint stays.

    And a value only rank 1 cannot store makes async_save refuse on both ranks (it hung rank 0).
    """
    _, results = saved
    for r in results:
        for outcome in (r["disk_full"], r["disk_full_async"]):
            assert outcome["type"] == "RankFailedError", outcome
            assert "failed on rank 1: OSError: [Errno 28] No space left on device (injected)" in outcome["message"]
            assert "/ck failed" in outcome["message"] and "run it again" in outcome["message"]
        assert r["left_as_before"] is True
        assert r["digest_after_disk_full"] == r["digest"]
        assert r["refused_async"]["type"] == "UnsupportedValueError"
        assert "bad (builtins.object)" in r["refused_async"]["message"]
        for outcome in (r["stateful_async"], r["stateful_sync"]):
            assert outcome["type"] == "RankFailedError", outcome
            assert "ck_odd failed on rank 1: RuntimeError: lost the dataloader state (injected)" in outcome["message"]


@pytest.mark.distributed
def test_saving_over_a_checkpoint_is_refused_on_every_rank(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    """A second save without overwrite raises CheckpointExistsError on both ranks."""
    _, results = saved
    assert [r["again"]["type"] for r in results] == ["CheckpointExistsError"] * 2
    assert "pass overwrite=True" in results[0]["again"]["message"]


@pytest.mark.distributed
def test_three_ranks_load_two_rank_checkpoint_resharded_bit_exact(loaded: list[dict[str, Any]]) -> None:
    """Saved on 2 ranks with one placement, loaded on 3 with another: every tensor is bit-exact."""
    keys = sorted(expected_values())
    for rank, result in enumerate(loaded):
        assert result["exact"] == dict.fromkeys(keys, True), rank
        assert result["exact_async"] == dict.fromkeys(keys, True), rank
    assert len({r["digest"] for r in loaded}) == 1


@pytest.mark.distributed
def test_an_application_state_saved_on_two_ranks_loads_on_three(
    saved: tuple[Path, list[dict[str, Any]]], loaded: list[dict[str, Any]]
) -> None:
    """Sharded tensors with values and bytes: one tree in the manifest, resharded bit-exact, values on every rank."""
    directory, results = saved
    manifest = mc.read_manifest(directory / "ck_app")
    assert results[0]["app_digest"] == results[1]["app_digest"] == manifest.digest
    assert manifest.state is not None and manifest.aliases == {"model.head.weight": "model.embed.weight"}
    mc.verify(directory / "ck_app")
    keys = sorted(expected_values())
    for rank, result in enumerate(loaded):
        assert result["app_exact"] == dict.fromkeys(keys, True), rank
        assert result["app_values"] == [{"step": 7}, "same on all"], rank


@pytest.mark.distributed
def test_a_rank_that_differs_makes_every_rank_raise_the_same_report(loaded: list[dict[str, Any]]) -> None:
    """Problems of ranks 1 and 2 are gathered into one ModelMismatchError raised on all 3 ranks."""
    failures = [r["mismatch"] for r in loaded]
    assert [f["type"] for f in failures] == ["ModelMismatchError"] * 3
    assert failures[0]["message"] == failures[1]["message"] == failures[2]["message"]
    assert failures[0]["problems"] == [
        ["missing", "extra", "float32[3]", None],
        ["shape", "layer.weight", "float32[8, 6]", "float32[7, 6]"],
        ["dtype", "norm.bias", "float64[6]", "float32[6]"],
    ]
    hints = failures[0]["hints"]
    # Each kind's fix (cast=True, allow_missing...) is hinted too; the per-rank lines say where.
    assert [h for h in hints if "only on rank" in h][:3] == [
        "missing 'extra': only on rank 2",
        "shape 'layer.weight': only on rank 2",
        "dtype 'norm.bias': only on rank 1",
    ]
    assert all(r["mismatch_untouched"] for r in loaded)


@pytest.mark.distributed
def test_a_corrupted_rank_file_is_caught_on_every_rank_before_any_copy(loaded: list[dict[str, Any]]) -> None:
    """One flipped byte in rank 1's file fails verify_digests on all ranks; nothing is loaded."""
    failures = [r["corrupt"] for r in loaded]
    assert [f["type"] for f in failures] == ["IntegrityError"] * 3
    assert len({f["message"] for f in failures}) == 1
    assert "embed.weight" in failures[0]["message"] and "-rank1.safetensors" in failures[0]["message"]
    assert all(r["corrupt_untouched"] for r in loaded)


@pytest.mark.distributed
def test_a_truncated_rank_file_is_caught_without_hashing(loaded: list[dict[str, Any]]) -> None:
    """A rank file 100 bytes short is refused on all ranks by its size, verify_digests off."""
    failures = [r["short"] for r in loaded]
    assert [f["type"] for f in failures] == ["IntegrityError"] * 3
    assert "truncated" in failures[0]["message"] and "-rank0.safetensors" in failures[0]["message"]
    assert all(r["short_untouched"] for r in loaded)


# -- one process, no process group ---------------------------------------------------------------
def _model() -> Model:
    model = Model()
    model.load_state_dict(expected_values())
    return model


def test_unsharded_save_has_the_digest_of_mc_save(tmp_path: Path) -> None:
    """Without a process group, distributed.save writes what mc.save writes, digest for digest."""
    model = _model()
    single = mc.save(model, tmp_path / "single", record_code=False)
    manifest = mcd.save(model.state_dict(), tmp_path / "dcp", module=model, record_code=False)
    assert manifest.digest == single.digest
    assert manifest.aliases == {"head.weight": "embed.weight"}
    assert mc.read_manifest(tmp_path / "dcp") == manifest
    mc.verify(tmp_path / "dcp")


def test_load_reads_a_checkpoint_written_by_mc_save(tmp_path: Path) -> None:
    """distributed.load fills a plain state dict from an mc.save checkpoint and returns its manifest."""
    single = mc.save(_model(), tmp_path / "single", record_code=False)
    state = Model().state_dict()
    manifest = mcd.load(state, tmp_path / "single", verify_digests=True)
    assert manifest.digest == single.digest
    for key, want in expected_values().items():
        assert torch.equal(state[key], want), key


def test_dtype_differences_are_refused_unless_cast(tmp_path: Path) -> None:
    """A float64 target is a dtype problem; cast=True converts the stored values instead."""
    mcd.save(_model().state_dict(), tmp_path / "ck", record_code=False)
    state = Model().state_dict()
    state["layer.bias"] = torch.zeros(7, dtype=torch.float64)
    with pytest.raises(mc.ModelMismatchError) as info:
        mcd.load(state, tmp_path / "ck")
    assert [(p.kind, p.key) for p in info.value.report.problems] == [("dtype", "layer.bias")]
    assert not state["layer.bias"].any()
    mcd.load(state, tmp_path / "ck", cast=True)
    assert torch.equal(state["layer.bias"], expected_values()["layer.bias"].double())


def test_missing_and_unexpected_keys_follow_the_policies(tmp_path: Path) -> None:
    """Keys only one side has are refused, unless allowed by pattern or strict=False."""
    mcd.save(_model().state_dict(), tmp_path / "ck", record_code=False)
    state = Model().state_dict()
    del state["step"]
    state["new.bias"] = torch.zeros(2)
    with pytest.raises(mc.ModelMismatchError) as info:
        mcd.load(state, tmp_path / "ck")
    assert [(p.kind, p.key) for p in info.value.report.problems] == [("missing", "new.bias"), ("unexpected", "step")]
    mcd.load(state, tmp_path / "ck", allow_missing=[r"new\..*"], allow_unexpected=["step"])
    assert torch.equal(state["layer.weight"], expected_values()["layer.weight"])
    assert not state["new.bias"].any()


def test_remap_renames_checkpoint_keys(tmp_path: Path) -> None:
    """A prefix the checkpoint lacks is added by remap, as the mismatch report suggests."""
    mcd.save(_model().state_dict(), tmp_path / "ck", record_code=False)
    state = {f"model.{k}": v for k, v in Model().state_dict().items()}
    with pytest.raises(mc.ModelMismatchError) as info:
        mcd.load(state, tmp_path / "ck")
    assert info.value.report.suggested_remap == {"^": "model."}
    mcd.load(state, tmp_path / "ck", remap={"^": "model."})
    assert torch.equal(state["model.embed.weight"], expected_values()["embed.weight"])


def test_expect_digest_pins_the_checkpoint(tmp_path: Path) -> None:
    """A checkpoint whose digest is not the pinned one is refused with IntegrityError."""
    manifest = mcd.save(_model().state_dict(), tmp_path / "ck", record_code=False)
    state = Model().state_dict()
    with pytest.raises(mc.IntegrityError, match="not the checkpoint you pinned"):
        mcd.load(state, tmp_path / "ck", expect_digest="sha256:" + "0" * 64)
    assert mcd.load(state, tmp_path / "ck", expect_digest=manifest.digest).digest == manifest.digest


def test_missing_checkpoint_raises_the_library_error(tmp_path: Path) -> None:
    """A path without a checkpoint raises CheckpointNotFoundError, not DCP's wrapper."""
    with pytest.raises(mc.CheckpointNotFoundError, match="no such checkpoint"):
        mcd.load(Model().state_dict(), tmp_path / "nothing")


def test_values_that_need_pickle_are_refused_before_writing(tmp_path: Path) -> None:
    """Objects that are neither tensors, bytes nor plain values are refused, all named, nothing written."""
    state: dict[str, Any] = {"w": torch.zeros(2), "optim": {"lr": 0.1, "fn": print, 3.5: 1}, "p": Path("x")}
    with pytest.raises(UnsupportedValueError) as info:
        mcd.save(state, tmp_path / "ck")
    assert info.value.keys == ("optim.fn", "optim.3.5", "p")
    assert "optim.fn (builtins.builtin_function_or_method)" in str(info.value)
    assert not (tmp_path / "ck").exists()


def test_module_tree_must_match_the_state_dict(tmp_path: Path) -> None:
    """module= with a state dict nested under a prefix is refused before writing."""
    model = _model()
    with pytest.raises(mc.ManifestError, match="not nested under a prefix"):
        mcd.save({"model": model.state_dict()}, tmp_path / "ck", module=model)
    assert not (tmp_path / "ck" / "manifest.json").exists()


def test_overwrite_replaces_and_cleans_the_old_files(tmp_path: Path) -> None:
    """overwrite=True commits the new manifest and removes the weights files only the old one used."""
    first = mcd.save({"w": torch.zeros(3)}, tmp_path / "ck", record_code=False)
    second = mcd.save({"w": torch.ones(3)}, tmp_path / "ck", overwrite=True, record_code=False)
    assert first.files.keys() != second.files.keys()
    assert sorted(os.listdir(tmp_path / "ck")) == sorted(["manifest.json", *second.files])


def test_leftovers_of_an_interrupted_save_are_replaced(tmp_path: Path) -> None:
    """A directory holding only an interrupted save's weights files is written into and cleaned."""
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "weights-0123456789abcdef-rank1.safetensors").write_bytes(b"partial")
    (tmp_path / "ck" / ".weights.abc.tmp").write_bytes(b"partial")
    manifest = mcd.save({"w": torch.zeros(3)}, tmp_path / "ck", record_code=False)
    assert sorted(os.listdir(tmp_path / "ck")) == sorted(["manifest.json", *manifest.files])


def test_a_writer_dcp_abandons_removes_its_staging_when_collected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dcp.save with our writer, failing while writing: DCP never calls it again; its staging goes with it."""
    import gc

    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    def full(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(mcd.ManifestStorageWriter, "write_data", full)
    writer = mcd.ManifestStorageWriter(tmp_path / "ck")
    with pytest.warns(UserWarning, match="single process"), pytest.raises(CheckpointException):
        dcp_save({"w": torch.zeros(3)}, storage_writer=writer, planner=mcd.ManifestSavePlanner())
    assert [n for n in os.listdir(tmp_path) if n.startswith(".ck.")], "the failed save staged nothing"
    del writer
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    """Saving into a non-empty directory without manifest.json fails, even with overwrite."""
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    with pytest.raises(mc.CheckpointExistsError, match=r"notes\.txt"):
        mcd.save({"w": torch.zeros(3)}, tmp_path / "ck", overwrite=True)
    assert os.listdir(tmp_path / "ck") == ["notes.txt"]


def test_reader_refuses_to_cast_under_dcps_default_planner(tmp_path: Path) -> None:
    """With DCP's own planner (which casts silently) the reader still refuses a dtype change."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    mcd.save({"w": torch.ones(3)}, tmp_path / "ck", record_code=False)
    state = {"w": torch.zeros(3, dtype=torch.float64)}
    with pytest.warns(UserWarning, match="single process"), pytest.raises(CheckpointException) as info:
        dcp_load(state, storage_reader=mcd.ManifestStorageReader(tmp_path / "ck"))
    error = info.value.failures[0][0]
    assert isinstance(error, mc.ModelMismatchError)
    assert [(p.kind, p.key, p.expected, p.found) for p in error.report.problems] == [
        ("dtype", "w", "float64", "float32")
    ]
    assert not state["w"].any()


def test_load_planner_checks_a_plain_dcp_checkpoint(tmp_path: Path) -> None:
    """ManifestLoadPlanner reports dtype and shape differences against DCP's own metadata too."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    with pytest.warns(UserWarning, match="single process"):
        dcp_save({"a": torch.ones(2), "b": torch.ones(3)}, storage_writer=FileSystemWriter(tmp_path / "plain"))
    state = {"a": torch.zeros(2, dtype=torch.float16), "b": torch.zeros(4)}
    with pytest.warns(UserWarning, match="single process"), pytest.raises(CheckpointException) as info:
        dcp_load(state, storage_reader=FileSystemReader(tmp_path / "plain"), planner=mcd.ManifestLoadPlanner())
    error = info.value.failures[0][0]
    assert isinstance(error, mc.ModelMismatchError)
    assert [(p.kind, p.key) for p in error.report.problems] == [("shape", "b"), ("dtype", "a")]
    assert not state["a"].any() and not state["b"].any()


class _Identity:
    """A stream transform as DCP's ZStandard is one (zstandard itself may not be installed)."""

    @staticmethod
    def make() -> Any:
        from torch.distributed.checkpoint._extension import StreamTransformExtension

        class Identity(StreamTransformExtension):
            @staticmethod
            def registry_name() -> str:
                return "identity"

            @staticmethod
            def from_descriptor(version: str) -> Identity:
                return Identity()

            def get_descriptor(self) -> str:
                return "identity/1"

            def transform_to(self, output: Any) -> Any:
                return output

            def transform_from(self, input: Any) -> Any:
                return input

        return Identity()


def test_stream_extensions_are_refused(tmp_path: Path) -> None:
    """_extensions (compression) raises UnsupportedOptionError naming the extension; nothing is created."""
    with pytest.raises(mc.UnsupportedOptionError, match=r"_extensions=Identity is not supported"):
        mcd.ManifestStorageWriter(tmp_path / "ck", _extensions=[_Identity.make()])
    assert not (tmp_path / "ck").exists()
    with pytest.raises(mc.UnsupportedOptionError, match="thread_count must be an int >= 1, got 0"):
        mcd.ManifestStorageWriter(tmp_path / "ck", thread_count=0)


def _dcp_save_with(state: dict[str, Any], path: Path, **options: Any) -> mc.Manifest:
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    writer = mcd.ManifestStorageWriter(path, record_code=False, **options)
    with pytest.warns(UserWarning, match="single process"):
        dcp_save(state, storage_writer=writer, planner=mcd.ManifestSavePlanner())
    return mc.read_manifest(path)


def test_thread_count_writes_that_many_files_with_the_same_digest(tmp_path: Path) -> None:
    """thread_count=3 spreads one rank's tensors over 3 files (3 threads); content and digest are unchanged."""
    one = _dcp_save_with(_model().state_dict(), tmp_path / "one")
    three = _dcp_save_with(_model().state_dict(), tmp_path / "three", thread_count=3)
    assert len(one.files) == 1 and len(three.files) == 3
    assert three.digest == one.digest
    model = Model()
    mc.load(model, tmp_path / "three", verify_digests=True)
    for key, want in expected_values().items():
        assert torch.equal(model.state_dict()[key], want), key


def test_single_file_per_rank_false_writes_a_file_per_tensor(tmp_path: Path) -> None:
    """single_file_per_rank=False stores each tensor in its own file, as FileSystemWriter does."""
    manifest = _dcp_save_with(_model().state_dict(), tmp_path / "ck", single_file_per_rank=False)
    assert len(manifest.files) == len(manifest.tensors) == len(expected_values()) - 1  # the tie is an alias
    assert len({t.file for t in manifest.tensors.values()}) == len(manifest.tensors)
    mc.verify(tmp_path / "ck")


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_tensors_raise_the_library_error(tmp_path: Path, layout: str) -> None:
    """A sparse tensor is refused with UnsupportedTensorError naming its key, not DCP's CheckpointException."""
    dense = torch.eye(3)
    value = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    with pytest.raises(mc.UnsupportedTensorError, match=rf"'opt\.s' has layout torch\.sparse_{layout}"):
        mcd.save({"w": dense, "opt": {"s": value}}, tmp_path / "ck")
    assert not (tmp_path / "ck" / "manifest.json").exists()


_WITHOUT_LIBRARY = """
import sys
sys.modules["manifest_ckpt"] = None  # any import of it fails
import warnings
warnings.simplefilter("ignore")
import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict_loader import load
state = {"a": torch.zeros(3), "b": torch.zeros(3), "nested": {"c": torch.zeros(2, dtype=torch.int64), "step": 0}}
state["blob"] = None
load(state, storage_reader=FileSystemReader(sys.argv[1]))
dcp_to_torch_save(sys.argv[1], sys.argv[2])
whole = torch.load(sys.argv[2], weights_only=False)
assert sorted(whole) == ["a", "b", "blob", "nested"], sorted(whole)
assert torch.equal(whole["nested"]["c"], torch.arange(2)), whole
print("ok", state["a"].tolist(), state["b"].tolist(), state["nested"]["c"].tolist(), state["nested"]["step"],
      state["blob"].getvalue())
"""


def test_our_save_planner_leaves_dcp_metadata_readable_without_the_library(tmp_path: Path) -> None:
    """FileSystemWriter under ManifestSavePlanner writes .metadata that torch reads where manifest_ckpt is absent."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    shared = torch.arange(3, dtype=torch.float32)
    # A tie (ManifestSavePlanner's aliases) and non-tensor values (its value tree) stay out of .metadata.
    state = {"a": shared, "b": shared, "nested": {"c": torch.arange(2), "step": 3}, "blob": io.BytesIO(b"raw")}
    with pytest.warns(UserWarning, match="single process"):
        dcp_save(state, storage_writer=FileSystemWriter(tmp_path / "plain"), planner=mcd.ManifestSavePlanner())
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_LIBRARY, str(tmp_path / "plain"), str(tmp_path / "whole.pt")],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "ok [0.0, 1.0, 2.0] [0.0, 1.0, 2.0] [0, 1] 3 b'raw'"


# -- application states: get_state_dict, Stateful objects, values --------------------------------
class _TrainState:
    """A Stateful object whose state mixes tensors, plain values and a BytesIO (as in DCP's e2e test)."""

    def __init__(self, step: int = 0, losses: list[float] | None = None) -> None:
        self.step, self.losses = step, list(losses or [])

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step), "losses": self.losses, "note": io.BytesIO(b"\x00raw")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.losses = int(state["step"]), state["losses"]
        self.note = state["note"].getvalue()


def _trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    optim = torch.optim.Adam(model.parameters(), lr=0.1 if seed == 0 else 0.2)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        optim.step()
        optim.zero_grad()
    return model, optim


def _plain(value: Any) -> Any:
    """A comparable form: tensors as (dtype, bits), BytesIO as its bytes, containers keep their type."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), value.reshape(-1).view(torch.uint8).tolist())
    if isinstance(value, io.BytesIO):
        return ("bytesio", value.getvalue())
    return value


def test_get_state_dict_recipe_round_trips_bit_exact(tmp_path: Path) -> None:
    """{"model": msd, "optim": osd} from get_state_dict saves and loads in place; set_state_dict restores all."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optim = _trained(0)
    msd, osd = get_state_dict(model, optim)
    manifest = mcd.save({"model": msd, "optim": osd}, tmp_path / "ck", record_code=False)
    assert manifest.format_version == "1.1.0" and manifest.modules is None
    assert "optim.state.0.weight.exp_avg" in manifest.tensors
    mc.verify(tmp_path / "ck")

    fresh, fresh_optim = _trained(1)
    msd2, osd2 = get_state_dict(fresh, fresh_optim)
    target = {"model": msd2, "optim": osd2}
    mcd.load(target, tmp_path / "ck")
    assert target["model"] is msd2 and target["optim"] is osd2  # in place, as dcp.load
    set_state_dict(fresh, fresh_optim, model_state_dict=msd2, optim_state_dict=osd2)
    assert fresh_optim.param_groups[0]["lr"] == 0.1
    assert fresh_optim.param_groups[0]["betas"] == (0.9, 0.999)  # a tuple again, not a list
    assert _plain(get_state_dict(fresh, fresh_optim)) == _plain(get_state_dict(model, optim))


def test_stateful_objects_and_bytes_round_trip(tmp_path: Path) -> None:
    """Stateful objects are saved through state_dict() and restored through load_state_dict(), BytesIO included."""
    model, optim = _trained(0)
    mcd.save({"model": model, "optim": optim, "train": _TrainState(7, [0.5, 0.25])}, tmp_path / "ck")
    fresh, fresh_optim = _trained(1)
    train = _TrainState()
    mcd.load({"model": fresh, "optim": fresh_optim, "train": train}, tmp_path / "ck")
    assert (train.step, train.losses, train.note) == (7, [0.5, 0.25], b"\x00raw")
    assert _plain(fresh_optim.state_dict()) == _plain(optim.state_dict())
    assert _plain(fresh.state_dict()) == _plain(model.state_dict())


def _dcp_reference(state: dict[str, Any], path: Path) -> None:
    """The same state saved by torch's own FileSystemWriter, for differential checks."""
    import copy

    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    with pytest.warns(UserWarning, match="single process"):
        dcp_save(copy.deepcopy(state), storage_writer=FileSystemWriter(path))


def _app_state() -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(*_trained(0))
    extra = {"step": 3, "nan": float("nan"), "blob": io.BytesIO(b"abc"), "pair": (torch.ones(2), 5), "none": None}
    return {"model": msd, "optim": osd, "extra": extra}


def test_dcp_to_torch_save_keeps_the_nesting_as_dcp_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dcp_to_torch_save (our reader substituted) gives what it gives for torch's own checkpoint of the state."""
    from torch.distributed.checkpoint import format_utils

    state = _app_state()
    mcd.save(state, tmp_path / "ours", record_code=False)
    _dcp_reference(state, tmp_path / "theirs")
    format_utils.dcp_to_torch_save(tmp_path / "theirs", tmp_path / "theirs.pt")
    monkeypatch.setattr(format_utils, "FileSystemReader", mcd.ManifestStorageReader)
    format_utils.dcp_to_torch_save(tmp_path / "ours", tmp_path / "ours.pt")
    ours, theirs = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("ours", "theirs"))
    assert sorted(ours) == ["extra", "model", "optim"]
    assert list(ours["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    nan_free = [{**d, "extra": {k: v for k, v in d["extra"].items() if k != "nan"}} for d in (ours, theirs)]
    assert _plain(nan_free[0]) == _plain(nan_free[1])
    assert str(ours["extra"]["nan"]) == str(theirs["extra"]["nan"]) == "nan"


def test_load_state_dict_from_keys_selects_nested_keys(tmp_path: Path) -> None:
    """_load_state_dict_from_keys("optim.state") returns {"optim": {"state": ...}} only, as from a DCP checkpoint."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    state = _app_state()
    mcd.save(state, tmp_path / "ours", record_code=False)
    _dcp_reference(state, tmp_path / "theirs")
    with pytest.warns(UserWarning, match="single process"):
        ours = _load_state_dict_from_keys("optim.state", storage_reader=mcd.ManifestStorageReader(tmp_path / "ours"))
        theirs = _load_state_dict_from_keys("optim.state", storage_reader=FileSystemReader(tmp_path / "theirs"))
    assert list(ours) == ["optim"] and list(ours["optim"]) == ["state"]
    assert _plain(ours) == _plain(theirs)


def test_dcp_default_planner_reads_values_through_our_reader(tmp_path: Path) -> None:
    """dcp.load with DCP's own planner gets every value (its torch.load reads a stream made from the JSON tree)."""
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    mcd.save(_app_state(), tmp_path / "ck", record_code=False)
    target: dict[str, Any] = {"extra": {"step": 0, "blob": None, "pair": None, "none": 1, "nan": 0.0}}
    with pytest.warns(UserWarning, match="single process"):
        dcp_load(target, storage_reader=mcd.ManifestStorageReader(tmp_path / "ck"))
    extra = target["extra"]
    assert (extra["step"], extra["blob"].getvalue(), extra["none"]) == (3, b"abc", None)
    assert _plain(extra["pair"]) == _plain((torch.ones(2), 5))


def test_missing_values_are_reported_before_anything_is_loaded(tmp_path: Path) -> None:
    """A value the live state expects and the checkpoint lacks is a problem; tensors stay untouched."""
    mcd.save({"w": torch.ones(2), "progress": {"step": 3}}, tmp_path / "ck", record_code=False)
    target: dict[str, Any] = {"w": torch.zeros(2), "progress": {"step": 0, "epoch": 0}}
    with pytest.raises(mc.ModelMismatchError) as info:
        mcd.load(target, tmp_path / "ck")
    assert [(p.kind, p.key, p.expected) for p in info.value.report.problems] == [("missing", "progress.epoch", "value")]
    assert not target["w"].any() and target["progress"] == {"step": 0, "epoch": 0}
    mcd.load(target, tmp_path / "ck", allow_missing=[r"progress\.epoch"])
    assert target["progress"] == {"step": 3, "epoch": 0} and target["w"].all()


def test_async_save_of_an_application_state(tmp_path: Path) -> None:
    """async_save stores the same tree and tensors as save."""
    state = _app_state()
    sync = mcd.save(state, tmp_path / "sync", record_code=False)
    with pytest.warns(UserWarning, match="single process"):
        done = mcd.async_save(state, tmp_path / "async", record_code=False).result(timeout=60)
    assert done.digest == sync.digest and done.extensions == sync.extensions


def test_model_mismatch_error_survives_pickling() -> None:
    """ModelMismatchError crosses processes with its report and an unchanged message (regression)."""
    error = mc.ModelMismatchError(Report([Problem("missing", "a", "float32[2]", None)]), path="/ck")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert copy.report == error.report and copy.path == "/ck"


def test_merged_report_names_the_ranks_that_differ() -> None:
    """Problems seen on some ranks only are listed once, with the ranks that have them."""
    shared = Problem("missing", "a", "float32[2]", None)
    odd = Problem("shape", "b", "float32[3]", "float32[4]")
    report = merge_reports([Report([shared], checked=5), Report([shared, odd], checked=5), Report([shared])])
    assert report.problems == [shared, odd]
    assert "shape 'b': only on rank 1" in report.hints
    assert report.checked == 5


if __name__ == "__main__":
    # Through the package, so Model's class name is the one pytest sees (for class checks).
    from tests.test_distributed import SCENARIOS as scenarios

    _ranks.rank_main({name: _with_mesh(run) for name, run in scenarios.items()}, sys.argv[1:])
