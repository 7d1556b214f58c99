"""Tests for manifest_ckpt.background: async_save snapshots, then writes what save writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt import background
from manifest_ckpt.errors import CheckpointExistsError, SaveInProgressError, UnsupportedTensorError

REPO = Path(__file__).resolve().parents[1]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False), nn.BatchNorm1d(10))
    model[1].weight = model[0].weight  # a tie
    model.register_buffer("step", torch.tensor(3, dtype=torch.int64))
    model.register_buffer("scratch", torch.ones(2), persistent=False)
    model.add_module("bf16", nn.Linear(3, 5).to(torch.bfloat16))
    return model


def test_async_save_writes_the_bytes_of_a_sync_save_of_the_state_at_the_call(tmp_path: Path) -> None:
    """Tensors changed right after async_save returns do not reach the checkpoint: same bytes as save() before."""
    model = _model()
    expected = mc.save(model, tmp_path / "sync", record_code=False)
    future = mc.async_save(model, tmp_path / "async", record_code=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
        model.step += 1
    manifest = future.result(timeout=60)
    assert manifest == expected
    assert _files(tmp_path / "async") == _files(tmp_path / "sync")
    assert manifest.aliases == {"1.weight": "0.weight"}
    mc.verify(tmp_path / "async")


def test_async_save_of_a_state_dict_matches_save(tmp_path: Path) -> None:
    """A plain state dict (a non-contiguous tensor, an empty one, a tie) is saved as save() saves it."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"t": base.t(), "same": base, "again": base, "empty": torch.empty(0, 3), "i": torch.tensor([7], dtype=torch.int8)}
    mc.save(state, tmp_path / "sync", record_code=False, metadata={"epoch": 1})
    future = mc.async_save(state, tmp_path / "async", record_code=False, metadata={"epoch": 1})
    base.zero_()
    assert future.result(timeout=60).aliases == {"again": "same"}
    assert _files(tmp_path / "async") == _files(tmp_path / "sync")


class _Stateful(nn.Linear):
    """A layer whose extra state holds a tensor, bytes and a count."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.extra = {"scale": torch.ones(2), "raw": b"\x01", "n": 3}

    def get_extra_state(self) -> dict[str, object]:
        return self.extra

    def set_extra_state(self, state: dict[str, object]) -> None:
        self.extra = state


def test_module_extra_state_is_saved_as_save_saves_it(tmp_path: Path) -> None:
    """Extra state (a tensor in it changed right after the call) is staged too: the bytes of a sync save before."""
    torch.manual_seed(0)
    model = nn.Sequential(_Stateful(), nn.ReLU())
    expected = mc.save(model, tmp_path / "sync", record_code=False)
    future = mc.async_save(model, tmp_path / "async", record_code=False)
    model[0].extra["scale"].add_(5)
    model[0].extra["n"] = 4
    manifest = future.result(timeout=60)
    assert manifest == expected and list(manifest.extra_state) == ["0._extra_state"]
    assert _files(tmp_path / "async") == _files(tmp_path / "sync")
    fresh = nn.Sequential(_Stateful(), nn.ReLU())
    mc.load(fresh, tmp_path / "async")
    assert fresh[0].extra["n"] == 3 and torch.equal(fresh[0].extra["scale"], torch.ones(2))


def test_a_second_save_to_a_pending_path_raises_until_the_first_finishes(tmp_path: Path) -> None:
    """While a save to a path is pending, another async_save there raises SaveInProgressError naming the path."""
    release = threading.Event()

    def slow_source() -> dict[str, str]:
        release.wait(timeout=60)
        return {"format": "test"}

    state = {"w": torch.ones(3)}
    first = mc.async_save(state, tmp_path / "ck", record_code=False, source=slow_source)
    try:
        with pytest.raises(SaveInProgressError, match="ck: an async_save to this path is still running"):
            mc.async_save(state, tmp_path / "ck", record_code=False, overwrite=True)
        other = mc.async_save(state, tmp_path / "elsewhere", record_code=False)  # another path is fine
    finally:
        release.set()
    assert first.result(timeout=60).lineage["source"] == {"format": "test"}
    other.result(timeout=60)
    again = mc.async_save(state, tmp_path / "ck", record_code=False, overwrite=True)
    assert again.result(timeout=60).digest == first.result().digest


def test_errors_surface_on_result(tmp_path: Path) -> None:
    """What save would raise is raised by .result(): an existing path, a meta tensor."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("not a checkpoint")
    with pytest.raises(CheckpointExistsError, match="already exists"):
        mc.async_save({"w": torch.ones(1)}, tmp_path / "taken", record_code=False).result(timeout=60)
    with pytest.raises(UnsupportedTensorError, match="meta device"):
        mc.async_save({"w": torch.empty(2, device="meta")}, tmp_path / "meta", record_code=False).result(timeout=60)
    assert not (tmp_path / "meta").exists()
    with pytest.raises(TypeError, match="modules="):
        mc.async_save(nn.Linear(1, 1), tmp_path / "m", modules={})


