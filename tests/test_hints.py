"""Hints for every problem kind (issue 10, item 8): each names the option that allows it, and says true things.

The cast table's "exact"/"lossy" claims are checked against torch's own casts value by value;
the allow patterns suggested are fed back and must allow exactly the reported keys.
"""

from __future__ import annotations

import itertools
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.comparison.compare import StateSpec, TensorSpec, compare, owner_of
from manifest_ckpt.comparison.hints import allow_patterns, cast_effect, uncastable
from manifest_ckpt.comparison.report import Allowance

DTYPES = [
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "bfloat16",
    "float32", "float64", "complex64", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    "float8_e8m0fnu",
]  # fmt: skip


def values_of(name: str) -> torch.Tensor:
    """Every bit pattern of a 1- or 2-byte dtype; for wider ones, random bits plus the edge cases."""
    dtype = getattr(torch, name)
    size = torch.empty(0, dtype=dtype).element_size()
    if dtype == torch.bool:
        return torch.tensor([False, True])
    if size == 1:
        return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    if size == 2:
        return torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(dtype)
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 256, (4096 * size,), dtype=torch.uint8, generator=gen).view(dtype)
    if dtype.is_floating_point or dtype.is_complex:
        edges = [0, 1, -1, 0.5, 2**24 + 1, 2**53 + 1, 1e-40, 1e-310, float("inf"), -0.0]
    else:
        info = torch.iinfo(dtype)
        edges = [0, 1, 2, info.max, info.min, 2**24 + 1, min(2**53 + 1, info.max)]
    return torch.cat([bits, torch.tensor(edges, dtype=dtype)])


def survives(x: torch.Tensor, target: str) -> torch.Tensor:
    """Per value: does ``x`` keep its value as ``target``: it comes back bit for bit (a NaN that stays NaN counts)."""
    y = x.to(getattr(torch, target))
    if not (x.is_floating_point() or y.is_floating_point() or y.is_complex()):
        # Between integers a wrap-around comes back with the same bits: compare the values.
        return torch.tensor([a == b for a, b in zip(x.tolist(), y.tolist())])
    back = (y.real.contiguous() if y.is_complex() else y).to(x.dtype)
    if x.dtype == torch.bool:
        return back == x
    same = (back.view(torch.uint8).reshape(len(x), -1) == x.view(torch.uint8).reshape(len(x), -1)).all(1)
    if x.is_floating_point():
        same |= x.float().isnan() & back.float().isnan()
    return same


@pytest.mark.parametrize(("source", "target"), [p for p in itertools.permutations(DTYPES, 2)])
def test_cast_effect_claims_hold_for_torch_casts(source: str, target: str) -> None:
    """"exact" means every value survives the round trip; "lossy" means some value does not."""
    effect = cast_effect(source, target)
    if uncastable(source, target) is not None:
        assert effect.startswith("not castable")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex -> real and float -> int conversions warn or are undefined
        kept = survives(values_of(source), target)
    if effect.startswith("exact"):
        assert bool(kept.all()), f"{source} -> {target} claimed exact, loses {int((~kept).sum())} values"
    else:
        assert effect.startswith("lossy: ")
        assert not bool(kept.all()), f"{source} -> {target} claimed {effect!r}, but every value survives"


def spec(tensors: dict[str, tuple[str, tuple[int, ...]]], classes: dict[str, str | None] | None = None) -> StateSpec:
    return StateSpec({k: TensorSpec(d, s, owner_of(k)) for k, (d, s) in tensors.items()}, {}, classes)


def test_dtype_hint_names_cast_and_what_it_does() -> None:
    """A castable difference gets the cast=True hint with its effect; an uncastable one says why not."""
    checkpoint = spec({"a.weight": ("bfloat16", (2,)), "b.weight": ("float32", (2,)), "c.weight": ("complex64", (2,))})
    module = spec({"a.weight": ("float32", (2,)), "b.weight": ("float16", (2,)), "c.weight": ("float32", (2,))})
    report = compare(checkpoint, module).report
    assert report.hints == [
        "pass cast=True (CLI: --cast) to convert 2 tensors to the module's dtypes: bfloat16 -> float32 exact "
        "(a.weight); float32 -> float16 lossy: rounds to 10 mantissa bits (from 23); values beyond 65504 overflow; "
        "values below 2**-24 are rounded away (b.weight)",
        "c.weight: complex64 cannot be loaded as float32 even with cast=True (a complex value cast to a real dtype "
        "would lose its imaginary part); change the module's dtype or convert the checkpoint",
    ]
    allowed = compare(checkpoint, module, cast=True).report
    assert [p.key for p in allowed.problems] == ["c.weight"]
    assert [(a.kind, a.key, a.by) for a in allowed.allowed] == [
        ("dtype", "a.weight", "cast=True"),
        ("dtype", "b.weight", "cast=True"),
    ]


