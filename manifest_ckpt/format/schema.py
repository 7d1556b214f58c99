"""Validate manifest documents against ``schema/manifest-v1.schema.json``, fast.

The JSON Schema file is the single source of truth. At first use it is compiled into
nested Python closures: one boolean checker per schema node (the hot path) and one error
generator per node (used only once the checker said "invalid"). The compiler understands
exactly the subset of JSON Schema draft 2020-12 that the manifest schema uses and raises
on any other keyword, so a schema edit can never be silently ignored. Semantics follow
``jsonschema.Draft202012Validator`` (the reference): JSON integers exclude ``bool`` but
include integral floats, ``pattern`` uses :func:`re.search`, ``const``/``enum`` keep
``True`` and ``1`` apart; the test-suite checks the two agree.
"""

from __future__ import annotations

import copy
import json
import numbers
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from itertools import islice, product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from manifest_ckpt.errors import ManifestError

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

__all__ = [
    "MAX_ERRORS",
    "SCHEMA_NAME",
    "CompiledSchema",
    "SchemaViolation",
    "compile_schema",
    "iter_errors",
    "load_schema",
    "schema_text",
    "validate",
]

SCHEMA_NAME: Final = "manifest-v1.schema.json"
MAX_ERRORS: Final = 50
_SHOWN_ERRORS: Final = 10
_WHAT_TO_DO: Final = (
    "The manifest was edited by hand or written by a newer/other tool; "
    "re-save the checkpoint or run `manifest-ckpt verify`."
)

# Keywords that carry no assertion; every other keyword must be compiled or rejected.
_ANNOTATIONS: Final = frozenset({"$schema", "$id", "$comment", "$defs", "title", "description"})
_OBJECT_KEYWORDS: Final = frozenset(
    {"properties", "required", "additionalProperties", "propertyNames", "patternProperties"}
)
_ARRAY_KEYWORDS: Final = frozenset({"items", "prefixItems", "minItems", "maxItems"})
_STRING_KEYWORDS: Final = frozenset({"minLength", "maxLength", "pattern"})
_NUMBER_KEYWORDS: Final = frozenset({"minimum", "maximum"})
_APPLICATORS: Final = frozenset({"type", "const", "enum", "$ref", "anyOf", "oneOf", "not"})
_SUPPORTED: Final = (
    _ANNOTATIONS | _OBJECT_KEYWORDS | _ARRAY_KEYWORDS | _STRING_KEYWORDS | _NUMBER_KEYWORDS | _APPLICATORS
)

Check = Callable[[Any], bool]
# Builds the check of one kind of keywords (object, array, string, number) given the verdict
# for values of other kinds: False under a matching "type", True without one.
Builder = Callable[[bool], Check]
Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class SchemaViolation:
    """One place where a document breaks the schema."""

    json_path: str
    message: str

    def __str__(self) -> str:
        return f"{self.json_path}: {self.message}"


ErrorGen = Callable[[Any, Loc], Iterator[SchemaViolation]]


# --- schema file -------------------------------------------------------------------------


@cache
def schema_text() -> str:
    """The text of ``manifest-v1.schema.json``, as shipped (for ``manifest-ckpt schema``).

    Returns:
        The file's contents, read once.

    Raises:
        FileNotFoundError: neither the package data nor the source checkout holds the file.
    """
    packaged = resources.files("manifest_ckpt") / "schema" / SCHEMA_NAME
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # A source checkout keeps the schema at the repository's top level, not in the package.
    return (Path(__file__).resolve().parents[2] / "schema" / SCHEMA_NAME).read_text(encoding="utf-8")


@cache
def _schema() -> dict[str, Any]:
    """The parsed schema, shared by the compiler and the reference validator (never mutated)."""
    parsed: dict[str, Any] = json.loads(schema_text())
    return parsed


def load_schema() -> dict[str, Any]:
    """The manifest JSON Schema as a dict (a fresh copy; the file is read only once).

    Returns:
        The parsed ``manifest-v1.schema.json``.

    Raises:
        FileNotFoundError: the schema file is missing from the installation.
    """
    # A copy, so that a caller editing the dict cannot change what validate() enforces.
    return copy.deepcopy(_schema())


# --- JSON semantics, as the reference validator has them --------------------------------


def _is_integer(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and v.is_integer())


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Number)


_TYPE_TESTS: Final[dict[str, Check]] = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": _is_integer,
    "number": _is_number,
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _unbool(v: Any) -> Any:
    # Keeps True/1 and False/0 apart, as jsonschema's equal() does.
    if v is True:
        return _TRUE_MARK
    if v is False:
        return _FALSE_MARK
    return v


_TRUE_MARK: Final = object()
_FALSE_MARK: Final = object()


def _json_equal(one: Any, two: Any) -> bool:
    """JSON equality as jsonschema defines it for ``const`` and ``enum``."""
    if one is two:
        return True
    if isinstance(one, str) or isinstance(two, str):
        return bool(one == two)
    if isinstance(one, Sequence) and isinstance(two, Sequence):
        return len(one) == len(two) and all(_json_equal(a, b) for a, b in zip(one, two, strict=True))
    if isinstance(one, Mapping) and isinstance(two, Mapping):
        return len(one) == len(two) and all(k in two and _json_equal(x, two[k]) for k, x in one.items())
    return bool(_unbool(one) == _unbool(two))


