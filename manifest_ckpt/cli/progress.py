"""A minimal progress bar on stderr, shown only when it is a terminal (no torch import)."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO


class Progress:
    """Count work done out of a total; draws at most ten times a second, only on a TTY.

    Silent when the stream is not a terminal (pipes, CI logs, tests) or when ``enabled`` is
    False, so callers can always report progress without checking.
    """

    def __init__(
        self, label: str, total: int, *, stream: TextIO | None = None, enabled: bool = True, unit: str = "B"
    ) -> None:
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.active = enabled and bool(isatty and isatty())
        self._last = 0.0
        self._started = time.monotonic()

    def advance(self, amount: int) -> None:
        self.done += amount
        now = time.monotonic()
        if self.active and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        fraction = self.done / self.total if self.total else 1.0
        width = 30
        bar = "#" * int(fraction * width)
        rate = self.done / max(now - self._started, 1e-9)
        amount = _human(self.done, self.unit) + "/" + _human(self.total, self.unit)
        speed = f"{_human(int(rate), self.unit)}/s"
        self.stream.write(f"\r{self.label} [{bar:<{width}}] {fraction:6.1%} {amount} {speed}   ")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.active:
            self.stream.write("\n")
            self.stream.flush()


def _human(n: int, unit: str) -> str:
    if unit != "B":
        return f"{n}"
    value = float(n)
    for suffix in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or suffix == "TB":
            return f"{value:.0f} {suffix}" if suffix == "B" else f"{value:.1f} {suffix}"
        value /= 1000
    return f"{n} B"


def human_bytes(n: int) -> str:
    """``1.2 GB`` style sizes (powers of 1000, as disks and network speeds are quoted)."""
    return _human(n, "B")
