"""Tests of ``manifest_ckpt.format.values`` and of the training-state rules of the manifest (format 1.1)."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any

import pytest

from manifest_ckpt.errors import ManifestError
from manifest_ckpt.format import values
from manifest_ckpt.format.manifest import (
    BASE_FORMAT_VERSION,
    FORMAT_VERSION,
    STATE_FORMAT_VERSION,
    Manifest,
    required_version,
)
from manifest_ckpt.format.schema import iter_errors

from .test_manifest import document, tensor


class Blob:
    """Stands for a tensor: the leaf encoder stores it by key."""

    def __init__(self, name: str) -> None:
        self.name = name


def encode(value: Any) -> tuple[Any, dict[str, Any], list[str]]:
    stored: dict[str, Any] = {}
    refused: list[str] = []

    def leaf(v: Any, key: str) -> Any:
        if isinstance(v, Blob):
            stored[key] = v
            return {"tensor": key}
        if isinstance(v, bytes):
            stored[key] = v
            return {"bytes": key}
        return None

    node = values.encode_value(value, "root", leaf, refused)
    return node, stored, refused


def same(a: Any, b: Any) -> bool:
    """Equal with types (tuple vs list, int vs float vs bool), NaN equal to NaN, order of dicts kept."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


PLAIN = {
    "step": 3,
    "lr": 0.001,
    "neg_zero": -0.0,
    "big": 2**70,
    "flags": [True, False, None],
    "betas": (0.9, 0.999),
    "one": (1,),
    "weird": [math.inf, -math.inf, 1e-300],
    "by_int": {0: "a", 7: {"x": []}},
    "order": {"b": 1, "a": 2},
    "text": 'é\u0000"{}',
    "dict": {"tensor": "not a tag"},
}


def test_plain_values_round_trip_exactly_through_json() -> None:
    """Every plain value comes back with its type, order, sign of zero and non-finite floats, via JSON text."""
    node, stored, refused = encode(PLAIN)
    assert refused == [] and stored == {}
    text = json.dumps(node, sort_keys=True, allow_nan=False)
    back = values.decode_value(json.loads(text), lambda tag, key: pytest.fail("no references"))
    assert same(back, PLAIN)


def test_nan_round_trips() -> None:
    """NaN is stored as a tag and read back as NaN."""
    node, _, _ = encode([math.nan])
    assert node == [{"float": "nan"}]
    assert math.isnan(values.decode_value(node, lambda t, k: None)[0])


def test_references_are_keyed_by_dotted_path() -> None:
    """Tensors and bytes are stored under the dotted path of the value (DCP's flattening)."""
    a, b = Blob("a"), Blob("b")
    node, stored, refused = encode({"state": {0: {"exp_avg": a}}, "seen": [b, b"\x00\xff"]})
    assert refused == []
    assert list(stored) == ["root.state.0.exp_avg", "root.seen.0", "root.seen.1"]
    assert [(t, k) for t, k, _ in values.iter_refs(node)] == [
        ("tensor", "root.state.0.exp_avg"),
        ("tensor", "root.seen.0"),
        ("bytes", "root.seen.1"),
    ]
    back = values.decode_value(node, lambda tag, key: (tag, key))
    assert back == {
        "state": {0: {"exp_avg": ("tensor", "root.state.0.exp_avg")}},
        "seen": [("tensor", "root.seen.0"), ("bytes", "root.seen.1")],
    }


def test_everything_else_is_refused_by_key() -> None:
    """Functions, objects, sets and non-str/int dict keys are all named, not just the first."""
    _, _, refused = encode(
        {"fn": len, "obj": object(), "ok": 1, "nested": [{"s": {1, 2}}], "keys": {(1, 2): 3, True: 4}}
    )
    assert refused == [
        "root.fn (builtins.builtin_function_or_method)",
        "root.obj (builtins.object)",
        "root.nested.0.s (builtins.set)",
        "root.keys.(1, 2) (dict key of type tuple; use str or int keys)",
        "root.keys.True (dict key of type bool; use str or int keys)",
    ]


def test_ordered_dicts_are_dicts() -> None:
    """OrderedDict (what state_dict() returns) is stored as a dict, order kept."""
    node, _, _ = encode(OrderedDict([("z", 1), ("a", 2)]))
    assert node == {"dict": [["z", 1], ["a", 2]]}


def test_value_nodes_validate_against_the_schema() -> None:
    """The encoding of every plain value is valid under $defs/value (via the state tree)."""
    node, _, _ = encode(PLAIN)
    doc = state_document({"dict": [["progress", node]]})
    assert list(iter_errors(doc)) == []
    Manifest.from_dict(doc)


@pytest.mark.parametrize(
    "bad",
    [
        {"dict": [["a", 1, 2]]},
        {"dict": {"a": 1}},
        {"float": "NaN"},
        {"tuple": [1], "dict": []},
        {"unknown": 1},
        {"dict": [[1.5, 1]]},
        {"stateful": {"kind": "optimizer", "class": "x.Y"}},
        {"module": {"prefix": "m."}},
    ],
)
def test_malformed_nodes_are_schema_errors(bad: Any) -> None:
    """A node outside the grammar is refused by the schema, with a path into extensions.state."""
    doc = state_document({"dict": [["entry", bad]]})
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(doc)
    assert "$.extensions.state" in str(info.value)


