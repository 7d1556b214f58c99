"""Tests of ``manifest_ckpt.format.safetensors_header``: headers we build, and lying headers we refuse."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open

from manifest_ckpt.errors import IntegrityError, ManifestCkptError
from manifest_ckpt.format.dtypes import DTYPES, itemsize, nbytes
from manifest_ckpt.format.safetensors_header import (
    CONTENT_KEY,
    MAX_HEADER_BYTES,
    METADATA_KEY,
    HeaderEntry,
    build_header,
    parse_header,
)

NAME = "ckpt/weights-0123456789abcdef.safetensors"


def pattern_bytes(dtype: str, shape: tuple[int, ...], seed: int) -> bytes:
    """Deterministic bytes for a tensor; bools are 0/1 so that every reader accepts them."""
    n = nbytes(dtype, shape)
    if dtype == "bool":
        return bytes((i + seed) % 2 for i in range(n))
    return bytes((i * 7 + seed) % 251 for i in range(n))


def write(
    path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, list[tuple[int, int]], bytes]:
    """Write a safetensors file with build_header; return the header, the ranges and the whole file."""
    raw, ranges = build_header(tensors, metadata)
    blob = raw + b"".join(pattern_bytes(dtype, shape, i) for i, (_, dtype, shape) in enumerate(tensors))
    path.write_bytes(blob)
    return raw, ranges, blob


def header_file(doc: Any, data: bytes = b"", *, raw_json: bytes | None = None) -> bytes:
    """A safetensors file with the given header document (or raw header bytes) and data."""
    body = raw_json if raw_json is not None else json.dumps(doc).encode()
    return struct.pack("<Q", len(body)) + body + data


def refused(blob: bytes, *, size: int | None = None, key: str | None = None) -> IntegrityError:
    """parse_header raises IntegrityError naming the file (and the key, when given)."""
    with pytest.raises(IntegrityError) as info:
        parse_header(blob, len(blob) if size is None else size, file=NAME)
    exc = info.value
    assert exc.file == NAME
    assert str(exc).startswith(NAME + ": ")
    assert exc.key == key
    if key is not None:
        assert f"header entry {key!r}: " in str(exc)
    return exc


# -- build_header ------------------------------------------------------------------------------


def test_header_is_padded_to_a_multiple_of_eight() -> None:
    """The length prefix plus the JSON is a multiple of 8 bytes, padded with spaces, for any key lengths."""
    for n in range(1, 17):
        raw, _ = build_header([("k" * n, "uint8", (n,))], {"a": "b" * n})
        (length,) = struct.unpack("<Q", raw[:8])
        assert length == len(raw) - 8
        assert len(raw) % 8 == 0
        body = raw[8:]
        assert body.rstrip(b" ") == body.strip()
        assert json.loads(body)["k" * n]["data_offsets"] == [0, n]


def test_ranges_are_absolute_and_back_to_back() -> None:
    """Each tensor's range starts where the previous one ends, counted from the start of the file."""
    tensors = [
        ("a", "float64", (2, 2)),
        ("b", "float32", (3,)),
        ("c", "int16", ()),
        ("d", "uint8", (0, 5)),
        ("e", "bool", (3,)),
    ]
    raw, ranges = build_header(tensors, {})
    start = len(raw)
    assert ranges == [
        (start, start + 32),
        (start + 32, start + 44),
        (start + 44, start + 46),
        (start + 46, start + 46),
        (start + 46, start + 49),
    ]
    doc = json.loads(raw[8:])
    assert doc["a"] == {"dtype": "F64", "shape": [2, 2], "data_offsets": [0, 32]}
    assert doc["d"] == {"dtype": "U8", "shape": [0, 5], "data_offsets": [46, 46]}
    assert METADATA_KEY not in doc


def test_tensors_in_decreasing_element_size_are_aligned() -> None:
    """Listed largest element size first (as the writer does), every tensor starts at a multiple of its element size."""
    tensors = sorted(((f"t.{name}", name, (3,)) for name in DTYPES), key=lambda t: -itemsize(t[1]))
    _, ranges = build_header(tensors, {"x": "y"})
    for (_, dtype, _), (start, end) in zip(tensors, ranges):
        assert start % itemsize(dtype) == 0
        assert end - start == 3 * itemsize(dtype)


def test_metadata_is_written_as_strings() -> None:
    """__metadata__ holds the given string mapping (the content digest lives there)."""
    raw, _ = build_header([("w", "float32", (1,))], {CONTENT_KEY: "sha256:" + "0" * 64, "b": "2"})
    assert json.loads(raw[8:])[METADATA_KEY] == {CONTENT_KEY: "sha256:" + "0" * 64, "b": "2"}


def test_build_header_is_deterministic() -> None:
    """The same tensors and metadata give identical bytes (sorted JSON keys, fixed separators)."""
    one = build_header([("b", "float32", (2,)), ("a", "int8", (1,))], {"z": "1", "a": "2"})
    two = build_header([("b", "float32", (2,)), ("a", "int8", (1,))], {"a": "2", "z": "1"})
    assert one == two


