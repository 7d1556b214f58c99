"""A module's own load machinery, run by ``load`` in the order torch's ``load_state_dict`` runs it.

torch lets a module rewrite the state dict it is given before anything is copied: load
pre-hooks (``register_load_state_dict_pre_hook``, ``_register_load_state_dict_pre_hook``)
and overridden ``_load_from_state_dict`` methods (BatchNorm's ``_version`` migration adds
``num_batches_tracked`` to a checkpoint saved before it existed). ``load`` runs that
machinery twice: over meta placeholders of the checkpoint's tensors, which gives the keys,
dtypes and shapes torch would copy, so the comparison still comes first and reports every
problem before a byte is copied; then, once all agree, over the stored values, which gives
the values to copy. The copying stays ``load``'s (ties, casts, meta and lazy
materialisation, rollback).

While the machinery runs nothing is copied: ``nn.Module._load_from_state_dict`` is replaced,
for this thread only, by one that runs the pre-hooks and nothing else. A module whose
machinery fails on placeholders, or writes or replaces its own tensors instead of leaving
that to the copy, cannot be checked ahead; it is reported as such, never loaded blind.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy

_BASE: Callable[..., None] = nn.Module._load_from_state_dict
_LOCK = threading.RLock()
_THREAD = threading.local()


def _is_lazy_hook(hook: object) -> bool:
    """Whether ``hook`` is a lazy module's materialising hook (``load`` materialises lazy tensors itself)."""
    inner = getattr(hook, "hook", hook)
    return getattr(inner, "__func__", None) is LazyModuleMixin._lazy_load_hook


def _pre_hooks(module: nn.Module) -> list[Callable[..., Any]]:
    return [h for h in module._load_state_dict_pre_hooks.values() if not _is_lazy_hook(h)]


def rewrites(module: nn.Module) -> bool:
    """Whether torch's ``load_state_dict`` lets ``module`` change the state dict before copying."""
    if type(module)._load_from_state_dict is not _BASE:
        return True
    return bool(module._load_state_dict_pre_hooks) and bool(_pre_hooks(module))


def any_rewrites(module: nn.Module, submodules: Iterable[nn.Module] | None = None) -> bool:
    """Whether any submodule of ``module`` rewrites the state dict it loads.

    ``submodules``: every submodule of ``module`` (repeats allowed), where the caller has
    them already (``capture``'s owners): a 50,000-module tree is not walked again.
    """
    return any(rewrites(sub) for sub in (module.modules() if submodules is None else submodules))


