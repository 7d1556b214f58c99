"""Describe a live ``nn.Module`` or state dict: keys, tensors, ties and the module tree."""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy

from manifest_ckpt.comparison.compare import EXTRA_STATE, StateSpec, TensorSpec, new_spec, owner_of
from manifest_ckpt.errors import InvalidKeyError, UnsupportedTensorError
from manifest_ckpt.format.dtypes import DTYPES
from manifest_ckpt.format.manifest import EXTRA_STATE_NAME, ModuleEntry, module_entry
from manifest_ckpt.gc_pause import gc_paused


@dataclass(frozen=True)
class LiveState:
    """A module's (or state dict's) persistent tensors by key, with ties and tree.

    ``lazy`` holds the keys of uninitialised lazy parameters and buffers (``nn.LazyLinear``
    before its first forward): they have a dtype but no shape until loaded or run. ``extra``
    holds module extra state by key (``capture(..., extra_state=True)``), as
    ``get_extra_state`` returned it.
    """

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    modules: dict[str, ModuleEntry] | None
    owners: dict[str, nn.Module]
    lazy: frozenset[str] = frozenset()
    extra: dict[str, Any] = field(default_factory=dict)
    # spec()'s tensor entries as capture found them (None: computed by spec()); not state.
    specs: Mapping[str, TensorSpec] | None = field(default=None, repr=False, compare=False)

    def spec(self, lazy_shapes: Mapping[str, tuple[int, ...]] | None = None) -> StateSpec:
        """The structure only, for comparison.

        Args:
            lazy_shapes: the shape each lazy key takes when loaded (the checkpoint's, as
                torch materialises it); a lazy key without one is shown with shape ``[]``.
        """
        if self.specs is not None:
            specs = dict(self.specs)
            specs.update((k, TensorSpec(EXTRA_STATE, (), owner_of(k))) for k in self.extra)
            return self._with_tree(specs)
        shapes = lazy_shapes or {}
        names = _storable_names()
        strided = torch.strided
        # One dict lookup per tensor for its dtype name; dtype_name words the errors.
        specs = {
            k: TensorSpec(
                (names.get(t.dtype) if t.layout == strided else None) or dtype_name(t, k),
                shapes.get(k, ()) if k in self.lazy else tuple(t.shape),
                k.rpartition(".")[0],
            )
            for k, t in self.tensors.items()
        }
        specs.update((k, TensorSpec(EXTRA_STATE, (), owner_of(k))) for k in self.extra)
        return self._with_tree(specs)

    def _with_tree(self, specs: dict[str, TensorSpec]) -> StateSpec:
        if self.modules is None:
            return StateSpec(specs, self.aliases)
        classes = {p: m.cls for p, m in self.modules.items()}
        return StateSpec(specs, self.aliases, classes, {p: m.version for p, m in self.modules.items()})


@functools.cache
def _storable_names() -> dict[torch.dtype, str]:
    """``{torch dtype: manifest name}`` for every dtype a manifest stores (this torch has)."""
    return {d: name for name in DTYPES if isinstance(d := getattr(torch, name, None), torch.dtype)}


def dtype_name(tensor: torch.Tensor, key: str) -> str:
    """The manifest dtype name of a tensor, or a clear error for what cannot be stored."""
    if tensor.layout != torch.strided:
        raise UnsupportedTensorError(
            f"tensor {key!r} has layout {tensor.layout} (sparse); a manifest checkpoint stores dense tensors. "
            "Store its parts as dense tensors (for COO: t.coalesce().indices() and .values()), or call .to_dense()."
        )
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise UnsupportedTensorError(
            f"tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store; "
            f"supported: {', '.join(DTYPES)}. Convert it (e.g. .to(torch.float32)) before saving."
        )
    return name


def class_name(obj: object) -> str:
    """Fully qualified class name, such as ``torch.nn.modules.linear.Linear``."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _identity(tensor: torch.Tensor) -> tuple[object, ...]:
    """What makes two tensors the same storage view (a tie).

    Meta, empty and uninitialised lazy tensors have no real address, so only object identity
    ties them.
    """
    if is_lazy(tensor) or tensor.is_meta or tensor.numel() == 0 or tensor.layout != torch.strided:
        return ("object", id(tensor))
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
        # x and x.conj() (or torch._neg_view(x)) are one view of one storage with different values.
        tensor.is_conj(),
        tensor.is_neg(),
    )


def find_aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map each key that repeats an earlier key's tensor to that first key.

    "Earlier" is the state dict's own order, so GPT-2's ``lm_head.weight`` becomes an alias
    of ``transformer.wte.weight``.
    """
    # Two keys can be one view only if their first elements share an address, so one cheap
    # data_ptr() per tensor finds the few candidates and _identity settles only those
    # (_identity costs a dozen tensor calls; a 100,000-tensor module would pay it in full).
    seen: dict[object, str] = {}
    shared: dict[object, list[str]] = {}
    for key, tensor in tensors.items():
        try:
            address: object = tensor.data_ptr()
        except (RuntimeError, ValueError):  # no storage (some subclasses, lazy parameters): let _identity decide
            address = _identity(tensor)
        other = seen.setdefault(address, key)
        if other is not key:
            shared.setdefault(address, [other]).append(key)
    found = {}
    for keys in shared.values():
        first: dict[tuple[object, ...], str] = {}
        for key in keys:
            canonical = first.setdefault(_identity(tensors[key]), key)
            if canonical != key:
                found[key] = canonical
    # In state-dict order, as callers and manifests have always seen it.
    return {key: found[key] for key in tensors if key in found} if found else {}