def test_the_staging_buffer_is_reused_across_calls(tmp_path: Path) -> None:
    """A second save of the same size copies into the buffer the first one used."""
    state = {"w": torch.randn(1000)}
    mc.async_save(state, tmp_path / "a", record_code=False).result(timeout=60)
    (used,) = [b for b in background._free_buffers if b.numel() >= 4000]
    address = used.data_ptr()
    mc.async_save(state, tmp_path / "b", record_code=False).result(timeout=60)
    assert any(b.data_ptr() == address for b in background._free_buffers)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_repeated_saves_reuse_one_buffer_and_write_what_save_writes(tmp_path: Path) -> None:
    """A loop of async_save, change the weights at once, wait: each checkpoint has save's bytes for the state
    at its call, and every call after the first copies into the same staging buffer."""
    model = _model()
    pools = []
    for step in range(3):
        expected = mc.save(model, tmp_path / f"sync{step}", record_code=False)
        future = mc.async_save(model, tmp_path / f"async{step}", record_code=False)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-2.0)
        assert future.result(timeout=60) == expected
        assert _files(tmp_path / f"async{step}") == _files(tmp_path / f"sync{step}")
        # Handed back before the future resolved, so it is already there for the next call.
        pools.append({b.data_ptr() for b in background._free_buffers})
    assert pools[0] == pools[1] == pools[2]


def test_many_small_tensors_staged_in_bulk_are_bit_identical_and_independent(tmp_path: Path) -> None:
    """Small tensors staged by one unbind per dtype and shape (0-d, int, bfloat16, a NaN payload, ties) beside
    large, non-contiguous and conj ones: the bytes of save() at the call, whatever the caller changes after."""
    torch.manual_seed(6)
    model = nn.ModuleDict({f"n{i}": nn.LayerNorm(4) for i in range(30)})
    model.add_module("big", nn.Linear(200, 100))
    model.register_buffer("scalar", torch.tensor(2.5))
    model.register_buffer("count", torch.arange(4, dtype=torch.int64))
    model.register_buffer("b16", torch.randn(4, dtype=torch.bfloat16))
    model.register_buffer("nc", torch.randn(4, 6).t())
    model.register_buffer("cj", torch.randn(3, dtype=torch.complex64).conj())
    with torch.no_grad():
        model["n3"].bias.view(torch.int32)[0] = 0x7FC00123
    model["n7"].weight = model["n2"].weight  # a tie among the bulk-staged ones
    expected = mc.save(model, tmp_path / "sync", record_code=False)
    future = mc.async_save(model, tmp_path / "async", record_code=False)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.zero_()
    assert future.result(timeout=60) == expected
    assert _files(tmp_path / "async") == _files(tmp_path / "sync")
    assert expected.aliases == {"n7.weight": "n2.weight"}


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_process_that_exits_waits_for_its_pending_save(tmp_path: Path) -> None:
    """A script that returns right after async_save still leaves the complete checkpoint."""
    done = _run(
        f"""
        import torch, manifest_ckpt as mc
        mc.async_save({{"w": torch.arange(1 << 20, dtype=torch.float32)}}, {str(tmp_path / "ck")!r}, record_code=False)
        """
    )
    assert done.returncode == 0, done.stderr
    mc.verify(tmp_path / "ck")
    expected = mc.save({"w": torch.arange(1 << 20, dtype=torch.float32)}, tmp_path / "sync", record_code=False)
    assert mc.read_manifest(tmp_path / "ck").digest == expected.digest


def test_a_process_killed_during_the_save_leaves_no_checkpoint_that_verifies(tmp_path: Path) -> None:
    """Killed after the weights are written but before the manifest: no new checkpoint, the old one intact."""
    mc.save({"w": torch.zeros(4)}, tmp_path / "old", record_code=False)
    old = _files(tmp_path / "old")
    script = """
        import os, torch, manifest_ckpt as mc
        def die():
            os._exit(0)  # what kill -9 does: no cleanup, no atexit
        state = {{"w": torch.ones(1 << 16)}}
        f1 = mc.async_save(state, {new!r}, record_code=False, source=die)
        f1.result()
        """
    done = _run(script.format(new=str(tmp_path / "new")))
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "new").exists()
    done = _run(
        script.replace("mc.async_save(state, {new!r}", "mc.async_save(state, {new!r}, overwrite=True").format(
            new=str(tmp_path / "old")
        )
    )
    assert done.returncode == 0, done.stderr
    mc.verify(tmp_path / "old")
    assert (tmp_path / "old" / "manifest.json").read_bytes() == old["manifest.json"]
