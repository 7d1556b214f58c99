"""manifest-ckpt: PyTorch checkpoints that refuse to load into the wrong model.

A checkpoint is a directory of safetensors weights files plus ``manifest.json``, validated
against the published JSON Schema. ``save`` writes one; ``check`` and ``load`` compare it
with a live module before a single tensor is copied; ``verify`` proves its integrity.

Names that need torch are imported on first use, so reading manifests (``inspect``,
``read_manifest``) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from manifest_ckpt._version import __version__
from manifest_ckpt.comparison.report import Problem, Report
from manifest_ckpt.comparison.transforms import Concatenate, Rename, Split, Stack, Transpose, Unstack
from manifest_ckpt.errors import (
    ArchiveError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConcurrentWriteError,
    ConversionError,
    DestinationError,
    DeviceUnavailableError,
    ExportError,
    IntegrityError,
    InvalidKeyError,
    LoadAbortedError,
    ManifestCkptError,
    ManifestError,
    ModelMismatchError,
    PatternError,
    RankFailedError,
    RemapError,
    SaveInProgressError,
    StateMismatchError,
    StorageError,
    TransformError,
    UnsafeCheckpointError,
    UnsupportedOptionError,
    UnsupportedTensorError,
    UnsupportedVersionError,
)
from manifest_ckpt.format.manifest import FormatVersionWarning, Manifest
from manifest_ckpt.storage.store import read_manifest

if TYPE_CHECKING:
    from manifest_ckpt.background import async_save
    from manifest_ckpt.comparison.diff import CheckpointDiff, diff
    from manifest_ckpt.empty_init import init_empty
    from manifest_ckpt.exporters.hf import export_hf
    from manifest_ckpt.lineage import Ancestry, ancestry
    from manifest_ckpt.reader import LoadResult, check, load, verify
    from manifest_ckpt.sources.convert import convert
    from manifest_ckpt.storage.archive import pack, unpack
    from manifest_ckpt.training.plain import load_file
    from manifest_ckpt.training.rng import RNGState
    from manifest_ckpt.writer import save

# public name -> module that defines it (imported lazily because it imports torch).
# No module may be named like a function exported here: importing ``manifest_ckpt.x`` sets
# the package attribute ``x`` to the module and would shadow the function.
_LAZY = {
    "Ancestry": "manifest_ckpt.lineage",
    "async_save": "manifest_ckpt.background",
    "CheckpointDiff": "manifest_ckpt.comparison.diff",
    "ancestry": "manifest_ckpt.lineage",
    "convert": "manifest_ckpt.sources.convert",
    "diff": "manifest_ckpt.comparison.diff",
    "export_hf": "manifest_ckpt.exporters.hf",
    "init_empty": "manifest_ckpt.empty_init",
    "pack": "manifest_ckpt.storage.archive",
    "unpack": "manifest_ckpt.storage.archive",
    "LoadResult": "manifest_ckpt.reader",
    "RNGState": "manifest_ckpt.training.rng",
    "load_file": "manifest_ckpt.training.plain",
    "check": "manifest_ckpt.reader",
    "load": "manifest_ckpt.reader",
    "verify": "manifest_ckpt.reader",
    "save": "manifest_ckpt.writer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'manifest_ckpt' has no attribute {name!r}")


__all__ = [
    "Ancestry",
    "ArchiveError",
    "CheckpointDiff",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "Concatenate",
    "ConcurrentWriteError",
    "ConversionError",
    "DestinationError",
    "DeviceUnavailableError",
    "ExportError",
    "FormatVersionWarning",
    "IntegrityError",
    "InvalidKeyError",
    "LoadAbortedError",
    "LoadResult",
    "Manifest",
    "ManifestCkptError",
    "ManifestError",
    "ModelMismatchError",
    "PatternError",
    "Problem",
    "RNGState",
    "RankFailedError",
    "RemapError",
    "Rename",
    "Report",
    "SaveInProgressError",
    "Split",
    "Stack",
    "StateMismatchError",
    "StorageError",
    "TransformError",
    "Transpose",
    "UnsafeCheckpointError",
    "Unstack",
    "UnsupportedOptionError",
    "UnsupportedTensorError",
    "UnsupportedVersionError",
    "__version__",
    "ancestry",
    "async_save",
    "check",
    "convert",
    "diff",
    "export_hf",
    "init_empty",
    "load",
    "load_file",
    "pack",
    "read_manifest",
    "save",
    "unpack",
    "verify",
]
