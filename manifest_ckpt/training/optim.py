"""Optimizer state keyed by parameter name, and the checks made before it is restored.

``Optimizer.state_dict()`` numbers parameters by their position in ``param_groups``, and
``load_state_dict`` gives state ``i`` to whichever parameter is ``i``-th now: a model whose
parameters were registered in another order gets Adam moments of the wrong parameters
whenever shapes agree, without an error. Here the state is stored under each parameter's
fully qualified name (the layout of ``torch.distributed.checkpoint.state_dict
.get_optimizer_state_dict``) and handed back to torch renumbered by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from manifest_ckpt.comparison.report import Problem
from manifest_ckpt.errors import UnsupportedValueError
from manifest_ckpt.format.dtypes import describe
from manifest_ckpt.format.manifest import TensorEntry


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in the order ``state_dict()`` numbers them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def choose_root(optimizer: torch.optim.Optimizer, modules: Mapping[str, nn.Module]) -> str:
    """The first module entry holding every parameter of ``optimizer``, else ``""`` (names from the root)."""
    wanted = {id(p) for p in _params(optimizer)}
    for key, module in modules.items():
        if wanted <= {id(p) for p in module.parameters()}:
            return key
    return ""


def param_names(modules: Mapping[str, nn.Module], root: str) -> dict[int, str]:
    """``id(parameter)`` -> name: local to module entry ``root``, or dotted from the root for ``""``.

    A tied parameter is named by its first name, as ``named_parameters()`` gives it.
    """
    if root:
        module = modules.get(root)
        return {} if module is None else {id(p): name for name, p in module.named_parameters()}
    names: dict[int, str] = {}
    for key, module in modules.items():
        for name, p in module.named_parameters():
            names.setdefault(id(p), f"{key}.{name}")
    return names


def named_state_dict(optimizer: torch.optim.Optimizer, names: Mapping[int, str], key: str) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameter names in place of positions.

    Raises:
        UnsupportedValueError: a parameter belongs to no module entry of the application state.
    """
    params = _params(optimizer)
    unnamed = [i for i, p in enumerate(params) if id(p) not in names]
    if unnamed:
        shapes = ", ".join(f"#{i} {list(params[i].shape)}" for i in unnamed[:5])
        raise UnsupportedValueError(
            f"{key}: {len(unnamed)} parameters of the optimizer belong to no module of the application state "
            f"({shapes}); its state is stored by parameter name, so save the module with it: "
            f"{{'model': model, '{key}': optimizer}}. Nothing was written.",
            keys=(key,),
        )
    by_index = {i: names[id(p)] for i, p in enumerate(params)}
    saved = optimizer.state_dict()
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [by_index[i] for i in group["params"]]}
        for group in saved["param_groups"]
    ]
    return {"state": {by_index[i]: s for i, s in saved["state"].items()}, "param_groups": groups}


