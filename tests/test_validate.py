"""Tests for manifest_ckpt.format.schema: the compiled JSON Schema validator of manifest.json."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from manifest_ckpt.format import schema as _validate
from manifest_ckpt.format.schema import (
    MAX_ERRORS,
    SCHEMA_NAME,
    SchemaViolation,
    compile_schema,
    iter_errors,
    load_schema,
    schema_text,
    validate,
)
from manifest_ckpt.errors import ManifestError

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Draft202012Validator(load_schema())
COMPILED = compile_schema(load_schema())


def _digest(seed: str) -> str:
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def _module(*parameters: str, cls: str | None = "torch.nn.Linear") -> dict[str, Any]:
    return {"class": cls, "version": None, "parameters": list(parameters), "buffers": [], "non_persistent_buffers": []}


def make_manifest() -> dict[str, Any]:
    """A hand-built valid manifest: plain tensors, a chunked tensor, an alias, modules, lineage."""
    return {
        "format": "manifest-ckpt",
        "format_version": "1.0.0",
        "digest": _digest("manifest"),
        "record_digest": _digest("record"),
        "files": {
            "model.safetensors": {"size": 4096, "header_sha256": "0" * 64},
            "shards/part-1.safetensors": {"size": 2048, "header_sha256": "f" * 64},
        },
        "tensors": {
            "fc.weight": {
                "dtype": "float32",
                "shape": [4, 3],
                "digest": _digest("fc.weight"),
                "file": "model.safetensors",
                "byte_range": [0, 48],
            },
            "fc.bias": {
                "dtype": "bfloat16",
                "shape": [4],
                "digest": _digest("fc.bias"),
                "file": "model.safetensors",
                "byte_range": [48, 56],
            },
            "emb.weight": {
                "dtype": "float16",
                "shape": [8, 2],
                "digest": _digest("emb.weight"),
                "chunks": [
                    {
                        "offsets": [0, 0],
                        "shape": [4, 2],
                        "file": "model.safetensors",
                        "byte_range": [64, 80],
                        "digest": _digest("chunk0"),
                    },
                    {
                        "offsets": [4, 0],
                        "shape": [4, 2],
                        "file": "shards/part-1.safetensors",
                        "byte_range": [0, 16],
                        "digest": _digest("chunk1"),
                    },
                ],
            },
        },
        "aliases": {"head.weight": "emb.weight"},
        "modules": {
            "": _module(cls="my.Net"),
            "fc": _module("weight", "bias"),
            "emb": _module("weight", cls=None),
        },
        "lineage": {
            "created_by": {"manifest_ckpt": "0.1.0", "torch": "2.13.0", "python": "3.11.9", "numpy": "2.1"},
            "code": {"git_commit": "a" * 40, "git_dirty": False},
            "created_at": "2024-01-01T00:00:00Z",
            "parents": [{"digest": _digest("parent"), "relation": "fine-tuned-from", "name": "base"}],
            "source": {"format": "pth"},
            "user": ["anything", {"goes": 1}],
        },
        "metadata": {"note": [1, 2.5, None, True]},
    }


def make_state_dict_manifest() -> dict[str, Any]:
    """A minimal valid manifest saved from a plain state dict (modules null, no optional fields)."""
    doc = make_manifest()
    doc["modules"] = None
    doc["aliases"] = {}
    del doc["metadata"]
    doc["lineage"] = {"created_by": {"manifest_ckpt": "0.1.0", "torch": "2.13.0", "python": "3.11.9"}, "parents": []}
    return doc


def _errors(doc: Any) -> list[SchemaViolation]:
    return list(iter_errors(doc))


# --- valid documents ----------------------------------------------------------------------


@pytest.mark.parametrize("build", [make_manifest, make_state_dict_manifest])
def test_valid_manifests_pass(build: Any) -> None:
    """Hand-built valid manifests pass validate(), yield no errors, and the reference agrees."""
    doc = build()
    assert REFERENCE.is_valid(doc)
    assert COMPILED.is_valid(doc) is True
    assert _errors(doc) == []
    validate(doc, file="x/manifest.json")  # does not raise


def test_integral_float_is_an_integer() -> None:
    """A JSON integer written as 48.0 is an integer, as in the reference validator."""
    doc = make_manifest()
    doc["tensors"]["fc.weight"]["byte_range"] = [0, 48.0]
    assert REFERENCE.is_valid(doc) and COMPILED.is_valid(doc)


# --- errors -------------------------------------------------------------------------------


def test_negative_dimension_names_its_json_path() -> None:
    """A negative shape entry is reported at its exact JSON path, with expected and found."""
    doc = make_manifest()
    doc["tensors"]["fc.weight"]["shape"][1] = -3
    assert _errors(doc) == [
        SchemaViolation('$.tensors["fc.weight"].shape[1]', "expected a number >= 0, found integer -3")
    ]
    with pytest.raises(ManifestError) as caught:
        validate(doc, file="ckpt/manifest.json")
    err = caught.value
    assert err.field == '$.tensors["fc.weight"].shape[1]'
    assert err.file == "ckpt/manifest.json"
    assert str(err) == (
        "manifest ckpt/manifest.json does not follow the manifest-ckpt format v1 schema (1 problem):\n"
        '  $.tensors["fc.weight"].shape[1]: expected a number >= 0, found integer -3\n'
        "The manifest was edited by hand or written by a newer/other tool; "
        "re-save the checkpoint or run `manifest-ckpt verify`."
    )


def test_bool_is_not_an_integer() -> None:
    """``true`` where a size is expected is a type error, although bool subclasses int in Python."""
    doc = make_manifest()
    doc["files"]["model.safetensors"]["size"] = True
    assert not REFERENCE.is_valid(doc)
    assert _errors(doc) == [
        SchemaViolation('$.files["model.safetensors"].size', "expected integer, found true"),
    ]


def test_unknown_and_missing_properties_are_named() -> None:
    """An unknown tensor field and a missing top-level field are both reported, in document order."""
    doc = make_manifest()
    doc["tensors"]["fc.bias"]["strides"] = [1]
    del doc["lineage"]
    assert _errors(doc) == [
        SchemaViolation("$", 'expected property "lineage", found it missing'),
        SchemaViolation(
            '$.tensors["fc.bias"].strides',
            'expected only the properties "dtype", "shape", "digest", "file", "byte_range", "chunks", '
            'found unknown property "strides"',
        ),
    ]


def test_file_and_chunks_together_break_one_of() -> None:
    """A tensor with both ``file`` and ``chunks`` violates the oneOf and says which alternatives it matched."""
    doc = make_manifest()
    doc["tensors"]["emb.weight"]["file"] = "model.safetensors"
    doc["tensors"]["emb.weight"]["byte_range"] = [0, 4]
    (violation,) = _errors(doc)
    assert violation.json_path == '$.tensors["emb.weight"]'
    assert violation.message.startswith(
        'expected exactly one of (with "file", "byte_range" and without "chunks") or '
        '(with "chunks" and without any of "file", "byte_range"), found an object with keys'
    )


def test_tensor_without_location_breaks_one_of() -> None:
    """A tensor with neither file nor chunks is reported at the tensor."""
    doc = make_manifest()
    del doc["tensors"]["fc.bias"]["file"]
    assert [v.json_path for v in _errors(doc)] == ['$.tensors["fc.bias"]']


@pytest.mark.parametrize("bad", ["../x.safetensors", "/abs.safetensors", "a/./b", "a//b", ".hidden", ""])
def test_escaping_file_names_are_rejected(bad: str) -> None:
    """File names that are absolute or contain '.'/'..'/empty segments are rejected as keys and as values."""
    doc = make_manifest()
    doc["files"][bad] = doc["files"].pop("model.safetensors")
    doc["tensors"]["fc.weight"]["file"] = bad
    assert not REFERENCE.is_valid(doc)
    paths = [v.json_path for v in _errors(doc)]
    assert paths == [f"$.files[{json.dumps(bad)}]", '$.tensors["fc.weight"].file']
    assert _errors(doc)[0].message.startswith("invalid property name: expected a string matching")


def test_wrong_digest_format_quotes_the_value() -> None:
    """An upper-case digest is reported with the pattern and the value found."""
    doc = make_manifest()
    doc["digest"] = doc["digest"].upper()
    (violation,) = _errors(doc)
    assert violation.json_path == "$.digest"
    assert violation.message == (
        f"expected a string matching the pattern ^sha256:[0-9a-f]{{64}}$, found string {json.dumps(doc['digest'])}"
    )


def test_modules_of_wrong_type_names_the_alternatives() -> None:
    """``modules`` as an array matches neither null nor an object, and the message says so."""
    doc = make_manifest()
    doc["modules"] = []
    assert _errors(doc) == [
        SchemaViolation(
            "$.modules",
            "expected (null) or (object and constrained by additionalProperties), found an array of 0 items",
        )
    ]


def test_errors_are_bounded_and_message_shows_ten() -> None:
    """With 200 bad tensors iter_errors stops at MAX_ERRORS and validate lists ten of them."""
    doc = make_manifest()
    for i in range(200):
        doc["tensors"][f"t{i}"] = {"dtype": "float99", "shape": [], "digest": _digest(str(i)), "chunks": []}
    errors = _errors(doc)
    assert len(errors) == MAX_ERRORS
    with pytest.raises(ManifestError) as caught:
        validate(doc)
    lines = str(caught.value).splitlines()
    assert lines[0] == "manifest does not follow the manifest-ckpt format v1 schema (50+ problems):"
    assert lines[1] == f"  {errors[0]}"
    assert lines[11] == "  ... and 40+ more"
    assert caught.value.field == "$.tensors.t0.dtype"


def test_non_object_document() -> None:
    """A document that is not an object gets one violation at the root."""
    assert _errors([1, 2]) == [SchemaViolation("$", "expected object, found an array of 2 items")]


def test_python_tuple_is_not_a_json_array() -> None:
    """Only lists are arrays (as in jsonschema): a tuple shape built in memory is rejected and named."""
    doc = make_manifest()
    doc["tensors"]["fc.bias"]["shape"] = (4,)
    assert not REFERENCE.is_valid(doc)
    assert _errors(doc) == [
        SchemaViolation('$.tensors["fc.bias"].shape', "expected array, found a Python tuple (4,) (not a JSON value)")
    ]


# --- the schema file ----------------------------------------------------------------------


def test_schema_text_and_load_schema_read_the_repository_file() -> None:
    """In a source checkout the schema comes from schema/ and load_schema returns a private copy."""
    text = (REPO / "schema" / SCHEMA_NAME).read_text(encoding="utf-8")
    assert schema_text() == text
    first = load_schema()
    assert first == json.loads(text)
    first["properties"].clear()
    assert load_schema() == json.loads(text)


def test_packaged_schema_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the installed package carries schema/ (as the wheel does), that copy is read."""
    (tmp_path / "schema").mkdir()
    (tmp_path / "schema" / SCHEMA_NAME).write_text('{"title": "packaged"}', encoding="utf-8")
    monkeypatch.setattr("manifest_ckpt.format.schema.resources", SimpleNamespace(files=lambda package: tmp_path))
    _validate.schema_text.cache_clear()
    _validate._schema.cache_clear()
    try:
        assert schema_text() == '{"title": "packaged"}'
        assert load_schema() == {"title": "packaged"}
    finally:
        monkeypatch.undo()
        _validate.schema_text.cache_clear()
        _validate._schema.cache_clear()
    assert load_schema()["title"] == "manifest-ckpt manifest, format version 1"


