"""PyTorch's own DCP tests, run with this library's StorageWriter/Reader substituted.

The scenarios of pytorch/pytorch's ``test/distributed/checkpoint`` (BSD-3-Clause) that run on
CPU, written again here (not copied): ``test_file_system_checkpoint_cpu.py``,
``e2e/test_e2e_save_and_load.py``, ``test_format_utils.py`` and ``test_dtensor_resharding.py``.
Plain ``torch.distributed.checkpoint.save`` / ``load`` / ``async_save`` are called with DCP's
default planners, as a user of DCP calls them; only the storage classes are ours
(``ManifestStorageWriter(path, overwrite=True)`` where upstream relies on
``FileSystemWriter``'s default ``overwrite=True``). The multi-rank ones start real gloo
process groups on 127.0.0.1: 2 ranks for the file-system and e2e files, 4 for DTensor
resharding (upstream's world sizes). Values are compared bit for bit where upstream allows a
tolerance. Upstream's GPU-only model types are run with their CPU equivalents: FSDP2's
``fully_shard`` for FSDP1 (``FullyShardedDataParallel`` needs a GPU), and a 2x2 ``fully_shard``
mesh for HSDP.

Deliberate refusals, asserted as this library's typed errors (inside DCP's
``CheckpointException``, as DCP wraps every storage error), are listed in the README
("Distributed training"): a silent dtype cast (``ModelMismatchError``, narrowing and widening
alike, unless ``ManifestLoadPlanner(cast=True)``); stream ``_extensions`` (``Rot13Example``,
``ZStandard``: ``UnsupportedOptionError``); a value that would need pickle
(``UnsupportedValueError`` naming its key); ``serialization_format=TORCH_SAVE``; and saving over
a checkpoint without ``overwrite=True`` (``CheckpointExistsError``). Not ported:
upstream's ``test_online_torch_save_to_dcp`` (its reader is torch's own
``BroadcastingTorchSaveReader``, not a storage of ours), the ``PROCESS`` async checkpointer, and
``cache_staged_state_dict=True`` (torch's stager pins memory, which needs an accelerator; it fails
the same way with ``FileSystemWriter`` on CPU).

Run as a script, this file is one rank of a run: ``python tests/test_dcp_upstream.py SUITE RANK
WORLD PORT DIRECTORY`` (see tests/_ranks.py).
"""

from __future__ import annotations

import copy
import functools
import io
import math
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

import manifest_ckpt as mc
from manifest_ckpt import distributed as mcd
from manifest_ckpt.errors import CheckpointExistsError, UnsupportedValueError
from tests import _ranks

HERE = Path(__file__).resolve()


def _writer(path: Path, **options: Any) -> mcd.ManifestStorageWriter:
    """Our writer where upstream has ``FileSystemWriter`` (whose default replaces a checkpoint)."""
    return mcd.ManifestStorageWriter(path, overwrite=True, record_code=False, **options)


def _reader(path: Path) -> mcd.ManifestStorageReader:
    return mcd.ManifestStorageReader(path)


def _same(a: Any, b: Any) -> bool:
    """Equal bit for bit: tensors in dtype, shape and bytes; containers and values exactly."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


class UpstreamModule(nn.Module):
    """The layers of upstream's ``MyTestModule``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(5, 5)
        self.linear_2 = nn.Linear(5, 1)
        self.emb = nn.EmbeddingBag(5, 10)


class DummyModel(nn.Module):
    """The four layers of upstream's e2e ``TestDummyModel`` (seeded in ``__init__``, as there)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net1 = nn.Linear(8, 16)
        self.net2 = nn.Linear(16, 32)
        self.net3 = nn.Linear(32, 64)
        self.net4 = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.net1, self.net2, self.net3, self.net4):
            x = F.relu(layer(x))
        return x


class UnevenModel(nn.Module):
    """Upstream format-utils' ``SimpleModelUneven``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net1 = nn.Linear(5, 10)
        self.net2 = nn.Linear(10, 15)
        self.net3 = nn.Linear(15, 30)
        self.net4 = nn.Linear(30, 5)


class BlobState:
    """Upstream's ``BlobState``: a Stateful holding one byte string."""

    def __init__(self, value: bytes) -> None:
        self.state = {"blob": value}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = state_dict


class StatefulTensor:
    """Upstream e2e's ``TestStatefulObj``: arbitrary Stateful state."""

    def __init__(self) -> None:
        self.data = torch.rand(10, 10)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.data = state_dict["data"]


