"""Property 8: resuming from a training state is bit-exact, and a refused load changes nothing.

Training N+M steps straight equals training N steps, saving the application state with
``mc.save``, building fresh objects (other initial values, another global RNG state),
``mc.load`` and training M more: model, optimizer, scheduler, progress and the global random
generators, every byte. Architectures, optimizers (SGD with momentum, Adam, AdamW, RMSprop,
Adagrad, with random hyper-parameters and parameter groups) and LR schedulers are drawn at
random; dropout and the data draw from the global torch RNG, and Python's ``random`` scales
the loss, so only a faithful :class:`~manifest_ckpt.RNGState` resumes exactly.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.errors import StateMismatchError

from .strategies import record_example, scratch, seeds

# Each example trains and saves twice: a tenth of the profile's examples keeps the ci run to
# a few seconds (``deep`` still runs 25 times as many).
EXAMPLES = max(10, settings.default.max_examples // 10)

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
SCHEDULERS = ("none", "step", "multistep", "exponential", "cosine", "linear", "onecycle")


@dataclass(frozen=True)
class Setup:
    """A pure description of one training program (built again for the resumed run)."""

    widths: tuple[int, ...]  # input, hidden..., output
    activation: str
    dropout: float
    norm: str  # "none", "layer", "batch"
    optimizer: str
    flags: tuple[bool, bool]  # nesterov / amsgrad / centered, weight decay on
    lr: float
    groups: int  # 1 or 2 parameter groups
    scheduler: str


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    widths = tuple(draw(st.lists(st.integers(1, 5), min_size=2, max_size=4)))
    return Setup(
        widths=widths,
        activation=draw(st.sampled_from(("relu", "tanh", "gelu"))),
        dropout=draw(st.sampled_from((0.0, 0.25, 0.5))),
        norm=draw(st.sampled_from(("none", "layer", "batch"))),
        optimizer=draw(st.sampled_from(OPTIMIZERS)),
        flags=(draw(st.booleans()), draw(st.booleans())),
        lr=draw(st.sampled_from((0.3, 0.05, 1e-3))),
        groups=draw(st.integers(1, 2)),
        scheduler=draw(st.sampled_from(SCHEDULERS)),
    )


def _model(setup: Setup) -> nn.Module:
    layers: list[nn.Module] = []
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[setup.activation]
    for i, (a, b) in enumerate(zip(setup.widths, setup.widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(setup.widths) - 2:
            if setup.norm == "layer":
                layers.append(nn.LayerNorm(b))
            elif setup.norm == "batch":
                layers.append(nn.BatchNorm1d(b))
            layers.append(act())
            if setup.dropout:
                layers.append(nn.Dropout(setup.dropout))
    return nn.Sequential(*layers)


def _optimizer(setup: Setup, model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    groups: Any = params
    if setup.groups == 2 and len(params) > 1:
        groups = [{"params": params[::2]}, {"params": params[1::2], "lr": setup.lr / 2}]
    flag, decay = setup.flags
    wd = 0.01 if decay else 0.0
    name = setup.optimizer
    if name == "sgd":
        return torch.optim.SGD(groups, lr=setup.lr, momentum=0.9, nesterov=flag, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(groups, lr=setup.lr, amsgrad=flag, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=setup.lr, amsgrad=flag, weight_decay=wd or 0.1)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=setup.lr, centered=flag, momentum=0.5, weight_decay=wd)
    return torch.optim.Adagrad(groups, lr=setup.lr, lr_decay=0.01 if flag else 0.0, weight_decay=wd)


def _scheduler(setup: Setup, optimizer: torch.optim.Optimizer) -> Any:
    s = torch.optim.lr_scheduler
    name = setup.scheduler
    if name == "none":
        return None
    if name == "step":
        return s.StepLR(optimizer, step_size=2, gamma=0.5)
    if name == "multistep":
        return s.MultiStepLR(optimizer, milestones=[1, 3, 3], gamma=0.3)
    if name == "exponential":
        return s.ExponentialLR(optimizer, gamma=0.9)
    if name == "cosine":
        return s.CosineAnnealingLR(optimizer, T_max=4, eta_min=1e-4)
    if name == "linear":
        return s.LinearLR(optimizer, start_factor=0.25, total_iters=3)
    return s.OneCycleLR(optimizer, max_lr=setup.lr, total_steps=20, cycle_momentum=setup.optimizer != "adagrad")


def _program(setup: Setup, init_seed: int) -> dict[str, Any]:
    """Fresh objects as a training script builds them (``init_seed`` gives other initial values)."""
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        model = _model(setup)
    optimizer = _optimizer(setup, model)
    app: dict[str, Any] = {"model": model, "optim": optimizer, "progress": {"step": 0, "losses": []}}
    scheduler = _scheduler(setup, optimizer)
    if scheduler is not None:
        app["sched"] = scheduler
    app["rng"] = mc.RNGState()
    return app


def _train(app: dict[str, Any], setup: Setup, steps: int) -> None:
    model, optimizer = app["model"], app["optim"]
    model.train()
    for _ in range(steps):
        x = torch.randn(4, setup.widths[0])  # data from the global generator, as a shuffling loader
        scale = random.uniform(0.5, 2.0)
        optimizer.zero_grad()
        loss = model(x).pow(2).mean() * scale
        loss.backward()
        optimizer.step()
        if "sched" in app:
            app["sched"].step()
        if "progress" in app:
            app["progress"]["step"] += 1
            app["progress"]["losses"].append(loss.item())


def _state(app: dict[str, Any]) -> dict[str, Any]:
    """Everything training depends on, copied."""
    state = {k: copy.deepcopy(v if isinstance(v, dict) else v.state_dict()) for k, v in app.items() if k != "rng"}
    state["rng"] = (torch.get_rng_state(), random.getstate())
    return state


def _same(a: Any, b: Any, where: str = "") -> None:
    """Assert bit-for-bit equality of nested states, naming the first difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.view(-1).view(torch.uint8).tolist() == b.view(-1).view(torch.uint8).tolist(), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: {list(a)} != {list(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}.{i}")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, where
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def _normalised(state: dict[str, Any]) -> dict[str, Any]:
    """Schedulers keep ``milestones`` as a Counter (a dict subclass); compare it as the dict it is."""
    sched = state.get("sched")
    if sched is not None and "milestones" in sched:
        sched["milestones"] = dict(sched["milestones"])
    return state


@settings(max_examples=EXAMPLES)
@given(setup=setups(), n=st.integers(1, 4), m=st.integers(1, 3), seed=seeds(), other=seeds())
def test_resume_equals_training_straight(
    setup: Setup, n: int, m: int, seed: int, other: int, tmp_path_factory: Any
) -> None:
    event(f"optimizer {setup.optimizer}")
    event(f"scheduler {setup.scheduler}")
    with torch.random.fork_rng():
        state = random.getstate()
        try:
            torch.manual_seed(seed)
            random.seed(seed)
            straight = _program(setup, init_seed=seed)
            _train(straight, setup, n + m)
            expected = _normalised(_state(straight))

            torch.manual_seed(seed)
            random.seed(seed)
            first = _program(setup, init_seed=seed)
            _train(first, setup, n)
            with scratch(tmp_path_factory) as tmp:
                mc.save(first, tmp / "ck", record_code=False)
                torch.manual_seed(other)  # the new process: other generators, other initial values
                random.seed(other)
                resumed = _program(setup, init_seed=other ^ 1)
                mc.load(resumed, tmp / "ck", verify_digests=True)
            _train(resumed, setup, m)
            _same(_normalised(_state(resumed)), expected)
        finally:
            random.setstate(state)
    record_example()


REFUSALS = ("optimizer class", "width", "scheduler", "missing entry", "extra entry", "hyper-parameter", "groups")


@settings(max_examples=EXAMPLES)
@given(setup=setups(), n=st.integers(1, 3), change=st.sampled_from(REFUSALS), seed=seeds())
def test_a_refused_load_changes_nothing(
    setup: Setup, n: int, change: str, seed: int, tmp_path_factory: Any
) -> None:
    """A fresh program that differs in one way is refused whole: every object, and the generators, as they were."""
    event(change)
    with torch.random.fork_rng():
        state = random.getstate()
        try:
            torch.manual_seed(seed)
            random.seed(seed)
            app = _program(setup, init_seed=seed)
            _train(app, setup, n)
            fresh_setup = _changed(setup, change)
            torch.manual_seed(seed ^ 7)
            random.seed(seed ^ 7)
            fresh = _program(fresh_setup, init_seed=seed ^ 3)
            if change == "missing entry":
                fresh["ema"] = {"decay": 0.99}
            elif change == "extra entry":
                del fresh["progress"]
            elif change == "hyper-parameter":
                fresh["optim"].param_groups[0]["custom"] = 1.0
            _train(fresh, fresh_setup, 1)  # not untouched: state in every object
            before = _state(fresh)
            with scratch(tmp_path_factory) as tmp:
                mc.save(app, tmp / "ck", record_code=False)
                with pytest.raises(StateMismatchError) as info:
                    mc.load(fresh, tmp / "ck")
            assert info.value.report.problems
            _same(_state(fresh), before)
        finally:
            random.setstate(state)
    record_example()


def _changed(setup: Setup, change: str) -> Setup:
    if change == "optimizer class":
        return replace(setup, optimizer=OPTIMIZERS[(OPTIMIZERS.index(setup.optimizer) + 1) % len(OPTIMIZERS)])
    if change == "width":
        return replace(setup, widths=(*setup.widths[:-1], setup.widths[-1] + 1))
    if change == "scheduler":
        others = [s for s in SCHEDULERS if s not in (setup.scheduler, "none")]
        return replace(setup, scheduler=others[len(setup.widths) % len(others)])
    if change == "groups":
        return replace(setup, groups=3 - setup.groups, widths=(*setup.widths[:-1], max(2, setup.widths[-1])))
    return setup
