"""Validate manifest documents against ``schema/manifest-v1.schema.json``, fast.

The JSON Schema file is the single source of truth. Documents are validated by
jsonschema-rs, a Rust implementation of draft 2020-12 that passes the official JSON-Schema
test suite (about 0.1 s for a 100,000-tensor manifest, where the pure-Python ``jsonschema``
takes seconds); ``jsonschema`` stays the reference the test-suite compares it with. Two
places where they differ, both on input ``json.loads`` never produces or the writer never
writes: ``pattern`` follows ECMA-262, so ``$`` does not match before a trailing newline
(Python's ``re.search`` does: the reference accepts ``"sha256:...\\n"``, this refuses it),
and a Python tuple in a document built in memory counts as the JSON array it serialises to.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import jsonschema_rs

from manifest_ckpt.errors import ManifestError

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

__all__ = [
    "MAX_ERRORS",
    "SCHEMA_NAME",
    "SchemaViolation",
    "is_valid",
    "iter_errors",
    "load_schema",
    "schema_text",
    "validate",
]

SCHEMA_NAME: Final = "manifest-v1.schema.json"
MAX_ERRORS: Final = 50
_SHOWN_ERRORS: Final = 10
# jsonschema-rs quotes the whole failing instance in some messages (oneOf over a tensor).
_MESSAGE_LIMIT: Final = 300
_WHAT_TO_DO: Final = (
    "The manifest was edited by hand or written by a newer/other tool; "
    "re-save the checkpoint or run `manifest-ckpt verify`."
)

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class SchemaViolation:
    """One place where a document breaks the schema."""

    json_path: str
    message: str

    def __str__(self) -> str:
        return f"{self.json_path}: {self.message}"


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
    """The parsed schema, shared by both validators (never mutated)."""
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


# --- messages ----------------------------------------------------------------------------


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


def _short(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _found(v: Any) -> str:
    """A short description of an instance (jsonschema-rs quotes whole subtrees)."""
    if isinstance(v, dict):
        names = ", ".join(json.dumps(k) for k in islice(sorted(v, key=str), 8))
        return f"an object with keys {names}{', ...' if len(v) > 8 else ''}" if v else "an empty object"
    if isinstance(v, list):
        return f"an array of {len(v)} item{'' if len(v) == 1 else 's'}"
    return _short(json.dumps(v, default=repr), 80)


def _violations(error: Any) -> Iterator[SchemaViolation]:
    """A jsonschema-rs error as violations at exact JSON paths (each unknown key at its own), bounded."""
    loc: Loc = tuple(error.instance_path)
    kind = type(error.kind).__name__
    keyword = "#/" + "/".join(str(p) for p in error.schema_path)
    if kind == "PropertyNames":
        inner = error.kind.error  # the key is the instance of the inner error
        yield SchemaViolation(_json_path((*loc, inner.instance)), "invalid property name: " + _short(inner.message))
        return
    if kind == "AdditionalProperties":
        allowed = ", ".join(json.dumps(k) for k in _schema_at(error.schema_path[:-1]).get("properties", {}))
        for key in error.kind.unexpected:
            yield SchemaViolation(_json_path((*loc, key)), f"is not an allowed property (allowed: {_short(allowed, 120)})")
        return
    if kind == "OneOfNotValid":
        message = f"matches none of the alternatives of {keyword}, found {_found(error.instance)}"
    elif kind == "OneOfMultipleValid":
        message = f"matches more than one alternative of {keyword}, found {_found(error.instance)}"
    elif kind == "AnyOf":
        message = f"matches none of the alternatives of {keyword}, found {_found(error.instance)}"
    else:
        message = _short(error.message)
    yield SchemaViolation(_json_path(loc), message)


def _schema_at(schema_path: Any) -> dict[str, Any]:
    """The subschema at a jsonschema-rs schema path (``$ref`` already followed by the path)."""
    node: Any = _schema()
    try:
        for part in schema_path:
            node = node[part] if isinstance(node, dict) else node[int(part)]
    except (KeyError, IndexError, ValueError, TypeError):
        return {}  # only the message's list of allowed names depends on it
    return node if isinstance(node, dict) else {}


# --- the manifest schema ----------------------------------------------------------------


@cache
def _validator() -> Any:
    """The manifest schema as a jsonschema-rs validator, built once per process."""
    return jsonschema_rs.Draft202012Validator(_schema())


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
        An iterator of violations; empty when the document is valid.
    """
    try:
        found = list(
            islice((v for e in _validator().iter_errors(document) for v in _violations(e)), MAX_ERRORS)
        )
    except ValueError:
        # A value JSON cannot hold (a str or dict subclass, a set) in a document built in
        # memory: jsonschema-rs refuses the type itself; the reference names where it is.
        found = [
            SchemaViolation(_json_path(tuple(e.absolute_path)), _short(e.message))
            for e in islice(_reference().iter_errors(document), MAX_ERRORS)
        ]
    return iter(found)


def is_valid(document: Any) -> bool:
    """Whether ``document`` follows the manifest schema (no error is built: the quick check)."""
    try:
        return bool(_validator().is_valid(document))
    except ValueError:
        return False  # a value JSON cannot hold: validate() explains it


def validate(document: Any, *, file: str | None = None) -> None:
    """Check ``document`` against the manifest schema; raise once with every problem found.

    Args:
        document: a parsed ``manifest.json``.
        file: the manifest's path, named in the error.

    Raises:
        ManifestError: the document breaks the schema; ``.field`` is the JSON path of the
            first violation and the message lists up to ten as "path: what is wrong".
    """
    try:
        if _validator().is_valid(document):
            return
    except ValueError:
        pass  # a non-JSON Python value: iter_errors explains it through the reference
    violations = list(iter_errors(document))
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
