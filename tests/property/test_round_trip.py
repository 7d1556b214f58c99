"""Property 1: save then load into a fresh instance is bit-exact and keeps ties."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import manifest_ckpt as mc
from manifest_ckpt.comparison.introspect import capture

from .strategies import (
    Arch,
    architectures,
    build,
    non_persistent,
    overlaps,
    record_example,
    scratch,
    seeds,
    snapshot,
    state_bytes,
)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    return (
        not a.is_meta
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.stride() == b.stride()
        and a.shape == b.shape
    )


@given(
    arch=architectures(expanded=True),
    seed=seeds(),
    meta=st.booleans(),
    max_file_size=st.none() | st.integers(1, 256),
    verify_digests=st.booleans(),
)
def test_round_trip_is_bit_exact_and_keeps_ties(
    arch: Arch, seed: int, meta: bool, max_file_size: int | None, verify_digests: bool, tmp_path_factory: Any
) -> None:
    """Every key loads bit-exact, tied keys share one tensor after load, non-persistent buffers stay.

    A module holding an expanded view (which copy_ cannot write) is refused before any copy,
    and so is a meta module whose non-persistent buffers the load would leave on meta.
    """
    source = build(arch, seed=seed)
    target = build(arch, seed=seed, invert=True, meta=meta)
    keys = list(source.state_dict(keep_vars=True))
    aliases = capture(source).aliases
    untouched = non_persistent(target)
    expanded = [k for k, t in target.state_dict(keep_vars=True).items() if overlaps(t) and not meta]
    event(f"meta: {meta}, ties: {bool(aliases)}, expanded views: {bool(expanded)}")
    with scratch(tmp_path_factory) as tmp:
        mc.save(source, tmp / "ckpt", max_file_size=max_file_size, record_code=False)
        if expanded:
            before = snapshot(target)
            with pytest.raises(mc.UnsupportedTensorError, match="expanded view"):
                mc.load(target, tmp / "ckpt", verify_digests=verify_digests)
            assert snapshot(target) == before
            record_example()
            return
        on_meta = sorted(untouched) if meta else []
        if on_meta:
            before = snapshot(target)
            with pytest.raises(mc.UnsupportedTensorError, match="non-persistent buffers of the module are on the meta") as info:
                mc.load(target, tmp / "ckpt", verify_digests=verify_digests)
            assert any(name in str(info.value) for name in on_meta)
            assert snapshot(target) == before
            record_example()
            return
        result = mc.load(target, tmp / "ckpt", verify_digests=verify_digests)

    assert state_bytes(target) == state_bytes(source)
    assert result.loaded == sorted(keys)
    assert result.retied == sorted(aliases)
    assert result.materialized == (sorted(keys) if meta else [])
    assert result.left_initial == [] and result.skipped == [] and result.cast == []
    state = target.state_dict(keep_vars=True)
    for alias, canonical in aliases.items():
        assert _same_view(state[alias], state[canonical]), (alias, canonical)
    assert capture(target).aliases == aliases
    assert not any(t.is_meta for t in state.values())
    for key, param in target.named_parameters(remove_duplicate=False):
        assert isinstance(param, torch.nn.Parameter), key
        assert param.requires_grad == (param.dtype.is_floating_point or param.dtype.is_complex), key
    assert non_persistent(target) == untouched
    record_example()
