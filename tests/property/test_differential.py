"""Property 8 (issue 10, item 1): ``mc.load`` does what torch's ``load_state_dict(strict=True)`` does, or refuses.

Random architectures mix plain layers with the module machinery torch runs on load: lazy
modules, load pre-hooks that rename and transform keys, post-hooks, BatchNorm's ``_version``
migration (a state-dict checkpoint without ``num_batches_tracked``), extra state, ties; the
targets are built normally, under ``torch.inference_mode()``, inside ``mc.init_empty()``, with
channels-last or non-contiguous weights, and now and then one layer of another shape. Where
torch succeeds, ``mc.load`` leaves a bit-identical state (values, dtypes, classes, ties,
extra state, what post-hooks saw); where torch fails or we refuse, the error is a
``ManifestCkptError`` and the module is unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import event, given
from hypothesis import strategies as st
from torch import nn
from torch.nn.parameter import is_lazy

import manifest_ckpt as mc

from .strategies import record_example, scratch, seeds

KINDS = ("linear", "conv", "bn", "lazy", "renamed", "posthook", "extra", "tied")


class Legacy(nn.Module):
    """What older code saved: ``weight`` stored (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))


class Renamed(nn.Module):
    """Current code: ``w`` (out, in); a pre-hook renames and transposes a legacy ``weight``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in))
        self._register_load_state_dict_pre_hook(self._upgrade)

    def _upgrade(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix + "weight" in state:
            state[prefix + "w"] = state.pop(prefix + "weight").t()


class PostHooked(nn.Linear):
    """Records, in a load post-hook, a value computed from what was loaded."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.seen: list[bytes] = []
        self.register_load_state_dict_post_hook(
            lambda m, keys: m.seen.append(m.weight.detach().sum().reshape(1).view(torch.uint8).numpy().tobytes())
        )


