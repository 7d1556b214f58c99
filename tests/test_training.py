"""Training states: save an application state, check it against fresh objects, restore it in place."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.errors import StateMismatchError, UnsupportedTensorError, UnsupportedValueError


class Two(nn.Module):
    """Two layers of one shape, registered in the order given: a reordered model has equal shapes."""

    def __init__(self, first: str = "a", second: str = "b") -> None:
        super().__init__()
        for name in (first, second):
            self.add_module(name, nn.Linear(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


OPTIMIZERS: dict[str, Any] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
}


def build(optimizer: str = "adam", seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.2), nn.ReLU(), nn.Linear(6, 2))
    optim = OPTIMIZERS[optimizer](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    return {"model": model, "optim": optim, "sched": sched, "progress": {"step": 0}}


def train(app: dict[str, Any], steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=gen)
        app["optim"].zero_grad()
        app["model"](x).pow(2).mean().backward()
        app["optim"].step()
        app["sched"].step()
        app["progress"]["step"] += 1


def snapshot(app: dict[str, Any]) -> dict[str, Any]:
    """Everything a restore could change, copied."""
    return {
        "model": copy.deepcopy(app["model"].state_dict()),
        "optim": copy.deepcopy(app["optim"].state_dict()),
        "sched": copy.deepcopy(app["sched"].state_dict()),
        "progress": copy.deepcopy(app["progress"]),
    }


def same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of nested states."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b) or (a != a and b != b)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_resume_is_bit_exact(tmp_path: Path, optimizer: str) -> None:
    """Training 3 steps, saving, loading into fresh objects and training 2 more equals 5 steps straight."""
    straight = build(optimizer)
    torch.manual_seed(1)
    train(straight, 5, seed=7)
    first = build(optimizer)
    torch.manual_seed(1)
    train(first, 3, seed=7)
    mc.save({**first, "rng": mc.RNGState()}, tmp_path / "ck")
    resumed = build(optimizer, seed=99)
    result = mc.load({**resumed, "rng": mc.RNGState()}, tmp_path / "ck")
    assert "optim" in result.loaded and "model.0.weight" in result.loaded
    assert resumed["progress"] == {"step": 3}
    # the rest of the stream: the generator state of step 3 onwards
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        torch.randn(5, 4, generator=gen)
    for _ in range(2):
        x = torch.randn(5, 4, generator=gen)
        resumed["optim"].zero_grad()
        resumed["model"](x).pow(2).mean().backward()
        resumed["optim"].step()
        resumed["sched"].step()
        resumed["progress"]["step"] += 1
    assert same(snapshot(resumed), snapshot(straight))


def test_check_reports_ok_and_changes_nothing(tmp_path: Path) -> None:
    """check on matching fresh objects is OK and leaves them as they were."""
    app = build()
    train(app, 2, seed=1)
    mc.save(app, tmp_path / "ck")
    fresh = build(seed=5)
    before = snapshot(fresh)
    report = mc.check(fresh, tmp_path / "ck")
    assert report.ok, report
    assert same(snapshot(fresh), before)


def test_reordered_parameters_get_their_own_state(tmp_path: Path) -> None:
    """torch's positional load gives b's moments to a; ours restores each parameter's own, by name."""
    torch.manual_seed(0)
    model = Two("a", "b")
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    optim.step()
    mc.save({"model": model, "optim": optim}, tmp_path / "ck")
    own = {name: optim.state[p]["exp_avg"].clone() for name, p in model.named_parameters()}

    def reordered() -> tuple[nn.Module, torch.optim.Optimizer]:
        m = Two("b", "a")
        m.load_state_dict(model.state_dict())
        return m, torch.optim.Adam(m.parameters(), lr=0.1)

    m_torch, o_torch = reordered()
    o_torch.load_state_dict(optim.state_dict())  # silently wrong: by position
    wrong = {name: o_torch.state[p]["exp_avg"] for name, p in m_torch.named_parameters()}
    assert torch.equal(wrong["b.weight"], own["a.weight"]) and not torch.equal(wrong["a.weight"], own["a.weight"])

    m_ours, o_ours = reordered()
    mc.load({"model": m_ours, "optim": o_ours}, tmp_path / "ck")
    for name, p in m_ours.named_parameters():
        assert torch.equal(o_ours.state[p]["exp_avg"], own[name]), name


