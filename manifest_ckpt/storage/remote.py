"""Checkpoints on object storage and other fsspec file systems (no torch).

A URL (``s3://``, ``gs://``, ``az://``, ``hf://``, ``http(s)://``, ``memory://``, ``file://``) is
read through fsspec, imported only when a URL is used. Reads are ranged: ``check`` and
``inspect`` fetch the manifest and the 8-byte length prefix and header of each weights file,
never tensor data; ``load`` and ``verify`` fetch each needed byte once, in large ranges issued
concurrently.

Writes commit last. Object stores have no rename, so a checkpoint is never assembled in place:
it is written to a local staging directory with the ordinary (atomic, deterministic) writer,
then its weights files are uploaded, then ``manifest.json`` (one PUT, which S3 makes visible
all at once), then the objects the previous manifest listed and the new one does not are
deleted. A reader therefore sees the old checkpoint, or the new one, never a manifest whose
files are not all there; an interrupted upload leaves at most unreferenced weights objects,
which the next successful save to that URL removes.

The manifest's PUT is conditional where the store can make it so (S3: ``If-None-Match: *``
for a new checkpoint, ``If-Match: <ETag>`` of the manifest the writer checked for an
overwrite), so of two writers racing to one URL the second to commit fails with
:class:`ConcurrentWriteError` instead of silently replacing the first's checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import posixpath
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manifest_ckpt.errors import (
    ArchiveError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConcurrentWriteError,
    IntegrityError,
    ManifestCkptError,
    ManifestError,
    StorageError,
)
from manifest_ckpt.format.manifest import MANIFEST_NAME

MAX_MANIFEST_BYTES = 1 << 30
# The writer's content-addressed weights file names (``writer.content_file_name``).
_WEIGHTS_NAME = re.compile(r"weights-[0-9a-f]{16}[\w.-]*\.safetensors")
# Ranged reads of this size, several in flight: large enough to amortise a request's latency
# (s3fs's own default block is 50 MiB; AWS suggests 8-16 MB parts, and 32 MiB halves the requests
# of 16 at the same throughput), small enough that a verifying read holds at most the window of
# blocks in flight (8 x 32 MiB) beyond the tensors it fills.
BLOCK_BYTES = 32 << 20
CONCURRENCY = 8

StorageOptions = Mapping[str, Any]


def _filesystem(url: str, storage_options: StorageOptions | None) -> tuple[Any, str]:
    """The fsspec file system and the path inside it for ``url``.

    Raises:
        StorageError: fsspec (or the scheme's driver, e.g. s3fs) is not installed, or the URL
            names an unknown protocol.
    """
    try:
        import fsspec
    except ImportError:
        raise StorageError(
            f"{url}: reading URLs needs fsspec; install it with `pip install manifest-ckpt[remote]`", url=url
        ) from None
    try:
        fs, inner = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        raise StorageError(f"{url}: this URL's file system is not installed ({exc}); install its fsspec driver", url=url) from None
    except (ValueError, TypeError) as exc:
        raise StorageError(f"{url}: cannot open this URL: {exc}", url=url) from None
    return fs, inner.rstrip("/")


@contextmanager
def storage_errors(url: str, action: str, *, writing: bool = False) -> Iterator[None]:
    """Turn a file system's own exceptions into a typed error naming the URL and what to do.

    A missing object on a read means no checkpoint (:class:`CheckpointNotFoundError`); on a
    write it means a missing bucket or container (:class:`StorageError`).
    """
    try:
        yield
    except ManifestCkptError:
        raise
    except FileNotFoundError as exc:
        if writing:
            raise StorageError(f"{url}: {action}: {exc}; create the bucket (or container) first", url=url) from None
        raise CheckpointNotFoundError(f"{url}: {action}: not found ({exc}); check the bucket and key", file=url) from None
    except PermissionError as exc:
        raise StorageError(
            f"{url}: {action}: access denied ({exc}); check the credentials (AWS_ACCESS_KEY_ID, "
            "--storage-option key=..., storage_options={...})",
            url=url,
        ) from None
    except Exception as exc:  # noqa: BLE001 - drivers raise their own types (botocore, aiohttp); name them all
        raise StorageError(f"{url}: {action} failed: {type(exc).__name__}: {exc}", url=url) from None


@dataclass
class FsspecStore:
    """A checkpoint directory on an fsspec file system, read with ranged requests."""

    fs: Any
    root: str
    location: str
    mapped = False
    _sizes: dict[str, int] = field(default_factory=dict)
    _buffers: dict[str, tuple[bytearray, int, int]] = field(default_factory=dict)
    _heads: dict[str, bytes] = field(default_factory=dict)
    _listing: dict[str, int] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # A checkpoint packed in one archive object at ``root`` (``pack`` to a URL): its members.
    _members: dict[str, Any] | None = None
    bytes_read: int = 0

    def _locate(self, name: str) -> tuple[str, int]:
        """The object holding file ``name`` and the offset of its bytes in it."""
        if self._members is None:
            return self._path(name), 0
        member = self._members.get(name)
        if member is None:
            raise IntegrityError(
                f"{self.location}: weights file {name!r} listed in the manifest is not in the archive; re-create the "
                "archive with `manifest-ckpt pack`",
                file=name,
            )
        return self.root, int(member.offset)

    def _open_archive(self) -> bool:
        """If ``root`` is one object holding a tar archive, index its members (headers only); else False.

        Raises:
            ArchiveError: a tar archive that is corrupt or hostile (as for a local archive).
            CheckpointNotFoundError: a tar archive without ``manifest.json`` at its root.
        """
        from manifest_ckpt.storage.tar import _parse_header, _scan

        with storage_errors(self.location, "reading the archive"):
            try:
                info = self.fs.info(self.root)
            except FileNotFoundError:
                return False
            if info.get("type") != "file" or not info.get("size"):
                return False
            size = int(info["size"])
            # Small blocks: the index reads each member's 512-byte header, never its data.
            with self.fs.open(self.root, "rb", block_size=1 << 16, cache_type="bytes") as stream:
                first = stream.read(512)
                try:  # as is_archive: a valid first tar header, else not an archive at all
                    if len(first) < 512 or first == bytes(512):
                        return False
                    _parse_header(first, self.location, 0)
                except ArchiveError:
                    return False
                stream.seek(0)
                members = _scan(stream, size, self.location)
        if MANIFEST_NAME not in members:
            raise CheckpointNotFoundError(
                f"{self.location}: a tar archive without {MANIFEST_NAME} at its root, so not a manifest-ckpt archive. "
                "Create archives with `manifest-ckpt pack CKPT OUT`.",
                file=self.location,
            )
        self._members = members
        self._sizes = {name: int(m.size) for name, m in members.items()}
        return True

    def _path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise ManifestError(f"{self.location}: file name {name!r} escapes the checkpoint", file=name)
        return f"{self.root}/{name}"

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n

    def _listed_sizes(self) -> dict[str, int]:
        """Every object's size under the checkpoint from one listing (one request on S3).

        Refreshed, not from the driver's listing cache, so another writer's overwrite is seen.
        File systems that cannot list give ``{}`` and each size is asked for on its own.
        """
        if self._listing is None:
            try:
                try:
                    entries = self.fs.ls(self.root, detail=True, refresh=True)
                except TypeError:  # drivers without the refresh keyword
                    entries = self.fs.ls(self.root, detail=True)
                self._listing = {
                    posixpath.basename(str(e["name"]).rstrip("/")): int(e["size"])
                    for e in entries
                    if e.get("type") == "file" and e.get("size") is not None
                }
            except Exception:  # noqa: BLE001 - listing is an optimisation; sizes are then asked one by one
                self._listing = {}
        return self._listing

    def _size(self, name: str, what: str) -> int:
        listed = self._listed_sizes().get(name)
        if listed is not None:
            return listed
        with storage_errors(f"{self.location}/{name}", what):
            return int(self.fs.size(self._path(name)))

    def manifest_bytes(self) -> bytes:
        if self._members is not None:
            size = self.file_size(MANIFEST_NAME)
            if size > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{self.location}/{MANIFEST_NAME}: {size} bytes is too large for a manifest")
            return self._fetch(MANIFEST_NAME, 0, size) if size else b""
        path = self._path(MANIFEST_NAME)
        where = f"{self.location}/{MANIFEST_NAME}"
        # The listing (every weights file's size, which binding asks for next) runs beside the
        # manifest's GET: one round trip on the critical path, not two.
        with ThreadPoolExecutor(max_workers=1) as pool:
            listing = pool.submit(self._listed_sizes)
            try:
                with storage_errors(where, "reading the manifest"):
                    data = bytes(self.fs.cat_file(path, start=0, end=MAX_MANIFEST_BYTES + 1))
            except CheckpointNotFoundError:
                listing.result()
                if self._open_archive():  # not a prefix: one object, a packed checkpoint
                    return self.manifest_bytes()
                raise CheckpointNotFoundError(
                    f"{self.location}: {self._missing_bucket() or f'no {MANIFEST_NAME}'}; this is not a manifest-ckpt "
                    "checkpoint (or its upload did not finish: the manifest is written last)",
                    file=where,
                ) from None
            listing.result()
        self._count(len(data))
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{where}: more than {MAX_MANIFEST_BYTES} bytes is too large for a manifest", file=where)
        return data

    def _missing_bucket(self) -> str | None:
        """``"bucket 'b' does not exist"`` when that is why nothing was found (S3; one more request)."""
        if not _is_s3(self.fs):
            return None
        bucket = self.root.split("/", 1)[0]
        try:
            found = self.fs.exists(bucket)
        except Exception:  # noqa: BLE001 - only a better message is at stake
            return None
        return None if found else f"bucket {bucket!r} does not exist (or these credentials cannot see it)"

    def file_size(self, name: str) -> int:
        """The size of weights file ``name``, from the store's listing (no data read)."""
        if name not in self._sizes:
            if self._members is not None:
                self._locate(name)  # raises: not in the archive
            try:
                self._sizes[name] = self._size(name, "reading a weights file's size")
            except CheckpointNotFoundError:
                raise IntegrityError(
                    f"{self.location}/{name}: weights file listed in the manifest is missing; restore it or "
                    "re-save the checkpoint",
                    file=name,
                ) from None
        return self._sizes[name]

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of weights file ``name`` (one ranged request at most).

        Reads from the start of a file (the header) are kept, so binding's length prefix,
        then its header, then ``file_map`` fetch each byte once.
        """
        if name in self._buffers:
            buf, offset, _ = self._buffers[name]
            return bytes(buf[offset + start : offset + end])
        head = self._heads.get(name, b"")
        if start == 0 and end > len(head):
            # Only what was asked (binding asks for the length prefix, then the header), so
            # check reads no tensor data; file_map and stream reuse these bytes later.
            head = self._heads[name] = head + self._fetch(name, len(head), end)
        if end <= len(head):
            return head[start:end]
        return self._fetch(name, start, end)

    def _fetch(self, name: str, start: int, end: int) -> bytes:
        path, base = self._locate(name)
        with storage_errors(f"{self.location}/{name}", "a ranged read"):
            data = bytes(self.fs.cat_file(path, start=base + start, end=base + end))
        self._count(len(data))
        if len(data) > end - start and (base or len(data) == self.file_size(name)):
            # A server that ignores Range headers (plain HTTP) sends the whole object.
            data = data[base + start : base + end]
        if len(data) != end - start:
            raise IntegrityError(
                f"{self.location}/{name}: asked for bytes {start}-{end}, got {len(data)} bytes; the object changed "
                "or is truncated",
                file=name,
            )
        return data

    def _cached(self, name: str, start: int, end: int) -> bytes | memoryview:
        """Bytes of a range from what was already fetched (a whole file, or its head), else a GET."""
        if name in self._buffers:
            buf, offset, _ = self._buffers[name]
            return memoryview(buf)[offset + start : offset + end]
        head = self._heads.get(name, b"")
        if end <= len(head):
            return memoryview(head)[start:end]
        return self._fetch(name, start, end)

    def stream(self, ranges: Sequence[tuple[str, int, int]]) -> Iterator[tuple[int, int, memoryview]]:
        """The bytes of each ``(file, start, end)`` range, in file order, with bounded memory.

        Yields ``(range index, offset within the range, piece)``. The ranges' union is read in
        blocks of at most ``BLOCK_BYTES``, ``CONCURRENCY`` in flight, each byte once; at most
        that many blocks are held at a time, whatever the files' sizes.
        """
        blocks = _plan_blocks(ranges)
        with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
            pending: deque[tuple[_Block, Future[bytes | memoryview]]] = deque()
            todo = iter(blocks)
            for block in itertools.islice(todo, CONCURRENCY):
                pending.append((block, pool.submit(self._cached, block.file, block.start, block.end)))
            while pending:
                block, future = pending.popleft()
                data = memoryview(future.result())
                following = next(todo, None)
                if following is not None:
                    pending.append((following, pool.submit(self._cached, following.file, following.start, following.end)))
                for index, start, end in block.parts:
                    lo, hi = max(start, block.start), min(end, block.end)
                    yield index, lo - start, data[lo - block.start : hi - block.start]

    def read_into(self, name: str, start: int, out: memoryview) -> None:
        """Fill ``out`` from the ranged stream of ``[start, start + len(out))`` (bounded memory)."""
        for _, offset, piece in self.stream([(name, start, start + len(out))]):
            out[offset : offset + len(piece)] = piece

    def digest_ranges(
        self, ranges: Sequence[tuple[str, int, int]], *, progress: Callable[[int], None] | None = None
    ) -> list[str]:
        """Hash each range while it streams in (bounded memory; each byte fetched once)."""
        hashers = [hashlib.sha256() for _ in ranges]
        for index, _, piece in self.stream(ranges):
            hashers[index].update(piece)
            if progress is not None:
                progress(len(piece))
        return ["sha256:" + h.hexdigest() for h in hashers]

    def file_map(self, name: str) -> tuple[bytearray, int, int]:
        """The whole file, fetched once in concurrent ranged reads, as a writable buffer."""
        if name in self._buffers:
            return self._buffers[name]
        size = self.file_size(name)
        if size == 0:
            raise IntegrityError(f"{self.location}/{name}: file is empty (truncated)", file=name)
        buf = bytearray(size)
        view = memoryview(buf)
        head = self._heads.pop(name, b"")[:size]
        view[: len(head)] = head
        ranges = [(s, min(s + BLOCK_BYTES, size)) for s in range(len(head), size, BLOCK_BYTES)]

        def fetch(r: tuple[int, int]) -> None:
            view[r[0] : r[1]] = self._fetch(name, r[0], r[1])

        if ranges:
            with ThreadPoolExecutor(max_workers=min(CONCURRENCY, len(ranges))) as pool:
                list(pool.map(fetch, ranges))
        self._buffers[name] = (buf, 0, size)
        return self._buffers[name]


@dataclass
class _Block:
    """One ranged read: ``[start, end)`` of ``file`` and the requested ranges it serves."""

    file: str
    start: int
    end: int
    parts: list[tuple[int, int, int]]  # (range index, range start, range end)


def _plan_blocks(ranges: Sequence[tuple[str, int, int]]) -> list[_Block]:
    """Cover the union of ``ranges`` with reads of at most ``BLOCK_BYTES``, in file order.

    Linear after the sort: ranges are taken by start; each block keeps the ranges that
    overlap it, and a range leaves the active list once a block reaches its end.
    """
    order = sorted((r for r in range(len(ranges)) if ranges[r][2] > ranges[r][1]), key=lambda r: ranges[r])
    blocks: list[_Block] = []
    k = 0
    while k < len(order):
        name, lo, hi = ranges[order[k]]
        # One segment: ranges of one file that overlap or touch, read as one span.
        end_k = k
        while end_k + 1 < len(order) and ranges[order[end_k + 1]][0] == name and ranges[order[end_k + 1]][1] <= hi:
            end_k += 1
            hi = max(hi, ranges[order[end_k]][2])
        active: list[int] = []
        nxt = k
        for start in range(lo, hi, BLOCK_BYTES):
            end = min(start + BLOCK_BYTES, hi)
            while nxt <= end_k and ranges[order[nxt]][1] < end:
                active.append(order[nxt])
                nxt += 1
            parts = [(r, ranges[r][1], ranges[r][2]) for r in active if ranges[r][2] > start]
            blocks.append(_Block(name, start, end, parts))
            active = [r for r in active if ranges[r][2] > end]
        k = end_k + 1
    return blocks


def open_remote_store(url: str, storage_options: StorageOptions | None = None) -> FsspecStore:
    """A store for the checkpoint at ``url`` (its directory, or its ``manifest.json``)."""
    fs, root = _filesystem(url, storage_options)
    location = url.rstrip("/")
    if posixpath.basename(root) == MANIFEST_NAME:
        root, location = posixpath.dirname(root), location[: -len(MANIFEST_NAME) - 1]
    return FsspecStore(fs, root, location)


@dataclass(frozen=True)
class Destination:
    """A checked upload destination: what is there now, so the commit knows what to delete.

    Attributes:
        old: the files the manifest at the destination lists (replaced by the commit).
        leftovers: weights objects no manifest lists, left by interrupted or losing uploads.
        existed: a manifest was there when checked.
        etag: that manifest's ETag (S3), which the commit's conditional PUT requires unchanged.
    """

    url: str
    storage_options: StorageOptions | None
    old: frozenset[str]
    leftovers: frozenset[str]
    existed: bool = False
    etag: str | None = None

    @property
    def location(self) -> str:
        return self.url.rstrip("/")


def check_destination(url: str, *, overwrite: bool, storage_options: StorageOptions | None = None) -> Destination:
    """Refuse a destination that holds a checkpoint (unless ``overwrite``) or somebody's data.

    Call it before any long work (and before any upload): the commit then deletes only what
    was there when it was checked, and not listed by the new manifest.

    Raises:
        CheckpointExistsError: ``url`` holds a checkpoint (or other objects) and ``overwrite``
            is False.
        StorageError: the store refused the listing (credentials, network).
    """
    fs, root = _filesystem(url, storage_options)
    location = url.rstrip("/")
    manifest_path = f"{root}/{MANIFEST_NAME}"
    with storage_errors(location, "checking the destination"):
        # The ETag first, then the bytes: if another writer commits in between, the commit's
        # If-Match fails (a conservative conflict), never the reverse (deleting by a stale list).
        info = _manifest_info(fs, manifest_path)
        exists = info is not None
        others = _listing(fs, root)
    if exists and not overwrite:
        raise CheckpointExistsError(f"{location} already holds a checkpoint; pass overwrite=True to replace it")
    names = {posixpath.basename(p.rstrip("/")) for p in others}
    # Weights objects no manifest lists are what an interrupted upload leaves (the manifest
    # goes last): replacing them loses nothing. Anything else is somebody's data.
    foreign = sorted(n for n in names if not _WEIGHTS_NAME.fullmatch(n) and n != MANIFEST_NAME)
    if foreign and not overwrite and not exists:
        raise CheckpointExistsError(
            f"{location} holds {len(foreign)} objects that are not weights files (e.g. {foreign[0]!r}) and no "
            f"{MANIFEST_NAME}; refusing to write into what is not a checkpoint. Choose another URL, or pass "
            "overwrite=True to write beside them."
        )
    old = _referenced_files(fs, manifest_path) if exists else set()
    leftovers = {n for n in names if _WEIGHTS_NAME.fullmatch(n)} - old
    etag = None if info is None else info.get("ETag")
    return Destination(
        url, storage_options, frozenset(old), frozenset(leftovers), exists, etag if isinstance(etag, str) else None
    )


def _manifest_info(fs: Any, path: str) -> dict[str, Any] | None:
    """The store's description of the manifest object (fresh, not from a listing cache), or None."""
    try:
        try:
            info = fs.info(path, refresh=True)
        except TypeError:  # drivers without the refresh keyword
            info = fs.info(path)
    except FileNotFoundError:
        return None
    return info if isinstance(info, dict) and info.get("type", "file") == "file" else None


def _is_s3(fs: Any) -> bool:
    protocol = fs.protocol
    return bool({"s3", "s3a"} & ({protocol} if isinstance(protocol, str) else set(protocol)))


def _put_manifest(fs: Any, destination: Destination, path: str, manifest: bytes) -> None:
    """PUT the manifest on condition that the destination's manifest is still the one checked.

    S3 (and servers that implement its conditional writes) enforce it: ``If-None-Match: *``
    when there was none, ``If-Match`` its ETag when there was one. Other fsspec file systems
    get ``mode="create"`` for a new checkpoint (an existence check, atomic where the driver
    makes it so) and an unconditional PUT for an overwrite (see docs/storage.md).

    Raises:
        ConcurrentWriteError: another writer committed a manifest there since the check.
    """
    s3 = _is_s3(fs)
    try:
        if not destination.existed:
            fs.pipe_file(path, manifest, mode="create")
        elif s3 and destination.etag is not None:
            # One PUT whatever the size (s3fs goes multipart past 2 chunks, where S3 would take
            # If-Match on CreateMultipartUpload and ignore it): manifests stay under S3's 5 GB PUT.
            fs.pipe_file(path, manifest, chunksize=len(manifest) + 1, IfMatch=destination.etag)
        else:
            fs.pipe_file(path, manifest)
    except (FileExistsError, OSError) as exc:
        conflict = isinstance(exc, FileExistsError) or "precondition" in f"{exc} {exc.__cause__}".lower()
        if not conflict:
            raise
        what = "created a checkpoint" if not destination.existed else "replaced the checkpoint"
        raise ConcurrentWriteError(
            f"{destination.location}: another writer {what} there after this save checked the destination, so "
            f"this save's {MANIFEST_NAME} was not written (the other checkpoint stays, whole). Its weights objects "
            "are left unreferenced; the next save to this URL removes them. Load the other checkpoint, or save "
            "again with overwrite=True to replace it.",
            url=destination.location,
        ) from None


def upload_files(
    url: str,
    local: Path,
    names: Sequence[str],
    *,
    storage_options: StorageOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Upload the weights files ``names`` of directory ``local`` (each one PUT, visible whole or not at all).

    Every rank of a distributed save calls this for its own files; none of them is part of a
    checkpoint until :func:`commit_manifest` writes the manifest that lists it.
    """
    fs, root = _filesystem(url, storage_options)
    with storage_errors(url.rstrip("/"), "uploading weights", writing=True):
        for name in names:
            fs.put_file(str(local / name), f"{root}/{name}")
            if progress is not None:
                progress((local / name).stat().st_size)


def commit_manifest(destination: Destination, manifest: bytes, names: Iterable[str]) -> None:
    """Write ``manifest.json`` (the commit marker), then delete what no manifest needs any more.

    ``names`` are the weights files the new manifest lists, all uploaded before this call.
    Deleted: the files of the manifest that was replaced and the leftovers of interrupted
    uploads, as :func:`check_destination` found them, except any the manifest on the store
    lists now.

    Raises:
        ConcurrentWriteError: another writer committed to the URL since it was checked
            (detected where the store supports conditional writes; nothing is deleted then).
    """
    fs, root = _filesystem(destination.url, destination.storage_options)
    manifest_path = f"{root}/{MANIFEST_NAME}"
    with storage_errors(destination.location, "committing the manifest", writing=True):
        _put_manifest(fs, destination, manifest_path, manifest)
    stale = (destination.old | destination.leftovers) - set(names) - _referenced_files(fs, manifest_path)
    with storage_errors(destination.location, "removing replaced weights", writing=True):
        for name in sorted(stale - {MANIFEST_NAME}):
            if "/" not in name:
                fs.rm_file(f"{root}/{name}")


def upload_checkpoint(
    local: Path,
    url: str,
    *,
    overwrite: bool,
    storage_options: StorageOptions | None = None,
    progress: Callable[[int], None] | None = None,
    destination: Destination | None = None,
) -> None:
    """Upload the finished local checkpoint ``local`` to ``url``, committing the manifest last.

    Args:
        destination: ``url`` as :func:`check_destination` already checked it (else checked here).

    Raises:
        CheckpointExistsError: ``url`` holds a checkpoint (or other objects) and ``overwrite``
            is False.
        StorageError: the store refused a write (credentials, missing bucket, network).
    """
    if destination is None:
        destination = check_destination(url, overwrite=overwrite, storage_options=storage_options)
    names = sorted(p.name for p in local.iterdir() if p.name != MANIFEST_NAME)
    upload_files(destination.url, local, names, storage_options=destination.storage_options, progress=progress)
    commit_manifest(destination, (local / MANIFEST_NAME).read_bytes(), names)


def find_manifests(url: str, storage_options: StorageOptions | None = None) -> list[str]:
    """The checkpoint URLs under ``url``: every prefix holding a ``manifest.json`` (one listing)."""
    fs, root = _filesystem(url, storage_options)
    protocol = url.split("://", 1)[0]
    with storage_errors(url, "listing checkpoints"):
        found = fs.glob(f"{root}/**/{MANIFEST_NAME}") + (
            [f"{root}/{MANIFEST_NAME}"] if fs.exists(f"{root}/{MANIFEST_NAME}") else []
        )
    prefixes = {posixpath.dirname(p.rstrip("/")) for p in found}
    # Hidden prefixes are where interrupted local saves stage; skip them as the local walk does.
    visible = [p for p in prefixes if not any(part.startswith(".") for part in p[len(root) :].split("/"))]
    return sorted(f"{protocol}://{p.lstrip('/')}" if protocol != "file" else f"file://{p}" for p in visible)


@contextmanager
def downloaded(url: str, storage_options: StorageOptions | None = None) -> Iterator[Path]:
    """A local copy of what ``url`` names, in a temporary directory removed afterwards.

    A checkpoint (a prefix with ``manifest.json``) is copied as its manifest plus exactly the
    files it lists; another prefix (a Hugging Face directory, say) as the files directly under
    it; anything else as one file, keeping its name (conversion reads suffixes).
    """
    import tempfile

    fs, root = _filesystem(url, storage_options)
    with tempfile.TemporaryDirectory(prefix=".manifest-ckpt-download.") as tmp:
        with storage_errors(url, "downloading"):
            if fs.exists(f"{root}/{MANIFEST_NAME}"):
                local = Path(tmp) / "checkpoint"
                local.mkdir()
                store = open_remote_store(url, storage_options)
                manifest = store.manifest_bytes()
                (local / MANIFEST_NAME).write_bytes(manifest)
                for name in sorted(_referenced_names(manifest)):
                    fs.get_file(store._path(name), str(local / name))
            elif fs.isdir(root):
                local = Path(tmp) / (posixpath.basename(root) or "source")
                local.mkdir()
                for entry in fs.ls(root, detail=True):
                    name = posixpath.basename(str(entry["name"]).rstrip("/"))
                    if entry.get("type") == "file" and name and not name.startswith("."):
                        fs.get_file(str(entry["name"]), str(local / name))
            else:
                local = Path(tmp) / posixpath.basename(root)
                fs.get_file(root, str(local))
        yield local


@contextmanager
def staged_destination(
    url: str, *, overwrite: bool, storage_options: StorageOptions | None = None
) -> Iterator[Path]:
    """A local directory to write a checkpoint into, uploaded to ``url`` (manifest last) on success.

    The destination is checked first, so a refusal comes before any long work.

    Raises:
        CheckpointExistsError: ``url`` holds a checkpoint and ``overwrite`` is False.
    """
    import tempfile

    destination = check_destination(url, overwrite=overwrite, storage_options=storage_options)
    with tempfile.TemporaryDirectory(prefix=".manifest-ckpt-upload.") as tmp:
        local = Path(tmp) / "checkpoint"
        yield local
        upload_checkpoint(local, url, overwrite=overwrite, storage_options=storage_options, destination=destination)


def upload_file(local: Path, url: str, *, overwrite: bool, storage_options: StorageOptions | None = None) -> None:
    """Upload one finished file (an archive) to ``url``: one PUT, so it appears whole or not at all."""
    fs, root = _filesystem(url, storage_options)
    with storage_errors(url, "checking the destination"):
        exists = fs.exists(root)
    if exists and not overwrite:
        raise CheckpointExistsError(f"{url} already exists; pass overwrite=True (--overwrite) to replace it")
    with storage_errors(url, "uploading", writing=True):
        try:
            fs.put_file(str(local), root, mode="overwrite" if overwrite else "create")
        except FileExistsError:
            raise CheckpointExistsError(
                f"{url}: another writer created it while this archive was built; pass overwrite=True (--overwrite) "
                "to replace it"
            ) from None


def list_names(url: str, storage_options: StorageOptions | None = None) -> list[str]:
    """The names of the objects directly under ``url``, sorted (none when the prefix is absent)."""
    fs, root = _filesystem(url, storage_options)
    with storage_errors(url, "listing"):
        fs.invalidate_cache(root)  # another writer (or this process, through another instance) may have changed it
        return sorted(posixpath.basename(p.rstrip("/")) for p in _listing(fs, root))


def remove_names(url: str, names: Iterable[str], storage_options: StorageOptions | None = None) -> None:
    """Delete the objects ``names`` directly under ``url`` (one already gone is not an error)."""
    fs, root = _filesystem(url, storage_options)
    with storage_errors(url, "removing replaced files", writing=True):
        for name in sorted(names):
            with suppress(FileNotFoundError):
                fs.rm_file(f"{root}/{name}")


def object_size(url: str, storage_options: StorageOptions | None = None) -> int:
    """The size in bytes of the object at ``url``."""
    fs, root = _filesystem(url, storage_options)
    with storage_errors(url, "reading the size"):
        return int(fs.size(root))


def _referenced_names(manifest: bytes) -> set[str]:
    import json

    try:
        document = json.loads(manifest)
        return {n for n in document["files"] if isinstance(n, str) and "/" not in n and n != MANIFEST_NAME}
    except (ValueError, KeyError, TypeError):
        return set()


def _listing(fs: Any, root: str) -> list[str]:
    try:
        return [p for p in fs.ls(root, detail=False) if p.rstrip("/") != root]
    except FileNotFoundError:
        return []


def _referenced_files(fs: Any, manifest_path: str) -> set[str]:
    try:
        return _referenced_names(fs.cat_file(manifest_path))
    except OSError:
        return set()


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (the CLI's ``--storage-option``) as fsspec storage options.

    Values are parsed as JSON where they are JSON (``anon=true``, ``client_kwargs={...}``),
    else kept as strings. The endpoint and credentials otherwise come from the standard
    environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), which the drivers
    (botocore for ``s3://``) read themselves.

    Raises:
        StorageError: a pair without ``=``.
    """
    import json

    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise StorageError(f"--storage-option {pair!r}: expected KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options
