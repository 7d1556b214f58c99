"""Tests of ``manifest_ckpt.exporters.hf``: what ``export_hf`` writes is what ``save_pretrained`` writes."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import manifest_ckpt as mc
from manifest_ckpt import cli
from manifest_ckpt.errors import CheckpointExistsError, ExportError, IntegrityError
from manifest_ckpt.exporters.hf import parse_shard_size, plan_shards
from tests._hf import llama

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def gpt2() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key].view(torch.uint8), sb[key].view(torch.uint8)), key


def export_and_reload(model: Any, tmp_path: Path, **options: Any) -> tuple[Any, Any, Path]:
    mc.save(model, tmp_path / "ck", record_code=False)
    out = tmp_path / "out"
    result = mc.export_hf(tmp_path / "ck", out, **options)
    model.config.save_pretrained(out)
    reloaded = type(model).from_pretrained(out).eval()
    return result, reloaded, out


def test_unsharded_gpt2_is_byte_identical_to_save_pretrained_and_reloads_tied(tmp_path: Path) -> None:
    """GPT-2 (tied head), record_digest=False: save_pretrained's exact bytes; from_pretrained re-ties it."""
    model = gpt2()
    result, reloaded, out = export_and_reload(model, tmp_path, record_digest=False)
    model.save_pretrained(tmp_path / "hf")
    assert result.files == ("model.safetensors",) and result.index is None
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "hf" / "model.safetensors").read_bytes()
    assert dict(result.dropped_ties) == {"lm_head.weight": "transformer.wte.weight"}
    assert_same_state(model, reloaded)
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_llama_index_matches_save_pretrained_and_reloads_bit_identical(tmp_path: Path, tied: bool) -> None:
    """Sharded Llama (tied and untied): names, index metadata and keys as save_pretrained; state bit-identical."""
    model = llama(1, tied=tied)
    result, reloaded, out = export_and_reload(model, tmp_path, max_shard_size="20KB")
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    ours = json.loads((out / "model.safetensors.index.json").read_text())
    theirs = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    digest = mc.read_manifest(tmp_path / "ck").digest
    assert ours["metadata"] == {**theirs["metadata"], "manifest_ckpt.digest": digest}
    assert set(ours["weight_map"]) == set(theirs["weight_map"])
    assert ("lm_head.weight" in ours["weight_map"]) is not tied
    count = len(result.files)
    assert count > 1 and result.files == tuple(f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1))
    assert set(ours["weight_map"].values()) == set(result.files)
    for name in result.files:
        with open(out / name, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            assert json.loads(f.read(length))["__metadata__"] == {"format": "pt", "manifest_ckpt.digest": digest}
    assert_same_state(model, reloaded)
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) is tied


def header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return length, json.loads(f.read(length))


