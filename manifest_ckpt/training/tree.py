"""The application state as the entry tree of ``$.extensions.state`` (docs/format.md §8), both ways.

One encoder serves ``save`` (live objects: modules, optimizers, schedulers, Stateful objects,
tensors and plain values) and the distributed writer (the plain state dict DCP hands its
planner, whose Stateful objects DCP has already turned into their ``state_dict()``). Tensors
and byte strings go to the weights files under their dotted keys; everything else is JSON.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import nn

from manifest_ckpt.comparison.introspect import LiveState, capture, class_name, find_aliases
from manifest_ckpt.errors import UnsupportedValueError
from manifest_ckpt.format import values
from manifest_ckpt.format.manifest import EXTRA_STATE_NAME
from manifest_ckpt.training import optim


def kind_of(obj: Any) -> str | None:
    """``module``, ``optimizer``, ``scheduler`` or ``stateful`` for an object entry, else None.

    A Stateful object is anything with callable ``state_dict()`` and ``load_state_dict()``,
    as for ``torch.distributed.checkpoint``.
    """
    if isinstance(obj, nn.Module):
        return "module"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return "scheduler"
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
        return "stateful"
    return None


def is_app_state(obj: Any) -> TypeGuard[Mapping[str, Any]]:
    """Whether ``save``/``check``/``load`` treat ``obj`` as an application state.

    A mapping whose values are all tensors is a plain state dict (a weights checkpoint);
    any other mapping is an application state.
    """
    return isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values())


def module_entries(app: Mapping[Any, Any], key: str = "") -> dict[str, nn.Module]:
    """Every ``nn.Module`` of an application state by dotted key, in order (dicts only, as saved)."""
    found: dict[str, nn.Module] = {}
    for name, value in app.items():
        here = values.child_key(key, name)
        if isinstance(value, nn.Module):
            found[here] = value
        elif kind_of(value) is None and isinstance(value, Mapping):
            found.update(module_entries(value, here))
    return found


class Encoder:
    """Encodes values while collecting their tensors (by dotted key) and what it must refuse."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.refused: list[str] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.tensors:
            self.refused.append(f"{key} (a second value under this dotted key; rename one of them)")
        self.tensors[key] = tensor

    def leaf(self, value: Any, key: str) -> Any:
        """The reference node of a tensor or byte string (bytes become a ``uint8`` tensor), else None."""
        if isinstance(value, torch.Tensor):
            node: Any = {"tensor": key}
        elif isinstance(value, (bytes, io.BytesIO)):
            data = value if isinstance(value, bytes) else value.getvalue()
            node = {"bytes" if isinstance(value, bytes) else "bytesio": key}
            value = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        else:
            return None
        self.add(key, value)
        return node

    def value(self, value: Any, key: str) -> Any:
        return values.encode_value(value, key, self.leaf, self.refused)

    def finish(self) -> None:
        """Raise once for everything refused, before anything is written.

        Raises:
            UnsupportedValueError: naming every refused key.
        """
        if not self.refused:
            return
        refused = self.refused
        listing = ", ".join(refused[:10]) + (f" and {len(refused) - 10} more" if len(refused) > 10 else "")
        raise UnsupportedValueError(
            f"the state dict holds values a manifest checkpoint cannot store without pickle: {listing}. "
            "Store tensors, bytes / io.BytesIO, and plain values (int, float, str, bool, None, lists, tuples "
            "and dicts of these); give other objects a state_dict() of such values.",
            keys=tuple(r.split(" (", 1)[0] for r in refused),
        )


