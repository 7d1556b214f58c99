"""Tests of ``manifest_ckpt.sources.convert``: every input kind and container, safety, lineage, CLI."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import manifest_ckpt as mc
from harness import hostile
from manifest_ckpt import cli, writer
from manifest_ckpt.cli.convert import conversion_json, conversion_text
from manifest_ckpt.cli.render import inspect_text
from manifest_ckpt.comparison.introspect import module_tree
from manifest_ckpt.errors import (
    CheckpointExistsError,
    ConversionError,
    ManifestCkptError,
    ManifestError,
    ModelMismatchError,
    RemapError,
    UnsafeCheckpointError,
    UnsupportedTensorError,
)
from manifest_ckpt.sources.convert import convert, read_source
from manifest_ckpt.sources.torch_pickle import read_torch_file
from tests._models import TiedNet, assert_bitwise_equal, snapshot

# --------------------------------------------------------------------------- models and sources


class Net(nn.Module):
    """Linear, BatchNorm (int64 buffer) and a bfloat16 buffer; no ties (safetensors can hold it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer("table", torch.zeros(2, 5, dtype=torch.bfloat16))


class TinyLM(nn.Module):
    """A GPT-2-like head tied to its embedding, as Hugging Face models are."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(16, 8), "h": nn.Linear(8, 8)})
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.transformer["wte"].weight


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """The module with every persistent tensor set to seeded random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict(keep_vars=True).values():
            if t.dtype.is_floating_point:
                t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
            else:
                t.copy_(torch.randint(0, 1000, t.shape, generator=g).to(t.dtype))
    return module


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict (what users torch.save)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def torch_file(obj: Any, path: Path, fmt: str = "torch-zip") -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "torch-zip")
    return path


def sharded_dir(state: dict[str, torch.Tensor], directory: Path, *, shards: int = 2) -> Path:
    """A ``save_pretrained``-style directory: shards plus ``model.safetensors.index.json``."""
    directory.mkdir()
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": weight_map,
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


KINDS = ["torch-zip", "torch-legacy", "safetensors", "safetensors-sharded"]


def make_source(kind: str, state: dict[str, torch.Tensor], tmp_path: Path) -> Path:
    """Write ``state`` as a source of the given kind."""
    if kind in ("torch-zip", "torch-legacy"):
        return torch_file(state, tmp_path / "weights.pth", kind)
    if kind == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
        return path
    return sharded_dir(state, tmp_path / "hf-model")


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def loaded(factory: Callable[[], nn.Module], path: Path, **kwargs: Any) -> nn.Module:
    module = factory()
    mc.load(module, path, **kwargs)
    return module


# --------------------------------------------------------------------------- input kinds