def module_tree(module: nn.Module) -> dict[str, ModuleEntry]:
    """Every submodule path with its class, ``_version`` and directly owned tensor names."""
    tree = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        non_persistent = sub._non_persistent_buffers_set
        buffers = [n for n, b in sub._buffers.items() if b is not None]
        version = getattr(sub, "_version", None)
        # A lazy module (nn.LazyLinear) becomes its cls_to_become (nn.Linear) on its first
        # forward, with the same state: record what it becomes, so either loads into the other.
        becomes = getattr(sub, "cls_to_become", None) if isinstance(sub, LazyModuleMixin) else None
        tree[path] = ModuleEntry(
            cls=class_name(sub) if becomes is None else f"{becomes.__module__}.{becomes.__qualname__}",
            version=version if isinstance(version, int) and not isinstance(version, bool) else None,
            parameters=tuple(n for n, p in sub._parameters.items() if p is not None),
            buffers=tuple(n for n in buffers if n not in non_persistent),
            non_persistent_buffers=tuple(n for n in buffers if n in non_persistent),
        )
    return tree


_SAVE: Final = nn.Module._save_to_state_dict
_STATE_DICT: Final = nn.Module.state_dict
_EXTRA: Final = nn.Module.get_extra_state


_NAMED_MODULES: Final = nn.Module.named_modules


def _plain_class(cls: type) -> bool:
    """Whether ``state_dict`` and ``named_modules`` of ``cls`` are torch's own (no override, not lazy)."""
    return (
        cls._save_to_state_dict is _SAVE  # type: ignore[attr-defined]
        and cls.state_dict is _STATE_DICT  # type: ignore[attr-defined]
        and cls.get_extra_state is _EXTRA  # type: ignore[attr-defined]
        and cls.named_modules is _NAMED_MODULES  # type: ignore[attr-defined]
        and not issubclass(cls, LazyModuleMixin)
    )


def _walk(module: nn.Module) -> tuple[dict[str, Any], dict[str, nn.Module], dict[str, ModuleEntry]] | None:
    """``state_dict(keep_vars=True)``, the module paths and :func:`module_tree`, in one traversal.

    The same keys, in the same order, holding the same tensors as ``state_dict`` (each
    module's non-None parameters, then its persistent buffers, then its children), which
    it is whenever no module changes what ``state_dict`` gives. None when one might:
    state-dict hooks, an overridden ``state_dict``, ``_save_to_state_dict``,
    ``get_extra_state`` or ``named_modules``, a lazy module; the caller then asks torch. At
    100,000 tensors this is one walk instead of three, over ``_modules`` with a stack in
    ``named_modules(remove_duplicate=False)``'s order (its generators, one per level, cost
    as much again), and each class is examined once.
    """
    state: dict[str, Any] = {}
    owners: dict[str, nn.Module] = {}
    tree: dict[str, ModuleEntry] = {}
    names: dict[type, str | None] = {}  # class -> its name, or None: not plain
    stack: list[tuple[str, nn.Module, int]] = [("", module, 0)]
    pop, push = stack.pop, stack.extend
    # A module that holds itself sends named_modules into a RecursionError; torch raises it.
    deepest = sys.getrecursionlimit()
    while stack:
        path, sub, depth = pop()
        if depth > deepest:
            return None
        cls = type(sub)
        name = names.get(cls, "")
        if name == "":
            name = names[cls] = class_name(sub) if _plain_class(cls) else None
        if name is None or sub._state_dict_hooks or sub._state_dict_pre_hooks:
            return None
        owners[path] = sub
        prefix = path + "." if path else ""
        parameters: tuple[str, ...] = ()
        if sub._parameters:
            parameters = tuple([n for n, p in sub._parameters.items() if p is not None])
            for n in parameters:
                state[prefix + n] = sub._parameters[n]
        buffers: tuple[str, ...] = ()
        non_persistent: tuple[str, ...] = ()
        if sub._buffers:
            skipped = sub._non_persistent_buffers_set
            present = [n for n, b in sub._buffers.items() if b is not None]
            buffers = tuple([n for n in present if n not in skipped])
            non_persistent = tuple([n for n in present if n in skipped])
            for n in buffers:
                state[prefix + n] = sub._buffers[n]
        version = getattr(sub, "_version", None)
        version = version if isinstance(version, int) and not isinstance(version, bool) else None
        tree[path] = module_entry(name, version, parameters, buffers, non_persistent)
        children = sub._modules
        if children:  # pushed last child first: popped in order, depth first (named_modules' order)
            depth += 1
            push([(prefix + n, c, depth) for n, c in reversed(children.items()) if c is not None])
    return state, owners, tree