def test_unsharded_export_records_the_digest_and_reloads_bit_identical(tmp_path: Path) -> None:
    """By default __metadata__ holds format=pt and the digest; only the header differs from save_pretrained's."""
    model = llama(1, tied=False)
    result, reloaded, out = export_and_reload(model, tmp_path)
    model.save_pretrained(tmp_path / "hf")
    ours, theirs = (out / "model.safetensors").read_bytes(), (tmp_path / "hf" / "model.safetensors").read_bytes()
    (n_ours, h_ours), (n_theirs, h_theirs) = header(out / "model.safetensors"), header(tmp_path / "hf" / "model.safetensors")
    assert h_ours.pop("__metadata__") == {"format": "pt", "manifest_ckpt.digest": result.digest}
    assert h_ours == {k: v for k, v in h_theirs.items() if k != "__metadata__"}
    assert ours[8 + n_ours :] == theirs[8 + n_theirs :]
    assert result.digest == mc.read_manifest(tmp_path / "ck").digest
    assert_same_state(model, reloaded)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_writer_lays_out_every_dtype_as_the_safetensors_library(tmp_path: Path) -> None:
    """Tensors of every storable dtype, names out of order: our bytes equal safetensors.torch.save's."""
    import safetensors.torch

    from manifest_ckpt.exporters.safetensors_file import OutTensor, write_safetensors
    from manifest_ckpt.format.dtypes import DTYPES

    torch.manual_seed(3)
    state = {}
    for i, dtype in enumerate(sorted(DTYPES)):
        raw = torch.randint(0, 256, (3 * (i % 3 + 1), 8), dtype=torch.uint8)
        state[f"t.{(i * 7) % len(DTYPES):02d}.{dtype}"] = raw.view(getattr(torch, dtype))
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    out = [OutTensor(k, str(t.dtype).removeprefix("torch."), tuple(t.shape), lambda t=t: t) for k, t in state.items()]
    write_safetensors(tmp_path / "ours.safetensors", out, {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == safetensors.torch.save(state, metadata={"format": "pt"})


def test_export_is_deterministic(tmp_path: Path) -> None:
    """Two exports of one checkpoint are byte-identical, file by file."""
    model = llama(1, tied=False)
    mc.save(model, tmp_path / "ck", record_code=False)
    for name in ("a", "b"):
        mc.export_hf(tmp_path / "ck", tmp_path / name, max_shard_size=30_000)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(files) > 2
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("text", ["5GB", "200MB", " 1.5 kb ", "3TB", "10KB"])
def test_shard_sizes_parse_as_huggingface_hub_does(text: str) -> None:
    """String sizes give huggingface_hub's byte counts."""
    assert parse_shard_size(text) == huggingface_hub.serialization._base.parse_size_to_int(text)


@pytest.mark.parametrize("bad", ["5 GiB", "GB", "-1KB", 0, 1.5, True])
def test_bad_shard_sizes_are_refused(bad: Any) -> None:
    """Unparseable or non-positive sizes raise ExportError naming the value."""
    with pytest.raises(ExportError, match="max_shard_size"):
        parse_shard_size(bad)


def test_shard_plan_is_huggingface_hubs() -> None:
    """Greedy in order, oversized tensors alone: the same split as split_torch_state_dict_into_shards."""
    sizes = [6, 6, 2, 6, 2, 2, 11, 1, 10, 3]
    state = {f"t{i:02d}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    split = huggingface_hub.split_torch_state_dict_into_shards(state, max_shard_size=10)
    expected = list(split.filename_to_tensors.values())
    assert plan_shards({k: t.numel() for k, t in state.items()}, 10) == expected


def test_existing_weights_are_refused_then_replaced_with_overwrite(tmp_path: Path) -> None:
    """Weights in DIR are kept unless overwrite; overwrite removes the stale shards of the old layout."""
    model = llama(1, tied=False)
    mc.save(model, tmp_path / "ck", record_code=False)
    out = tmp_path / "out"
    first = mc.export_hf(tmp_path / "ck", out, max_shard_size="20KB")
    (out / "config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        mc.export_hf(tmp_path / "ck", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    mc.export_hf(tmp_path / "ck", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert len(first.files) > 1


def test_damaged_checkpoint_is_refused_before_writing(tmp_path: Path) -> None:
    """A flipped byte in a weights file raises IntegrityError; DIR gets no weights."""
    model = gpt2()
    manifest = mc.save(model, tmp_path / "ck", record_code=False)
    weights = tmp_path / "ck" / next(iter(manifest.files))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        mc.export_hf(tmp_path / "ck", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(["export-hf", *argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_json_and_text_and_bad_size(tmp_path: Path) -> None:
    """--json reports files, index, ties and digest; a bad --max-shard-size exits 2."""
    manifest = mc.save(gpt2(), tmp_path / "ck", record_code=False)
    code, out, _ = run_cli([str(tmp_path / "ck"), str(tmp_path / "a"), "--max-shard-size", "40000", "--json"])
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and doc["digest"] == manifest.digest and doc["index"] == "model.safetensors.index.json"
    assert doc["dropped_ties"] == {"lm_head.weight": "transformer.wte.weight"} and len(doc["files"]) > 1
    code, out, _ = run_cli([str(tmp_path / "ck"), str(tmp_path / "b")])
    assert code == 0 and "model.safetensors" in out and "lm_head.weight left out" in out
    assert header(tmp_path / "b" / "model.safetensors")[1]["__metadata__"]["manifest_ckpt.digest"] == manifest.digest
    code, _, _ = run_cli([str(tmp_path / "ck"), str(tmp_path / "plain"), "--no-digest"])
    assert code == 0 and header(tmp_path / "plain" / "model.safetensors")[1]["__metadata__"] == {"format": "pt"}
    code, _, err = run_cli([str(tmp_path / "ck"), str(tmp_path / "c"), "--max-shard-size", "lots"])
    assert code == 2 and "max_shard_size='lots'" in err