def test_every_dtype_opens_with_safe_open(tmp_path: Path) -> None:
    """A file built with build_header opens with plain safetensors.safe_open, every dtype bit-exact."""
    torch = pytest.importorskip("torch")
    tensors = sorted(((f"t.{name}", name, (2, 3)) for name in DTYPES), key=lambda t: -itemsize(t[1]))
    tensors.append(("scalar", "int8", ()))
    tensors.append(("empty", "int8", (0, 4)))
    path = tmp_path / "w.safetensors"
    _, _, blob = write(path, tensors, {"k": "v"})
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(name for name, _, _ in tensors)
        assert f.metadata() == {"k": "v"}
        for i, (name, dtype, shape) in enumerate(tensors):
            t = f.get_tensor(name)
            assert t.dtype == getattr(torch, dtype)
            assert tuple(t.shape) == shape
            assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == pattern_bytes(dtype, shape, i)
    assert parse_header(blob, len(blob), file=NAME).metadata == {"k": "v"}


def test_numpy_reader_sees_the_same_values(tmp_path: Path) -> None:
    """safe_open with the numpy framework reads the values we laid out (no torch involved)."""
    path = tmp_path / "w.safetensors"
    _, ranges, blob = write(path, [("w", "float32", (2, 2)), ("b", "int16", (3,))], {})
    with safe_open(str(path), framework="numpy") as f:
        w = f.get_tensor("w")
        assert w.dtype == np.float32 and w.shape == (2, 2)
        assert w.tobytes() == blob[ranges[0][0] : ranges[0][1]]
        assert f.get_tensor("b").tobytes() == blob[ranges[1][0] : ranges[1][1]]


# -- parse_header on good headers ------------------------------------------------------------


def test_parse_header_reads_back_what_build_header_wrote() -> None:
    """Entries have manifest dtype names and the same absolute ranges; raw is the header with its prefix."""
    tensors = [("a", "bfloat16", (2, 3)), ("b", "float8_e4m3fn", (4,)), ("c", "bool", ())]
    raw, ranges = build_header(tensors, {CONTENT_KEY: "x"})
    data = b"\0" * ranges[-1][1]
    header = parse_header(raw + data[len(raw) :], ranges[-1][1], file=NAME)
    assert header.raw == raw
    assert header.data_start == len(raw)
    assert header.metadata == {CONTENT_KEY: "x"}
    assert header.entries == {
        "a": HeaderEntry("bfloat16", (2, 3), ranges[0]),
        "b": HeaderEntry("float8_e4m3fn", (4,), ranges[1]),
        "c": HeaderEntry("bool", (), ranges[2]),
    }


def test_parse_header_needs_only_the_header_bytes() -> None:
    """A prefix holding just the header is enough; the file size bounds the offsets."""
    raw, ranges = build_header([("w", "float32", (1000,))], {})
    header = parse_header(raw, ranges[0][1], file=NAME)
    assert header.entries["w"].byte_range == ranges[0]


def test_parse_header_accepts_a_foreign_file_without_metadata() -> None:
    """A header without __metadata__ (as other tools write) parses with empty metadata."""
    blob = header_file({"w": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]}}, b"\1\2")
    assert parse_header(blob, len(blob), file=NAME).metadata == {}


# -- lying headers -------------------------------------------------------------------------


@pytest.mark.parametrize("blob", [b"", b"\x08\0\0", b"\0" * 7])
def test_file_shorter_than_the_length_prefix(blob: bytes) -> None:
    """A file of fewer than 8 bytes is refused as truncated."""
    exc = refused(blob)
    assert "too short for a safetensors file (truncated?)" in str(exc)


def test_header_length_beyond_the_file_size() -> None:
    """A header length larger than the file is refused with both numbers."""
    blob = struct.pack("<Q", 500) + b"{}"
    exc = refused(blob)
    assert f"header claims 500 bytes but the file has {len(blob)}" in str(exc)


def test_header_length_beyond_the_limit_is_refused_before_reading_it() -> None:
    """A header longer than MAX_HEADER_BYTES is refused from the 8-byte prefix alone, even in a huge file."""
    prefix = struct.pack("<Q", MAX_HEADER_BYTES + 1)
    exc = refused(prefix, size=10 * MAX_HEADER_BYTES)
    assert f"header claims {MAX_HEADER_BYTES + 1} bytes" in str(exc)
    refused(struct.pack("<Q", 2**64 - 1), size=2**62)