def _agree_with_state(tree: dict[str, ModuleEntry], keys: Iterable[str]) -> dict[str, ModuleEntry]:
    """The tree restricted to, and completed with, the keys ``state_dict()`` really returns.

    State-dict hooks and overridden ``_save_to_state_dict`` (quantized layers, FSDP) rename,
    drop or add keys. The manifest must declare exactly the stored keys, or the checkpoint
    could not be read back; an added key is listed as a buffer of the module that owns its
    path (a module of unknown class if no such module exists).
    """
    ordered = list(keys)
    present = set(ordered)

    def full(path: str, name: str) -> str:
        return f"{path}.{name}" if path else name

    out = {
        path: replace(
            m,
            parameters=tuple(n for n in m.parameters if full(path, n) in present),
            buffers=tuple(n for n in m.buffers if full(path, n) in present),
        )
        for path, m in tree.items()
    }
    declared = {full(path, n) for path, m in out.items() for n in m.persistent_names()}
    for key in ordered:
        if key not in declared:
            path, _, name = key.rpartition(".")
            entry = out.get(path, ModuleEntry(cls=None, version=None))
            out[path] = replace(entry, buffers=(*entry.buffers, name))
    return out


@gc_paused()  # a state dict of 100,000 tensors allocates no cycles; collections would only traverse it
def capture(obj: nn.Module | Mapping[str, torch.Tensor], *, extra_state: bool = False) -> LiveState:
    """Describe a module or a plain state dict.

    Args:
        extra_state: keep a module's extra state (``get_extra_state``) apart in
            ``LiveState.extra`` (``save`` and ``load`` of a module); otherwise a value that is
            not a tensor is refused.

    Raises:
        UnsupportedTensorError: a state value is not a tensor, or cannot be stored.
        TypeError: ``obj`` is neither a module nor a mapping.
    """
    extra: dict[str, Any] = {}
    modules: dict[str, ModuleEntry] | None
    walked = _walk(obj) if isinstance(obj, nn.Module) else None
    if walked is not None:
        state, owners, modules = walked
    elif isinstance(obj, nn.Module):
        state = obj.state_dict(keep_vars=True)
        owners = dict(obj.named_modules(remove_duplicate=False))
        if extra_state:
            extra = {k: state.pop(k) for k in [k for k in state if is_extra_state_key(k, owners)]}
        tree = module_tree(obj)
        # Without state-dict hooks the tree already declares exactly the state's keys, and
        # _agree_with_state would rebuild every entry unchanged (half a second at 100,000).
        declared = [f"{path}.{name}" if path else name for path, m in tree.items() for name in m.persistent_names()]
        if len(declared) != len(state) or state.keys() != set(declared):
            tree = _agree_with_state(tree, state)
        modules = tree
    elif isinstance(obj, Mapping):
        state, owners, modules = dict(obj), {}, None
    else:
        raise TypeError(f"expected an nn.Module or a state dict (mapping of str to tensor), got {type(obj).__name__}")
    tensors = {}
    specs: dict[str, TensorSpec] = {}
    lazy: list[str] = []
    # dtype objects compare by identity: a dict lookup instead of formatting str(dtype) per
    # tensor; dtype_name still decides (and words the error) for anything not in it.
    storable = _storable_names()
    strided = torch.strided
    for key, value in state.items():
        if not isinstance(key, str) or not key:
            raise InvalidKeyError(f"state dict key {key!r} is not a non-empty string; rename it", key=None)
        if not isinstance(value, torch.Tensor):
            raise UnsupportedTensorError(
                f"state dict entry {key!r} is a {type(value).__name__}, not a tensor (module extra state is "
                "stored by save(module) and mc.load only, not here); keep such values in save(..., metadata=...)"
            )
        # A storable dtype rules out quantized tensors (their dtypes are torch.qint8 and the
        # like), which saves an attribute read per tensor; anything else is examined in full.
        name = storable.get(value.dtype)
        if name is None or value.layout != strided or value.is_nested:
            if value.layout != strided or value.is_quantized or value.is_nested:
                raise UnsupportedTensorError(
                    f"tensor {key!r} has layout {value.layout}{' (quantized)' if value.is_quantized else ''}; only "
                    "dense tensors are stored. Call .to_dense() or dequantize before saving."
                )
            name = dtype_name(value, key)
        tensors[key] = value
        if is_lazy(value):
            lazy.append(key)
        else:  # what spec() gives, while the tensor's attributes are at hand (Parameter's are slow)
            specs[key] = new_spec((name, tuple(value.shape), key.rpartition(".")[0], None))
    return LiveState(
        tensors, find_aliases(tensors), modules, owners, frozenset(lazy), extra, None if lazy else specs
    )


def is_extra_state_key(key: str, owners: Mapping[str, nn.Module]) -> bool:
    """Whether ``key`` is a module's extra state (``get_extra_state``), as torch's state_dict names it."""
    path, _, name = key.rpartition(".")
    owner = owners.get(path)
    return (
        name == EXTRA_STATE_NAME
        and owner is not None
        and getattr(type(owner), "get_extra_state", nn.Module.get_extra_state) is not nn.Module.get_extra_state
    )
