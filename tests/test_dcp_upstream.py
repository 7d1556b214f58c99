"""PyTorch's own DCP file-system scenarios, run with this library's StorageWriter/Reader substituted.

The scenarios follow ``test/distributed/checkpoint/test_file_system_checkpoint.py`` of
pytorch/pytorch (BSD-3-Clause): ``test_read_write_only_tensor`` (both ``single_file_per_rank``
settings) and ``test_save_load_bytes`` (non-tensor values), written again here for one CPU
process (upstream runs the second on two GPUs). Plain ``torch.distributed.checkpoint.save`` and
``load`` are called with DCP's default planners, as a user of DCP calls them; only the storage
classes are ours (for non-tensor values, our save planner too). Deliberate refusals: DCP's
default save planner pickles non-tensor values, which the writer refuses with
``UnsupportedTensorError`` (inside DCP's ``CheckpointException``, as DCP wraps every writer
error; ``manifest_ckpt.distributed.save`` unwraps it); and, tested in tests/test_distributed.py, the stream
``_extensions`` of upstream's ``test_read_write_shard_tensor`` (``Rot13Example``, ``ZStandard``)
raise ``UnsupportedOptionError`` rather than being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import manifest_ckpt as mc
from manifest_ckpt import distributed as mcd


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
    """Non-tensor values (upstream's "bytes" entries) are stored as JSON, not pickled, and loaded in place.

    Saving needs our save planner: DCP's default one hands the writer each such value
    already pickled (``torch.save`` into a BytesIO), which this library never stores.
    """
    state = {"bytes0": [1], "bytes1": "string"}
    writer = mcd.ManifestStorageWriter(tmp_path / "ck")
    dcp.save(state, storage_writer=writer, planner=mcd.ManifestSavePlanner(), no_dist=True)
    target: dict[str, Any] = {"bytes0": [2], "bytes1": "other"}
    dcp.load(target, storage_reader=mcd.ManifestStorageReader(tmp_path / "ck"), no_dist=True)
    assert target == {"bytes0": [1], "bytes1": "string"}
    assert mc.load_file(tmp_path / "ck") == {"bytes0": [1], "bytes1": "string"}


def test_save_load_bytes_under_dcps_default_planner_is_refused_typed(tmp_path: Path) -> None:
    """Deliberate refusal: the pickled values of DCP's default planner give our typed error, naming the key."""
    with pytest.raises(CheckpointException) as info:
        dcp.save({"bytes0": [1]}, storage_writer=mcd.ManifestStorageWriter(tmp_path / "ck"), no_dist=True)
    (error, _), = info.value.failures.values()
    assert isinstance(error, mc.UnsupportedTensorError) and "'bytes0' is not a tensor" in str(error)
    assert not (tmp_path / "ck" / "manifest.json").exists()