def test_optimizer_state_is_stored_by_parameter_name(tmp_path: Path) -> None:
    """The manifest keys optimizer tensors by parameter name and load_file gives that layout back."""
    app = build("sgd")
    train(app, 1, seed=0)
    manifest = mc.save(app, tmp_path / "ck")
    assert "optim.state.0.weight.momentum_buffer" in manifest.tensors
    state = mc.load_file(tmp_path / "ck")
    assert state["optim"]["param_groups"][0]["params"] == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert torch.equal(state["model"]["3.bias"], app["model"][3].bias.detach())
    assert state["progress"] == {"step": 1}
    assert state["sched"]["last_epoch"] == 1


def refused(tmp_path: Path, fresh: dict[str, Any], **options: Any) -> StateMismatchError:
    """Load ``fresh`` against a saved Adam state; return the error after checking nothing changed."""
    app = build()
    train(app, 2, seed=0)
    mc.save(app, tmp_path / "ck", overwrite=True)
    before = {k: copy.deepcopy(v.state_dict() if hasattr(v, "state_dict") else v) for k, v in fresh.items()}
    with pytest.raises(StateMismatchError) as info:
        mc.load(fresh, tmp_path / "ck", **options)
    after = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in fresh.items()}
    assert same(after, before)
    assert mc.check(fresh, tmp_path / "ck", **options).problems == info.value.report.problems
    return info.value


def test_another_optimizer_class_is_refused(tmp_path: Path) -> None:
    """An SGD where Adam was saved is a class problem at the optimizer's key."""
    fresh = build("sgd")
    error = refused(tmp_path, fresh)
    assert [(p.kind, p.key) for p in error.report.problems] == [("class", "optim")]
    assert "torch.optim.adam.Adam" in str(error)


def test_another_scheduler_class_is_refused(tmp_path: Path) -> None:
    """A different LR scheduler class is named."""
    fresh = build()
    fresh["sched"] = torch.optim.lr_scheduler.ExponentialLR(fresh["optim"], gamma=0.9)
    error = refused(tmp_path, fresh)
    assert [(p.kind, p.key) for p in error.report.problems] == [("class", "sched")]


def test_missing_and_extra_entries_are_all_reported_and_allowed_by_policy(tmp_path: Path) -> None:
    """A new entry and a dropped one come in one report; allow_* patterns accept them."""
    fresh = build()
    del fresh["sched"]
    fresh["ema"] = {"decay": 0.99}
    error = refused(tmp_path, fresh)
    assert [(p.kind, p.key) for p in error.report.problems] == [("missing", "ema"), ("unexpected", "sched")]
    result = mc.load(fresh, tmp_path / "ck", allow_missing=["ema"], allow_unexpected=["sched"])
    assert result.left_initial == ["ema"] and result.skipped == ["sched"]
    assert fresh["ema"] == {"decay": 0.99} and fresh["progress"] == {"step": 2}


def test_weights_only_from_a_training_state(tmp_path: Path) -> None:
    """Loading just the model from a training state is an explicit opt-in."""
    app = build()
    train(app, 2, seed=0)
    mc.save(app, tmp_path / "ck")
    fresh = build(seed=3)
    mc.load({"model": fresh["model"]}, tmp_path / "ck", allow_unexpected=["optim", "sched", "progress"])
    assert same(fresh["model"].state_dict(), app["model"].state_dict())


def test_parameter_group_membership_is_checked_by_name(tmp_path: Path) -> None:
    """Parameters moved to another group are named with the group they are in."""
    fresh = build()
    model = fresh["model"]
    fresh["optim"] = torch.optim.Adam(
        [{"params": [model[0].weight, model[0].bias]}, {"params": [model[3].weight, model[3].bias], "lr": 0.1}]
    )
    fresh["sched"] = torch.optim.lr_scheduler.StepLR(fresh["optim"], step_size=2, gamma=0.5)
    error = refused(tmp_path, fresh)
    keys = {(p.kind, p.key) for p in error.report.problems}
    assert ("missing", "optim.param_groups.1") in keys
    assert ("unexpected", "optim.param_groups.0.params.3.weight") in keys