class WithExtra(nn.Module):
    def __init__(self, n: int, kind: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.kind = kind
        self.value: Any = {"step": int(torch.randint(0, 100, ()))} if kind == 0 else torch.randn(n)

    def get_extra_state(self) -> Any:
        return self.value if self.kind != 2 else {"scale": self.value * 2 if isinstance(self.value, torch.Tensor) else torch.ones(1)}

    def set_extra_state(self, state: Any) -> None:
        self.value = state


class Tied(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.a = nn.Linear(n, n, bias=False)
        self.b = nn.Linear(n, n, bias=False)
        self.b.weight = self.a.weight


@dataclass(frozen=True)
class Block:
    kind: str
    n: int
    variant: int  # conv: channels-last target; extra: value kind; linear: non-contiguous target


@dataclass(frozen=True)
class Case:
    blocks: tuple[Block, ...]
    target: str  # "normal", "inference", "empty"
    old_state_dict: bool  # checkpoint saved as a state dict without num_batches_tracked
    mutated: int | None  # index of a block built with another shape in the target


def _block(block: Block, *, source: bool, mutate: bool) -> nn.Module:
    n = block.n + (1 if mutate else 0)
    kind = block.kind
    if kind == "linear":
        m = nn.Linear(block.n, n)
        if not source and block.variant and m.weight.device.type != "meta":
            m.weight = nn.Parameter(torch.empty(block.n, n).t())  # non-contiguous target
        return m
    if kind == "conv":
        c = nn.Conv2d(block.n, n, 2)
        if not source and block.variant:
            c.weight = nn.Parameter(c.weight.detach().contiguous(memory_format=torch.channels_last))
        return c
    if kind == "bn":
        return nn.BatchNorm1d(n)
    if kind == "lazy":
        return nn.Linear(block.n, n) if source else nn.LazyLinear(n)
    if kind == "renamed":
        return Legacy(block.n, n) if source else Renamed(block.n, n)
    if kind == "posthook":
        return PostHooked(block.n, n)
    if kind == "extra":
        return WithExtra(n, block.variant % 3)
    return Tied(n)


def _model(case: Case, *, source: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    blocks = [_block(b, source=source, mutate=not source and case.mutated == i) for i, b in enumerate(case.blocks)]
    model = nn.Sequential(*blocks)
    if source:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if b.dtype.is_floating_point:
                    b.normal_()
                elif name.endswith("num_batches_tracked"):
                    b.fill_(seed % 1000)
    return model


@st.composite
def cases(draw: st.DrawFn) -> Case:
    blocks = tuple(
        Block(draw(st.sampled_from(KINDS)), draw(st.integers(1, 4)), draw(st.integers(0, 2)))
        for _ in range(draw(st.integers(1, 4)))
    )
    old = draw(st.booleans()) and not any(b.kind == "extra" for b in blocks)
    if old and not any(b.kind == "bn" for b in blocks):
        blocks += (Block("bn", draw(st.integers(1, 4)), 0),)
    target = draw(st.sampled_from(["normal", "inference", "empty"]))
    mutated = draw(st.none() | st.integers(0, len(blocks) - 1)) if draw(st.integers(0, 3)) == 0 else None
    return Case(blocks, target, old, mutated)


def _build_target(case: Case, seed: int, *, empty: bool) -> nn.Module:
    if case.target == "inference":
        with torch.inference_mode():
            return _model(case, source=False, seed=seed)
    if empty:
        with mc.init_empty():
            return _model(case, source=False, seed=seed)
    return _model(case, source=False, seed=seed)


def _state(module: nn.Module) -> dict[str, Any]:
    """Everything load can change: each value's bytes, dtype, class and grad flag; ties; extra state; post-hook records."""
    out: dict[str, Any] = {}
    sd = module.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    for k, v in sd.items():
        if is_lazy(v):
            out[k] = ("lazy", id(v))
        elif isinstance(v, torch.Tensor) and not v.is_meta:
            flat = v.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
            out[k] = (type(v).__name__, v.dtype, tuple(v.shape), v.requires_grad, flat.view(torch.uint8).numpy().tobytes())
            out[k + "#tie"] = first.setdefault(v.data_ptr(), k) if v.numel() else k
        elif isinstance(v, torch.Tensor):
            out[k] = ("meta", v.dtype, tuple(v.shape))
        else:
            out[k] = repr(v)
    for path, sub in module.named_modules():
        if isinstance(sub, PostHooked):
            out[path + "#seen"] = list(sub.seen)
        if isinstance(sub, WithExtra):
            out[path + "#extra"] = repr(sub.value)
    return out


@given(case=cases(), seed=seeds())
def test_load_is_torchs_load_state_dict_or_a_typed_refusal(case: Case, seed: int, tmp_path_factory: Any) -> None:
    """Torch succeeds: the same state bit for bit. Torch fails or we refuse: ManifestCkptError, module unchanged."""
    source = _model(case, source=True, seed=seed)
    state = source.state_dict()
    if case.old_state_dict:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    event(f"target: {case.target}, old: {case.old_state_dict}, mutated: {case.mutated is not None}")
    for b in case.blocks:
        event(f"block: {b.kind}")
    mode = torch.inference_mode() if case.target == "inference" else contextlib.nullcontext()

    theirs = _build_target(case, seed + 1, empty=False)
    torch_error: Exception | None = None
    with mode:
        try:
            theirs.load_state_dict(state, strict=True)
        except (RuntimeError, ValueError) as exc:
            torch_error = exc

    ours = _build_target(case, seed + 1, empty=case.target == "empty")
    before = _state(ours)
    with scratch(tmp_path_factory) as tmp:
        if case.old_state_dict:
            mc.save(state, tmp / "ck", record_code=False)
        else:
            mc.save(source, tmp / "ck", record_code=False)
        with mode:
            try:
                mc.load(ours, tmp / "ck", check_classes=False)
                our_error: Exception | None = None
            except mc.ManifestCkptError as exc:
                our_error = exc
    if our_error is not None:
        assert _state(ours) == before, our_error
        event(f"refused ({'torch failed too' if torch_error else 'torch succeeded'}): {type(our_error).__name__}")
        # We refuse only for a reason: torch failed, or the shapes differ (the mutation).
        assert torch_error is not None or case.mutated is not None, our_error
    else:
        assert torch_error is None, f"torch refused ({torch_error}), we loaded"
        assert _state(ours) == _state(theirs)
    record_example()
