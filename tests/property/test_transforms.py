"""Property 7: declarative transforms build what torch.stack/cat/transpose build, invert exactly, and load bit-exact."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.assemble import build, fill
from manifest_ckpt.comparison.transforms import Concatenate, Rule, Stack, Transpose, inverse, simulate

from .strategies import record_example, scratch, seeds

DTYPES = ("float32", "bfloat16", "float16", "int8", "float8_e4m3fn", "int64", "bool")


@st.composite
def layouts(draw: Any) -> tuple[dict[str, torch.Tensor], list[Rule], dict[str, torch.Tensor]]:
    """Groups of per-index keys ``g{n}.e.{i}.a/b``, the rules that fuse them, and the fused values torch gives."""
    seed = draw(seeds())
    gen = torch.Generator().manual_seed(seed)
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim)))
    dtype = getattr(torch, draw(st.sampled_from(DTYPES)))
    groups, count = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    stack_dim = draw(st.integers(0, ndim))
    cat_dim = draw(st.integers(0, ndim))
    swap = draw(st.none() | st.tuples(st.integers(0, ndim), st.integers(0, ndim)))
    size = torch.Size(shape).numel() * dtype.itemsize
    state, expected = {}, {}
    for g in range(groups):
        parts = {}
        for p in ("a", "b"):
            items = []
            for i in range(count):
                raw = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen)
                if dtype is torch.bool:
                    raw = raw % 2
                t = raw.view(dtype).reshape(shape)
                state[f"g{g}.e.{i}.{p}"] = t
                items.append(t)
            parts[p] = torch.stack(items, dim=stack_dim)
        fused = torch.cat([parts["a"], parts["b"]], dim=cat_dim)
        expected[f"g{g}.e.ab"] = fused.transpose(*swap) if swap else fused
    rules: list[Rule] = [
        Stack("{g}.e.{index}.a", "{g}.e.a", stack_dim),
        Stack("{g}.e.{index}.b", "{g}.e.b", stack_dim),
        Concatenate(("{g}.e.a", "{g}.e.b"), "{g}.e.ab", cat_dim),
    ]
    if swap:
        rules.append(Transpose("{g}.e.ab", None, swap))
    return state, rules, expected


def raw(t: torch.Tensor) -> bytes:
    fresh = torch.empty(t.shape, dtype=t.dtype).copy_(t) if t.dtype is not torch.bool else t.clone()
    return bytes(fresh.reshape(-1).view(torch.uint8).tolist())


def module_for(state: dict[str, torch.Tensor]) -> nn.Module:
    root = nn.Module()
    for key, t in state.items():
        *path, name = key.split(".")
        m = root
        for p in path:
            if not hasattr(m, p):
                m.add_module(p, nn.Module())
            m = getattr(m, p)
        m.register_buffer(name, torch.zeros_like(t))
    return root


@given(layout=layouts())
def test_transforms_match_torch_invert_and_load_bit_exact(layout: Any, tmp_path_factory: Any) -> None:
    """Simulated shapes hold; values equal torch.stack/cat/transpose; the inverse restores every key; load fills the same bits."""
    state, rules, expected = layout
    specs = {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in state.items()}
    view = simulate(specs, rules)
    assert set(view) == set(expected)
    built = {k: build(n, state.__getitem__) for k, n in view.items()}
    for key, t in expected.items():
        assert view[key].shape == tuple(t.shape) and raw(built[key]) == raw(t), key
        out = torch.empty(view[key].shape, dtype=t.dtype)
        fill(out, view[key], lambda region, k: region.copy_(state[k]), state.__getitem__)
        assert raw(out) == raw(t), key
    back_view = simulate({k: (n.dtype, n.shape) for k, n in view.items()}, inverse(rules))
    back = {k: build(n, built.__getitem__) for k, n in back_view.items()}
    assert back.keys() == state.keys() and all(raw(back[k]) == raw(state[k]) for k in state)
    with scratch(tmp_path_factory) as tmp:
        mc.save(state, tmp / "ck", record_code=False)
        target = module_for(expected)
        mc.load(target, tmp / "ck", transforms=rules)
        loaded = dict(target.state_dict())
        assert all(raw(loaded[k]) == raw(t) for k, t in expected.items())
    record_example()
