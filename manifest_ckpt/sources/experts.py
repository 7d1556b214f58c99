"""Mixture-of-experts layouts: per-expert weights on disk, fused 3-D tensors in the live model.

``save_pretrained`` of transformers 5 writes each expert's projections as their own keys
(Mixtral: ``block_sparse_moe.experts.N.w1/w2/w3.weight``; Qwen2-MoE, Qwen3-MoE and the
models mapped onto them: ``mlp.experts.N.gate_proj/up_proj/down_proj.weight``), while the
modules hold ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``mlp.experts.down_proj``
``[E, H, I]``. The rules here follow transformers' ``conversion_mapping``:
``MergeModulelist(dim=0)`` (stack the experts along a new first dimension) then
``Concatenate(dim=1)`` (gate before up). Shapes are simulated first, so the converted view is
compared with the module before any expert tensor is copied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import torch

from manifest_ckpt.errors import ConversionError

__all__ = ["RULE_SETS", "ExpertFusion", "RuleSet", "choose_rule_set", "fuse", "materialize"]


@dataclass(frozen=True)
class ExpertFusion:
    """Stack each source's per-expert tensors (dim 0), then concatenate the stacks (dim 1).

    Attributes:
        sources: regexes over checkpoint keys with groups ``prefix`` and ``expert``.
        target: the fused key, ``{prefix}`` replaced by the matched prefix.
    """

    sources: tuple[str, ...]
    target: str

    def describe(self) -> dict[str, Any]:
        ops = ["stack(dim=0)"] + (["concat(dim=1)"] if len(self.sources) > 1 else [])
        return {"sources": list(self.sources), "target": self.target, "operations": ops}


@dataclass(frozen=True)
class RuleSet:
    """A model family's layout rules: renames of the other keys, then expert fusions."""

    name: str
    renames: tuple[tuple[str, str], ...]
    fusions: tuple[ExpertFusion, ...]


_P: Final = r"(?P<prefix>.+)"
_E: Final = r"(?P<expert>\d+)"

RULE_SETS: Final = (
    RuleSet(
        "mixtral",
        renames=((r"\.block_sparse_moe\.", ".mlp."),),
        fusions=(
            ExpertFusion(
                (
                    rf"{_P}\.block_sparse_moe\.experts\.{_E}\.w1\.weight",
                    rf"{_P}\.block_sparse_moe\.experts\.{_E}\.w3\.weight",
                ),
                "{prefix}.mlp.experts.gate_up_proj",
            ),
            ExpertFusion((rf"{_P}\.block_sparse_moe\.experts\.{_E}\.w2\.weight",), "{prefix}.mlp.experts.down_proj"),
        ),
    ),
    RuleSet(
        "qwen2_moe",  # also Qwen3-MoE, OLMoE, DeepSeek-V2/V3 and the others transformers maps onto it
        renames=(),
        fusions=(
            ExpertFusion(
                (rf"{_P}\.mlp\.experts\.{_E}\.gate_proj\.weight", rf"{_P}\.mlp\.experts\.{_E}\.up_proj\.weight"),
                "{prefix}.mlp.experts.gate_up_proj",
            ),
            ExpertFusion((rf"{_P}\.mlp\.experts\.{_E}\.down_proj\.weight",), "{prefix}.mlp.experts.down_proj"),
        ),
    ),
)


def choose_rule_set(keys: Mapping[str, Any], module_keys: Mapping[str, Any]) -> RuleSet | None:
    """The rule set whose fusions match source keys and whose targets the module holds (and the source lacks)."""
    for rules in RULE_SETS:
        for fusion in rules.fusions:
            pattern = re.compile(fusion.sources[0])
            for key in keys:
                m = pattern.fullmatch(key)
                if m is not None:
                    target = fusion.target.format(prefix=m["prefix"])
                    if target in module_keys and target not in keys:
                        return rules
    return None


