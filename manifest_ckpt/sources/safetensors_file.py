"""A lone ``.safetensors`` file, parsed by our own header parser over a memory map."""

from __future__ import annotations

import mmap
import os
import struct
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from manifest_ckpt.errors import ConversionError, IntegrityError
from manifest_ckpt.format.dtypes import itemsize
from manifest_ckpt.format.integrity import open_regular
from manifest_ckpt.format.safetensors_header import MAX_HEADER_BYTES, Header, parse_header
from manifest_ckpt.sources.source import Hashes, SourceCheckpoint

__all__ = ["looks_like_safetensors", "read_safetensors_file", "read_single_safetensors"]


def looks_like_safetensors(path: Path) -> bool:
    """By name, or by content: an 8-byte little-endian header length followed by ``{``."""
    if path.name.endswith(".safetensors"):
        return True
    try:
        with open_regular(path, what="a checkpoint file", error=lambda message: ConversionError(message)) as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except (OSError, ConversionError):
        return False  # read_torch_file reports the problem
    if len(head) < 9 or head[8:9] != b"{":
        return False
    length: int = struct.unpack("<Q", head[:8])[0]
    return 2 <= length <= min(MAX_HEADER_BYTES, size - 8)


def _open_regular(path: Path, what: str) -> tuple[int, mmap.mmap]:
    """Size and a private read-only-in-practice map of a regular, non-empty file."""
    where = str(path)
    try:
        with open_regular(path, what=f"a {what}", error=lambda message: ConversionError(message, file=where)) as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ConversionError(
                    f"{where}: {size} bytes, too short for a {what} (8-byte header length, JSON header, data); "
                    "it is truncated or not a safetensors file",
                    file=where,
                )
            # ACCESS_COPY: torch wants a writable buffer; pages are never written back to the file.
            return size, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError as exc:
        raise ConversionError(f"{where}: cannot read the {what} ({exc.strerror})", file=where) from None


def read_safetensors_file(path: Path, hashes: Hashes) -> tuple[dict[str, torch.Tensor], Header, dict[str, Any]]:
    """Tensors of one safetensors file, mapped from disk, after checking every header entry.

    Returns:
        The tensors (sorted by key), the parsed header, and ``{file, size, sha256}`` (the
        hash pending on ``hashes``).

    Raises:
        ConversionError: truncated file, lying header (offsets outside the data, sizes
            that do not fit dtype and shape, overlapping tensors), or no tensors.
    """
    where = str(path)
    size, mapping = _open_regular(path, "safetensors file")
    digest = hashes.start(path)
    (length,) = struct.unpack("<Q", mapping[:8])
    prefix = mapping[: 8 + min(length, MAX_HEADER_BYTES, size - 8)]
    try:
        header = parse_header(prefix, size, file=where)
    except IntegrityError as exc:
        raise ConversionError(f"{exc} (read as a safetensors file)", file=where) from None
    if not header.entries:
        raise ConversionError(f"{where}: the safetensors file holds no tensors; nothing to convert", file=where)
    spans = sorted((e.byte_range, k) for k, e in header.entries.items() if e.byte_range[0] != e.byte_range[1])
    for (before, first), (after, second) in pairwise(spans):
        if after[0] < before[1]:
            raise ConversionError(
                f"{where}: header entries {first!r} (bytes {before[0]}-{before[1]}) and {second!r} (bytes "
                f"{after[0]}-{after[1]}) overlap; a safetensors file stores each tensor in its own bytes. "
                "The file is corrupt or hand-made; re-save it.",
                file=where,
            )
    data = torch.frombuffer(mapping, dtype=torch.uint8)
    tensors = {}
    for key in sorted(header.entries):
        entry = header.entries[key]
        start, end = entry.byte_range
        raw = data[start:end]
        if start % itemsize(entry.dtype):
            raw = raw.clone()  # an unaligned tensor (foreign writer) cannot be viewed in place
        tensors[key] = raw.view(getattr(torch, entry.dtype)).view(entry.shape)
    return tensors, header, {"file": path.name, "size": size, "sha256": digest}


def read_single_safetensors(path: Path, hashes: Hashes) -> SourceCheckpoint:
    """One ``.safetensors`` file: its tensors; its ``__metadata__`` strings become metadata."""
    tensors, header, facts = read_safetensors_file(path, hashes)
    metadata = {"safetensors_metadata": dict(header.metadata)} if header.metadata else None
    record = {**facts, "format": "safetensors", "container": "state-dict", "key": None, "left_out": []}
    return SourceCheckpoint(tensors, metadata, record)
