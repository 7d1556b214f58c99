"""Where a checkpoint's bytes live: a directory or an archive, both memory-mapped (no torch).

A store gives the manifest bytes and, for each weights file, a read-only view of its bytes
mapped from disk, or reads them straight into given memory (``read_into``). Paths from the
manifest are resolved without ever leaving the checkpoint.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from manifest_ckpt.errors import CheckpointNotFoundError, DestinationError, IntegrityError, ManifestError
from manifest_ckpt.format.integrity import digest_many, kind_of, open_regular, os_reason, read_regular
from manifest_ckpt.format.manifest import MANIFEST_NAME, Manifest

# A scheme as RFC 3986 spells it, then "://" (Windows drive letters do not match).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(path: object) -> bool:
    """True for ``scheme://...`` strings (fsspec URLs); False for local paths."""
    return isinstance(path, str) and bool(_URL.match(path))

MAX_MANIFEST_BYTES = 1 << 30
_preadv = getattr(os, "preadv", None)


def require_parent_dir(target: Path, what: str) -> None:
    """Refuse an output path whose parent directory is missing, before anything is read or written.

    Args:
        target: the file or directory about to be created.
        what: what it is, for the message ("checkpoint directory", "archive").

    Raises:
        DestinationError: the parent is missing or is not a directory.
    """
    parent = target.parent
    if parent.is_dir():
        return
    found = "is not a directory" if parent.exists() else "does not exist"
    raise DestinationError(
        f"{target}: cannot create the {what} there: its parent directory {parent} {found}; "
        f"create it first (mkdir -p {parent}) or choose another path",
        file=str(target),
    )


class Store(Protocol):
    """A checkpoint's files, by path relative to the checkpoint root."""

    location: str
    # True: ``file_map`` maps the file without reading it (local); False: every byte costs a
    # request, so ``load`` streams the ranges it needs (``stream``) instead of mapping files.
    mapped: bool

    def manifest_bytes(self) -> bytes: ...

    def file_map(self, name: str) -> tuple[mmap.mmap | bytearray, int, int]:
        """``(mapping, offset of the file in it, size of the file)``: the whole file's bytes."""
        ...

    def file_size(self, name: str) -> int:
        """The size of weights file ``name`` now, without reading its data."""
        ...

    def read_into(self, name: str, start: int, out: memoryview) -> None:
        """Fill ``out`` with bytes ``[start, start + len(out))`` of weights file ``name``.

        Raises:
            IntegrityError: the file ends before that (cut since it was bound) or cannot be read.
        """
        ...

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of weights file ``name`` (headers: no whole-file read)."""
        ...

    def digest_ranges(
        self, ranges: Sequence[tuple[str, int, int]], *, progress: Callable[[int], None] | None = None
    ) -> list[str]:
        """The ``sha256:`` digest of each ``(file, start, end)`` byte range, in order."""
        ...

    def stream(self, ranges: Sequence[tuple[str, int, int]]) -> Iterator[tuple[int, int, memoryview]]:
        """The bytes of each ``(file, start, end)`` range as ``(range index, offset in it, piece)``."""
        ...


class MappedStore:
    """``read_range``, ``read_into`` and the rest for stores whose files are memory-mapped (local ones)."""

    mapped = True
    location: str

    def file_map(self, name: str) -> tuple[mmap.mmap, int, int]:
        raise NotImplementedError

    def descriptor(self, name: str) -> tuple[int, int]:
        """``(descriptor, offset of the file in it)``: the very file ``file_map`` mapped, kept open."""
        raise NotImplementedError

    def file_size(self, name: str) -> int:
        raise NotImplementedError

    def read_into(self, name: str, start: int, out: memoryview) -> None:
        """``preadv`` straight into ``out``: one copy out of the page cache, no page faults on a mapping.

        The descriptor is the one the mapping was made from, so the bytes are the bound file's
        even if another file was renamed over its path since.
        """
        fd, base = self.descriptor(name)
        if _preadv is None:  # Windows: no preadv; copy from the mapping
            mapping, offset, _ = self.file_map(name)
            out[:] = memoryview(mapping)[offset + start : offset + start + len(out)]
            return
        done, want = 0, len(out)
        while done < want:  # preadv may return less than asked (2 GiB at most per call on Linux)
            try:
                count = _preadv(fd, [out[done:]], base + start + done)
            except OSError as exc:
                raise IntegrityError(
                    f"{self.location}/{name}: cannot read bytes {start + done}-{start + want}: {os_reason(exc)}; "
                    "check the disk or file system, then restore the file or re-save the checkpoint",
                    file=name,
                ) from None
            if count == 0:
                raise IntegrityError(
                    f"{self.location}/{name}: ends at byte {start + done}, but the manifest has data up to byte "
                    f"{start + want}: the file was cut while being read (is something rewriting it?); "
                    "restore it or re-save the checkpoint",
                    file=name,
                )
            done += count

    def read_range(self, name: str, start: int, end: int) -> bytes:
        mapping, offset, size = self.file_map(name)
        return mapping[offset + min(start, size) : offset + min(end, size)]

    def stream(self, ranges: Sequence[tuple[str, int, int]]) -> Iterator[tuple[int, int, memoryview]]:
        """Each range whole, as a view of the mapping (no copy)."""
        for index, (name, start, end) in enumerate(ranges):
            mapping, offset, _ = self.file_map(name)
            if end > start:
                yield index, 0, memoryview(mapping)[offset + start : offset + end]

    def digest_ranges(
        self, ranges: Sequence[tuple[str, int, int]], *, progress: Callable[[int], None] | None = None
    ) -> list[str]:
        """Hash mapped views on every core; pages are touched only when a worker reaches them."""

        def reader(name: str, start: int, end: int) -> Callable[[], memoryview]:
            def get() -> memoryview:
                mapping, offset, _ = self.file_map(name)
                if progress is not None:
                    progress(end - start)
                return memoryview(mapping)[offset + start : offset + end]

            return get

        return digest_many([reader(*r) for r in ranges])


@dataclass
class DirectoryStore(MappedStore):
    """A checkpoint directory."""

    root: Path
    location: str
    _maps: dict[str, tuple[mmap.mmap, int, int]] = field(default_factory=dict)
    _fds: dict[str, int] = field(default_factory=dict)

    def manifest_bytes(self) -> bytes:
        path = self.root / MANIFEST_NAME
        try:
            return read_regular(
                path,
                what="a manifest.json file",
                limit=MAX_MANIFEST_BYTES,
                error=lambda message: ManifestError(message, file=str(path)),
            )
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"{self.root}: no {MANIFEST_NAME}; this is not a manifest-ckpt checkpoint (or its save was "
                "interrupted). Convert foreign weights with `manifest-ckpt convert`.",
                file=str(path),
            ) from None

    def resolve(self, name: str) -> Path:
        """The real path of a manifest file name, refusing anything outside the checkpoint."""
        candidate = self.root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ManifestError(f"{self.location}: file name {name!r} escapes the checkpoint directory", file=name)
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(candidate)
        if os.path.commonpath([real_root, real]) != real_root:
            raise ManifestError(
                f"{self.location}: {name!r} is a link to {real}, outside the checkpoint directory; refusing to read it",
                file=name,
            )
        return candidate

    def file_map(self, name: str) -> tuple[mmap.mmap, int, int]:
        if name in self._maps:
            return self._maps[name]
        path = self.resolve(name)
        try:
            with open_regular(
                path, what="a weights file", error=lambda message: IntegrityError(message, file=name)
            ) as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise IntegrityError(f"{path}: file is empty (truncated)", file=name)
                # ACCESS_COPY: writable private pages (torch needs a writable buffer), never
                # written back to the file.
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                # Kept for read_into and file_size: the same file, even if replaced by path.
                fd = os.dup(f.fileno())
        except FileNotFoundError:
            raise IntegrityError(
                f"{path}: weights file listed in the manifest is missing; restore it or re-save the checkpoint",
                file=name,
            ) from None
        weakref.finalize(self, os.close, fd)
        self._fds[name] = fd
        self._maps[name] = (mapping, 0, size)
        return self._maps[name]

    def descriptor(self, name: str) -> tuple[int, int]:
        self.file_map(name)
        return self._fds[name], 0

    def file_size(self, name: str) -> int:
        """The file's size now (``fstat``): a file cut or grown since it was mapped shows here."""
        return os.fstat(self.descriptor(name)[0]).st_size


