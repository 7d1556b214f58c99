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
    "float8_e8m0fnu": ("F8_E8M0", 1),
    # Two 4-bit values per byte. torch's shape counts bytes; a safetensors header counts
    # 4-bit elements, so its last dimension is twice torch's (see header_shape).
    "float4_e2m1fn_x2": ("F4", 1),
}

# Dtypes whose safetensors shape counts packed sub-byte elements: name -> elements per byte.
PACKED: Final[dict[str, int]] = {"float4_e2m1fn_x2": 2}

CODE_TO_NAME: Final[dict[str, str]] = {code: name for name, (code, _) in DTYPES.items()}


def itemsize(dtype: str) -> int:
    """Bytes per element of a manifest dtype name."""
    return DTYPES[dtype][1]


def header_shape(dtype: str, shape: tuple[int, ...] | list[int]) -> list[int] | None:
    """The shape a safetensors header records for a tensor of torch ``shape``; None if it has none.

    Equal to ``shape`` except for packed dtypes, whose last dimension counts sub-byte
    elements; a packed scalar has no safetensors shape.
    """
    per_byte = PACKED.get(dtype)
    if per_byte is None:
        return list(shape)
    if not shape:
        return None
    return [*shape[:-1], shape[-1] * per_byte]


def torch_shape(dtype: str, shape: list[int]) -> tuple[int, ...] | None:
    """The torch shape of a safetensors header's ``shape``; None if torch cannot hold it packed."""
    per_byte = PACKED.get(dtype)
    if per_byte is None:
        return tuple(shape)
    if not shape or shape[-1] % per_byte:
        return None
    return (*shape[:-1], shape[-1] // per_byte)


def nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Exact byte size of a dense tensor; Python ints, so a huge shape never allocates."""
    count = 1
    for dim in shape:
        count *= dim
    return count * itemsize(dtype)


def describe(dtype: str, shape: tuple[int, ...] | list[int]) -> str:
    """A compact human form such as ``float32[768, 3072]``."""
    return f"{dtype}[{', '.join(str(d) for d in shape)}]"
