"""Write a safetensors file exactly as the ``safetensors`` library lays it out, streaming the data.

``safetensors.torch.save_file`` copies every tensor into a ``bytes`` object before writing, so
exporting a shard through it holds the whole shard in memory twice. Here each tensor is
written straight from its (memory-mapped) source, one at a time. The layout is the
library's: tensors ordered by its dtype order (largest first), then by name, back to back;
the JSON header with ``__metadata__`` first, no spaces, padded with spaces to a multiple of
8 bytes. Metadata keys are sorted: the library writes them in hash order, so with more than
one key its own output differs from run to run, and ours must be deterministic.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch

from manifest_ckpt.errors import ExportError
from manifest_ckpt.format.dtypes import DTYPES, header_shape, nbytes

__all__ = ["OutTensor", "write_safetensors"]

# The safetensors library's Dtype enum order (0.4 to 0.8); files list tensors from the last
# one down. tests/test_export_hf.py checks this against the installed library.
LIBRARY_DTYPE_ORDER: Final = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
    "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)  # fmt: skip
_RANK: Final = {code: i for i, code in enumerate(LIBRARY_DTYPE_ORDER)}


@dataclass(frozen=True)
class OutTensor:
    """One tensor to write: its name, manifest dtype and shape, and how to get its values.

    ``values`` is called once, when the tensor's turn comes, so only one tensor's source is
    held at a time; it may return a view of a memory map.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    values: Callable[[], torch.Tensor]


def write_safetensors(path: Path, tensors: Sequence[OutTensor], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` to ``path`` in the library's layout (see the module docstring), then fsync.

    Raises:
        ExportError: a tensor's values do not have the dtype and shape announced, or a dtype
            safetensors cannot store; names the tensor.
    """
    ordered = sorted(tensors, key=lambda t: (-_RANK[_code(t)], t.name))
    doc: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for t in ordered:
        size = nbytes(t.dtype, t.shape)
        shape = header_shape(t.dtype, t.shape)
        if shape is None:
            raise ExportError(f"tensor {t.name!r}: a 0-dimensional {t.dtype} has no safetensors shape", file=str(path))
        doc[t.name] = {"dtype": DTYPES[t.dtype][0], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        for t in ordered:
            value = t.values()
            if str(value.dtype).removeprefix("torch.") != t.dtype or tuple(value.shape) != t.shape:
                raise ExportError(
                    f"tensor {t.name!r}: expected {t.dtype} {list(t.shape)}, its source gave "
                    f"{value.dtype} {list(value.shape)}",
                    file=str(path),
                )
            value = value.detach().contiguous()
            size = value.numel() * value.element_size()
            if size:
                # The tensor's memory is written as it is (no bytes copy; numpy is not needed).
                f.write((ctypes.c_ubyte * size).from_address(value.data_ptr()))
            del value
        f.flush()
        os.fsync(f.fileno())


def _code(t: OutTensor) -> str:
    if t.dtype not in DTYPES:
        raise ExportError(f"tensor {t.name!r}: dtype {t.dtype} cannot be stored in safetensors")
    return DTYPES[t.dtype][0]
