"""Tests for pack/unpack and reading archives in place (load, check, verify, read_manifest, CLI)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import manifest_ckpt as mc
from manifest_ckpt.cli import run
from manifest_ckpt.storage import tar as _tar
from manifest_ckpt.storage.archive import pack, unpack
from manifest_ckpt.storage.archive_store import ArchiveStore
from manifest_ckpt.storage.store import open_store
from tests._models import TiedNet, assert_bitwise_equal, snapshot


def cli(*argv: str) -> tuple[int, str, str]:
    """Run the command line in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def trained() -> TiedNet:
    """A TiedNet with non-default values in every kind of tensor."""
    torch.manual_seed(0)
    model = TiedNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_()
        model.bn.num_batches_tracked.fill_(17)
    return model


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A saved checkpoint directory of ``trained()``."""
    mc.save(trained(), tmp_path / "ck")
    return tmp_path / "ck"


@pytest.fixture
def archive(ckpt: Path, tmp_path: Path) -> Path:
    """``ckpt`` packed into ``ck.tar``."""
    pack(ckpt, tmp_path / "ck.tar")
    return tmp_path / "ck.tar"


def tensor_spans(archive: Path) -> list[tuple[str, int, int]]:
    """``(key, start, end)`` of every stored tensor's bytes, as offsets in the archive file."""
    members = _tar.index_archive(archive)
    manifest = mc.read_manifest(archive)
    spans = []
    for key, entry in manifest.tensors.items():
        for chunk in entry.pieces():
            base = members[chunk.file].offset
            spans.append((key, base + chunk.byte_range[0], base + chunk.byte_range[1]))
    return spans


# --------------------------------------------------------------------------- round trip


def test_pack_move_verify_load_round_trip(ckpt: Path, tmp_path: Path) -> None:
    """A packed checkpoint moved elsewhere, original deleted, verifies and loads bit for bit."""
    expected = snapshot(trained())
    manifest = pack(ckpt, tmp_path / "ck.tar")
    moved = tmp_path / "elsewhere" / "model.tar"
    moved.parent.mkdir()
    shutil.move(tmp_path / "ck.tar", moved)
    shutil.rmtree(ckpt)

    assert mc.read_manifest(moved).digest == manifest.digest
    mc.verify(moved)
    code, out, _ = cli("verify", str(moved))
    assert code == 0 and out.startswith(f"OK {moved}\n") and manifest.digest in out
    assert mc.check(TiedNet(), moved).ok
    target = TiedNet()
    result = mc.load(target, moved, verify_digests=True, expect_digest=manifest.digest)
    assert result.retied == ["head.weight"]
    got = snapshot(target)
    expected.pop("b:scratch"), got.pop("b:scratch")  # non-persistent: never stored
    assert_bitwise_equal(got, expected)
    assert target.head.weight is target.emb.weight


def test_archive_is_read_in_place_without_extracting(archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load and verify map the archive once and read members at their offsets; nothing is extracted."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an archive must not be extracted to be read")

    monkeypatch.setattr(_tar, "extract_archive", refuse)
    monkeypatch.setattr("tempfile.mkdtemp", refuse)
    monkeypatch.setattr("tempfile.mkstemp", refuse)
    store = open_store(archive)
    assert isinstance(store, ArchiveStore)
    members = _tar.index_archive(archive)
    raw = archive.read_bytes()
    for name in mc.read_manifest(archive).files:
        mapping, offset, size = store.file_map(name)
        assert (offset, size) == (members[name].offset, members[name].size)
        assert offset % _tar.ALIGNMENT == 0
        assert mapping[offset : offset + size] == raw[offset : offset + size]
        assert mapping is store.file_map("manifest.json")[0]  # one mapping serves every member
    mc.verify(archive)
    mc.load(TiedNet(), archive, verify_digests=True)


