"""PyTorch's own DCP file-system scenarios, run with this library's StorageWriter/Reader substituted.

The scenarios follow ``test/distributed/checkpoint/test_file_system_checkpoint_cpu.py`` of
pytorch/pytorch (BSD-3-Clause): ``test_read_write_only_tensor`` (both ``single_file_per_rank``
settings) and ``test_save_load_bytes`` (non-tensor values), written again here for one CPU
process. Plain ``torch.distributed.checkpoint.save`` and ``load`` are called with DCP's default
planners, as a user of DCP calls them; only the storage classes are ours. Deliberate refusals,
asserted as this library's typed errors (inside DCP's ``CheckpointException``, as DCP wraps
every writer error): a value that would need pickle (``UnsupportedValueError`` naming its
key); ``serialization_format=TORCH_SAVE``; and, tested in tests/test_distributed.py, the
stream ``_extensions`` of upstream's ``Rot13Example`` / ``ZStandard`` scenarios
(``UnsupportedOptionError``) rather than being ignored.
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import manifest_ckpt as mc
from manifest_ckpt import distributed as mcd
from manifest_ckpt.errors import UnsupportedValueError


class UpstreamModule(torch.nn.Module):
    """The layers of upstream's ``MyTestModule``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear_1 = torch.nn.Linear(5, 5)
        self.linear_2 = torch.nn.Linear(5, 1)
        self.emb = torch.nn.EmbeddingBag(5, 10)


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("single_file_per_rank", [True, False])
def test_read_write_only_tensor(tmp_path: Path, single_file_per_rank: bool) -> None:
    saved = UpstreamModule().state_dict()
    writer = mcd.ManifestStorageWriter(tmp_path / "ck", single_file_per_rank=single_file_per_rank)
    dcp.save(saved, storage_writer=writer, no_dist=True)
    target = UpstreamModule().state_dict()
    assert not _equal(target, saved)
    dcp.load(target, storage_reader=mcd.ManifestStorageReader(tmp_path / "ck"), no_dist=True)
    assert _equal(target, saved)
    mc.verify(tmp_path / "ck")


def test_save_load_bytes(tmp_path: Path) -> None:
    """Non-tensor values (upstream's "bytes" entries) under DCP's default planners: stored as JSON, loaded in place."""
    state = {"bytes0": [1], "bytes1": "string"}
    dcp.save(state, storage_writer=mcd.ManifestStorageWriter(tmp_path / "ck"), no_dist=True)
    target: dict[str, Any] = {"bytes0": [2], "bytes1": "other"}
    dcp.load(target, storage_reader=mcd.ManifestStorageReader(tmp_path / "ck"), no_dist=True)
    assert target == {"bytes0": [1], "bytes1": "string"}
    assert mc.load_file(tmp_path / "ck") == {"bytes0": [1], "bytes1": "string"}
    assert mc.read_manifest(tmp_path / "ck").state == {"dict": [["bytes0", [1]], ["bytes1", "string"]]}


def test_default_planner_values_are_stored_without_pickle(tmp_path: Path) -> None:
    """Bytes, BytesIO, tuples holding tensors and nested dicts of values round-trip under DCP's default planners."""
    state = {
        "w": torch.arange(3.0),
        "blob": io.BytesIO(b"\x00raw"),
        "raw": b"yy",
        "nested": {"pair": (torch.ones(2, dtype=torch.int64), 2), "empty": b"", "nan": float("nan")},
    }
    dcp.save(state, storage_writer=mcd.ManifestStorageWriter(tmp_path / "ck"), no_dist=True)
    mc.verify(tmp_path / "ck")
    manifest = mc.read_manifest(tmp_path / "ck")
    assert sorted(manifest.tensors) == ["blob", "nested.empty", "nested.pair.0", "raw", "w"]
    target: dict[str, Any] = {"w": torch.zeros(3), "blob": None, "raw": None, "nested": {"pair": None, "empty": 1, "nan": 0}}
    dcp.load(target, storage_reader=mcd.ManifestStorageReader(tmp_path / "ck"), no_dist=True)
    assert torch.equal(target["w"], torch.arange(3.0))
    assert (target["blob"].getvalue(), target["raw"], target["nested"]["empty"]) == (b"\x00raw", b"yy", b"")
    pair = target["nested"]["pair"]
    assert isinstance(pair, tuple) and torch.equal(pair[0], torch.ones(2, dtype=torch.int64)) and pair[1] == 2
    assert math.isnan(target["nested"]["nan"])


def test_default_planner_and_ours_write_the_same_checkpoint(tmp_path: Path) -> None:
    """PyTorch's get_state_dict recipe through DCP's default planner gives the checkpoint mcd.save gives, digest for digest."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    optim.step()
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd, "progress": {"step": 1}}
    ours = mcd.save(copy.deepcopy(state), tmp_path / "ours", record_code=False)
    writer = mcd.ManifestStorageWriter(tmp_path / "default", record_code=False)
    dcp.save(copy.deepcopy(state), storage_writer=writer, no_dist=True)
    assert mc.read_manifest(tmp_path / "default").digest == ours.digest
    assert ours.state is not None and ours.format_version == "1.1.0"


def test_a_value_that_needs_pickle_is_refused_by_key_and_nothing_is_left(tmp_path: Path) -> None:
    """Deliberate refusal: an object DCP's default planner would pickle gives UnsupportedValueError naming its key.

    DCP wraps every writer error in its CheckpointException; nothing is left at the path or beside it.
    """
    with pytest.raises(CheckpointException) as info:
        state = {"w": torch.ones(2), "opt": {"obj": object()}}
        dcp.save(state, storage_writer=mcd.ManifestStorageWriter(tmp_path / "ck"), no_dist=True)
    (error, _), = info.value.failures.values()
    assert isinstance(error, UnsupportedValueError) and error.keys == ("opt.obj",)
    assert "opt.obj (builtins.object)" in str(error)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_writer_options_it_cannot_honour_are_refused(tmp_path: Path) -> None:
    """serialization_format=TORCH_SAVE is refused (the files are safetensors); SAFETENSORS is what it writes."""
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    with pytest.raises(mc.UnsupportedOptionError, match=r"serialization_format=SerializationFormat\.TORCH_SAVE"):
        mcd.ManifestStorageWriter(tmp_path / "ck", serialization_format=SerializationFormat.TORCH_SAVE)
    writer = mcd.ManifestStorageWriter(tmp_path / "ck", serialization_format=SerializationFormat.SAFETENSORS)
    dcp.save({"w": torch.ones(2)}, storage_writer=writer, no_dist=True)
    mc.verify(tmp_path / "ck")