class TrainState:
    """Upstream e2e's ``TestTrainState``: tensors and a BytesIO its owner filled with ``torch.save``.

    The stream is the object's own business: stored as its raw bytes, handed back as a BytesIO.
    """

    def __init__(self) -> None:
        self.step = 0
        self.current_loss = -1.0
        self.losses: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        losses = io.BytesIO()
        torch.save(self.losses, losses)
        return {
            "step": torch.tensor(self.step, dtype=torch.int32),
            "current_loss": torch.tensor(self.current_loss, dtype=torch.float32),
            "losses": losses,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"].item())
        self.current_loss = float(state_dict["current_loss"].item())
        state_dict["losses"].seek(0)
        self.losses = torch.load(state_dict["losses"])

    def key(self) -> tuple[int, float, list[float]]:
        return self.step, self.current_loss, self.losses


def _train(model: nn.Module, optim: torch.optim.Optimizer, steps: int) -> tuple[torch.Tensor, TrainState]:
    """Upstream e2e's ``_train``."""
    torch.manual_seed(0)
    loss = torch.zeros(())
    state = TrainState()
    for _ in range(steps):
        loss = model(torch.rand(8, 8)).sum()
        loss.backward()
        state.step += 1
        state.current_loss = torch.rand(1).item()
        state.losses.append(state.current_loss)
        optim.step()
        optim.zero_grad()
    return loss, state


# -- test_file_system_checkpoint_cpu.py, in one process ------------------------------------------
@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("single_file_per_rank", [True, False])
def test_read_write_only_tensor(tmp_path: Path, single_file_per_rank: bool, thread_count: int) -> None:
    """Upstream's ``test_read_write_only_tensor``: a module's tensors save and load back bit for bit."""
    saved = UpstreamModule().state_dict()
    writer = _writer(tmp_path / "ck", single_file_per_rank=single_file_per_rank, thread_count=thread_count)
    dcp.save(saved, storage_writer=writer, no_dist=True)
    target = UpstreamModule().state_dict()
    assert not _same(target, saved)
    dcp.load(target, storage_reader=_reader(tmp_path / "ck"), no_dist=True)
    assert _same(target, saved)
    mc.verify(tmp_path / "ck")


def test_dtype_mismatch_casting_is_refused_both_ways(tmp_path: Path) -> None:
    """Upstream's ``test_dtype_mismatch_casting``. Deliberate refusal: no silent cast, narrowing or widening.

    DCP's default planner casts float32 into a bfloat16 template; our reader refuses before any
    copy (``ModelMismatchError`` naming the key). ``ManifestLoadPlanner(cast=True)`` opts in.
    """
    dcp.save({"w": torch.rand(4, 3)}, storage_writer=_writer(tmp_path / "fp32"), no_dist=True)
    dcp.save({"w": torch.rand(4, 3).to(torch.bfloat16)}, storage_writer=_writer(tmp_path / "bf16"), no_dist=True)
    for path, live, stored in (
        (tmp_path / "fp32", torch.bfloat16, "float32"),
        (tmp_path / "bf16", torch.float32, "bfloat16"),
    ):
        template = {"w": torch.zeros(4, 3, dtype=live)}
        with pytest.raises(CheckpointException) as info:
            dcp.load(template, storage_reader=_reader(path), no_dist=True)
        ((error, _),) = info.value.failures.values()
        assert isinstance(error, mc.ModelMismatchError)
        assert [(p.kind, p.key, p.found) for p in error.report.problems] == [("dtype", "w", stored)]
        assert not template["w"].any()
    template = {"w": torch.zeros(4, 3)}
    dcp.load(
        template, storage_reader=_reader(tmp_path / "bf16"), planner=mcd.ManifestLoadPlanner(cast=True), no_dist=True
    )
    assert template["w"].dtype == torch.float32 and template["w"].any()


@pytest.mark.parametrize("thread_count", [1, 2])
def test_read_write_tensor_and_blob(tmp_path: Path, thread_count: int) -> None:
    """Upstream's Rot13 / ZStandard tests: a BlobState beside the tensors round-trips; stream extensions are refused.

    Deliberate refusal: ``_extensions`` raise ``UnsupportedOptionError`` when the writer is built.
    """
    from torch.testing._internal.distributed.checkpoint_utils import Rot13Example

    with pytest.raises(mc.UnsupportedOptionError, match="_extensions=Rot13Example is not supported"):
        mcd.ManifestStorageWriter(tmp_path / "ck", _extensions=[Rot13Example()])
    assert not (tmp_path / "ck").exists()
    saved: dict[str, Any] = {**UpstreamModule().state_dict(), "test_blob": BlobState(b"SomeBlobForTesting")}
    dcp.save(saved, storage_writer=_writer(tmp_path / "ck", thread_count=thread_count), no_dist=True)
    target: dict[str, Any] = {**UpstreamModule().state_dict(), "test_blob": BlobState(b"")}
    dcp.load(target, storage_reader=_reader(tmp_path / "ck"), no_dist=True)
    assert target["test_blob"].state == {"blob": b"SomeBlobForTesting"}
    assert _same(
        {k: v for k, v in target.items() if k != "test_blob"}, {k: v for k, v in saved.items() if k != "test_blob"}
    )


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
    target: dict[str, Any] = {
        "w": torch.zeros(3),
        "blob": None,
        "raw": None,
        "nested": {"pair": None, "empty": 1, "nan": 0},
    }
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
    ((error, _),) = info.value.failures.values()
    assert isinstance(error, UnsupportedValueError) and error.keys == ("opt.obj",)
    assert "opt.obj (builtins.object)" in str(error)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_a_sparse_tensor_under_dcps_default_planner_is_refused_by_key(tmp_path: Path, layout: str) -> None:
    """Deliberate refusal: a sparse tensor gives UnsupportedTensorError naming it, before this rank writes."""
    dense = torch.eye(3)
    value = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    with pytest.raises(CheckpointException) as info:
        dcp.save({"w": dense, "opt": {"s": value}}, storage_writer=mcd.ManifestStorageWriter(tmp_path / "ck"), no_dist=True)
    ((error, _),) = info.value.failures.values()
    assert isinstance(error, mc.UnsupportedTensorError) and f"'opt.s' has layout torch.sparse_{layout}" in str(error)
    assert list(tmp_path.iterdir()) == []


def test_a_value_tensor_under_a_state_dict_key_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    """A tuple's tensor whose dotted key ("a.0") is also a state-dict key: refused by key when the
    manifest is built (after every rank wrote), and the staging directory beside the path goes too."""
    with pytest.raises(CheckpointException) as info:
        state = {"a": (torch.ones(1), 2), "a.0": torch.zeros(1)}
        dcp.save(state, storage_writer=mcd.ManifestStorageWriter(tmp_path / "ck"), no_dist=True)
    ((error, _),) = info.value.failures.values()
    assert isinstance(error, UnsupportedValueError) and error.keys == ("a.0",)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_writer_options_it_cannot_honour_are_refused(tmp_path: Path) -> None:
    """serialization_format=TORCH_SAVE is refused (the files are safetensors); SAFETENSORS is what it writes."""
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    with pytest.raises(mc.UnsupportedOptionError, match=r"serialization_format=SerializationFormat\.TORCH_SAVE"):
        mcd.ManifestStorageWriter(tmp_path / "ck", serialization_format=SerializationFormat.TORCH_SAVE)
    writer = mcd.ManifestStorageWriter(tmp_path / "ck", serialization_format=SerializationFormat.SAFETENSORS)
    dcp.save({"w": torch.ones(2)}, storage_writer=writer, no_dist=True)
    mc.verify(tmp_path / "ck")


# -- e2e/test_e2e_save_and_load.py, in one process -----------------------------------------------
def test_stateful_and_non_stateful_loads(tmp_path: Path) -> None:
    """Upstream's test: a Stateful entry is loaded in place (not replaced); a plain dict entry is replaced."""

    class StateDict(dict[str, Any]):
        def __init__(self) -> None:
            super().__init__()
            self.set_item_called = False

        def __setitem__(self, key: str, value: Any) -> None:
            self.set_item_called = True
            super().__setitem__(key, value)

    class Foo:
        def __init__(self) -> None:
            self.loaded = False

        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.loaded = True

    foo, sd = Foo(), StateDict()
    sd["foo"] = foo
    sd.set_item_called = False
    dcp.save(sd, storage_writer=_writer(tmp_path / "ck"), no_dist=True)
    dcp.load(sd, storage_reader=_reader(tmp_path / "ck"), no_dist=True)
    assert foo.loaded and not sd.set_item_called
    sd = StateDict()
    sd["foo"] = {"replicated": torch.rand(10, 10), "bytes": [1, 2, 3, 4]}
    sd.set_item_called = False
    dcp.save(sd, storage_writer=_writer(tmp_path / "ck"), no_dist=True)
    dcp.load(sd, storage_reader=_reader(tmp_path / "ck"), no_dist=True)
    assert sd.set_item_called and sd["foo"]["bytes"] == [1, 2, 3, 4]


def test_no_dist_empty_state(tmp_path: Path) -> None:
    """Upstream's ``test_no_dist``: an empty state saves and loads."""
    dcp.save({}, storage_writer=_writer(tmp_path / "ck"), no_dist=True)
    target: dict[str, Any] = {}
    dcp.load(target, storage_reader=_reader(tmp_path / "ck"), no_dist=True)
    assert target == {} and mc.load_file(tmp_path / "ck") == {}


def test_init_state_dict(tmp_path: Path) -> None:
    """Upstream's ``test_init_state_dict``: get_*_state_dict load in place; set_state_dict restores the lr."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_state_dict

    model = DummyModel()
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    saved = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optim)}
    dcp.save(saved, storage_writer=_writer(tmp_path / "ck"), no_dist=True)
    torch.manual_seed(0)
    model_2 = DummyModel()
    optim_2 = torch.optim.Adam(model_2.parameters(), lr=0.2)
    msd, osd = get_model_state_dict(model_2), get_optimizer_state_dict(model_2, optim_2)
    target = {"model": msd, "optimizer": osd}
    dcp.load(target, storage_reader=_reader(tmp_path / "ck"), no_dist=True)
    assert target["model"] is msd and target["optimizer"] is osd
    set_state_dict(model_2, optim_2, model_state_dict=msd, optim_state_dict=osd)
    assert _same(msd, get_model_state_dict(model_2)) and _same(osd, get_optimizer_state_dict(model_2, optim_2))
    assert optim_2.param_groups[0]["lr"] == 0.1


# -- test_format_utils.py -------------------------------------------------------------------------
def test_dcp_to_torch_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream's ``test_dcp_to_torch_save``: our checkpoint converts to ``{"model": model.state_dict()}``."""
    from torch.distributed.checkpoint import format_utils

    model = UnevenModel()
    dcp.save({"model": model}, storage_writer=_writer(tmp_path / "ck"), no_dist=True)
    monkeypatch.setattr(format_utils, "FileSystemReader", mcd.ManifestStorageReader)
    format_utils.dcp_to_torch_save(tmp_path / "ck", tmp_path / "model.pt")
    assert _same(torch.load(tmp_path / "model.pt"), {"model": dict(model.state_dict())})


def test_torch_save_to_dcp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream's ``test_torch_save_to_dcp``: a torch.save file converted by our writer loads into the model."""
    from torch.distributed.checkpoint import format_utils

    saved = {"model": UnevenModel().state_dict()}
    torch.save(saved, tmp_path / "model.pt")
    monkeypatch.setattr(format_utils, "FileSystemWriter", mcd.ManifestStorageWriter)
    format_utils.torch_save_to_dcp(tmp_path / "model.pt", tmp_path / "ck")
    mc.verify(tmp_path / "ck")
    torch.manual_seed(1)
    model = nn.Module()
    model.add_module("net1", nn.Linear(5, 10))
    model.add_module("net2", nn.Linear(10, 15))
    model.add_module("net3", nn.Linear(15, 30))
    model.add_module("net4", nn.Linear(30, 5))
    dcp.load({"model": model}, storage_reader=_reader(tmp_path / "ck"), no_dist=True)
    assert _same({"model": dict(model.state_dict())}, {"model": dict(saved["model"])})


# -- the ranks' side ------------------------------------------------------------------------------
def _cases(cases: dict[str, Callable[[], None]]) -> dict[str, Any]:
    """Run every case on this rank, recording "ok" or the failure (one failing case does not stop the rest)."""
    out: dict[str, Any] = {}
    for name, case in cases.items():
        try:
            case()
            out[name] = "ok"
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to report
            out[name] = "".join(traceback.format_exception(exc))[-3000:]
    return out


def _shared_dir(directory: Path, name: str) -> Path:
    path = directory / name
    path.mkdir(exist_ok=True)
    return path


def _file_system_suite(rank: int, world: int, directory: Path) -> dict[str, Any]:
    """test_file_system_checkpoint_cpu.py's multi-rank tests (ShardedTensor, resharding, bytes) on 2 ranks."""
    import torch.distributed as dist
    from torch.distributed._shard import sharded_tensor
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec, EnumerableShardingSpec, ShardMetadata

    def gathered(tensor: ShardedTensor) -> torch.Tensor | None:
        out = torch.zeros(tensor.shape) if rank == 0 else None
        tensor.gather(out=out)
        return out

    def chunk(dim: int, *ranks: int) -> ChunkShardingSpec:
        return ChunkShardingSpec(dim=dim, placements=[f"rank:{r}" for r in ranks])

    def enumerable(*shards: tuple[list[int], list[int], int]) -> EnumerableShardingSpec:
        return EnumerableShardingSpec([ShardMetadata(off, size, f"rank:{r}") for off, size, r in shards])

    grid_specs = [
        chunk(0, 0, 1),
        chunk(0, 0, 1, 1, 0),
        enumerable(
            ([0, 0], [2, 20], 0), ([2, 0], [1, 20], 1), ([3, 0], [3, 20], 0), ([6, 0], [3, 20], 1), ([9, 0], [1, 20], 0)
        ),
        enumerable(([0, 0], [8, 20], 1), ([8, 0], [2, 20], 0)),
    ]
    line_specs = [
        chunk(0, 0, 1),
        chunk(0, 0, 1, 1, 0),
        enumerable(([0], [8], 1), ([8], [24], 0)),
        enumerable(([0], [10], 0), ([10], [22], 1)),
    ]

    def read_write_shard_tensor(thread_count: int) -> None:
        path = _shared_dir(directory, f"shard-{thread_count}")
        spec = chunk(0, 0, 1)
        torch.manual_seed(0)
        saved = {
            "sharded_tensor1": sharded_tensor.rand(spec, 10, 20, init_rrefs=False),
            "param": torch.rand(10, 20),
            "submodule.sharded_tensor2": sharded_tensor.rand(spec, 10, 20, init_rrefs=False),
        }
        dcp.save(saved, storage_writer=_writer(path, thread_count=thread_count))
        target = {
            "sharded_tensor1": sharded_tensor.zeros(spec, 10, 20, init_rrefs=False),
            "param": torch.zeros(10, 20),
            "submodule.sharded_tensor2": sharded_tensor.zeros(spec, 10, 20, init_rrefs=False),
        }
        dcp.load(target, storage_reader=_reader(path))
        for key in ("sharded_tensor1", "submodule.sharded_tensor2"):
            mine = [s.tensor for s in target[key].local_shards()]
            theirs = [s.tensor for s in saved[key].local_shards()]
            assert len(mine) == len(theirs) and all(_same(a, b) for a, b in zip(mine, theirs)), key
        assert _same(target["param"], saved["param"])
        whole = [gathered(saved["sharded_tensor1"])]
        dist.barrier()
        if rank == 0:  # an ordinary checkpoint: read whole without DCP
            assert _same(mc.load_file(path, verify_digests=True)["sharded_tensor1"], whole[0])

    def load_with_different_shard_plan(thread_count: int) -> None:
        path = _shared_dir(directory, f"plan-{thread_count}")
        for i, s0 in enumerate(grid_specs):
            for j, s1 in enumerate(grid_specs):
                if i == j:
                    continue
                saved = sharded_tensor.rand(s0, 10, 20, init_rrefs=False)
                dcp.save({"sharded_tensor": saved}, storage_writer=_writer(path, thread_count=thread_count))
                loaded = sharded_tensor.zeros(s1, 10, 20, init_rrefs=False)
                dcp.load({"sharded_tensor": loaded}, storage_reader=_reader(path))
                a, b = gathered(saved), gathered(loaded)
                if rank == 0:
                    assert _same(a, b), (i, j)

    def load_rowwise_to_colwise(thread_count: int) -> None:
        path = _shared_dir(directory, f"rowcol-{thread_count}")
        saved = sharded_tensor.rand(chunk(0, 0, 1), 10, 20, init_rrefs=False)
        dcp.save({"sharded_tensor": saved}, storage_writer=_writer(path, thread_count=thread_count))
        loaded = sharded_tensor.zeros(chunk(1, 0, 1), 10, 20, init_rrefs=False)
        dcp.load({"sharded_tensor": loaded}, storage_reader=_reader(path))
        a, b = gathered(saved), gathered(loaded)
        if rank == 0:
            assert _same(a, b)

    def save_load_bytes(thread_count: int) -> None:
        path = _shared_dir(directory, f"bytes-{thread_count}")
        dcp.save({"bytes0": [1], "bytes1": "string"}, storage_writer=_writer(path, thread_count=thread_count))
        target: dict[str, Any] = {"bytes0": [2], "bytes1": "other"}
        dcp.load(target, storage_reader=_reader(path))
        assert target == {"bytes0": [1], "bytes1": "string"}

    def switch_between_sharded_tensor_to_tensor(thread_count: int) -> None:
        path = _shared_dir(directory, f"switch-{thread_count}")
        for i, save_spec in enumerate(line_specs):
            for j, load_spec in enumerate(line_specs):
                saved = {"sharded": sharded_tensor.rand(save_spec, 32, init_rrefs=False), "replicated": torch.rand(32)}
                dist.broadcast(saved["replicated"], src=0)
                dcp.save(saved, storage_writer=_writer(path, thread_count=thread_count))
                target = {
                    "sharded": torch.zeros(32),
                    "replicated": sharded_tensor.zeros(load_spec, 32, init_rrefs=False),
                }
                dcp.load(target, storage_reader=_reader(path))
                a, b = gathered(saved["sharded"]), gathered(target["replicated"])
                if rank == 0:
                    assert a is not None and _same(a, target["sharded"]), (i, j)
                    assert _same(saved["replicated"], b), (i, j)

    cases: dict[str, Callable[[], None]] = {}
    for tc in (1, 2):
        for case in (
            read_write_shard_tensor,
            load_with_different_shard_plan,
            load_rowwise_to_colwise,
            save_load_bytes,
            switch_between_sharded_tensor_to_tensor,
        ):
            cases[f"{case.__name__}[{tc}]"] = functools.partial(case, tc)
    return _cases(cases)


def _dist_model(kind: str, world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """upstream's ``_create_model`` for ``kind`` (NONE, DDP, FSDP: fully_shard, HSDP: a 2-D fully_shard mesh)."""
    from torch.distributed.checkpoint.state_dict import _patch_model_state_dict, _patch_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    model: nn.Module = DummyModel()
    if kind == "DDP":
        model = DistributedDataParallel(model)
    elif kind == "FSDP":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    elif kind == "HSDP":
        fully_shard(model, mesh=init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")))
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    if kind != "NONE":
        _patch_model_state_dict(model)
        _patch_optimizer_state_dict(model, optimizers=optim)
    return model, optim


def _full(state: Any) -> Any:
    """A state dict with every DTensor gathered whole (collective: all ranks call it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return state.full_tensor()
    if isinstance(state, dict):
        return {k: _full(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_full(v) for v in state]
    return state


def _e2e(kind: str, world: int, path: Path, *, async_op: bool = False) -> None:
    """Upstream's ``_run_e2e_test``: train, save model, optimizer and Stateful objects, load fresh, train on."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = _dist_model("NONE", world)
    _train(model, optim, 2)
    dist_model, dist_optim = _dist_model(kind, world)
    _, train_state = _train(dist_model, dist_optim, 2)
    stateful = StatefulTensor()
    before = _full(get_state_dict(dist_model, optimizers=dist_optim))
    sd = {"model": dist_model, "optimizer": dist_optim, "s": stateful, "train_state": train_state}
    if async_op:
        dcp.async_save(sd, storage_writer=_writer(path)).result()
    else:
        dcp.save(sd, storage_writer=_writer(path))
    loaded_stateful, loaded_train = StatefulTensor(), TrainState()
    dist_model, dist_optim = _dist_model(kind, world)
    target = {"model": dist_model, "optimizer": dist_optim, "s": loaded_stateful, "train_state": loaded_train}
    dcp.load(target, storage_reader=_reader(path))
    assert _same(loaded_stateful.data, stateful.data)
    assert loaded_train.key() == train_state.key()
    assert _same(_full(get_state_dict(dist_model, optimizers=dist_optim)), before)
    loss, _ = _train(model, optim, 1)
    dist_loss, _ = _train(dist_model, dist_optim, 1)
    torch.testing.assert_close(loss, dist_loss)  # upstream's check: the sharded run goes on as the plain one
    msd, _ = get_state_dict(model, optimizers=optim)
    dist_msd, _ = get_state_dict(dist_model, optimizers=dist_optim)
    torch.testing.assert_close(_full(dist_msd), msd)


def _e2e_suite(rank: int, world: int, directory: Path) -> dict[str, Any]:
    """e2e/test_e2e_save_and_load.py's multi-rank tests on 2 ranks."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    def partial_load() -> None:
        path = _shared_dir(directory, "partial")
        model, optim = _dist_model("NONE", world)
        _train(model, optim, 2)
        dist_model, dist_optim = _dist_model("FSDP", world)
        _train(dist_model, dist_optim, 2)
        dcp.save({"model": dist_model, "optimizer": dist_optim}, storage_writer=_writer(path))
        dist_model, _ = _dist_model("FSDP", world)
        dcp.load({"model": dist_model}, storage_reader=_reader(path))
        want = dict(get_model_state_dict(model))
        assert _same(_full(dict(get_model_state_dict(dist_model))), want)
        whole = _load_state_dict_from_keys("model", storage_reader=_reader(path))["model"]
        assert _same(whole, want)
        state = _load_state_dict_from_keys("optimizer.state", storage_reader=_reader(path))["optimizer"]["state"]
        assert "param_groups" not in state
        live = _full(dist_optim.state_dict()["state"])
        for name, per_param in live.items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert _same(state[name][key], per_param[key]), (name, key)

    def different_ordered_state_dict_keys() -> None:
        path = _shared_dir(directory, "ordered")

        class Foo:
            def state_dict(self) -> dict[str, Any]:
                return {}

            def load_state_dict(self, state_dict: dict[str, Any]) -> None:
                out = [torch.ones(2, dtype=torch.int64) for _ in range(world)]
                dist.all_gather(out, torch.arange(2) + 1 + 2 * rank)

        class Bar:
            def state_dict(self) -> dict[str, Any]:
                return {}

            def load_state_dict(self, state_dict: dict[str, Any]) -> None:
                dist.all_reduce(torch.arange(2) + 1 + 2 * rank)

        sd: dict[str, Any] = {"A": Foo(), "B": Bar()} if rank == 0 else {"B": Bar(), "A": Foo()}
        dcp.save(sd, storage_writer=_writer(path))
        dcp.load(sd, storage_reader=_reader(path))

    def overwrite() -> None:
        """Upstream's ``test_overwrite``; deliberate difference: replacing needs ``overwrite=True`` (torch's default)."""
        path = _shared_dir(directory, "overwrite")
        t1, t2 = torch.randn(10), torch.randn(10)
        dist.broadcast(t1, src=0)
        dist.broadcast(t2, src=0)
        dcp.save({"random": t1}, storage_writer=_writer(path))
        dcp.save({"random": t2}, storage_writer=mcd.ManifestStorageWriter(path, overwrite=True))
        sd = {"random": torch.zeros(10)}
        dcp.load(sd, storage_reader=_reader(path))
        assert _same(sd["random"], t2)
        try:
            dcp.save({"random": t1}, storage_writer=mcd.ManifestStorageWriter(path))
        except CheckpointException as exc:
            errors = [e for e, _ in exc.failures.values()]
            assert errors and all(isinstance(e, CheckpointExistsError) for e in errors), errors
            assert "pass overwrite=True to replace it" in str(errors[0])
        else:
            raise AssertionError("saving over a checkpoint without overwrite=True was not refused")
        assert _same(mc.load_file(path)["random"], t2)

    cases: dict[str, Callable[[], None]] = {
        f"e2e[{kind}]": functools.partial(_e2e, kind, world, _shared_dir(directory, f"e2e-{kind}"))
        for kind in ("DDP", "FSDP")
    }
    # cache_staged_state_dict=True pins memory, which torch's stager cannot do without an accelerator.
    cases["e2e_async_cached[False]"] = lambda: _e2e("FSDP", world, _shared_dir(directory, "e2e-async"), async_op=True)
    cases["partial_load"] = partial_load
    cases["different_ordered_state_dict_keys"] = different_ordered_state_dict_keys
    cases["overwrite"] = overwrite
    return _cases(cases)


def _dtensor_suite(rank: int, world: int, directory: Path) -> dict[str, Any]:
    """test_dtensor_resharding.py on 4 ranks (1-D mesh of 4, 2-D mesh of 2x2), and e2e's HSDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, zeros

    one_d: list[list[Any]] = [[Shard(0)], [Replicate()]]
    two_d: list[list[Any]] = [
        [Replicate(), Replicate()],
        [Replicate(), Shard(0)],
        [Shard(0), Replicate()],
        [Shard(0), Shard(0)],
    ]
    whole = torch.arange(16, dtype=torch.float).view(4, 4)

    def reshard(
        path: Path, save_shape: tuple[int, ...], save_at: list[Any], load_shape: tuple[int, ...], load_at: list[Any]
    ) -> None:
        save_mesh = init_device_mesh("cpu", save_shape)
        saved = {"dtensor": distribute_tensor(whole, save_mesh, placements=save_at)}
        dcp.save(saved, storage_writer=_writer(path))
        load_mesh = init_device_mesh("cpu", load_shape)
        target = {"dtensor": zeros([4, 4], device_mesh=load_mesh, placements=load_at)}
        dcp.load(target, storage_reader=_reader(path))
        assert _same(target["dtensor"].full_tensor(), whole)
        if save_shape == load_shape:  # back to the saved placement: the same local shard
            back = target["dtensor"].redistribute(save_mesh, placements=save_at)
            assert _same(back.to_local(), saved["dtensor"].to_local())

    def placement_change(shape: tuple[int, ...], pairs: list[tuple[list[Any], list[Any]]], name: str) -> None:
        for i, (a, b) in enumerate(pairs):
            reshard(_shared_dir(directory, f"{name}-{i}"), shape, a, shape, b)

    def mesh_change(
        first: tuple[int, ...], firsts: list[list[Any]], then: tuple[int, ...], thens: list[list[Any]], name: str
    ) -> None:
        for i, a in enumerate(firsts):
            for j, b in enumerate(thens):
                reshard(_shared_dir(directory, f"{name}-{i}-{j}"), first, a, then, b)

    flat, grid = (world,), (2, world // 2)
    cases: dict[str, Callable[[], None]] = {
        "1d_to_1d_reshard_placement_change": lambda: placement_change(
            flat, [(one_d[1], one_d[0]), (one_d[0], one_d[1])], "p1"
        ),
        "2d_to_2d_reshard_placement_change": lambda: placement_change(
            grid, [(a, b) for a in two_d for b in two_d if a != b], "p2"
        ),
        "1d_to_2d_reshard_mesh_change": lambda: mesh_change(flat, one_d, grid, two_d, "m12"),
        "2d_to_1d_reshard_mesh_change": lambda: mesh_change(grid, two_d, flat, one_d, "m21"),
        "e2e[HSDP]": lambda: _e2e("HSDP", world, _shared_dir(directory, "e2e-HSDP")),
    }
    return _cases(cases)


def _two_rank_suite(rank: int, world: int, directory: Path) -> dict[str, Any]:
    """The file-system and e2e scenarios: one 2-rank run (starting ranks costs more than the cases)."""
    return {**_file_system_suite(rank, world, directory), **_e2e_suite(rank, world, directory)}


SUITES: dict[str, _ranks.Scenario] = {"two_ranks": _two_rank_suite, "dtensor": _dtensor_suite}
WORLD = {"two_ranks": 2, "dtensor": 4}
CASES = {
    "two_ranks": [
        f"{name}[{tc}]"
        for tc in (1, 2)
        for name in (
            "read_write_shard_tensor",
            "load_with_different_shard_plan",
            "load_rowwise_to_colwise",
            "save_load_bytes",
            "switch_between_sharded_tensor_to_tensor",
        )
    ]
    + [
        "e2e[DDP]",
        "e2e[FSDP]",
        "e2e_async_cached[False]",
        "partial_load",
        "different_ordered_state_dict_keys",
        "overwrite",
    ],
    "dtensor": [
        "1d_to_1d_reshard_placement_change",
        "2d_to_2d_reshard_placement_change",
        "1d_to_2d_reshard_mesh_change",
        "2d_to_1d_reshard_mesh_change",
        "e2e[HSDP]",
    ],
}


@pytest.fixture(scope="module")
def suite_results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], list[dict[str, Any]]]:
    """Each suite's run on real ranks, started once (on first use) for all its cases."""
    done: dict[str, list[dict[str, Any]]] = {}

    def results(suite: str) -> list[dict[str, Any]]:
        if suite not in done:
            done[suite] = _ranks.run_ranks(HERE, suite, WORLD[suite], tmp_path_factory.mktemp(suite), timeout=300)
        return done[suite]

    return results


@pytest.mark.distributed
@pytest.mark.parametrize(("suite", "case"), [(s, c) for s, cases in CASES.items() for c in cases])
def test_upstream_scenario_on_ranks(
    suite_results: Callable[[str], list[dict[str, Any]]], suite: str, case: str
) -> None:
    """An upstream multi-rank scenario, our storage substituted, passes on every rank."""
    ranks = suite_results(suite)
    assert all(set(r) == set(CASES[suite]) for r in ranks), [sorted(r) for r in ranks]
    failures = {rank: r[case] for rank, r in enumerate(ranks) if r[case] != "ok"}
    assert not failures, "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in failures.items())


if __name__ == "__main__":
    from tests.test_dcp_upstream import SUITES as suites

    _ranks.rank_main(suites, sys.argv[1:])