def encode_app(app: Mapping[str, Any]) -> AppState:
    """The entry tree of a live application state and its tensors by stored key.

    Modules are recorded with their module tree, optimizers keyed by parameter name (the
    names of the module entry holding all their parameters, else dotted paths from the root),
    schedulers and other Stateful objects through ``state_dict()``.

    Raises:
        UnsupportedValueError: values that cannot be stored, or an optimizer parameter that
            belongs to no module entry; all named, before anything is written.
        UnsupportedTensorError: a module tensor cannot be stored.
    """
    modules = module_entries(app)
    enc = Encoder()

    def entry(obj: Any, key: str) -> Any:
        kind = kind_of(obj)
        if kind == "module":
            live = capture(obj, extra_state=True)
            assert live.modules is not None
            for local, tensor in live.tensors.items():
                enc.add(f"{key}.{local}", tensor)
            for local, value in live.extra.items():
                extra[f"{key}.{local}"] = extra_enc.value(value, f"{key}.{local}")
            tree = {path: m.to_dict() for path, m in live.modules.items()}
            return {"module": {"prefix": f"{key}.", "modules": tree}}
        if kind == "optimizer":
            root = optim.choose_root(obj, modules)
            named = optim.named_state_dict(obj, optim.param_names(modules, root), key)
            body = {"kind": kind, "class": class_name(obj), "module": root, "state": enc.value(named, key)}
            return {"stateful": body}
        if kind is not None:
            return {"stateful": {"kind": kind, "class": class_name(obj), "state": enc.value(obj.state_dict(), key)}}
        if isinstance(obj, Mapping):
            return {"dict": values.encode_pairs(obj, key, entry, enc.refused)}
        return enc.value(obj, key)

    # Module extra state (``get_extra_state``) by its full key, as ``save(module)`` stores it
    # (``$.extensions.extra_state``); its tensors are stored apart, never as ties.
    extra: dict[str, Any] = {}
    extra_enc = Encoder()
    tree = entry(dict(app), "")
    enc.refused += extra_enc.refused
    for key in extra_enc.tensors:
        if key in enc.tensors:
            enc.refused.append(f"{key} (module extra state stored under a key the state uses; rename the tensor)")
    enc.finish()
    return AppState(tree, enc.tensors, extra, extra_enc.tensors)


@dataclass(frozen=True)
class AppState:
    """An application state encoded: the entry tree, its tensors, module extra state and its tensors."""

    tree: Any
    tensors: dict[str, torch.Tensor]
    extra_state: dict[str, Any]
    extra_tensors: dict[str, torch.Tensor]


def capture_app(app: Mapping[str, Any]) -> tuple[LiveState, dict[str, Any]]:
    """What ``save`` writes for an application state: its tensors (with ties) and extensions."""
    encoded = encode_app(app)
    tensors = {**encoded.tensors, **encoded.extra_tensors}
    extensions: dict[str, Any] = {"state": encoded.tree}
    if encoded.extra_state:
        extensions["extra_state"] = encoded.extra_state
    return LiveState(tensors, find_aliases(encoded.tensors), None, {}), extensions


def decode_entry(node: Any, resolve: Callable[[str, str], Any], extra: Mapping[str, Any] | None = None) -> Any:
    """An entry tree as the plain state it stands for (object entries as their state dicts).

    Module entries become their flat state dicts (with each module's extra state under its
    ``_extra_state`` key, as torch's ``state_dict`` gives it, from ``extra``: the manifest's
    ``extensions.extra_state``), Stateful entries their saved state (an optimizer's keyed by
    parameter name); ``resolve(tag, key)`` supplies each referenced tensor or byte string.
    """
    extra = extra or {}
    if values.is_tagged(node, "module"):
        body = node["module"]
        out: dict[str, Any] = {}
        for path, module in body["modules"].items():
            for name in (*module["parameters"], *module["buffers"], EXTRA_STATE_NAME):
                local = f"{path}.{name}" if path else name
                if name != EXTRA_STATE_NAME:
                    out[local] = resolve("tensor", body["prefix"] + local)
                elif body["prefix"] + local in extra:
                    out[local] = values.decode_value(extra[body["prefix"] + local], resolve)
        return out
    if values.is_tagged(node, "stateful"):
        return values.decode_value(node["stateful"]["state"], resolve)
    if values.is_tagged(node, "dict"):
        return {name: decode_entry(child, resolve, extra) for name, child in node["dict"]}
    return values.decode_value(node, resolve)