@pytest.mark.parametrize("with_module", [False, True], ids=["no-module", "module"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_input_kind_converts_and_loads_bit_exact(tmp_path: Path, kind: str, with_module: bool) -> None:
    """zip, legacy, single safetensors and sharded directories convert and load back bit-exact."""
    original = randomized(Net())
    src = make_source(kind, weights(original), tmp_path)
    manifest = convert(src, tmp_path / "out", module=Net() if with_module else None)
    assert manifest.lineage["source"]["format"] == kind
    assert_bitwise_equal(snapshot(loaded(Net, tmp_path / "out")), snapshot(original))
    mc.verify(tmp_path / "out")
    assert (manifest.modules is not None) == with_module


def test_lineage_records_the_source_file(tmp_path: Path) -> None:
    """Lineage names the source by base name, with its size, sha256, format, key, globals and torch version."""
    src = torch_file({"state_dict": weights(Net()), "epoch": 2}, tmp_path / "run.pt")
    source = convert(src, tmp_path / "out").lineage["source"]
    assert source["file"] == "run.pt"
    assert source["size"] == src.stat().st_size
    assert source["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert source["format"] == "torch-zip"
    assert (source["container"], source["key"]) == ("nested", "state_dict")
    assert source["remap"] is None
    assert "torch._utils._rebuild_tensor_v2" in source["pickle_globals"]
    assert source["torch"] == torch.__version__.split("+")[0]
    assert str(tmp_path) not in json.dumps(source)


def test_sharded_lineage_lists_every_file_and_metadata(tmp_path: Path) -> None:
    """A sharded source records each shard and the index with size and sha256, and keeps the index metadata."""
    state = weights(randomized(Net()))
    src = sharded_dir(state, tmp_path / "hf")
    manifest = convert(src, tmp_path / "out")
    files = manifest.lineage["source"]["files"]
    assert [f["name"] for f in files] == [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    for f in files:
        assert f["sha256"] == hashlib.sha256((src / f["name"]).read_bytes()).hexdigest()
        assert f["size"] == (src / f["name"]).stat().st_size
    assert manifest.lineage["source"]["file"] == "hf"
    assert manifest.metadata == {
        "safetensors_metadata": {"format": "pt"},
        "index_metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
    }


def test_safetensors_detected_by_content_under_another_name(tmp_path: Path) -> None:
    """A safetensors file named ``.bin`` is recognised by its header, not its name."""
    path = tmp_path / "model.bin"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, path)
    manifest = convert(path, tmp_path / "out")
    assert manifest.lineage["source"]["format"] == "safetensors"
    assert manifest.metadata is None


def test_unaligned_safetensors_tensor_is_copied_not_misread(tmp_path: Path) -> None:
    """A tensor at an offset not aligned to its element size (foreign writer) still converts bit-exact."""
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
    }
    body = json.dumps(header).encode()
    body += b" " * (-(len(body) + 8) % 8)
    values = torch.tensor([1.5, -2.25])
    data = bytes([7, 8, 9]) + values.numpy().tobytes()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    convert(path, tmp_path / "out")
    state = {}
    mc.load(_Holder({"a": torch.zeros(3, dtype=torch.uint8), "b": torch.zeros(2)}, state), tmp_path / "out")
    assert torch.equal(state["b"], values)
    assert state["a"].tolist() == [7, 8, 9]


class _Holder(nn.Module):
    """A module with the given buffers; exposes them through ``out`` after loading."""

    def __init__(self, buffers: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, value in buffers.items():
            self.register_buffer(name, value)
            out[name] = value


# --------------------------------------------------------------------------- containers


CONTAINER_KEYS = ["state_dict", "model", "model_state_dict", "module", "net"]


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
@pytest.mark.parametrize("key", [None, *CONTAINER_KEYS])
def test_tensor_dict_is_found_in_each_container(tmp_path: Path, fmt: str, key: str | None) -> None:
    """A bare state dict or one nested under a usual key is found alone; the key is recorded."""
    original = randomized(Net())
    obj: Any = weights(original) if key is None else {key: weights(original), "epoch": 7, "arch": "net"}
    src = torch_file(obj, tmp_path / "ckpt.pth", fmt)
    manifest = convert(src, tmp_path / "out", module=Net())
    source = manifest.lineage["source"]
    assert source["key"] == key
    assert source["container"] == ("state-dict" if key is None else "nested")
    assert manifest.metadata == (None if key is None else {"epoch": 7, "arch": "net"})
    assert_bitwise_equal(snapshot(loaded(Net, tmp_path / "out")), snapshot(original))


def lightning_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What Lightning's Trainer.save_checkpoint writes (abridged), with ``model.`` prefixed keys."""
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss'}": {
                "best_model_score": torch.tensor(0.25),
                "best_model_path": "epoch=2.ckpt",
                "kth_value": torch.tensor(float("inf")),
            }
        },
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(3, 4)}},
                "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0]}],
            }
        ],
        "lr_schedulers": [{"last_epoch": 3, "_last_lr": [0.001]}],
        "hparams_name": "hparams",
        "hyper_parameters": argparse.Namespace(lr=1e-3, layers=2, tag="run-7", ratio=float("nan")),
    }


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
def test_lightning_checkpoint_keeps_metadata_and_says_what_was_left_out(tmp_path: Path, fmt: str) -> None:
    """Lightning: weights from state_dict (remapped), epoch/step/hparams kept as JSON, optimizer state left out."""
    original = randomized(Net())
    src = torch_file(lightning_checkpoint(weights(original)), tmp_path / "last.ckpt", fmt)
    manifest = convert(src, tmp_path / "out", module=Net(), remap={r"^model\.": ""})
    source = manifest.lineage["source"]
    assert (source["container"], source["key"]) == ("lightning", "state_dict")
    assert source["remap"] == {r"^model\.": ""}
    assert source["left_out"] == [{"path": "optimizer_states", "what": "optimizer state", "tensors": 2, "bytes": 52}]
    meta = manifest.metadata
    assert (meta["epoch"], meta["global_step"], meta["pytorch-lightning_version"]) == (3, 120, "2.4.0")
    assert meta["hyper_parameters"] == {"lr": 1e-3, "layers": 2, "tag": "run-7", "ratio": "NaN"}
    assert meta["callbacks"]["ModelCheckpoint{'monitor': 'val_loss'}"] == {
        "best_model_score": 0.25,
        "best_model_path": "epoch=2.ckpt",
        "kth_value": "Infinity",
    }
    assert meta["lr_schedulers"] == [{"last_epoch": 3, "_last_lr": [0.001]}]
    assert "optimizer_states" not in meta
    assert_bitwise_equal(snapshot(loaded(Net, tmp_path / "out")), snapshot(original))


def test_optimizer_state_is_recognised_by_shape(tmp_path: Path) -> None:
    """An optimizer state dict under an unusual name is left out too, with its tensor count."""
    opt = {"state": {"fc.weight": {"momentum_buffer": torch.ones(3, 4)}}, "param_groups": [{"lr": 0.1}]}
    src = torch_file({"weights": weights(Net()), "opt_sd": opt, "step": 5}, tmp_path / "c.pt")
    manifest = convert(src, tmp_path / "out")
    assert manifest.lineage["source"]["key"] == "weights"
    assert manifest.lineage["source"]["left_out"] == [
        {"path": "opt_sd", "what": "optimizer state", "tensors": 1, "bytes": 48}
    ]
    assert manifest.metadata == {"step": 5}