def fuse(
    state: Mapping[str, torch.Tensor], rules: RuleSet, where: str
) -> tuple[dict[str, torch.Tensor], dict[str, list[list[str]]], dict[str, Any]]:
    """Simulate ``rules`` on ``state``: nothing is copied yet.

    Returns:
        ``(view, sources, record)``: ``view`` is the renamed state with every fused key as a
        meta tensor of the result's shape and dtype (for the comparison); ``sources`` maps
        each fused key to its source keys per input, experts in order (for
        :func:`materialize`); ``record`` describes the rules for the lineage.

    Raises:
        ConversionError: an expert missing in one source, or experts of unequal shape/dtype,
            naming the fused key.
    """
    plans: dict[str, list[dict[int, str]]] = {}
    used: set[str] = set()
    for fusion in rules.fusions:
        patterns = [re.compile(s) for s in fusion.sources]
        for key in state:
            for i, pattern in enumerate(patterns):
                m = pattern.fullmatch(key)
                if m is None:
                    continue
                target = fusion.target.format(prefix=m["prefix"])
                groups = plans.setdefault(target, [{} for _ in patterns])
                groups[i][int(m["expert"])] = key
                used.add(key)
    view: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in used:
            continue
        new = key
        for old, replacement in rules.renames:
            new = re.sub(old, replacement, new)
        view[new] = tensor
    fused_sources: dict[str, list[list[str]]] = {}
    for target, groups in plans.items():
        experts = sorted(groups[0])
        problems = [
            f"source {i} has experts {sorted(g)}, expected {list(range(len(experts)))}"
            for i, g in enumerate(groups)
            if sorted(g) != list(range(len(experts)))
        ]
        members = [[g[e] for e in sorted(g)] for g in groups]
        first = state[members[0][0]]
        shapes = {(state[k].dtype, tuple(state[k].shape)) for ks in members for k in ks}
        if not problems and (len(shapes) != 1 or first.dim() != 2):
            problems.append(f"experts differ or are not 2-D: {sorted(str(s) for s in shapes)[:4]}")
        if problems:
            raise ConversionError(
                f"{where}: cannot fuse the experts of {target!r} ({rules.name} layout): {'; '.join(problems)}. "
                "The checkpoint is incomplete or not of this layout; convert with remap= instead.",
                file=where,
            )
        rows, cols = first.shape
        shape = (len(experts), rows * len(groups), cols)
        view[target] = torch.empty(shape, dtype=first.dtype, device="meta")
        fused_sources[target] = members
    record = {
        "rule_set": rules.name,
        "renames": [list(r) for r in rules.renames],
        "fusions": [f.describe() for f in rules.fusions],
        "fused_keys": len(fused_sources),
    }
    return view, fused_sources, record


def materialize(
    view: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], sources: Mapping[str, list[list[str]]]
) -> dict[str, torch.Tensor]:
    """``view`` with each fused key built: experts stacked along dim 0, the stacks concatenated along dim 1."""
    out = dict(view)
    for target, members in sources.items():
        stacks = [torch.stack([state[k] for k in keys], dim=0) for keys in members]
        out[target] = stacks[0] if len(stacks) == 1 else torch.cat(stacks, dim=1)
    return out


# The experts modules whose fused tensors save_pretrained writes back per expert, and how.
_EXPERT_CLASSES: Final = {
    "MixtralExperts": "mixtral",
    "Qwen2MoeExperts": "qwen2_moe",
    "Qwen3MoeExperts": "qwen2_moe",
    "DeepseekV2Experts": "qwen2_moe",
    "DeepseekV3Experts": "qwen2_moe",
}
_PER_EXPERT: Final = {
    "mixtral": ("{prefix}.block_sparse_moe.experts.{e}.", ("w1", "w3"), "w2"),
    "qwen2_moe": ("{prefix}.mlp.experts.{e}.", ("gate_proj", "up_proj"), "down_proj"),
}

# A key of the exported layout -> (stored key, expert, part of 2 or None for the whole expert).
Unfused = dict[str, tuple[str, int | None, int | None]]


def unfuse_plan(
    shapes: Mapping[str, tuple[int, ...]], module_classes: Mapping[str, str | None]
) -> tuple[Unfused, list[str]]:
    """The inverse of :func:`fuse` for ``save_pretrained``'s layout, from the recorded module classes.

    Returns:
        The exported keys (each fused tensor split back into per-expert keys, Mixtral's
        other ``mlp.`` keys renamed back to ``block_sparse_moe.``), and the rule sets used.
    """
    layers: dict[str, str] = {}
    for path, cls in module_classes.items():
        family = _EXPERT_CLASSES.get((cls or "").rsplit(".", 1)[-1])
        if family is not None and path.endswith(".mlp.experts"):
            layers[path.removesuffix(".mlp.experts")] = family
    plan: Unfused = {}
    for key, shape in shapes.items():
        prefix = next((p for p in layers if key.startswith(p + ".mlp.")), None)
        if prefix is None:
            plan[key] = (key, None, None)
            continue
        family = layers[prefix]
        template, (gate, up), down = _PER_EXPERT[family]
        rest = key.removeprefix(prefix + ".mlp.")
        if rest in ("experts.gate_up_proj", "experts.down_proj") and len(shape) == 3:
            for e in range(shape[0]):
                base = template.format(prefix=prefix, e=e)
                if rest == "experts.down_proj":
                    plan[f"{base}{down}.weight"] = (key, e, None)
                else:
                    plan[f"{base}{gate}.weight"] = (key, e, 0)
                    plan[f"{base}{up}.weight"] = (key, e, 1)
        elif family == "mixtral":
            plan[f"{prefix}.block_sparse_moe.{rest}"] = (key, None, None)
        else:
            plan[key] = (key, None, None)
    return plan, sorted(set(layers.values()))


def unfused_tensor(fused: torch.Tensor, expert: int | None, part: int | None) -> torch.Tensor:
    """One exported tensor from its stored one: an expert, and the gate or up half of it."""
    if expert is None:
        return fused
    one = fused[expert]
    if part is not None:
        one = one.chunk(2, dim=0)[part]
    return one


def unfused_shape(shape: tuple[int, ...], expert: int | None, part: int | None) -> tuple[int, ...]:
    if expert is None:
        return shape
    rows, cols = shape[1], shape[2]
    return (rows // 2 if part is not None else rows, cols)