def test_prefix_shorter_than_the_header_it_announces() -> None:
    """Given fewer bytes than the header length, parse_header refuses rather than parse a piece."""
    blob = header_file({"w": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    exc = refused(blob[:12], size=len(blob))
    assert "header is truncated" in str(exc)


@pytest.mark.parametrize(
    "body", [b"{not json", b"\xff\xfe", b'{"a": 1', b"[" * 100_000], ids=["syntax", "utf8", "cut", "deep"]
)
def test_header_that_is_not_json(body: bytes) -> None:
    """Bytes that are not JSON are refused as a corrupt file."""
    exc = refused(header_file(None, raw_json=body))
    assert "header: not valid JSON" in str(exc)


@pytest.mark.parametrize("doc", [[], "x", 1, None])
def test_header_that_is_not_an_object(doc: Any) -> None:
    """A JSON header that is not an object is refused."""
    exc = refused(header_file(doc))
    assert "header is not a JSON object" in str(exc)


@pytest.mark.parametrize("meta", [{"a": 1}, {"a": None}, ["a"], "a"])
def test_metadata_must_map_strings_to_strings(meta: Any) -> None:
    """__metadata__ that is not a string-to-string object is refused."""
    exc = refused(header_file({METADATA_KEY: meta}))
    assert "__metadata__ must map strings to strings" in str(exc)


def entry_refused(entry: Any, data: bytes = b"\0" * 16) -> IntegrityError:
    """A header with one entry ``w`` is refused naming the file and ``w``."""
    return refused(header_file({"w": entry}, data), key="w")


@pytest.mark.parametrize("entry", [[], "F32", None, 3])
def test_entry_that_is_not_an_object(entry: Any) -> None:
    """A tensor entry that is not an object is refused naming its key."""
    assert "not an object" in str(entry_refused(entry))


@pytest.mark.parametrize("code", ["F128", "f32", "float32", None, 4])
def test_unknown_dtype(code: Any) -> None:
    """A dtype code safetensors does not define is refused naming the key and the code."""
    exc = entry_refused({"dtype": code, "shape": [4], "data_offsets": [0, 16]})
    assert f"unknown dtype {code!r}" in str(exc)


@pytest.mark.parametrize("shape", [[-1], [2, -2], [2.0], ["4"], [True], 4, None, [[4]]])
def test_shape_that_is_not_non_negative_integers(shape: Any) -> None:
    """Negative, fractional, string, boolean or nested dimensions are refused naming the key."""
    exc = entry_refused({"dtype": "F32", "shape": shape, "data_offsets": [0, 16]})
    assert f"shape {shape!r} is not a list of non-negative integers" in str(exc)


@pytest.mark.parametrize(
    "offsets",
    [[0, 17], [8, 4], [-4, 12], [0], [0, 8, 16], [0.0, 16], ["0", "16"], None, [True, 16]],
    ids=["past-end", "reversed", "negative", "one", "three", "float", "strings", "null", "bool"],
)
def test_offsets_outside_the_data(offsets: Any) -> None:
    """Offsets that are not two ordered integers within the data section are refused naming the key."""
    exc = entry_refused({"dtype": "F32", "shape": [4], "data_offsets": offsets})
    assert f"data_offsets {offsets!r} lie outside the 16 data bytes" in str(exc)


def test_offsets_into_the_header_are_impossible() -> None:
    """Offsets count from the end of the header, so an entry can never point into the header itself."""
    blob = header_file({"w": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}}, b"abcd")
    header = parse_header(blob, len(blob), file=NAME)
    start, end = header.entries["w"].byte_range
    assert start == header.data_start and blob[start:end] == b"abcd"


@pytest.mark.parametrize(
    ("shape", "offsets", "needs"),
    [([4], [0, 12], 16), ([2, 2], [0, 8], 16), ([], [0, 0], 4), ([0], [0, 4], 0)],
)
def test_offsets_inconsistent_with_shape(shape: list[int], offsets: list[int], needs: int) -> None:
    """A span that does not equal dtype size times element count is refused with both numbers."""
    exc = entry_refused({"dtype": "F32", "shape": shape, "data_offsets": offsets})
    assert f"data_offsets span {offsets[1] - offsets[0]} bytes, float32{shape} needs {needs}" in str(exc)


def test_huge_shape_in_a_header_is_refused_by_arithmetic() -> None:
    """A shape of 2**40 x 2**40 elements with 16 data bytes is refused without allocating anything."""
    exc = entry_refused({"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]})
    assert f"needs {4 * 2**80}" in str(exc)


def test_first_bad_entry_is_named_among_good_ones() -> None:
    """With several entries, the bad one is named, not a neighbour."""
    blob = header_file(
        {
            "good": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]},
            "bad.key": {"dtype": "I8", "shape": [3], "data_offsets": [2, 4]},
        },
        b"\0" * 4,
    )
    refused(blob, key="bad.key")


def test_integrity_error_is_in_the_family() -> None:
    """IntegrityError is a ManifestCkptError and an OSError whose str() is the plain message."""
    exc = IntegrityError("f: broken", file="f", key="k")
    assert isinstance(exc, ManifestCkptError) and isinstance(exc, OSError)
    assert str(exc) == "f: broken"


@pytest.mark.parametrize("code", [["F32"], {"F32": 1}, 4, None])
def test_a_dtype_that_is_not_a_string_is_refused_typed(code: Any) -> None:
    """Found by harness/fuzz.py: a list as dtype raised TypeError (unhashable) instead of IntegrityError."""
    exc = refused(header_file({"w": {"dtype": code, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), key="w")
    assert "unknown dtype" in str(exc)
