"""A manifest-ckpt checkpoint (directory or archive) as a convert source: copied faithfully, never as a lone safetensors file.

Aliases, module tree and metadata are kept and every tensor is verified against its digest
first, so a conversion that changes nothing (no remap, same module) writes a checkpoint with
the same digest; the lineage records the source as the ``converted-from`` parent.
"""

from __future__ import annotations

from pathlib import Path

import torch

from manifest_ckpt.errors import ConversionError
from manifest_ckpt.format.manifest import MANIFEST_NAME
from manifest_ckpt.reader import _Weights
from manifest_ckpt.sources.source import Hashes, SourceCheckpoint
from manifest_ckpt.storage.store import open_store, read_store_manifest
from manifest_ckpt.storage.tar import is_archive
from manifest_ckpt.training.plain import read_whole

__all__ = ["is_manifest_checkpoint", "read_manifest_checkpoint"]


def is_manifest_checkpoint(path: Path) -> bool:
    """A checkpoint directory (it holds ``manifest.json``), the ``manifest.json`` itself, or an archive."""
    if path.name == MANIFEST_NAME:
        return True
    return (path / MANIFEST_NAME).is_file() if path.is_dir() else is_archive(path)


def read_manifest_checkpoint(path: Path, hashes: Hashes) -> SourceCheckpoint:
    """Every stored tensor, verified, with aliases sharing their target's tensor.

    Raises:
        ConversionError: a training state (optimizer and application state are not weights).
        IntegrityError, ManifestError: damaged files or a manifest that does not bind them.
    """
    archive = path.is_file() and path.name != MANIFEST_NAME
    directory = path.parent if path.name == MANIFEST_NAME else path
    store = open_store(directory)
    manifest = read_store_manifest(store)
    where = str(directory)
    if manifest.state is not None:
        raise ConversionError(
            f"{where}: a training state (application and optimizer state), not model weights; convert copies "
            "weights checkpoints only. Load it with manifest_ckpt.distributed or ManifestCheckpointIO.",
            file=where,
        )
    weights = _Weights(store, manifest)
    weights.bind(manifest.files)
    weights.map_files(manifest.files)
    weights.verify(manifest.tensors)
    # Stored keys first, then aliases, so each alias follows the key it shares (as recorded).
    tensors: dict[str, torch.Tensor] = {k: read_whole(weights, manifest, k) for k in sorted(manifest.tensors)}
    tensors.update((alias, tensors[target]) for alias, target in manifest.aliases.items())
    # An archive is hashed whole; a directory by its manifest (which binds every weights file).
    hashed = path if archive else directory / MANIFEST_NAME
    size = hashed.stat().st_size + (0 if archive else sum(f.size for f in manifest.files.values()))
    record = {
        "file": Path(directory.resolve()).name,
        "size": size,
        "sha256": hashes.start(hashed),
        "format": "manifest-ckpt-archive" if archive else "manifest-ckpt",
        "container": "state-dict",
        "key": None,
        "digest": manifest.digest,
        "left_out": [],
    }
    return SourceCheckpoint(tensors, manifest.metadata, record, modules=manifest.modules, digest=manifest.digest)
