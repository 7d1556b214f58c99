"""Regression tests for the fast paths added for the benchmark targets: same results, less work."""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt import writer
from manifest_ckpt.comparison.introspect import capture, find_aliases, module_tree
from manifest_ckpt.format import integrity
from manifest_ckpt.reader import _Weights
from manifest_ckpt.storage.store import open_store


class _Recorder:
    """Wraps a mapping and records the length of every slice taken from it."""

    def __init__(self, mapping: mmap.mmap) -> None:
        self.mapping = mapping
        self.lengths: list[int] = []

    def __getitem__(self, index: slice) -> bytes:
        data = self.mapping[index]
        self.lengths.append(len(data))
        return data


def test_bind_copies_only_the_header_not_max_header_bytes(tmp_path: Path) -> None:
    """Binding a 4 MB weights file copies its length prefix and header in one read (where the first piece starts), nothing more."""
    mc.save({"w": torch.zeros(1 << 20)}, tmp_path / "ck")
    store = open_store(tmp_path / "ck")
    manifest = mc.read_manifest(tmp_path / "ck")
    (name,) = manifest.files
    mapping, offset, size = store.file_map(name)
    recorder = _Recorder(mapping)
    store.file_map = lambda _: (recorder, offset, size)  # type: ignore[method-assign]
    _Weights(store, manifest).bind([name])
    header_length = int.from_bytes(mapping[:8], "little")
    assert recorder.lengths == [8 + header_length]


def test_find_aliases_ties_only_identical_views_in_state_dict_order() -> None:
    """Same view ties to the first key; a sub-view at the same address or another shape does not."""
    base = torch.zeros(4, 4)
    meta = torch.empty(3, device="meta")
    state = {
        "a": base,
        "first_row": base[0],  # same address as "a", other shape: not a tie
        "other_meta": torch.empty(3, device="meta"),  # address 0 like "m", another object
        "m": meta,
        "a_again": base,
        "m_again": meta,
        "flat": base.view(16),
    }
    assert find_aliases(state) == {"a_again": "a", "m_again": "m"}
    assert list(find_aliases(state)) == ["a_again", "m_again"]


def test_capture_of_a_plain_module_records_the_full_module_tree() -> None:
    """Without state-dict hooks the recorded tree is exactly ``module_tree`` of the module."""
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    assert capture(model).modules == module_tree(model)


def test_capture_still_adapts_the_tree_to_a_state_dict_hook() -> None:
    """A hook that drops a key still removes it from the recorded tree."""
    model = nn.Linear(2, 3)

    def drop_bias(module: nn.Module, state: dict[str, Any], prefix: str, local: Any) -> None:
        del state[prefix + "bias"]

    model._register_state_dict_hook(drop_bias)
    tree = capture(model).modules
    assert tree is not None
    assert tree[""].parameters == ("weight",)


def test_load_of_small_tensors_is_bit_exact_and_bumps_versions(tmp_path: Path) -> None:
    """Small whole tensors (memmove path) load bit for bit, in fp32, bf16 and bool, and count as in-place writes."""
    torch.manual_seed(0)
    source = {"f": torch.randn(5, 3), "b": torch.randn(7).to(torch.bfloat16), "k": torch.rand(4) > 0.5}
    mc.save(source, tmp_path / "ck")
    target = {"f": torch.zeros(5, 3), "b": torch.zeros(7, dtype=torch.bfloat16), "k": torch.zeros(4, dtype=torch.bool)}
    module = nn.Module()
    for key, value in target.items():
        module.register_buffer(key, value)
    versions = {k: v._version for k, v in target.items()}
    mc.load(module, tmp_path / "ck")
    for key, value in source.items():
        assert torch.equal(getattr(module, key).view(torch.uint8), value.view(torch.uint8))
        assert getattr(module, key)._version == versions[key] + 1


def test_load_into_a_non_contiguous_parameter_takes_the_copy_path(tmp_path: Path) -> None:
    """A transposed (non-contiguous) parameter still receives the right values."""
    torch.manual_seed(0)
    saved = nn.Linear(3, 4, bias=False)
    mc.save(saved, tmp_path / "ck")
    target = nn.Linear(3, 4, bias=False)
    target.weight = nn.Parameter(torch.zeros(3, 4).t())
    assert not target.weight.is_contiguous()
    mc.load(target, tmp_path / "ck")
    assert torch.equal(target.weight, saved.weight)


def test_load_into_inference_tensors_is_refused_before_any_copy(tmp_path: Path) -> None:
    """An inference-mode tensor cannot be written in place outside inference mode; the fast path does not bypass that."""
    mc.save({"w": torch.ones(3)}, tmp_path / "ck")
    with torch.inference_mode():
        frozen = torch.zeros(3)
    module = nn.Module()
    module.register_buffer("w", frozen)
    with pytest.raises(mc.UnsupportedTensorError, match=r"inference tensors .*torch.inference_mode"):
        mc.load(module, tmp_path / "ck")
    assert torch.equal(module.w, torch.zeros(3))


def test_digest_many_keeps_order_across_workers() -> None:
    """Digests come back in input order whatever thread computed them."""
    blobs = [bytes([i]) * (i * 1000) for i in range(50)]
    found = integrity.digest_many([lambda b=b: b for b in blobs], workers=3)
    assert found == ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]


def test_digest_many_raises_what_a_reader_raised() -> None:
    """An exception from one buffer's reader reaches the caller."""

    def broken() -> bytes:
        raise OSError("disk gone")

    readers = [lambda: b"x"] * 10 + [broken] + [lambda: b"y"] * 10
    with pytest.raises(OSError, match="disk gone"):
        integrity.digest_many(readers, workers=2)


def test_pipelined_writer_records_each_tensors_own_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With batches and the pipeline bound forced small, every digest still belongs to its own tensor."""
    monkeypatch.setattr(writer, "_HASH_BATCH", 100)
    monkeypatch.setattr(writer, "_PIPELINE_BYTES", 300)
    torch.manual_seed(0)
    state = {f"t{i:02d}": torch.randn(i * 7 + 1) for i in range(40)}
    manifest = mc.save(state, tmp_path / "ck")
    for key, tensor in state.items():
        expected = "sha256:" + hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
        assert manifest.tensors[key].digest == expected
    mc.verify(tmp_path / "ck")
