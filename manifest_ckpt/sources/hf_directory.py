"""Hugging Face ``save_pretrained`` directories: a ``*.safetensors.index.json`` and its shards."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch

from manifest_ckpt.errors import ConversionError
from manifest_ckpt.format import jsonio
from manifest_ckpt.format.integrity import read_regular
from manifest_ckpt.sources.safetensors_file import read_safetensors_file, read_single_safetensors
from manifest_ckpt.sources.source import Hashes, SourceCheckpoint, jsonable

__all__ = ["INDEX_SUFFIX", "read_hf_directory", "read_sharded_safetensors"]

INDEX_SUFFIX: Final = ".safetensors.index.json"
# An index lists names, not tensors; one this large is not a real index.
_MAX_INDEX_BYTES: Final = 64 << 20


def _shard_path(directory: Path, name: str, index: str) -> Path:
    """The shard an index names, refusing names that are not plain file names in the directory.

    Links are followed on purpose: the Hugging Face hub cache links every file of a snapshot
    directory to a blob outside it. What is read through one is parsed like any shard.
    """
    bad = not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or os.path.isabs(name)
    if bad:
        raise ConversionError(
            f"{index}: weight_map names the file {name!r}; expected a plain file name inside {directory} "
            "(no directories, no '..'). Refusing an index that points outside its directory.",
            file=index,
        )
    return directory / name


def read_hf_directory(directory: Path, hashes: Hashes) -> SourceCheckpoint:
    """A ``save_pretrained`` directory: the index and its shards, or a lone ``.safetensors`` file."""
    where = str(directory)
    indexes = sorted(p for p in directory.iterdir() if p.name.endswith(INDEX_SUFFIX))
    if len(indexes) > 1:
        raise ConversionError(
            f"{where}: holds {len(indexes)} safetensors indexes ({', '.join(p.name for p in indexes)}); "
            "pass the path of the index to convert instead of the directory",
            file=where,
        )
    if not indexes:
        singles = sorted(p for p in directory.iterdir() if p.name.endswith(".safetensors"))
        if len(singles) == 1:
            return read_single_safetensors(singles[0], hashes)
        found = ", ".join(sorted(p.name for p in directory.iterdir())[:10]) or "nothing"
        raise ConversionError(
            f"{where}: expected a directory with a *{INDEX_SUFFIX} index and its shards (as written by "
            f"save_pretrained) or a single .safetensors file; found {found}. Pass a file path to convert a "
            "torch.save file.",
            file=where,
        )
    return read_sharded_safetensors(indexes[0], hashes)


def read_sharded_safetensors(index_path: Path, hashes: Hashes) -> SourceCheckpoint:
    """The shards an index names, all in the index's directory, checked against the index."""
    directory = index_path.parent
    index = str(index_path)
    weight_map, index_metadata = _read_index(index_path)
    shards = {name: _shard_path(directory, name, index) for name in sorted(set(weight_map.values()))}
    tensors: dict[str, torch.Tensor] = {}
    files: list[dict[str, Any]] = [
        {"name": index_path.name, "size": index_path.stat().st_size, "sha256": hashes.start(index_path)}
    ]
    shard_metadata: dict[str, dict[str, str]] = {}
    for name, shard in shards.items():
        shard_tensors, header, facts = read_safetensors_file(shard, hashes)
        files.append({"name": name, "size": facts["size"], "sha256": facts["sha256"]})
        listed = {k for k, v in weight_map.items() if v == name}
        _check_shard(index, name, listed, set(shard_tensors), tensors)
        tensors.update(shard_tensors)
        if header.metadata:
            shard_metadata[name] = dict(header.metadata)
    metadata: dict[str, Any] = {}
    if shard_metadata:
        values = list(shard_metadata.values())
        same = len(shard_metadata) == len(shards) and all(m == values[0] for m in values)
        metadata["safetensors_metadata"] = values[0] if same else shard_metadata
    if index_metadata:
        metadata["index_metadata"] = jsonable(index_metadata)
    record = {
        "file": Path(os.path.abspath(directory)).name,
        "size": sum(f["size"] for f in files),
        "sha256": files[0]["sha256"],
        "format": "safetensors-sharded",
        "container": "state-dict",
        "key": None,
        "files": files,
        "left_out": [],
    }
    return SourceCheckpoint(dict(sorted(tensors.items())), metadata or None, record)


def _read_index(path: Path) -> tuple[dict[str, str], Any]:
    """The ``weight_map`` of a safetensors index (checked to map names to file names) and its metadata."""
    where = str(path)
    try:
        data = read_regular(
            path,
            what="a safetensors index",
            limit=_MAX_INDEX_BYTES,
            error=lambda message: ConversionError(message, file=where),
        )
    except FileNotFoundError as exc:
        raise ConversionError(f"{where}: cannot read the safetensors index ({exc.strerror})", file=where) from None
    doc = jsonio.loads(
        data, where=where, what="a safetensors index", error=lambda message: ConversionError(message, file=where)
    )
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(
            f'{where}: expected a JSON object with a non-empty "weight_map" (tensor name -> shard file)', file=where
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ConversionError(f"{where}: weight_map[{name!r}] is {shard!r}, expected a file name", file=where)
    problem = jsonio.check_value(doc.get("metadata"), "$.metadata")
    if problem is not None:
        raise ConversionError(f"{where}: {problem}; expected a safetensors index with plain metadata", file=where)
    return weight_map, doc.get("metadata")


def _check_shard(index: str, name: str, listed: set[str], found: set[str], earlier: Mapping[str, Any]) -> None:
    """Index and shard must agree on the shard's tensors; a tensor may live in one shard only."""
    problems = [f"{k!r} is listed for {name} but not in it" for k in sorted(listed - found)]
    problems += [f"{k!r} is in {name} but the index does not list it there" for k in sorted(found - listed)]
    problems += [f"{k!r} is in {name} and in an earlier shard" for k in sorted(found & set(earlier))]
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConversionError(
            f"{index}: the index and its shards disagree:\n  "
            + "\n  ".join(problems[:10])
            + more
            + "\nThe directory is incomplete or mixes two checkpoints; re-download or re-save it.",
            file=index,
        )
