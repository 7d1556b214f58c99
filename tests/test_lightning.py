"""ManifestCheckpointIO under a real Lightning Trainer: tiny model, CPU, a few steps."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.errors import UnsupportedOptionError, UnsupportedValueError

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from manifest_ckpt.lightning import ManifestCheckpointIO  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Tiny(L.LightningModule):
    """Two linear layers, Adam with a step scheduler; its hyper-parameters include a tuple."""

    def __init__(self, hidden: int = 8, lr: float = 0.05, betas: tuple[float, float] = (0.8, 0.9), **extra: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optim = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=self.hparams.betas)
        return {"optimizer": optim, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optim, step_size=3, gamma=0.5)}


def _data() -> torch.utils.data.DataLoader[Any]:
    gen = torch.Generator().manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(16, 3, generator=gen), torch.randn(16, 1, generator=gen))
    return torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False)  # 4 steps per epoch


def _trainer(root: Path, io_plugin: Any = None, **options: Any) -> Any:
    options.setdefault("max_epochs", 1)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=root,
        plugins=[io_plugin or ManifestCheckpointIO(record_code=False)],
        **options,
    )


def _fresh(**extra: Any) -> Tiny:
    torch.manual_seed(0)
    return Tiny(**extra)


def _bits(value: Any) -> Any:
    """Comparable form: tensors by dtype, shape and bytes; containers keep their type (OrderedDict as dict)."""
    if isinstance(value, dict):
        return ("dict", [(k, _bits(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_bits(v) for v in value])
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), value.reshape(-1).view(torch.uint8).tolist())
    return (type(value).__name__, value)


def _quiet_fit(trainer: Any, model: Any, **options: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, _data(), **options)


def test_resume_from_a_manifest_checkpoint_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """2 epochs straight == 1 epoch, saved by ModelCheckpoint, resumed with fit(ckpt_path=...): bit for bit."""
    straight_model = _fresh()
    straight = _trainer(tmp_path / "straight", max_epochs=2, enable_checkpointing=False)
    _quiet_fit(straight, straight_model)

    first = _trainer(tmp_path / "run", max_epochs=1)
    _quiet_fit(first, _fresh())
    ckpt = tmp_path / "run" / "checkpoints" / "epoch=0-step=4.ckpt"
    assert ckpt.is_dir() and (ckpt / "manifest.json").is_file()
    mc.verify(ckpt)

    resumed_model = _fresh(hidden=8)
    with torch.no_grad():
        for p in resumed_model.parameters():
            p.zero_()  # nothing of the fresh weights may survive the restore
    resumed = _trainer(tmp_path / "run", max_epochs=2)
    _quiet_fit(resumed, resumed_model, ckpt_path=str(ckpt))

    assert resumed.global_step == straight.global_step == 8
    assert _bits(resumed_model.state_dict()) == _bits(straight_model.state_dict())
    assert _bits(resumed.optimizers[0].state_dict()) == _bits(straight.optimizers[0].state_dict())
    sched = [c.scheduler.state_dict() for c in (resumed.lr_scheduler_configs[0], straight.lr_scheduler_configs[0])]
    assert sched[0] == sched[1] and sched[0]["last_epoch"] == 2  # stepped once per epoch


class _Recording(ManifestCheckpointIO):
    """Keeps a deep copy of each dict Lightning hands over."""

    def __init__(self) -> None:
        super().__init__(record_code=False)
        self.saved: dict[str, Any] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.saved[os.fspath(path)] = copy.deepcopy(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options)


def test_load_checkpoint_returns_the_dict_lightning_saved(tmp_path: Path) -> None:
    """Every key of the Lightning dict comes back with its type and bits (ints keys, tuples, scalars)."""
    recording = _Recording()
    _quiet_fit(_trainer(tmp_path, recording, max_epochs=1), _fresh())
    ((path, saved),) = recording.saved.items()
    loaded = ManifestCheckpointIO().load_checkpoint(path)
    assert isinstance(saved["state_dict"], OrderedDict)  # the documented mapping: comes back a dict
    assert list(loaded) == list(saved)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "hyper_parameters"} <= set(loaded)
    assert _bits(loaded) == _bits(saved)
    assert list(loaded["optimizer_states"][0]["state"]) == [0, 1, 2, 3]
    assert loaded["optimizer_states"][0]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert loaded["hyper_parameters"]["betas"] == (0.8, 0.9)


def test_model_checkpoint_top_k_and_last_with_resume_from_last(tmp_path: Path) -> None:
    """top-k removes the worse checkpoints through remove_checkpoint; fit(ckpt_path="last") resumes."""
    callback = ModelCheckpoint(monitor="train_loss", save_top_k=2, save_last=True, every_n_train_steps=1)
    trainer = _trainer(tmp_path, max_epochs=5, max_steps=5, callbacks=[callback])
    _quiet_fit(trainer, _fresh())
    directory = tmp_path / "checkpoints"
    names = sorted(os.listdir(directory))
    assert len(names) == 3 and "last.ckpt" in names
    kept = {Path(p).name for p in callback.best_k_models}
    assert set(names) == kept | {"last.ckpt"}
    for name in names:
        mc.verify(directory / name)
    assert ManifestCheckpointIO().load_checkpoint(directory / "last.ckpt")["global_step"] == 5

    again = _trainer(tmp_path, max_epochs=5, max_steps=7, callbacks=[ModelCheckpoint(save_last=True)])
    _quiet_fit(again, _fresh(), ckpt_path="last")
    assert again.global_step == 7


def test_a_hyper_parameter_that_needs_pickle_is_refused_by_key(tmp_path: Path) -> None:
    """save_hyperparameters with a Path: UnsupportedValueError names hyper_parameters.where; nothing written."""
    trainer = _trainer(tmp_path, max_steps=1, enable_checkpointing=False)
    _quiet_fit(trainer, _fresh(where=Path("data")))
    with pytest.raises(UnsupportedValueError) as info:
        trainer.save_checkpoint(tmp_path / "x.ckpt")
    assert info.value.keys == ("hyper_parameters.where",)
    assert "pathlib" in str(info.value)
    assert not (tmp_path / "x.ckpt").exists()


def test_options_it_cannot_honour_are_refused(tmp_path: Path) -> None:
    """storage_options and a map_location function raise UnsupportedOptionError; nothing is written."""
    plugin = ManifestCheckpointIO(record_code=False)
    with pytest.raises(UnsupportedOptionError, match="storage_options"):
        plugin.save_checkpoint({"epoch": 0}, tmp_path / "a.ckpt", storage_options={"x": 1})
    assert not (tmp_path / "a.ckpt").exists()
    plugin.save_checkpoint({"epoch": 0, "w": torch.ones(2), "blob": io.BytesIO(b"b")}, tmp_path / "a.ckpt")
    with pytest.raises(UnsupportedOptionError, match="map_location"):
        plugin.load_checkpoint(tmp_path / "a.ckpt", map_location=lambda storage, loc: storage)
    loaded = plugin.load_checkpoint(tmp_path / "a.ckpt", map_location="cpu")
    assert loaded["epoch"] == 0 and torch.equal(loaded["w"], torch.ones(2)) and loaded["blob"].getvalue() == b"b"


def test_remove_and_load_missing(tmp_path: Path) -> None:
    """remove_checkpoint deletes a checkpoint, ignores a missing path, refuses what is not a checkpoint."""
    plugin = ManifestCheckpointIO(record_code=False)
    plugin.save_checkpoint({"epoch": 1, "w": torch.zeros(1)}, tmp_path / "c.ckpt")
    plugin.remove_checkpoint(tmp_path / "c.ckpt")
    assert not (tmp_path / "c.ckpt").exists()
    plugin.remove_checkpoint(tmp_path / "c.ckpt")
    (tmp_path / "notes").mkdir()
    with pytest.raises(mc.ManifestError, match="refusing to delete"):
        plugin.remove_checkpoint(tmp_path / "notes")
    assert (tmp_path / "notes").is_dir()
    with pytest.raises(FileNotFoundError):
        plugin.load_checkpoint(tmp_path / "c.ckpt")


def test_importing_the_library_does_not_import_lightning() -> None:
    """lightning is an optional extra: import manifest_ckpt (and its distributed part) never loads it."""
    code = "import sys, manifest_ckpt, manifest_ckpt.distributed; print('lightning' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_top_k_and_last_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """ModelCheckpoint(top-1, last) for 2 epochs, fit(ckpt_path="last") to 4: weights, Adam and scheduler as 4 straight."""
    straight_model = _fresh()
    straight = _trainer(tmp_path / "straight", max_epochs=4, enable_checkpointing=False)
    _quiet_fit(straight, straight_model)

    def callback() -> Any:
        return ModelCheckpoint(dirpath=tmp_path / "ck", monitor="train_loss", save_top_k=1, save_last=True)

    first = _trainer(tmp_path / "run", max_epochs=2, callbacks=[callback()])
    _quiet_fit(first, _fresh())
    names = sorted(os.listdir(tmp_path / "ck"))
    assert len(names) == 2 and "last.ckpt" in names  # the worse epoch was removed through remove_checkpoint
    for name in names:
        mc.verify(tmp_path / "ck" / name)

    resumed_model = _fresh()
    with torch.no_grad():
        for p in resumed_model.parameters():
            p.zero_()
    resumed = _trainer(tmp_path / "run", max_epochs=4, callbacks=[callback()])
    _quiet_fit(resumed, resumed_model, ckpt_path="last")
    assert resumed.global_step == straight.global_step == 16
    assert _bits(resumed_model.state_dict()) == _bits(straight_model.state_dict())
    assert _bits(resumed.optimizers[0].state_dict()) == _bits(straight.optimizers[0].state_dict())
    sched = [c.scheduler.state_dict() for c in (resumed.lr_scheduler_configs[0], straight.lr_scheduler_configs[0])]
    assert sched[0] == sched[1] and sched[0]["last_epoch"] == 4
    assert len(os.listdir(tmp_path / "ck")) == 2  # still top-1 and last
