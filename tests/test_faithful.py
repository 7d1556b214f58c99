"""Faithful, all-or-nothing loads (issue 10): what torch's load_state_dict does, or a typed refusal before any copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt import reader


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))


def _bits(module: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() for k, v in module.state_dict().items()}


def test_inference_mode_target_outside_inference_mode_is_refused_before_any_copy_as_torch_refuses(
    tmp_path: Path,
) -> None:
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    with torch.inference_mode():
        ours, theirs = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)), _net()
        theirs.load_state_dict(ours.state_dict())
    before = _bits(ours)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        theirs.load_state_dict(saved.state_dict())
    with pytest.raises(mc.UnsupportedTensorError) as info:
        mc.load(ours, tmp_path / "ck")
    assert "0.weight, 0.bias, 1.weight, 1.bias, 2.weight, 2.bias (6 in all)" in str(info.value)
    assert _bits(ours) == before


def test_inference_mode_target_inside_inference_mode_loads_as_torch_does(tmp_path: Path) -> None:
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    with torch.inference_mode():
        ours = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
        theirs = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
        theirs.load_state_dict(saved.state_dict())
        result = mc.load(ours, tmp_path / "ck")
    assert result.loaded == sorted(saved.state_dict())
    assert _bits(ours) == _bits(theirs) == _bits(saved)
    assert all(p.is_inference() for p in ours.parameters())


def test_normal_target_loaded_inside_inference_mode_equals_torch(tmp_path: Path) -> None:
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    ours, theirs = _net(), _net()
    with torch.no_grad():
        for p in (*ours.parameters(), *theirs.parameters()):
            p.zero_()
    with torch.inference_mode():
        theirs.load_state_dict(saved.state_dict())
        mc.load(ours, tmp_path / "ck")
    assert _bits(ours) == _bits(theirs) == _bits(saved)
    assert not any(p.is_inference() for p in ours.parameters())


def _failing_fill(monkeypatch: pytest.MonkeyPatch, after: int, exc: BaseException) -> None:
    """Make the copy phase fail inside the ``after``-th copy, once that copy has written its target."""
    real = reader._fill
    calls = {"n": 0}

    def fill(target: torch.Tensor, *args: Any) -> None:
        real(target, *args)
        calls["n"] += 1
        if calls["n"] == after:
            raise exc

    monkeypatch.setattr(reader, "_fill", fill)


@pytest.mark.parametrize("after", [1, 3, 6])
def test_a_failure_mid_copy_restores_every_tensor_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    torch.manual_seed(1)
    target = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    # One non-contiguous target (the clone path), one NaN with a payload (bits, not values, are restored).
    target[0].weight = nn.Parameter(torch.randn(4, 3).t())
    with torch.no_grad():
        target[2].bias.view(torch.int32)[0] = 0x7FC00123
    before = _bits(target)
    _failing_fill(monkeypatch, after, OSError("simulated read error"))
    with pytest.raises(mc.LoadAbortedError, match="simulated read error") as info:
        mc.load(target, tmp_path / "ck")
    assert info.value.key == list(target.state_dict())[after - 1]
    assert _bits(target) == before
    assert not target[0].weight.is_contiguous()


def test_the_failing_key_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    target = _net()
    order = [k for k in target.state_dict()]
    _failing_fill(monkeypatch, 2, RuntimeError("boom"))
    with pytest.raises(mc.LoadAbortedError) as info:
        mc.load(target, tmp_path / "ck")
    assert info.value.key == order[1]
    assert f"copying {order[1]!r} into the module failed (RuntimeError: boom)" in str(info.value)


def test_ctrl_c_mid_copy_restores_and_is_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    torch.manual_seed(2)
    target = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    before = _bits(target)
    _failing_fill(monkeypatch, 4, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        mc.load(target, tmp_path / "ck")
    assert _bits(target) == before
    monkeypatch.undo()
    mc.load(target, tmp_path / "ck")
    assert _bits(target) == _bits(saved)