def _hooks_only(
    self: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``nn.Module._load_from_state_dict`` while the machinery runs: the pre-hooks, no copy."""
    if not getattr(_THREAD, "running", False):  # another thread's torch load: the real method
        _BASE(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        return
    for hook in _pre_hooks(self):
        hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


@contextmanager
def _copying_nothing() -> Iterator[None]:
    with _LOCK:
        outer = getattr(_THREAD, "running", False)
        _THREAD.running = True
        nn.Module._load_from_state_dict = _hooks_only  # type: ignore[method-assign]
        try:
            yield
        finally:
            _THREAD.running = outer
            if not outer:
                nn.Module._load_from_state_dict = _BASE  # type: ignore[method-assign]


@dataclass
class Rewritten:
    """What each module would read at its own level after its machinery ran.

    Attributes:
        state: ``{key: value}`` for every key some module reads as its own parameter,
            buffer or extra state (or reports as unexpected), in torch's visiting order.
        problems: ``(module path, what went wrong)`` for machinery that could not be run
            on the description, or that reported errors itself.
    """

    state: dict[str, Any]
    problems: list[tuple[str, str]] = field(default_factory=list)


def rewrite(
    module: nn.Module,
    state: Mapping[str, Any],
    versions: Mapping[str, int] | None,
    *,
    placeholders: bool,
    strict: bool = True,
) -> Rewritten:
    """Run every submodule's load machinery over ``state`` as torch does, copying nothing.

    Args:
        state: the checkpoint's keys (after any remap) with meta placeholders
            (``placeholders=True``) or the stored values.
        versions: ``{module path: _version}`` recorded by the checkpoint (torch's
            ``state_dict._metadata``); None when it recorded none.
        placeholders: run on placeholders: each module's own tensors are swapped for meta
            twins while its machinery runs, so nothing it does can change the module, and a
            module that writes or replaces them is reported.
    """
    with_machinery = _subtrees_with_machinery(module)
    out = Rewritten({})
    missing: list[str] = []
    unexpected: list[str] = []
    errors: list[str] = []

    def visit(sub: nn.Module, local: dict[str, Any], prefix: str) -> None:
        if id(sub) not in with_machinery:
            out.state.update(local)
            return
        path = prefix[:-1]
        if rewrites(sub):
            metadata: dict[str, Any] = {} if versions is None or path not in versions else {"version": versions[path]}
            n_missing, n_unexpected, n_errors = len(missing), len(unexpected), len(errors)
            problem = _run(sub, local, prefix, metadata, missing, unexpected, errors, placeholders=placeholders)
            if problem is not None:
                out.problems.append((path, problem))
            found = errors[n_errors:]
            if strict:
                found += [f"reports {k!r} missing" for k in missing[n_missing:]]
                found += [f"reports {k!r} unexpected" for k in unexpected[n_unexpected:]]
            out.problems += [(path, f"its load machinery {msg}") for msg in found]
        children = {name for name, child in sub._modules.items() if child is not None}
        for key, value in local.items():
            if not key.startswith(prefix):
                continue  # added under another prefix: no module reads it (torch ignores it too)
            head = key[len(prefix) :].split(".", 1)
            if len(head) == 1 or head[0] not in children:
                out.state[key] = value
        for name, child in sub._modules.items():
            if child is not None:
                child_prefix = f"{prefix}{name}."
                visit(child, {k: v for k, v in local.items() if k.startswith(child_prefix)}, child_prefix)

    with _copying_nothing():
        visit(module, dict(state), "")
    return out


def _run(
    sub: nn.Module,
    local: dict[str, Any],
    prefix: str,
    metadata: dict[str, Any],
    missing: list[str],
    unexpected: list[str],
    errors: list[str],
    *,
    placeholders: bool,
) -> str | None:
    """Call one module's ``_load_from_state_dict``; why it could not be run, or None."""
    swapped: list[tuple[dict[str, Any], str, torch.Tensor, torch.Tensor, int]] = []
    if placeholders:
        tables: tuple[dict[str, Any], ...] = (sub._parameters, sub._buffers)
        for table in tables:
            for name, t in table.items():
                if t is None or is_lazy(t):
                    continue
                # Not an inference tensor even under inference mode: those have no version counter.
                with torch.inference_mode(False):
                    twin: torch.Tensor = torch.empty(t.shape, dtype=t.dtype, device="meta")
                    if isinstance(t, nn.Parameter):
                        twin = nn.Parameter(twin, requires_grad=t.requires_grad)
                table[name] = twin
                swapped.append((table, name, t, twin, twin._version))
    try:
        sub._load_from_state_dict(local, prefix, metadata, True, missing, unexpected, errors)
    except Exception as exc:  # noqa: BLE001 - user code: any failure is reported as a problem, never raised raw
        first = (str(exc).splitlines() or [""])[0][:200]
        what = "on the checkpoint's description (meta tensors)" if placeholders else "on the stored values"
        return (
            f"its load machinery ({type(sub).__name__}: pre-hooks or _load_from_state_dict) raised "
            f"{type(exc).__name__}: {first} {what}, so what it would load cannot be checked before copying"
        )
    finally:
        touched = [name for table, name, _, twin, version in swapped if table.get(name) is not twin or twin._version != version]
        for table, name, original, _, _ in swapped:
            table[name] = original
    if touched:
        return (
            f"its load machinery ({type(sub).__name__}._load_from_state_dict) writes or replaces the module's own "
            f"tensors {', '.join(touched[:5])} itself, so what it would load cannot be checked before copying; "
            "load it with torch's load_state_dict, or move that work into a load pre-hook that edits the state dict"
        )
    return None


def _subtrees_with_machinery(module: nn.Module) -> set[int]:
    """``id`` of every submodule whose subtree holds a module that rewrites its state dict."""
    found: set[int] = set()
    done: set[int] = set()

    def walk(sub: nn.Module) -> bool:
        if id(sub) in done:
            return id(sub) in found
        done.add(id(sub))
        hit = rewrites(sub)
        for child in sub._modules.values():
            if child is not None and walk(child):
                hit = True
        if hit:
            found.add(id(sub))
        return hit

    walk(module)
    return found


def placeholders_for(specs: Mapping[str, tuple[str, tuple[int, ...]]], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Meta tensors standing for the checkpoint's tensors; tied keys share one."""
    out: dict[str, torch.Tensor] = {}
    for key, (dtype, shape) in specs.items():
        if key not in aliases:
            out[key] = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
    for key in specs:
        if key in aliases:
            target = aliases[key]
            out[key] = out[target] if target in out else torch.empty(specs[key][1], dtype=getattr(torch, specs[key][0]), device="meta")
    return {key: out[key] for key in specs}