def test_shipped_schema_is_a_valid_draft_2020_12_schema() -> None:
    """The schema file itself passes the draft 2020-12 metaschema."""
    Draft202012Validator.check_schema(load_schema())


# --- the compiler -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "object", "if": {"required": ["a"]}, "then": {}}, "'if', 'then'"),
        ({"properties": {"a": {"format": "uri"}}}, "'format'"),
        ({"items": {"uniqueItems": True}}, "'uniqueItems'"),
        ({"$defs": {"unused": {"exclusiveMinimum": 0}}}, "'exclusiveMinimum'"),
        ({"$ref": "#/$defs/a", "$defs": {"a": {"anyOf": [{"dependentRequired": {}}]}}}, "'dependentRequired'"),
        ({"allOf": [{}]}, "'allOf'"),
    ],
)
def test_unsupported_keywords_make_the_compiler_raise(schema: dict[str, Any], keyword: str) -> None:
    """Any keyword the compiler does not implement, wherever it sits, raises at compile time."""
    with pytest.raises(ValueError, match="unsupported keyword") as caught:
        compile_schema(schema)
    assert keyword in str(caught.value)


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"$ref": "https://example.com/s.json"}, "only local JSON-pointer refs"),
        ({"$ref": "#/$defs/missing"}, "points at nothing"),
        ({"pattern": "("}, "not a valid regular expression"),
        ({"type": "text"}, "'type' must be a JSON type name"),
        ({"minItems": -1}, "'minItems' must be a non-negative integer"),
        ({"properties": {"a": {"$id": "x"}}}, "'$id' is only supported at the root"),
    ],
)
def test_malformed_schemas_make_the_compiler_raise(schema: dict[str, Any], fragment: str) -> None:
    """Unresolvable refs, bad regexes and malformed keyword values are compile-time errors."""
    with pytest.raises(ValueError, match="schema at") as caught:
        compile_schema(schema)
    assert fragment in str(caught.value)


