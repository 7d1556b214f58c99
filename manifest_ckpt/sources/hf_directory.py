"""Hugging Face ``save_pretrained`` directories: a ``*.safetensors.index.json`` and its shards."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch

from manifest_ckpt.errors import ConversionError
from manifest_ckpt.format import jsonio
from manifest_ckpt.format.integrity import read_regular
from manifest_ckpt.sources.safetensors_file import read_safetensors_file, read_single_safetensors
from manifest_ckpt.sources.source import Hashes, SourceCheckpoint, jsonable
from manifest_ckpt.sources.torch_file import read_torch_source

__all__ = ["BIN_INDEX_SUFFIX", "INDEX_SUFFIX", "read_hf_directory", "read_sharded_bin", "read_sharded_safetensors"]

INDEX_SUFFIX: Final = ".safetensors.index.json"
BIN_INDEX_SUFFIX: Final = ".bin.index.json"
# The pickled weights save_pretrained(safe_serialization=False) writes.
_BIN_WEIGHTS: Final = re.compile(r"pytorch_model(-\d{5}-of-\d{5})?\.bin")
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
    """A ``save_pretrained`` directory: an index and its shards, or a lone weights file.

    Safetensors (``*.safetensors.index.json`` or one ``.safetensors`` file) and pickled
    (``*.bin.index.json`` or one ``pytorch_model*.bin``) weights are both read; a directory
    holding both kinds is refused rather than one chosen silently.
    """
    where = str(directory)
    names = sorted(p.name for p in directory.iterdir())
    st_indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    st_files = [n for n in names if n.endswith(".safetensors")]
    bin_indexes = [n for n in names if n.endswith(BIN_INDEX_SUFFIX)]
    bin_files = [n for n in names if _BIN_WEIGHTS.fullmatch(n)]
    if (st_indexes or st_files) and (bin_indexes or bin_files):
        listed = ", ".join([*st_indexes, *st_files][:3] + [*bin_indexes, *bin_files][:3])
        raise ConversionError(
            f"{where}: holds both safetensors and pickled .bin weights ({listed}); they may differ, so neither "
            "is chosen. Pass the path of the index or file to convert instead of the directory.",
            file=where,
        )
    for indexes, kind in ((st_indexes, "safetensors"), (bin_indexes, ".bin")):
        if len(indexes) > 1:
            raise ConversionError(
                f"{where}: holds {len(indexes)} {kind} indexes ({', '.join(indexes)}); "
                "pass the path of the index to convert instead of the directory",
                file=where,
            )
    if st_indexes:
        return read_sharded_safetensors(directory / st_indexes[0], hashes)
    if bin_indexes:
        return read_sharded_bin(directory / bin_indexes[0], hashes)
    if len(st_files) == 1 and not bin_files:
        return read_single_safetensors(directory / st_files[0], hashes)
    if len(bin_files) == 1 and not st_files:
        return read_torch_source(directory / bin_files[0], None, hashes)
    found = ", ".join(names[:10]) or "nothing"
    raise ConversionError(
        f"{where}: expected a directory with a *{INDEX_SUFFIX} or *{BIN_INDEX_SUFFIX} index and its shards (as "
        f"written by save_pretrained) or a single .safetensors or pytorch_model.bin file; found {found}. Pass a "
        "file path to convert a torch.save file.",
        file=where,
    )


def read_sharded_bin(index_path: Path, hashes: Hashes) -> SourceCheckpoint:
    """``pytorch_model-0000k-of-0000N.bin`` shards named by a ``.bin.index.json``, read without running them.

    Each shard must be a bare state dict (what ``save_pretrained(safe_serialization=False)``
    writes); it is read by the same non-executing reader as any ``torch.save`` file.
    """
    directory = index_path.parent
    index = str(index_path)
    weight_map, index_metadata = _read_index(index_path, "a .bin index")
    tensors: dict[str, torch.Tensor] = {}
    files: list[dict[str, Any]] = [
        {"name": index_path.name, "size": index_path.stat().st_size, "sha256": hashes.start(index_path)}
    ]
    pickle_globals: set[str] = set()
    formats: set[str] = set()
    for name in sorted(set(weight_map.values())):
        shard = read_torch_source(_shard_path(directory, name, index), None, hashes)
        if shard.record["container"] != "state-dict" or shard.metadata is not None:
            raise ConversionError(
                f"{index}: shard {name} is a {shard.record['container']} container, not a bare state dict "
                "(name -> tensor) as save_pretrained writes; convert the shard on its own with key=",
                file=str(directory / name),
            )
        files.append({"name": name, "size": shard.record["size"], "sha256": shard.record["sha256"]})
        listed = {k for k, v in weight_map.items() if v == name}
        _check_shard(index, name, listed, set(shard.tensors), tensors)
        tensors.update(shard.tensors)
        pickle_globals.update(shard.record["pickle_globals"])
        formats.add(shard.record["format"])
    record = {
        "file": Path(os.path.abspath(directory)).name,
        "size": sum(f["size"] for f in files),
        "sha256": files[0]["sha256"],
        "format": "torch-sharded",
        "container": "state-dict",
        "key": None,
        "files": files,
        "shard_format": sorted(formats),
        "pickle_globals": sorted(pickle_globals),
        "left_out": [],
    }
    metadata = {"index_metadata": jsonable(index_metadata)} if index_metadata else None
    return SourceCheckpoint(dict(sorted(tensors.items())), metadata, record)


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


def _read_index(path: Path, what: str = "a safetensors index") -> tuple[dict[str, str], Any]:
    """The ``weight_map`` of an index (checked to map names to file names) and its metadata."""
    where = str(path)
    try:
        data = read_regular(
            path,
            what=what,
            limit=_MAX_INDEX_BYTES,
            error=lambda message: ConversionError(message, file=where),
        )
    except FileNotFoundError as exc:
        raise ConversionError(f"{where}: cannot read {what.removeprefix('a ')} ({exc.strerror})", file=where) from None
    doc = jsonio.loads(data, where=where, what=what, error=lambda message: ConversionError(message, file=where))
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
        raise ConversionError(f"{where}: {problem}; expected {what} with plain metadata", file=where)
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