def test_class_hint_and_check_classes_false_lists_the_swap() -> None:
    """A class difference hints check_classes=False; with it, the swap is listed, not hidden."""
    linear, conv1d = "torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D"
    checkpoint = spec({"fc.weight": ("float32", (2, 2))}, {"": "N", "fc": conv1d})
    module = spec({"fc.weight": ("float32", (2, 2))}, {"": "N", "fc": linear})
    report = compare(checkpoint, module).report
    assert report.hints == [
        "layer classes differ at fc: if the swap is deliberate (same parameters, another implementation), pass "
        "check_classes=False (CLI: --no-check-classes); names, shapes and dtypes are still checked"
    ]
    allowed = compare(checkpoint, module, check_classes=False).report
    assert allowed.ok
    assert allowed.allowed == [
        Allowance("class", "fc", "check_classes=False", f"checkpoint from {conv1d}, loaded into {linear}")
    ]


def hinted(report_hints: list[str], option: str) -> list[str]:
    """The patterns of the ``option=[...]`` hint, as the CLI spelling gives them."""
    hint = next(h for h in report_hints if f"{option}=[" in h)
    flag = "--" + option.replace("_", "-")
    return re.findall(rf"{flag} '([^']*)'", hint)


def test_allow_hint_collapses_layers_and_allows_exactly_the_reported_keys() -> None:
    """Old GPT-2 files hold attn.masked_bias per layer: one pattern, which allows those keys only."""
    layers = {f"h.{i}.attn.bias": ("float32", (4,)) for i in range(12)}
    extra = {f"h.{i}.attn.masked_bias": ("float32", ()) for i in range(12)}
    report = compare(spec({**layers, **extra}), spec(layers)).report
    patterns = hinted(report.hints, "allow_unexpected")
    assert patterns == [r"h\.\d+\.attn\.masked_bias"]
    after = compare(spec({**layers, **extra}), spec(layers), allow_unexpected=patterns).report
    assert after.ok
    assert [(a.kind, a.key) for a in after.allowed] == sorted(("unexpected", k) for k in extra)


def test_allow_hint_never_covers_a_key_that_is_not_reported() -> None:
    """Collapsing h.0/h.1 to h.\\d+ would also match the present h.2: the keys are escaped instead."""
    module = {f"h.{i}.w": ("float32", (2,)) for i in range(3)}
    report = compare(spec({"h.2.w": module["h.2.w"]}), spec(module)).report
    assert hinted(report.hints, "allow_missing") == [r"h\.0\.w", r"h\.1\.w"]
    assert allow_patterns(["h.0.w", "h.1.w"], module) == [r"h\.0\.w", r"h\.1\.w"]
    assert allow_patterns(["h.0.w", "h.1.w"], ["h.0.w", "h.1.w"]) == [r"h\.\d+\.w"]


def test_allow_hint_groups_a_subtree() -> None:
    """A Lightning file with teacher.* beside the student: one subtree pattern."""
    student = {f"{m}.{p}": ("float32", (2,)) for m in ("enc", "dec", "head") for p in ("weight", "bias")}
    teacher = {f"teacher.{k}": v for k, v in student.items()}
    report = compare(spec({**student, **teacher}), spec(student)).report
    patterns = hinted(report.hints, "allow_unexpected")
    assert patterns == [r"teacher\..*"]
    assert compare(spec({**student, **teacher}), spec(student), allow_unexpected=patterns).report.ok


def test_module_version_difference_is_reported_with_its_migration(tmp_path: Path) -> None:
    """A BatchNorm saved at _version 1 without num_batches_tracked: check says which migration runs."""
    old = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    old[1]._version = 1  # as torch before 0.4.1 saved it
    old[1].num_batches_tracked = None
    mc.save(old, tmp_path / "ck")
    report = mc.check(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), tmp_path / "ck")
    version = [a for a in report.allowed if a.kind == "version"]
    assert version == [
        Allowance(
            "version",
            "1",
            "module version",
            "saved at _version 1, the module is at _version 2: torch's norm-layer migration (versions before 2, "
            "running stats tracked) sets num_batches_tracked to 0 when the checkpoint lacks it; every other tensor "
            "is loaded as stored",
        )
    ]
    assert "version" in {a["kind"] for a in report.to_dict()["allowed"]}