def indexed_state_dict(named: Mapping[str, Any], optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> Any:
    """A name-keyed state renumbered for ``optimizer.load_state_dict`` (checked by :func:`problems` first).

    The live optimizer's own order decides the numbers, so torch's positional matching gives
    every parameter the state saved under its name.
    """
    index = {names[id(p)]: i for i, p in enumerate(_params(optimizer))}
    # Each hyper-parameter from the checkpoint; one the checkpoint lacks (allowed by policy)
    # keeps its live value, and one the live group lacks is dropped.
    groups = [
        {
            **{k: saved.get(k, v) for k, v in live.items() if k != "params"},
            "params": [index[names[id(p)]] for p in live["params"]],
        }
        for saved, live in zip(named["param_groups"], optimizer.param_groups)
    ]
    return {"state": {index[name]: s for name, s in named["state"].items()}, "param_groups": groups}


def problems(
    key: str,
    named: Any,
    optimizer: torch.optim.Optimizer,
    names: Mapping[int, str],
    stored_shape: Callable[[str], tuple[int, ...] | None],
    *,
    cast: bool,
    allowed: Callable[[str, str], bool],
) -> list[Problem]:
    """Every difference between a saved (name-keyed) optimizer state and a live optimizer.

    Parameter groups and their membership by name, hyper-parameter keys, and each
    parameter's state tensors: a tensor saved with its parameter's shape must have the live
    parameter's shape, and (as torch casts it to the parameter's dtype) its dtype unless ``cast``.

    Args:
        named: the saved state, tensors as their :class:`TensorEntry`.
        stored_shape: the checkpoint's shape of a parameter, by name.
        allowed: ``allowed(kind, key)`` for a missing/unexpected key the policies allow.
    """
    found: list[Problem] = []
    if not (isinstance(named, Mapping) and isinstance(named.get("param_groups"), list)):
        return [Problem("class", key, "an optimizer state (state, param_groups)", "another value")]
    saved_groups: list[Any] = named["param_groups"]
    live_groups = optimizer.param_groups
    where_saved = {n: i for i, g in enumerate(saved_groups) for n in g.get("params", [])}
    where_live = {names.get(id(p), ""): i for i, g in enumerate(live_groups) for p in g["params"]}
    for i in range(len(saved_groups), len(live_groups)):
        found.append(Problem("missing", f"{key}.param_groups.{i}", f"{len(live_groups[i]['params'])} parameters", None))
    for i in range(len(live_groups), len(saved_groups)):
        found.append(Problem("unexpected", f"{key}.param_groups.{i}", None, f"{len(saved_groups[i]['params'])} parameters"))
    for i, (saved, live) in enumerate(zip(saved_groups, live_groups)):
        at = f"{key}.param_groups.{i}"
        live_names = [names.get(id(p)) for p in live["params"]]
        for j, (name, p) in enumerate(zip(live_names, live["params"])):
            if name is None:
                found.append(Problem("missing", f"{at}.params.{j}", f"a named parameter {list(p.shape)}", None))
        saved_names = set(saved.get("params", []))
        for name in live_names:
            if name is not None and name not in saved_names:
                other = where_saved.get(name)
                found.append(Problem("missing", f"{at}.params.{name}", "parameter", None if other is None else f"in param group {other}"))
        for name in saved.get("params", []):
            if name not in live_names:
                other = where_live.get(name)
                found.append(Problem("unexpected", f"{at}.params.{name}", None if other is None else f"in param group {other}", "parameter"))
        for hp in live:
            if hp != "params" and hp not in saved and not allowed("missing", f"{at}.{hp}"):
                found.append(Problem("missing", f"{at}.{hp}", repr(live[hp]), None))
        for hp in saved:
            if hp != "params" and hp not in live and not allowed("unexpected", f"{at}.{hp}"):
                found.append(Problem("unexpected", f"{at}.{hp}", None, repr(saved[hp])))
    by_name = {names[id(p)]: p for p in (q for g in live_groups for q in g["params"]) if id(p) in names}
    state = named.get("state", {})
    for name, per_param in state.items() if isinstance(state, Mapping) else ():
        param = by_name.get(name)
        if param is None or not isinstance(per_param, Mapping):
            continue  # a parameter the live optimizer lacks is reported by its group above
        live_state = optimizer.state.get(param, {})
        for state_key, entry in per_param.items():
            if not isinstance(entry, TensorEntry) or not entry.shape:
                continue  # a value, or a 0-d step count: torch keeps it as it is
            at = f"{key}.state.{name}.{state_key}"
            have = describe(entry.dtype, entry.shape)
            current = live_state.get(state_key)
            if isinstance(current, torch.Tensor):
                want_shape: tuple[int, ...] | None = tuple(current.shape)
            else:
                want_shape = tuple(param.shape) if stored_shape(name) == entry.shape else None
            dtype = str(param.dtype).removeprefix("torch.")
            if want_shape is not None and want_shape != entry.shape:
                found.append(Problem("shape", at, describe(dtype, want_shape), have))
            elif param.is_floating_point() and entry.dtype != dtype and not cast:
                found.append(Problem("dtype", at, describe(dtype, entry.shape), have))
    return found


def repoint(optimizer: torch.optim.Optimizer, replaced: Mapping[int, torch.Tensor]) -> None:
    """Make ``optimizer`` hold the new parameters of ``{id(old): new}`` (meta ones materialised), state included."""
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(id(p), p) for p in group["params"]]
    for old in [p for p in optimizer.state if id(p) in replaced]:
        optimizer.state[replaced[id(old)]] = optimizer.state.pop(old)