def open_store(path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> Store:
    """Open a checkpoint directory, a ``manifest.json`` path, an archive file, or a URL.

    Args:
        storage_options: passed to fsspec for URLs (``s3://``, ``gs://``, ``memory://``...);
            must be empty for local paths.

    Raises:
        ManifestError: the path does not exist or is not a checkpoint.
        StorageError: a URL whose file system is not installed or refuses the request.
    """
    if is_url(path):
        from manifest_ckpt.storage.remote import open_remote_store

        return open_remote_store(str(path), storage_options)
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{p}: no such checkpoint (file or directory not found)", file=str(p)) from None
    except (OSError, ValueError) as exc:  # ValueError: an embedded NUL byte
        reason = os_reason(exc) if isinstance(exc, OSError) else str(exc)
        raise CheckpointNotFoundError(f"{p}: cannot open the checkpoint: {reason}", file=str(p)) from None
    if stat.S_ISDIR(mode):
        return DirectoryStore(p, str(p))
    if not stat.S_ISREG(mode):
        raise CheckpointNotFoundError(
            f"{p}: is {kind_of(mode)}, not a checkpoint directory, manifest.json or archive; refusing to read it",
            file=str(p),
        )
    if p.name == MANIFEST_NAME:
        return DirectoryStore(p.parent, str(p.parent))
    from manifest_ckpt.storage import archive_store as _archive_store

    store: Store | None = _archive_store.open_archive_store(p)
    if store is not None:
        return store
    raise CheckpointNotFoundError(f"{p}: not a checkpoint directory, manifest.json or manifest-ckpt archive", file=str(p))


def read_store_manifest(store: Store) -> Manifest:
    """The validated manifest of an open store."""
    return Manifest.from_json(store.manifest_bytes(), file=f"{store.location}/{MANIFEST_NAME}")


def read_manifest(path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read and validate a checkpoint's manifest (directory, ``manifest.json``, archive or URL).

    For a URL only ``manifest.json`` is fetched.

    Raises:
        CheckpointNotFoundError: the path is not a checkpoint.
        ManifestError: unreadable, invalid or inconsistent manifest.
        UnsupportedVersionError: a format major version this release cannot read.
    """
    return read_store_manifest(open_store(path, storage_options=storage_options))