def test_recursive_refs_compile_once_and_validate() -> None:
    """A self-referencing definition compiles (no infinite recursion) and validates nested data."""
    schema = {
        "$ref": "#/$defs/node",
        "$defs": {
            "node": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"value": {"type": "integer"}, "child": {"$ref": "#/$defs/node"}},
            }
        },
    }
    compiled = compile_schema(schema)
    good = {"value": 1, "child": {"value": 2, "child": {"child": {}}}}
    bad = {"value": 1, "child": {"child": {"value": "x"}}}
    assert compiled.is_valid(good) is True
    assert compiled.is_valid(bad) is False
    assert list(compiled.iter_errors(bad)) == [
        SchemaViolation("$.child.child.value", 'expected integer, found string "x"')
    ]


def test_string_memo_is_sound_for_str_subclasses() -> None:
    """The memo of string verdicts ignores str subclasses and never changes a verdict."""

    class Sneaky(str):
        # Collides with "aa" in a dict although its value is "ab".
        def __hash__(self) -> int:
            return hash("aa")

        def __eq__(self, other: object) -> bool:
            return True

    compiled = compile_schema({"type": "string", "pattern": "^a+$"})
    verdicts = [compiled.is_valid(v) for v in ["aa", "aa", Sneaky("ab"), "ab", "ab", 5]]
    assert verdicts == [True, True, False, False, False, False]


