"""What the distributed planners need to know about a rank's (flattened) state dict.

Shared by the save planner (which records ties as aliases) and the load planner (which
compares every rank's structure with the checkpoint before any tensor is read).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from manifest_ckpt.comparison.compare import StateSpec, TensorSpec, owner_of
from manifest_ckpt.comparison.introspect import dtype_name, find_aliases
from manifest_ckpt.errors import UnsupportedTensorError
from manifest_ckpt.format.manifest import ModuleEntry


def require_tensors(state_dict: Mapping[str, Any]) -> None:
    """Refuse values the format cannot store, naming every one.

    Raises:
        UnsupportedTensorError: a value is not a tensor, or its dtype has no safetensors code.
    """
    others = [
        f"{key!r} ({type(value).__name__})" for key, value in state_dict.items() if not isinstance(value, torch.Tensor)
    ]
    if others:
        listing = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
        raise UnsupportedTensorError(
            f"the state dict holds values that are not tensors: {listing}; a manifest checkpoint stores "
            "tensors only. Keep such values out of the state dict (the optimizer's step count, learning "
            "rate...) and record them with metadata=..."
        )
    for key, value in state_dict.items():
        dtype_name(value, key)


def local_aliases(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Keys that repeat an earlier key's tensor on this rank (ties), mapped to that key.

    A distributed tensor is tied only to the very same object: two DTensors may share a
    local shard and still differ globally (other placements). Plain tensors are tied when
    they are the same storage view, as in ``save``.
    """
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        lead = first.setdefault(id(value), key)
        if lead != key:
            aliases[key] = lead
        elif type(value) in (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer):
            plain[key] = value
    aliases.update(find_aliases(plain))
    return aliases


def live_spec(state_dict: Mapping[str, torch.Tensor], modules: Mapping[str, ModuleEntry] | None) -> StateSpec:
    """The structure of a rank's state: global shapes and dtypes, ties, module classes."""
    require_tensors(state_dict)
    tensors = {
        key: TensorSpec(dtype_name(value, key), tuple(global_shape(value)), owner_of(key))
        for key, value in state_dict.items()
    }
    classes = None if modules is None else {path: m.cls for path, m in modules.items()}
    return StateSpec(tensors, local_aliases(state_dict), classes)


def global_shape(value: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor, not of this rank's shard."""
    if isinstance(value, DTensor):
        return value.shape
    return value.size()


def torch_dtype_name(dtype: torch.dtype) -> str:
    """The manifest name of a torch dtype (``torch.float32`` -> ``float32``)."""
    return str(dtype).removeprefix("torch.")
