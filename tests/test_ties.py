"""Ties at load time (issue 10, item 6): omitted tied keys, equal copies, and the untie/tie opt-ins.

Where torch's ``load_state_dict`` succeeds, ``load`` must leave the module in the same state
bit for bit; where torch silently picks one of two different values, ``load`` refuses unless
the opt-in says which one wins.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.comparison.report import Allowance, Problem
from manifest_ckpt.errors import ModelMismatchError
from tests._models import assert_bitwise_equal, snapshot


class LM(nn.Module):
    """GPT-2's layout: an embedding, a block, and a head tied (or not) to the embedding."""

    def __init__(self, tied: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.wte = nn.Embedding(8, 4)
        self.fc = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 8, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight


def state_of(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in LM(tied=False, seed=seed).state_dict().items()}


def torch_loaded(module: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> nn.Module:
    module.load_state_dict(state, strict=strict)
    return module


def test_checkpoint_omitting_a_tied_key_loads_through_the_partner(tmp_path: Path) -> None:
    """An HF-style file without lm_head.weight loads into the tied model; the key is tie-filled."""
    state = state_of(1)
    del state["lm_head.weight"]
    mc.save(state, tmp_path / "ck")
    module = LM(tied=True)
    result = mc.load(module, tmp_path / "ck")
    assert result.tie_filled == {"lm_head.weight": "wte.weight"}
    assert result.left_initial == []
    assert result.loaded == ["fc.bias", "fc.weight", "lm_head.weight", "wte.weight"]
    assert Allowance(
        "missing", "lm_head.weight", "tie partner", "tied to wte.weight in the module; loaded from it"
    ) in result.allowed
    assert module.lm_head.weight is module.wte.weight
    # torch reports the omitted key as missing under strict=True; with strict=False it leaves
    # the same state (the tie is one tensor), which is what load must match bit for bit.
    expected = torch_loaded(LM(tied=True), state, strict=False)
    assert_bitwise_equal(snapshot(module), snapshot(expected))
    assert torch.equal(module.lm_head.weight, state["wte.weight"])


def test_checkpoint_omitting_the_embedding_loads_it_from_the_head(tmp_path: Path) -> None:
    """The tie works both ways: a file holding only lm_head.weight fills wte.weight."""
    state = state_of(2)
    del state["wte.weight"]
    mc.save(state, tmp_path / "ck")
    module = LM(tied=True)
    result = mc.load(module, tmp_path / "ck")
    assert result.tie_filled == {"wte.weight": "lm_head.weight"}
    assert result.left_initial == []
    assert torch.equal(module.wte.weight, state["lm_head.weight"])
    assert_bitwise_equal(snapshot(module), snapshot(torch_loaded(LM(tied=True), state, strict=False)))


def test_omitted_key_without_a_tie_is_still_missing(tmp_path: Path) -> None:
    """Only a live tie satisfies a missing key: the untied model refuses, naming it, unchanged."""
    state = state_of(1)
    del state["lm_head.weight"]
    mc.save(state, tmp_path / "ck")
    module = LM(tied=False)
    before = snapshot(module)
    with pytest.raises(ModelMismatchError) as info:
        mc.load(module, tmp_path / "ck")
    assert info.value.report.problems == [Problem("missing", "lm_head.weight", "float32[8, 4]", None)]
    assert_bitwise_equal(snapshot(module), before)


def test_equal_untied_copies_load_into_a_tied_module(tmp_path: Path) -> None:
    """Two stored copies with equal digests satisfy the module's tie without an opt-in."""
    state = state_of(3)
    state["lm_head.weight"] = state["wte.weight"].clone()  # equal bits, separate storage
    manifest = mc.save(state, tmp_path / "ck")
    assert manifest.aliases == {}
    module = LM(tied=True)
    result = mc.load(module, tmp_path / "ck")
    assert result.allowed == [
        Allowance(
            "alias",
            "lm_head.weight",
            "equal digests",
            "stored apart from wte.weight with the same bits; the module ties them, loaded once",
        )
    ]
    assert result.discarded == [] and result.untied == []
    assert module.lm_head.weight is module.wte.weight
    assert_bitwise_equal(snapshot(module), snapshot(torch_loaded(LM(tied=True), state)))


def test_different_untied_values_are_refused_for_a_tied_module(tmp_path: Path) -> None:
    """torch keeps whichever copy it writes last; load refuses, names the key and the opt-in."""
    state = state_of(4)  # lm_head.weight and wte.weight differ
    mc.save(state, tmp_path / "ck")
    module = LM(tied=True)
    before = snapshot(module)
    with pytest.raises(ModelMismatchError) as info:
        mc.load(module, tmp_path / "ck")
    report = info.value.report
    assert report.problems == [Problem("alias", "lm_head.weight", "tied to wte.weight", "not tied")]
    assert any("tie=True (CLI: --tie)" in h for h in report.hints)
    assert_bitwise_equal(snapshot(module), before)


def test_tie_opt_in_keeps_the_first_value_and_lists_the_discarded_key(tmp_path: Path) -> None:
    """tie=True loads the tie's first key in module order (wte.weight) and lists lm_head.weight."""
    state = state_of(5)
    mc.save(state, tmp_path / "ck")
    module = LM(tied=True)
    result = mc.load(module, tmp_path / "ck", tie=True)
    assert result.discarded == ["lm_head.weight"]
    assert [(a.kind, a.key, a.by) for a in result.allowed] == [("alias", "lm_head.weight", "tie=True")]
    assert module.lm_head.weight is module.wte.weight
    assert torch.equal(module.wte.weight, state["wte.weight"])
    assert not torch.equal(module.wte.weight, state["lm_head.weight"])
    # The state torch would leave had it copied wte.weight last: the lead's value everywhere.
    expected = torch_loaded(LM(tied=True), {k: v for k, v in state.items() if k != "lm_head.weight"}, strict=False)
    assert_bitwise_equal(snapshot(module), snapshot(expected))


def test_tied_checkpoint_into_untied_module_needs_untie(tmp_path: Path) -> None:
    """A checkpoint tie is refused for a module that keeps the tensors separate."""
    mc.save(LM(tied=True, seed=6), tmp_path / "ck")
    module = LM(tied=False)
    before = snapshot(module)
    with pytest.raises(ModelMismatchError) as info:
        mc.load(module, tmp_path / "ck")
    report = info.value.report
    assert report.problems == [Problem("alias", "lm_head.weight", "not tied", "tied to wte.weight")]
    assert any("untie=True (CLI: --untie)" in h for h in report.hints)
    assert_bitwise_equal(snapshot(module), before)


def test_untie_opt_in_copies_the_stored_value_into_each_tensor(tmp_path: Path) -> None:
    """untie=True gives each separate tensor the stored value, as torch does; the use is listed."""
    source = LM(tied=True, seed=7)
    mc.save(source, tmp_path / "ck")
    module = LM(tied=False)
    result = mc.load(module, tmp_path / "ck", untie=True)
    assert result.untied == ["lm_head.weight"]
    assert [(a.kind, a.key, a.by) for a in result.allowed] == [("alias", "lm_head.weight", "untie=True")]
    assert module.lm_head.weight is not module.wte.weight  # still separate
    assert module.lm_head.weight.data_ptr() != module.wte.weight.data_ptr()
    expected = torch_loaded(LM(tied=False), source.state_dict())
    assert_bitwise_equal(snapshot(module), snapshot(expected))


def test_check_lists_the_tie_decisions(tmp_path: Path) -> None:
    """check reports what the tie rules let through, in text and as JSON."""
    state = state_of(8)
    del state["lm_head.weight"]
    mc.save(state, tmp_path / "ck")
    report = mc.check(LM(tied=True), tmp_path / "ck")
    assert report.ok and report.problems == []
    assert report.to_dict()["allowed"] == [
        {
            "kind": "missing",
            "key": "lm_head.weight",
            "by": "tie partner",
            "detail": "tied to wte.weight in the module; loaded from it",
        }
    ]
    text = str(report).splitlines()
    assert text[0] == "OK: 3 keys match (names, shapes, dtypes, classes, ties); 1 allowed (1 missing), listed below"
    assert text[3].split() == ["missing", "lm_head.weight", "tie", "partner", "tied", "to", "wte.weight", "in", "the",
                               "module;", "loaded", "from", "it"]
