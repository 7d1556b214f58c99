"""Readers refuse FIFOs, devices, link loops and over-long names with typed errors, and never block."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.errors import (
    ArchiveError,
    CheckpointNotFoundError,
    ConversionError,
    IntegrityError,
    ManifestCkptError,
    ManifestError,
)
from manifest_ckpt.format.integrity import read_regular
from manifest_ckpt.storage import store as _store
from manifest_ckpt.storage.tar import index_archive

# Generous: each call returns in milliseconds; the bound only turns a regression (a read that
# blocks on a FIFO forever) into a failure instead of a stuck test run.
_GUARD_SECONDS = 60


def finishes(call: Callable[[], Any]) -> BaseException | None:
    """Run ``call`` on a daemon thread; fail the test if it blocks, else return what it raised."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 -- handed back to the test to assert on
            outcome.append(exc)
        else:
            outcome.append(None)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(_GUARD_SECONDS)
    assert outcome, f"{call} blocked (a reader opened a FIFO or device without checking it)"
    return outcome[0]


def raises(kind: type[ManifestCkptError], fragment: str, call: Callable[[], Any]) -> ManifestCkptError:
    """``call`` raises ``kind`` whose message contains ``fragment``, without blocking."""
    exc = finishes(call)
    assert isinstance(exc, kind), f"expected {kind.__name__}, got {exc!r}"
    assert fragment in str(exc), str(exc)
    return exc


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A small valid checkpoint directory."""
    torch.manual_seed(0)
    mc.save(nn.Linear(2, 2), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def fifo_at(path: Path) -> Path:
    """Replace ``path`` by a FIFO nobody writes to."""
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def test_fifo_manifest_is_refused(ckpt: Path) -> None:
    """A FIFO as manifest.json gives ManifestError naming it a FIFO; nothing blocks."""
    fifo_at(ckpt / "manifest.json")
    raises(ManifestError, "is a FIFO (named pipe), not a regular file", lambda: mc.read_manifest(ckpt))
    raises(ManifestError, "is a FIFO", lambda: mc.verify(ckpt))


def test_manifest_linked_to_dev_zero_is_refused(ckpt: Path) -> None:
    """manifest.json -> /dev/zero is refused as a character device before a byte is read."""
    (ckpt / "manifest.json").unlink()
    (ckpt / "manifest.json").symlink_to("/dev/zero")
    raises(ManifestError, "is a character device", lambda: mc.read_manifest(ckpt))


def test_fifo_weights_file_is_refused(ckpt: Path) -> None:
    """A FIFO in place of a weights file gives IntegrityError on verify and load; nothing blocks."""
    manifest = mc.read_manifest(ckpt)
    (name,) = manifest.files
    fifo_at(ckpt / name)
    exc = raises(IntegrityError, "is a FIFO", lambda: mc.verify(ckpt))
    assert isinstance(exc, IntegrityError) and exc.file == name
    raises(IntegrityError, "is a FIFO", lambda: mc.load(nn.Linear(2, 2), ckpt))


def test_fifo_or_device_as_the_checkpoint_path_is_refused(tmp_path: Path) -> None:
    """A FIFO or /dev/zero given as the checkpoint itself is not a checkpoint (typed, no block)."""
    fifo = fifo_at(tmp_path / "ckpt.tar")
    raises(CheckpointNotFoundError, "is a FIFO", lambda: mc.read_manifest(fifo))
    raises(CheckpointNotFoundError, "is a character device", lambda: mc.read_manifest("/dev/zero"))


def test_fifo_archive_is_refused_by_the_tar_reader(tmp_path: Path) -> None:
    """index_archive on a FIFO raises ArchiveError instead of waiting for a writer."""
    fifo = fifo_at(tmp_path / "a.tar")
    raises(ArchiveError, "is a FIFO", lambda: index_archive(fifo))


def test_link_loop_and_long_names_are_typed(ckpt: Path, tmp_path: Path) -> None:
    """A manifest.json link loop and an over-long path give typed errors that say why."""
    (ckpt / "manifest.json").unlink()
    (ckpt / "manifest.json").symlink_to(ckpt / "manifest.json")
    raises(ManifestError, "link loop", lambda: mc.read_manifest(ckpt))
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    raises(CheckpointNotFoundError, "link loop", lambda: mc.read_manifest(loop))
    raises(CheckpointNotFoundError, "name is too long", lambda: mc.read_manifest(tmp_path / ("x" * 5000)))
    raises(ConversionError, "name is too long", lambda: mc.convert(tmp_path / ("y" * 5000), tmp_path / "out"))


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_fifo_sources_are_refused_by_convert(tmp_path: Path, name: str) -> None:
    """convert refuses a FIFO .pth or .safetensors source before opening it; no hashing thread blocks."""
    src = fifo_at(tmp_path / name)
    raises(ConversionError, "is a FIFO", lambda: mc.convert(src, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_fifo_hf_index_and_shard_are_refused(tmp_path: Path) -> None:
    """A FIFO as the sharded index, or as a shard it names, is a ConversionError (directory and index paths)."""
    directory = tmp_path / "hf"
    directory.mkdir()
    save_file({"w": torch.ones(2)}, directory / "model-1.safetensors")
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    fifo_at(directory / "model-1.safetensors")
    raises(ConversionError, "is a FIFO", lambda: mc.convert(directory, tmp_path / "o1"))
    fifo_at(index)
    raises(ConversionError, "is a FIFO", lambda: mc.convert(directory, tmp_path / "o2"))
    raises(ConversionError, "is a FIFO", lambda: mc.convert(index, tmp_path / "o3"))


def test_manifest_size_is_checked_before_reading(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest over the size limit is refused from fstat, naming its size and the limit."""
    size = (ckpt / "manifest.json").stat().st_size
    monkeypatch.setattr(_store, "MAX_MANIFEST_BYTES", size - 1)
    raises(ManifestError, f"{size} bytes is too large for a manifest.json file (at most {size - 1})", lambda: mc.read_manifest(ckpt))


def test_read_regular_bounds_reads(tmp_path: Path) -> None:
    """read_regular returns a file of exactly the limit and refuses one byte more."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_regular(path, what="a file", limit=10, error=ManifestError) == b"x" * 10
    with pytest.raises(ManifestError, match="11 bytes is too large for a file"):
        path.write_bytes(b"x" * 11)
        read_regular(path, what="a file", limit=10, error=ManifestError)
