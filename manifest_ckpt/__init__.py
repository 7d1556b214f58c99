"""manifest-ckpt: PyTorch checkpoints that refuse to load into the wrong model.

A checkpoint is a directory of safetensors weights files plus ``manifest.json``, validated
against the published JSON Schema. ``save`` writes one; ``check`` and ``load`` compare it
with a live module before a single tensor is copied; ``verify`` proves its integrity.
"""

from __future__ import annotations

from manifest_ckpt._report import Problem, Report
from manifest_ckpt._version import __version__
from manifest_ckpt.errors import (
    ArchiveError,
    CheckpointExistsError,
    ConversionError,
    IntegrityError,
    ManifestCkptError,
    ManifestError,
    ModelMismatchError,
    RemapError,
    UnsafeCheckpointError,
    UnsupportedTensorError,
    UnsupportedVersionError,
)
from manifest_ckpt.manifest import FormatVersionWarning, Manifest
from manifest_ckpt.reader import LoadResult, check, load, read_manifest, verify
from manifest_ckpt.writer import save

__all__ = [
    "ArchiveError",
    "CheckpointExistsError",
    "ConversionError",
    "FormatVersionWarning",
    "IntegrityError",
    "LoadResult",
    "Manifest",
    "ManifestCkptError",
    "ManifestError",
    "ModelMismatchError",
    "Problem",
    "RemapError",
    "Report",
    "UnsafeCheckpointError",
    "UnsupportedTensorError",
    "UnsupportedVersionError",
    "__version__",
    "check",
    "load",
    "read_manifest",
    "save",
    "verify",
]
