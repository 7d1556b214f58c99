"""Application states through torch.distributed.checkpoint: the tree of ``$.extensions.state``.

A state dict given to DCP may nest dicts and lists and hold values that are not tensors
(``get_state_dict``'s ``param_groups``, a step count, a ``BytesIO``). Saving, its tensors
(and byte strings, as ``uint8`` tensors) go through DCP's planning as a flat dict under their
dotted keys, and everything else becomes the value tree of a training state
(docs/format.md §8, encoded by :mod:`manifest_ckpt.format.values`). Loading, the tree is
shown to DCP as DCP would have flattened the original state dict: the same leaves under the
same keys, with the same object paths in ``Metadata.planner_data``, so ``dcp.load``,
``dcp_to_torch_save`` and ``_load_state_dict_from_keys`` see the original nesting.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict

from manifest_ckpt.format.manifest import Manifest
from manifest_ckpt.training.tree import Encoder, decode_entry


@dataclass(frozen=True)
class Ref:
    """A byte string of the tree (``bytes``/``bytesio`` node), read when its leaf is loaded."""

    tag: str
    key: str


def encode_state(state_dict: Mapping[str, Any]) -> tuple[Any | None, dict[str, Any]]:
    """The value tree of a state dict and the tensors it references, by dotted key.

    A flat dict of tensors (``model.state_dict()``) has no tree (``None``): it is saved as a
    weights checkpoint, exactly as before. Byte strings become ``uint8`` tensors.

    Raises:
        UnsupportedValueError: values that are neither tensors, byte strings nor plain values,
            dict keys that are not ``str``/``int``, or two values under one dotted key; all named.
    """
    if all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        return None, dict(state_dict)
    encoder = Encoder()
    tree = encoder.value(dict(state_dict), "")
    encoder.finish()
    return tree, encoder.tensors


@dataclass(frozen=True)
class DcpView:
    """A training state as DCP sees a checkpoint.

    Attributes:
        tensors: DCP key -> stored key of each tensor leaf.
        values: DCP key -> the leaf's value, with :class:`Ref` for byte strings and meta
            tensors (keyed in ``inner``) for tensors inside a value DCP does not traverse
            (a tuple of tensors).
        inner: ``id`` of each such meta tensor -> stored key.
        mappings: DCP key -> object path (``Metadata.planner_data``).
    """

    tensors: dict[str, str]
    values: dict[str, Any]
    inner: dict[int, str]
    mappings: dict[str, tuple[str | int, ...]]


def dcp_view(manifest: Manifest) -> DcpView | None:
    """The leaves DCP would have made of the state this manifest's tree stands for.

    The tree is decoded with meta tensors in place of tensors and flattened by DCP's own
    ``flatten_state_dict``, so keys and paths are DCP's by construction. ``None`` for a
    weights checkpoint (no tree): each key is then its own leaf.
    """
    state = manifest.state
    if state is None:
        return None
    placeholders: dict[int, tuple[str, torch.Tensor]] = {}

    def resolve(tag: str, key: str) -> Any:
        if tag != "tensor":
            return Ref(tag, key)
        entry = manifest.entry(key)
        meta = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype), device="meta")
        placeholders[id(meta)] = (key, meta)  # the tensor stays alive in the tuple
        return meta

    nested = decode_entry(state, resolve, manifest.extra_state)
    flat, mappings = flatten_state_dict(nested)
    tensors: dict[str, str] = {}
    leaves: dict[str, Any] = {}
    for key, leaf in flat.items():
        if isinstance(leaf, torch.Tensor) and id(leaf) in placeholders:
            tensors[key] = placeholders.pop(id(leaf))[0]
        else:
            leaves[key] = leaf
    return DcpView(tensors, leaves, {i: k for i, (k, _) in placeholders.items()}, dict(mappings))


def materialize(value: Any, view: DcpView, read: Callable[[str], torch.Tensor]) -> Any:
    """A value leaf with its byte strings and inner tensors read (``read(stored key)``)."""
    if isinstance(value, Ref):
        data = read(value.key).numpy().tobytes()
        return data if value.tag == "bytes" else io.BytesIO(data)
    if isinstance(value, torch.Tensor):
        return read(view.inner[id(value)])
    if isinstance(value, list):
        return [materialize(v, view, read) for v in value]
    if isinstance(value, tuple):
        return tuple(materialize(v, view, read) for v in value)
    if isinstance(value, dict):
        return {k: materialize(v, view, read) for k, v in value.items()}
    return value


def refs_of(value: Any, view: DcpView) -> list[str]:
    """The stored keys a value leaf needs read."""
    if isinstance(value, Ref):
        return [value.key]
    if isinstance(value, torch.Tensor):
        return [view.inner[id(value)]]
    if isinstance(value, (list, tuple)):
        return [k for v in value for k in refs_of(v, view)]
    if isinstance(value, dict):
        return [k for v in value.values() for k in refs_of(v, view)]
    return []