def test_split_checkpoint_round_trips_through_an_archive(tmp_path: Path) -> None:
    """A checkpoint split over several weights files packs, unpacks and loads unchanged."""
    model = trained()
    manifest = mc.save(model, tmp_path / "split", max_file_size=200)
    assert len(manifest.files) == 3
    pack(tmp_path / "split", tmp_path / "split.tar")
    assert sorted(_tar.index_archive(tmp_path / "split.tar")) == ["manifest.json", *sorted(manifest.files)]
    target = TiedNet()
    mc.load(target, tmp_path / "split.tar", verify_digests=True)
    assert torch.equal(target.fc.weight, model.fc.weight)
    assert unpack(tmp_path / "split.tar", tmp_path / "back").digest == manifest.digest
    mc.verify(tmp_path / "back")


def test_unpack_restores_the_directory_byte_for_byte(archive: Path, ckpt: Path, tmp_path: Path) -> None:
    """unpack writes exactly manifest.json and the weights files, with the packed bytes."""
    manifest = unpack(archive, tmp_path / "out" / "restored")
    restored = tmp_path / "out" / "restored"
    assert manifest.digest == mc.read_manifest(ckpt).digest
    assert sorted(p.name for p in restored.iterdir()) == sorted(["manifest.json", *manifest.files])
    for path in restored.iterdir():
        assert path.read_bytes() == (ckpt / path.name).read_bytes()


# --------------------------------------------------------------------------- reproducibility


def test_two_packs_of_copies_are_byte_identical(ckpt: Path, tmp_path: Path) -> None:
    """Copies with other mtimes, modes and a stray file pack to the same bytes; stray files are left out."""
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    for i, path in enumerate(sorted(copy.iterdir())):
        os.utime(path, (1_000_000 + i, 2_000_000_000 - i))
        path.chmod(0o600)
    (copy / "notes.txt").write_text("not part of the checkpoint\n")
    os.utime(copy, (5, 5))

    pack(ckpt, tmp_path / "a.tar")
    pack(copy, tmp_path / "b.tar")
    first, second = (tmp_path / "a.tar").read_bytes(), (tmp_path / "b.tar").read_bytes()
    assert first == second
    assert list(_tar.index_archive(tmp_path / "b.tar")) == ["manifest.json", *mc.read_manifest(copy).files]


