"""Reproducible, page-aligned tar archives of a checkpoint directory (stdlib only).

An archive is ONE uncompressed POSIX.1-2001 (pax/ustar) tar file that any ``tar`` and
Python's :mod:`tarfile` read as a normal archive. What this module writes:

* **Regular files only.** No directory entries: extractors create parent directories
  themselves, and leaving them out removes their metadata from the bytes.
* **Fixed order.** ``manifest.json`` first (so a reader finds it in the first few KiB),
  then every other member sorted by name (code point order, which equals UTF-8 byte order).
* **Fixed metadata.** mode ``0644``, uid/gid ``0``, empty uname/gname, devmajor/devminor
  ``0`` and mtime = ``SOURCE_DATE_EPOCH`` when that is a decimal integer in
  ``[0, 8**11)``, else ``0``. No atime/ctime and nothing about the host is recorded, so
  copies of the same files with other timestamps or owners, on any machine, give the
  same bytes.
* **Page-aligned data.** Every member's data starts at a multiple of :data:`ALIGNMENT`
  (4096) bytes from the start of the archive, so a reader can ``mmap`` a safetensors
  member in place. The padding lives *inside* a pax extended header (typeflag ``x``,
  header name ``././@PaxHeader`` as CPython writes it) placed just before the member's
  ustar header: its records are sized with the POSIX ``comment`` keyword, whose value
  every reader must ignore. The same pax header carries ``path`` when a name is not
  ASCII or longer than 100 bytes, and ``size`` when a file is 8 GiB or larger; no other
  keyword is ever written. Only a member that needs neither record and whose data is
  already aligned goes without a pax header. Padding costs at most about 5 KiB a member.
* **Names.** Canonical relative POSIX paths (no leading ``/``, ``.``, ``..`` or empty
  segments, no backslash or drive letter), UTF-8 encoded.
* **End.** Two zero blocks, then zeros up to a multiple of 10240 bytes (tar's default
  record size), as GNU tar and :mod:`tarfile` do.

Reading (:func:`index_archive`) accepts any ustar/pax/GNU archive made of regular files
and directories (``./`` prefixes and directory entries are dropped from the index), and
refuses everything an extractor could be tricked by: absolute names, ``..`` segments,
links, devices, fifos, duplicate or colliding names, sparse files, global pax headers,
truncated data and corrupt headers. It reads only headers and seeks over data, and every
loop is bounded by the file size. What it accepts, :mod:`tarfile` reads with the same
names, offsets and sizes (the tests check this on randomly damaged archives).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import os
import re
import secrets
import shutil
import stat
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import BinaryIO

from manifest_ckpt.errors import ArchiveError, CheckpointExistsError
from manifest_ckpt.format.integrity import open_regular

__all__ = [
    "ALIGNMENT",
    "ArchiveMember",
    "extract_archive",
    "extract_members",
    "index_archive",
    "is_archive",
    "write_archive",
]

ALIGNMENT = 4096
"""Every member's data starts at a multiple of this many bytes (the usual page size)."""

_BLOCK = 512
_RECORD_SIZE = 10240  # 20 blocks, tar's default blocking factor
_ZERO_BLOCK = bytes(_BLOCK)
_CHUNK = 4 << 20  # bytes copied per read; large files are streamed, never read whole
_MAX_EXTENDED = 1 << 20  # cap on a pax / GNU long-name header's data held in memory
_MAX_OCTAL_11 = 8**11 - 1  # largest value of an 11-digit octal ustar field (size, mtime)
_MANIFEST = "manifest.json"
_PAX_HEADER_NAME = b"././@PaxHeader"
_PAD_TEXT = b"manifest-ckpt: padding that page-aligns the next member's data "
_MIN_COMMENT_RECORD = len(b"12 comment=\n")
_POSIX_MAGIC = b"ustar\x0000"
_GNU_MAGIC = b"ustar  \x00"
_DRIVE = re.compile(r"^[A-Za-z]:")

