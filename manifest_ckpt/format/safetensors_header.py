"""The safetensors container: build and parse headers defensively (no torch import).

A safetensors file is an 8-byte little-endian header length, a JSON header, then the data.
Headers we write are padded with spaces to a multiple of 8 bytes and list tensors in data
order (largest element size first), so every tensor starts aligned to its element size.
"""

from __future__ import annotations

import json
import math
import operator
import reprlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from manifest_ckpt.errors import IntegrityError, UnsupportedTensorError
from manifest_ckpt.format import jsonio
from manifest_ckpt.format.dtypes import CODE_TO_NAME, DTYPES, PACKED, header_shape, nbytes, torch_shape

# Same bound as the safetensors reference implementation: a header this large is hostile.
MAX_HEADER_BYTES: Final = 100_000_000
METADATA_KEY: Final = "__metadata__"
CONTENT_KEY: Final = "manifest_ckpt.content_digest"


@dataclass(frozen=True)
class HeaderEntry:
    """A tensor as a safetensors header lists it; ``byte_range`` is absolute in the file."""

    dtype: str
    shape: tuple[int, ...]
    byte_range: tuple[int, int]


@dataclass(frozen=True)
class Header:
    """A parsed header: its raw bytes (length prefix included), entries and metadata."""

    raw: bytes
    entries: Mapping[str, HeaderEntry]
    metadata: Mapping[str, str]

    @property
    def data_start(self) -> int:
        return len(self.raw)


class Record(msgspec.Struct, gc=False):
    """A header entry as written: msgspec writes its fields in this (sorted) order, as
    ``json.dumps(sort_keys=True)`` writes the entry's object. ``data_offsets`` are relative to
    the end of the header. Not tracked by the GC: a header of 100,000 entries builds 100,000."""

    data_offsets: tuple[int, int]
    dtype: str
    shape: Sequence[int]


def build_header(
    tensors: Sequence[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str]
) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes for tensors laid out back to back in the given order.

    Args:
        tensors: ``(name, manifest dtype, shape)`` in data order.
        metadata: string-to-string ``__metadata__``.

    Returns:
        The header (length prefix, JSON, space padding) and each tensor's absolute byte range.
    """
    records: dict[str, Record | None] = {}
    offset = 0
    relative = []
    prod = math.prod
    for name, dtype, shape in tensors:
        code, item = DTYPES[dtype]
        stored = shape if dtype not in PACKED else header_shape(dtype, shape)
        if stored is None:
            raise UnsupportedTensorError(
                f"tensor {name!r}: a 0-dimensional {dtype} has no safetensors shape (it counts 4-bit elements); "
                "reshape it to [1] before saving"
            )
        end = offset + item * prod(shape)
        records[name] = Record((offset, end), code, stored)
        relative.append((offset, end))
        offset = end
    raw = frame_header(records, metadata)
    start = len(raw)
    return raw, [(start + a, start + b) for a, b in relative]


_encode: Final = msgspec.json.Encoder().encode


def frame_header(records: Mapping[str, Record | None], metadata: Mapping[str, str]) -> bytes:
    """The header bytes of ``records`` (by tensor name) and ``metadata``: length prefix, JSON, space padding.

    The JSON text is ``json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``
    of ``{name: {"data_offsets", "dtype", "shape"}, "__metadata__": metadata}`` (the metadata
    left out when empty). msgspec writes it when the names are in key order and the text
    needs no escape (an ASCII name without quote, backslash or control character), the case
    of every header this library writes; otherwise ``json.dumps`` does (the tests compare
    both). ``records`` may hold ``None`` under ``"__metadata__"`` to place the metadata in
    key order (binding builds its records in key order); a tensor named so is overwritten,
    as in a JSON object.
    """
    doc: dict[str, Any] = dict(records)
    if metadata:
        doc[METADATA_KEY] = dict(sorted(metadata.items()))  # in its place, or last
    else:
        doc.pop(METADATA_KEY, None)
    names = list(doc)
    if not all(map(operator.lt, names, names[1:])):
        doc = {name: doc[name] for name in sorted(names)}
    body = _encode(doc)
    if b"\\" in body or b"\x7f" in body or not body.isascii():
        plain = {k: v if type(v) is dict else msgspec.structs.asdict(v) for k, v in doc.items()}
        body = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    body += b" " * (-(len(body) + 8) % 8)
    return struct.pack("<Q", len(body)) + body


def written_metadata(content_digest: str) -> dict[str, str]:
    """The ``__metadata__`` manifest-ckpt's writer puts in a header (and binding expects)."""
    return {"format": "pt", CONTENT_KEY: content_digest}


def parse_header(prefix: bytes, file_size: int, *, file: str) -> Header:
    """Parse and check a header from the file's first bytes.

    Args:
        prefix: at least the first ``8 + header length`` bytes of the file (more is fine).
        file_size: the file's size, to bound every offset.
        file: the name used in error messages.

    Raises:
        IntegrityError: truncated file, oversized or lying header, offsets outside the data.
    """
    if file_size < 8 or len(prefix) < 8:
        raise IntegrityError(f"{file}: {file_size} bytes, too short for a safetensors file (truncated?)", file=file)
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise IntegrityError(
            f"{file}: header claims {length} bytes but the file has {file_size}; the file is truncated "
            "or its header is corrupt. Restore it from a good copy.",
            file=file,
        )
    if len(prefix) < 8 + length:
        raise IntegrityError(f"{file}: header is truncated", file=file)
    raw = bytes(prefix[: 8 + length])
    doc = jsonio.loads(
        raw[8:],
        where=f"{file}: header",
        what="a safetensors header (the file is corrupt or hand-made; restore it from a good copy)",
        error=lambda message: IntegrityError(message, file=file),
    )
    if not isinstance(doc, dict):
        raise IntegrityError(f"{file}: header is not a JSON object", file=file)
    metadata = doc.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise IntegrityError(f"{file}: header {METADATA_KEY} must map strings to strings", file=file)
    entries = {}
    data_size = file_size - len(raw)
    for name, entry in doc.items():
        entries[name] = _parse_entry(name, entry, data_size, len(raw), file)
    return Header(raw, entries, metadata)


def _brief(value: Any) -> str:
    """A short repr that neither recurses deeply nor prints megabytes."""
    return reprlib.repr(value)


def _parse_entry(name: str, entry: Any, data_size: int, data_start: int, file: str) -> HeaderEntry:
    def bad(what: str) -> IntegrityError:  # values in ``what`` go through _brief: they may be huge or deep
        return IntegrityError(f"{file}: header entry {name!r}: {what}; the file is corrupt", file=file, key=name)

    if not isinstance(entry, dict):
        raise bad("not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in CODE_TO_NAME:  # a list or dict is not even hashable
        raise bad(f"unknown dtype {_brief(code)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape {_brief(shape)} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise bad(f"data_offsets {_brief(offsets)} lie outside the {data_size} data bytes")
    dtype = CODE_TO_NAME[code]
    held = torch_shape(dtype, shape)
    if held is None:
        raise bad(
            f"{code} shape {shape} has no whole-byte torch shape ({dtype} packs two values a byte, so the "
            "last dimension must be even)"
        )
    if offsets[1] - offsets[0] != nbytes(dtype, held):
        raise bad(f"data_offsets span {offsets[1] - offsets[0]} bytes, {dtype}{shape} needs {nbytes(dtype, held)}")
    return HeaderEntry(dtype, held, (data_start + offsets[0], data_start + offsets[1]))
