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
from collections.abc import Generator, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from manifest_ckpt.comparison.compare import compile_patterns, same_class
from manifest_ckpt.comparison.introspect import class_name, dtype_name
from manifest_ckpt.comparison.report import Problem, Report, sort_problems
from manifest_ckpt.errors import IntegrityError, ModelMismatchError, StateMismatchError, UnsupportedOptionError
from manifest_ckpt.format import values
from manifest_ckpt.format.dtypes import describe
from manifest_ckpt.format.manifest import Manifest, modules_from_dict
from manifest_ckpt.reader import LoadResult, _fill, _Weights, finish_steps, load_steps, resolve_device
from manifest_ckpt.storage.store import Store, open_store, read_store_manifest
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
    """A module entry's load, checked and paused before it changes the module (``load_steps``)."""

    key: str
    module: nn.Module
    steps: Generator[Report, None, LoadResult]
    stored: set[str]  # the stored keys it reads


@dataclass
class _Plan:
    """What a walk found: the problems, and what to restore when there are none."""

    manifest: Manifest
    live_modules: dict[str, nn.Module]
    problems: list[Problem] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    checked: int = 0
    modules: list[_ModuleJob] = field(default_factory=list)
    # (key, object, kind, saved state node, optimizer's module entry or None)
    statefuls: list[tuple[str, Any, str, Any, str | None]] = field(default_factory=list)
    tensors: list[tuple[str, torch.Tensor, str]] = field(default_factory=list)  # (key, live, stored key)
    values: list[tuple[str, MutableMapping[Any, Any], Any, Any]] = field(default_factory=list)  # key, dict, name, node
    left_initial: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    cast: list[str] = field(default_factory=list)

    def report(self) -> Report:
        return Report(sort_problems(self.problems), self.hints, None, self.checked)

    def needed(self) -> set[str]:
        """The stored keys a restore reads."""
        keys = {k for job in self.modules for k in job.stored}
        keys |= {stored for _, _, stored in self.tensors}
        for _, _, _, node, _ in self.statefuls:
            keys |= {k for _, k, _ in values.iter_refs(node)}
        for _, _, _, node in self.values:
            keys |= {k for _, k, _ in values.iter_refs(node)}
        return {self.manifest.aliases.get(k, k) for k in keys}

    def close(self) -> None:
        """Drop the paused module loads (nothing of them has run past their checks)."""
        for job in self.modules:
            job.steps.close()


