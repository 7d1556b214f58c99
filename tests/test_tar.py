"""Tests of the reproducible, page-aligned archive container in ``manifest_ckpt.storage.tar``."""

from __future__ import annotations

import io
import os
import posixpath
import random
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from manifest_ckpt.errors import ArchiveError, CheckpointExistsError
from manifest_ckpt.storage import tar as _tar
from manifest_ckpt.storage.tar import (
    ALIGNMENT,
    ArchiveMember,
    extract_archive,
    index_archive,
    is_archive,
    write_archive,
)

LONG_NAME = "shards/" + "d" * 60 + "/" + "model-" + "x" * 120 + ".safetensors"
UNICODE_NAME = "shards/modèle-é.safetensors"

# name -> content; sizes straddle block (512) and page (4096) boundaries on purpose.
CONTENTS: dict[str, bytes] = {
    "manifest.json": b'{"format": "manifest-ckpt"}\n',
    "model.safetensors": random.Random(1).randbytes(10_000),
    "shards/a-511.safetensors": random.Random(2).randbytes(511),
    "shards/b-512.safetensors": random.Random(3).randbytes(512),
    "shards/c-4095.safetensors": random.Random(4).randbytes(4095),
    "shards/d-4096.safetensors": random.Random(5).randbytes(4096),
    "shards/e-4097.safetensors": random.Random(6).randbytes(4097),
    "shards/empty.safetensors": b"",
    LONG_NAME: random.Random(7).randbytes(700),
    UNICODE_NAME: b"unicode",
}
EXPECTED_ORDER = ["manifest.json", *sorted(name for name in CONTENTS if name != "manifest.json")]


