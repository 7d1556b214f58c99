"""A Lightning ``CheckpointIO`` that writes manifest checkpoints: ``Trainer(plugins=[ManifestCheckpointIO()])``.

Every checkpoint Lightning saves (``ModelCheckpoint``, ``trainer.save_checkpoint``) becomes a
manifest-ckpt training state at the path Lightning gives: a *directory* named like the file
Lightning asked for (``epoch=0-step=4.ckpt/``) holding ``manifest.json`` and safetensors
files. The whole Lightning checkpoint dict is in it (``state_dict``, ``optimizer_states``,
``lr_schedulers``, ``loops``, ``callbacks``, ``hyper_parameters``, ``epoch``,
``global_step``...): tensors in the weights files, everything else JSON in the manifest
(docs/format.md §8); nothing is pickled, and ``load_checkpoint`` returns the same dict.

Needs the ``lightning`` package (``pip install 'manifest-ckpt[lightning]'``); importing
``manifest_ckpt`` itself never imports it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError as exc:  # pragma: no cover - exercised only where lightning is absent
    raise ImportError(
        "manifest_ckpt.lightning needs the 'lightning' package (Lightning 2.x): "
        "pip install 'manifest-ckpt[lightning]'"
    ) from exc

from manifest_ckpt.distributed import save as _save
from manifest_ckpt.errors import CheckpointNotFoundError, ManifestError, UnsupportedOptionError
from manifest_ckpt.format.manifest import MANIFEST_NAME
from manifest_ckpt.reader import _Weights
from manifest_ckpt.storage.store import open_store, read_store_manifest
from manifest_ckpt.training.plain import read_state

__all__ = ["ManifestCheckpointIO"]


class ManifestCheckpointIO(CheckpointIO):
    """Lightning checkpoints as manifest checkpoints (directories), saved and read without pickle.

    Args:
        verify_digests: hash every tensor when a checkpoint is loaded (resume, ``ckpt_path=``).
        record_code: record the git state in the lineage, as :func:`manifest_ckpt.save` does.
        fsync: flush every file to disk before the manifest commits it.

    What comes back from :meth:`load_checkpoint` is what was saved, with one documented
    mapping: every mapping is a ``dict`` (Lightning's ``state_dict`` is saved from an
    ``OrderedDict``; the order of keys is kept). Tuples stay tuples, int keys (the
    optimizer's ``state``) stay ints, ``nan``/``inf`` stay floats. A value that cannot be
    stored without pickle (say a hyper-parameter holding a ``Path`` or a module) is refused
    with :class:`~manifest_ckpt.errors.UnsupportedValueError` naming its key, before anything
    is written.
    """

    def __init__(self, *, verify_digests: bool = False, record_code: bool = True, fsync: bool = True) -> None:
        self.verify_digests = verify_digests
        self.record_code = record_code
        self.fsync = fsync

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` as a manifest checkpoint directory at ``path``.

        The manifest is written last and replaces an earlier checkpoint at ``path`` (Lightning
        re-saves ``last.ckpt``) in one rename: the directory always holds one whole checkpoint.
        Called by Lightning on the global-zero rank only, so no collective is used.

        Raises:
            UnsupportedOptionError: ``storage_options`` was given (as ``TorchCheckpointIO`` refuses it).
            UnsupportedValueError: a value needs pickle; every such key is named.
            CheckpointExistsError: ``path`` is a file or a directory that is no manifest checkpoint.
        """
        _no_storage_options(storage_options)
        target = Path(os.fspath(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        _save(checkpoint, target, overwrite=True, record_code=self.record_code, fsync=self.fsync, no_dist=True)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The Lightning checkpoint dict saved at ``path``, checked against its manifest.

        Tensors are read into new CPU memory (the checkpoint may be removed afterwards); Lightning
        moves them to the module's device. ``weights_only`` has no effect: nothing is unpickled.

        Args:
            map_location: ``None``, a device or a device string: where tensors are put.

        Raises:
            CheckpointNotFoundError: nothing at ``path`` (a ``FileNotFoundError``, as Lightning expects).
            ManifestError: ``path`` holds a weights checkpoint, not a training state.
            UnsupportedOptionError: ``map_location`` is a function or a dict.
            IntegrityError: damaged files (every digest with ``verify_digests=True``).
        """
        device = _device(map_location)
        location = os.fspath(path)
        if not os.path.exists(location):
            raise CheckpointNotFoundError(f"{location}: no such checkpoint (ManifestCheckpointIO.load_checkpoint)")
        store = open_store(location)
        manifest = read_store_manifest(store)
        if manifest.state is None:
            raise ManifestError(
                f"{store.location}: a weights checkpoint, not a Lightning training state; load it into the module "
                "with manifest_ckpt.load(model, path)",
                file=location,
            )
        weights = _Weights(store, manifest)
        weights.bind(manifest.files)
        if self.verify_digests:
            weights.verify(manifest.tensors)

        return read_state(weights, manifest, device=device)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path`` (nothing there is no error, as in Lightning).

        Raises:
            ManifestError: ``path`` exists but is not a manifest checkpoint directory; it is left alone.
        """
        target = Path(os.fspath(path))
        if not target.exists() and not target.is_symlink():
            return
        if target.is_symlink():  # ModelCheckpoint(save_last="link") links last.ckpt to a checkpoint
            target.unlink()
            return
        if not (target / MANIFEST_NAME).is_file():
            raise ManifestError(
                f"{target}: not a manifest checkpoint directory (no {MANIFEST_NAME}); refusing to delete it",
                file=str(target),
            )
        shutil.rmtree(target)


def _no_storage_options(storage_options: Any) -> None:
    if storage_options is not None:
        raise UnsupportedOptionError(
            "ManifestCheckpointIO.save_checkpoint: storage_options is not supported (as in Lightning's "
            "TorchCheckpointIO); leave it out"
        )


def _device(map_location: Any) -> torch.device | None:
    if map_location is None:
        return None
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    raise UnsupportedOptionError(
        f"ManifestCheckpointIO.load_checkpoint: map_location={map_location!r} is not supported; give None, a "
        "device or a device string (tensors are read on the CPU and moved there)"
    )
