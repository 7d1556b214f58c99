"""``convert``: turn ``.pth`` and foreign safetensors checkpoints into manifest checkpoints.

Nothing from the source runs: each format has its reader in this package (``torch_file``,
``safetensors_file``, ``hf_directory``; :mod:`read` picks one). The tensors found are
written by :func:`writer.save`, checked first against a module when one is given;
everything else the source held is kept as JSON (``metadata``) or listed as left out
(``lineage.source``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from manifest_ckpt.assemble import build
from manifest_ckpt.cli.progress import Progress
from manifest_ckpt.comparison.compare import Comparison, compare, compile_patterns
from manifest_ckpt.comparison.introspect import LiveState, capture, class_name, find_aliases, module_tree
from manifest_ckpt.comparison.remap import Remap, apply_remap
from manifest_ckpt.comparison.transforms import (
    RULE_SETS,
    Node,
    Rule,
    Transforms,
    choose_rule_set,
    resolve_transforms,
    simulate,
)
from manifest_ckpt.errors import ConversionError, ModelMismatchError
from manifest_ckpt.format.keys import check_keys
from manifest_ckpt.format.manifest import Manifest, ModuleEntry
from manifest_ckpt.sources.read import read_pending, read_source
from manifest_ckpt.sources.source import Hashes, SourceCheckpoint, resolve
from manifest_ckpt.storage.store import is_url
from manifest_ckpt.writer import _check_destination, save

__all__ = ["KNOWN_PREFIXES", "SourceCheckpoint", "convert", "read_source"]

KNOWN_PREFIXES: Final = {
    "module.": "saved from DistributedDataParallel?",
    "model.": "saved from a Lightning module?",
    "_orig_mod.": "saved from a torch.compile'd module?",
}


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    module: nn.Module | None = None,
    key: str | None = None,
    remap: Remap | None = None,
    transforms: Transforms | None = None,
    lineage: Any = None,
    parents: Sequence[Any] = (),
    overwrite: bool = False,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    untie: bool = False,
    tie: bool = False,
) -> Manifest:
    """Convert a ``.pth``/``.pt``/``.bin``/``.ckpt``, ``.safetensors`` file or sharded directory.

    Nothing from the source is executed. With ``module``, the converted keys are checked
    against it before anything is written, its module tree is recorded, and ties the
    source omitted (Hugging Face drops ``lm_head.weight`` when tied) become aliases.

    Args:
        src: the source file or directory.
        dst: the checkpoint directory to create.
        module: the model the weights belong to (it is only inspected, never modified;
            a meta-device module is fine).
        key: where the tensor dict lies in a pickled container, when ambiguous.
        remap: ``{regex: replacement}`` applied in order to the source keys first.
        transforms: key transforms applied after ``remap`` (a rule set name such as
            ``"mixtral"``, or rules of :mod:`manifest_ckpt.comparison.transforms`). With
            ``module`` and no ``transforms``, a rule set is chosen when the source holds
            per-expert keys the module fuses (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3).
            Recorded as ``lineage.source.transforms``.
        lineage: arbitrary JSON recorded as ``lineage.user``.
        parents: as for :func:`save`.
        overwrite: replace an existing checkpoint at ``dst``.
        progress: draw a progress bar on stderr when it is a terminal.
        storage_options: fsspec options when ``src`` or ``dst`` is a URL: a remote source is
            downloaded to a temporary directory first; a remote destination is written locally
            and uploaded with its manifest last.
        strict, allow_missing, allow_unexpected, untie, tie: with ``module``, the policies
            of :func:`load`, with the same names and meaning. Source keys the module lacks
            that they allow are left out of the checkpoint (listed in ``lineage.source.left_out``);
            module keys the source lacks stay absent (``load`` then needs the same allowance);
            ``untie`` stores a source tie as separate copies, ``tie`` stores the module tie's
            first key once and drops the other values. ``lineage.source.allowed`` lists each.

    Returns:
        The manifest written; ``lineage["source"]`` says what the source was, which key
        held the tensors, what was left out and which ties were added.

    Raises:
        UnsafeCheckpointError: the pickle references a global outside the allowlist.
        ConversionError: unreadable, damaged or ambiguous source.
        ModelMismatchError: the converted keys do not fit ``module`` (the report suggests
            the remap for a ``module.``/``model.`` prefix); nothing was written.
        RemapError: a remap rule matches no key or makes two keys collide.
        TransformError: a transform matches no key, or the keys do not fit it (an expert
            missing, experts of different shapes), naming the key; nothing was written.
        PatternError: an allow pattern is not a valid regular expression.
        UnsupportedTensorError: a tensor safetensors cannot store (complex128, sparse...).
        CheckpointExistsError: ``dst`` exists and ``overwrite`` is False.
    """
    with contextlib.ExitStack() as stack:
        if is_url(src):
            from manifest_ckpt.storage.remote import downloaded

            src = stack.enter_context(downloaded(str(src), storage_options))
        if is_url(dst):
            from manifest_ckpt.storage.remote import staged_destination

            dst = stack.enter_context(
                staged_destination(str(dst), overwrite=overwrite, storage_options=storage_options)
            )
        target = Path(dst)
        # Fail before reading a large source (save checks again just before writing).
        _check_destination(target, overwrite)
        hashes = Hashes()
        try:
            policy = _Policy(strict, tuple(allow_missing), tuple(allow_unexpected), untie, tie)
            if module is None and policy != _Policy():
                raise ConversionError(
                    f"{src}: strict, allow_missing, allow_unexpected, untie and tie compare the source with a "
                    "module; pass module= (CLI: --model) or leave them out",
                    file=str(src),
                )
            compile_patterns(policy.allow_missing, "allow_missing")
            compile_patterns(policy.allow_unexpected, "allow_unexpected")
            return _convert(
                Path(src), target, hashes, module, key, remap, transforms, lineage, parents, overwrite, progress, policy
            )
        finally:
            hashes.close()


def _convert(
    src: Path,
    target: Path,
    hashes: Hashes,
    module: nn.Module | None,
    key: str | None,
    remap: Remap | None,
    transforms: Transforms | None,
    lineage: Any,
    parents: Sequence[Any],
    overwrite: bool,
    progress: bool,
    policy: _Policy,
) -> Manifest:
    """``convert`` once the destination is known to be free; hashes finish while writing."""
    source = read_pending(src, key, hashes)
    names = apply_remap(source.tensors, remap)
    state = {names[k]: t for k, t in source.tensors.items()}
    check_keys(state, writer=f"convert {src}")
    _check_tensors(state, str(src))
    record = dict(source.record)
    record.update(remap=dict(remap) if remap else None, torch=torch.__version__.split("+")[0])
    modules = None
    name, rules = resolve_transforms(transforms)
    if module is not None:
        live = capture(module)
        if transforms is None:
            # An HF directory of per-expert keys against a fused-expert module: the rule set
            # that fits is chosen (a recognised layout that does not fit is refused).
            name = choose_rule_set(_specs(state), _specs(live.tensors), refuse_broken=True)
            rules = RULE_SETS[name] if name else ()
        if rules:
            # Compare the simulated view first; build the transformed tensors only once it matches.
            view = simulate(_specs(state), rules)
            record["transforms"] = _transforms_record(name, rules, view)
            meta = {k: _meta(n, state) for k, n in view.items()}
            _check_against(_complete_ties(meta, live.aliases, live.tensors)[0], live, str(src), remap, policy)
            state = _build(view, state)
        state, added, merged = _complete_ties(state, live.aliases, live.tensors)
        comparison = _check_against(state, live, str(src), remap, policy)
        state, left_out = _apply_policies(state, comparison, live)
        modules = _without(module_tree(module), comparison.allowed_missing)
        record.update(module=class_name(module), ties_added=added, ties_merged=merged, key_prefix=None)
        record["left_out"] = [*record.get("left_out", []), *left_out]
        if comparison.report.allowed:
            record["allowed"] = [a.to_dict() for a in comparison.report.allowed]
    else:
        if rules:
            view = simulate(_specs(state), rules)
            record["transforms"] = _transforms_record(name, rules, view)
            state = _build(view, state)
        # A manifest-ckpt source's module tree still describes the keys unless a remap renamed them.
        elif source.modules is not None and all(names[k] == k for k in names):
            modules = dict(source.modules)
        record.update(module=None, ties_added=[], ties_merged=[], key_prefix=_common_prefix(state))
    aliases = find_aliases(state)
    _check_footprint(state, aliases, str(src))
    total = sum(t.numel() * t.element_size() for k, t in state.items() if k not in aliases)
    with Progress(f"convert {record['file']}", total, enabled=progress) as bar:
        return save(
            state,
            target,
            lineage=lineage,
            metadata=source.metadata,
            parents=[*parents, (source.digest, "converted-from")] if source.digest else parents,
            overwrite=overwrite,
            # The current directory's git state says nothing about converted weights, and
            # leaving it out keeps two conversions of one file byte-identical.
            record_code=False,
            # Resolved after the weights are written: the source is hashed meanwhile.
            source=lambda: resolve(record),
            modules=modules,
            progress=bar.advance,
        )


def _specs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in state.items()}


def _meta(node: Node, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A source's own tensor (ties are compared too), a built key as a meta tensor of its shape."""
    if node.op == "source":
        assert node.key is not None
        return state[node.key]
    return torch.empty(node.shape, dtype=getattr(torch, node.dtype), device="meta")


