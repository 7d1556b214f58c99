"""Which reader a source needs: a directory, an index, a safetensors file or a pickle."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from manifest_ckpt.errors import ConversionError
from manifest_ckpt.sources.hf_directory import (
    BIN_INDEX_SUFFIX,
    INDEX_SUFFIX,
    read_hf_directory,
    read_sharded_bin,
    read_sharded_safetensors,
)
from manifest_ckpt.sources.manifest_checkpoint import is_manifest_checkpoint, read_manifest_checkpoint
from manifest_ckpt.sources.safetensors_file import looks_like_safetensors, read_single_safetensors
from manifest_ckpt.sources.source import Hashes, SourceCheckpoint, check_source_kind, resolve
from manifest_ckpt.sources.torch_file import read_torch_source

__all__ = ["read_pending", "read_source"]


def read_source(src: str | os.PathLike[str], *, key: str | None = None) -> SourceCheckpoint:
    """Read a ``torch.save`` file, a ``.safetensors`` file or a sharded safetensors directory.

    Args:
        src: the file, a ``*.safetensors.index.json`` index, or a directory holding one
            index and its shards (as written by ``save_pretrained``) or a single
            ``.safetensors`` file.
        key: where the tensor dict lies inside a pickled container (``"state_dict"``, or a
            path such as ``"ema/model"``); needed only when the choice is ambiguous.

    Raises:
        UnsafeCheckpointError: the pickle references a global outside the allowlist.
        ConversionError: unreadable, damaged or ambiguous source (the message says which
            and lists the candidate tensor dicts with their sizes).
    """
    hashes = Hashes()
    try:
        source = read_pending(Path(src), key, hashes)
        return replace(source, record=resolve(source.record))
    finally:
        hashes.close()


def read_pending(path: Path, key: str | None, hashes: Hashes) -> SourceCheckpoint:
    """``read_source`` with the source's hashes left pending on ``hashes``."""
    check_source_kind(path)
    index = path.name.endswith(INDEX_SUFFIX)
    bin_index = path.name.endswith(BIN_INDEX_SUFFIX)
    if key is not None and (path.is_dir() or index or bin_index or looks_like_safetensors(path)):
        raise ConversionError(
            f"{path}: key={key!r} applies to pickled checkpoints (one file); a directory, an index or a safetensors "
            "file holds flat dicts of tensors",
            file=str(path),
        )
    if is_manifest_checkpoint(path):
        if key is not None:
            raise ConversionError(
                f"{path}: key={key!r} applies to pickled checkpoints; this is a manifest-ckpt checkpoint", file=str(path)
            )
        return read_manifest_checkpoint(path, hashes)
    if path.is_dir():
        return read_hf_directory(path, hashes)
    if index:
        return read_sharded_safetensors(path, hashes)
    if bin_index:
        return read_sharded_bin(path, hashes)
    if looks_like_safetensors(path):
        return read_single_safetensors(path, hashes)
    return read_torch_source(path, key, hashes)