class _Walk:
    """Compares a saved entry tree with a live application state, collecting a :class:`_Plan`."""

    def __init__(
        self, store: Store, manifest: Manifest, app: Mapping[str, Any], policy: _Policy, device: torch.device
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.weights = _Weights(store, manifest)
        self.policy = policy
        self.device = device
        self.live_modules = module_entries(app)
        self.plan = _Plan(manifest, self.live_modules)

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
        """Check a module entry as ``load(module)`` checks a module: its machinery, extra state, meta tensors."""
        if not values.is_tagged(node, "module"):
            self.problem("class", key, _live_kind(module), _saved_kind(node))
            return
        body = node["module"]
        part = _entry_manifest(self.manifest, body)
        policy = self.policy
        steps = load_steps(
            _wrapped(body["prefix"], module),
            self.store,
            part,
            strict=policy.strict,
            remap=None,
            cast=policy.cast,
            verifying=False,  # the whole state's bytes are verified at once
            allow_missing=policy.allow_missing,
            allow_unexpected=policy.allow_unexpected,
            check_classes=policy.check_classes,
            untie=False,
            tie=False,
            target_device=self.device,
            transforms=None,
            weights=self.weights,
        )
        try:
            report = next(steps)
        except ModelMismatchError as exc:
            report = exc.report
            self.plan.problems += report.problems
        else:
            stored = {part.aliases.get(k, k) for k in part.tensors} | set(part.aliases)
            self.plan.modules.append(_ModuleJob(key, module, steps, stored))
        self.plan.hints += [h for h in report.hints if h not in self.plan.hints]
        self.plan.checked += report.checked

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
        root: str | None = None
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
        self.plan.statefuls.append((key, obj, kind, body["state"], root))


def _wrapped(prefix: str, module: nn.Module) -> nn.Module:
    """``module`` inside plain containers named by the dotted ``prefix``: its keys are then its stored keys.

    The containers are set in ``_modules`` directly, as any name (``train``, a number) is a
    valid dict key but not always a valid attribute; the module itself is not changed.
    """
    names = prefix.removesuffix(".").split(".")
    root = here = nn.Module()
    for name in names[:-1]:
        child = nn.Module()
        here._modules[name] = child
        here = child
    here._modules[names[-1]] = module
    return root


def _entry_manifest(manifest: Manifest, body: Mapping[str, Any]) -> Manifest:
    """One module entry of a training state as a weights checkpoint of its stored keys.

    Its module tree under the entry's path, its tensors and ties, and its module extra state;
    ``load_steps`` then checks and loads it as it loads a module (its files are bound with
    the whole checkpoint's manifest, so the other entries' tensors in them stay accounted for).
    """
    prefix = body["prefix"]
    base = prefix.removesuffix(".")
    tree = modules_from_dict(body["modules"]) or {}
    declared = {prefix + (f"{path}.{name}" if path else name) for path, m in tree.items() for name in m.persistent_names()}
    extra = {k: n for k, n in manifest.extra_state.items() if k.startswith(prefix)}
    keys = declared | {ref for n in extra.values() for _, ref, _ in values.iter_refs(n)}
    aliases = {k: manifest.aliases[k] for k in keys if manifest.aliases.get(k) in keys}
    # A tie to a tensor of another entry: this entry reads the shared bytes as its own tensor.
    tensors = {k: manifest.entry(k) for k in sorted(keys) if k not in aliases}
    return Manifest(
        digest=manifest.digest,
        files=manifest.files,
        tensors=tensors,
        aliases=aliases,
        modules={f"{base}.{path}" if path else base: m for path, m in tree.items()},
        lineage=manifest.lineage,
        format_version=manifest.format_version,
        extensions={"extra_state": extra} if extra else None,
    )


def _join(key: str, path: str) -> str:
    return f"{key}.{path}" if key and path else key or path


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
    store: Store,
    manifest: Manifest,
    *,
    remap: Any,
    allow_missing: Iterable[str],
    allow_unexpected: Iterable[str],
    strict: bool,
    cast: bool,
    check_classes: bool,
    device: torch.device,
) -> tuple[_Plan, _Weights]:
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
    walk = _Walk(store, manifest, app, policy, device)
    if manifest.state is None:
        plan = walk.plan
        plan.problems = [Problem("missing", str(k), _live_kind(v), None) for k, v in app.items()]
        plan.hints.append(
            f"{store.location} is a weights checkpoint, not a training state: load a module from it with "
            "manifest_ckpt.load(model, path)"
        )
        return plan, walk.weights
    try:
        walk.entries(manifest.state, app, "")
    except BaseException:
        walk.plan.close()
        raise
    return walk.plan, walk.weights


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
    plan, _ = _plan(
        app,
        store,
        manifest,
        remap=remap,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        strict=strict,
        cast=cast,
        check_classes=check_classes,
        device=resolve_device(None),
    )
    plan.close()
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
    device: str | torch.device | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadResult:
    """``manifest_ckpt.load`` for an application state: check everything, then restore in place.

    Everything is compared and every stored value read before the first live object is
    changed. Each module entry is checked and loaded as ``load(module)`` loads a module (its
    load machinery, extra state, and meta-device tensors materialised on ``device``, with the
    optimizers of the application state pointed at the new parameters). User-defined
    Stateful objects are restored first, then modules, tensors, optimizers, schedulers and values.

    Raises:
        StateMismatchError: the application state and the checkpoint differ (``.report``).
        IntegrityError: missing or corrupt files, or ``expect_digest`` does not match.
        LoadAbortedError: a module's copy or post-hook failed after the checks (that module
            is put back as it was; entries restored before it stay restored).
    """
    store = open_store(path, storage_options=storage_options)
    manifest = read_store_manifest(store)
    if expect_digest is not None and manifest.digest != expect_digest:
        raise IntegrityError(
            f"{store.location}: checkpoint digest is {manifest.digest}, expected {expect_digest}; "
            "this is not the checkpoint you pinned"
        )
    plan, weights = _plan(
        app,
        store,
        manifest,
        remap=remap,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        strict=strict,
        cast=cast,
        check_classes=check_classes,
        device=resolve_device(device),
    )
    try:
        if plan.problems:
            raise StateMismatchError(plan.report(), path=store.location)
        needed = plan.needed()
        weights.bind({c.file for key in needed for c in manifest.tensors[key].pieces()})
        if verify_digests or expect_digest is not None:
            weights.verify(needed)
        modules = _restore(plan, weights)
    except BaseException:
        plan.close()
        raise
    loaded = [k for r in modules for k in r.loaded]
    loaded += [k for k, *_ in plan.statefuls] + [k for k, *_ in plan.tensors] + [k for k, *_ in plan.values]
    return LoadResult(
        loaded=sorted(loaded),
        cast=sorted(plan.cast + [k for r in modules for k in r.cast]),
        retied=sorted(k for r in modules for k in r.retied),
        left_initial=sorted(plan.left_initial + [k for r in modules for k in r.left_initial]),
        skipped=sorted(plan.skipped + [k for r in modules for k in r.skipped]),
        materialized=sorted(k for r in modules for k in r.materialized),
        manifest=manifest,
        tie_filled=dict(sorted((k, v) for r in modules for k, v in r.tie_filled.items())),
        allowed=[a for r in modules for a in r.allowed],
    )


def _restore(plan: _Plan, weights: _Weights) -> list[LoadResult]:
    manifest = plan.manifest

    def resolve(tag: str, key: str) -> Any:
        tensor = read_whole(weights, manifest, key)
        if tag == "tensor":
            return tensor
        data = tensor.numpy().tobytes()
        return data if tag == "bytes" else io.BytesIO(data)

    # Every stored value is read into new memory before anything changes.
    states = [(key, obj, kind, values.decode_value(node, resolve), root) for key, obj, kind, node, root in plan.statefuls]
    plain = [(parent, name, values.decode_value(node, resolve)) for _, parent, name, node in plan.values]
    for _, obj, kind, state, _ in states:
        if kind == "stateful":
            obj.load_state_dict(state)
    results: list[LoadResult] = []
    replaced: dict[int, torch.Tensor] = {}
    for job in plan.modules:
        before = dict(job.module.named_parameters(remove_duplicate=False))
        results.append(finish_steps(job.steps))
        # A materialised meta parameter is a new object: optimizers must hold the new one.
        after = dict(job.module.named_parameters(remove_duplicate=False))
        replaced.update({id(p): after[name] for name, p in before.items() if after.get(name) is not p})
    with torch.no_grad():
        for _, live, stored in plan.tensors:
            _fill(live, weights, manifest, manifest.aliases.get(stored, stored))
    for _, obj, kind, state, root in states:
        if kind == "optimizer":
            assert root is not None
            if replaced:
                optim.repoint(obj, replaced)
            obj.load_state_dict(optim.indexed_state_dict(state, obj, optim.param_names(plan.live_modules, root)))
        elif kind == "scheduler":
            obj.load_state_dict(state)
    for parent, name, value in plain:
        parent[name] = value
    return results