def test_hyper_parameter_keys_are_checked(tmp_path: Path) -> None:
    """A hyper-parameter the checkpoint lacks is missing unless allowed; allowed, it keeps its live value."""
    fresh = build()
    fresh["optim"].param_groups[0]["custom"] = 1.5
    error = refused(tmp_path, fresh)
    assert [(p.kind, p.key) for p in error.report.problems] == [("missing", "optim.param_groups.0.custom")]
    mc.load(fresh, tmp_path / "ck", allow_missing=[r"optim\.param_groups\.0\.custom"])
    assert fresh["optim"].param_groups[0]["custom"] == 1.5


def test_state_dtype_that_torch_would_cast_is_refused(tmp_path: Path) -> None:
    """Moments saved in float32 loaded next to float64 parameters are dtype problems, not silent casts."""
    fresh = build()
    fresh["model"].double()
    error = refused(tmp_path, fresh)
    kinds = {(p.kind, p.key) for p in error.report.problems}
    assert ("dtype", "model.0.weight") in kinds and ("dtype", "optim.state.0.weight.exp_avg") in kinds


def test_a_tensor_value_of_another_shape_is_refused(tmp_path: Path) -> None:
    """Tensors among plain values are compared too."""
    mc.save({"model": nn.Linear(2, 2), "ema": torch.zeros(3)}, tmp_path / "ck")
    live = {"model": nn.Linear(2, 2), "ema": torch.ones(4)}
    with pytest.raises(StateMismatchError) as info:
        mc.load(live, tmp_path / "ck")
    assert [(p.kind, p.key) for p in info.value.report.problems] == [("shape", "ema")]
    assert torch.equal(live["ema"], torch.ones(4))


def test_values_needing_pickle_are_refused_by_key_before_writing(tmp_path: Path) -> None:
    """An arbitrary object is named and nothing is written."""
    with pytest.raises(UnsupportedValueError) as info:
        mc.save({"model": nn.Linear(2, 2), "cfg": {"path": Path("x")}}, tmp_path / "ck")
    assert info.value.keys == ("cfg.path",)
    assert not (tmp_path / "ck").exists()


def test_an_optimizer_without_its_module_is_refused(tmp_path: Path) -> None:
    """Optimizer state is stored by parameter name, so the module must come with it."""
    model = nn.Linear(2, 2)
    with pytest.raises(UnsupportedValueError, match="save the module with it"):
        mc.save({"optim": torch.optim.SGD(model.parameters(), lr=0.1)}, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_a_weights_checkpoint_is_not_a_training_state(tmp_path: Path) -> None:
    """An application state against a weights checkpoint says how to load the module."""
    model = nn.Linear(2, 2)
    mc.save(model, tmp_path / "ck")
    report = mc.check({"model": model, "step": 0}, tmp_path / "ck")
    assert [(p.kind, p.key) for p in report.problems] == [("missing", "model"), ("missing", "step")]
    assert "mc.load(model, path)" not in report.hints[0] and "manifest_ckpt.load(model, path)" in report.hints[0]


def test_saving_is_deterministic_and_verifies(tmp_path: Path) -> None:
    """The same application state gives byte-identical manifests; verify covers every part."""
    app = build()
    train(app, 2, seed=0)
    a = mc.save(app, tmp_path / "a", record_code=False)
    mc.save(app, tmp_path / "b", record_code=False)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert a.format_version == "1.1.0"
    mc.verify(tmp_path / "a")


def test_rng_state_restores_every_generator(tmp_path: Path) -> None:
    """torch, random and numpy draw the same numbers after a restore."""
    import numpy as np

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    mc.save({"rng": mc.RNGState()}, tmp_path / "ck")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    mc.load({"rng": mc.RNGState()}, tmp_path / "ck")
    found = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(found[0], expected[0]) and found[1:] == expected[1:]


def test_load_file_of_a_weights_checkpoint_is_its_state_dict(tmp_path: Path) -> None:
    """Without a template, a weights checkpoint reads back as its flat dict of tensors."""
    model = nn.Linear(2, 3)
    mc.save(model, tmp_path / "ck")
    state = mc.load_file(tmp_path / "ck", verify_digests=True)
    assert same(state, {k: v.detach() for k, v in model.state_dict().items()})


# -- module entries load as load(module) loads a module ---------------------------------------------
def test_a_module_built_with_init_empty_is_materialised_and_its_optimizer_follows(tmp_path: Path) -> None:
    """A model built on meta (init_empty) with its optimizer over the meta parameters resumes as a built one does."""
    saved = build("adam")
    train(saved, 3, seed=1)
    mc.save(saved, tmp_path / "ck")
    with mc.init_empty():
        model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.2), nn.ReLU(), nn.Linear(6, 2))
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    resumed = {"model": model, "optim": optim, "sched": sched, "progress": {"step": 0}}
    result = mc.load(resumed, tmp_path / "ck")
    assert result.materialized == ["model.0.bias", "model.0.weight", "model.3.bias", "model.3.weight"]
    assert not any(p.is_meta for p in model.parameters())
    assert [id(p) for p in optim.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    reference = build("adam", seed=9)
    mc.load(reference, tmp_path / "ck")
    assert same(snapshot(resumed), snapshot(reference))
    for app in (resumed, reference):
        torch.manual_seed(11)  # the same dropout masks for both
        train(app, 2, seed=7)
    assert same(snapshot(resumed), snapshot(reference))


class WithTable(nn.Module):
    """A layer with a non-persistent buffer, which no checkpoint holds."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("table", torch.arange(3.0), persistent=False)


def test_a_meta_module_the_checkpoint_cannot_fill_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    """Built under torch.device("meta"), a non-persistent buffer stays on meta: refused by name before any restore."""
    mc.save({"model": WithTable(), "progress": {"step": 4}}, tmp_path / "ck")
    with torch.device("meta"):
        meta = WithTable()
    progress = {"step": 0}
    with pytest.raises(UnsupportedTensorError, match=r"model\.table"):
        mc.load({"model": meta, "progress": progress}, tmp_path / "ck")
    assert progress == {"step": 0} and meta.table.is_meta and meta.lin.weight.is_meta


class Counted(nn.Linear):
    """A layer with extra state (tensor, bytes and plain values) and a load post-hook that counts its calls."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.extra: dict[str, Any] = {"n": 0, "t": torch.zeros(2), "raw": b""}
        self.post_hook_calls = 0
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "post_hook_calls", module.post_hook_calls + 1))

    def get_extra_state(self) -> dict[str, Any]:
        return self.extra

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.extra = state