# --- agreement with the reference validator -----------------------------------------------

_NASTY_VALUES: list[Any] = [
    None, True, False, 0, -1, 1.0, 1.5, 2**53 - 1, 2**53, 10**30, float("nan"), float("inf"),
    "", "x", "../x", "/abs", "a/./b", "a/b", "model.safetensors", "float32", "fine-tuned-from", "1.0.0", "01.2",
    "sha256:" + "a" * 64, "sha256:" + "a" * 64 + "\n", "sha256:" + "A" * 64, "sha256:" + "a" * 63, "a" * 64, "g" * 64,
    "x" * 1025, [], {}, [0], [1, 2], [-1, 5], [0, 1, 2], ["a"], [None], {"x": 1},
]  # fmt: skip
_NASTY_KEYS = [
    "bogus",
    "",
    "../x",
    "/abs",
    "a/../b",
    "./a",
    ".x",
    "x" * 300,
    "ok.safetensors",
    "file",
    "chunks",
    "byte_range",
]
Loc = tuple[Any, ...]


def _locations(node: Any, loc: Loc = ()) -> Iterator[Loc]:
    yield loc
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _locations(value, (*loc, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _locations(value, (*loc, i))


def _get(doc: Any, loc: Loc) -> Any:
    for part in loc:
        doc = doc[part]
    return doc


def _near(value: Any) -> list[Any]:
    """Values close to ``value`` that probe one rule each (type, bounds, pattern edges)."""
    if isinstance(value, bool):
        return [int(value), None, str(value).lower(), not value]
    if isinstance(value, int):
        return [True, False, -1, value + 0.5, float(value), 2**53 - 1, 2**53, str(value), None, float("nan")]
    if isinstance(value, str):
        return [
            "", value + "\n", value.upper(), "../" + value, "/" + value, value[:-1], value + "x",
            "./" + value, value + "/..", "a" * 1025, value.replace(".", "/", 1), " " + value,
        ]  # fmt: skip
    if isinstance(value, list):
        return [[], value + value[:1], value[:-1], [str(x) for x in value], [None], value * 3]
    if isinstance(value, dict):
        return [{}, [], None, "x"]
    return [0, "", {}, []]


@st.composite
def mutated_manifests(draw: st.DrawFn) -> Any:
    """A valid manifest after one to three random edits (tweak, delete, add, replace, rename, copy)."""
    doc: Any = copy.deepcopy(draw(st.sampled_from([make_manifest(), make_state_dict_manifest()])))
    for _ in range(draw(st.integers(1, 3))):
        locs = sorted(_locations(doc), key=repr)
        loc = draw(st.sampled_from(locs))
        op = draw(st.sampled_from(["tweak", "tweak", "tweak", "delete", "add", "replace", "rename", "copy"]))
        # Deep copies throughout: a shared mutable value edited by a later step would make
        # generation depend on earlier examples (and corrupt _NASTY_VALUES).
        if op == "tweak":
            op, value = "replace", copy.deepcopy(draw(st.sampled_from(_near(_get(doc, loc)))))
        elif op in ("add", "replace", "copy"):
            if op == "copy":
                value = copy.deepcopy(_get(doc, draw(st.sampled_from(locs))))
            else:
                value = copy.deepcopy(draw(st.sampled_from(_NASTY_VALUES)))
        target = _get(doc, loc)
        if op == "add" and isinstance(target, dict):
            keys = sorted({k for lc in locs for k in lc if isinstance(k, str)} | set(_NASTY_KEYS))
            source = draw(st.sampled_from(locs))
            target[draw(st.sampled_from(keys))] = draw(st.sampled_from([value, copy.deepcopy(_get(doc, source))]))
        elif op == "add" and isinstance(target, list):
            target.append(value)
        elif not loc:
            if op in ("replace", "copy"):
                doc = value
        else:
            parent = _get(doc, loc[:-1])
            if op == "delete":
                del parent[loc[-1]]
            elif op == "rename" and isinstance(parent, dict):
                parent[draw(st.sampled_from(_NASTY_KEYS))] = parent.pop(loc[-1])
            elif op in ("replace", "copy"):
                parent[loc[-1]] = value
    return doc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=mutated_manifests())
def test_compiled_validator_agrees_with_jsonschema_on_mutated_manifests(doc: Any) -> None:
    """For random edits of a valid manifest, compiled check, iter_errors and jsonschema agree on validity."""
    expected = REFERENCE.is_valid(doc)
    assert COMPILED.is_valid(doc) is expected
    errors = _errors(doc)
    assert (errors == []) is expected
    if not expected:
        with pytest.raises(ManifestError) as caught:
            validate(doc)
        assert caught.value.field == errors[0].json_path


def _single_edits() -> Iterator[tuple[str, Any]]:
    """Every deletion, every ``_near`` replacement and a few renames of every node of both base manifests."""
    for base in (make_manifest(), make_state_dict_manifest()):
        for loc in _locations(base):
            if not loc:
                continue
            for value in _near(_get(base, loc)):
                doc = copy.deepcopy(base)
                _get(doc, loc[:-1])[loc[-1]] = value
                yield f"{_validate._json_path(loc)}={value!r:.20}", doc
            doc = copy.deepcopy(base)
            del _get(doc, loc[:-1])[loc[-1]]
            yield f"del {_validate._json_path(loc)}", doc
            if isinstance(loc[-1], str):
                for key in ("../x", "", "bogus", "x" * 300):
                    doc = copy.deepcopy(base)
                    parent = _get(doc, loc[:-1])
                    parent[key] = parent.pop(loc[-1])
                    yield f"rename {_validate._json_path(loc)}", doc


def test_compiled_validator_agrees_with_jsonschema_on_every_single_edit() -> None:
    """Exhaustively over single edits of the example manifests, compiled and reference validity agree."""
    seen = {True: 0, False: 0}
    for label, doc in _single_edits():
        expected = REFERENCE.is_valid(doc)
        seen[expected] += 1
        assert COMPILED.is_valid(doc) is expected, label
        assert (next(iter_errors(doc), None) is None) is expected, label
    assert seen[True] > 50 and seen[False] > 1000  # both outcomes are really exercised


_SEMANTIC_EDGES: list[tuple[dict[str, Any], Any]] = [
    ({"type": "integer"}, True),
    ({"type": "integer"}, 1.0),
    ({"type": "integer"}, 1.5),
    ({"type": "integer"}, float("inf")),
    ({"type": "number"}, False),
    ({"type": "integer", "minimum": 0, "maximum": 3}, 3.0),
    ({"type": "integer", "minimum": 0, "maximum": 3}, 4.0),
    ({"type": "integer", "minimum": 0, "maximum": 3}, 2**70),
    ({"minimum": 0, "maximum": 3}, float("nan")),
    ({"minimum": 0}, float("nan")),
    ({"maximum": 0}, float("nan")),
    ({"minimum": 0}, "text"),
    ({"const": 1}, True),
    ({"const": 1}, 1.0),
    ({"const": False}, 0),
    ({"enum": [1, "a"]}, True),
    ({"enum": ["a", "b"]}, "a"),
    ({"enum": []}, None),
    ({"const": [1, {"a": True}]}, [1.0, {"a": True}]),
    ({"const": [1, {"a": True}]}, [1, {"a": 1}]),
    ({"pattern": "b$"}, "ab"),
    ({"pattern": "^a$"}, "a\n"),
    ({"pattern": "0|1"}, "x1"),
    ({"pattern": "^a"}, 5),
    ({"minLength": 2}, "\U0001f600"),
    ({"maxLength": 1}, "\U0001f600"),
    ({"required": ["a"]}, ["a"]),
    ({"properties": {"a": False}}, {"b": 1}),
    ({"properties": {"a": False}}, {"a": 1}),
    ({"patternProperties": {"^x": {"type": "null"}}, "additionalProperties": False}, {"xa": None}),
    ({"patternProperties": {"^x": {"type": "null"}}, "additionalProperties": False}, {"xa": 1}),
    ({"patternProperties": {"^x": {"type": "null"}}, "additionalProperties": False}, {"a": None}),
    ({"properties": {"xa": {"type": "null"}}, "patternProperties": {"^x": False}}, {"xa": None}),
    ({"propertyNames": False}, {}),
    ({"propertyNames": False}, {"a": 1}),
    ({"prefixItems": [{"type": "null"}], "items": False}, [None]),
    ({"prefixItems": [{"type": "null"}], "items": False}, [None, None]),
    ({"prefixItems": [{"type": "null"}, {"type": "null"}]}, [None]),
    ({"oneOf": [True, {"required": ["a"]}]}, {"a": 1}),
    ({"oneOf": [True, {"required": ["a"]}]}, 5),
    ({"oneOf": [{"required": ["a"]}, {"required": ["b"]}, {"required": ["c"]}]}, {"a": 1, "c": 2}),
    ({"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 1}]}, "ab"),
    ({"not": {"not": {"type": "array"}}}, []),
    ({"type": ["string", "null"], "maxLength": 1}, None),
    ({"type": ["string", "null"], "maxLength": 1}, "ab"),
    ({"type": ["integer", "null"]}, False),
]


@pytest.mark.parametrize(("schema", "instance"), _SEMANTIC_EDGES)
def test_semantic_edges_match_the_reference(schema: dict[str, Any], instance: Any) -> None:
    """Bool vs. integer, integral floats, NaN bounds, re.search, code-point lengths, oneOf counting: as jsonschema."""
    expected = Draft202012Validator(schema).is_valid(instance)
    compiled = compile_schema(schema)
    assert compiled.is_valid(instance) is expected
    assert (next(compiled.iter_errors(instance), None) is None) is expected


# Random schemas over the supported subset, checked against the reference on random JSON.
_KEYS = ["a", "b", "c", "1"]
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from([0.0, 1.0, -2.0, 1.5, float("nan"), 2**70])
    | st.text(alphabet="ab01/.", max_size=4)
)
_EDGE_SCALARS: list[Any] = [None, True, False, 0, 1, -1, 2, 3, 1.0, -0.0, 1.5, float("nan"), float("inf"), 2**70]
_EDGE_SCALARS += ["", "a", "b", "ab", "ba", "0", "a/b", "a\n", "\U0001f600"]
_edge_scalars = st.sampled_from(_EDGE_SCALARS)
_json_values = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(_KEYS), children, max_size=4),
    max_leaves=10,
)
# Half edge-case scalars: plain recursive generation is dominated by containers.
_instances = _edge_scalars | _json_values
_TYPES = ["null", "boolean", "integer", "number", "string", "array", "object"]
_PATTERNS = ["^a", "b$", "^[ab]+$", "0|1", "^$", "a/?b"]


