"""Tests for manifest_ckpt.format.schema: manifest.json validation (jsonschema-rs, checked against jsonschema)."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, validators

from manifest_ckpt.errors import ManifestError
from manifest_ckpt.format import schema as _validate
from manifest_ckpt.format.schema import (
    MAX_ERRORS,
    SCHEMA_NAME,
    SchemaViolation,
    iter_errors,
    load_schema,
    schema_text,
    validate,
)

REPO = Path(__file__).resolve().parent.parent


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    """``pattern`` as ECMA-262 reads it: ``$`` ends the string (Python's ``$`` also matches before a final newline)."""
    from jsonschema.exceptions import ValidationError

    if isinstance(instance, str) and not re.search(re.sub(r"\$$", r"\\Z", pattern), instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


# The reference: jsonschema's draft 2020-12 validator, with ECMA-262 anchors (as the spec and
# jsonschema-rs have them) and tuples as arrays (as jsonschema-rs, and json.dumps, treat them).
_Reference = validators.extend(
    Draft202012Validator,
    {"pattern": _ecma_pattern},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "array", lambda checker, instance: isinstance(instance, (list, tuple))
    ),
)


def reference(schema: Any) -> Any:
    """The reference validator for ``schema``."""
    return _Reference(schema)


REFERENCE = reference(load_schema())


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


def _is_valid(doc: Any) -> bool:
    """validate() accepts ``doc`` (and then iter_errors finds nothing)."""
    try:
        validate(doc)
    except ManifestError:
        return False
    assert _errors(doc) == []
    return True


# --- valid documents ----------------------------------------------------------------------


@pytest.mark.parametrize("build", [make_manifest, make_state_dict_manifest])
def test_valid_manifests_pass(build: Any) -> None:
    """Hand-built valid manifests pass validate(), yield no errors, and the reference agrees."""
    doc = build()
    assert REFERENCE.is_valid(doc)
    assert _is_valid(doc) is True
    assert _errors(doc) == []
    validate(doc, file="x/manifest.json")  # does not raise


def test_integral_float_is_an_integer() -> None:
    """A JSON integer written as 48.0 is an integer, as in the reference validator."""
    doc = make_manifest()
    doc["tensors"]["fc.weight"]["byte_range"] = [0, 48.0]
    assert REFERENCE.is_valid(doc) and _is_valid(doc)


# --- errors -------------------------------------------------------------------------------


def test_negative_dimension_names_its_json_path() -> None:
    """A negative shape entry is reported at its exact JSON path, with expected and found."""
    doc = make_manifest()
    doc["tensors"]["fc.weight"]["shape"][1] = -3
    assert _errors(doc) == [
        SchemaViolation('$.tensors["fc.weight"].shape[1]', "-3 is less than the minimum of 0")
    ]
    with pytest.raises(ManifestError) as caught:
        validate(doc, file="ckpt/manifest.json")
    err = caught.value
    assert err.field == '$.tensors["fc.weight"].shape[1]'
    assert err.file == "ckpt/manifest.json"
    assert str(err) == (
        "manifest ckpt/manifest.json does not follow the manifest-ckpt format v1 schema (1 problem):\n"
        '  $.tensors["fc.weight"].shape[1]: -3 is less than the minimum of 0\n'
        "The manifest was edited by hand or written by a newer/other tool; "
        "re-save the checkpoint or run `manifest-ckpt verify`."
    )


def test_bool_is_not_an_integer() -> None:
    """``true`` where a size is expected is a type error, although bool subclasses int in Python."""
    doc = make_manifest()
    doc["files"]["model.safetensors"]["size"] = True
    assert not REFERENCE.is_valid(doc)
    assert _errors(doc) == [
        SchemaViolation('$.files["model.safetensors"].size', 'true is not of type "integer"'),
    ]


def test_unknown_and_missing_properties_are_named() -> None:
    """An unknown tensor field and a missing top-level field are both reported, in document order."""
    doc = make_manifest()
    doc["tensors"]["fc.bias"]["strides"] = [1]
    del doc["lineage"]
    assert _errors(doc) == [
        SchemaViolation("$", '"lineage" is a required property'),
        SchemaViolation(
            '$.tensors["fc.bias"].strides',
            'is not an allowed property (allowed: "dtype", "shape", "digest", "file", "byte_range", "chunks")',
        ),
    ]


def test_file_and_chunks_together_break_one_of() -> None:
    """A tensor with both ``file`` and ``chunks`` violates the oneOf and says which alternatives it matched."""
    doc = make_manifest()
    doc["tensors"]["emb.weight"]["file"] = "model.safetensors"
    doc["tensors"]["emb.weight"]["byte_range"] = [0, 4]
    (violation,) = _errors(doc)
    assert violation.json_path == '$.tensors["emb.weight"]'
    assert violation.message == (
        "matches none of the alternatives of #/$defs/tensor/oneOf, found an object with keys "
        '"byte_range", "chunks", "digest", "dtype", "file", "shape"'
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
    assert _errors(doc)[0].message.startswith(f"invalid property name: {json.dumps(bad)} does not match")


def test_wrong_digest_format_quotes_the_value() -> None:
    """An upper-case digest is reported with the pattern and the value found."""
    doc = make_manifest()
    doc["digest"] = doc["digest"].upper()
    (violation,) = _errors(doc)
    assert violation.json_path == "$.digest"
    assert violation.message == (
        f'{json.dumps(doc["digest"])} does not match "^sha256:[0-9a-f]{{64}}$"'
    )


def test_modules_of_wrong_type_names_the_alternatives() -> None:
    """``modules`` as an array matches neither null nor an object, and the message says so."""
    doc = make_manifest()
    doc["modules"] = []
    assert _errors(doc) == [
        SchemaViolation(
            "$.modules",
            "matches none of the alternatives of #/properties/modules/anyOf, found an array of 0 items",
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
    assert _errors([1, 2]) == [SchemaViolation("$", '[1,2] is not of type "object"')]


def test_python_set_is_named_through_the_reference() -> None:
    """A value JSON cannot hold (a set) in a document built in memory is reported at its path."""
    doc = make_manifest()
    doc["tensors"]["fc.bias"]["shape"] = {4}
    assert _errors(doc) == [SchemaViolation('$.tensors["fc.bias"].shape', "{4} is not of type 'array'")]
    with pytest.raises(ManifestError) as caught:
        validate(doc)
    assert caught.value.field == '$.tensors["fc.bias"].shape'


def test_trailing_newline_does_not_match_an_anchored_pattern() -> None:
    """``$`` ends the string (ECMA-262), so a digest with a final newline is refused, unlike Python's re.search."""
    doc = make_manifest()
    doc["digest"] += "\n"
    assert Draft202012Validator(load_schema()).is_valid(doc)  # plain jsonschema: Python's $ matches before \n
    assert not REFERENCE.is_valid(doc)
    assert [v.json_path for v in _errors(doc)] == ["$.digest"]


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
def test_validator_agrees_with_jsonschema_on_mutated_manifests(doc: Any) -> None:
    """For random edits of a valid manifest, validate, iter_errors and the reference agree on validity."""
    expected = REFERENCE.is_valid(doc)
    assert _is_valid(doc) is expected
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


def test_validator_agrees_with_jsonschema_on_every_single_edit() -> None:
    """Exhaustively over single edits of the example manifests, validate and the reference agree."""
    seen = {True: 0, False: 0}
    for label, doc in _single_edits():
        expected = REFERENCE.is_valid(doc)
        seen[expected] += 1
        assert _is_valid(doc) is expected, label
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
    expected = reference(schema).is_valid(instance)
    fast = jsonschema_rs.Draft202012Validator(schema)
    assert fast.is_valid(instance) is expected
    assert (next(fast.iter_errors(instance), None) is None) is expected


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