_REGULAR_TYPES = frozenset({b"0", b"\x00", b"7"})  # "7" (contiguous) extracts as a regular file
_REFUSED_TYPES = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"6": "a fifo",
    b"K": "a link (GNU long link name)",
    b"g": "a global pax header (it would change how tools read later members)",
    b"S": "a GNU sparse file",
}

_CREATE_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
)


@dataclasses.dataclass(frozen=True)
class ArchiveMember:
    """One regular file inside an archive and where its bytes lie.

    Attributes:
        name: the member's relative POSIX path (``/``-separated, no ``.`` or ``..``).
        offset: byte offset of the member's data from the start of the archive file.
        size: length of the member's data in bytes.
    """

    name: str
    offset: int
    size: int


# --------------------------------------------------------------------------- names


class _UnsafeName(Exception):
    """Internal: a member name is unsafe; the argument says why."""


# NAME_MAX and PATH_MAX of common file systems: a longer member could not be extracted anywhere.
_MAX_SEGMENT_BYTES = 255
_MAX_NAME_BYTES = 4096
# A pax size is a decimal byte count; 20 digits hold any 64-bit size (int() refuses > 4,300).
_MAX_SIZE_DIGITS = 20


def _normalize_name(name: str) -> str:
    """Return ``name`` with ``.`` and empty segments dropped ("" if nothing is left).

    Raises:
        _UnsafeName: the name is absolute, climbs with ``..``, or holds a NUL or backslash.
    """
    if "\x00" in name:
        raise _UnsafeName("contains a NUL byte")
    if "\\" in name:
        raise _UnsafeName("contains a backslash, a path separator on Windows")
    if name.startswith("/"):
        raise _UnsafeName("is an absolute path")
    if _DRIVE.match(name):
        raise _UnsafeName("starts with a drive letter")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _UnsafeName("contains a '..' segment that would escape the destination")
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in parts), default=0)
    if longest > _MAX_SEGMENT_BYTES or len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
        raise _UnsafeName(
            f"is longer than file systems allow ({_MAX_SEGMENT_BYTES} bytes a segment, {_MAX_NAME_BYTES} in all)"
        )
    return "/".join(parts)


def _find_collision(files: Iterable[str], dirs: Iterable[str] = ()) -> tuple[str, str] | None:
    """Return ``(name, file)`` where ``file`` is a regular file that ``name`` needs as a directory."""
    file_set = set(files)
    for name in [*file_set, *dirs]:
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in file_set:
                return name, parent
    return None


def _order_key(name: str) -> tuple[bool, str]:
    """Sort key: ``manifest.json`` first, then by name."""
    return name != _MANIFEST, name


# --------------------------------------------------------------------------- writing


def _octal(value: int, width: int) -> bytes:
    """Encode ``value`` as a zero-padded, NUL-terminated octal field of ``width`` bytes."""
    return b"%0*o\x00" % (width - 1, value)


