"""The canonical text of ``manifest.json``, produced fast (no torch import).

The canonical form is ``json.dumps(document, sort_keys=True, indent=1, ensure_ascii=False)``.
With ``indent`` set, Python 3.11's ``json`` falls back to its pure-Python encoder, a
generator per nesting level: about a second for a 100,000-tensor manifest. :func:`dumps`
returns the very same text from string joins, using the C string escaper for every string,
and hands anything outside plain ``dict``/``list``/``str``/``int``/``bool``/``None`` (floats,
non-string keys, subclasses) to ``json.dumps`` itself, re-indented to its depth, so the
bytes cannot differ (the tests compare both on random documents and manifests).

:func:`table` writes the two big mappings of a manifest (100,000 tensors, 50,000 modules)
straight from their entries' fields, without building a dict per entry; its text is placed
as it is (an :class:`Encoded`) by :func:`dumps`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from json.encoder import encode_basestring
from operator import itemgetter
from typing import Any, Final

import msgspec

__all__ = ["Encoded", "compact", "dumps", "table"]

_sorted_encode: Final = msgspec.json.Encoder(order="sorted").encode

_int = int.__repr__


def dumps(value: Any) -> str:
    """``json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False)``, the same text, faster.

    Raises:
        TypeError, ValueError: as ``json.dumps`` does for values JSON cannot hold.
    """
    return _encode(value, 0)


def compact(value: Any) -> bytes:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()``, faster.

    For the digests over a manifest's tensors, aliases and modules (100,000 entries): msgspec
    writes the text in C. Its bytes are json's whenever they hold no backslash and only
    printable ASCII: then no string needed an escape (where the two encoders differ), and
    keys sort alike. Anything else is written by ``json.dumps`` itself.

    Args:
        value: str-keyed dicts, lists, tuples, str, int, bool and None only. Floats are not
            allowed (the two encoders spell some differently, which the bytes cannot reveal).
    """
    try:
        blob = _sorted_encode(value)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        blob = b"\\"  # something msgspec cannot write (an int past 64 bits, a mappingproxy)
    if b"\\" in blob or b"\x7f" in blob or not blob.isascii():
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return blob


class Encoded(str):
    """Canonical JSON text made for the depth it is placed at; :func:`dumps` writes it unchanged."""


def table(rows: Iterable[tuple[str, Sequence[tuple[str, Any]]]], level: int) -> Encoded:
    """The canonical text of ``{key: dict(fields)}`` for a mapping placed ``level`` deep.

    Args:
        rows: ``(key, ((field, value), ...))`` with string keys, in any order; each row's
            fields in sorted order (they are written as given). Values are what :func:`dumps`
            takes; strings, ints, ``None`` and lists or tuples of ints or of strings are
            written inline, anything else through :func:`dumps`' encoder.
    """
    ordered = sorted(rows, key=itemgetter(0))
    if not ordered:
        return Encoded("{}")
    row_in = "\n" + " " * (level + 1)
    field_in = row_in + " "
    item_in = field_in + " "
    field_sep = "," + field_in
    item_sep = "," + item_in
    field_close = "\n" + " " * (level + 1) + "}"
    list_close = field_in + "]"
    names: dict[str, str] = {}
    text: list[str] = []
    for key, fields in ordered:
        if type(key) is not str:
            raise TypeError(f"table keys must be strings, got {type(key).__name__}")
        parts = []
        for name, value in fields:
            label = names.get(name)
            if label is None:
                label = names[name] = encode_basestring(name) + ": "
            kind = type(value)
            if kind is str:
                parts.append(label + encode_basestring(value))
            elif kind is int:
                parts.append(label + _int(value))
            elif value is None:
                parts.append(label + "null")
            elif kind is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
                # a byte range: the most common list, checked without a generator
                parts.append(f"{label}[{item_in}{_int(value[0])}{item_sep}{_int(value[1])}{list_close}")
            elif (kind is tuple or kind is list) and all(type(x) is int for x in value):
                parts.append(label + ("[" + item_in + item_sep.join(map(_int, value)) + list_close if value else "[]"))
            elif (kind is tuple or kind is list) and all(type(x) is str for x in value):
                inner = item_sep.join(map(encode_basestring, value))
                parts.append(label + ("[" + item_in + inner + list_close if value else "[]"))
            else:
                parts.append(label + _encode(value, level + 2))
        record = "{" + field_in + field_sep.join(parts) + field_close if parts else "{}"
        text.append(encode_basestring(key) + ": " + record)
    return Encoded("{" + row_in + ("," + row_in).join(text) + "\n" + " " * level + "}")


def _encode(value: Any, level: int) -> str:
    kind = type(value)
    if kind is Encoded:
        return str(value)
    if kind is str:
        return str(encode_basestring(value))
    if kind is dict and value:
        if not all(type(k) is str for k in value):
            return _delegate(value, level)
        inner = "\n" + " " * (level + 1)
        # The common leaves inline (no call per value): strings, ints, shapes and byte ranges.
        deeper = "," + inner + " "
        close = inner + "]"
        parts = []
        for key, item in sorted(value.items()):
            item_kind = type(item)
            if item_kind is str:
                parts.append(f"{encode_basestring(key)}: {encode_basestring(item)}")
            elif item_kind is int:
                parts.append(f"{encode_basestring(key)}: {_int(item)}")
            elif item_kind is list and item and all(type(x) is int for x in item):
                parts.append(f"{encode_basestring(key)}: [{deeper[1:]}{deeper.join(map(_int, item))}{close}")
            else:
                parts.append(f"{encode_basestring(key)}: {_encode(item, level + 1)}")
        return "{" + inner + ("," + inner).join(parts) + "\n" + " " * level + "}"
    if (kind is list or kind is tuple) and value:
        inner = "\n" + " " * (level + 1)
        if all(type(x) is int for x in value):
            items = [_int(x) for x in value]
        else:
            items = [_encode(x, level + 1) for x in value]
        return "[" + inner + ("," + inner).join(items) + "\n" + " " * level + "]"
    if kind is int:
        return _int(value)
    if kind is dict:
        return "{}"
    if kind is list or kind is tuple:
        return "[]"
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    return _delegate(value, level)


def _delegate(value: Any, level: int) -> str:
    """``json.dumps`` of ``value`` as it appears ``level`` deep (JSON text never holds a raw newline)."""
    text = json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False)
    return text.replace("\n", "\n" + " " * level) if level else text
