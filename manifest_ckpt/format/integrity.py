"""Digests, bounded reads of regular files, and atomic file writes (no torch import)."""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from manifest_ckpt.errors import IntegrityError, ManifestCkptError

DIGEST_ALGORITHM: Final = "sha256"
_BLOCK = 8 << 20
# hashlib releases the GIL for large updates, so threads hash on every core.
WORKERS: Final = max(1, min(8, os.cpu_count() or 1))


def digest_bytes(data: bytes | memoryview) -> str:
    """``sha256:<hex>`` of a buffer."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_many(buffers: Sequence[Callable[[], bytes | memoryview]], *, workers: int = WORKERS) -> list[str]:
    """Digest several buffers in parallel; each item is a callable returning the buffer.

    Callables keep memory-mapped pages from being touched before a worker needs them.
    """
    if workers <= 1 or len(buffers) <= 1:
        return [digest_bytes(get()) for get in buffers]
    # Each worker takes the next index from a shared counter (atomic under the GIL) rather
    # than one Future per buffer: 100,000 tiny tensors cost microseconds each, not tens.
    results = [""] * len(buffers)
    indices = itertools.count()
    failed = threading.Event()

    def work() -> None:
        try:
            for i in indices:
                if i >= len(buffers) or failed.is_set():
                    return
                results[i] = digest_bytes(buffers[i]())
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(work) for _ in range(min(workers, len(buffers)))]
    for future in futures:
        future.result()
    return results


# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; the
# descriptor is checked with fstat before a single byte is read.
_OPEN_FLAGS: Final = (
    os.O_RDONLY
    | getattr(os, "O_BINARY", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_REASONS: Final = {
    errno.ELOOP: "too many levels of symbolic links (a link loop?)",
    errno.ENAMETOOLONG: "the name is too long for the file system",
    errno.ENXIO: "it is a socket or a device without a reader",
}

ErrorFactory = Callable[[str], ManifestCkptError]


def kind_of(mode: int) -> str:
    """``a FIFO (named pipe)``, ``a directory``...: what a non-regular file is, for messages."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def os_reason(exc: OSError) -> str:
    """A readable reason for an ``OSError`` (link loops and over-long names spelled out)."""
    return _REASONS.get(exc.errno or 0) or exc.strerror or type(exc).__name__


def open_regular(path: str | os.PathLike[str], *, what: str, error: ErrorFactory) -> io.BufferedReader:
    """Open a file for reading only if it is a regular file; never block on FIFOs or devices.

    Args:
        path: the file.
        what: what the file should be, for messages (``"a manifest"``).
        error: builds the typed error to raise from a message.

    Raises:
        FileNotFoundError: the path does not exist (callers word their own message).
        ManifestCkptError: from ``error``: not a regular file (FIFO, device, socket,
            directory), a link loop, an over-long name, or any other open failure.
    """
    where = os.fspath(path)
    try:
        fd = os.open(where, _OPEN_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise error(f"{where}: cannot open {what}: {os_reason(exc)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(
                f"{where}: is {kind_of(mode)}, not a regular file; expected {what}. Refusing to read it "
                "(a pipe or device can block forever or never end); point at the real file."
            )
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], *, what: str, limit: int, error: ErrorFactory) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes (checked before reading).

    Raises:
        FileNotFoundError: the path does not exist.
        ManifestCkptError: from ``error``: as :func:`open_regular`, or the file is (or grew)
            larger than ``limit``.
    """
    with open_regular(path, what=what, error=error) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
        if size > limit or len(data) > limit:
            raise error(
                f"{os.fspath(path)}: {max(size, len(data))} bytes is too large for {what} (at most {limit}); "
                "the file is not what it claims to be"
            )
        return data


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a whole regular file, streamed in blocks.

    Raises:
        IntegrityError: the path is not a regular file (an ``OSError``, like a failed open).
    """
    h = hashlib.sha256()
    with open_regular(path, what="a file to hash", error=lambda message: IntegrityError(message, file=os.fspath(path))) as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> None:
    """Write a file so that readers see the old bytes or the new ones, never a mix."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(target.parent)