def _ustar_header(name: bytes, size: int, mtime: int, typeflag: bytes) -> bytes:
    """Return one ustar header block with this module's fixed metadata."""
    block = bytearray(_BLOCK)
    block[0 : len(name)] = name
    block[100:108] = _octal(0o644, 8)
    block[108:116] = _octal(0, 8)
    block[116:124] = _octal(0, 8)
    block[124:136] = _octal(size, 12)
    block[136:148] = _octal(mtime, 12)
    block[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    block[156:157] = typeflag
    block[257:265] = _POSIX_MAGIC
    block[329:337] = _octal(0, 8)
    block[337:345] = _octal(0, 8)
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def _pax_record(key: str, value: bytes) -> bytes:
    """Return the pax record ``"<len> key=value\\n"`` whose length counts its own digits."""
    body = b" " + key.encode("ascii") + b"=" + value + b"\n"
    length = len(body)
    while len(b"%d" % length) + len(body) != length:
        length = len(b"%d" % length) + len(body)
    return b"%d" % length + body


def _comment_record(length: int) -> bytes:
    """Return a pax ``comment`` record of exactly ``length`` bytes (at least 12)."""
    fill = length - len(b"%d" % length) - len(b" comment=\n")
    value = (_PAD_TEXT * (fill // len(_PAD_TEXT) + 1))[:fill]
    record = b"%d comment=%s\n" % (length, value)
    assert len(record) == length, (length, len(record))
    return record


def _member_headers(name: str, size: int, position: int, mtime: int) -> bytes:
    """Return the header blocks for a member starting at ``position``, aligning its data.

    Args:
        name: the member's canonical name.
        size: the member's data length.
        position: archive offset of the first header block (a multiple of 512).
        mtime: the modification time to record.

    Returns:
        One ustar header, or a pax header + its records + a ustar header, such that
        ``position + len(result)`` is a multiple of :data:`ALIGNMENT`.
    """
    raw = name.encode("utf-8")
    records = b""
    ustar_name, ustar_size = raw, size
    if len(raw) > 100 or not raw.isascii():
        records += _pax_record("path", raw)
        # Readers use the pax path; the ustar field holds a readable prefix of it.
        ustar_name = raw[:100].decode("utf-8", "ignore").encode("utf-8")
    if size > _MAX_OCTAL_11:
        records += _pax_record("size", b"%d" % size)
        ustar_size = 0
    if not records and (position + _BLOCK) % ALIGNMENT == 0:
        return _ustar_header(ustar_name, ustar_size, mtime, b"0")
    # Layout: pax header block, `length` bytes of records (a multiple of 512, so no
    # padding), the ustar header block, then the data, which must land on ALIGNMENT.
    length = -(position + 2 * _BLOCK) % ALIGNMENT
    while length < len(records) + _MIN_COMMENT_RECORD:
        length += ALIGNMENT
    records += _comment_record(length - len(records))
    return (
        _ustar_header(_PAX_HEADER_NAME, length, mtime, b"x")
        + records
        + _ustar_header(ustar_name, ustar_size, mtime, b"0")
    )


def _source_date_epoch() -> int:
    """Return ``SOURCE_DATE_EPOCH`` if it is a decimal integer that fits ustar, else 0."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if value.isascii() and value.isdigit() and int(value) <= _MAX_OCTAL_11:
        return int(value)
    return 0


@dataclasses.dataclass(frozen=True)
class _Source:
    """A file to archive: its member name, where it is read from and its size."""

    name: str
    path: str
    size: int


def _plan(files: Sequence[tuple[str, str | os.PathLike[str]]]) -> list[_Source]:
    """Validate names and sources and return them in archive order.

    Raises:
        ArchiveError: a name is unsafe, not canonical, duplicated or collides with
            another, or a source is not a regular file.
    """
    sources: dict[str, _Source] = {}
    for name, source in files:
        path = os.fspath(source)
        try:
            canonical = _normalize_name(name)
        except _UnsafeName as exc:
            raise ArchiveError(
                f"archive member name {name!r} (from {path}) {exc}; "
                "use a relative path inside the checkpoint",
                file=path,
                member=name,
            ) from None
        if canonical != name or not name:
            raise ArchiveError(
                f"archive member name {name!r} (from {path}) is not canonical; "
                f"expected a relative path without empty, '.' or trailing segments, such as {canonical!r}",
                file=path,
                member=name,
            )
        if name in sources:
            raise ArchiveError(
                f"archive member name {name!r} is given twice ({sources[name].path} and {path}); "
                "each member needs a distinct name",
                file=path,
                member=name,
            )
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ArchiveError(
                f"cannot archive {path} as {name!r}: it is not a regular file", file=path, member=name
            )
        sources[name] = _Source(name, path, info.st_size)
    collision = _find_collision(sources)
    if collision is not None:
        name, parent = collision
        raise ArchiveError(
            f"archive member {name!r} needs {parent!r} to be a directory, but {parent!r} is also "
            "a file member; rename one of them",
            file=sources[name].path,
            member=name,
        )
    return [sources[name] for name in sorted(sources, key=_order_key)]


def _copy_member(
    out: BinaryIO,
    source: _Source,
    buffer: memoryview,
    on_chunk: Callable[[int], None],
) -> None:
    """Stream ``source``'s bytes into ``out``, checking it did not change size meanwhile."""
    with open(source.path, "rb", buffering=0) as src:
        info = os.fstat(src.fileno())
        remaining = source.size
        if not stat.S_ISREG(info.st_mode) or info.st_size != source.size:
            remaining = -1
        while remaining > 0:
            count = src.readinto(buffer[: min(len(buffer), remaining)])
            if not count:
                break
            out.write(buffer[:count])
            remaining -= count
            on_chunk(count)
        if remaining != 0 or src.read(1):
            raise ArchiveError(
                f"{source.path} changed while it was being archived as {source.name!r} "
                f"(expected {source.size} bytes); archive a checkpoint nothing is writing to",
                file=source.path,
                member=source.name,
            )


def _fsync_directory(directory: str) -> None:
    """Make a rename inside ``directory`` durable, where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary_sibling(target: str) -> str:
    """Return an unused-looking hidden name next to ``target`` for atomic replacement."""
    head, tail = os.path.split(target)
    return os.path.join(head, f".{tail}.{secrets.token_hex(8)}.tmp")


def _is_temporary_of(name: str, tail: str) -> bool:
    """Whether ``name`` is a ``_temporary_sibling`` name of the archive named ``tail``."""
    prefix = f".{tail}."
    middle = name[len(prefix) : -len(".tmp")]
    return (
        name.startswith(prefix)
        and name.endswith(".tmp")
        and len(middle) == 16
        and all(c in "0123456789abcdef" for c in middle)
    )


def remove_abandoned_temporaries(target: str | os.PathLike[str]) -> None:
    """Remove temporaries of ``target`` left by a killed writer (nobody holds their lock).

    A live writer holds an exclusive flock on its temporary from creation to rename, so a
    temporary whose lock can be taken is abandoned.
    """
    head, tail = os.path.split(os.path.abspath(os.fspath(target)))
    try:
        names = os.listdir(head)
    except OSError:
        return
    for name in names:
        if not _is_temporary_of(name, tail):
            continue
        path = os.path.join(head, name)
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer holds it
                if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                    os.unlink(path)
            finally:
                os.close(fd)


def _create_locked_temporary(target: str) -> tuple[int, str]:
    """Create and flock a new temporary next to ``target``; its path still names it once locked."""
    while True:
        temporary = _temporary_sibling(target)
        fd = os.open(temporary, _CREATE_FLAGS, 0o666)  # 0o666 so the umask decides, as for open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(temporary, follow_symlinks=False)):
                return fd, temporary
        except FileNotFoundError:
            pass
        # A cleaner removed it between our create and lock (it looked abandoned): try again.
        os.close(fd)


def write_archive(
    files: Sequence[tuple[str, str | os.PathLike[str]]],
    out: str | os.PathLike[str],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write a reproducible, page-aligned tar archive of ``files`` to ``out`` atomically.

    The archive is written to a temporary file next to ``out`` and renamed over it only
    once complete, so ``out`` is never left half-written. File data is streamed in chunks.
    The temporary is flocked until renamed; those of a killed writer are removed by the next one.

    Args:
        files: ``(member name, source path)`` pairs; names are relative POSIX paths such
            as ``"shards/model-00001.safetensors"``. Their order does not matter.
        out: the archive file to create or replace.
        progress: called as ``progress(bytes_done, bytes_total)`` after each chunk of
            file data, where ``bytes_total`` is the sum of the files' sizes; the last call
            is always ``(bytes_total, bytes_total)``.

    Raises:
        ArchiveError: a name is unsafe, not canonical, duplicated or collides; a source
            is not a regular file or changed size while being read.
        OSError: a source cannot be read or ``out`` cannot be written.
    """
    sources = _plan(files)
    total = sum(source.size for source in sources)
    mtime = _source_date_epoch()
    target = os.path.abspath(os.fspath(out))
    remove_abandoned_temporaries(target)
    done = 0

    def on_chunk(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    fd, temporary = _create_locked_temporary(target)
    try:
        with open(fd, "wb") as stream:
            buffer = memoryview(bytearray(min(_CHUNK, max(total, 1))))
            position = 0
            for source in sources:
                headers = _member_headers(source.name, source.size, position, mtime)
                stream.write(headers)
                _copy_member(stream, source, buffer, on_chunk)
                padding = -source.size % _BLOCK
                stream.write(bytes(padding))
                position += len(headers) + source.size + padding
            end = 2 * _BLOCK
            end += -(position + end) % _RECORD_SIZE
            stream.write(bytes(end))
            stream.flush()
            os.fsync(stream.fileno())
            os.replace(temporary, target)  # still open, so still locked: no cleaner removes it
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(os.path.dirname(target))
    if progress is not None and total == 0:
        progress(0, 0)  # no chunk was copied, but callers rely on a final (total, total)


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class _Header:
    """The fields of one header block that decide how the archive is read."""

    name: bytes
    linkname: bytes
    size: int
    typeflag: bytes


def _parse_number(field: bytes) -> int | None:
    """Decode a numeric header field (octal, or GNU base-256); None when malformed or negative."""
    if field[:1] == b"\x80":
        value = 0
        for byte in field[1:]:
            value = value << 8 | byte
        return value
    if field and field[0] & 0x80:
        return None  # negative base-256 (0xff) or an invalid lead byte
    digits = field.split(b"\x00", 1)[0].strip()
    if not digits:
        return 0
    if not all(0x30 <= byte <= 0x37 for byte in digits):
        return None
    return int(digits, 8)


def _field(block: bytes, start: int, end: int) -> bytes:
    """Return a NUL-terminated string field of a header block."""
    return block[start:end].split(b"\x00", 1)[0]


def _display(raw: bytes) -> str:
    """Return ``raw`` as text for a message, even when it is not valid UTF-8."""
    return raw.decode("utf-8", "backslashreplace")


def _parse_header(block: bytes, where: str, position: int) -> _Header:
    """Check one non-zero header block (magic, checksum, numbers) and return its fields.

    Raises:
        ArchiveError: the block is not a ustar/GNU header or is corrupt.
    """
    claimed = _display(_field(block, 0, 100))
    magic = block[257:265]
    if magic not in (_POSIX_MAGIC, _GNU_MAGIC):
        what = "is not a tar archive" if position == 0 else "is corrupt"
        raise ArchiveError(
            f"{where} {what}: the block at byte {position} is not a ustar header "
            f"(magic {magic!r}, expected {_POSIX_MAGIC!r}); re-create the archive",
            file=where,
            member=claimed if position else None,
        )
    stored = _parse_number(block[148:156])
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    signed = sum(struct.unpack("148b8x356b", block)) + 8 * 0x20  # what some old tars compute
    if stored is None or stored not in (unsigned, signed):
        raise ArchiveError(
            f"{where} is corrupt: the header of member {claimed!r} at byte {position} has "
            f"checksum {block[148:156]!r} but its bytes sum to {unsigned:o} (octal); "
            "re-copy or re-create the archive",
            file=where,
            member=claimed,
        )
    name = _field(block, 0, 100)
    prefix = _field(block, 345, 500)
    if prefix and magic == _GNU_MAGIC:
        # Old GNU headers keep atime/ctime where ustar keeps the prefix; tools disagree on it.
        raise ArchiveError(
            f"{where}: member {claimed!r} at byte {position} has a GNU header with a non-empty "
            "prefix field, which tools read differently; re-create the archive in pax format",
            file=where,
            member=claimed,
        )
    if prefix:
        name = prefix + b"/" + name
    size = _parse_number(block[124:136])
    if size is None:
        raise ArchiveError(
            f"{where} is corrupt: member {_display(name)!r} at byte {position} has an "
            f"invalid size field {block[124:136]!r}",
            file=where,
            member=_display(name),
        )
    return _Header(name, _field(block, 157, 257), size, block[156:157])


def _parse_pax(data: bytes, where: str, position: int) -> dict[str, bytes]:
    """Parse pax extended header records; refuse malformed ones and duplicate keys."""

    def malformed(why: str) -> ArchiveError:
        return ArchiveError(
            f"{where} is corrupt: the pax extended header at byte {position} {why}",
            file=where,
        )

    records: dict[str, bytes] = {}
    index = 0
    while index < len(data) and data[index] != 0:  # some writers pad records with NULs
        space = data.find(b" ", index, index + 20)
        digits = data[index:space]
        if space < 0 or not digits.isdigit():
            raise malformed(f"has a record without a length at offset {index}")
        end = index + int(digits)
        if end > len(data) or end <= space + 1 or data[end - 1 : end] != b"\n":
            raise malformed(f"has a record with a wrong length at offset {index}")
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals or not key:
            raise malformed(f"has a record without 'key=' at offset {index}")
        text_key = key.decode("utf-8", "backslashreplace")
        if text_key in records:
            raise malformed(f"repeats the key {text_key!r}")
        records[text_key] = value
        index = end
    return records


def _refuse(where: str, member: str, why: str) -> ArchiveError:
    """Return the error for a member that must not be extracted."""
    return ArchiveError(
        f"{where}: refusing the archive: member {member!r} {why}. Nothing was extracted; "
        "use an archive written by manifest-ckpt or a plain tar of regular files",
        file=where,
        member=member,
    )


def _scan(stream: io.BufferedReader, file_size: int, where: str) -> dict[str, ArchiveMember]:
    """Read every header of an open archive and return its regular files, validated."""
    members: dict[str, ArchiveMember] = {}
    directories: set[str] = set()
    pax: dict[str, bytes] | None = None
    long_name: bytes | None = None
    position = 0
    # Each pass consumes at least one block and stops before the end of the file,
    # so the loop runs at most file_size / 512 times whatever the bytes say.
    while True:
        if position + _BLOCK > file_size:
            raise ArchiveError(
                f"{where} is truncated: it ends at byte {file_size} without the end-of-archive "
                "marker (two zero blocks), so members may be missing; re-copy or re-create it",
                file=where,
            )
        stream.seek(position)
        block = stream.read(_BLOCK)
        if block == _ZERO_BLOCK:
            if pax is not None or long_name is not None:
                raise ArchiveError(
                    f"{where} is corrupt: an extended header just before byte {position} "
                    "is followed by the end of the archive, not by a member",
                    file=where,
                )
            break
        header = _parse_header(block, where, position)
        data_offset = position + _BLOCK
        if header.typeflag in (b"x", b"L"):
            if header.size > _MAX_EXTENDED or data_offset + header.size > file_size:
                raise ArchiveError(
                    f"{where} is corrupt or truncated: the extended header at byte {position} "
                    f"claims {header.size} bytes of data",
                    file=where,
                )
            data = stream.read(header.size)
            if (pax if header.typeflag == b"x" else long_name) is not None:
                raise ArchiveError(
                    f"{where} is corrupt: two extended headers of the same kind precede the "
                    f"member at byte {data_offset + header.size}",
                    file=where,
                )
            if header.typeflag == b"x":
                pax = _parse_pax(data, where, position)
            else:
                long_name = data.split(b"\x00", 1)[0]
            position = data_offset + -(-header.size // _BLOCK) * _BLOCK
            continue

        extended = pax or {}
        if "path" in extended and long_name is not None:
            raise _refuse(where, _display(extended["path"]), "has both a pax path and a GNU long name")
        raw_name = extended.get("path", long_name if long_name is not None else header.name)
        shown = _display(raw_name)
        pax = long_name = None
        size = header.size
        if "size" in extended:
            if not extended["size"].isdigit() or len(extended["size"]) > _MAX_SIZE_DIGITS:
                raise _refuse(where, shown, f"has a pax size {extended['size']!r} that is not a number")
            size = int(extended["size"])
        if any(key.startswith("GNU.sparse") for key in extended):
            raise _refuse(where, shown, "is a GNU sparse file")
        try:
            text = raw_name.decode("utf-8")
            name = _normalize_name(text)
        except UnicodeDecodeError:
            raise _refuse(where, shown, "has a name that is not valid UTF-8") from None
        except _UnsafeName as exc:
            raise _refuse(where, shown, f"has a name that {exc}") from None

        kind = header.typeflag
        if kind == b"\x00" and text.endswith("/"):
            kind = b"5"  # pre-POSIX tars mark directories with a trailing slash
        if kind in _REFUSED_TYPES:
            link = extended.get("linkpath", header.linkname)
            target = f" to {_display(link)!r}" if kind in (b"1", b"2") else ""
            raise _refuse(where, shown, f"is {_REFUSED_TYPES[kind]}{target}; only regular files are allowed")
        if kind == b"5":
            if size:
                raise _refuse(where, shown, f"is a directory with {size} bytes of data")
            if name in directories or name in members:
                raise _refuse(where, shown, "appears twice in the archive")
            if name:
                directories.add(name)
            position = data_offset
            continue
        if kind not in _REGULAR_TYPES:
            raise _refuse(where, shown, f"has the unsupported member type {kind!r}")
        if not name or text.endswith("/"):
            raise _refuse(where, shown, "is a regular file whose name is empty or ends with '/'")
        if name in members or name in directories:
            raise _refuse(where, shown, "appears twice in the archive")
        if data_offset + size > file_size:
            raise ArchiveError(
                f"{where} is truncated: member {shown!r} has {size} bytes of data from byte "
                f"{data_offset}, past the end of the {file_size}-byte file; re-copy or re-create it",
                file=where,
                member=shown,
            )
        members[name] = ArchiveMember(name, data_offset, size)
        position = data_offset + -(-size // _BLOCK) * _BLOCK

    collision = _find_collision(members, directories)
    if collision is not None:
        name, parent = collision
        raise _refuse(
            where, name, f"needs {parent!r} to be a directory, but {parent!r} is a file in the archive"
        )
    return members


def _open_regular(where: str) -> io.BufferedReader:
    """Open ``where`` for reading without blocking on fifos; refuse anything not a regular file."""
    return open_regular(where, what="an archive", error=lambda message: ArchiveError(message, file=where))


def index_archive(path: str | os.PathLike[str]) -> dict[str, ArchiveMember]:
    """Read an archive's headers (not its data) and return its regular files by name.

    Args:
        path: the archive file.

    Returns:
        ``{name: ArchiveMember}`` in archive order; names are normalized relative POSIX
        paths. Directory entries are accepted but not listed.

    Raises:
        ArchiveError: the file is not a tar archive, is corrupt or truncated, or holds an
            unsafe member (absolute or ``..`` name, link, device, fifo, duplicate name,
            file/directory collision, sparse file, global pax header).
        OSError: the file cannot be opened.
    """
    where = os.fspath(path)
    with _open_regular(where) as stream:
        return _scan(stream, os.fstat(stream.fileno()).st_size, where)


def is_archive(path: str | os.PathLike[str]) -> bool:
    """Return whether ``path`` is a regular file that starts with a valid tar header.

    Cheap: reads one block. An archive with no members at all is reported as False.
    """
    where = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(where).st_mode):
            return False
        with _open_regular(where) as stream:
            block = stream.read(_BLOCK)
    except (OSError, ArchiveError):
        return False
    if len(block) != _BLOCK or block == _ZERO_BLOCK:
        return False
    try:
        _parse_header(block, where, 0)
    except ArchiveError:
        return False
    return True


def _extract_member(
    stream: io.BufferedReader, member: ArchiveMember, root: str, where: str, buffer: memoryview
) -> None:
    """Copy one member's bytes into a new file under ``root``, never following links."""
    target = os.path.join(root, *member.name.split("/"))
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd = os.open(target, _CREATE_FLAGS, 0o666)
    except (FileExistsError, NotADirectoryError):
        # Only reachable on case-insensitive file systems: the index refused exact clashes.
        raise _refuse(
            where,
            member.name,
            "collides with another member on this file system (names that differ only in case?)",
        ) from None
    with open(fd, "wb") as out:
        stream.seek(member.offset)
        remaining = member.size
        while remaining > 0:
            count = stream.readinto(buffer[: min(len(buffer), remaining)])
            if not count:
                raise ArchiveError(
                    f"{where} changed while it was being extracted: member {member.name!r} ends early",
                    file=where,
                    member=member.name,
                )
            out.write(buffer[:count])
            remaining -= count
        out.flush()
        os.fsync(out.fileno())


def extract_archive(path: str | os.PathLike[str], dest_dir: str | os.PathLike[str]) -> list[str]:
    """Extract an archive's regular files into ``dest_dir``, all or nothing.

    The whole archive is validated before anything is written. Files are extracted into
    a hidden temporary sibling of ``dest_dir`` that is renamed into place at the end, so
    ``dest_dir`` either does not appear or holds every member. Links are never followed.

    Args:
        path: the archive file.
        dest_dir: a directory that must not exist or be empty; parents are created.

    Returns:
        The member names written, in archive order.

    Raises:
        ArchiveError: the archive is refused (see :func:`index_archive`).
        CheckpointExistsError: ``dest_dir`` exists and is not an empty directory.
        OSError: reading or writing failed; nothing is left at ``dest_dir``.
    """
    where = os.fspath(path)
    destination = os.path.abspath(os.fspath(dest_dir))
    with _open_regular(where) as stream:
        members = _scan(stream, os.fstat(stream.fileno()).st_size, where)
        replace_empty = False
        try:
            info = os.lstat(destination)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISDIR(info.st_mode) or os.listdir(destination):
                raise CheckpointExistsError(
                    f"cannot extract {where} into {destination}: it exists and is not an empty "
                    "directory; choose a new directory or remove it first"
                )
            replace_empty = True
        parent = os.path.dirname(destination)
        os.makedirs(parent, exist_ok=True)
        temporary = _temporary_sibling(destination)
        os.mkdir(temporary, 0o777)  # 0o777 so the umask decides, as for mkdir(1)
        try:
            buffer = memoryview(bytearray(_CHUNK))
            for member in members.values():
                _extract_member(stream, member, temporary, where, buffer)
            if replace_empty:
                os.rmdir(destination)
            os.rename(temporary, destination)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    _fsync_directory(parent)
    return list(members)


def extract_members(path: str | os.PathLike[str], names: Iterable[str], dest_dir: str | os.PathLike[str]) -> None:
    """Copy the named regular-file members of an archive into the existing ``dest_dir``.

    The archive is indexed again (every hostile member refused, as by :func:`index_archive`)
    from the same open file the members are then read from; links are never followed and no
    other member is written. Used by ``unpack``, which checks the copies afterwards.

    Raises:
        ArchiveError: the archive is refused, or a named member is not in it.
    """
    where = os.fspath(path)
    with _open_regular(where) as stream:
        members = _scan(stream, os.fstat(stream.fileno()).st_size, where)
        buffer = memoryview(bytearray(_CHUNK))
        for name in names:
            member = members.get(name)
            if member is None:
                raise ArchiveError(
                    f"{where}: the manifest lists {name!r}, which is not a member of the archive (it changed while "
                    "it was unpacked, or it is incomplete); nothing was extracted",
                    file=where,
                    member=name,
                )
            _extract_member(stream, member, os.fspath(dest_dir), where, buffer)
