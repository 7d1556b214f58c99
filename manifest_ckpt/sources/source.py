"""What every reader of a foreign format returns, and the helpers they share.

A :class:`SourceCheckpoint` holds the tensors found, the rest as JSON, and a record for
``lineage.source``. Source files are hashed on a background thread (:class:`Hashes`) so
hashing overlaps reading and writing; :func:`resolve` waits for the hashes.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from manifest_ckpt.errors import ConversionError
from manifest_ckpt.format.integrity import file_sha256, kind_of, os_reason
from manifest_ckpt.format.manifest import ModuleEntry

__all__ = ["Hashes", "Pending", "SourceCheckpoint", "check_source_kind", "json_number", "jsonable", "resolve"]


@dataclass(frozen=True)
class SourceCheckpoint:
    """What a foreign checkpoint holds, read without running any of its code.

    Attributes:
        tensors: the model's tensors by state-dict key, in the source's order; tensors
            that shared storage in the source share it here too.
        metadata: every non-tensor value the source held beside them, as JSON, or None.
        record: facts about the source for ``lineage.source``: file name (base name only),
            size, sha256, format, container, key, pickle globals, what was left out.
        modules: the module tree the source recorded (a manifest-ckpt checkpoint), or None.
        digest: the source's checkpoint digest (a manifest-ckpt checkpoint), recorded as
            the converted checkpoint's ``converted-from`` parent.
    """

    tensors: dict[str, torch.Tensor]
    metadata: Any
    record: dict[str, Any]
    modules: Mapping[str, ModuleEntry] | None = None
    digest: str | None = None


class Pending:
    """A source file's sha256 being computed on the hashing thread."""

    def __init__(self, future: Future[str], path: Path) -> None:
        self.future = future
        self.path = path


class Hashes:
    """Hash source files on a background thread, so hashing overlaps reading and writing."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="manifest-ckpt-sha256")

    def start(self, path: Path) -> Pending:
        return Pending(self._pool.submit(file_sha256, path), path)

    def close(self) -> None:
        # On success every hash was waited for; after a failure, do not wait on a large file.
        self._pool.shutdown(wait=False, cancel_futures=True)


def resolve(value: Any) -> Any:
    """``value`` with every pending hash replaced by its result.

    Raises:
        ConversionError: a source file could not be read while hashing it.
    """
    if isinstance(value, Pending):
        try:
            return value.future.result()
        except OSError as exc:
            where = str(value.path)
            raise ConversionError(f"{where}: could not read it to hash it ({exc})", file=where) from exc
    if isinstance(value, dict):
        return {k: resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v) for v in value]
    return value


def check_source_kind(path: Path) -> None:
    """Refuse a source that is neither a directory nor a regular file before anything opens it.

    Raises:
        ConversionError: missing, a FIFO, device or socket (reading could block forever), a
            link loop or an over-long name.
    """
    where = str(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConversionError(f"{where}: cannot read the source: {os_reason(exc)}", file=where) from None
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise ConversionError(
            f"{where}: is {kind_of(mode)}, not a checkpoint file or directory; refusing to read it "
            "(a pipe or device can block forever). Point at the real file.",
            file=where,
        )


def jsonable(value: Any) -> Any:
    """Already-parsed JSON made safe for ``allow_nan=False``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return json_number(value)
    return value


def json_number(value: bool | int | float | complex) -> Any:
    """A number as JSON; NaN and infinities (not JSON) as the strings JavaScript prints."""
    if isinstance(value, complex):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value