def state_document(state: Any, tensors: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    doc = document(tensors if tensors is not None else {}, **kw)
    doc["format_version"] = FORMAT_VERSION
    doc["extensions"] = {"state": state}
    return redigest_state(doc)


def redigest_state(doc: dict[str, Any]) -> dict[str, Any]:
    """Recompute both digests of a document whose extensions hold a state tree."""
    from manifest_ckpt.format.manifest import TensorEntry, compute_digest, compute_record_digest, modules_from_dict

    tensors = {k: TensorEntry(t["dtype"], tuple(t["shape"]), t["digest"]) for k, t in doc["tensors"].items()}
    doc["digest"] = compute_digest(tensors, doc["aliases"], modules_from_dict(doc["modules"]), doc.get("extensions"))
    doc["record_digest"] = compute_record_digest(doc["lineage"], doc.get("metadata"), doc.get("extensions"))
    return doc


MODULE = {
    "class": "torch.nn.modules.linear.Linear",
    "version": None,
    "parameters": ["weight"],
    "buffers": [],
    "non_persistent_buffers": [],
}


def training_document() -> dict[str, Any]:
    tensors = {
        "model.weight": tensor("float32", [2, 3], 96),
        "optim.state.weight.exp_avg": tensor("float32", [2, 3], 120),
        "blob": tensor("uint8", [4], 144),
    }
    state = {
        "dict": [
            ["model", {"module": {"prefix": "model.", "modules": {"": MODULE}}}],
            [
                "optim",
                {
                    "stateful": {
                        "kind": "optimizer",
                        "class": "torch.optim.adam.Adam",
                        "module": "model",
                        "state": {
                            "dict": [
                                [
                                    "state",
                                    {
                                        "dict": [
                                            [
                                                "weight",
                                                {"dict": [["exp_avg", {"tensor": "optim.state.weight.exp_avg"}]]},
                                            ]
                                        ]
                                    },
                                ]
                            ]
                        },
                    }
                },
            ],
            ["blob", {"bytes": "blob"}],
            ["progress", {"dict": [["step", 3]]}],
        ]
    }
    return state_document(state, tensors)


def test_a_training_state_manifest_is_valid_and_lists_its_entries() -> None:
    """A well-formed training state parses; its entries are found with their tags."""
    manifest = Manifest.from_dict(training_document())
    assert manifest.state is not None
    assert [(k, t) for k, t, _ in values.iter_entries(manifest.state)] == [("model", "module"), ("optim", "stateful")]
    assert required_version(manifest.extensions) == STATE_FORMAT_VERSION == "1.1.0"
    assert FORMAT_VERSION == "1.2.0"
    assert required_version(None) == BASE_FORMAT_VERSION == "1.0.0"


def test_the_digest_covers_the_state_tree() -> None:
    """Changing a plain value without re-digesting is an inconsistency at $.digest."""
    doc = training_document()
    doc["extensions"]["state"]["dict"][3][1]["dict"][0][1] = 4
    from manifest_ckpt.format.manifest import compute_record_digest

    doc["record_digest"] = compute_record_digest(doc["lineage"], doc.get("metadata"), doc.get("extensions"))
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(doc)
    assert info.value.field == "$.digest"


def rejected(doc: dict[str, Any]) -> str:
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(redigest_state(doc))
    return str(info.value)


def test_dangling_and_unreferenced_keys_are_refused() -> None:
    """A node naming a key that is not stored, and a stored tensor nothing names, are both reported."""
    doc = training_document()
    doc["extensions"]["state"]["dict"][2][1] = {"bytes": "nowhere"}
    text = rejected(doc)
    assert "references 'nowhere', which is neither a stored tensor nor an alias" in text
    assert "$.tensors.blob: is stored but no entry of the application state references it" in text


def test_a_key_referenced_twice_is_refused() -> None:
    """Two nodes may not share one stored key (a shared value is stored once, as an alias)."""
    doc = training_document()
    doc["extensions"]["state"]["dict"][2][1] = {"tensor": "model.weight"}
    doc["tensors"].pop("blob")
    assert "already referenced" in rejected(doc)


def test_bytes_must_be_uint8_vectors() -> None:
    """A bytes node must reference a uint8[n] tensor."""
    doc = training_document()
    doc["tensors"]["blob"] = tensor("float32", [1], 144)
    assert "holds bytes and must be uint8[n], found float32[1]" in rejected(doc)


def test_a_training_state_needs_format_1_1_and_no_module_tree() -> None:
    """format_version 1.0.x and a top-level module tree are both refused in a training state."""
    doc = training_document()
    doc["format_version"] = "1.0.0"
    doc["modules"] = {}
    text = rejected(doc)
    assert "$.format_version: is 1.0.0; a training state needs 1.1.0 or later" in text
    assert "$.modules: must be null in a training state" in text


def test_repeated_names_are_refused() -> None:
    """JSON pairs could repeat a dict name; the reader refuses it."""
    doc = training_document()
    doc["extensions"]["state"]["dict"][3][1] = {"dict": [["step", 3], ["step", 4]]}
    assert "repeats the name 'step'" in rejected(doc)


def test_weights_manifests_keep_the_1_0_digest() -> None:
    """Without extensions.state the digest is the 1.0 digest (extensions outside the content list are not covered)."""
    doc = document()
    digest = doc["digest"]
    doc["extensions"] = {"something_else": 1}
    redigest_state(doc)
    assert doc["digest"] == digest
