"""Tests of Hugging Face directory sources: ``.bin`` shards with their index, mixed directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import manifest_ckpt as mc
from harness import hostile
from manifest_ckpt.errors import ConversionError, UnsafeCheckpointError
from tests._hf import llama
from tests._models import assert_bitwise_equal, snapshot

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def bin_shards(state: dict[str, torch.Tensor], directory: Path, shards: int = 3) -> Path:
    """The transformers 4 pickled layout: pytorch_model-0000k-of-0000N.bin plus pytorch_model.bin.index.json."""
    directory.mkdir()
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k].clone() for k in keys[i::shards]}
        torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return directory / "pytorch_model.bin.index.json"


@pytest.mark.parametrize("via", ["directory", "index"])
def test_bin_shards_convert_and_load_bit_identical(tmp_path: Path, via: str) -> None:
    """Sharded .bin with its index (directory or index path) converts; the load equals the original."""
    model = llama(0)
    index = bin_shards(model.state_dict(), tmp_path / "src")
    manifest = mc.convert(index.parent if via == "directory" else index, tmp_path / "ck", module=llama(1))
    source = manifest.lineage["source"]
    assert source["format"] == "torch-sharded" and source["shard_format"] == ["torch-zip"]
    assert [f["name"] for f in source["files"]] == [
        "pytorch_model.bin.index.json",
        *(f"pytorch_model-{i:05d}-of-00003.bin" for i in (1, 2, 3)),
    ]
    assert manifest.metadata == {"index_metadata": {"total_size": sum(f.nbytes for f in manifest.tensors.values())}}
    fresh = llama(2)
    mc.load(fresh, tmp_path / "ck", verify_digests=True)
    assert_bitwise_equal(snapshot(fresh), snapshot(model))


def test_bin_shards_of_a_tied_model_get_the_tie_back(tmp_path: Path) -> None:
    """A tied head missing from the shards (as save_pretrained drops it) becomes an alias."""
    model = llama(0, tied=True)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    index = bin_shards(state, tmp_path / "src", shards=2)
    manifest = mc.convert(index, tmp_path / "ck", module=llama(1, tied=True))
    assert dict(manifest.aliases) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert manifest.lineage["source"]["ties_added"] == ["lm_head.weight"]
    fresh = llama(2, tied=True)
    mc.load(fresh, tmp_path / "ck")
    assert_bitwise_equal(snapshot(fresh), snapshot(model))


def test_bin_index_and_shard_disagreeing_is_refused(tmp_path: Path) -> None:
    """A key the index lists for a shard that lacks it is named; nothing is written."""
    index = bin_shards(llama(0).state_dict(), tmp_path / "src", shards=2)
    doc = json.loads(index.read_text())
    actual = doc["weight_map"]["model.norm.weight"]
    other = next(n for n in set(doc["weight_map"].values()) if n != actual)
    doc["weight_map"]["model.norm.weight"] = other
    index.write_text(json.dumps(doc))
    with pytest.raises(ConversionError, match=f"'model.norm.weight' is listed for {other} but not in it"):
        mc.convert(index, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_a_bin_shard_that_runs_code_is_refused(tmp_path: Path) -> None:
    """A shard whose pickle calls os.system is refused before anything runs."""
    index = bin_shards(llama(0).state_dict(), tmp_path / "src", shards=2)
    sentinel = tmp_path / "ran"
    (tmp_path / "src" / "pytorch_model-00002-of-00002.bin").write_bytes(
        hostile.legacy_bytes(hostile.global_pickle(sentinel))
    )
    with pytest.raises(UnsafeCheckpointError, match="system"):
        mc.convert(index, tmp_path / "ck")
    assert not sentinel.exists() and not (tmp_path / "ck").exists()


def test_a_lone_pytorch_model_bin_in_a_directory_converts(tmp_path: Path) -> None:
    """A directory holding only pytorch_model.bin is read as that file."""
    model = llama(0)
    (tmp_path / "src").mkdir()
    torch.save(model.state_dict(), tmp_path / "src" / "pytorch_model.bin")
    manifest = mc.convert(tmp_path / "src", tmp_path / "ck", module=llama(1))
    assert manifest.lineage["source"]["file"] == "pytorch_model.bin"
    fresh = llama(2)
    mc.load(fresh, tmp_path / "ck")
    assert_bitwise_equal(snapshot(fresh), snapshot(model))


def test_a_directory_with_safetensors_and_bin_weights_is_refused(tmp_path: Path) -> None:
    """Both kinds of weights in one directory: refused with both named, nothing chosen silently."""
    model = llama(0)
    model.save_pretrained(tmp_path / "src")
    torch.save(model.state_dict(), tmp_path / "src" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"both safetensors and pickled \.bin weights.*pytorch_model\.bin"):
        mc.convert(tmp_path / "src", tmp_path / "ck")


def test_key_with_a_bin_index_is_refused(tmp_path: Path) -> None:
    """key= applies to one pickled file, not to an index of bare state dicts."""
    index = bin_shards(llama(0).state_dict(), tmp_path / "src", shards=2)
    with pytest.raises(ConversionError, match="key='model' applies to pickled checkpoints"):
        mc.convert(index, tmp_path / "ck", key="model")


# --------------------------------------------------------------------------- manifest-ckpt checkpoints as sources


def test_a_manifest_checkpoint_converts_to_the_same_digest_with_ties_and_tree(tmp_path: Path) -> None:
    """A checkpoint directory (or its manifest.json) converts faithfully: same digest, aliases, tree, metadata."""
    model = llama(0, tied=True)
    original = mc.save(model, tmp_path / "ck", metadata={"step": 7}, record_code=False)
    for i, src in enumerate([tmp_path / "ck", tmp_path / "ck" / "manifest.json"]):
        copied = mc.convert(src, tmp_path / f"copy{i}")
        assert copied.digest == original.digest
        assert dict(copied.aliases) == dict(original.aliases) == {"lm_head.weight": "model.embed_tokens.weight"}
        assert copied.modules == original.modules and copied.metadata == {"step": 7}
        assert copied.parents == [{"digest": original.digest, "relation": "converted-from"}]
        assert copied.lineage["source"]["format"] == "manifest-ckpt"
    checked = mc.convert(tmp_path / "ck", tmp_path / "checked", module=llama(1, tied=True))
    assert checked.digest == original.digest
    fresh = llama(2, tied=True)
    mc.load(fresh, tmp_path / "copy0", verify_digests=True)
    assert_bitwise_equal(snapshot(fresh), snapshot(model))
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


def test_a_remapped_manifest_checkpoint_drops_the_stale_module_tree(tmp_path: Path) -> None:
    """A remap renames keys, so the old module tree no longer applies and is not recorded."""
    model = llama(0)
    mc.save(model, tmp_path / "ck", record_code=False)
    copied = mc.convert(tmp_path / "ck", tmp_path / "copy", remap={"^model\\.": "backbone."})
    assert copied.modules is None
    assert "backbone.norm.weight" in copied.tensors and "model.norm.weight" not in copied.tensors


def test_a_damaged_manifest_checkpoint_is_not_converted(tmp_path: Path) -> None:
    """A flipped byte in the source's weights is caught by its digests; nothing is written."""
    manifest = mc.save(llama(0), tmp_path / "ck", record_code=False)
    weights = tmp_path / "ck" / next(iter(manifest.files))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(mc.IntegrityError, match="do not match their digests"):
        mc.convert(tmp_path / "ck", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_a_manifest_archive_converts_to_the_same_digest(tmp_path: Path) -> None:
    """A packed checkpoint given to convert is unpacked faithfully: same digest, converted-from it."""
    original = mc.save(llama(0, tied=True), tmp_path / "ck", record_code=False)
    mc.pack(tmp_path / "ck", tmp_path / "ck.tar")
    copied = mc.convert(tmp_path / "ck.tar", tmp_path / "copy")
    assert copied.digest == original.digest and copied.modules == original.modules
    assert copied.parents == [{"digest": original.digest, "relation": "converted-from"}]
    assert copied.lineage["source"]["format"] == "manifest-ckpt-archive"
    assert copied.lineage["source"]["file"] == "ck.tar"
