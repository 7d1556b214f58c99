"""convert takes load's key policies (issue 10, item 9): strict, allow_missing, allow_unexpected, untie, tie."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt import cli
from manifest_ckpt.errors import ConversionError, ModelMismatchError, PatternError
from manifest_ckpt.sources.convert import convert
from tests._models import assert_bitwise_equal, snapshot


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(4, 12)


class Gpt2(nn.Module):
    """transformers' GPT-2 today: no attn.bias / attn.masked_bias buffers in the state dict."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.wte = nn.Embedding(8, 4)
        self.h = nn.ModuleList(nn.ModuleDict({"attn": Attn()}) for _ in range(3))
        self.lm_head = nn.Linear(4, 8, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight


def old_gpt2_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A pytorch_model.bin as old transformers wrote it: causal-mask buffers per layer, head omitted."""
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in Gpt2().state_dict().items() if k != "lm_head.weight"}
    for i in range(3):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 4, 4))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    return path, state


def test_old_gpt2_masked_bias_is_refused_with_the_allow_pattern(tmp_path: Path) -> None:
    """Without a policy nothing is written; the hint names one pattern per buffer."""
    src, _ = old_gpt2_file(tmp_path)
    with pytest.raises(ModelMismatchError) as info:
        convert(src, tmp_path / "ck", module=Gpt2())
    report = info.value.report
    assert sorted(p.key for p in report.problems) == sorted(
        f"h.{i}.attn.{b}" for i in range(3) for b in ("bias", "masked_bias")
    )
    assert any(
        r"allow_unexpected=['h\\.\\d+\\.attn\\.bias', 'h\\.\\d+\\.attn\\.masked_bias']" in h for h in report.hints
    )
    assert not (tmp_path / "ck").exists()


def test_old_gpt2_converts_with_allow_unexpected_and_loads_as_torch_does(tmp_path: Path) -> None:
    """The buffers are left out (and said so); the tied head is restored; load matches load_state_dict."""
    src, state = old_gpt2_file(tmp_path)
    patterns = [r"h\.\d+\.attn\.bias", r"h\.\d+\.attn\.masked_bias"]
    manifest = convert(src, tmp_path / "ck", module=Gpt2(), allow_unexpected=patterns)
    assert sorted(manifest.keys()) == sorted(
        ["wte.weight", "lm_head.weight", *(f"h.{i}.attn.c_attn.{p}" for i in range(3) for p in ("weight", "bias"))]
    )
    assert manifest.aliases == {"lm_head.weight": "wte.weight"}
    source = manifest.lineage["source"]
    assert [(e["path"], e["tensors"], e["bytes"]) for e in source["left_out"]] == [
        (rf"allow_unexpected {patterns[0]}", 3, 3 * 64),
        (rf"allow_unexpected {patterns[1]}", 3, 3 * 4),
    ]
    assert sorted(a["key"] for a in source["allowed"]) == sorted(
        f"h.{i}.attn.{b}" for i in range(3) for b in ("bias", "masked_bias")
    )
    module = Gpt2()
    mc.load(module, tmp_path / "ck")  # strict: the checkpoint is the module's now
    expected = Gpt2()
    expected.load_state_dict(state, strict=False)
    assert_bitwise_equal(snapshot(module), snapshot(expected))


def test_lightning_teacher_beside_student_converts_with_a_remap_and_allow_unexpected(tmp_path: Path) -> None:
    """A distillation checkpoint: net.* is the model, teacher.* is left out."""
    torch.manual_seed(1)
    student, teacher = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)), nn.Linear(3, 7)
    state = {f"net.{k}": v for k, v in student.state_dict().items()}
    state.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
    src = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 30}, src)
    with pytest.raises(ModelMismatchError) as info:
        convert(src, tmp_path / "ck", module=nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)),
                remap={r"^net\.": ""})
    assert any(r"allow_unexpected=['teacher\\.bias', 'teacher\\.weight']" in h for h in info.value.report.hints)
    target = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    manifest = convert(src, tmp_path / "ck", module=target, remap={r"^net\.": ""}, allow_unexpected=[r"teacher\..*"])
    assert sorted(manifest.tensors) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert manifest.metadata == {"epoch": 3, "global_step": 30}
    mc.load(target, tmp_path / "ck")
    assert_bitwise_equal(snapshot(target), snapshot(student))


def test_allow_missing_and_strict_false_write_what_the_source_has(tmp_path: Path) -> None:
    """Missing module keys stay absent and are listed; load needs the same allowance."""
    torch.manual_seed(2)
    state = {k: v for k, v in nn.Linear(2, 2).state_dict().items() if k != "bias"}
    src = tmp_path / "w.pt"
    torch.save(state, src)
    manifest = convert(src, tmp_path / "a", module=nn.Linear(2, 2), allow_missing=["bias"])
    assert list(manifest.tensors) == ["weight"]
    assert manifest.lineage["source"]["allowed"] == [
        {"kind": "missing", "key": "bias", "by": "allow_missing bias", "detail": "not in the checkpoint; keeps its current value"}
    ]
    manifest = convert(src, tmp_path / "b", module=nn.Linear(2, 2), strict=False)
    assert [a["by"] for a in manifest.lineage["source"]["allowed"]] == ["strict=False"]
    with pytest.raises(ModelMismatchError):
        mc.load(nn.Linear(2, 2), tmp_path / "a")
    assert mc.load(nn.Linear(2, 2), tmp_path / "a", allow_missing=["bias"]).left_initial == ["bias"]


def test_untie_stores_a_source_tie_as_separate_copies(tmp_path: Path) -> None:
    """A tied source into a model that keeps the head separate: refused, then stored untied with --untie."""
    torch.manual_seed(3)
    src = tmp_path / "tied.pt"
    tied = Gpt2(tied=True)
    torch.save(tied.state_dict(), src)  # both keys, one storage
    with pytest.raises(ModelMismatchError) as info:
        convert(src, tmp_path / "ck", module=Gpt2(tied=False))
    assert [(p.kind, p.key) for p in info.value.report.problems] == [("alias", "lm_head.weight")]
    manifest = convert(src, tmp_path / "ck", module=Gpt2(tied=False), untie=True)
    assert manifest.aliases == {}
    assert [(a["key"], a["by"]) for a in manifest.lineage["source"]["allowed"]] == [("lm_head.weight", "untie=True")]
    module = Gpt2(tied=False)
    mc.load(module, tmp_path / "ck")
    expected = Gpt2(tied=False)
    expected.load_state_dict(tied.state_dict())
    assert_bitwise_equal(snapshot(module), snapshot(expected))


def test_tie_stores_the_first_value_once(tmp_path: Path) -> None:
    """Different values for a module tie: refused, then wte.weight's kept and lm_head.weight's dropped with --tie."""
    torch.manual_seed(4)
    state = {k: v.detach().clone() for k, v in Gpt2(tied=False).state_dict().items()}
    src = tmp_path / "untied.pt"
    torch.save(state, src)
    with pytest.raises(ModelMismatchError):
        convert(src, tmp_path / "ck", module=Gpt2())
    manifest = convert(src, tmp_path / "ck", module=Gpt2(), tie=True)
    assert manifest.aliases == {"lm_head.weight": "wte.weight"}
    assert [(a["key"], a["by"]) for a in manifest.lineage["source"]["allowed"]] == [("lm_head.weight", "tie=True")]
    module = Gpt2()
    mc.load(module, tmp_path / "ck")
    assert torch.equal(module.lm_head.weight, state["wte.weight"])


def test_policies_without_a_module_and_bad_patterns_are_typed_errors(tmp_path: Path) -> None:
    src = tmp_path / "w.pt"
    torch.save(nn.Linear(2, 2).state_dict(), src)
    with pytest.raises(ConversionError, match="pass module="):
        convert(src, tmp_path / "ck", allow_missing=["bias"])
    with pytest.raises(PatternError) as info:
        convert(src, tmp_path / "ck", module=nn.Linear(2, 2), allow_unexpected=["("])
    assert info.value.argument == "allow_unexpected"
    assert not (tmp_path / "ck").exists()


def test_cli_convert_takes_the_policy_flags(tmp_path: Path) -> None:
    """--allow-unexpected on the command line converts the old GPT-2 file and says what it left out."""
    src, _ = old_gpt2_file(tmp_path)
    factory = tmp_path / "model.py"
    factory.write_text(
        "from tests.test_convert_policies import Gpt2\n\ndef build():\n    return Gpt2()\n", encoding="utf-8"
    )
    out, err = io.StringIO(), io.StringIO()
    argv = ["convert", str(src), str(tmp_path / "ck"), "--model", f"{factory}:build", "--quiet"]
    assert cli.run(argv, out, err) == 1
    assert "--allow-unexpected 'h\\.\\d+\\.attn\\.masked_bias'" in err.getvalue()
    flags = ["--allow-unexpected", r"h\.\d+\.attn\.bias", "--allow-unexpected", r"h\.\d+\.attn\.masked_bias"]
    out, err = io.StringIO(), io.StringIO()
    assert cli.run([*argv, *flags], out, err) == 0, err.getvalue()
    text = out.getvalue()
    assert r"3 unexpected by allow_unexpected h\.\d+\.attn\.masked_bias: h.0.attn.masked_bias" in text
    out = io.StringIO()
    assert cli.run([*argv, *flags, "--json", "--overwrite"], out, io.StringIO()) == 0
    doc = json.loads(out.getvalue())
    assert len(doc["source"]["allowed"]) == 6