def test_module_extra_state_and_load_hooks_inside_a_training_state(tmp_path: Path) -> None:
    """get_extra_state is saved (format 1.2, extensions.extra_state) and handed to set_extra_state; post-hooks run once."""
    model = nn.Sequential(Counted(), nn.ReLU())
    model[0].extra = {"n": 3, "t": torch.tensor([1.5, -2.0]), "raw": b"\x00\x01"}
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    manifest = mc.save({"model": model, "optim": optim, "progress": {"step": 1}}, tmp_path / "ck")
    assert manifest.format_version == "1.2.0" and list(manifest.extra_state) == ["model.0._extra_state"]
    mc.verify(tmp_path / "ck")
    fresh = nn.Sequential(Counted(), nn.ReLU())
    fresh_optim = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    result = mc.load({"model": fresh, "optim": fresh_optim, "progress": {"step": 0}}, tmp_path / "ck")
    assert "model.0._extra_state" in result.loaded
    assert same(fresh[0].extra, model[0].extra) and fresh[0].post_hook_calls == 1
    assert same(dict(fresh.state_dict()), dict(model.state_dict()))  # torch's own view, extra state included
    state = mc.load_file(tmp_path / "ck")
    assert list(state["model"]) == ["0.weight", "0.bias", "0._extra_state"]
    assert same(state["model"]["0._extra_state"], model[0].extra)


def test_extra_state_that_needs_pickle_is_refused_by_key_before_writing(tmp_path: Path) -> None:
    """Extra state holding an arbitrary object is UnsupportedValueError naming its key; nothing is written."""
    model = nn.Sequential(Counted())
    model[0].extra = {"n": object()}
    with pytest.raises(UnsupportedValueError, match=r"model\.0\._extra_state\.n \(builtins\.object\)"):
        mc.save({"model": model, "progress": {"step": 1}}, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_batch_norm_running_statistics_resume_exactly(tmp_path: Path) -> None:
    """BatchNorm's running mean, variance and num_batches_tracked come back bit for bit in a training state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optim.zero_grad()
        model(torch.randn(8, 3)).sum().backward()
        optim.step()
    mc.save({"model": model, "optim": optim}, tmp_path / "ck")
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    mc.load({"model": fresh, "optim": torch.optim.SGD(fresh.parameters(), lr=0.1)}, tmp_path / "ck")
    assert int(fresh[1].num_batches_tracked) == 3
    assert same(dict(fresh.state_dict()), dict(model.state_dict()))
