"""Dtype names used in manifests, with their safetensors codes and sizes (no torch import)."""

from __future__ import annotations

from typing import Final

# manifest dtype name -> (safetensors dtype code, bytes per element).
# The manifest uses torch's names; safetensors headers use the codes.
DTYPES: Final[dict[str, tuple[str, int]]] = {
    "bool": ("BOOL", 1),
    "uint8": ("U8", 1),
    "int8": ("I8", 1),
    "int16": ("I16", 2),
    "uint16": ("U16", 2),
    "int32": ("I32", 4),
    "uint32": ("U32", 4),
    "int64": ("I64", 8),
    "uint64": ("U64", 8),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float32": ("F32", 4),
    "float64": ("F64", 8),
    "complex64": ("C64", 8),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e4m3fnuz": ("F8_E4M3FNUZ", 1),
    "float8_e5m2": ("F8_E5M2", 1),
    "float8_e5m2fnuz": ("F8_E5M2FNUZ", 1),
}

CODE_TO_NAME: Final[dict[str, str]] = {code: name for name, (code, _) in DTYPES.items()}


def itemsize(dtype: str) -> int:
    """Bytes per element of a manifest dtype name."""
    return DTYPES[dtype][1]


def nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Exact byte size of a dense tensor; Python ints, so a huge shape never allocates."""
    count = 1
    for dim in shape:
        count *= dim
    return count * itemsize(dtype)


def describe(dtype: str, shape: tuple[int, ...] | list[int]) -> str:
    """A compact human form such as ``float32[768, 3072]``."""
    return f"{dtype}[{', '.join(str(d) for d in shape)}]"
