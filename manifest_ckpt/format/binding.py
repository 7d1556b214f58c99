"""The rules that bind a weights file's header to the manifest (no torch import).

A reader checks them on every weights file it opens, before any tensor byte is copied, by
reading the header only. They make ``files[...].size`` and ``.header_sha256`` redundant for
identity: everything a header states (entries, byte layout, content digest) must follow from
the manifest's tensor entries, whose digests the checkpoint ``digest`` covers. A file that
passes holds exactly the pieces the manifest lists, each aligned to its element size, tiling
the data section with no gap, overlap or trailing byte, and its header's content digest is
the one the manifest's tensor digests give.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from manifest_ckpt.format import canonical
from manifest_ckpt.format.dtypes import DTYPES, PACKED, describe, header_shape, itemsize
from manifest_ckpt.format.safetensors_header import (
    CONTENT_KEY,
    MAX_HEADER_BYTES,
    METADATA_KEY,
    Header,
    Record,
    frame_header,
    written_metadata,
)

# The digest of zero bytes: an empty header entry the manifest leaves out holds this.
EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()


class Piece(NamedTuple):
    """What the manifest says one file holds for one tensor (a whole tensor or a chunk).

    A named tuple, not a dataclass: binding builds one per tensor, 100,000 for a large
    mixture-of-experts checkpoint, and a tuple is built several times faster.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    byte_range: tuple[int, int]
    digest: str
    field: str
    """The piece's JSON path in the manifest; ``""`` for a whole tensor (``$.tensors["key"]``),
    formatted only when a problem names it."""

    @property
    def at(self) -> str:
        return self.field or f'$.tensors["{self.key}"]'


def content_digest(pairs: Iterable[tuple[str, str]]) -> str:
    """A weights file's content digest: sha256 of its sorted ``[key, tensor digest]`` pairs."""
    return "sha256:" + hashlib.sha256(canonical.compact(sorted(pairs))).hexdigest()


def is_written_header(raw: bytes, file_size: int, pieces: Sequence[Piece]) -> bool:
    """Whether ``raw`` is, byte for byte, the header manifest-ckpt's writer makes for ``pieces``.

    Such a header lists exactly these pieces, back to back from the end of the header to the
    end of the file, with the content digest their tensor digests give: when the pieces' byte
    ranges are that layout and each is aligned, every rule of :func:`file_problems` holds,
    without parsing a header of 100,000 entries. Anything else (another writer's header, any
    disagreement) gives False, and the caller parses the header and lists the problems.

    The header is rebuilt from the pieces' own byte ranges (relative to the end of ``raw``),
    in one pass in the pieces' order (a manifest's is key order, the header's too), and the
    ranges are then checked to be the writer's layout: each one its dtype and shape's size
    and aligned to its element size, all of them tiling the data with no gap or overlap.
    """
    data_start = len(raw)
    if data_start - 8 > MAX_HEADER_BYTES:
        return False
    records: dict[str, Record | None] = {}
    pairs: list[tuple[str, str]] = []
    spans: list[tuple[int, int]] = []
    placed = False
    prod = math.prod
    for key, dtype, shape, span, digest, _ in pieces:
        start, end = span
        code_size = DTYPES.get(dtype)
        if code_size is None:
            return False
        code, item = code_size
        stored = shape if dtype not in PACKED else header_shape(dtype, shape)
        if stored is None or start % item or end - start != item * prod(shape):
            return False  # a packed scalar, a misaligned or missized piece: the full check names it
        if not placed and key >= METADATA_KEY:  # the metadata's place in key order
            if key == METADATA_KEY:
                return False  # a tensor named like the metadata: the full check names it
            records[METADATA_KEY] = None
            placed = True
        records[key] = Record((start - data_start, end - data_start), code, stored)
        pairs.append((key, digest))
        spans.append((start, end))  # a JSON entry's list or a chunk's tuple: one kind to sort
    if len(records) - placed != len(pieces):
        return False  # a key given twice
    # Back to back from the end of the header to the end of the file: sorted, each span ends
    # where the next starts: [header end, s0, e0, s1, e1, ..., file size] pairs up equal.
    bounds = [data_start, *itertools.chain.from_iterable(sorted(spans)), file_size]
    if bounds[::2] != bounds[1::2]:
        return False
    return frame_header(records, written_metadata(content_digest(pairs))) == raw


def file_problems(
    header: Header, file_size: int, pieces: Sequence[Piece], *, field: str
) -> Iterator[tuple[str, str]]:
    """Yield ``(json path, message)`` for every way ``header`` disagrees with ``pieces``.

    Args:
        header: the file's parsed header (``parse_header`` already bounded every offset).
        file_size: the file's size in bytes.
        pieces: the manifest's pieces stored in this file.
        field: the file's JSON path in the manifest (``$.files["name"]``), for problems of
            the file as a whole.
    """
    entries = header.entries
    by_key = {p.key: p for p in pieces}
    pairs: list[tuple[str, str]] = []
    spans: list[tuple[int, int, str]] = []
    for p in pieces:
        e = entries.get(p.key)
        stated = f"{describe(p.dtype, p.shape)} at {list(p.byte_range)}"
        if e is None:
            yield p.at, f"says the file holds {stated}, its header has no entry {p.key!r}"
        elif e.dtype != p.dtype or e.shape != p.shape or e.byte_range != p.byte_range:
            found = f"{describe(e.dtype, e.shape)} at {list(e.byte_range)}"
            yield p.at, f"says {stated}, the file's header says {found}"
        start, end = p.byte_range
        if start % itemsize(p.dtype):
            yield p.at, (
                f"starts at byte {start}, not a multiple of {p.dtype}'s {itemsize(p.dtype)}-byte element size "
                "(manifest-ckpt writers align every tensor)"
            )
        pairs.append((p.key, p.digest))
        spans.append((start, end, p.key))
    for key, e in entries.items():
        if key in by_key:
            continue
        start, end = e.byte_range
        if end > start:
            yield field, f"header lists {key!r} ({end - start} bytes), which the manifest does not list"
            spans.append((start, end, key))
        else:
            # An empty piece holds nothing; the distributed writer leaves such chunks out.
            pairs.append((key, EMPTY_DIGEST))
    yield from _tiling_problems(header.data_start, file_size, spans, field)
    claimed = header.metadata.get(CONTENT_KEY)
    expected = content_digest(pairs)
    if claimed != expected:
        yield field, (
            f"header content digest is {claimed!r}, the manifest's tensor digests give {expected}: the file holds "
            "other tensors than the manifest describes"
        )


def _tiling_problems(
    data_start: int, file_size: int, spans: list[tuple[int, int, str]], field: str
) -> Iterator[tuple[str, str]]:
    """The data section must be tiled exactly: no gap, no overlap, no trailing byte."""
    cursor = data_start
    for start, end, key in sorted(spans):
        if start > cursor:
            yield field, f"bytes {cursor}-{start} before {key!r} belong to no tensor"
        elif start < cursor:
            yield field, f"{key!r} at [{start}, {end}) overlaps the tensor before it (which ends at {cursor})"
        cursor = max(cursor, end)
    if cursor != file_size:
        yield field, f"bytes {cursor}-{file_size} at the end of the file belong to no tensor"
