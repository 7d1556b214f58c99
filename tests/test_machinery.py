"""A module's own load machinery (issue 10, item 2): hooks, overrides, _version migrations and lazy modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt import machinery
from manifest_ckpt.errors import UnsupportedValueError


def _bits(module: nn.Module) -> dict[str, bytes]:
    return {
        k: v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        for k, v in module.state_dict().items()
        if isinstance(v, torch.Tensor)
    }


class Renamed(nn.Module):
    """Stores ``w`` (2, 3); old checkpoints hold ``weight`` (3, 2), transposed by a private pre-hook."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 3))
        self._register_load_state_dict_pre_hook(self._upgrade)

    def _upgrade(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix + "weight" in state:
            state[prefix + "w"] = state.pop(prefix + "weight").t()


def test_batchnorm_checkpoint_without_num_batches_tracked_loads_as_torch_does(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        source[1].running_mean.normal_()
    old = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    mc.save(old, tmp_path / "ck")
    ours, theirs = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for m in (ours, theirs):
        m[1].num_batches_tracked.fill_(5)
    theirs.load_state_dict(old)
    assert mc.check(ours, tmp_path / "ck").ok
    result = mc.load(ours, tmp_path / "ck")
    assert _bits(ours) == _bits(theirs)
    assert int(ours[1].num_batches_tracked) == 5
    assert "1.num_batches_tracked" in result.loaded


def test_a_renaming_pre_hook_is_applied_before_the_comparison_and_loads_as_torch(tmp_path: Path) -> None:
    state = {"0.weight": torch.arange(6.0).reshape(3, 2)}
    mc.save(state, tmp_path / "ck")
    ours, theirs = nn.Sequential(Renamed()), nn.Sequential(Renamed())
    theirs.load_state_dict(state)
    assert mc.check(ours, tmp_path / "ck").ok
    result = mc.load(ours, tmp_path / "ck")
    assert _bits(ours) == _bits(theirs)
    assert torch.equal(ours[0].w, state["0.weight"].t())
    assert result.loaded == ["0.w"]


def test_a_public_pre_hook_with_the_module_renames_keys(tmp_path: Path) -> None:
    def hook(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for old in [k for k in state if k.startswith(prefix + "legacy_")]:
            state[prefix + old[len(prefix) + len("legacy_") :]] = state.pop(old)

    torch.manual_seed(1)
    saved = nn.Linear(2, 2)
    mc.save({f"legacy_{k}": v for k, v in saved.state_dict().items()}, tmp_path / "ck")
    target = nn.Linear(2, 2)
    target.register_load_state_dict_pre_hook(hook)
    mc.load(target, tmp_path / "ck")
    assert _bits(target) == _bits(saved)


def test_a_shape_problem_after_a_rename_is_reported_before_any_copy(tmp_path: Path) -> None:
    mc.save({"0.weight": torch.zeros(4, 2), "1.weight": torch.zeros(3)}, tmp_path / "ck")
    target = nn.Sequential(Renamed(), nn.LayerNorm(3, bias=False))
    before = _bits(target)
    with pytest.raises(mc.ModelMismatchError) as info:
        mc.load(target, tmp_path / "ck")
    assert [(p.kind, p.key) for p in info.value.report.problems] == [("shape", "0.w")]
    assert "float32[2, 4]" in str(info.value)
    assert _bits(target) == before


def test_a_hook_that_cannot_run_on_the_description_is_reported_not_loaded_blind(tmp_path: Path) -> None:
    def needs_values(state: dict[str, Any], prefix: str, *args: Any) -> None:
        if float(state[prefix + "weight"].sum()) > 1e9:  # data-dependent: impossible on meta tensors
            state.clear()

    saved = nn.Linear(2, 2)
    mc.save(saved, tmp_path / "ck")
    target = nn.Sequential(nn.Linear(2, 2))
    target[0]._register_load_state_dict_pre_hook(needs_values)
    before = _bits(target)
    with pytest.raises(mc.ModelMismatchError) as info:
        mc.load(target, tmp_path / "ck", remap={"^": "0."})
    problems = info.value.report.problems
    assert [(p.kind, p.key) for p in problems] == [("hook", "0")]
    assert "cannot be checked before copying" in (problems[0].found or "")
    assert any(h.startswith("module 0: its load machinery (Linear") for h in info.value.report.hints)
    assert _bits(target) == before
    assert mc.check(target, tmp_path / "ck", remap={"^": "0."}).by_kind("hook")


class WritesItself(nn.Linear):
    def _load_from_state_dict(self, *args: Any) -> None:
        super()._load_from_state_dict(*args)
        with torch.no_grad():
            self.bias.zero_()


def test_an_override_that_writes_its_own_tensors_is_refused_and_the_module_unchanged(tmp_path: Path) -> None:
    mc.save({"weight": torch.ones(3, 2), "bias": torch.ones(3)}, tmp_path / "ck")
    target = WritesItself(2, 3)
    before = _bits(target)
    with pytest.raises(mc.ModelMismatchError, match="writes or replaces the module's own tensors bias") as info:
        mc.load(target, tmp_path / "ck", check_classes=False)
    assert [p.kind for p in info.value.report.problems] == ["hook"]
    assert _bits(target) == before


def test_post_hooks_run_after_the_copy_and_a_failing_one_restores_the_module(tmp_path: Path) -> None:
    torch.manual_seed(2)
    saved = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    mc.save(saved, tmp_path / "ck")
    seen: list[torch.Tensor] = []
    target = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    target[1].register_load_state_dict_post_hook(lambda m, keys: seen.append(m.weight.detach().clone()))
    mc.load(target, tmp_path / "ck")
    assert torch.equal(seen[0], saved[1].weight)

    failing = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    before = _bits(failing)

    def boom(module: nn.Module, keys: Any) -> None:
        raise ValueError("recompute failed")

    failing[0].register_load_state_dict_post_hook(boom)
    with pytest.raises(mc.LoadAbortedError, match="recompute failed"):
        mc.load(failing, tmp_path / "ck")
    assert _bits(failing) == before


def test_lazy_modules_are_refused_on_save_and_materialised_on_load_as_torch_does(tmp_path: Path) -> None:
    torch.manual_seed(3)
    saved = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 4))
    mc.save(saved, tmp_path / "ck")

    def lazy() -> nn.Module:
        return nn.Sequential(nn.LazyLinear(3), nn.LazyBatchNorm1d(), nn.LazyLinear(4))

    with pytest.raises(mc.UnsupportedTensorError, match=r"uninitialised lazy .*\(0\.weight, 0\.bias, 1\.weight"):
        mc.save(lazy(), tmp_path / "lazy")
    assert not (tmp_path / "lazy").exists()
    ours, theirs = lazy(), lazy()
    theirs.load_state_dict(saved.state_dict())
    weight = ours[0].weight
    result = mc.load(ours, tmp_path / "ck")
    assert _bits(ours) == _bits(theirs) == _bits(saved)
    assert ours[0].weight is weight and type(weight) is nn.Parameter and weight.requires_grad
    assert result.materialized == sorted(k for k in saved.state_dict() if not k.endswith("num_batches_tracked"))
    ours.eval(), saved.eval()
    x = torch.randn(5, 2)
    assert torch.equal(ours(x), saved(x))


def test_the_machinery_patch_is_only_active_while_it_runs() -> None:
    assert nn.Module._load_from_state_dict is machinery._BASE
    m = nn.Sequential(Renamed())
    machinery.rewrite(m, {"0.weight": torch.empty(3, 2, device="meta")}, None, placeholders=True)
    assert nn.Module._load_from_state_dict is machinery._BASE
    m.load_state_dict({"0.w": torch.ones(2, 3)})
    assert torch.equal(m[0].w, torch.ones(2, 3))


class WithExtra(nn.Module):
    """A layer whose extra state is whatever ``value`` holds (JSON, a tensor, a dict of tensors...)."""

    def __init__(self, value: Any = None, *, fail: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.value = value
        self.fail = fail

    def get_extra_state(self) -> Any:
        return self.value

    def set_extra_state(self, state: Any) -> None:
        if self.fail:
            raise RuntimeError("cannot accept this state")
        self.value = state


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b) and type(a) is type(b)


@pytest.mark.parametrize(
    "value",
    [
        {"step": 3, "name": "fp8", "amax": [1.5, float("nan"), float("inf")], "pair": (1, 2), "none": None},
        torch.arange(6, dtype=torch.int16).reshape(2, 3),
        {"scale": torch.ones(2), "history": torch.zeros(3, dtype=torch.int8)},
    ],
    ids=["json", "tensor", "dict-of-tensors"],
)
def test_extra_state_round_trips_as_torch_loads_it(tmp_path: Path, value: Any) -> None:
    torch.manual_seed(4)
    saved = nn.Sequential(WithExtra(value), nn.BatchNorm1d(2))
    manifest = mc.save(saved, tmp_path / "ck")
    assert manifest.format_version == "1.2.0" and list(manifest.extra_state) == ["0._extra_state"]
    mc.verify(tmp_path / "ck")
    ours, theirs = nn.Sequential(WithExtra(), nn.BatchNorm1d(2)), nn.Sequential(WithExtra(), nn.BatchNorm1d(2))
    theirs.load_state_dict(saved.state_dict())
    assert mc.check(ours, tmp_path / "ck").ok
    result = mc.load(ours, tmp_path / "ck")
    assert "0._extra_state" in result.loaded
    assert _same(ours[0].value, theirs[0].value) and _same(ours[0].value, value)
    assert _bits(ours) == _bits(saved)
    assert mc.save(ours, tmp_path / "again").digest == manifest.digest


def test_the_digest_covers_extra_state(tmp_path: Path) -> None:
    manifest = mc.save(WithExtra({"step": 3}), tmp_path / "ck")
    doc = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    doc["extensions"]["extra_state"]["_extra_state"] = {"dict": [["step", 4]]}
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(mc.ManifestError, match=r"\$\.digest: is " + manifest.digest):
        mc.verify(tmp_path / "ck")


def test_extra_state_that_needs_pickle_is_refused_with_its_key_before_writing(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedValueError, match=r"0\.0\._extra_state\.fn \(builtins\.builtin_function_or_method\)") as info:
        mc.save(nn.Sequential(nn.Sequential(WithExtra({"fn": len}))), tmp_path / "ck")
    assert info.value.keys == ("0.0._extra_state.fn",)
    assert not (tmp_path / "ck").exists()


def test_extra_state_keys_are_missing_or_unexpected_as_in_torch(tmp_path: Path) -> None:
    mc.save(WithExtra({"step": 1}), tmp_path / "with")
    mc.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "without")
    plain = nn.Module()
    plain.lin = nn.Linear(2, 2)
    report = mc.check(plain, tmp_path / "with")
    assert [(p.kind, p.key, p.found) for p in report.problems] == [("unexpected", "_extra_state", "extra state")]
    target = WithExtra({"kept": True})
    with pytest.raises(mc.ModelMismatchError) as info:
        mc.load(target, tmp_path / "without", remap={r"^0\.": "lin."})
    assert [(p.kind, p.key) for p in info.value.report.problems] == [("missing", "_extra_state")]
    result = mc.load(target, tmp_path / "without", remap={r"^0\.": "lin."}, allow_missing=["_extra_state"])
    assert result.left_initial == ["_extra_state"] and target.value == {"kept": True}


def test_a_failing_set_extra_state_restores_the_module(tmp_path: Path) -> None:
    mc.save(WithExtra({"step": 9}), tmp_path / "ck")
    target = WithExtra({"step": 1}, fail=True)
    before = _bits(target)
    with pytest.raises(mc.LoadAbortedError, match=r"set_extra_state of the module failed.*cannot accept this state"):
        mc.load(target, tmp_path / "ck")
    assert _bits(target) == before and target.value == {"step": 1}
