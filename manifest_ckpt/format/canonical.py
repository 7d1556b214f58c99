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
import operator
from collections.abc import Iterable, Sequence
from json.encoder import encode_basestring
from typing import Any, Final

import msgspec

__all__ = ["Encoded", "compact", "dumps", "table"]

_sorted_encode: Final = msgspec.json.Encoder(order="sorted").encode
_encode_as_is: Final = msgspec.json.Encoder().encode

_int = int.__repr__


def dumps(value: Any) -> str:
    """``json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False)``, the same text, faster.

    Raises:
        TypeError, ValueError: as ``json.dumps`` does for values JSON cannot hold.
    """
    return _encode(value, 0)


def compact(value: Any) -> bytes:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()``, faster.

    For the digests over a manifest's tensors, aliases and modules (100,000 entries) and the
    safetensors header binding checks: msgspec writes the text in C. Its bytes are json's
    whenever they hold no backslash and only printable ASCII: then no string needed an escape
    (where the two encoders differ), and keys sort alike. Anything else is written by
    ``json.dumps`` itself.

    msgspec never sorts a large dict here: its sort is a quicksort that recurses once per
    partition, so a big dict in an unlucky order (100,000 sorted keys after one larger key)
    overflows the C stack and kills the process. The value's own dict and the dicts directly
    inside it are put in key order first (sorted input splits evenly); a dict nested deeper
    is found before anything is sorted, and the value is written by ``json.dumps``.

    Args:
        value: str-keyed dicts, lists, tuples, str, int, bool and None only. Floats are not
            allowed (the two encoders spell some differently, which the bytes cannot reveal).
    """
    try:
        top = type(value) is dict
        prepared = _in_key_order(value) if top else value
        # Written as it is (msgspec sorts nothing), each "{" is a dict: only the value itself
        # is one, and it is in key order, so this is the text. Otherwise the dicts one level
        # down are counted and the big ones put in key order, and msgspec sorts the small
        # ones; a "{" that is not one of them (a dict deeper down, or inside a string) sends
        # the value to json.dumps.
        blob = _encode_as_is(prepared)
        braces = blob.count(b"{")
        if braces != top:
            prepared, inner = _inner_in_key_order(prepared)
            blob = _sorted_encode(prepared) if braces == top + inner else b"\\"
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        blob = b"\\"  # something msgspec cannot write (an int past 64 bits, a mappingproxy)
    if b"\\" in blob or b"\x7f" in blob or not blob.isascii():
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return blob


# msgspec sorts a dict of up to this many keys by insertion sort, without recursing.
_SMALL_DICT: Final = 16


def _in_key_order(value: dict[Any, Any]) -> dict[Any, Any]:
    """``value`` with its keys in sorted order (itself when they already are, as in a manifest read).

    Raises:
        TypeError: keys that do not compare (json.dumps refuses them too).
    """
    keys = list(value)
    if all(map(operator.lt, keys, keys[1:])):
        return value
    return {key: value[key] for key in sorted(keys)}


def _inner_in_key_order(value: Any) -> tuple[Any, int]:
    """``value`` with each dict directly inside it of more than ``_SMALL_DICT`` keys in key
    order, and how many dicts it holds directly."""
    if type(value) is dict:
        items = list(value.values())
    elif type(value) is list or type(value) is tuple:
        items = list(value)
    else:
        return value, 0
    kinds = list(map(type, items))
    inner = kinds.count(dict)
    if inner == len(items):  # a table of records (module entries, header entries): all dicts
        big = max(map(len, items), default=0) > _SMALL_DICT
    else:
        big = any(kind is dict and len(item) > _SMALL_DICT for kind, item in zip(kinds, items))
    if not big:
        return value, inner
    rows = [_in_key_order(item) if kind is dict and len(item) > _SMALL_DICT else item for kind, item in zip(kinds, items)]
    return (dict(zip(value, rows)) if type(value) is dict else rows), inner


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
    ordered = sorted(rows, key=operator.itemgetter(0))
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
