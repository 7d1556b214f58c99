"""MoE layouts end to end: save_pretrained's per-expert keys into fused-expert models (convert, load, check) and back (export_hf)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import manifest_ckpt as mc
from manifest_ckpt import cli
from manifest_ckpt.errors import ModelMismatchError, TransformError
from tests._models import assert_bitwise_equal, snapshot

T = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2),
                "model.layers.0.block_sparse_moe.experts.3.w3.weight"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16), "model.layers.0.mlp.experts.3.up_proj.weight"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
                  "model.layers.0.mlp.experts.3.up_proj.weight"),
}
# DeepSeek: transformers maps deepseek_v2/v3 onto qwen2_moe's rules; layer 0 stays dense here.
_DEEPSEEK = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                 n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                 v_head_dim=8, n_group=2, topk_group=1, num_key_value_heads=4)
for _v in ("2", "3"):
    FAMILIES[f"deepseek_v{_v}"] = (f"DeepseekV{_v}Config", f"DeepseekV{_v}ForCausalLM", _DEEPSEEK,
                                   "model.layers.1.mlp.experts.3.up_proj.weight")


def build(family: str, seed: int) -> Any:
    config_name, model_name, extra, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return getattr(T, model_name)(getattr(T, config_name)(**{**COMMON, **extra})).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_pretrained_experts_convert_into_fused_modules_bit_identical(tmp_path: Path, family: str) -> None:
    """Per-expert keys are stacked and concatenated as transformers does; the load equals the original."""
    model = build(family, 0)
    model.save_pretrained(tmp_path / "hf")
    manifest = mc.convert(tmp_path / "hf", tmp_path / "ck", module=build(family, 1))
    transforms = manifest.lineage["source"]["transforms"]
    expected_set = "mixtral" if family == "mixtral" else "qwen2_moe"
    moe_layers = 1 if family.startswith("deepseek") else 2
    assert transforms["rule_set"] == expected_set and transforms["built_keys"] == 2 * moe_layers
    assert [r["op"] for r in transforms["rules"]][-3:] == ["stack", "concat", "stack"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in manifest.tensors
    fresh = build(family, 2)
    mc.load(fresh, tmp_path / "ck", verify_digests=True)
    assert_bitwise_equal(snapshot(fresh), snapshot(model))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_a_missing_expert_is_refused_naming_the_fused_key(tmp_path: Path, family: str) -> None:
    """An expert absent from one projection stops the conversion before anything is written; check's hint says why."""
    from safetensors.torch import load_file, save_file

    model = build(family, 0)
    model.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(path)
    del state[FAMILIES[family][3]]
    save_file(state, path, metadata={"format": "pt"})
    layer = FAMILIES[family][3].split(".")[2]
    fused = f"model.layers.{layer}.mlp.experts.gate_up_proj"
    with pytest.raises(TransformError, match=rf"{re.escape(fused)}.*stack of 3 keys, indices \[0, 1, 2\]") as info:
        mc.convert(tmp_path / "hf", tmp_path / "ck", module=build(family, 1))
    assert info.value.key == fused
    assert not (tmp_path / "ck").exists()
    mc.convert(tmp_path / "hf", tmp_path / "plain")  # no module: kept as stored
    report = mc.check(build(family, 1), tmp_path / "plain")
    assert report.suggested_transforms is None and fused in report.hints[0] and "do not fit" in report.hints[0]


