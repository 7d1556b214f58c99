"""Property: jsonio.decode_fast parses what json.loads parses, and its key bound proves no duplicate."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from manifest_ckpt.format import jsonio

from .strategies import record_example

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=30,
)


def _pairs(text: str) -> int:
    """The number of keys the text holds, repeated ones included (json.loads counting them)."""
    count = 0

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal count
        count += len(pairs)
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return count


@given(value=_values, indent=st.sampled_from([None, 1, 2]), spaced=st.booleans(), repeat=st.booleans())
def test_decode_fast_agrees_with_json_loads(value: Any, indent: int | None, spaced: bool, repeat: bool) -> None:
    """Where decode_fast answers, it gives json.loads' value, and its bound is at least every key written."""
    text = json.dumps(value, indent=indent, separators=(",", " : " if spaced else ": "), ensure_ascii=False)
    if repeat and isinstance(value, dict) and value:
        key = json.dumps(next(iter(value)), ensure_ascii=False)
        text = "{" + key + ": 0, " + text[1:]  # the first key given twice
    fast = jsonio.decode_fast(text.encode("utf-8", "surrogatepass"))
    if fast is None:
        return  # loads decides: NaN, lone surrogates, spaced colons
    document, bound = fast
    reference = json.loads(text)
    assert json.dumps(document, sort_keys=True) == json.dumps(reference, sort_keys=True)
    assert bound >= _pairs(text)
    # Equality proves there was no duplicate: a repeated key leaves fewer parsed keys than the bound.
    if jsonio.count_keys(document) == bound:
        assert _pairs(text) == jsonio.count_keys(reference)
    record_example()