def test_stray_tensors_are_listed_as_left_out(tmp_path: Path) -> None:
    """Tensors outside the chosen dict (not 0-d scalars) and bytes are listed, never silently dropped."""
    src = torch_file(
        {"model": weights(Net()), "key": "model", "stats": [torch.ones(2), 4], "blob": b"\x00\x01"}, tmp_path / "c.pt"
    )
    manifest = convert(src, tmp_path / "out", key="model")
    assert manifest.lineage["source"]["left_out"] == [
        {"path": "stats/0", "what": "tensor float32[2]", "tensors": 1, "bytes": 8},
        {"path": "blob", "what": "2 bytes"},
    ]
    assert manifest.metadata == {"key": "model", "stats": [None, 4]}


def test_shared_sub_containers_are_walked_once(tmp_path: Path) -> None:
    """Lists that each hold the previous one twice (2**40 paths) convert in linear time; repeats are listed."""
    dag: list[Any] = []
    for _ in range(40):
        dag = [dag, dag]
    src = torch_file({"model": weights(Net()), "dag": dag}, tmp_path / "dag.pt")
    manifest = convert(src, tmp_path / "out")
    left_out = manifest.lineage["source"]["left_out"]
    assert left_out[0] == {"path": "dag/" + "0/" * 38 + "1", "what": "the same object as " + "dag/" + "0/" * 38 + "0"}
    assert len(left_out) == 39  # one repeat per level; the innermost pair of empty lists is plain JSON


def test_ambiguous_container_lists_candidates_with_sizes(tmp_path: Path) -> None:
    """Two tensor dicts: a ConversionError lists both with counts and sizes and asks for key; nothing written."""
    src = torch_file({"model": weights(Net()), "ema": {"w": torch.ones(256)}}, tmp_path / "c.pt")
    with pytest.raises(ConversionError) as info:
        convert(src, tmp_path / "out")
    message = str(info.value)
    assert "found 2 dicts of tensors" in message
    assert "model  (8 tensors, 136 B)" in message
    assert "ema  (1 tensor, 1.0 KB)" in message
    assert "--key" in message
    assert info.value.extra["candidates"] == ["model", "ema"]
    assert not (tmp_path / "out").exists()
    manifest = convert(src, tmp_path / "out", key="ema")
    assert list(manifest.tensors) == ["w"]
    assert manifest.lineage["source"]["left_out"] == [
        {"path": "model", "what": "dict of tensors", "tensors": 8, "bytes": 136}
    ]


def test_key_can_be_a_nested_path(tmp_path: Path) -> None:
    """``key="a/b"`` walks nested dicts (and list indices)."""
    src = torch_file({"a": {"b": {"w": torch.ones(2)}}, "c": [{"w": torch.zeros(3)}]}, tmp_path / "c.pt")
    assert list(convert(src, tmp_path / "o1", key="a/b").tensors) == ["w"]
    assert convert(src, tmp_path / "o2", key="c/0").tensors["w"].shape == (3,)


@pytest.mark.parametrize(
    ("key", "fragment"),
    [("missing", "key 'missing' not found"), ("epoch", "key 'epoch' holds a int, not a dict of tensors")],
)
def test_bad_key_names_the_candidates(tmp_path: Path, key: str, fragment: str) -> None:
    """A key that is absent or holds no tensor dict is a ConversionError listing the real candidates."""
    src = torch_file({"model": weights(Net()), "epoch": 1}, tmp_path / "c.pt")
    with pytest.raises(ConversionError, match=fragment) as info:
        convert(src, tmp_path / "out", key=key)
    assert "model  (8 tensors, 136 B)" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_no_tensors_is_a_clear_error(tmp_path: Path) -> None:
    """A container without any tensor dict says what it holds instead."""
    src = torch_file({"epoch": 1, "opt": {"state": {}, "param_groups": []}}, tmp_path / "c.pt")
    with pytest.raises(ConversionError, match=r"found no dict of tensors.*keys epoch \(int\), opt \(dict of 2\)"):
        convert(src, tmp_path / "out")


def test_key_is_refused_for_safetensors(tmp_path: Path) -> None:
    """key= applies only to pickled containers."""
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(1)}, path)
    with pytest.raises(ConversionError, match="key='model' applies to pickled checkpoints"):
        convert(path, tmp_path / "out", key="model")