def make_tree(root: Path, contents: dict[str, bytes] = CONTENTS) -> list[tuple[str, str]]:
    """Write ``contents`` under ``root`` and return ``(name, path)`` pairs in reverse order."""
    pairs = []
    for name, data in contents.items():
        path = root.joinpath(*name.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        pairs.append((name, str(path)))
    return pairs[::-1]


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """An archive of CONTENTS written with the default mtime."""
    out = tmp_path / "ckpt.tar"
    write_archive(make_tree(tmp_path / "src"), out)
    return out


def read_tree(root: Path) -> dict[str, bytes]:
    """Return every regular file under ``root`` as ``{relative posix name: bytes}``."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


# --------------------------------------------------------------------------- writing


def test_copies_with_other_metadata_give_identical_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copies of the same files with other mtimes, permissions and input order archive to the same bytes."""
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = make_tree(tmp_path / "one")
    second = make_tree(tmp_path / "two")
    for index, (_, path) in enumerate(second):
        os.chmod(path, 0o600 if index % 2 else 0o755)
        os.utime(path, (1_000_000 + index, 2_000_000 + index))
    os.utime(tmp_path / "two" / "shards", (5, 5))
    write_archive(first, tmp_path / "one.tar")
    write_archive(list(reversed(second)), tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()


def test_source_date_epoch_sets_every_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SOURCE_DATE_EPOCH becomes the mtime of every member; without it the mtime is 0."""
    pairs = make_tree(tmp_path / "src")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    write_archive(pairs, tmp_path / "dated.tar")
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    write_archive(pairs, tmp_path / "epoch.tar")
    with tarfile.open(tmp_path / "dated.tar") as dated, tarfile.open(tmp_path / "epoch.tar") as epoch:
        assert {member.mtime for member in dated} == {1700000000}
        assert {member.mtime for member in epoch} == {0}


@pytest.mark.parametrize("value", ["", "not-a-number", "-5", "1.5", str(8**11)])
def test_unusable_source_date_epoch_falls_back_to_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A SOURCE_DATE_EPOCH that is not a non-negative integer fitting ustar is ignored (mtime 0)."""
    source = tmp_path / "manifest.json"
    source.write_bytes(b"{}")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    write_archive([("manifest.json", source)], tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert [member.mtime for member in tar] == [0]


def test_member_data_is_page_aligned_and_exact(archive: Path) -> None:
    """Every member's data starts on a 4096-byte boundary and the bytes there are the source file."""
    index = index_archive(archive)
    assert list(index) == EXPECTED_ORDER
    data = archive.read_bytes()
    for name, member in index.items():
        assert member == ArchiveMember(name, member.offset, len(CONTENTS[name]))
        assert member.offset % ALIGNMENT == 0, name
        assert data[member.offset : member.offset + member.size] == CONTENTS[name]
    assert len(data) % 10240 == 0


def test_tarfile_reads_the_archive(archive: Path, tmp_path: Path) -> None:
    """Python's tarfile lists the members with fixed metadata and extracts identical files."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        assert [member.name for member in members] == EXPECTED_ORDER
        for member in members:
            assert member.isreg()
            assert (member.mode, member.uid, member.gid, member.uname, member.gname, member.mtime) == (
                0o644,
                0,
                0,
                "",
                "",
                0,
            )
            assert member.offset_data % ALIGNMENT == 0
            assert set(member.pax_headers) <= {"path", "comment"}
        tar.extractall(tmp_path / "out", filter="data")
    assert read_tree(tmp_path / "out") == CONTENTS


@pytest.mark.skipif(shutil.which("tar") is None, reason="no system tar")
def test_system_tar_lists_and_extracts(archive: Path, tmp_path: Path) -> None:
    """The system tar lists the members in order and extracts identical files without warnings."""
    listing = subprocess.run(["tar", "-tf", str(archive)], capture_output=True, check=True)
    assert listing.stdout.decode("utf-8").splitlines() == EXPECTED_ORDER
    assert listing.stderr == b""
    out = tmp_path / "out"
    out.mkdir()
    extracted = subprocess.run(["tar", "-xf", str(archive), "-C", str(out)], capture_output=True, check=True)
    assert extracted.stderr == b""
    assert read_tree(out) == CONTENTS


@pytest.mark.parametrize("first_size", [1, *range(0, 4097, 512)])
def test_alignment_for_every_header_position(tmp_path: Path, first_size: int) -> None:
    """Whatever block a member's headers start on (all 8 per page), its data is aligned and readable."""
    contents = {
        "manifest.json": b"m" * first_size,
        "w.safetensors": b"w" * 100,
        "z/" + "n" * 150: b"z" * 3000,
    }
    write_archive(make_tree(tmp_path / "src", contents), tmp_path / "a.tar")
    index = index_archive(tmp_path / "a.tar")
    assert [member.offset % ALIGNMENT for member in index.values()] == [0, 0, 0]
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar} == contents  # type: ignore[union-attr]
    if shutil.which("tar") is not None:
        out = tmp_path / "out"
        out.mkdir()
        done = subprocess.run(
            ["tar", "-xf", str(tmp_path / "a.tar"), "-C", str(out)], capture_output=True, check=True
        )
        assert done.stderr == b""
        assert read_tree(out) == contents


def test_long_and_unicode_names_round_trip(archive: Path) -> None:
    """Names over 100 bytes and non-ASCII names come back exactly through index, tarfile and extract."""
    assert len(LONG_NAME.encode()) > 155
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    index = index_archive(archive)
    assert LONG_NAME in names
    assert UNICODE_NAME in names
    assert index[LONG_NAME].size == 700
    assert index[UNICODE_NAME].size == len(b"unicode")


def test_empty_file_members(tmp_path: Path) -> None:
    """Empty files are members of size 0 at aligned offsets and extract as empty files."""
    pairs = make_tree(tmp_path / "src", {"manifest.json": b"", "a/empty.safetensors": b""})
    calls: list[tuple[int, int]] = []
    write_archive(pairs, tmp_path / "e.tar", progress=lambda done, total: calls.append((done, total)))
    index = index_archive(tmp_path / "e.tar")
    assert [(m.name, m.size, m.offset % ALIGNMENT) for m in index.values()] == [
        ("manifest.json", 0, 0),
        ("a/empty.safetensors", 0, 0),
    ]
    assert calls == [(0, 0)]
    assert extract_archive(tmp_path / "e.tar", tmp_path / "out") == ["manifest.json", "a/empty.safetensors"]
    assert read_tree(tmp_path / "out") == {"manifest.json": b"", "a/empty.safetensors": b""}


def test_archive_with_no_members(tmp_path: Path) -> None:
    """An empty file list gives a valid, member-less tar that extracts to an empty directory."""
    write_archive([], tmp_path / "none.tar")
    assert (tmp_path / "none.tar").read_bytes() == bytes(10240)
    with tarfile.open(tmp_path / "none.tar") as tar:
        assert tar.getnames() == []
    assert index_archive(tmp_path / "none.tar") == {}
    assert extract_archive(tmp_path / "none.tar", tmp_path / "out") == []
    assert list((tmp_path / "out").iterdir()) == []


def test_progress_ends_with_total(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress is reported per chunk, never decreases, and ends with (total, total)."""
    monkeypatch.setattr(_tar, "_CHUNK", 1000)
    calls: list[tuple[int, int]] = []
    write_archive(make_tree(tmp_path / "src"), tmp_path / "p.tar", progress=lambda d, t: calls.append((d, t)))
    total = sum(len(data) for data in CONTENTS.values())
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) > len(CONTENTS)  # the 10 000-byte file alone needs 10 chunks


def test_large_size_uses_pax_size_record(tmp_path: Path) -> None:
    """A member of 8 GiB or more gets a pax size record that index_archive and tarfile both read."""
    if sys.platform == "win32":
        pytest.skip("needs a sparse file")
    size = 8**11 + 5
    headers = _tar._member_headers("big.safetensors", size, 0, 0)
    path = tmp_path / "big.tar"
    with open(path, "wb") as out:
        out.write(headers)
        out.truncate(len(headers) + size + (-size % 512) + 1024)  # sparse: no data is written
    assert index_archive(path) == {"big.safetensors": ArchiveMember("big.safetensors", len(headers), size)}
    assert len(headers) % ALIGNMENT == 0
    with tarfile.open(path) as tar:
        assert [(member.name, member.size) for member in tar] == [("big.safetensors", size)]


@pytest.mark.parametrize(
    ("pairs", "member"),
    [
        ([("../evil", "x")], "../evil"),
        ([("/abs", "x")], "/abs"),
        ([("a/./b", "x")], "a/./b"),
        ([("a//b", "x")], "a//b"),
        ([("a\\b", "x")], "a\\b"),
        ([("", "x")], ""),
        ([("same", "x"), ("same", "y")], "same"),
        ([("a", "x"), ("a/b", "y")], "a/b"),
    ],
)
def test_write_refuses_bad_names(tmp_path: Path, pairs: list[tuple[str, str]], member: str) -> None:
    """Unsafe, non-canonical, duplicate and colliding names are refused before anything is written."""
    for _, source in pairs:
        (tmp_path / source).write_bytes(b"data")
    files = [(name, str(tmp_path / source)) for name, source in pairs]
    with pytest.raises(ArchiveError) as caught:
        write_archive(files, tmp_path / "out.tar")
    assert caught.value.member == member
    assert repr(member) in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == sorted({source for _, source in pairs})


def test_write_failure_leaves_existing_archive_alone(tmp_path: Path) -> None:
    """A failed write leaves the previous archive untouched and no temporary file behind."""
    (tmp_path / "old.tar").write_bytes(b"previous")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ArchiveError, match="not a regular file"):
        write_archive([("folder", tmp_path / "folder")], tmp_path / "old.tar")
    with pytest.raises(FileNotFoundError):
        write_archive([("missing", tmp_path / "missing")], tmp_path / "old.tar")
    assert (tmp_path / "old.tar").read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["folder", "old.tar"]


def test_write_refuses_a_source_that_changes_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source that grows between planning and copying is refused and no archive appears."""
    source = tmp_path / "grow.safetensors"
    source.write_bytes(b"1234")
    real_plan = _tar._plan

    def plan_then_grow(files: list[tuple[str, str]]) -> list[_tar._Source]:
        planned = real_plan(files)
        source.write_bytes(b"123456789")
        return planned

    monkeypatch.setattr(_tar, "_plan", plan_then_grow)
    with pytest.raises(ArchiveError, match="changed while it was being archived") as caught:
        write_archive([("grow.safetensors", str(source))], tmp_path / "out.tar")
    assert caught.value.member == "grow.safetensors"
    assert sorted(os.listdir(tmp_path)) == ["grow.safetensors"]


@pytest.mark.parametrize("change", ["grow", "shrink"])
def test_write_refuses_a_source_changed_during_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A source that grows or shrinks while its bytes are being copied is refused."""
    monkeypatch.setattr(_tar, "_CHUNK", 1000)
    source = tmp_path / "w.safetensors"
    source.write_bytes(bytes(5000))

    def mutate(_done: int, _total: int) -> None:
        if change == "grow":
            with open(source, "ab") as stream:
                stream.write(b"more")
        else:
            os.truncate(source, 1000)

    with pytest.raises(ArchiveError, match="changed while it was being archived"):
        write_archive([("w.safetensors", source)], tmp_path / "out.tar", progress=mutate)
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]


# --------------------------------------------------------------------------- reading


def test_extract_round_trip(archive: Path, tmp_path: Path) -> None:
    """extract_archive writes every member into a new directory and returns the names in order."""
    assert extract_archive(archive, tmp_path / "deep" / "out") == EXPECTED_ORDER
    assert read_tree(tmp_path / "deep" / "out") == CONTENTS
    assert os.listdir(tmp_path / "deep") == ["out"]


def test_extract_into_empty_directory(archive: Path, tmp_path: Path) -> None:
    """An existing empty destination directory is filled."""
    (tmp_path / "out").mkdir()
    extract_archive(archive, tmp_path / "out")
    assert read_tree(tmp_path / "out") == CONTENTS


def test_extract_refuses_non_empty_destination(archive: Path, tmp_path: Path) -> None:
    """A destination that holds anything is refused and left untouched."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_bytes(b"keep")
    (tmp_path / "file").write_bytes(b"file")
    with pytest.raises(CheckpointExistsError, match="not an empty directory"):
        extract_archive(archive, tmp_path / "out")
    with pytest.raises(CheckpointExistsError):
        extract_archive(archive, tmp_path / "file")
    assert read_tree(tmp_path / "out") == {"keep.txt": b"keep"}
    assert sorted(os.listdir(tmp_path)) == ["ckpt.tar", "file", "out", "src"]


def test_extract_failure_leaves_nothing(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error after some members were written removes the partial extraction and creates no destination."""
    real_extract = _tar._extract_member
    calls: list[str] = []

    def fail_on_third(*args: object) -> None:
        calls.append("call")
        if len(calls) == 3:
            raise OSError("disk full")
        real_extract(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_tar, "_extract_member", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        extract_archive(archive, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["ckpt.tar", "src"]


def test_is_archive(archive: Path, tmp_path: Path) -> None:
    """is_archive accepts ustar/pax/GNU tars and rejects other files, folders, fifos and missing paths."""
    gnu = tmp_path / "gnu.tar"
    with tarfile.open(gnu, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("empty"))
    (tmp_path / "random.bin").write_bytes(random.Random(0).randbytes(4096))
    (tmp_path / "short.bin").write_bytes(archive.read_bytes()[:100])
    assert is_archive(archive)
    assert is_archive(gnu)
    assert not is_archive(tmp_path / "random.bin")
    assert not is_archive(tmp_path / "short.bin")
    assert not is_archive(tmp_path / "src")
    assert not is_archive(tmp_path / "missing.tar")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        assert not is_archive(tmp_path / "fifo")


@pytest.mark.skipif(shutil.which("tar") is None, reason="no system tar")
def test_index_accepts_plain_tar_of_a_directory(tmp_path: Path) -> None:
    """A tar made by hand with `tar -C src -cf x.tar .` indexes with './' and directory entries dropped."""
    make_tree(tmp_path / "src")
    subprocess.run(["tar", "-C", str(tmp_path / "src"), "-cf", str(tmp_path / "x.tar"), "."], check=True)
    index = index_archive(tmp_path / "x.tar")
    assert sorted(index) == sorted(CONTENTS)
    data = (tmp_path / "x.tar").read_bytes()
    assert {name: data[m.offset : m.offset + m.size] for name, m in index.items()} == CONTENTS


# --------------------------------------------------------------------------- hostile archives


def _tar_with(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> Path:
    """Write a tar with a harmless manifest.json first, then ``members`` exactly as given."""
    path = tmp_path / "hostile.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        good = tarfile.TarInfo("manifest.json")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"{}"))
        for info, data in members:
            if info.isreg():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    """Return a TarInfo of the given type."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _our_archive(tmp_path: Path) -> tuple[Path, ArchiveMember]:
    """Archive manifest.json and a 10 000-byte w.safetensors; return the path and the latter's member."""
    pairs = make_tree(tmp_path / "src", {"manifest.json": b"{}", "w.safetensors": bytes(10_000)})
    path = tmp_path / "ours.tar"
    write_archive(pairs, path)
    shutil.rmtree(tmp_path / "src")
    return path, index_archive(path)["w.safetensors"]


def _truncated(tmp_path: Path) -> Path:
    """Cut the archive in the middle of w.safetensors' data."""
    path, member = _our_archive(tmp_path)
    with open(path, "r+b") as stream:
        stream.truncate(member.offset + 5000)
    return path


def _truncated_header(tmp_path: Path) -> Path:
    """Cut the archive in the middle of w.safetensors' header block."""
    path, member = _our_archive(tmp_path)
    with open(path, "r+b") as stream:
        stream.truncate(member.offset - 512 + 100)
    return path


def _bad_checksum(tmp_path: Path) -> Path:
    """Change w.safetensors' mtime in its header without fixing the checksum."""
    path, member = _our_archive(tmp_path)
    data = bytearray(path.read_bytes())
    data[member.offset - 512 + 136] ^= 0x01
    path.write_bytes(data)
    return path


def _random_bytes(tmp_path: Path) -> Path:
    """Return a file of random bytes."""
    path = tmp_path / "random.tar"
    path.write_bytes(random.Random(0).randbytes(20_000))
    return path


def _huge_pax_size(tmp_path: Path) -> Path:
    """A pax size record of 5,000 digits (past int()'s 4,300-digit limit)."""
    info = _info("w")
    info.pax_headers = {"size": "9" * 5000}
    path = _tar_with(tmp_path, (info, b"x"))
    assert b"9" * 5000 in path.read_bytes()
    return path


HOSTILE: dict[str, tuple[Callable[[Path], Path], str | None, str]] = {
    "parent": (lambda p: _tar_with(p, (_info("../evil"), b"x")), "../evil", "'..' segment"),
    "nested-parent": (
        lambda p: _tar_with(p, (_info("sub/../../evil"), b"x")),
        "sub/../../evil",
        "'..' segment",
    ),
    "absolute": (lambda p: _tar_with(p, (_info("/abs/evil"), b"x")), "/abs/evil", "absolute path"),
    "backslash": (lambda p: _tar_with(p, (_info("..\\evil"), b"x")), "..\\evil", "backslash"),
    "gnu-long-parent": (
        lambda p: _tar_with(p, (_info("../" + "e" * 200), b"x"), fmt=tarfile.GNU_FORMAT),
        "../" + "e" * 200,
        "'..' segment",
    ),
    "symlink": (
        lambda p: _tar_with(p, (_info("link", tarfile.SYMTYPE, "/etc/passwd"), b"")),
        "link",
        "symbolic link to '/etc/passwd'",
    ),
    "hardlink": (
        lambda p: _tar_with(p, (_info("hard", tarfile.LNKTYPE, "manifest.json"), b"")),
        "hard",
        "hard link to 'manifest.json'",
    ),
    "char-device": (
        lambda p: _tar_with(p, (_info("null", tarfile.CHRTYPE), b"")),
        "null",
        "character device",
    ),
    "block-device": (lambda p: _tar_with(p, (_info("sda", tarfile.BLKTYPE), b"")), "sda", "block device"),
    "fifo": (lambda p: _tar_with(p, (_info("pipe", tarfile.FIFOTYPE), b"")), "pipe", "a fifo"),
    "duplicate": (lambda p: _tar_with(p, (_info("manifest.json"), b"[]")), "manifest.json", "appears twice"),
    "dot-duplicate": (lambda p: _tar_with(p, (_info("./manifest.json"), b"[]")), "./manifest.json", "twice"),
    "file-as-directory": (
        lambda p: _tar_with(p, (_info("w"), b"x"), (_info("w/x"), b"y")),
        "w/x",
        "needs 'w' to be a directory",
    ),
    "long-segment": (lambda p: _tar_with(p, (_info("e" * 256), b"x")), "e" * 256, "longer than file systems allow"),
    "long-name": (
        lambda p: _tar_with(p, (_info("/".join(["d" * 250] * 17)), b"x")),
        "/".join(["d" * 250] * 17),
        "longer than file systems allow",
    ),
    "huge-pax-size": (_huge_pax_size, "w", "that is not a number"),
    "truncated": (_truncated, "w.safetensors", "is truncated"),
    "truncated-header": (_truncated_header, None, "without the end-of-archive marker"),
    "bad-checksum": (_bad_checksum, "w.safetensors", "checksum"),
    "random-bytes": (_random_bytes, None, "is not a tar archive"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused_and_nothing_is_written(tmp_path: Path, case: str) -> None:
    """Each hostile or damaged archive is refused naming the member, and extraction writes nothing."""
    build, member, reason = HOSTILE[case]
    path = build(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ArchiveError) as indexed:
        index_archive(path)
    assert indexed.value.member == member
    assert indexed.value.file == str(path)
    assert reason in str(indexed.value)
    if member is not None:
        assert repr(member) in str(indexed.value)
    with pytest.raises(ArchiveError) as extracted:
        extract_archive(path, tmp_path / "x" / "out")
    assert str(extracted.value) == str(indexed.value)
    assert sorted(os.listdir(tmp_path)) == before  # no destination, no temporary sibling, no "evil"


def test_truncated_at_member_boundary_is_refused(tmp_path: Path) -> None:
    """An archive cut between members (end-of-archive marker missing) is refused as truncated."""
    path, member = _our_archive(tmp_path)
    with open(path, "r+b") as stream:
        stream.truncate(member.offset + 10_240)  # just after w.safetensors' padded data
    with pytest.raises(ArchiveError, match="without the end-of-archive marker"):
        index_archive(path)


def test_garbage_is_refused_quickly(tmp_path: Path) -> None:
    """Random data behind a valid first header, or headers claiming huge sizes, raise ArchiveError."""
    path, member = _our_archive(tmp_path)
    data = bytearray(path.read_bytes())
    header = member.offset - 512
    data[header + 124 : header + 136] = b"77777777777\x00"  # an 8 GiB size in a 20 KiB file
    data[header + 148 : header + 156] = b" " * 8
    data[header + 148 : header + 156] = b"%06o\x00 " % sum(data[header : header + 512])
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="is truncated") as caught:
        index_archive(path)
    assert caught.value.member == "w.safetensors"
    for seed in range(20):
        junk = tmp_path / f"junk{seed}.tar"
        junk.write_bytes(bytes(data[:512]) + random.Random(seed).randbytes(8192))
        with pytest.raises(ArchiveError):
            index_archive(junk)


def test_damaged_archives_are_refused_or_read_like_tarfile(tmp_path: Path) -> None:
    """Randomly damaged headers either raise ArchiveError or index exactly as tarfile reads them."""
    pairs = make_tree(tmp_path / "src", {"manifest.json": b"{}", "d/" + "n" * 150: bytes(3000)})
    write_archive(pairs, tmp_path / "ours.tar")
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(_info("dir", tarfile.DIRTYPE))
        long_member = _info("dir/" + "g" * 200)
        long_member.size = 10
        tar.addfile(long_member, io.BytesIO(b"0123456789"))
    originals = [(tmp_path / "ours.tar").read_bytes(), gnu.getvalue()]
    rng = random.Random(0)
    path = tmp_path / "damaged.tar"
    accepted = 0
    for _ in range(400):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(min(len(data), 5200))] = rng.choice([rng.randrange(256), 0, 0x20, 0x2F, 0x30])
        path.write_bytes(data)
        try:
            index = index_archive(path)
        except ArchiveError:
            continue
        accepted += 1
        with tarfile.open(path) as tar:
            theirs = {posixpath.normpath(m.name): (m.offset_data, m.size) for m in tar if not m.isdir()}
        assert {name: (m.offset, m.size) for name, m in index.items()} == theirs
    assert 0 < accepted < 400


def test_write_archive_removes_temporaries_of_a_killed_writer_but_not_of_a_live_one(tmp_path: Path) -> None:
    """Found by harness/crash.py: a pack killed mid-write left ``.out.tar.<hex>.tmp`` forever."""
    import fcntl

    source = tmp_path / "a.bin"
    source.write_bytes(b"x" * 100)
    out = tmp_path / "out.tar"
    abandoned = tmp_path / ".out.tar.0123456789abcdef.tmp"  # nobody holds its lock
    abandoned.write_bytes(b"partial")
    live = tmp_path / ".out.tar.fedcba9876543210.tmp"  # a writer still holds its lock
    live.write_bytes(b"partial")
    unrelated = tmp_path / ".out.tar.notours.tmp"  # not a name write_archive makes
    unrelated.write_bytes(b"keep")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        write_archive([("a.bin", source)], out)
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a.bin", "out.tar", live.name, unrelated.name]
    )
    assert index_archive(out)["a.bin"].size == 100
