"""Views of a training state's application-state tree for ``inspect`` and ``diff`` (no torch import).

The tree (``$.extensions.state``, docs/format.md §8) is flattened to dotted keys, the keys
``torch.distributed.checkpoint`` gives the same leaves: each object entry (module,
optimizer, scheduler, Stateful) with its class, each plain value with its JSON rendering.
Tensors are shown by reference; their values are compared as every other tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from manifest_ckpt.format import values


@dataclass(frozen=True)
class StateEntry:
    """One node of the tree: ``kind`` is module/optimizer/scheduler/stateful/dict/list/tuple/value/tensor/bytes."""

    key: str
    kind: str
    text: str  # the class for object entries, the rendered value for values

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "text": self.text}


def entries(state: Any, *, inside_objects: bool = True) -> list[StateEntry]:
    """Every node of the tree below the root, depth first, in saved order.

    Args:
        inside_objects: list what a Stateful entry's state holds too (``diff`` does;
            ``inspect`` shows only the object).
    """
    out: list[StateEntry] = []

    def value(node: Any, key: str) -> None:
        if isinstance(node, list):
            out.append(StateEntry(key, "list", ""))
            for i, n in enumerate(node):
                value(n, values.child_key(key, i))
            return
        if not isinstance(node, Mapping):
            out.append(StateEntry(key, "value", values.describe(node, 80)))
            return
        tag, body = values.tag_of(node)
        if tag == "dict":
            out.append(StateEntry(key, "dict", ""))
            for name, n in body:
                value(n, values.child_key(key, name))
        elif tag == "tuple":
            out.append(StateEntry(key, "tuple", ""))
            for i, n in enumerate(body):
                value(n, values.child_key(key, i))
        elif tag in values.REF_TAGS:
            out.append(StateEntry(key, "tensor" if tag == "tensor" else "bytes", body))
        else:
            out.append(StateEntry(key, "value", values.describe(node, 80)))

    def entry(node: Any, key: str) -> None:
        if values.is_tagged(node, "module"):
            modules = node["module"]["modules"]
            root = modules.get("", {}).get("class")
            out.append(StateEntry(key, "module", str(root)))
        elif values.is_tagged(node, "stateful"):
            body = node["stateful"]
            out.append(StateEntry(key, body["kind"], body["class"]))
            if inside_objects:
                state = body["state"]
                if values.is_tagged(state, "dict"):
                    for name, n in state["dict"]:
                        value(n, values.child_key(key, name))
                else:
                    value(state, values.child_key(key, "state"))
        elif values.is_tagged(node, "dict"):
            if key:
                out.append(StateEntry(key, "dict", ""))
            for name, n in node["dict"]:
                entry(n, values.child_key(key, name))
        else:
            value(node, key)

    entry(state, "")
    return out


def tensor_count(state_node: Any) -> int:
    """How many tensors and byte strings an entry references."""
    return sum(1 for _ in values.iter_refs(state_node))


@dataclass(frozen=True)
class StateChange:
    """A node only one side has (``removed``: only in A, ``added``: only in B) or that differs (``changed``)."""

    kind: str
    key: str
    a: str | None
    b: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "a": self.a, "b": self.b}


def differences(state_a: Any, state_b: Any) -> list[StateChange]:
    """How two trees differ, node by node; tensor values are not compared here (their digests are).

    A subtree only one side has is named once, at its top. ``None`` is a weights checkpoint.
    """
    if state_a is None and state_b is None:
        return []
    if state_a is None or state_b is None:
        def what(state: Any) -> str:
            return "weights checkpoint" if state is None else "training state"

        return [StateChange("changed", "(root)", what(state_a), what(state_b))]
    a = {e.key: e for e in entries(state_a)}
    b = {e.key: e for e in entries(state_b)}

    def top(key: str, other: Mapping[str, StateEntry]) -> bool:
        parent = _parent(key)
        return parent == "" or parent in other

    changes: list[StateChange] = []
    for key, ea in a.items():
        eb = b.get(key)
        if eb is None:
            if top(key, b):
                changes.append(StateChange("removed", key, _show(ea), None))
        elif ea.kind != eb.kind or (ea.text != eb.text and ea.kind not in ("tensor", "bytes")):
            changes.append(StateChange("changed", key, _show(ea), _show(eb)))
    changes += [StateChange("added", key, None, _show(eb)) for key, eb in b.items() if key not in a and top(key, a)]
    return changes


def _parent(key: str) -> str:
    return key.rpartition(".")[0]


def _show(e: StateEntry) -> str:
    if e.kind == "value":
        return e.text
    return f"{e.kind} {e.text}" if e.text and e.kind not in ("tensor", "bytes") else e.kind
