"""Digests and atomic file writes (no torch import)."""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a whole file, streamed in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
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
