"""Strict JSON for every document manifest-ckpt reads: one parser, typed errors only (no torch).

``json.loads`` alone accepts duplicate keys (the last one silently wins, while other readers
take the first), raises a bare ``ValueError`` for integers over Python's 4,300-digit limit,
returns strings holding lone UTF-16 surrogates that cannot be written back as UTF-8, and
builds values nested so deeply that walking them later raises ``RecursionError``. Here each
of those is refused when the document is parsed, with an error naming the file.

:func:`decode_fast` is the quick way in for large documents (a manifest of 100,000 tensors is
36 MB): msgspec's decoder, about twice as fast as ``json.loads`` with a duplicate-key hook,
with an upper bound on the keys the text holds, so that the caller, who knows the shape of
the document, can prove there was no duplicate key by counting the parsed ones. Whatever it
cannot vouch for goes through :func:`loads`, whose errors and values are the reference.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from typing import Any, Final

import msgspec

from manifest_ckpt.errors import ManifestCkptError

__all__ = ["MAX_DEPTH", "check_value", "count_keys", "decode_fast", "loads"]

# Deepest nesting accepted inside a free-form value (lineage, metadata, extensions). Real
# records are a handful of levels deep; this leaves the recursive walks that digest, validate
# and print these values far from Python's recursion limit.
MAX_DEPTH: Final = 64
_MAX_INT_DIGITS: Final = getattr(sys, "get_int_max_str_digits", lambda: 4300)() or 4300
# A \\uD800-\\uDFFF escape: only then can the parsed document hold a lone surrogate (raw
# UTF-8 cannot encode one, and invalid UTF-8 fails decoding).
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89abcdefABCDEF]")

# A key followed by whitespace before its colon: the one spelling that count(b'":') misses.
_SPACED_COLON: Final = re.compile(rb'"[ \t\n\r]+:')
_decode: Final = msgspec.json.Decoder().decode

ErrorFactory = Callable[[str], ManifestCkptError]


class _Refused(ValueError):
    """Raised inside the parser's hooks; turned into the caller's typed error."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a dict, refusing a key given twice in one object."""
    result = dict(pairs)
    if len(result) == len(pairs):
        return result
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _Refused(
                f"the key {json.dumps(key)} appears twice in one JSON object; readers disagree on which copy "
                "wins, so the document is refused"
            )
        seen.add(key)
    raise AssertionError("unreachable: a shorter dict has a repeated key")  # pragma: no cover


def loads(data: bytes | str, *, where: str, what: str, error: ErrorFactory) -> Any:
    """Parse a JSON document strictly.

    Args:
        data: the document's bytes (UTF-8) or text.
        where: the file, for messages.
        what: what the document should be (``"a manifest"``), for messages.
        error: builds the typed error to raise from a message.

    Raises:
        ManifestCkptError: from ``error``: not UTF-8, not JSON, a duplicate key, an integer
            over 4,300 digits, a lone surrogate, or nesting too deep to parse.
    """
    try:
        document = json.loads(data, object_pairs_hook=_unique_pairs)
    except _Refused as exc:
        raise error(f"{where}: {exc}; expected {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{where}: not valid JSON ({exc}); expected {what}") from None
    except RecursionError:
        raise error(f"{where}: not valid JSON (nested too deeply to parse); expected {what}") from None
    except ValueError as exc:  # int() past sys.get_int_max_str_digits
        raise error(
            f"{where}: holds an integer of more than {_MAX_INT_DIGITS} digits ({exc}); expected {what}"
        ) from None
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if _SURROGATE_ESCAPE.search(raw):
        problem = _first_lone_surrogate(document, "$")
        if problem is not None:
            raise error(f"{where}: {problem}; expected {what} in valid Unicode")
    return document


def decode_fast(data: bytes | str) -> tuple[Any, int] | None:
    """Parse a JSON document quickly: ``(document, key_bound)``, or None where :func:`loads` must decide.

    ``key_bound`` is at least the number of object keys in the text (every ``"`` directly
    followed by ``:``; a string may add to it, never take away). The parsed document holds
    one key fewer for each key repeated in an object, so a caller that counts the parsed
    keys and finds ``key_bound`` proves that no object repeated a key. Otherwise (fewer keys,
    a bound it cannot count) it must parse again with :func:`loads`.

    None when msgspec refuses the text (not JSON, invalid UTF-8, a lone surrogate, NaN,
    an integer msgspec cannot hold, nesting past its limit) or a key is followed by
    whitespace before its colon (which the bound would miss): :func:`loads` then accepts or
    refuses it exactly as before, with its own messages. What msgspec accepts it parses to
    the values ``json.loads`` gives (integers of any size it holds, correctly rounded floats).
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if _SPACED_COLON.search(raw):
        return None
    try:
        document = _decode(raw)
    except (msgspec.MsgspecError, ValueError, RecursionError):
        return None
    return document, raw.count(b'":')


def count_keys(value: Any) -> int:
    """The number of object keys in a parsed JSON value, nested ones included (iteratively)."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += len(item)
            stack.extend(v for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, dict | list))
    return count


def check_value(value: Any, path: str, *, max_depth: int = MAX_DEPTH) -> str | None:
    """Why a parsed or caller-given JSON value cannot be stored, or None.

    Checks nesting depth (iteratively, so it never recurses itself) and lone surrogates.
    """
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return f"{where} holds a lone UTF-16 surrogate, which UTF-8 cannot store"
            continue
        if not isinstance(item, dict | list | tuple):
            continue
        if depth >= max_depth:
            return f"{where} is nested more than {max_depth} levels deep"
        if isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and not _encodable(key):
                    return f"{where} has a key holding a lone UTF-16 surrogate, which UTF-8 cannot store"
                stack.append((child, f"{where}[{json.dumps(key) if isinstance(key, str) else key!r}]", depth + 1))
        else:
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))
    return None


def _first_lone_surrogate(value: Any, path: str) -> str | None:
    """The first place a lone surrogate hides in a parsed document (no depth limit here)."""
    return check_value(value, path, max_depth=sys.maxsize)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
