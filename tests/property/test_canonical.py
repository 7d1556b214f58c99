"""Property: format.canonical.dumps gives exactly json.dumps(sort_keys=True, indent=1, ensure_ascii=False)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from manifest_ckpt.format import canonical

from .strategies import record_example

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities too: json writes NaN / Infinity by default
    | st.text()
)
_keys = st.text() | st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=5)
    | st.tuples(children, children)
    | st.dictionaries(st.text(), children, max_size=5)
    | st.dictionaries(_keys, children, max_size=3),
    max_leaves=30,
)


def _sortable(value: Any) -> bool:
    """json.dumps(sort_keys=True) raises on dicts whose keys do not compare; skip those."""
    try:
        json.dumps(value, sort_keys=True)
    except TypeError:
        return False
    return True


@given(value=_values.filter(_sortable))
def test_dumps_matches_json_dumps(value: Any) -> None:
    """On random JSON-like values (any key type, floats, nesting, empty containers) the text is identical."""
    assert canonical.dumps(value) == json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False)
    record_example()


def test_dumps_of_manifest_shaped_document() -> None:
    """A manifest-shaped document with shapes, ranges, nested chunks and non-ASCII keys matches json.dumps."""
    document = {
        "tensors": {
            "é.weight": {"dtype": "float32", "shape": [2, 3], "byte_range": [8, 32], "digest": "sha256:0", "file": "w"},
            "s": {"dtype": "int8", "shape": [], "chunks": [{"offsets": [0], "shape": [1], "byte_range": [0, 1]}]},
        },
        "aliases": {},
        "modules": None,
        "lineage": {"user": {"1": 1.5, "x": [True, None, "\u2028\n\""]}},
    }
    assert canonical.dumps(document) == json.dumps(document, sort_keys=True, indent=1, ensure_ascii=False)


_float_free = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=5) | st.tuples(children) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=30,
)


@given(value=_float_free)
def test_compact_matches_json_dumps(value: Any) -> None:
    """compact gives json.dumps(sort_keys, compact separators, ensure_ascii) bytes: escapes, non-ASCII, big ints."""
    assert canonical.compact(value) == json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    record_example()


_field_values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.lists(st.integers(), max_size=4)
    | st.tuples(st.integers(), st.integers())
    | st.lists(st.text(), max_size=3)
    | st.tuples()
    | _values
)
_records = st.dictionaries(st.text(), st.dictionaries(st.text(), _field_values, max_size=5), max_size=6)


@given(records=_records.filter(_sortable), level=st.integers(0, 3))
def test_table_matches_json_dumps_of_the_mapping(records: dict[str, dict[str, Any]], level: int) -> None:
    """table() of rows with sorted fields, placed at any depth, is json.dumps' text of the same mapping."""
    rows = [(key, tuple(sorted(fields.items()))) for key, fields in records.items()]
    document: Any = {"t": canonical.table(rows, level)} if level == 1 else canonical.table(rows, 0)
    expected: Any = {"t": records} if level == 1 else records
    if level in (0, 1):
        assert canonical.dumps(document) == json.dumps(expected, sort_keys=True, indent=1, ensure_ascii=False)
    else:
        text = json.dumps(records, sort_keys=True, indent=1, ensure_ascii=False)
        assert canonical.table(rows, level) == text.replace("\n", "\n" + " " * level)
    record_example()


def _adversarial(n: int = 100_000) -> dict[str, int]:
    """Sorted keys after one larger key: the order that drove msgspec's quicksort 100,000 calls deep."""
    return dict.fromkeys(["z", *(f"{i:07d}" for i in range(n))], 1)


def test_compact_of_big_dicts_in_any_order_does_not_crash() -> None:
    """Big dicts in an unlucky order, at the top, one level down, in a list or deeper, are json.dumps' bytes.

    msgspec's sort segfaulted (C stack overflow) on the first three: a 100,000-tensor manifest
    whose tensors object lists one key out of order killed read_manifest.
    """
    big = _adversarial()
    for value in (big, {"a": big, "b": {"c": 1}}, [big], {"a": [big]}, {"a": {"b": big}}):
        assert canonical.compact(value) == json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def test_compact_with_a_brace_in_a_string_is_still_json_dumps() -> None:
    """A "{" inside a string key or value (it cannot be told from a dict by counting) gives json.dumps' bytes."""
    for value in ({"a{": {"b": 1}}, {"a": ["{", {"c": 2}]}, ["}{"]):
        assert canonical.compact(value) == json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
