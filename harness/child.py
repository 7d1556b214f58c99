"""Bound one case in time (a forked child, or an alarm in this process), so that a hang is an outcome, not a stall."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any


def in_child(work: Callable[[], str], timeout: float, *, quiet: bool = False) -> str:
    """Run ``work`` in a forked child; the line it returns, ``hang`` (killed at ``timeout``) or ``crash``.

    An exception escaping ``work`` becomes ``untyped <Type>: <message>``. ``quiet`` sends the
    child's stdio to /dev/null (payloads that print).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(read_end)
        if quiet:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
        try:
            line = work()
        except BaseException as exc:  # noqa: BLE001 - every failure is an outcome to report
            line = f"untyped {type(exc).__name__}: {str(exc)[:200]}"
        os.write(write_end, line.encode()[:60000])
        os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            return "hang"
        time.sleep(0.001)
    with os.fdopen(read_end, "rb") as pipe:
        line = pipe.read().decode()
    return line or "crash"


class Hang(Exception):
    """Raised inside :func:`time_limit` when its time runs out."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in this (main) thread once ``seconds`` have passed (SIGALRM; no-op on Windows)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    if not hasattr(signal, "setitimer"):  # pragma: no cover - Windows: no interval timer
        yield
        return
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
