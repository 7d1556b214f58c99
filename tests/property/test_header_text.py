"""Property: build_header's text is exactly json.dumps of the header document (sorted keys, compact, ASCII)."""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from manifest_ckpt.format.dtypes import DTYPES, PACKED, header_shape, nbytes
from manifest_ckpt.format.safetensors_header import METADATA_KEY, build_header

from .strategies import record_example

_names = st.text(min_size=1, max_size=12).filter(lambda n: n != METADATA_KEY)
_tensor = st.tuples(
    _names,
    st.sampled_from(sorted(DTYPES)),
    st.lists(st.integers(min_value=0, max_value=3000), max_size=4).map(tuple),
).filter(lambda t: t[1] not in PACKED or len(t[2]) > 0)


def _reference(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The header as json.dumps writes it: what build_header wrote before it was sped up."""
    doc: dict[str, Any] = {METADATA_KEY: dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in tensors:
        size = nbytes(dtype, shape)
        doc[name] = {"dtype": DTYPES[dtype][0], "shape": header_shape(dtype, shape), "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    body += b" " * (-(len(body) + 8) % 8)
    return struct.pack("<Q", len(body)) + body


@given(
    st.lists(_tensor, max_size=8, unique_by=lambda t: t[0]),
    st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=3),
)
def test_build_header_writes_the_json_dumps_text(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> None:
    record_example()
    raw, _ = build_header(tensors, metadata)
    assert raw == _reference(tensors, metadata)
