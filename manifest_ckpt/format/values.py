"""Python values as manifest JSON, without pickle (no torch import).

One encoding serves every part of the manifest that records values rather than tensors:
the application-state tree of a training state (``$.extensions.state``, see
docs/format.md §8) and any other extension that records Python values. It is exact for
what it accepts and refuses everything else by key:

=====================================  =================================================
Python                                 JSON node
=====================================  =================================================
``None``, ``bool``, ``str``            itself
``int``                                a JSON integer (no fraction, no exponent)
finite ``float``                       a JSON number with a fraction or exponent
``nan``, ``inf``, ``-inf``             ``{"float": "nan"}`` / ``"inf"`` / ``"-inf"``
``list``                               a JSON array of nodes
``tuple``                              ``{"tuple": [node, ...]}``
``dict`` (``str`` or ``int`` keys)     ``{"dict": [[key, node], ...]}`` in insertion order
tensor                                 ``{"tensor": key}``: ``$.tensors[key]`` holds it
``bytes``                              ``{"bytes": key}``: a ``uint8[n]`` tensor of its bytes
``io.BytesIO``                         ``{"bytesio": key}``: the same, read back as a BytesIO
=====================================  =================================================

Every JSON object is a tagged node (exactly one key, the tag), so a user dict can never be
mistaken for one. Tensors and bytes are stored in the weights files under the key the node
names; by default that key is the value's dotted path (``optim.state.fc.weight.exp_avg``),
the flattening ``torch.distributed.checkpoint`` uses.

An *entry tree* (the application state) adds two object tags on top of values:
``{"module": {...}}`` and ``{"stateful": {...}}``; their ``dict`` nodes may hold entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

VALUE_TAGS: Final = ("dict", "tuple", "float", "tensor", "bytes", "bytesio")
REF_TAGS: Final = ("tensor", "bytes", "bytesio")
OBJECT_TAGS: Final = ("module", "stateful")
STATEFUL_KINDS: Final = ("optimizer", "scheduler", "stateful")
_NONFINITE: Final = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

# leaf(value, key) -> the node of a value that is not plain (a tensor reference), or None
# when the value cannot be stored.
Leaf = Callable[[Any, str], Any]
# resolve(tag, key) -> the Python object a reference node stands for.
Resolve = Callable[[str, str], Any]


def child_key(key: str, name: str | int) -> str:
    """The dotted key of ``name`` under ``key`` (``torch.distributed.checkpoint``'s flattening)."""
    return f"{key}.{name}" if key else str(name)


def encode_value(value: Any, key: str, leaf: Leaf, refused: list[str]) -> Any:
    """The JSON node of ``value`` found at dotted ``key``.

    Args:
        leaf: encodes what is not a plain value (tensors, bytes); returns None to refuse it.
        refused: receives ``"key (type)"`` for every value that cannot be stored, so the
            caller can name all of them in one error before writing anything.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # an int subclass (IntEnum) is stored as the int it is
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, list):
        return [encode_value(v, child_key(key, i), leaf, refused) for i, v in enumerate(value)]
    if isinstance(value, tuple) and type(value) is tuple:
        return {"tuple": [encode_value(v, child_key(key, i), leaf, refused) for i, v in enumerate(value)]}
    if isinstance(value, Mapping):  # OrderedDict too: optimizers and modules return them
        return {"dict": encode_pairs(value, key, lambda v, k: encode_value(v, k, leaf, refused), refused)}
    node = leaf(value, key)
    if node is None:
        refused.append(f"{key or '(root)'} ({type(value).__module__}.{type(value).__qualname__})")
    return node


def encode_pairs(
    mapping: Mapping[Any, Any], key: str, encode: Callable[[Any, str], Any], refused: list[str]
) -> list[list[Any]]:
    """The ``[[name, node], ...]`` of a dict; names must be ``str`` or ``int`` (not ``bool``)."""
    pairs: list[list[Any]] = []
    for name, v in mapping.items():
        if not (isinstance(name, str) or (isinstance(name, int) and not isinstance(name, bool))):
            refused.append(
                f"{child_key(key, repr(name))} (dict key of type {type(name).__name__}; use str or int keys)"
            )
            continue
        pairs.append([name if isinstance(name, str) else int(name), encode(v, child_key(key, name))])
    return pairs


def decode_value(node: Any, resolve: Resolve) -> Any:
    """The Python value a node stands for; ``resolve`` supplies referenced tensors and bytes."""
    if node is None or isinstance(node, (bool, str, int, float)):
        return node
    if isinstance(node, list):
        return [decode_value(n, resolve) for n in node]
    tag, body = tag_of(node)
    if tag == "dict":
        return {name: decode_value(n, resolve) for name, n in body}
    if tag == "tuple":
        return tuple(decode_value(n, resolve) for n in body)
    if tag == "float":
        return _NONFINITE[body]
    if tag in REF_TAGS:
        return resolve(tag, body)
    raise ValueError(f"not a value node: {tag!r}")


def tag_of(node: Mapping[str, Any]) -> tuple[str, Any]:
    """The tag and body of a tagged node (``{"tuple": [...]}`` -> ``("tuple", [...])``)."""
    ((tag, body),) = node.items()
    return tag, body


def is_tagged(node: Any, tag: str) -> bool:
    return isinstance(node, Mapping) and len(node) == 1 and tag in node


def iter_refs(node: Any, where: str = "") -> Iterator[tuple[str, str, str]]:
    """Every ``(tag, stored key, json path)`` a value or entry tree references, in order.

    Module entries reference ``prefix + name`` for each tensor their tree declares.
    """
    if isinstance(node, list):
        for i, n in enumerate(node):
            yield from iter_refs(n, f"{where}[{i}]")
        return
    if not isinstance(node, Mapping):
        return
    tag, body = tag_of(node)
    if tag in REF_TAGS:
        yield tag, body, where
    elif tag == "dict":
        for i, (_, n) in enumerate(body):
            yield from iter_refs(n, f"{where}.dict[{i}][1]")
    elif tag == "tuple":
        yield from iter_refs(body, f"{where}.tuple")
    elif tag == "module":
        for path, m in body["modules"].items():
            for name in (*m["parameters"], *m["buffers"]):
                yield "tensor", body["prefix"] + (f"{path}.{name}" if path else name), where + ".module"
    elif tag == "stateful":
        yield from iter_refs(body["state"], where + ".stateful.state")


def iter_entries(node: Any, key: str = "") -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """Every object entry of an entry tree: ``(dotted key, tag, body)``, depth first."""
    if not isinstance(node, Mapping):
        return
    tag, body = tag_of(node)
    if tag in OBJECT_TAGS:
        yield key, tag, body
    elif tag == "dict":
        for name, n in body:
            yield from iter_entries(n, child_key(key, name))


def duplicate_names(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """``(json path, message)`` for every dict node that repeats a name (JSON pairs can)."""
    if isinstance(node, list):
        for i, n in enumerate(node):
            yield from duplicate_names(n, f"{where}[{i}]")
        return
    if not isinstance(node, Mapping):
        return
    tag, body = tag_of(node)
    if tag == "dict":
        seen: set[Any] = set()
        for i, (name, n) in enumerate(body):
            if (type(name), name) in seen:
                yield f"{where}.dict[{i}]", f"repeats the name {name!r}"
            seen.add((type(name), name))
            yield from duplicate_names(n, f"{where}.dict[{i}][1]")
    elif tag == "tuple":
        yield from duplicate_names(body, f"{where}.tuple")
    elif tag == "stateful":
        yield from duplicate_names(body["state"], f"{where}.stateful.state")


def describe(node: Any, limit: int = 60) -> str:
    """A short human rendering of a value node (``{'step': 3}``, ``tensor``, ``(0.9, 0.999)``)."""
    text = _render(node)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _render(node: Any) -> str:
    if isinstance(node, list):
        return "[" + ", ".join(_render(n) for n in node) + "]"
    if not isinstance(node, Mapping):
        return repr(node)
    tag, body = tag_of(node)
    if tag == "dict":
        return "{" + ", ".join(f"{name!r}: {_render(n)}" for name, n in body) + "}"
    if tag == "tuple":
        return "(" + ", ".join(_render(n) for n in body) + ("," if len(body) == 1 else "") + ")"
    if tag == "float":
        return str(body)
    if tag in REF_TAGS:
        return f"<{tag} {body}>"
    return f"<{tag}>"
