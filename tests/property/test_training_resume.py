"""Property 8: resuming from a training state is bit-exact, and a refused load changes nothing.

Training N+M steps straight equals training N steps, saving the application state with
``mc.save``, building fresh objects (other initial values, another global RNG state),
``mc.load`` and training M more: model, optimizer, scheduler, progress and the global random
generators, every byte. Architectures are drawn at random: MLPs, 1-D and 2-D convolutions,
embeddings with a head tied to them, with LayerNorm, BatchNorm (running statistics and
``num_batches_tracked``) or GroupNorm, and dropout; so are optimizers (SGD with momentum,
Adam, AdamW, RMSprop, Adagrad, with random hyper-parameters and parameter groups) and LR
schedulers. Dropout and the data draw from the global torch RNG, and Python's ``random``
scales the loss, so only a faithful :class:`~manifest_ckpt.RNGState` resumes exactly. The
resumed program is sometimes built inside ``mc.init_empty()`` (its optimizer over the meta
parameters), as a big model would be.
"""

from __future__ import annotations

import copy
import itertools
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


ARCHITECTURES = ("mlp", "conv1d", "conv2d", "embedding")


@dataclass(frozen=True)
class Setup:
    """A pure description of one training program (built again for the resumed run)."""

    architecture: str
    widths: tuple[int, ...]  # input (channels, vocabulary), hidden..., output
    activation: str
    dropout: float
    norm: str  # "none", "layer", "batch", "group"
    optimizer: str
    flags: tuple[bool, bool]  # nesterov / amsgrad / centered, weight decay on
    lr: float
    groups: int  # 1 or 2 parameter groups
    scheduler: str
    empty: bool  # the resumed program is built inside mc.init_empty()


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    architecture = draw(st.sampled_from(ARCHITECTURES))
    widths = tuple(draw(st.lists(st.integers(1, 5), min_size=2, max_size=4)))
    if architecture == "embedding":
        widths = (widths[0] + 2, *widths[1:])  # a vocabulary of at least 3
    return Setup(
        architecture=architecture,
        widths=widths,
        activation=draw(st.sampled_from(("relu", "tanh", "gelu"))),
        dropout=draw(st.sampled_from((0.0, 0.25, 0.5))),
        norm=draw(st.sampled_from(("none", "layer", "batch", "group"))),
        optimizer=draw(st.sampled_from(OPTIMIZERS)),
        flags=(draw(st.booleans()), draw(st.booleans())),
        lr=draw(st.sampled_from((0.3, 0.05, 1e-3))),
        groups=draw(st.integers(1, 2)),
        scheduler=draw(st.sampled_from(SCHEDULERS)),
        empty=draw(st.booleans()),
    )


def _norm(setup: Setup, width: int, spatial: int) -> nn.Module | None:
    """The normalisation layer for ``width`` features over ``spatial`` dimensions (0: none)."""
    if setup.norm == "layer":
        return nn.LayerNorm(width)
    if setup.norm == "group":
        return nn.GroupNorm(1, width)
    if setup.norm == "batch":
        return (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d)[spatial](width)
    return None


class _Channels(nn.Module):
    """LayerNorm over the channels of a (batch, channels, ...) activation."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class _Embedded(nn.Module):
    """An embedding, a stack of layers over its mean, and a head tied to the embedding."""

    def __init__(self, vocabulary: int, width: int, body: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.body = body
        self.head = nn.Linear(width, vocabulary, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x).mean(1)))


def _model(setup: Setup) -> nn.Module:
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[setup.activation]
    spatial = {"mlp": 0, "embedding": 0, "conv1d": 1, "conv2d": 2}[setup.architecture]
    widths = setup.widths
    if setup.architecture == "embedding":
        widths = (widths[1], *widths[2:], widths[1])  # the body maps the embedding width to itself
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        last = i == len(widths) - 2
        if spatial and not last:
            layers.append((nn.Conv1d, nn.Conv2d)[spatial - 1](a, b, kernel_size=2, padding=1))
        else:
            if spatial and last:
                layers.append(nn.Flatten(1))
                a *= 4**spatial  # spatial size after len(widths) - 2 convolutions
            layers.append(nn.Linear(a, b))
        if not last:
            norm = _norm(setup, b, spatial)
            if norm is not None:
                layers.append(_Channels(norm) if spatial and setup.norm == "layer" else norm)
            layers.append(act())
            if setup.dropout:
                layers.append(nn.Dropout(setup.dropout))
    body = nn.Sequential(*layers)
    if setup.architecture == "embedding":
        return _Embedded(setup.widths[0], setup.widths[1], body)
    return body


def _inputs(setup: Setup) -> torch.Tensor:
    """A batch from the global generator, as a shuffling loader draws it."""
    if setup.architecture == "embedding":
        return torch.randint(setup.widths[0], (4, 3))
    # Each convolution (kernel 2, padding 1) adds one to every spatial size: end at 4.
    size = 4 - (len(setup.widths) - 2)
    shape = {"mlp": (), "conv1d": (size,), "conv2d": (size, size)}[setup.architecture]
    return torch.randn(4, setup.widths[0], *shape)


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


def _program(setup: Setup, init_seed: int, *, empty: bool = False) -> dict[str, Any]:
    """Fresh objects as a training script builds them (``init_seed`` gives other initial values).

    ``empty``: the model is built inside ``mc.init_empty()``, its optimizer over meta parameters.
    """
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        if empty:
            with mc.init_empty():
                model = _model(setup)
        else:
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
        x = _inputs(setup)
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
    event(f"architecture {setup.architecture}, norm {setup.norm}")
    event(f"optimizer {setup.optimizer}")
    event(f"scheduler {setup.scheduler}")
    event(f"resumed program built {'inside init_empty' if setup.empty else 'normally'}")
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
                resumed = _program(setup, init_seed=other ^ 1, empty=setup.empty)
                result = mc.load(resumed, tmp / "ck", verify_digests=True)
                assert bool(result.materialized) == setup.empty
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
