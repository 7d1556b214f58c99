"""Plain copies: stored bytes moved straight from a mapped weights file into module tensors, in bulk.

A copy is *plain* when a whole stored tensor goes, as its bytes, into a contiguous CPU tensor
of the same dtype and size (a plain ``Tensor`` or ``Parameter``, not an inference tensor or a
lazily conjugated or negated view) from a memory-mapped file whose size and header ``load``
has already bound to the manifest. It is one ``memmove``, which raises nothing: no
allocation, no kernel, no cast. (A file truncated by another process *after* binding makes
the read fault with SIGBUS and ends the process, as for every memory-mapped reader.)

That is what lets ``load`` stay all or nothing without a second copy of the model in memory:
the copies that can fail (casts, other devices, chunks, non-contiguous targets, transforms)
run first and are undone on failure; the plain ones run last, with Ctrl-C held until the
module is complete (:func:`interrupts_held`), so they need no saved bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import torch
from torch import nn

from manifest_ckpt.format.integrity import WORKERS

__all__ = ["copy_all", "interrupts_held", "is_plain_target"]

# Copies at least this large are split across WORKERS threads (memmove releases the GIL):
# one core does not saturate memory bandwidth, and the source pages fault in on both.
_SPLIT_MIN = 8 << 20
_PAGE = 4096
_memmove = ctypes.memmove
PLAIN_TYPES: Final = (torch.Tensor, nn.Parameter)
# A plain copy: the target (its version counter is bumped), its address, the source address, bytes.
Job = tuple[torch.Tensor, int, int, int]


def is_plain_target(t: torch.Tensor) -> bool:
    """Whether ``t``'s bytes can be written directly (and its version counter bumped)."""
    return type(t) in PLAIN_TYPES and t.is_cpu and t.is_contiguous() and not (
        t.is_inference() or t.is_conj() or t.is_neg()
    )


def copy_all(jobs: Sequence[Job]) -> None:
    """Copy each job's bytes from its source address into its plain target, in order.

    Large copies are split across threads; every target's version counter is bumped, as
    ``copy_`` does, so autograd still sees an in-place change.
    """
    large: list[tuple[int, int, int]] = []
    for _, dst, src, size in jobs:
        if size >= _SPLIT_MIN:
            large.append((dst, src, size))
        elif size:
            _memmove(dst, src, size)
    if large:
        segments = [piece for job in large for piece in _split(*job)]
        with ThreadPoolExecutor(min(WORKERS, len(segments)), thread_name_prefix="manifest-ckpt-copy") as pool:
            for _ in pool.map(_copy_segment, segments):
                pass
    torch._C._increment_version([job[0] for job in jobs])


def _split(dst: int, src: int, size: int) -> list[tuple[int, int, int]]:
    """One segment per worker, each a whole number of pages long."""
    step = -(-size // WORKERS // _PAGE) * _PAGE
    return [(dst + at, src + at, min(step, size - at)) for at in range(0, size, step)]


def _copy_segment(segment: tuple[int, int, int]) -> None:
    _memmove(*segment)


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