def _build(view: Mapping[str, Node], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: _meta(n, state) if n.op == "source" else build(n, state.__getitem__).contiguous() for k, n in view.items()}


def _transforms_record(name: str | None, rules: Sequence[Rule], view: Mapping[str, Node]) -> dict[str, Any]:
    """What the lineage says about the transforms: the rule set, every rule, how many keys were built."""
    return {
        "rule_set": name,
        "rules": [r.to_dict() for r in rules],
        "built_keys": sum(1 for n in view.values() if n.op != "source"),
    }


def _check_tensors(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse tensors without values before anything is written."""
    empty = [k for k, t in state.items() if t.is_meta]
    if empty:
        raise ConversionError(
            f"{where}: {len(empty)} tensors are on the meta device and hold no values ({', '.join(empty[:5])}); "
            "save real weights and convert those.",
            file=where,
        )


def _check_footprint(state: Mapping[str, torch.Tensor], aliases: Mapping[str, str], where: str) -> None:
    """Bound what conversion writes by the bytes the source really stores.

    Every stored key is written in full, so a tensor whose view repeats elements of its
    storage (``torch.zeros(1).expand(n)``, ``as_strided`` with overlapping strides), or
    several views that together cover more bytes than their shared storage holds, would
    turn a small file into a large one. Views that fit (``w[:4]`` and ``w[4:]``, or tied
    keys, which become aliases) are fine. Refusing, rather than storing each storage once,
    keeps the format free of strides and offsets; a reader never sees a view.

    Raises:
        ConversionError: naming the keys, their sizes and the storage's, and how to re-save.
    """
    by_storage: dict[int, list[str]] = {}
    storage_bytes: dict[int, int] = {}
    for key, tensor in state.items():
        if key in aliases or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        by_storage.setdefault(address, []).append(key)
        storage_bytes[address] = storage.nbytes()
    for address, keys in by_storage.items():
        available = storage_bytes[address]
        sizes = {k: state[k].numel() * state[k].element_size() for k in keys}
        for key in keys:
            tensor = state[key]
            if sizes[key] > available:
                expanded = any(s == 0 and n > 1 for s, n in zip(tensor.stride(), tensor.shape))
                how = "an expanded view (stride 0)" if expanded else "a view whose strides repeat elements"
                raise ConversionError(
                    f"{where}: {key!r} is {how}: shape {list(tensor.shape)}, strides {list(tensor.stride())}, "
                    f"{sizes[key]} bytes when written out, from a storage of only {available} bytes. Converting "
                    "it would write more than the source holds, so it is refused. If the expanded values are "
                    "really wanted, materialise them (`t.clone()`) in a trusted environment and re-save; "
                    "otherwise save the unexpanded tensor.",
                    file=where,
                )
        if sum(sizes.values()) > available:
            listed = ", ".join(f"{k!r} ({sizes[k]} bytes)" for k in keys[:5]) + (" ..." if len(keys) > 5 else "")
            raise ConversionError(
                f"{where}: {len(keys)} tensors are overlapping views of one {available}-byte storage ({listed}); "
                f"written out they would take {sum(sizes.values())} bytes, more than the source holds, so they are "
                "refused. Save each view as its own tensor (`{k: v.clone() for k, v in state.items()}`) in a "
                "trusted environment and convert that file, or keep only the whole tensor.",
                file=where,
            )


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _complete_ties(
    state: dict[str, torch.Tensor], module_aliases: Mapping[str, str], module_keys: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Make the module's ties aliases in the converted state; order keys as the module does.

    A tied key the source omits gets its partner's tensor (Hugging Face files drop
    ``lm_head.weight``); a tied key stored twice with the same bits is stored once. A tie
    the source contradicts (different values) is left for the comparison to report.

    Returns:
        The state in the module's key order (keys the module lacks last), the keys added,
        and the keys whose duplicate copies were merged.
    """
    groups: dict[str, list[str]] = {}
    for k in module_keys:
        groups.setdefault(module_aliases.get(k, k), []).append(k)
    state = dict(state)
    added: list[str] = []
    merged: list[str] = []
    for members in groups.values():
        present = [m for m in members if m in state]
        if len(members) < 2 or not present:
            continue
        lead = state[present[0]]
        for m in members:
            if m not in state:
                state[m] = lead
                added.append(m)
            elif (
                state[m] is not lead and not find_aliases({"a": lead, "b": state[m]}) and _bitwise_equal(lead, state[m])
            ):
                state[m] = lead
                merged.append(m)
    ordered = {k: state[k] for k in module_keys if k in state}
    ordered.update((k, t) for k, t in state.items() if k not in ordered)
    return ordered, sorted(added), sorted(merged)


@dataclass(frozen=True)
class _Policy:
    """``load``'s key policies, as ``convert`` takes them."""

    strict: bool = True
    allow_missing: tuple[str, ...] = ()
    allow_unexpected: tuple[str, ...] = ()
    untie: bool = False
    tie: bool = False


def _check_against(
    state: Mapping[str, torch.Tensor], live: LiveState, where: str, remap: Remap | None, policy: _Policy
) -> Comparison:
    """Compare the converted state with the module (the same comparison ``load`` makes).

    Raises:
        ModelMismatchError: with every difference and, for a prefix, the remap that fixes it.
        PatternError: an allow pattern is not a valid regular expression.
    """
    comparison = compare(
        capture(state).spec(),
        live.spec(),
        strict=policy.strict,
        allow_missing=policy.allow_missing,
        allow_unexpected=policy.allow_unexpected,
        untie=policy.untie,
        tie=policy.tie,
    )
    report = comparison.report
    if report.ok:
        return comparison
    if report.suggested_remap:
        combined = {**(remap or {}), **report.suggested_remap}
        flags = " ".join(f"--remap {shlex.quote(f'{p}={r}')}" for p, r in combined.items())
        hints = [h for h in report.hints if not h.startswith("load with remap=")]
        hints.append(f"convert with remap={combined!r} (CLI: {flags})")
        report = replace(report, hints=hints, suggested_remap=combined)
    raise ModelMismatchError(report, path=where)


def _apply_policies(
    state: dict[str, torch.Tensor], comparison: Comparison, live: LiveState
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The state the checkpoint stores after what the policies allowed, and what was left out.

    Allowed unexpected keys are dropped (one ``left_out`` entry per policy that allowed them); an untied key gets its
    own copy, so the checkpoint has the module's (separate) layout; a discarded key (``tie``)
    becomes its module tie's first key, stored once.
    """
    state = dict(state)
    by = {a.key: a.by for a in comparison.report.allowed if a.kind == "unexpected"}
    groups: dict[str, list[str]] = {}
    for key in sorted(comparison.skipped):
        groups.setdefault(by.get(key, "policy"), []).append(key)
    left_out = []
    for allowed_by, keys in groups.items():
        size = sum(state[k].numel() * state[k].element_size() for k in keys)
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        what = f"source keys not in the module, allowed by {allowed_by}: {shown}"
        left_out.append({"path": keys[0] if len(keys) == 1 else allowed_by, "what": what, "tensors": len(keys), "bytes": size})
        for k in keys:
            del state[k]
    for key in comparison.untied:
        state[key] = state[key].clone()
    if comparison.discarded:
        first: dict[str, str] = {}
        for key in live.tensors:
            if key in state:
                first.setdefault(live.aliases.get(key, key), key)
        for key in comparison.discarded:
            state[key] = state[first[live.aliases.get(key, key)]]
    return state, left_out


def _without(tree: dict[str, ModuleEntry], keys: Iterable[str]) -> dict[str, ModuleEntry]:
    """The module tree less the keys the checkpoint does not store (allowed missing)."""
    tree = dict(tree)
    for key in keys:
        owner, _, name = key.rpartition(".")
        entry = tree[owner]
        tree[owner] = replace(
            entry,
            parameters=tuple(n for n in entry.parameters if n != name),
            buffers=tuple(n for n in entry.buffers if n != name),
        )
    return tree


def _common_prefix(state: Mapping[str, torch.Tensor]) -> str | None:
    """``module.``/``model.``/``_orig_mod.`` when every key carries it (worth a remap)."""
    for prefix in KNOWN_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return prefix
    return None