# --------------------------------------------------------------------------- shared storage and ties


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
def test_shared_storage_becomes_an_alias_and_views_stay_separate(tmp_path: Path, fmt: str) -> None:
    """A tensor saved twice becomes an alias; disjoint views at different offsets of one storage are stored separately."""
    base = torch.arange(12, dtype=torch.float32)
    other = torch.arange(12, 24, dtype=torch.float32)
    state = {
        "whole": base,
        "again": base,
        "head": other[:4],
        "tail": other[4:].view(2, 4),
        "cols": torch.arange(24, 36, dtype=torch.float32).view(3, 4).t(),
    }
    src = torch_file(state, tmp_path / "s.pt", fmt)
    manifest = convert(src, tmp_path / "out")
    assert dict(manifest.aliases) == {"again": "whole"}
    assert sorted(manifest.tensors) == ["cols", "head", "tail", "whole"]
    out: dict[str, torch.Tensor] = {}
    holder = _Holder({k: torch.zeros_like(v).contiguous() for k, v in state.items() if k != "again"}, out)
    mc.load(holder, tmp_path / "out", allow_unexpected=["again"])
    for key in ("whole", "head", "tail", "cols"):
        assert torch.equal(out[key], state[key]), key


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
def test_expanded_view_is_refused_before_anything_is_written(tmp_path: Path, fmt: str) -> None:
    """A 1-element storage expanded to a million elements is refused by name; nothing is written."""
    src = torch_file({"ok": torch.ones(2), "big": torch.zeros(1).expand(1_000_000)}, tmp_path / "s.pt", fmt)
    with pytest.raises(ConversionError, match=r"'big' is an expanded view \(stride 0\).*storage of only 4 bytes"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_self_overlapping_strides_are_refused(tmp_path: Path) -> None:
    """An as_strided view that reads each element many times is refused (more bytes than its storage)."""
    view = torch.arange(128, dtype=torch.float32).as_strided((64, 64), (1, 1))
    src = torch_file({"w": view}, tmp_path / "s.pt")
    with pytest.raises(ConversionError, match=r"'w' is a view whose strides repeat elements.*16384 bytes.*only 512 bytes"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_overlapping_views_beyond_their_storage_are_refused(tmp_path: Path) -> None:
    """A tensor and an overlapping view of it would write more than their storage: refused, naming both."""
    base = torch.arange(12, dtype=torch.float32)
    src = torch_file({"whole": base, "rows": base[2:10]}, tmp_path / "s.pt")
    with pytest.raises(ConversionError, match=r"2 tensors are overlapping views of one 48-byte storage \('whole'"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["safetensors", "safetensors-sharded"])
def test_hf_file_without_tied_lm_head_converts_and_loads_with_module(tmp_path: Path, kind: str) -> None:
    """An HF file that omits the tied lm_head.weight converts with the module's tie as an alias and loads."""
    original = randomized(TinyLM())
    state = {k: v for k, v in weights(original).items() if k != "lm_head.weight"}
    src = make_source(kind, state, tmp_path)
    manifest = convert(src, tmp_path / "out", module=TinyLM())
    assert dict(manifest.aliases) == {"lm_head.weight": "transformer.wte.weight"}
    assert manifest.lineage["source"]["ties_added"] == ["lm_head.weight"]
    fresh = loaded(TinyLM, tmp_path / "out")
    assert fresh.lm_head.weight is fresh.transformer["wte"].weight
    assert_bitwise_equal(snapshot(fresh), snapshot(original))
    assert "lm_head.weight -> transformer.wte.weight (the source omitted it; tied in the module)" in conversion_text(
        manifest, "out"
    )


def test_hf_file_without_module_keeps_only_what_it_holds(tmp_path: Path) -> None:
    """Without a module nothing is invented: the omitted lm_head stays absent."""
    state = {k: v for k, v in weights(TinyLM()).items() if k != "lm_head.weight"}
    manifest = convert(make_source("safetensors", state, tmp_path), tmp_path / "out")
    assert "lm_head.weight" not in manifest.keys()
    assert dict(manifest.aliases) == {}


def test_tied_copies_with_equal_bits_are_stored_once(tmp_path: Path) -> None:
    """A source storing both tied tensors separately with equal bits gets one stored tensor and an alias."""
    original = randomized(TinyLM())
    state = weights(original)
    state["lm_head.weight"] = state["lm_head.weight"].clone()
    manifest = convert(make_source("safetensors", state, tmp_path), tmp_path / "out", module=TinyLM())
    assert dict(manifest.aliases) == {"lm_head.weight": "transformer.wte.weight"}
    assert manifest.lineage["source"]["ties_merged"] == ["lm_head.weight"]


def test_tied_copies_with_different_values_are_a_mismatch(tmp_path: Path) -> None:
    """If the source's two copies differ, the module's tie is contradicted: ModelMismatchError, nothing written."""
    state = weights(randomized(TinyLM()))
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(ModelMismatchError) as info:
        convert(make_source("safetensors", state, tmp_path), tmp_path / "out", module=TinyLM())
    assert [(p.kind, p.key) for p in info.value.report.problems] == [("alias", "lm_head.weight")]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- module checks


@pytest.mark.parametrize(("prefix", "origin"), [("module.", "DistributedDataParallel"), ("model.", "Lightning")])
def test_prefix_with_module_is_refused_with_the_remap_hint(tmp_path: Path, prefix: str, origin: str) -> None:
    """DDP/Lightning prefixes: ModelMismatchError before writing, hinting the remap (API and CLI forms)."""
    src = torch_file({prefix + k: v for k, v in weights(Net()).items()}, tmp_path / "ddp.pt")
    with pytest.raises(ModelMismatchError) as info:
        convert(src, tmp_path / "out", module=Net())
    rule = "^" + prefix.replace(".", "\\.")
    assert info.value.report.suggested_remap == {rule: ""}
    message = str(info.value)
    assert origin in message
    assert f"convert with remap={{{rule!r}: ''}} (CLI: --remap '{rule}=')" in message
    assert "load with remap" not in message
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [src]


def test_prefix_remap_applied_converts_and_loads(tmp_path: Path) -> None:
    """With the suggested remap the DDP checkpoint converts, records the remap and loads bit-exact."""
    original = randomized(Net())
    src = torch_file({"module." + k: v for k, v in weights(original).items()}, tmp_path / "ddp.pt")
    manifest = convert(src, tmp_path / "out", module=Net(), remap={r"^module\.": ""})
    assert manifest.lineage["source"]["remap"] == {r"^module\.": ""}
    assert_bitwise_equal(snapshot(loaded(Net, tmp_path / "out")), snapshot(original))


def test_prefix_without_module_is_noted(tmp_path: Path) -> None:
    """Without a module the prefix is kept, and recorded and shown with the remap that strips it."""
    src = torch_file({"module." + k: v for k, v in weights(Net()).items()}, tmp_path / "ddp.pt")
    manifest = convert(src, tmp_path / "out")
    assert manifest.lineage["source"]["key_prefix"] == "module."
    assert "convert with --remap '^module\\.=' to strip it" in conversion_text(manifest, "out")


def test_shape_and_dtype_mismatches_are_all_reported_before_writing(tmp_path: Path) -> None:
    """The comparison is load's: every problem is listed at once, and nothing is written."""
    state = weights(Net())
    state["fc.weight"] = torch.zeros(5, 4)
    state["fc.bias"] = state["fc.bias"].half()
    del state["bn.weight"]
    with pytest.raises(ModelMismatchError) as info:
        convert(torch_file(state, tmp_path / "bad.pt"), tmp_path / "out", module=Net())
    kinds = {(p.kind, p.key) for p in info.value.report.problems}
    assert kinds == {("missing", "bn.weight"), ("shape", "fc.weight"), ("dtype", "fc.bias")}
    assert not (tmp_path / "out").exists()


def test_module_tree_is_recorded_and_digest_matches_save(tmp_path: Path) -> None:
    """With a module the tree (classes, versions) is recorded; the digest equals save() of the loaded module."""
    original = randomized(TiedNet())
    src = torch_file(original.state_dict(), tmp_path / "tied.pt")
    manifest = convert(src, tmp_path / "out", module=TiedNet())
    assert dict(manifest.modules or {}) == module_tree(TiedNet())
    assert manifest.modules is not None and manifest.modules["fc"].cls == "torch.nn.modules.linear.Linear"
    fresh = loaded(TiedNet, tmp_path / "out")
    assert mc.save(fresh, tmp_path / "resaved").digest == manifest.digest
    assert manifest.lineage["source"]["module"] == "tests._models.TiedNet"


def test_meta_device_module_is_enough(tmp_path: Path) -> None:
    """The module is only inspected: a meta-device model (no memory) checks and records the tree."""
    with torch.device("meta"):
        skeleton = Net()
    original = randomized(Net())
    manifest = convert(torch_file(weights(original), tmp_path / "w.pt"), tmp_path / "out", module=skeleton)
    assert manifest.modules is not None
    assert all(t.is_meta for t in skeleton.state_dict().values())
    assert_bitwise_equal(snapshot(loaded(Net, tmp_path / "out")), snapshot(original))


def test_module_is_not_modified(tmp_path: Path) -> None:
    """convert never copies into the module it is given."""
    module = randomized(Net(), seed=1)
    before = snapshot(module)
    convert(torch_file(weights(randomized(Net(), seed=2)), tmp_path / "w.pt"), tmp_path / "out", module=module)
    assert_bitwise_equal(snapshot(module), before)


def test_without_module_the_tree_comes_from_key_names(tmp_path: Path) -> None:
    """No module: modules is null and inspect shows the tree derived from keys with unknown classes."""
    manifest = convert(torch_file(weights(Net()), tmp_path / "w.pt"), tmp_path / "out")
    assert manifest.modules is None
    text = inspect_text(manifest, "out")
    assert "(root)  ?" in text
    assert "├── fc  ?" in text or "└── fc  ?" in text
    assert "weight  float32[3, 4]" in text


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", KINDS)
def test_converting_twice_gives_identical_bytes(tmp_path: Path, kind: str) -> None:
    """Two conversions of one source write byte-identical directories."""
    src = make_source(kind, weights(randomized(Net())), tmp_path)
    convert(src, tmp_path / "a")
    convert(src, tmp_path / "b")
    first, second = dir_bytes(tmp_path / "a"), dir_bytes(tmp_path / "b")
    assert first == second
    assert len(first) == 2


def test_lightning_conversion_is_deterministic(tmp_path: Path) -> None:
    """Metadata from a Lightning checkpoint (dicts, lists, NaN) serialises identically every time."""
    src = torch_file(lightning_checkpoint(weights(Net())), tmp_path / "l.ckpt")
    convert(src, tmp_path / "a", remap={r"^model\.": ""}, module=Net())
    convert(src, tmp_path / "b", remap={r"^model\.": ""}, module=Net())
    assert dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")


# --------------------------------------------------------------------------- hostile and damaged inputs

PAYLOADS = ["os.system", "builtins.exec", "subprocess.Popen", "subprocess.run"]


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_reduce_payloads_are_refused_and_never_run(tmp_path: Path, fmt: str, payload: str) -> None:
    """A ``__reduce__`` payload inside a Lightning-like checkpoint: UnsafeCheckpointError, no sentinel, no output."""
    sentinel = tmp_path / "pwned"
    evil, global_name = hostile.payloads(sentinel)[payload]
    src = torch_file({"state_dict": weights(Net()), "hyper_parameters": {"x": evil}}, tmp_path / "evil.ckpt", fmt)
    with pytest.raises(UnsafeCheckpointError) as info:
        convert(src, tmp_path / "out", module=Net())
    assert info.value.global_name == global_name
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("container", ["zip-swapped-data.pkl", "legacy", "bare-pickle"])
@pytest.mark.parametrize("memoized", [None, False, True], ids=["GLOBAL", "STACK_GLOBAL", "STACK_GLOBAL-memo"])
def test_hand_built_global_pickles_are_refused(tmp_path: Path, container: str, memoized: bool | None) -> None:
    """GLOBAL and STACK_GLOBAL opcode payloads in a swapped zip, a legacy file or a bare pickle never run."""
    sentinel = tmp_path / "pwned"
    raw = (
        hostile.global_pickle(sentinel)
        if memoized is None
        else hostile.stack_global_pickle(sentinel, memoized=memoized)
    )
    src = tmp_path / "evil.pt"
    if container == "zip-swapped-data.pkl":
        hostile.swap_data_pkl(torch_file({"w": torch.ones(3)}, tmp_path / "legit.pt"), src, raw)
    elif container == "legacy":
        src.write_bytes(hostile.legacy_bytes(raw))
    else:
        src.write_bytes(raw)
    with pytest.raises(UnsafeCheckpointError) as info:
        convert(src, tmp_path / "out")
    assert info.value.global_name == "os.system"
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()


def test_whole_pickled_model_is_refused_with_resave_advice(tmp_path: Path) -> None:
    """``torch.save(model)`` is refused with the advice to save a state dict."""
    src = torch_file(nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.save\(model\.state_dict\(\)"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _truncated_zip(tmp_path: Path) -> Path:
    data = torch_file(weights(Net()), tmp_path / "full.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_pickle(tmp_path: Path) -> Path:
    legit = torch_file(weights(Net()), tmp_path / "legit.pt")
    with zipfile.ZipFile(legit) as z:
        data_pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    return hostile.swap_data_pkl(legit, tmp_path / "cut.pt", data_pkl[: len(data_pkl) // 2])


def _truncated_legacy(tmp_path: Path) -> Path:
    data = torch_file(weights(Net()), tmp_path / "full.pth", "torch-legacy").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[:300])
    return path


def _random_bytes(tmp_path: Path) -> Path:
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 8)
    return path


def _truncated_safetensors(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(64)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    return path


def _overlapping_safetensors(tmp_path: Path) -> Path:
    header = json.dumps(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        }
    ).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 12)
    return path


def _random_safetensors(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\xff" * 64)
    return path


DAMAGED = {
    "random-bytes": (_random_bytes, "is not a torch.save checkpoint"),
    "truncated-zip": (_truncated_zip, "truncated or damaged"),
    "truncated-pickle": (_truncated_pickle, "data.pkl is not a complete pickle"),
    "truncated-legacy": (_truncated_legacy, "the pickled object"),
    "truncated-safetensors": (_truncated_safetensors, "lie outside the"),
    "overlapping-safetensors": (_overlapping_safetensors, "overlap"),
    "garbage-safetensors": (_random_safetensors, "header claims"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_sources_fail_clearly_and_write_nothing(tmp_path: Path, case: str) -> None:
    """Random bytes, cut zips, cut pickles, lying headers: a ConversionError and no output, not even staging."""
    make, fragment = DAMAGED[case]
    src = make(tmp_path)
    before = set(tmp_path.iterdir())
    with pytest.raises(ConversionError, match=fragment) as info:
        convert(src, tmp_path / "out")
    assert isinstance(info.value, ManifestCkptError)
    assert info.value.file == str(src)
    assert set(tmp_path.iterdir()) == before


def test_missing_source_is_a_conversion_error(tmp_path: Path) -> None:
    """A path that does not exist is a ConversionError naming it."""
    with pytest.raises(ConversionError, match="No such file or directory"):
        convert(tmp_path / "nope.pt", tmp_path / "out")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_index_naming_files_outside_the_directory_is_refused(tmp_path: Path, name: str) -> None:
    """weight_map file names must be plain names inside the directory."""
    src = sharded_dir(weights(Net()), tmp_path / "hf")
    save_file({"w": torch.ones(1)}, tmp_path / "outside.safetensors")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["fc.weight"] = name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="expected a plain file name inside"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_cache_layout_with_linked_shards_converts(tmp_path: Path) -> None:
    """Shards that are links to blobs elsewhere (the Hugging Face hub cache) are followed; names are recorded."""
    original = randomized(Net())
    src = sharded_dir(weights(original), tmp_path / "snapshot")
    (tmp_path / "blobs").mkdir()
    for shard in sorted(src.iterdir()):
        blob = tmp_path / "blobs" / hashlib.sha256(shard.read_bytes()).hexdigest()
        shard.rename(blob)
        shard.symlink_to(blob)
    manifest = convert(src, tmp_path / "out", module=Net())
    assert [f["name"] for f in manifest.lineage["source"]["files"]][1:] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert_bitwise_equal(snapshot(loaded(Net, tmp_path / "out")), snapshot(original))


def test_index_file_can_be_the_source(tmp_path: Path) -> None:
    """Passing the index itself converts its shards; a directory with two indexes asks for one."""
    src = sharded_dir(weights(Net()), tmp_path / "hf")
    index = src / "model.safetensors.index.json"
    assert convert(index, tmp_path / "o1").lineage["source"]["format"] == "safetensors-sharded"
    (src / "other.safetensors.index.json").write_text(index.read_text())
    with pytest.raises(ConversionError, match="holds 2 safetensors indexes"):
        convert(src, tmp_path / "o2")
    assert convert(index, tmp_path / "o3").digest == mc.read_manifest(tmp_path / "o1").digest


def test_index_and_shards_must_agree(tmp_path: Path) -> None:
    """A key the index places in a shard that lacks it is reported with the shard's name."""
    src = sharded_dir(weights(Net()), tmp_path / "hf")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"'ghost\.weight' is listed for model-00001-of-00002\.safetensors"):
        convert(src, tmp_path / "out")


def test_directory_without_safetensors_says_what_it_expected(tmp_path: Path) -> None:
    """A directory with only a torch.save file not named as save_pretrained names it asks for a file path."""
    (tmp_path / "hf").mkdir()
    torch_file(weights(Net()), tmp_path / "hf" / "weights.pt")
    with pytest.raises(ConversionError, match=r"found weights\.pt\. Pass a file path"):
        convert(tmp_path / "hf", tmp_path / "out")


def test_unsupported_dtype_fails_before_writing(tmp_path: Path) -> None:
    """complex128 (not storable in safetensors) is refused with the key named; nothing is written."""
    src = torch_file({"z": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "z.pt")
    with pytest.raises(UnsupportedTensorError, match="'z'"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_remap_matching_nothing_fails_before_writing(tmp_path: Path) -> None:
    """A remap rule that matches no key is a RemapError; nothing is written."""
    with pytest.raises(RemapError, match="matches no checkpoint key"):
        convert(torch_file(weights(Net()), tmp_path / "w.pt"), tmp_path / "out", remap={"^nothing": ""})
    assert not (tmp_path / "out").exists()


def test_existing_destination_is_refused_before_reading(tmp_path: Path) -> None:
    """An existing dst fails fast (before the source is read); overwrite=True replaces it."""
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointExistsError):
        convert(_random_bytes(tmp_path), tmp_path / "out")
    src = torch_file(weights(Net()), tmp_path / "w.pt")
    first = convert(src, tmp_path / "o2")
    assert convert(src, tmp_path / "o2", overwrite=True).digest == first.digest


# --------------------------------------------------------------------------- read_source, progress, CLI


def test_read_source_returns_tensors_metadata_and_resolved_record(tmp_path: Path) -> None:
    """read_source inspects without writing: tensors, kept metadata and the finished record."""
    src = torch_file({"model": weights(Net()), "epoch": 4}, tmp_path / "w.pt")
    source = read_source(src)
    assert sorted(source.tensors) == sorted(Net().state_dict())
    assert source.metadata == {"epoch": 4}
    assert source.record["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert list(tmp_path.iterdir()) == [src]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_is_drawn_on_a_terminal_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """progress=True draws a bar on a TTY stderr; progress=False stays silent."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    src = torch_file(weights(Net()), tmp_path / "w.pt")
    convert(src, tmp_path / "quiet")
    assert terminal.getvalue() == ""
    convert(src, tmp_path / "loud", progress=True)
    assert "convert w.pt [" in terminal.getvalue()
    assert "100.0%" in terminal.getvalue()


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(["convert", *argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_human_output(tmp_path: Path) -> None:
    """The CLI prints what was converted, kept, left out, the aliases and the digest."""
    state = {f"model.{k}": v for k, v in TiedNet().state_dict().items()}
    src = torch_file(
        {"state_dict": state, "epoch": 1, "global_step": 9, "optimizer_states": [{"state": {}}]}, tmp_path / "l.ckpt"
    )
    code, out, err = run_cli(
        [str(src), str(tmp_path / "out"), "--model", "tests._models:TiedNet", "--remap", r"^model\.=", "--quiet"]
    )
    assert (code, err) == (0, "")
    manifest = mc.read_manifest(tmp_path / "out")
    assert out.splitlines()[0] == f"converted l.ckpt -> {tmp_path / 'out'}"
    assert "  container  lightning (tensors under 'state_dict')" in out
    assert "  module     checked against tests._models.TiedNet; module tree recorded" in out
    assert "  alias      head.weight -> emb.weight (shared storage in the source)" in out
    assert "  kept       epoch, global_step (as JSON in metadata)" in out
    assert "  left out   optimizer_states (optimizer state: 0 tensors, 0 B)" in out
    assert out.splitlines()[-1] == f"  digest     {manifest.digest}"


def test_cli_json_and_mismatch_exit_code(tmp_path: Path) -> None:
    """--json gives the digest and source record; a model mismatch exits 1 with the report and writes nothing."""
    src = torch_file({"module." + k: v for k, v in weights(Net()).items()}, tmp_path / "ddp.pt")
    code, out, _ = run_cli([str(src), str(tmp_path / "out"), "--json", "--quiet"])
    document = json.loads(out)
    assert code == 0
    assert document == conversion_json(mc.read_manifest(tmp_path / "out"), str(tmp_path / "out"))
    assert document["source"]["key_prefix"] == "module."
    code, out, err = run_cli([str(src), str(tmp_path / "o2"), "--model", "tests.test_convert:Net", "--quiet"])
    assert code == 1
    assert out == ""
    assert err.startswith(f"MISMATCH {src} vs tests.test_convert:Net: nothing was written")
    assert "--remap '^module\\.='" in err
    assert not (tmp_path / "o2").exists()
    code, out, _ = run_cli([str(src), str(tmp_path / "o2"), "--model", "tests.test_convert:Net", "--json", "--quiet"])
    assert code == 1
    assert json.loads(out)["suggested_remap"] == {r"^module\.": ""}


# --------------------------------------------------------------------------- core options convert relies on


def test_save_modules_option_records_a_supplied_tree(tmp_path: Path) -> None:
    """writer.save(state_dict, modules=tree) records the tree; the manifest reads back consistent."""
    module = TiedNet()
    manifest = mc.save(dict(module.state_dict()), tmp_path / "out", modules=module_tree(module))
    assert mc.read_manifest(tmp_path / "out") == manifest
    assert manifest.modules is not None and manifest.modules["bn"].cls == "torch.nn.modules.batchnorm.BatchNorm1d"


def test_save_modules_option_refuses_a_tree_that_does_not_fit(tmp_path: Path) -> None:
    """A tree that declares other keys is refused before writing; modules= with a module is a TypeError."""
    state = dict(TiedNet().state_dict())
    del state["fc.bias"]
    with pytest.raises(ManifestError, match=r"declared but not in the state dict: 'fc\.bias'"):
        mc.save(state, tmp_path / "out", modules=module_tree(TiedNet()))
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError, match="records its own tree"):
        mc.save(TiedNet(), tmp_path / "out", modules=module_tree(TiedNet()))


def test_save_progress_and_deferred_source(tmp_path: Path) -> None:
    """progress gets every stored byte; a callable source is called once, after the weights are written."""
    seen: list[int] = []
    calls: list[list[str]] = []

    def source() -> dict[str, Any]:
        calls.append(sorted(p.name for p in (tmp_path).rglob("weights-*.safetensors")))
        return {"file": "x.pt"}

    manifest = mc.save(TiedNet(), tmp_path / "out", progress=seen.append, source=source)
    assert sum(seen) == manifest.total_bytes
    assert len(calls) == 1 and len(calls[0]) == 1  # the weights file existed when it was called
    assert manifest.lineage["source"] == {"file": "x.pt"}
    with pytest.raises(ManifestError):
        mc.save(TiedNet(), tmp_path / "bad", source=lambda: {"x": float("nan")})
    assert not (tmp_path / "bad").exists()


def test_read_torch_file_can_skip_hashing(tmp_path: Path) -> None:
    """read_torch_file(sha256=False) leaves the digest empty (convert hashes concurrently)."""
    src = torch_file({"w": torch.ones(2)}, tmp_path / "w.pt")
    assert read_torch_file(src, sha256=False).sha256 == ""
    assert read_torch_file(src).sha256 == hashlib.sha256(src.read_bytes()).hexdigest()


def test_writer_module_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """convert writes through writer.save (no second writer)."""
    calls: list[str] = []
    real = writer.save

    def spy(*args: Any, **kwargs: Any) -> mc.Manifest:
        calls.append(os.fspath(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr("manifest_ckpt.sources.convert.save", spy)
    convert(torch_file(weights(Net()), tmp_path / "w.pt"), tmp_path / "out")
    assert calls == [str(tmp_path / "out")]


def test_safetensors_file_with_e8m0_and_f4_converts_bit_exact(tmp_path: Path) -> None:
    """A file safetensors 0.8 writes with F8_E8M0 and F4 tensors converts (not 'corrupt'), values bit-exact."""
    raw = torch.arange(24, dtype=torch.uint8).reshape(4, 6)
    tensors = {"scale": raw.clone().view(torch.float8_e8m0fnu), "packed": raw.clone().view(torch.float4_e2m1fn_x2)}
    save_file(tensors, tmp_path / "m.safetensors")
    manifest = mc.convert(tmp_path / "m.safetensors", tmp_path / "ck")
    assert {k: (t.dtype, t.shape) for k, t in manifest.tensors.items()} == {
        "packed": ("float4_e2m1fn_x2", (4, 6)),
        "scale": ("float8_e8m0fnu", (4, 6)),
    }
    holder = nn.Module()
    for key, value in tensors.items():
        holder.register_buffer(key, torch.zeros_like(value))
    mc.load(holder, tmp_path / "ck")
    for key, value in tensors.items():
        assert getattr(holder, key).dtype == value.dtype
        assert torch.equal(getattr(holder, key).view(torch.uint8), value.view(torch.uint8))


def test_f4_header_with_an_odd_last_dimension_is_refused_as_corrupt(tmp_path: Path) -> None:
    """An F4 shape whose last dimension is odd has no torch shape: a ConversionError says why."""
    header = json.dumps({"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\x00\x00")
    with pytest.raises(mc.ConversionError, match="last dimension must be even"):
        mc.convert(tmp_path / "m.safetensors", tmp_path / "ck")
