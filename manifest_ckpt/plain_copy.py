"""Plain copies: stored bytes moved straight from a bound weights file into module tensors, in bulk.

A copy is *plain* when a whole stored tensor goes, as its bytes, into a contiguous CPU tensor
of the same dtype and size (a plain ``Tensor`` or ``Parameter``, not an inference tensor or a
lazily conjugated or negated view) from a local file whose size and header ``load`` has
already bound to the manifest. No allocation, no kernel, no cast: a small tensor is one
``memmove`` from the file's mapping; a large one (``READ_MIN`` bytes or more) is read by the
store straight into the tensor's memory (``Store.read_into``: ``preadv``, on ``WORKERS``
threads), which is one copy out of the page cache without a page fault per 64 KiB of mapping.

That is what lets ``load`` stay all or nothing without a second copy of the model in memory:
the copies that can fail (casts, other devices, chunks, non-contiguous targets, transforms)
run first and are undone on failure; the plain ones run last, with Ctrl-C held until the
module is complete (:func:`interrupts_held`), so they need no saved bytes. ``load`` re-checks
each file's size just before copying, so a file truncated after the check is refused with
nothing changed. Only a file truncated (or failing with an I/O error) *while* its bytes are
being copied is left: a read then raises :class:`ReadFailed`, with the plain targets before it
already written (a memory-mapped reader would die of SIGBUS there instead).
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import torch
from torch import nn

from manifest_ckpt.format.integrity import WORKERS

__all__ = ["READ_MIN", "ReadFailed", "copy_all", "interrupts_held", "is_plain_target"]

# Tensors at least this large are read by the store into their memory (one syscall, no page
# faults on a mapping); smaller ones are one memmove from the mapping (a syscall would cost
# more than the copy: the 100,000-tensor case).
READ_MIN = 1 << 20
# Reads at least this large are split across WORKERS threads: one core does not saturate
# memory bandwidth, and preadv releases the GIL.
_SPLIT_MIN = 8 << 20
_PAGE = 4096
_memmove = ctypes.memmove
PLAIN_TYPES: Final = (torch.Tensor, nn.Parameter)
# A plain copy: the target (its version counter is bumped), its address, its size in bytes,
# then where its bytes come from: ``(address, None)`` to memmove from the bound mapping, or
# ``(offset, file)`` to read from that weights file (``READ_MIN`` bytes or more).
Job = tuple[torch.Tensor, int, int, int, str | None]
# ``Store.read_into``: fill the view with the file's bytes from the offset, or raise.
Reader = Callable[[str, int, memoryview], None]


class ReadFailed(Exception):
    """A plain read failed; ``index`` is the first failing job's, ``error`` the store's typed error."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


def is_plain_target(t: torch.Tensor) -> bool:
    """Whether ``t``'s bytes can be written directly (and its version counter bumped)."""
    return type(t) in PLAIN_TYPES and t.is_cpu and t.is_contiguous() and not (
        t.is_inference() or t.is_conj() or t.is_neg()
    )


def copy_all(jobs: Sequence[Job], read_into: Reader) -> None:
    """Copy each job's bytes into its plain target: memmoves in order, then the reads on threads.

    Every target's version counter is bumped, as ``copy_`` does, so autograd still sees an
    in-place change (also when a read fails: the targets before it were written).

    Raises:
        ReadFailed: a read failed (a file truncated or failing while being read); every other
            read has finished.
    """
    reads: list[tuple[int, str, int, int, int]] = []
    try:
        for index, (_, dst, size, src, file) in enumerate(jobs):
            if file is not None:
                reads += [(index, file, src + at, dst + at, n) for at, n in _split(size)]
            elif size:
                _memmove(dst, src, size)
        if reads:
            _read_all(reads, read_into)
    finally:
        torch._C._increment_version([job[0] for job in jobs])


def _read_all(reads: list[tuple[int, str, int, int, int]], read_into: Reader) -> None:
    """Run every read (all of them, even after a failure), then raise the first failure by job order."""

    def run(read: tuple[int, str, int, int, int]) -> tuple[int, BaseException] | None:
        index, file, offset, dst, size = read
        try:
            read_into(file, offset, _writable(dst, size))
        except Exception as exc:  # noqa: BLE001 - reported, with its job, once every read is done
            return index, exc
        return None

    if len(reads) == 1:
        outcomes = [run(reads[0])]
    else:
        with ThreadPoolExecutor(min(WORKERS, len(reads)), thread_name_prefix="manifest-ckpt-read") as pool:
            outcomes = list(pool.map(run, reads))
    failures = [o for o in outcomes if o is not None]
    if failures:
        raise ReadFailed(*min(failures, key=lambda f: f[0]))


def _split(size: int) -> list[tuple[int, int]]:
    """``(offset, size)`` segments: one per worker when large, each a whole number of pages."""
    if size < _SPLIT_MIN:
        return [(0, size)]
    step = -(-size // WORKERS // _PAGE) * _PAGE
    return [(at, min(step, size - at)) for at in range(0, size, step)]


def _writable(address: int, size: int) -> memoryview:
    """A writable byte view of ``size`` bytes of memory at ``address`` (no copy)."""
    return memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) while the block runs, then deliver it: the block always completes.

    Only the main thread receives ``KeyboardInterrupt``, so elsewhere nothing is changed; a
    handler that Python did not install (or ``SIG_IGN``/``SIG_DFL``) is left alone too. A
    Ctrl-C during the block runs the previous handler once the block is done (the default
    one raises ``KeyboardInterrupt``), so the interrupt is delayed, never lost.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    held: list[Any] = []

    def hold(signum: int, frame: Any) -> None:
        held.append(frame)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            previous(signal.SIGINT, held[0])