def test_saving_the_same_weights_twice_packs_to_identical_bytes(tmp_path: Path) -> None:
    """Two independent saves of the same model give byte-identical archives."""
    mc.save(trained(), tmp_path / "one")
    mc.save(trained(), tmp_path / "two")
    pack(tmp_path / "one", tmp_path / "one.tar")
    pack(tmp_path / "two" / "manifest.json", tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()


def test_archive_records_no_host_specific_metadata(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Members are sorted with manifest.json first, mode 0644, uid/gid 0, no owner names, mtime SOURCE_DATE_EPOCH."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    pack(ckpt, tmp_path / "dated.tar")
    with tarfile.open(tmp_path / "dated.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["manifest.json", *mc.read_manifest(ckpt).files]
    for info in infos:
        assert info.isreg()
        assert (info.mode, info.uid, info.gid, info.uname, info.gname) == (0o644, 0, 0, "", "")
        assert info.mtime == 1700000000
        assert info.offset_data % 4096 == 0
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    pack(ckpt, tmp_path / "undated.tar")
    with tarfile.open(tmp_path / "undated.tar") as tar:
        assert {i.mtime for i in tar.getmembers()} == {0}


# --------------------------------------------------------------------------- corruption


def test_a_flipped_byte_anywhere_in_tensor_data_makes_verify_exit_1(archive: Path) -> None:
    """Every single byte of every tensor's data, flipped in the archive, makes `verify` exit 1 naming the tensor."""
    pristine = archive.read_bytes()
    spans = tensor_spans(archive)
    assert sum(end - start for _, start, end in spans) == mc.read_manifest(archive).total_bytes
    checked = 0
    for key, start, end in spans:
        for position in range(start, end):
            damaged = bytearray(pristine)
            damaged[position] ^= 0x01
            archive.write_bytes(damaged)
            code, out, err = cli("verify", str(archive))
            assert code == 1, (key, position)
            assert out == "" and err.startswith(f"FAILED {archive}\n") and f"  {key} (" in err
            checked += 1
    assert checked == 312
    archive.write_bytes(pristine)
    assert cli("verify", str(archive))[0] == 0


def test_a_flipped_byte_in_a_weights_header_fails_verify(archive: Path) -> None:
    """Each byte of a weights file's safetensors header, flipped, fails verification (manifest binding)."""
    pristine = archive.read_bytes()
    (name,) = mc.read_manifest(archive).files
    member = _tar.index_archive(archive)[name]
    header_end = min(start for _, start, _ in tensor_spans(archive))  # the first tensor's data
    for position in range(member.offset, header_end):
        damaged = bytearray(pristine)
        damaged[position] ^= 0x20
        archive.write_bytes(damaged)
        with pytest.raises((mc.ManifestError, mc.IntegrityError)):
            mc.verify(archive)
    archive.write_bytes(pristine)


def test_a_damaged_tar_header_makes_verify_exit_1(archive: Path) -> None:
    """A flipped byte in a member's tar header is reported as a failed verification, naming the archive."""
    damaged = bytearray(archive.read_bytes())
    (name,) = mc.read_manifest(archive).files
    header = _tar.index_archive(archive)[name].offset - 512
    damaged[header + 3] ^= 0x01  # inside the member's name: the checksum no longer matches
    archive.write_bytes(damaged)
    code, out, err = cli("verify", str(archive))
    assert code == 1
    assert err.startswith(f"FAILED {archive}\n") and "is corrupt" in err
    code, out, _ = cli("verify", "--json", str(archive))
    assert code == 1 and json.loads(out)["error"]["type"] == "ArchiveError"


def test_truncated_archive_is_refused(archive: Path) -> None:
    """An archive cut short is refused with ArchiveError by every reader."""
    archive.write_bytes(archive.read_bytes()[:6000])
    with pytest.raises(mc.ArchiveError, match="truncated"):
        mc.read_manifest(archive)
    assert cli("verify", str(archive))[0] == 1


# --------------------------------------------------------------------------- hostile archives


def hostile_tar(path: Path, ckpt: Path, extra: Callable[[tarfile.TarFile], None]) -> Path:
    """A tar of a valid checkpoint's files plus whatever ``extra`` adds."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for file in sorted(ckpt.iterdir()):
            tar.add(file, arcname=file.name)
        extra(tar)
    return path


def add_file(name: str, data: bytes = b"evil") -> Callable[[tarfile.TarFile], None]:
    def extra(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    return extra


def add_special(name: str, kind: bytes, linkname: str = "") -> Callable[[tarfile.TarFile], None]:
    def extra(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        tar.addfile(info)

    return extra


HOSTILE = {
    "parent escape": (add_file("../escaped.txt"), "'..' segment"),
    "nested escape": (add_file("sub/../../escaped.txt"), "'..' segment"),
    "absolute path": (add_file("/tmp/manifest-ckpt-escaped.txt"), "absolute path"),
    "symlink": (add_special("link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
    "hard link": (add_special("hard", tarfile.LNKTYPE, "manifest.json"), "hard link"),
    "character device": (add_special("tty", tarfile.CHRTYPE), "character device"),
    "fifo": (add_special("pipe", tarfile.FIFOTYPE), "fifo"),
    "duplicate name": (add_file("manifest.json", b"{}"), "appears twice"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_unpack_refuses_hostile_entries_and_writes_nothing(ckpt: Path, tmp_path: Path, case: str) -> None:
    """Escaping, absolute, link, device, fifo and duplicate entries are refused; nothing is written anywhere."""
    extra, reason = HOSTILE[case]
    bad = hostile_tar(tmp_path / "bad.tar", ckpt, extra)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    dest = tmp_path / "work" / "out"
    with pytest.raises(mc.ArchiveError, match=reason) as caught:
        unpack(bad, dest)
    assert caught.value.file == str(bad)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/manifest-ckpt-escaped.txt").exists()
    code, _, err = cli("unpack", str(bad), str(dest))
    assert code == 2 and reason in err and not dest.exists()
    with pytest.raises(mc.ArchiveError, match=reason):
        mc.load(TiedNet(), bad)  # reading in place refuses it too


def test_plain_tar_of_a_checkpoint_is_read_in_place(ckpt: Path, tmp_path: Path) -> None:
    """An ordinary `tar -C CKPT -cf X .` archive (./ names, directory entry, 512-byte alignment) loads and verifies."""
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(ckpt, arcname=".")
    mc.verify(plain)
    target = TiedNet()
    mc.load(target, plain)
    assert torch.equal(target.fc.weight, trained().fc.weight)
    assert unpack(plain, tmp_path / "out").digest == mc.read_manifest(ckpt).digest


def test_tar_of_the_directory_itself_is_explained(ckpt: Path, tmp_path: Path) -> None:
    """A tar holding ck/manifest.json instead of manifest.json is refused with a hint to pack the contents."""
    nested = tmp_path / "nested.tar"
    with tarfile.open(nested, "w") as tar:
        tar.add(ckpt, arcname="ck")
    with pytest.raises(mc.CheckpointNotFoundError, match=r"'ck/manifest\.json'"):
        mc.read_manifest(nested)
    code, _, err = cli("inspect", str(nested))
    assert code == 2 and "manifest-ckpt pack" in err


# --------------------------------------------------------------------------- pack / unpack refusals


def test_pack_refuses_existing_output_unless_overwrite(ckpt: Path, archive: Path, tmp_path: Path) -> None:
    """An existing OUT is kept unless overwrite is given; a directory OUT is always refused."""
    archive.write_bytes(b"keep me")
    with pytest.raises(mc.CheckpointExistsError, match="already exists"):
        pack(ckpt, archive)
    assert archive.read_bytes() == b"keep me"
    pack(ckpt, archive, overwrite=True)
    mc.verify(archive)
    with pytest.raises(mc.CheckpointExistsError, match="is a directory"):
        pack(ckpt, tmp_path, overwrite=True)
    code, _, err = cli("pack", str(ckpt), str(archive))
    assert code == 2 and "already exists" in err


def test_pack_refuses_a_corrupt_checkpoint_and_writes_nothing(ckpt: Path, tmp_path: Path) -> None:
    """A flipped tensor byte in the source stops pack before OUT exists; --no-verify packs it anyway."""
    (name,) = mc.read_manifest(ckpt).files
    data = bytearray((ckpt / name).read_bytes())
    data[-1] ^= 0xFF
    (ckpt / name).write_bytes(data)
    with pytest.raises(mc.IntegrityError, match="do not match their digests"):
        pack(ckpt, tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    pack(ckpt, tmp_path / "x.tar", verify=False)
    assert cli("verify", str(tmp_path / "x.tar"))[0] == 1


def test_pack_refuses_an_archive_as_source(archive: Path, tmp_path: Path) -> None:
    """Packing an archive again is refused with a hint (archives are already reproducible)."""
    with pytest.raises(mc.ArchiveError, match="already an archive"):
        pack(archive, tmp_path / "again.tar")


def test_unpack_refuses_a_corrupt_archive_and_a_used_destination(archive: Path, tmp_path: Path) -> None:
    """unpack verifies before writing: a corrupt tensor or a non-empty destination leaves the disk unchanged."""
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(mc.CheckpointExistsError, match="not an empty directory"):
        unpack(archive, tmp_path / "used")
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["file"]
    _, start, _ = tensor_spans(archive)[0]
    damaged = bytearray(archive.read_bytes())
    damaged[start] ^= 0x01
    archive.write_bytes(damaged)
    with pytest.raises(mc.IntegrityError):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    unpack(archive, tmp_path / "out", verify=False)
    with pytest.raises(mc.IntegrityError):
        mc.verify(tmp_path / "out")


def test_unpack_refuses_what_is_not_an_archive(ckpt: Path, tmp_path: Path) -> None:
    """A directory or a non-tar file given as ARCHIVE is CheckpointNotFoundError (exit 2)."""
    (tmp_path / "x.bin").write_bytes(b"\x00" * 2048)
    for source in (ckpt, tmp_path / "x.bin"):
        with pytest.raises(mc.CheckpointNotFoundError, match="not an archive"):
            unpack(source, tmp_path / "out")
    # A path that does not exist says so, rather than calling it something that is not an archive.
    with pytest.raises(mc.CheckpointNotFoundError, match=r"missing\.tar: no such archive"):
        unpack(tmp_path / "missing.tar", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- CLI


def test_cli_pack_and_unpack_report_what_they_did(ckpt: Path, tmp_path: Path) -> None:
    """pack and unpack print the digest and counts, or JSON with --json; stderr stays empty when not a TTY."""
    digest = mc.read_manifest(ckpt).digest
    out_tar = tmp_path / "c.tar"
    code, out, err = cli("pack", str(ckpt), str(out_tar))
    size = out_tar.stat().st_size
    assert code == 0 and err == ""
    assert out == (
        f"packed {ckpt} -> {out_tar}\n  digest   {digest}\n  archive  {size:,} bytes, 2 members, 8 tensors verified\n"
    )
    code, out, err = cli("pack", "--json", "--overwrite", "--no-verify", str(ckpt), str(out_tar))
    assert code == 0 and json.loads(out) == {
        "archive": str(out_tar),
        "checkpoint": str(ckpt),
        "digest": digest,
        "bytes": size,
        "members": 2,
        "verified": False,
    }
    code, out, err = cli("unpack", str(out_tar), str(tmp_path / "u"))
    assert code == 0 and err == ""
    assert out == f"unpacked {out_tar} -> {tmp_path / 'u'}\n  digest   {digest}\n  2 files, 8 tensors verified\n"
    code, out, _ = cli("unpack", "--json", str(out_tar), str(tmp_path / "v"))
    assert code == 0 and json.loads(out)["digest"] == digest
    code, out, _ = cli("inspect", "--json", str(out_tar))
    assert code == 0 and json.loads(out)["digest"] == digest


def test_pack_shows_progress_only_on_a_terminal(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a TTY stderr, pack draws a bar that reaches 100%; without one it writes nothing."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    pack(ckpt, tmp_path / "p.tar", progress=True)
    drawn = terminal.getvalue()
    assert f"pack {ckpt}" in drawn and "100.0%" in drawn and f"verify {ckpt}" in drawn
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    pack(ckpt, tmp_path / "q.tar", progress=False)
    assert quiet.getvalue() == ""


def test_inspect_of_an_archive_does_not_import_torch(archive: Path) -> None:
    """`manifest-ckpt inspect ARCHIVE` reads the manifest in place without importing torch."""
    code = (
        "import sys, io\n"
        "from manifest_ckpt.cli import run\n"
        f"rc = run(['inspect', {str(archive)!r}], stdout=io.StringIO(), stderr=io.StringIO())\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_unpack_extracts_only_the_files_the_manifest_lists(tmp_path: Path) -> None:
    """A member the manifest does not list (here a stray script) is not extracted (issue 11, item 9)."""
    from manifest_ckpt.storage.tar import write_archive

    manifest = mc.save({"w": torch.arange(3.0)}, tmp_path / "ck", record_code=False)
    (tmp_path / "ck" / "run.sh").write_text("echo hi")
    files = [("manifest.json", tmp_path / "ck" / "manifest.json"), ("run.sh", tmp_path / "ck" / "run.sh")]
    files += [(name, tmp_path / "ck" / name) for name in manifest.files]
    write_archive(files, tmp_path / "a.tar")
    mc.unpack(tmp_path / "a.tar", tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(["manifest.json", *manifest.files])


def test_unpack_checks_the_copies_so_an_archive_swapped_after_the_check_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archive replaced between the first check and the extraction is refused; nothing appears at dest."""
    from manifest_ckpt.storage import archive as archive_module

    manifest = mc.save({"w": torch.arange(3.0)}, tmp_path / "ck", record_code=False)
    mc.pack(tmp_path / "ck", tmp_path / "a.tar")
    (name,) = manifest.files
    bad = bytearray((tmp_path / "a.tar").read_bytes())
    start, _ = manifest.tensors["w"].byte_range or (0, 0)
    bad[_tar.index_archive(tmp_path / "a.tar")[name].offset + start] ^= 0xFF  # a data byte of "w"
    real = archive_module.extract_members

    def swap_then_extract(*args: Any, **kwargs: Any) -> None:
        (tmp_path / "a.tar").write_bytes(bytes(bad))
        real(*args, **kwargs)

    monkeypatch.setattr(archive_module, "extract_members", swap_then_extract)
    with pytest.raises(mc.IntegrityError, match="do not match their digests"):
        mc.unpack(tmp_path / "a.tar", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
