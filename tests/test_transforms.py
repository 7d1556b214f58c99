"""Tests of ``manifest_ckpt.comparison.transforms`` and ``manifest_ckpt.assemble``: declarative key transforms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.assemble import build, fill
from manifest_ckpt.comparison.transforms import (
    RULE_SETS,
    Concatenate,
    Rename,
    Split,
    Stack,
    Transpose,
    Unstack,
    inverse,
    parse_transforms_arg,
    rule_from_dict,
    simulate,
)
from manifest_ckpt.errors import ModelMismatchError, TransformError
from tests._models import assert_bitwise_equal, snapshot


def specs(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in state.items()}


def run(state: dict[str, torch.Tensor], rules: Any) -> dict[str, torch.Tensor]:
    view = simulate(specs(state), rules)
    out = {k: build(n, state.__getitem__) for k, n in view.items()}
    for k, n in view.items():
        assert (str(out[k].dtype).removeprefix("torch."), tuple(out[k].shape)) == (n.dtype, n.shape), k
    return out


def experts(n: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {f"l.experts.{i}.{p}.weight": torch.randn(4, 5) for i in range(n) for p in ("gate", "up")}
    state["l.norm.weight"] = torch.randn(5)
    return state


RULES = (
    Stack("{p}.experts.{index}.gate.weight", "{p}.experts.gate"),
    Stack("{p}.experts.{index}.up.weight", "{p}.experts.up"),
    Concatenate(("{p}.experts.gate", "{p}.experts.up"), "{p}.experts.gate_up", 1),
)


def test_stack_then_concatenate_is_torch_stack_then_cat() -> None:
    """The simulated shapes hold and the values are torch.stack then torch.cat, bit for bit."""
    state = experts()
    out = run(state, RULES[:3])
    gate = torch.stack([state[f"l.experts.{i}.gate.weight"] for i in range(3)])
    up = torch.stack([state[f"l.experts.{i}.up.weight"] for i in range(3)])
    assert set(out) == {"l.experts.gate_up", "l.norm.weight"}
    assert torch.equal(out["l.experts.gate_up"], torch.cat([gate, up], dim=1))
    assert out["l.norm.weight"] is state["l.norm.weight"]


def test_every_rule_inverts_exactly() -> None:
    """The inverse rules give back every key with the same bits (split, unstack, transpose back)."""
    state = experts()
    state["l.proj.weight"] = torch.randn(3, 7)
    rules = (*RULES[:3], Transpose("{p}.proj.weight", "{p}.proj.t", (0, 1)))
    forward = run(state, rules)
    assert forward["l.proj.t"].shape == (7, 3)
    back = run(forward, inverse(rules))
    assert_bitwise_equal(back, state)


def test_split_with_sizes_and_stack_along_a_later_dim() -> None:
    """Split honours sizes; Stack(dim=1) puts the new dimension second; Unstack(dim=1) undoes it."""
    torch.manual_seed(1)
    qkv = torch.randn(10, 3)
    out = run({"a.qkv": qkv}, [Split("{m}.qkv", ("{m}.q", "{m}.k", "{m}.v"), 0, (6, 2, 2))])
    assert torch.equal(out["a.q"], qkv[:6]) and torch.equal(out["a.v"], qkv[8:])
    parts = {f"w.{i}": torch.randn(2, 3) for i in range(4)}
    stacked = run(parts, [Stack("w.{index}", "w", 1)])["w"]
    assert stacked.shape == (2, 4, 3) and torch.equal(stacked, torch.stack(list(parts.values()), dim=1))
    assert_bitwise_equal(run({"w": stacked}, [Unstack("w", "w.{index}", 1)]), parts)


def test_fill_writes_each_part_into_its_region() -> None:
    """fill builds the same bits as build without a stacked copy: sources go straight into regions."""
    state = experts()
    view = simulate(specs(state), RULES[:3])
    node = view["l.experts.gate_up"]
    out = torch.full(node.shape, float("nan"))
    written: list[str] = []

    def leaf_into(region: torch.Tensor, key: str) -> None:
        written.append(key)
        region.copy_(state[key])

    fill(out, node, leaf_into, state.__getitem__)
    assert torch.equal(out, build(node, state.__getitem__)) and len(written) == 6


@pytest.mark.parametrize(
    ("state", "rules", "message", "key"),
    [
        (experts(), [Stack("{p}.blocks.{index}.w", "{p}.w")], r"matches no key", None),
        ({k: v for k, v in experts().items() if k != "l.experts.1.up.weight"}, RULES[:2],
         r"'l\.experts\.up' would stack indices \[0, 2\], expected 0\.\.2: 'l\.experts\.1\.up\.weight' is missing",
         "l.experts.up"),
        ({**experts(), "l.experts.2.up.weight": torch.zeros(4, 6)}, RULES[:2], r"differ in dtype or shape.*\[4, 6\]",
         "l.experts.up"),
        (experts(), [RULES[0], Concatenate(("{p}.experts.gate", "{p}.experts.up"), "{p}.gu", 1)],
         r"'l\.gu' lacks its part '\{p\}\.experts\.up'", "l.gu"),
        ({"a.w": torch.zeros(5, 2)}, [Split("{m}.w", ("{m}.x", "{m}.y"))], r"5 along dim 0.*2 equal parts", "a.w"),
        ({"a.w": torch.zeros(5)}, [Transpose("{m}.w", None, (0, 1))], r"1 dimensions, dim 1 is out of range", "a.w"),
        ({"a.w": torch.zeros(2, 2), "a.v": torch.zeros(2, 2)}, [Rename("{m}.w", "{m}.v")], r"already holds", "a.v"),
    ],
    ids=["no-match", "missing-index", "ragged", "missing-part", "indivisible", "bad-dim", "collision"],
)
def test_misfits_are_typed_errors_naming_the_key(state: Any, rules: Any, message: str, key: str | None) -> None:
    """Each way keys can fail to fit a rule raises TransformError naming the key (and the rule)."""
    with pytest.raises(TransformError, match=message) as info:
        simulate(specs(state), rules)
    assert info.value.key == key and info.value.rule is not None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Stack("{p}.w", "{p}.v"), r"needs an \{index\} placeholder"),
        (lambda: Unstack("{p}.w", "{p}.v"), r"target template .* needs an \{index\}"),
        (lambda: Rename("{p}.w", "{q}.w"), r"uses \['q'\], which the source template"),
        (lambda: Concatenate(("{p}.a",), "{p}.b"), r"two or more sources"),
        (lambda: Rename("{p.w", "x"), r"brace that is not a \{name\} placeholder"),
    ],
)
def test_malformed_rules_are_refused_when_built(make: Any, message: str) -> None:
    """A rule whose templates cannot work is refused at construction, before any checkpoint is read."""
    with pytest.raises(TransformError, match=message):
        make()


def test_rules_round_trip_through_dicts_and_a_json_file(tmp_path: Path) -> None:
    """to_dict/rule_from_dict are inverse; --transforms reads a JSON list; bad ops are refused."""
    rules = [r for rs in RULE_SETS.values() for r in rs] + [Split("a", ("b", "c"), 1, (2, 3)), Transpose("x", "y")]
    assert [rule_from_dict(r.to_dict()) for r in rules] == rules
    path = tmp_path / "rules.json"
    path.write_text(json.dumps([r.to_dict() for r in rules]))
    assert parse_transforms_arg(str(path)) == rules
    assert parse_transforms_arg("mixtral") == "mixtral"
    with pytest.raises(TransformError, match="'op' is one of"):
        rule_from_dict({"op": "permute"})
    path.write_text("{}")
    with pytest.raises(TransformError, match="expected a JSON list of rules, found dict"):
        parse_transforms_arg(str(path))


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12, bias=False)
        self.out = nn.Linear(4, 4, bias=False)


class Separate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(4, 4, bias=False) for _ in range(3))
        self.out = nn.Linear(4, 4, bias=False)


QKV = [
    Concatenate(("q.weight", "k.weight", "v.weight"), "qkv.weight", 0),
    Transpose("out.weight", None, (0, 1)),
]


def test_load_and_check_apply_user_rules_bit_exact(tmp_path: Path) -> None:
    """A checkpoint of separate q/k/v loads into a fused module: values are cat and transpose, bit for bit."""
    torch.manual_seed(0)
    src = Separate()
    mc.save(src, tmp_path / "ck", record_code=False)
    target = Fused()
    report = mc.check(target, tmp_path / "ck")
    assert not report.ok and report.suggested_transforms is None
    assert mc.check(target, tmp_path / "ck", transforms=QKV).ok
    before = snapshot(target)
    with pytest.raises(TransformError, match="matches no key"):
        mc.load(target, tmp_path / "ck", transforms=[Transpose("nothing.here")])
    assert_bitwise_equal(snapshot(target), before)
    result = mc.load(target, tmp_path / "ck", transforms=QKV, verify_digests=True)
    assert result.loaded == ["out.weight", "qkv.weight"]
    expected = torch.cat([src.q.weight, src.k.weight, src.v.weight])
    assert torch.equal(target.qkv.weight, expected) and torch.equal(target.out.weight, src.out.weight.T)


def test_a_shape_the_module_does_not_have_is_reported_before_any_copy(tmp_path: Path) -> None:
    """Transforms give a view; a view that does not fit the module is a mismatch report, the module untouched."""
    torch.manual_seed(0)
    mc.save(Separate(), tmp_path / "ck", record_code=False)
    target = Fused()
    before = snapshot(target)
    with pytest.raises(ModelMismatchError) as info:
        mc.load(target, tmp_path / "ck", transforms=[Concatenate(("q.weight", "k.weight", "v.weight"), "qkv.weight", 1)])
    problems = {(p.kind, p.key) for p in info.value.report.problems}
    assert ("shape", "qkv.weight") in problems
    assert_bitwise_equal(snapshot(target), before)


def test_convert_and_export_run_user_rules_and_their_inverse(tmp_path: Path) -> None:
    """convert(transforms=...) builds the fused keys and records the rules; inverse rules restore the source."""
    torch.manual_seed(0)
    src = Separate()
    mc.save(src, tmp_path / "ck", record_code=False)
    manifest = mc.convert(tmp_path / "ck", tmp_path / "fused", module=Fused(), transforms=QKV)
    record = manifest.lineage["source"]["transforms"]
    assert record == {"rule_set": None, "rules": [r.to_dict() for r in QKV], "built_keys": 2}
    fused = Fused()
    mc.load(fused, tmp_path / "fused")
    back = Separate()
    mc.load(back, tmp_path / "fused", transforms=inverse(QKV))
    assert_bitwise_equal(snapshot(back), snapshot(src))


def test_tied_keys_can_be_renamed_but_not_stacked(tmp_path: Path) -> None:
    """A tie survives a rename; a transform that would build from a tied key is refused naming it."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2, bias=False)
            self.b = nn.Linear(2, 2, bias=False)
            self.b.weight = self.a.weight

    mc.save(Tied(), tmp_path / "ck", record_code=False)
    with pytest.raises(TransformError, match=r"is tied \('b\.weight' shares 'a\.weight'") as info:
        mc.check(Tied(), tmp_path / "ck", transforms=[Transpose("{m}.weight")])
    assert info.value.key in ("a.weight", "b.weight")
    report = mc.check(Tied(), tmp_path / "ck", transforms=[Rename("{m}.weight", "{m}.weight")])
    assert report.ok


def test_cast_with_transforms_converts_each_part_as_torch_does(tmp_path: Path) -> None:
    """bfloat16 parts into a float32 fused tensor with cast=True: the values equal torch.cat(...).float()."""
    torch.manual_seed(0)
    src = Separate().to(torch.bfloat16)
    mc.save(src, tmp_path / "ck", record_code=False)
    target = Fused()
    with pytest.raises(ModelMismatchError) as info:
        mc.load(target, tmp_path / "ck", transforms=QKV)
    assert {p.kind for p in info.value.report.problems} == {"dtype"}
    result = mc.load(target, tmp_path / "ck", transforms=QKV, cast=True)
    assert result.cast == ["out.weight", "qkv.weight"]
    expected = torch.cat([src.q.weight, src.k.weight, src.v.weight]).float()
    assert torch.equal(target.qkv.weight, expected) and torch.equal(target.out.weight, src.out.weight.T.float())