def test_without_a_module_the_experts_are_kept_as_stored(tmp_path: Path) -> None:
    """No module, no layout to aim at: keys are converted as they are, no transforms recorded."""
    model = build("qwen3_moe", 0)
    model.save_pretrained(tmp_path / "hf")
    manifest = mc.convert(tmp_path / "hf", tmp_path / "ck")
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in manifest.tensors
    assert "transforms" not in manifest.lineage["source"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converted_moe_exports_and_from_pretrained_round_trips(tmp_path: Path, family: str) -> None:
    """save_pretrained -> convert -> export_hf -> from_pretrained leaves the original state bit for bit."""
    model = build(family, 0)
    model.save_pretrained(tmp_path / "hf")
    mc.convert(tmp_path / "hf", tmp_path / "ck", module=build(family, 1))
    mc.export_hf(tmp_path / "ck", tmp_path / "out")
    model.config.save_pretrained(tmp_path / "out")
    reloaded = type(model).from_pretrained(tmp_path / "out").eval()
    assert_bitwise_equal(snapshot(reloaded), snapshot(model))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_splits_fused_experts_back_exactly_as_save_pretrained(tmp_path: Path, family: str) -> None:
    """A fused-expert checkpoint exports per-expert keys: model.safetensors byte-identical to save_pretrained's."""
    model = build(family, 0)
    mc.save(model, tmp_path / "ck", record_code=False)
    result = mc.export_hf(tmp_path / "ck", tmp_path / "out", record_digest=False)
    model.save_pretrained(tmp_path / "hf")
    assert result.unfused == ("mixtral" if family == "mixtral" else "qwen2_moe",)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "hf" / "model.safetensors").read_bytes()
    sharded = mc.export_hf(tmp_path / "ck", tmp_path / "sharded", max_shard_size="30KB")
    assert len(sharded.files) > 1 and FAMILIES[family][3] in sharded.weight_map
    model.config.save_pretrained(tmp_path / "sharded")
    reloaded = type(model).from_pretrained(tmp_path / "sharded").eval()
    assert_bitwise_equal(snapshot(reloaded), snapshot(model))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_check_hints_the_rule_set_and_load_applies_it_bit_identical(tmp_path: Path, family: str) -> None:
    """Per-expert keys vs fused experts: check names the rule set (text and JSON); load with it equals the original."""
    model = build(family, 0)
    model.save_pretrained(tmp_path / "hf")
    mc.convert(tmp_path / "hf", tmp_path / "ck")  # no module: per-expert keys kept as stored
    expected = "mixtral" if family == "mixtral" else "qwen2_moe"
    report = mc.check(build(family, 1), tmp_path / "ck")
    assert not report.ok and report.suggested_transforms == expected
    assert f"transforms={expected!r} (CLI: --transforms {expected})" in str(report)
    assert report.to_dict()["suggested_transforms"] == expected
    with pytest.raises(ModelMismatchError):
        mc.load(build(family, 2), tmp_path / "ck")
    assert mc.check(build(family, 1), tmp_path / "ck", transforms=expected).ok
    fresh = build(family, 2)
    result = mc.load(fresh, tmp_path / "ck", transforms=family, verify_digests=True)
    assert "model.layers.1.mlp.experts.gate_up_proj" in result.loaded
    assert_bitwise_equal(snapshot(fresh), snapshot(model))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_load_with_transforms_into_a_meta_module_materialises_bit_identical(tmp_path: Path) -> None:
    """A meta-device fused module is built from per-expert keys: every state_dict tensor equals the original."""
    model = build("qwen3_moe", 0)
    model.save_pretrained(tmp_path / "hf")
    mc.convert(tmp_path / "hf", tmp_path / "ck")
    # mc.init_empty, not torch.device("meta"): the rotary inv_freq (non-persistent) must be real.
    with mc.init_empty():
        empty = build("qwen3_moe", 1)
    result = mc.load(empty, tmp_path / "ck", transforms="qwen3_moe")
    assert "model.layers.0.mlp.experts.down_proj" in result.materialized
    theirs, ours = model.state_dict(), empty.state_dict()
    assert_bitwise_equal(dict(ours), dict(theirs))


def test_wrong_rule_set_is_refused_naming_the_rule_and_nothing_is_loaded(tmp_path: Path) -> None:
    """transforms='mixtral' on Qwen keys: TransformError (matches no key), the module unchanged."""
    model = build("qwen3_moe", 0)
    model.save_pretrained(tmp_path / "hf")
    mc.convert(tmp_path / "hf", tmp_path / "ck")
    fresh = build("qwen3_moe", 1)
    before = snapshot(fresh)
    with pytest.raises(TransformError, match=r"Rename\(.*block_sparse_moe.*matches no key") as info:
        mc.load(fresh, tmp_path / "ck", transforms="mixtral")
    assert info.value.unmatched
    assert_bitwise_equal(snapshot(fresh), before)
    with pytest.raises(TransformError, match="no such rule set; known: deepseek_v2, deepseek_v3, mixtral"):
        mc.check(fresh, tmp_path / "ck", transforms="llama")


def test_cli_check_json_suggests_and_convert_flag_applies(tmp_path: Path) -> None:
    """check --json carries suggested_transforms; convert --transforms without a module fuses the keys."""
    model = build("mixtral", 0)
    model.save_pretrained(tmp_path / "hf")
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(["convert", str(tmp_path / "hf"), str(tmp_path / "ck"), "--transforms", "mixtral", "--json"],
                   stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    manifest = mc.read_manifest(tmp_path / "ck")
    assert "model.layers.0.mlp.experts.gate_up_proj" in manifest.tensors
    assert manifest.lineage["source"]["transforms"]["rule_set"] == "mixtral"
    fresh = build("mixtral", 1)
    mc.load(fresh, tmp_path / "ck")
    assert_bitwise_equal(snapshot(fresh), snapshot(model))
    mc.convert(tmp_path / "hf", tmp_path / "plain")
    (tmp_path / "factory.py").write_text(
        "import transformers as T\n"
        f"def make():\n    return T.MixtralForCausalLM(T.MixtralConfig(**{COMMON!r}, num_local_experts=4, "
        "num_experts_per_tok=2))\n"
    )
    model_arg = f"{tmp_path / 'factory.py'}:make"
    out = io.StringIO()
    code = cli.run(["check", str(tmp_path / "plain"), "--model", model_arg, "--json"], stdout=out, stderr=err)
    doc = json.loads(out.getvalue())
    assert code == 1 and doc["suggested_transforms"] == "mixtral" and "--transforms mixtral" in doc["hints"][0]
    out = io.StringIO()
    code = cli.run(["check", str(tmp_path / "plain"), "--model", model_arg, "--transforms", "mixtral"],
                   stdout=out, stderr=err)
    assert code == 0 and out.getvalue().startswith("OK"), err.getvalue()
