"""Property: build_header's text is exactly json.dumps of the header document (sorted keys, compact, ASCII)."""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from manifest_ckpt.errors import IntegrityError
from manifest_ckpt.format.binding import Piece, content_digest, file_problems, is_written_header
from manifest_ckpt.format.dtypes import DTYPES, PACKED, header_shape, nbytes
from manifest_ckpt.format.safetensors_header import METADATA_KEY, build_header, parse_header, written_metadata

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


_dtype_names = sorted(set(DTYPES) - set(PACKED))
_layout = st.lists(
    st.tuples(
        st.text(alphabet="ab._0_Z\"\\é", min_size=1, max_size=5).filter(lambda n: n != METADATA_KEY),
        st.sampled_from(_dtype_names),
        st.lists(st.integers(min_value=0, max_value=3), max_size=2).map(tuple),
        st.sampled_from(["sha256:" + c * 64 for c in "0af"]),
    ),
    max_size=6,
    unique_by=lambda t: t[0],
)
_mutation = st.sampled_from(["none", "shape", "dtype", "shift", "digest", "drop", "rename", "size", "order", "twice"])


def _full_check_passes(raw: bytes, file_size: int, pieces: list[Piece]) -> bool:
    """The strict path: parse the header, then every binding rule (on tuples, as bind gives them)."""
    pieces = [p._replace(shape=tuple(p.shape), byte_range=(p.byte_range[0], p.byte_range[1])) for p in pieces]
    try:
        header = parse_header(raw + b"\0" * (file_size - len(raw)), file_size, file="w")
    except IntegrityError:
        return False
    return not list(file_problems(header, file_size, pieces, field="$"))


@given(_layout, _mutation, st.data())
def test_the_written_header_fast_path_accepts_exactly_what_the_full_check_accepts(
    layout: list[tuple[str, str, tuple[int, ...], str]], mutation: str, data: st.DataObject
) -> None:
    """is_written_header is True only where parse_header and file_problems find nothing, for the
    writer's header and pieces changed in one way (shape, dtype, range, digest, key, order, a duplicate)."""
    # The writer's layout: largest element size first, each piece aligned.
    layout = sorted(layout, key=lambda t: -DTYPES[t[1]][1])
    raw, ranges = build_header(
        [(k, d, s) for k, d, s, _ in layout], written_metadata(content_digest([(k, g) for k, _, _, g in layout]))
    )
    size = ranges[-1][1] if ranges else len(raw)
    # As binding gets them: a whole tensor's shape and range are its JSON entry's lists, a chunk's tuples.
    pieces = [
        Piece(k, d, s, r, g, "") if i % 2 else tuple.__new__(Piece, (k, d, list(s), list(r), g, ""))
        for i, ((k, d, s, g), r) in enumerate(zip(layout, ranges))
    ]
    if pieces and mutation != "none":
        i = data.draw(st.integers(0, len(pieces) - 1))
        p = pieces[i]
        changed = {
            "shape": lambda: p._replace(shape=(*p.shape, 1)),
            "dtype": lambda: p._replace(dtype=data.draw(st.sampled_from(_dtype_names))),
            "shift": lambda: p._replace(byte_range=(p.byte_range[0] + 1, p.byte_range[1] + 1)),
            "digest": lambda: p._replace(digest="sha256:" + "e" * 64),
            "rename": lambda: p._replace(key=p.key + "x"),
            "size": lambda: p._replace(byte_range=(p.byte_range[0], p.byte_range[1] + 8)),
        }
        if mutation == "drop":
            del pieces[i]
        elif mutation == "order":
            pieces.reverse()
        elif mutation == "twice":
            pieces.append(p)
        else:
            pieces[i] = changed[mutation]()
    fast = is_written_header(raw, size, pieces)
    assert fast == _full_check_passes(raw, size, pieces)
    if mutation == "none":
        assert fast
    record_example()
