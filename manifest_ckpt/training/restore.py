"""``check`` and ``load`` of an application state: every difference first, then restore in place.

The saved entry tree and the live application state are walked together. Each dict entry
is matched by name (missing and unexpected entries follow the policies, as keys do for
weights); modules are compared as ``check`` compares a module; optimizers by class, parameter
groups and their membership by name, hyper-parameter keys and each parameter's state
tensors; schedulers and other Stateful objects by class and state keys; tensors by shape
and dtype. Only when nothing differs is anything restored: modules through the checked
copy, Stateful objects through ``load_state_dict``, plain values replaced in their dicts and
tensors copied in place, as ``torch.distributed.checkpoint.load`` restores them.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from manifest_ckpt.comparison.compare import StateSpec, TensorSpec, compare, compile_patterns, owner_of, same_class
from manifest_ckpt.comparison.introspect import capture, class_name, dtype_name
from manifest_ckpt.comparison.report import Problem, Report, sort_problems
from manifest_ckpt.errors import IntegrityError, StateMismatchError, UnsupportedOptionError, UnsupportedTensorError
from manifest_ckpt.format import values
from manifest_ckpt.format.dtypes import describe
from manifest_ckpt.format.manifest import Manifest, TensorEntry, modules_from_dict
from manifest_ckpt.reader import LoadResult, _fill, _require_writable, _Weights
from manifest_ckpt.storage.store import open_store, read_store_manifest
from manifest_ckpt.training import optim
from manifest_ckpt.training.plain import read_whole
from manifest_ckpt.training.tree import kind_of, module_entries

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class _Policy:
    allow_missing: tuple[str, ...]
    allow_unexpected: tuple[str, ...]
    strict: bool
    cast: bool
    check_classes: bool
    missing_ok: re.Pattern[str] | None
    unexpected_ok: re.Pattern[str] | None

    def allowed(self, kind: str, key: str) -> bool:
        pattern = self.missing_ok if kind == "missing" else self.unexpected_ok
        return not self.strict or bool(pattern and pattern.fullmatch(key))


@dataclass
class _ModuleJob:
    module: nn.Module
    copies: list[tuple[torch.Tensor, str]]  # (live tensor, stored key)
    keys: list[str]


@dataclass
class _Plan:
    """What a walk found: the problems, and what to restore when there are none."""

    manifest: Manifest
    problems: list[Problem] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    checked: int = 0
    modules: list[_ModuleJob] = field(default_factory=list)
    # (key, object, kind, saved state node, optimizer names or None)
    statefuls: list[tuple[str, Any, str, Any, dict[int, str] | None]] = field(default_factory=list)
    tensors: list[tuple[str, torch.Tensor, str]] = field(default_factory=list)  # (key, live, stored key)
    values: list[tuple[str, MutableMapping[Any, Any], Any, Any]] = field(default_factory=list)  # key, dict, name, node
    left_initial: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    cast: list[str] = field(default_factory=list)

    def report(self) -> Report:
        return Report(sort_problems(self.problems), self.hints, None, self.checked)

    def needed(self) -> set[str]:
        """The stored keys a restore reads."""
        keys = {stored for job in self.modules for _, stored in job.copies}
        keys |= {stored for _, _, stored in self.tensors}
        for _, _, _, node, _ in self.statefuls:
            keys |= {k for _, k, _ in values.iter_refs(node)}
        for _, _, _, node in self.values:
            keys |= {k for _, k, _ in values.iter_refs(node)}
        return {self.manifest.aliases.get(k, k) for k in keys}


class _Walk:
    """Compares a saved entry tree with a live application state, collecting a :class:`_Plan`."""

    def __init__(self, manifest: Manifest, app: Mapping[str, Any], policy: _Policy) -> None:
        self.manifest = manifest
        self.policy = policy
        self.live_modules = module_entries(app)
        self.plan = _Plan(manifest)

    def problem(self, kind: Any, key: str, expected: str | None, found: str | None) -> None:
        self.plan.problems.append(Problem(kind, key, expected, found))

    def entries(self, node: Any, live: Mapping[Any, Any], key: str) -> None:
        if not values.is_tagged(node, "dict"):
            self.problem("class", key, "a dict", _saved_kind(node))
            return
        saved = {name: child for name, child in node["dict"]}
        for name, child in live.items():
            here = values.child_key(key, name)
            if name in saved:
                self.entry(saved[name], child, here, live, name)
            elif self.policy.allowed("missing", here):
                self.plan.left_initial.append(here)
            else:
                self.problem("missing", here, _live_kind(child), None)
        for name, child in saved.items():
            here = values.child_key(key, name)
            if name in live:
                continue
            if self.policy.allowed("unexpected", here):
                self.plan.skipped.append(here)
            else:
                self.problem("unexpected", here, None, _saved_kind(child))

    def entry(self, node: Any, live: Any, key: str, parent: Mapping[Any, Any], name: Any) -> None:
        kind = kind_of(live)
        if kind == "module":
            self.module(node, live, key)
        elif kind is not None:
            self.stateful(node, live, key, kind)
        elif isinstance(live, Mapping):
            self.entries(node, live, key)
        elif isinstance(live, torch.Tensor):
            self.tensor(node, live, key)
        elif _saved_kind(node).startswith(("module", "optimizer", "scheduler", "stateful")):
            self.problem("class", key, _live_kind(live), _saved_kind(node))
        elif not isinstance(parent, MutableMapping):
            raise UnsupportedOptionError(f"{key}: the dict holding this value is read-only; pass a dict")
        else:
            self.plan.checked += 1
            self.plan.values.append((key, parent, name, node))

    def tensor(self, node: Any, live: torch.Tensor, key: str) -> None:
        if not values.is_tagged(node, "tensor"):
            self.problem("class", key, _live_kind(live), _saved_kind(node))
            return
        entry = self.manifest.entry(node["tensor"])
        want, have = dtype_name(live, key), describe(entry.dtype, entry.shape)
        self.plan.checked += 1
        if tuple(live.shape) != entry.shape:
            self.problem("shape", key, describe(want, tuple(live.shape)), have)
        elif want != entry.dtype and not self.policy.cast:
            self.problem("dtype", key, describe(want, tuple(live.shape)), have)
        else:
            if want != entry.dtype:
                self.plan.cast.append(key)
            self.plan.tensors.append((key, live, node["tensor"]))

    def module(self, node: Any, module: nn.Module, key: str) -> None:
        if not values.is_tagged(node, "module"):
            self.problem("class", key, _live_kind(module), _saved_kind(node))
            return
        body = node["module"]
        prefix, tree = body["prefix"], modules_from_dict(body["modules"]) or {}
        stored: dict[str, str] = {}  # key under the entry's dotted key -> stored key
        for path, m in tree.items():
            for name in m.persistent_names():
                local = f"{path}.{name}" if path else name
                stored[f"{key}.{local}"] = prefix + local
        tensors = {k: _spec(self.manifest.entry(s), k) for k, s in stored.items()}
        back = {s: k for k, s in stored.items()}
        aliases = {back[s]: back[t] for s, t in self.manifest.aliases.items() if s in back and t in back}
        classes = {_join(key, p): m.cls for p, m in tree.items()}
        live = capture(module)
        assert live.modules is not None
        mine = StateSpec(
            {f"{key}.{k}": TensorSpec(s.dtype, s.shape, owner_of(f"{key}.{k}")) for k, s in live.spec().tensors.items()},
            {f"{key}.{a}": f"{key}.{t}" for a, t in live.aliases.items()},
            {_join(key, p): m.cls for p, m in live.modules.items()},
        )
        policy = self.policy
        comparison = compare(
            StateSpec(tensors, aliases, classes),
            mine,
            allow_missing=policy.allow_missing,
            allow_unexpected=policy.allow_unexpected,
            strict=policy.strict,
            cast=policy.cast,
            check_classes=policy.check_classes,
        )
        self.plan.problems += comparison.report.problems
        self.plan.hints += [h for h in comparison.report.hints if h not in self.plan.hints]
        self.plan.checked += comparison.report.checked
        self.plan.left_initial += comparison.allowed_missing
        self.plan.skipped += comparison.skipped
        self.plan.cast += comparison.cast
        meta = [k for k, t in live.tensors.items() if t.is_meta]
        if meta:
            raise UnsupportedTensorError(
                f"{key}: {len(meta)} tensors of the module are on the meta device ({', '.join(meta[:5])}); in an "
                "application state modules are loaded in place: materialise it first (to_empty), or load it "
                "alone with manifest_ckpt.load. Nothing was loaded."
            )
        chosen: dict[str, str] = {}
        skipped = set(comparison.skipped)
        for local in live.tensors:
            full = f"{key}.{local}"
            if full in stored and full not in skipped:
                chosen.setdefault(live.aliases.get(local, local), local)
        _require_writable(live, chosen.values())
        copies = [(live.tensors[local], stored[f"{key}.{local}"]) for local in chosen.values()]
        keys = [f"{key}.{k}" for k in live.tensors if f"{key}.{k}" in stored and f"{key}.{k}" not in skipped]
        self.plan.modules.append(_ModuleJob(module, copies, keys))

    def stateful(self, node: Any, obj: Any, key: str, kind: str) -> None:
        want = f"{kind} {class_name(obj)}"
        if not values.is_tagged(node, "stateful"):
            self.problem("class", key, want, _saved_kind(node))
            return
        body = node["stateful"]
        if body["kind"] != kind or (self.policy.check_classes and not same_class(class_name(obj), body["class"])):
            self.problem("class", key, want, _saved_kind(node))
            return
        self.plan.checked += 1
        specs = values.decode_value(body["state"], lambda tag, k: self.manifest.entry(k))
        names: dict[int, str] | None = None
        if kind == "optimizer":
            root = body.get("module", "")
            if root and root not in self.live_modules:
                self.problem("missing", root, f"a module (names the parameters of {key})", None)
                return
            names = optim.param_names(self.live_modules, root)

            def stored_shape(name: str) -> tuple[int, ...] | None:
                stored = _join(root, name)
                return self.manifest.entry(stored).shape if stored in self.manifest.keys() else None

            self.plan.problems += optim.problems(
                key, specs, obj, names, stored_shape, cast=self.policy.cast, allowed=self.policy.allowed
            )
        else:
            live_state = obj.state_dict()
            if isinstance(live_state, Mapping) and isinstance(specs, Mapping):
                for name in live_state:
                    here = values.child_key(key, name)
                    if name not in specs and not self.policy.allowed("missing", here):
                        self.problem("missing", here, "state entry", None)
                for name in specs:
                    here = values.child_key(key, name)
                    if name not in live_state and not self.policy.allowed("unexpected", here):
                        self.problem("unexpected", here, None, "state entry")
        self.plan.statefuls.append((key, obj, kind, body["state"], names))


def _join(key: str, path: str) -> str:
    return f"{key}.{path}" if key and path else key or path


def _spec(entry: TensorEntry, key: str) -> TensorSpec:
    return TensorSpec(entry.dtype, entry.shape, owner_of(key))


def _live_kind(obj: Any) -> str:
    kind = kind_of(obj)
    if kind is not None:
        return f"{kind} {class_name(obj)}"
    if isinstance(obj, torch.Tensor):
        return describe(str(obj.dtype).removeprefix("torch."), tuple(obj.shape))
    if isinstance(obj, Mapping):
        return "a dict"
    return f"value ({type(obj).__name__})"


def _saved_kind(node: Any) -> str:
    if values.is_tagged(node, "module"):
        classes = node["module"]["modules"]
        return f"module {classes[''].get('class') if '' in classes else '?'}"
    if values.is_tagged(node, "stateful"):
        return f"{node['stateful']['kind']} {node['stateful']['class']}"
    if values.is_tagged(node, "dict"):
        return "a dict"
    if values.is_tagged(node, "tensor"):
        return "tensor"
    return f"value {values.describe(node, 40)}"


def _plan(
    app: Mapping[str, Any],
    manifest: Manifest,
    *,
    remap: Any,
    allow_missing: Iterable[str],
    allow_unexpected: Iterable[str],
    strict: bool,
    cast: bool,
    check_classes: bool,
    location: str,
) -> _Plan:
    if remap:
        raise UnsupportedOptionError(
            "remap= applies to the keys of a module; for an application state, name the entries as they were "
            "saved (or load a module alone from it with manifest_ckpt.load(model, path, remap=...))"
        )
    missing, unexpected = tuple(allow_missing), tuple(allow_unexpected)
    policy = _Policy(
        missing,
        unexpected,
        strict,
        cast,
        check_classes,
        compile_patterns(missing, "allow_missing"),
        compile_patterns(unexpected, "allow_unexpected"),
    )
    if manifest.state is None:
        plan = _Plan(manifest)
        plan.problems = [Problem("missing", str(k), _live_kind(v), None) for k, v in app.items()]
        plan.hints.append(
            f"{location} is a weights checkpoint, not a training state: load a module from it with "
            "manifest_ckpt.load(model, path)"
        )
        return plan
    walk = _Walk(manifest, app, policy)
    walk.entries(manifest.state, app, "")
    return walk.plan


def check_state(
    app: Mapping[str, Any],
    path: PathLike,
    *,
    remap: Any = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    strict: bool = True,
    cast: bool = False,
    check_classes: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Report:
    """``manifest_ckpt.check`` for an application state: every difference, nothing changed."""
    store = open_store(path, storage_options=storage_options)
    manifest = read_store_manifest(store)
    _Weights(store, manifest).bind(manifest.files)
    plan = _plan(
        app,
        manifest,
        remap=remap,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        strict=strict,
        cast=cast,
        check_classes=check_classes,
        location=store.location,
    )
    return plan.report()


def load_state(
    app: Mapping[str, Any],
    path: PathLike,
    *,
    remap: Any = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    strict: bool = True,
    cast: bool = False,
    check_classes: bool = True,
    verify_digests: bool = False,
    expect_digest: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadResult:
    """``manifest_ckpt.load`` for an application state: check everything, then restore in place.

    Everything is compared and every stored value read before the first live object is
    changed. User-defined Stateful objects are restored first (their ``load_state_dict`` is
    the one step that may still raise), then modules, optimizers, schedulers, tensors and values.

    Raises:
        StateMismatchError: the application state and the checkpoint differ (``.report``).
        IntegrityError: missing or corrupt files, or ``expect_digest`` does not match.
    """
    store = open_store(path, storage_options=storage_options)
    manifest = read_store_manifest(store)
    if expect_digest is not None and manifest.digest != expect_digest:
        raise IntegrityError(
            f"{store.location}: checkpoint digest is {manifest.digest}, expected {expect_digest}; "
            "this is not the checkpoint you pinned"
        )
    plan = _plan(
        app,
        manifest,
        remap=remap,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        strict=strict,
        cast=cast,
        check_classes=check_classes,
        location=store.location,
    )
    if plan.problems:
        raise StateMismatchError(plan.report(), path=store.location)
    weights = _Weights(store, manifest)
    needed = plan.needed()
    weights.bind({c.file for key in needed for c in manifest.tensors[key].pieces()})
    if verify_digests or expect_digest is not None:
        weights.verify(needed)
    _restore(plan, weights)
    loaded = [k for job in plan.modules for k in job.keys]
    loaded += [k for k, *_ in plan.statefuls] + [k for k, *_ in plan.tensors] + [k for k, *_ in plan.values]
    return LoadResult(
        loaded=sorted(loaded),
        cast=sorted(plan.cast),
        retied=[],
        left_initial=sorted(plan.left_initial),
        skipped=sorted(plan.skipped),
        materialized=[],
        manifest=manifest,
    )


def _restore(plan: _Plan, weights: _Weights) -> None:
    manifest = plan.manifest

    def resolve(tag: str, key: str) -> Any:
        tensor = read_whole(weights, manifest, key)
        if tag == "tensor":
            return tensor
        data = tensor.numpy().tobytes()
        return data if tag == "bytes" else io.BytesIO(data)

    # Every stored value is read into new memory before anything changes.
    states = [(key, obj, kind, values.decode_value(node, resolve), names) for key, obj, kind, node, names in plan.statefuls]
    plain = [(parent, name, values.decode_value(node, resolve)) for _, parent, name, node in plan.values]
    for _, obj, kind, state, _ in states:
        if kind == "stateful":
            obj.load_state_dict(state)
    with torch.no_grad():
        for job in plan.modules:
            for tensor, stored in job.copies:
                _fill(tensor, weights, manifest, manifest.aliases.get(stored, stored))
        for _, live, stored in plan.tensors:
            _fill(live, weights, manifest, manifest.aliases.get(stored, stored))
    for _, obj, kind, state, names in states:
        if kind == "optimizer":
            assert names is not None
            obj.load_state_dict(optim.indexed_state_dict(state, obj, names))
        elif kind == "scheduler":
            obj.load_state_dict(state)
    for parent, name, value in plain:
        parent[name] = value

