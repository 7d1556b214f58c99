"""Meta-device init that works (issue 10, item 4): ``mc.init_empty`` and meta tensors never left silently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from tests._hf import llama, llama_config

transformers = pytest.importorskip("transformers")


# Linear RoPE scaling: its inv_freq buffer is computed at construction, not loaded.
_ROPE = {"vocab_size": 96, "max_position_embeddings": 64, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}


def _config() -> object:
    return llama_config(**_ROPE)


def _llama() -> nn.Module:
    return llama(0, **_ROPE)  # type: ignore[no-any-return]


def test_a_llama_built_inside_init_empty_is_usable_after_load(tmp_path: Path) -> None:
    saved = _llama()
    mc.save(saved, tmp_path / "ck")
    with mc.init_empty():
        empty = transformers.LlamaForCausalLM(_config()).eval()
    assert all(p.is_meta for p in empty.parameters())
    assert not any(b.is_meta for n, b in empty.named_buffers() if n.endswith("inv_freq"))
    result = mc.load(empty, tmp_path / "ck")
    assert result.materialized == sorted(saved.state_dict())
    normal = _llama()
    mc.load(normal, tmp_path / "ck")
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(empty(ids).logits, normal(ids).logits)
    assert nn.Module.register_parameter.__name__ == "register_parameter"


def test_rotary_buffers_left_on_meta_are_refused_before_any_copy(tmp_path: Path) -> None:
    mc.save(_llama(), tmp_path / "ck")
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(_config())
    with pytest.raises(mc.UnsupportedTensorError) as info:
        mc.load(meta, tmp_path / "ck")
    message = str(info.value)
    assert message.startswith(
        "2 non-persistent buffers of the module are on the meta device and the checkpoint does not fill them: "
        "model.rotary_emb.inv_freq, model.rotary_emb.original_inv_freq."
    )
    assert "mc.init_empty()" in message
    assert all(p.is_meta for p in meta.parameters())


def test_a_meta_key_allowed_missing_is_refused_too(tmp_path: Path) -> None:
    mc.save({"0.weight": torch.ones(2, 2), "0.bias": torch.ones(2)}, tmp_path / "ck")
    with torch.device("meta"):
        target = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(mc.UnsupportedTensorError, match=r"^2 tensors of the module .*: 1\.bias, 1\.weight\."):
        mc.load(target, tmp_path / "ck", allow_missing=[r"1\..*"])
    assert target[0].weight.is_meta


def test_init_empty_keeps_parameter_classes_and_restores_torch() -> None:
    register = nn.Module.register_parameter
    with mc.init_empty():
        lin = nn.Linear(3, 2)
        lin.register_buffer("steps", torch.zeros(1))
        lin.register_buffer("cache", torch.ones(2), persistent=False)
    assert nn.Module.register_parameter is register
    assert type(lin.weight) is nn.Parameter and lin.weight.is_meta and lin.weight.requires_grad
    assert lin.steps.is_meta and torch.equal(lin.cache, torch.ones(2))
    assert not nn.Linear(3, 2).weight.is_meta