# --- message helpers --------------------------------------------------------------------


def _json_path(loc: Loc) -> str:
    """A JSON path such as ``$.tensors["fc.weight"].shape[1]``."""
    out = "$"
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            out += "." + part
        elif isinstance(part, str):
            out += f"[{json.dumps(part)}]"
        else:
            out += f"[{part!r}]"
    return out


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _literal(v: Any) -> str:
    """A JSON literal for a schema value, shortened."""
    try:
        return _short(json.dumps(v))
    except (TypeError, ValueError):
        return _short(repr(v))


def _found(v: Any) -> str:
    """Describe an instance value for the "found ..." half of a message."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return f"{'integer' if isinstance(v, int) else 'number'} {_short(repr(v))}"
    if isinstance(v, str):
        return "string " + _literal(v)
    if isinstance(v, list):
        return f"an array of {len(v)} item{'' if len(v) == 1 else 's'}"
    if isinstance(v, dict):
        if not v:
            return "an empty object"
        names = ", ".join(_literal(k) for k in islice(sorted(v, key=str), 8))
        return f"an object with keys {names}{', ...' if len(v) > 8 else ''}"
    return f"a Python {type(v).__name__} {_short(repr(v), 40)} (not a JSON value)"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _describe(schema: Any) -> str:
    """A short human description of a subschema, for anyOf/oneOf/not messages."""
    if schema is True:
        return "anything"
    if schema is False:
        return "nothing"
    parts: list[str] = []
    types = schema.get("type")
    if types is not None:
        parts.append(" or ".join([types] if isinstance(types, str) else types))
    if "const" in schema:
        parts.append(_literal(schema["const"]))
    if "enum" in schema:
        parts.append("one of " + _short(", ".join(_literal(e) for e in schema["enum"])))
    if "$ref" in schema:
        parts.append(schema["$ref"].rsplit("/", 1)[-1])
    if "required" in schema:
        parts.append("with " + ", ".join(_literal(k) for k in schema["required"]))
    if "not" in schema:
        inner = schema["not"]
        if isinstance(inner, dict) and set(inner) == {"required"}:
            parts.append("without " + ", ".join(_literal(k) for k in inner["required"]))
        elif (
            isinstance(inner, dict)
            and set(inner) == {"anyOf"}
            and all(isinstance(b, dict) and set(b) == {"required"} for b in inner["anyOf"])
        ):
            names = [k for b in inner["anyOf"] for k in b["required"]]
            parts.append("without any of " + ", ".join(_literal(k) for k in names))
        else:
            parts.append(f"not ({_describe(inner)})")
    for word in ("anyOf", "oneOf"):
        if word in schema:
            parts.append("(" + " | ".join(_describe(b) for b in schema[word]) + ")")
    rest = [
        k
        for k in schema
        if k not in _ANNOTATIONS and k not in {"type", "const", "enum", "$ref", "required", "not", "anyOf", "oneOf"}
    ]
    if rest:
        parts.append("constrained by " + ", ".join(rest))
    return " and ".join(parts) if parts else "anything"


# --- compiled nodes ---------------------------------------------------------------------


def _true(v: Any) -> bool:
    return True


def _false(v: Any) -> bool:
    return False


def _no_errors(v: Any, loc: Loc) -> Iterator[SchemaViolation]:
    return iter(())


@dataclass(frozen=True)
class _Node:
    """A compiled schema: a fast boolean check and a detailed error generator.

    ``types`` is the set of JSON type names the node can accept (None: any), used to
    pick the relevant alternative of an anyOf/oneOf when explaining a failure.
    ``int_range`` is set for exactly ``{"type": "integer", "minimum": a, "maximum": b}``
    so arrays of such integers can check their items inline.
    """

    check: Check
    errors: ErrorGen
    types: frozenset[str] | None
    description: str
    int_range: tuple[int, int] | None = None


_TRUE_NODE: Final = _Node(_true, _no_errors, None, "anything")


def _false_errors(v: Any, loc: Loc) -> Iterator[SchemaViolation]:
    yield SchemaViolation(_json_path(loc), f"expected nothing here (schema is false), found {_found(v)}")


_FALSE_NODE: Final = _Node(_false, _false_errors, frozenset(), "nothing")


def _all_of(checks: list[Check]) -> Check:
    """The conjunction of checks, with the common small arities unrolled."""
    checks = [c for c in checks if c is not _true]
    if any(c is _false for c in checks):
        return _false
    if not checks:
        return _true
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        a, b = checks

        def check2(v: Any) -> bool:
            return a(v) and b(v)

        return check2
    if len(checks) == 3:
        a, b, c = checks

        def check3(v: Any) -> bool:
            return a(v) and b(v) and c(v)

        return check3
    frozen = tuple(checks)

    def check_n(v: Any) -> bool:
        return all(c(v) for c in frozen)

    return check_n


def _descend(node: _Node, v: Any, loc: Loc) -> Iterator[SchemaViolation]:
    # Skips valid subtrees with the fast check, so explaining one bad tensor among 100,000 stays fast.
    if not node.check(v):
        yield from node.errors(v, loc)


_MEMO_ENTRIES: Final = 1024
_MEMO_MAX_LENGTH: Final = 256
_MEMO_MAX_MISSES: Final = 4096


def _memoize_strings(inner: Check) -> Check:
    """Remember ``inner``'s verdict on short strings (file names repeat once per tensor).

    Sound because a string's verdict depends only on its value (``type(v) is str`` keeps
    subclasses out). Values that never repeat (digests) would only pay for the lookup, so
    the memo switches itself off after ``_MEMO_MAX_MISSES`` misses.
    """
    memo: dict[str, bool] = {}
    misses = 0

    def check(v: Any) -> bool:
        nonlocal misses
        if type(v) is str and misses < _MEMO_MAX_MISSES:
            known = memo.get(v)
            if known is not None:
                return known
            misses += 1
            verdict = inner(v)
            if len(memo) < _MEMO_ENTRIES and len(v) <= _MEMO_MAX_LENGTH:
                memo[v] = verdict
            return verdict
        return inner(v)

    return check


def _presence_keys(schema: Any) -> frozenset[str] | None:
    """The keys whose presence alone decides ``schema``, or None if it looks at anything else."""
    if isinstance(schema, bool):
        return frozenset()
    if not isinstance(schema, dict):
        return None
    keys: set[str] = set()
    for word, value in schema.items():
        if word in _ANNOTATIONS:
            continue
        if word == "required" and isinstance(value, list) and all(isinstance(k, str) for k in value):
            keys.update(value)
        elif word == "not":
            inner = _presence_keys(value)
            if inner is None:
                return None
            keys |= inner
        elif word in ("anyOf", "oneOf") and isinstance(value, list):
            for branch in value:
                inner = _presence_keys(branch)
                if inner is None:
                    return None
                keys |= inner
        else:
            return None
    return frozenset(keys)


def _by_presence(schema: Any, check: Check) -> Check:
    """Replace ``check`` by a table lookup when only the presence of a few keys decides it.

    The tensor's ``oneOf`` (file + byte_range xor chunks) is such a schema: evaluating its
    branches costs a dozen calls, the table one lookup. ``required`` ignores non-objects, so
    every non-object gets the same verdict.
    """
    keys = _presence_keys(schema)
    if keys is None or not keys or len(keys) > 4:
        return check
    order = tuple(sorted(keys))
    table = {
        mask: check({k: None for k, present in zip(order, mask, strict=True) if present})
        for mask in product((False, True), repeat=len(order))
    }
    other = check(None)
    if len(order) == 3:
        k0, k1, k2 = order

        def three(v: Any) -> bool:
            if isinstance(v, dict):
                return table[(k0 in v, k1 in v, k2 in v)]
            return other

        return three

    def lookup(v: Any) -> bool:
        if isinstance(v, dict):
            return table[tuple([k in v for k in order])]
        return other

    return lookup


class CompiledSchema:
    """A JSON Schema compiled to closures; build with :func:`compile_schema`."""

    def __init__(self, root: _Node) -> None:
        self._root = root
        self.is_valid: Check = root.check

    def iter_errors(self, document: Any, *, limit: int = MAX_ERRORS) -> Iterator[SchemaViolation]:
        """Yield the document's violations, at most ``limit`` of them.

        Args:
            document: the parsed JSON document.
            limit: stop after this many violations.

        Returns:
            An iterator of violations in document order; empty when the document is valid.
        """
        return islice(self._root.errors(document, ()), limit)


def compile_schema(schema: Any) -> CompiledSchema:
    """Compile a JSON Schema (the supported subset of draft 2020-12) into fast closures.

    Args:
        schema: the schema document (a dict or a boolean).

    Returns:
        The compiled schema.

    Raises:
        ValueError: the schema uses a keyword, ``$ref`` or value the compiler does not support.
    """
    compiler = _Compiler(schema)
    root = compiler.compile(schema, "#")
    if isinstance(schema, dict):
        # Compile unreferenced definitions too, so that no keyword anywhere in $defs goes unchecked.
        for name in schema.get("$defs", {}):
            compiler._ref("#/$defs/" + name.replace("%", "%25").replace("~", "~0").replace("/", "~1"), "#/$defs")
    return CompiledSchema(root)


class _Compiler:
    """Turns schema nodes into :class:`_Node` closures; ``$ref`` targets compile once each."""

    def __init__(self, root: Any) -> None:
        self._root = root
        self._refs: dict[str, _Node] = {}
        self._in_progress: set[str] = set()

    # -- entry --

    def compile(self, schema: Any, where: str) -> _Node:
        if schema is True:
            return _TRUE_NODE
        if schema is False:
            return _FALSE_NODE
        if not isinstance(schema, dict):
            raise ValueError(f"schema at {where}: expected an object or a boolean, found {_found(schema)}")
        unknown = sorted(set(schema) - _SUPPORTED)
        if unknown:
            raise ValueError(
                f"schema at {where}: unsupported keyword(s) {', '.join(map(repr, unknown))}; "
                "teach manifest_ckpt/_validate.py to compile them before using them in the schema"
            )
        if "$id" in schema and where != "#":
            raise ValueError(
                f"schema at {where}: '$id' is only supported at the root (it would change $ref resolution)"
            )
        if schema.keys() - _ANNOTATIONS == {"$ref"}:
            # A bare reference is its target: sharing the node keeps its specialisations (int_range).
            return self._ref(schema["$ref"], where)

        types = self._types(schema, where)
        kinds: list[tuple[str, Check, Builder, ErrorGen]] = []  # (kind, guard, builder, errors)
        int_range: tuple[int, int] | None = None
        if _OBJECT_KEYWORDS & schema.keys():
            kinds.append(("object", _TYPE_TESTS["object"], *self._object(schema, where)))
        if _ARRAY_KEYWORDS & schema.keys():
            kinds.append(("array", _TYPE_TESTS["array"], *self._array(schema, where)))
        if _STRING_KEYWORDS & schema.keys():
            kinds.append(("string", _TYPE_TESTS["string"], *self._string(schema, where)))
        if _NUMBER_KEYWORDS & schema.keys():
            lo, hi = (self._number_bound(schema, k, where) for k in ("minimum", "maximum"))
            kinds.append(("number", _is_number, *self._number(lo, hi)))
            if types == frozenset({"integer"}) and isinstance(lo, int) and isinstance(hi, int):
                int_range = (lo, hi)

        fused = self._fuse(types, kinds, int_range)
        if "pattern" in schema and [k for k, *_ in kinds] == ["string"]:
            fused = _memoize_strings(fused)
        generic = self._applicators(schema, where)
        check = _all_of([fused, *(c for c, _ in generic)])
        check = _by_presence(schema, check)

        type_errors = self._type_errors(types)
        kind_errors = [(guard, errs) for _, guard, _, errs in kinds]
        generic_errors = [g for _, g in generic]

        def errors(v: Any, loc: Loc) -> Iterator[SchemaViolation]:
            if type_errors is not None and not type_errors[0](v):
                yield SchemaViolation(_json_path(loc), f"expected {type_errors[1]}, found {_found(v)}")
                return
            for guard, errs in kind_errors:
                if guard(v):
                    yield from errs(v, loc)
            for g in generic_errors:
                yield from g(v, loc)

        node_types = types
        if "$ref" in schema and node_types is None:
            node_types = self._ref(schema["$ref"], where).types
        if ("const" in schema or "enum" in schema) and node_types is None:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            node_types = frozenset(t for t, test in _TYPE_TESTS.items() for e in values if test(e))
        return _Node(check, errors, node_types, _describe(schema), int_range if check is fused else None)

    # -- type --

    def _types(self, schema: dict[str, Any], where: str) -> frozenset[str] | None:
        if "type" not in schema:
            return None
        raw = schema["type"]
        names = [raw] if isinstance(raw, str) else raw
        if not isinstance(names, list) or not names or any(n not in _TYPE_TESTS for n in names):
            raise ValueError(f"schema at {where}: 'type' must be a JSON type name or a list of them, found {raw!r}")
        out = frozenset(names)
        # "number" accepts integers too; record it so anyOf relevance and fusing see it.
        return out | {"integer"} if "number" in out else out

    @staticmethod
    def _type_test(types: frozenset[str]) -> Check:
        if "number" in types:
            types = types - {"integer"}  # implied by "number"
        tests = [_TYPE_TESTS[t] for t in sorted(types)]
        if len(tests) == 1:
            return tests[0]
        if len(types) == 2 and "null" in types:
            (other,) = [_TYPE_TESTS[t] for t in types if t != "null"]

            def nullable(v: Any) -> bool:
                return v is None or other(v)

            return nullable

        def check(v: Any) -> bool:
            return any(t(v) for t in tests)

        return check

    def _type_errors(self, types: frozenset[str] | None) -> tuple[Check, str] | None:
        if types is None:
            return None
        shown = sorted(types - {"integer"}) if "number" in types else sorted(types)
        return self._type_test(types), " or ".join(shown)

    def _fuse(
        self,
        types: frozenset[str] | None,
        kinds: list[tuple[str, Check, Builder, ErrorGen]],
        int_range: tuple[int, int] | None,
    ) -> Check:
        """One check for ``type`` plus the type-specific keywords, specialised for common shapes."""
        if int_range is not None:
            lo, hi = int_range

            def integer_in_range(v: Any) -> bool:
                if type(v) is int:
                    return lo <= v <= hi
                return _is_integer(v) and not (v < lo or v > hi)

            return integer_in_range
        kind_of = {"object": "object", "array": "array", "string": "string", "integer": "number", "number": "number"}
        if len(kinds) == 1:
            kind, _, build, _ = kinds[0]
            if types is None:
                return build(True)
            if len(types) == 2 and "null" in types and kind_of.get(min(types - {"null"})) == kind != "number":
                # e.g. {"type": ["string", "null"], "maxLength": ...}
                strict = build(False)

                def nullable(v: Any) -> bool:
                    return v is None or strict(v)

                return nullable
            if len(types) == 1 or types <= {"integer", "number"}:
                (only,) = {kind_of.get(t) for t in types}
                if only == kind:
                    if types == {"integer"}:
                        return _all_of([_is_integer, build(True)])
                    return build(False)
        if not kinds:
            return _true if types is None else self._type_test(types)
        # General case (several kinds, or types mixing kinds): rare, so kept simple.
        return _all_of([_true if types is None else self._type_test(types), *(build(True) for _, _, build, _ in kinds)])

    # -- applicators --

    def _applicators(self, schema: dict[str, Any], where: str) -> list[tuple[Check, ErrorGen]]:
        out: list[tuple[Check, ErrorGen]] = []
        if "const" in schema:
            out.append(self._enum([schema["const"]], where, const=True))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list):
                raise ValueError(f"schema at {where}: 'enum' must be an array, found {values!r}")
            out.append(self._enum(values, where, const=False))
        if "$ref" in schema:
            target = self._ref(schema["$ref"], where)

            def ref_errors(v: Any, loc: Loc) -> Iterator[SchemaViolation]:
                return _descend(target, v, loc)

            # A recursive target is a forwarding node, so its check is safe to take now.
            out.append((target.check, ref_errors))
        for word in ("anyOf", "oneOf"):
            if word in schema:
                branches = schema[word]
                if not isinstance(branches, list) or not branches:
                    raise ValueError(f"schema at {where}: {word!r} must be a non-empty array")
                nodes = [self.compile(b, f"{where}/{word}/{i}") for i, b in enumerate(branches)]
                check, errors = self._any_of(nodes) if word == "anyOf" else self._one_of(nodes)
                out.append((_by_presence({word: branches}, check), errors))
        if "not" in schema:
            check, errors = self._not(self.compile(schema["not"], f"{where}/not"))
            out.append((_by_presence({"not": schema["not"]}, check), errors))
        return out

    @staticmethod
    def _enum(values: list[Any], where: str, *, const: bool) -> tuple[Check, ErrorGen]:
        if values and all(type(e) is str for e in values):
            if len(values) == 1:
                (only,) = values

                def check(v: Any) -> bool:
                    return isinstance(v, str) and v == only

            else:
                allowed = frozenset(values)

                def check(v: Any) -> bool:
                    return isinstance(v, str) and v in allowed

        else:
            frozen = tuple(values)

            def check(v: Any) -> bool:
                return any(_json_equal(e, v) for e in frozen)

        if const:
            expected = _literal(values[0])
        else:
            expected = "one of " + ", ".join(_literal(e) for e in values) if values else "nothing (the enum is empty)"

        def errors(v: Any, loc: Loc) -> Iterator[SchemaViolation]:
            if not check(v):
                yield SchemaViolation(_json_path(loc), f"expected {expected}, found {_found(v)}")

        return check, errors

    @staticmethod
    def _relevant(nodes: list[_Node], v: Any) -> list[_Node]:
        return [n for n in nodes if n.types is None or any(_TYPE_TESTS[t](v) for t in n.types)]

    def _any_of(self, nodes: list[_Node]) -> tuple[Check, ErrorGen]:
        checks = [n.check for n in nodes]
        if len(checks) == 2:
            a, b = checks

            def check(v: Any) -> bool:
                return a(v) or b(v)

        else:

            def check(v: Any) -> bool:
                return any(c(v) for c in checks)

        def errors(v: Any, loc: Loc) -> Iterator[SchemaViolation]:
            if not check(v):
                yield from self._none_matched(nodes, v, loc, "")

        return check, errors

    def _none_matched(self, nodes: list[_Node], v: Any, loc: Loc, exactly: str) -> Iterator[SchemaViolation]:
        relevant = self._relevant(nodes, v)
        if len(relevant) == 1:
            # Only one alternative accepts this type: its own errors are the useful ones.
            yield from relevant[0].errors(v, loc)
            return
        alternatives = " or ".join(f"({n.description})" for n in nodes)
        yield SchemaViolation(_json_path(loc), f"expected {exactly}{alternatives}, found {_found(v)}")

    def _one_of(self, nodes: list[_Node]) -> tuple[Check, ErrorGen]:
        checks = [n.check for n in nodes]
        if len(checks) == 2:
            a, b = checks

            def check(v: Any) -> bool:
                # Exactly one of two booleans holds iff they differ.
                return a(v) is not b(v)

        else:

            def check(v: Any) -> bool:
                seen = False
                for c in checks:
                    if c(v):
                        if seen:
                            return False
                        seen = True
                return seen

        def errors(v: Any, loc: Loc) -> Iterator[SchemaViolation]:
            matching = [n for n in nodes if n.check(v)]
            if len(matching) == 1:
                return
            if not matching:
                yield from self._none_matched(nodes, v, loc, "exactly one of ")
                return
            both = " and ".join(f"({n.description})" for n in matching)
            yield SchemaViolation(
                _json_path(loc),
                f"expected exactly one of {' or '.join(f'({n.description})' for n in nodes)}, "
                f"found {_found(v)} matching {both}",
            )

        return check, errors

    @staticmethod
    def _not(inner: _Node) -> tuple[Check, ErrorGen]:
        ic = inner.check

        def check(v: Any) -> bool:
            return not ic(v)

        def errors(v: Any, loc: Loc) -> Iterator[SchemaViolation]:
            if ic(v):
                yield SchemaViolation(_json_path(loc), f"expected not ({inner.description}), found {_found(v)}")

        return check, errors

    # -- $ref --

    def _ref(self, ref: Any, where: str) -> _Node:
        if not isinstance(ref, str):
            raise ValueError(f"schema at {where}: '$ref' must be a string, found {ref!r}")
        node = self._refs.get(ref)
        if node is not None:
            return node
        if ref in self._in_progress:
            # A recursive reference: look the target up when called, once it is compiled.
            refs = self._refs

            def forward_check(v: Any) -> bool:
                return refs[ref].check(v)

            def forward_errors(v: Any, loc: Loc) -> Iterator[SchemaViolation]:
                return refs[ref].errors(v, loc)

            return _Node(forward_check, forward_errors, None, ref.rsplit("/", 1)[-1])
        self._in_progress.add(ref)
        node = self.compile(self._resolve(ref, where), ref)
        self._in_progress.discard(ref)
        self._refs[ref] = node
        return node

    def _resolve(self, ref: str, where: str) -> Any:
        if not ref.startswith("#") or (len(ref) > 1 and not ref.startswith("#/")):
            raise ValueError(f"schema at {where}: only local JSON-pointer refs ('#/...') are supported, found {ref!r}")
        target = self._root
        for raw in ref[2:].split("/") if len(ref) > 1 else []:
            token = unquote(raw).replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and token in target:
                target = target[token]
            elif isinstance(target, list) and token.isdigit() and int(token) < len(target):
                target = target[int(token)]
            else:
                raise ValueError(f"schema at {where}: '$ref' {ref!r} points at nothing")
        return target

    # -- objects --

    def _object(self, schema: dict[str, Any], where: str) -> tuple[Builder, ErrorGen]:
        props_raw = schema.get("properties", {})
        if not isinstance(props_raw, dict):
            raise ValueError(f"schema at {where}: 'properties' must be an object")
        props = {k: self.compile(s, f"{where}/properties/{k}") for k, s in props_raw.items()}
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
            raise ValueError(f"schema at {where}: 'required' must be an array of strings, found {required!r}")
        req = frozenset(required)
        pattern_raw = schema.get("patternProperties", {})
        if not isinstance(pattern_raw, dict):
            raise ValueError(f"schema at {where}: 'patternProperties' must be an object")
        patterns = [
            (self._regex(p, where).search, self.compile(s, f"{where}/patternProperties/{p}"))
            for p, s in pattern_raw.items()
        ]
        addl = (
            self.compile(schema["additionalProperties"], f"{where}/additionalProperties")
            if "additionalProperties" in schema
            else None
        )
        names = self.compile(schema["propertyNames"], f"{where}/propertyNames") if "propertyNames" in schema else None

        prop_checks = {k: n.check for k, n in props.items()}
        default = _true if addl is None else addl.check
        name_check = None if names is None or names.check is _true else names.check
        pattern_checks = [(search, n.check) for search, n in patterns]
        loop_needed = bool(props) or default is not _true or bool(patterns)

        def build(other: bool) -> Check:
            """The object check; ``other`` is the answer for non-objects."""
            if patterns:

                def with_patterns(v: Any) -> bool:
                    if not isinstance(v, dict):
                        return other
                    if req and not v.keys() >= req:
                        return False
                    for k, x in v.items():
                        if name_check is not None and not name_check(k):
                            return False
                        f = prop_checks.get(k)
                        matched = f is not None
                        if matched and not f(x):  # type: ignore[misc]
                            return False
                        for search, pcheck in pattern_checks:
                            if search(k):
                                matched = True
                                if not pcheck(x):
                                    return False
                        if not matched and not default(x):
                            return False
                    return True

                return with_patterns
            get = prop_checks.get
            if not prop_checks and default is not _true:
                # A map such as "tensors": every value against one schema.
                if name_check is not None:

                    def map_with_names(v: Any) -> bool:
                        if not isinstance(v, dict):
                            return other
                        if req and not v.keys() >= req:
                            return False
                        # Two passes driven from C (map) beat one Python-level loop.
                        return all(map(name_check, v)) and all(map(default, v.values()))

                    return map_with_names

                def map_values(v: Any) -> bool:
                    if not isinstance(v, dict):
                        return other
                    if req and not v.keys() >= req:
                        return False
                    return all(map(default, v.values()))

                return map_values

            def record(v: Any) -> bool:
                if not isinstance(v, dict):
                    return other
                if req and not v.keys() >= req:
                    return False
                if loop_needed:
                    for k, x in v.items():
                        if not get(k, default)(x):
                            return False
                if name_check is not None:
                    for k in v:
                        if not name_check(k):
                            return False
                return True

            return record

        allowed = ", ".join(_literal(k) for k in props) or "none"

        def errors(v: Any, loc: Loc) -> Iterator[SchemaViolation]:
            for k in required:
                if k not in v:
                    yield SchemaViolation(_json_path(loc), f"expected property {_literal(k)}, found it missing")
            for k, x in v.items():
                if names is not None and not names.check(k):
                    for e in names.errors(k, (*loc, k)):
                        yield SchemaViolation(e.json_path, f"invalid property name: {e.message}")
                matched = False
                node = props.get(k)
                if node is not None:
                    matched = True
                    yield from _descend(node, x, (*loc, k))
                for search, pnode in patterns:
                    if search(k):
                        matched = True
                        yield from _descend(pnode, x, (*loc, k))
                if not matched and addl is not None:
                    if addl is _FALSE_NODE:
                        yield SchemaViolation(
                            _json_path((*loc, k)),
                            f"expected only the properties {allowed}, found unknown property {_literal(k)}",
                        )
                    else:
                        yield from _descend(addl, x, (*loc, k))

        return build, errors

    # -- arrays --

    def _array(self, schema: dict[str, Any], where: str) -> tuple[Builder, ErrorGen]:
        lo = self._count(schema, "minItems", where, 0)
        hi = self._count(schema, "maxItems", where, sys.maxsize)
        prefix_raw = schema.get("prefixItems", [])
        if not isinstance(prefix_raw, list):
            raise ValueError(f"schema at {where}: 'prefixItems' must be an array")
        prefix = [self.compile(s, f"{where}/prefixItems/{i}") for i, s in enumerate(prefix_raw)]
        item = self.compile(schema["items"], f"{where}/items") if "items" in schema else None
        np_ = len(prefix)
        prefix_checks = tuple(n.check for n in prefix)
        item_check = None if item is None or item.check is _true else item.check
        item_range = None if item is None else item.int_range

        def build(other: bool) -> Check:
            if not prefix_checks and item_range is not None:
                ilo, ihi = item_range
                slow = item_check
                assert slow is not None

                def int_items(v: Any) -> bool:
                    if not isinstance(v, list):
                        return other
                    if len(v) < lo or len(v) > hi:
                        return False
                    # Inline fast path for plain ints, everything else takes the full check; an
                    # explicit loop is twice as fast as all(...) on short shapes.
                    for x in v:  # noqa: SIM110
                        if (type(x) is not int or x < ilo or x > ihi) and not slow(x):
                            return False
                    return True

                return int_items
            if not prefix_checks:

                def items_only(v: Any) -> bool:
                    if not isinstance(v, list):
                        return other
                    if len(v) < lo or len(v) > hi:
                        return False
                    return item_check is None or all(map(item_check, v))

                return items_only
            r0, r1 = (prefix[0].int_range, prefix[1].int_range) if np_ == 2 else (None, None)
            if np_ == 2 and lo >= 2 and item_check is None and r0 is not None and r1 is not None:
                p0, p1 = prefix_checks
                (lo0, hi0), (lo1, hi1) = r0, r1

                def int_pair(v: Any) -> bool:
                    if not isinstance(v, list):
                        return other
                    if len(v) < lo or len(v) > hi:
                        return False
                    a, b = v[0], v[1]
                    if type(a) is int and type(b) is int:
                        return lo0 <= a <= hi0 and lo1 <= b <= hi1
                    return p0(a) and p1(b)

                return int_pair
            if np_ == 2 and lo >= 2 and item_check is None:
                p0, p1 = prefix_checks

                def pair(v: Any) -> bool:
                    if not isinstance(v, list):
                        return other
                    if len(v) < lo or len(v) > hi:
                        return False
                    return p0(v[0]) and p1(v[1])

                return pair

            def general(v: Any) -> bool:
                if not isinstance(v, list):
                    return other
                if len(v) < lo or len(v) > hi:
                    return False
                for f, x in zip(prefix_checks, v, strict=False):  # shorter arrays are fine
                    if not f(x):
                        return False
                if item_check is not None:
                    for x in islice(v, np_, None):
                        if not item_check(x):
                            return False
                return True

            return general

        def errors(v: Any, loc: Loc) -> Iterator[SchemaViolation]:
            if len(v) < lo:
                yield SchemaViolation(_json_path(loc), f"expected at least {_plural(lo, 'item')}, found {len(v)}")
            if len(v) > hi:
                yield SchemaViolation(_json_path(loc), f"expected at most {_plural(hi, 'item')}, found {len(v)}")
            for i, (node, x) in enumerate(zip(prefix, v, strict=False)):
                yield from _descend(node, x, (*loc, i))
            if item is not None:
                for i in range(np_, len(v)):
                    yield from _descend(item, v[i], (*loc, i))

        return build, errors

    # -- strings --

    def _string(self, schema: dict[str, Any], where: str) -> tuple[Builder, ErrorGen]:
        lo = self._count(schema, "minLength", where, 0)
        hi = self._count(schema, "maxLength", where, sys.maxsize)
        pattern = schema.get("pattern")
        search = None if pattern is None else self._regex(pattern, where).search

        def build(other: bool) -> Check:
            if search is None:

                def lengths(v: Any) -> bool:
                    return lo <= len(v) <= hi if isinstance(v, str) else other

                return lengths
            if lo == 0 and hi == sys.maxsize:

                def matches(v: Any) -> bool:
                    return search(v) is not None if isinstance(v, str) else other

                return matches

            def both(v: Any) -> bool:
                return (lo <= len(v) <= hi and search(v) is not None) if isinstance(v, str) else other

            return both

        def errors(v: Any, loc: Loc) -> Iterator[SchemaViolation]:
            if len(v) < lo:
                yield SchemaViolation(
                    _json_path(loc), f"expected a string of at least {_plural(lo, 'character')}, found {_found(v)}"
                )
            if len(v) > hi:
                yield SchemaViolation(
                    _json_path(loc),
                    f"expected a string of at most {_plural(hi, 'character')}, found one of {len(v)} characters",
                )
            if search is not None and search(v) is None:
                yield SchemaViolation(
                    _json_path(loc), f"expected a string matching the pattern {pattern}, found {_found(v)}"
                )

        return build, errors

    # -- numbers --

    def _number(self, lo: Any, hi: Any) -> tuple[Builder, ErrorGen]:
        # Written as "not (v < lo)" because that is the reference's test: NaN passes it.
        if lo is not None and hi is not None:

            def check(v: Any) -> bool:
                return not (v < lo or v > hi)

        elif lo is not None:

            def check(v: Any) -> bool:
                return not v < lo

        elif hi is not None:

            def check(v: Any) -> bool:
                return not v > hi

        else:  # pragma: no cover - _NUMBER_KEYWORDS guarantees one bound
            check = _true

        def build(other: bool) -> Check:
            def number(v: Any) -> bool:
                return check(v) if _is_number(v) else other

            return number

        def errors(v: Any, loc: Loc) -> Iterator[SchemaViolation]:
            if lo is not None and v < lo:
                yield SchemaViolation(_json_path(loc), f"expected a number >= {lo!r}, found {_found(v)}")
            if hi is not None and v > hi:
                yield SchemaViolation(_json_path(loc), f"expected a number <= {hi!r}, found {_found(v)}")

        return build, errors

    # -- keyword values --

    @staticmethod
    def _number_bound(schema: dict[str, Any], word: str, where: str) -> Any:
        value = schema.get(word)
        if value is not None and not _is_number(value):
            raise ValueError(f"schema at {where}: {word!r} must be a number, found {value!r}")
        return value

    @staticmethod
    def _count(schema: dict[str, Any], word: str, where: str, default: int) -> int:
        value = schema.get(word, default)
        if not _is_integer(value) or value < 0:
            raise ValueError(f"schema at {where}: {word!r} must be a non-negative integer, found {value!r}")
        return int(value)

    @staticmethod
    def _regex(pattern: Any, where: str) -> re.Pattern[str]:
        if not isinstance(pattern, str):
            raise ValueError(f"schema at {where}: a pattern must be a string, found {pattern!r}")
        try:
            return re.compile(pattern)
        except re.error as exc:
            raise ValueError(
                f"schema at {where}: pattern {pattern!r} is not a valid regular expression: {exc}"
            ) from exc


# --- the manifest schema ----------------------------------------------------------------


@cache
def _compiled() -> CompiledSchema:
    """The manifest schema, compiled once per process."""
    return compile_schema(_schema())


@cache
def _reference() -> Validator:
    """The reference ``jsonschema`` validator; imported lazily, as it is slow to import."""
    from jsonschema import Draft202012Validator

    validator: Validator = Draft202012Validator(_schema())
    return validator


def iter_errors(document: Any) -> Iterator[SchemaViolation]:
    """Yield every way ``document`` breaks the manifest schema (at most ``MAX_ERRORS``).

    Args:
        document: a parsed ``manifest.json``.

    Returns:
        An iterator of violations in document order; empty when the document is valid.

    Raises:
        ValueError: the schema file uses a keyword the compiler does not support.
    """
    return _compiled().iter_errors(document)


def validate(document: Any, *, file: str | None = None) -> None:
    """Check ``document`` against the manifest schema; raise once with every problem found.

    Args:
        document: a parsed ``manifest.json``.
        file: the manifest's path, named in the error.

    Raises:
        ManifestError: the document breaks the schema; ``.field`` is the JSON path of the
            first violation and the message lists up to ten as "path: expected X, found Y".
    """
    compiled = _compiled()
    if compiled.is_valid(document):
        return
    violations = list(compiled.iter_errors(document))
    if not violations:  # pragma: no cover - the test-suite checks this cannot happen
        # The fast check and the explainer disagree: let the reference decide and explain.
        violations = [
            SchemaViolation(_json_path(tuple(e.absolute_path)), e.message)
            for e in islice(_reference().iter_errors(document), MAX_ERRORS)
        ]
        if not violations:
            return
    where = f" {file}" if file else ""
    more = "+" if len(violations) >= MAX_ERRORS else ""
    count = f"{len(violations)}{more} problem{'' if len(violations) == 1 else 's'}"
    lines = [f"manifest{where} does not follow the manifest-ckpt format v1 schema ({count}):"]
    lines += [f"  {v}" for v in violations[:_SHOWN_ERRORS]]
    if len(violations) > _SHOWN_ERRORS:
        lines.append(f"  ... and {len(violations) - _SHOWN_ERRORS}{more} more")
    lines.append(_WHAT_TO_DO)
    raise ManifestError("\n".join(lines), file=file, field=violations[0].json_path)