def _keyword_values(word: str, sub: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    counts = st.integers(0, 3)
    table: dict[str, st.SearchStrategy[Any]] = {
        "type": st.sampled_from(_TYPES) | st.lists(st.sampled_from(_TYPES), min_size=1, max_size=3, unique=True),
        "const": _json_values,
        "enum": st.lists(_json_values, max_size=3),
        "minLength": counts,
        "maxLength": counts,
        "minItems": counts,
        "maxItems": counts,
        "minimum": st.integers(-2, 2) | st.sampled_from([0.5, -1.5]),
        "maximum": st.integers(-2, 2) | st.sampled_from([0.5, -1.5]),
        "pattern": st.sampled_from(_PATTERNS),
        "required": st.lists(st.sampled_from(_KEYS), max_size=3),
        "properties": st.dictionaries(st.sampled_from(_KEYS), sub, max_size=3),
        "patternProperties": st.dictionaries(st.sampled_from(_PATTERNS), sub, max_size=2),
        "additionalProperties": sub,
        "propertyNames": sub,
        "items": sub,
        "prefixItems": st.lists(sub, max_size=3),
        "anyOf": st.lists(sub, min_size=1, max_size=3),
        "oneOf": st.lists(sub, min_size=1, max_size=3),
        "not": sub,
        "$ref": st.just("#/$defs/d"),
    }
    return table[word]


def _schemas(depth: int, *, refs: bool) -> st.SearchStrategy[Any]:
    words = ["type", "const", "enum", "minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum"]
    words += ["pattern", "required"]
    if depth > 0:
        words += ["properties", "patternProperties", "additionalProperties", "propertyNames", "items"]
        words += ["prefixItems", "anyOf", "oneOf", "not"]
    if refs:
        words.append("$ref")
    sub = _schemas(depth - 1, refs=refs) if depth > 0 else st.booleans()

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        chosen = draw(st.lists(st.sampled_from(words), min_size=1, max_size=4, unique=True))
        return {w: draw(_keyword_values(w, sub)) for w in chosen}

    return st.booleans() | build()


@st.composite
def schemas_with_defs(draw: st.DrawFn) -> dict[str, Any]:
    """A random schema of the supported subset whose ``$ref`` (if any) points at a non-recursive definition."""
    root = draw(_schemas(2, refs=True).filter(lambda s: isinstance(s, dict)))
    return {**root, "$defs": {"d": draw(_schemas(1, refs=False))}}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=schemas_with_defs(), instances=st.lists(_instances, min_size=1, max_size=8))
def test_compiler_agrees_with_jsonschema_on_random_schemas(schema: dict[str, Any], instances: list[Any]) -> None:
    """For random schemas of the supported subset, on edge scalars and random JSON, compiled and reference agree."""
    reference = Draft202012Validator(schema)
    compiled = compile_schema(schema)
    for instance in [*_EDGE_SCALARS, *instances]:
        expected = reference.is_valid(instance)
        assert compiled.is_valid(instance) is expected, (json.dumps(schema), instance)
        assert (next(compiled.iter_errors(instance), None) is None) is expected


# --- scale --------------------------------------------------------------------------------


def test_large_manifest_validates_and_reports_its_one_error() -> None:
    """A synthetic 100,000-tensor manifest validates; one bad tensor in it is found at its path (times printed)."""
    doc = make_manifest()
    template = doc["tensors"]["fc.weight"]
    for i in range(100_000):
        doc["tensors"][f"layers.{i}.weight"] = {**template, "digest": f"sha256:{i:064x}", "byte_range": [i, i + 48]}
    start = time.perf_counter()
    validate(doc)
    valid_s = time.perf_counter() - start
    doc["tensors"]["layers.77777.weight"]["byte_range"] = [0, -1]
    start = time.perf_counter()
    with pytest.raises(ManifestError) as caught:
        validate(doc)
    invalid_s = time.perf_counter() - start
    print(f"\n100,000 tensors: valid in {valid_s:.3f}s, invalid explained in {invalid_s:.3f}s")
    assert caught.value.field == '$.tensors["layers.77777.weight"].byte_range[1]'
