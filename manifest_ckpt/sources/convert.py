"""``convert``: turn ``.pth`` and foreign safetensors checkpoints into manifest checkpoints.

Nothing from the source runs: pickled files are read by :func:`_torch_pickle.read_torch_file`
(an opcode scan against an allowlist, then torch's weights-only unpickler), safetensors files
by our own header parser over a memory map. The tensors found are written by
:func:`writer.save`, checked first against a module when one is given; everything else the
source held is kept as JSON (``metadata``) or listed as left out (``lineage.source``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import mmap
import os
import re
import shlex
import stat
import struct
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any, Final, TextIO

import torch
from torch import nn

from manifest_ckpt.cli.progress import Progress, human_bytes
from manifest_ckpt.comparison.compare import compare
from manifest_ckpt.comparison.introspect import LiveState, capture, class_name, find_aliases, module_tree
from manifest_ckpt.comparison.remap import Remap, apply_remap
from manifest_ckpt.errors import ConversionError, IntegrityError, ModelMismatchError
from manifest_ckpt.format import jsonio
from manifest_ckpt.format.dtypes import describe, itemsize
from manifest_ckpt.format.integrity import file_sha256, kind_of, open_regular, os_reason, read_regular
from manifest_ckpt.format.keys import check_keys
from manifest_ckpt.format.manifest import Manifest
from manifest_ckpt.format.safetensors_header import MAX_HEADER_BYTES, Header, parse_header
from manifest_ckpt.sources.torch_pickle import read_torch_file
from manifest_ckpt.storage.store import is_url
from manifest_ckpt.writer import _check_destination, save

__all__ = [
    "SourceCheckpoint",
    "cli_convert",
    "conversion_json",
    "conversion_text",
    "convert",
    "read_source",
]

INDEX_SUFFIX: Final = ".safetensors.index.json"
# An index lists names, not tensors; one this large is not a real index.
_MAX_INDEX_BYTES: Final = 64 << 20
# Container nesting followed when looking for the tensor dict (Lightning's is at depth 1).
_MAX_SEARCH_DEPTH: Final = 8
_MAX_LEFT_OUT: Final = 50
_KNOWN_PREFIXES: Final = {
    "module.": "saved from DistributedDataParallel?",
    "model.": "saved from a Lightning module?",
    "_orig_mod.": "saved from a torch.compile'd module?",
}
_OPTIMIZER_NAME: Final = re.compile(r"optim", re.IGNORECASE)

# Where a value lies in a pickled container: dict keys and list indices, as strings.
KeyPath = tuple[str, ...]


# --------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class SourceCheckpoint:
    """What a foreign checkpoint holds, read without running any of its code.

    Attributes:
        tensors: the model's tensors by state-dict key, in the source's order; tensors
            that shared storage in the source share it here too.
        metadata: every non-tensor value the source held beside them, as JSON, or None.
        record: facts about the source for ``lineage.source``: file name (base name only),
            size, sha256, format, container, key, pickle globals, what was left out.
    """

    tensors: dict[str, torch.Tensor]
    metadata: Any
    record: dict[str, Any]


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
    hashes = _Hashes()
    try:
        source = _read(Path(src), key, hashes)
        return replace(source, record=_resolve(source.record))
    finally:
        hashes.close()


class _Pending:
    """A source file's sha256 being computed on the hashing thread."""

    def __init__(self, future: Future[str], path: Path) -> None:
        self.future = future
        self.path = path


class _Hashes:
    """Hash source files on a background thread, so hashing overlaps reading and writing."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="manifest-ckpt-sha256")

    def start(self, path: Path) -> _Pending:
        return _Pending(self._pool.submit(file_sha256, path), path)

    def close(self) -> None:
        # On success every hash was waited for; after a failure, do not wait on a large file.
        self._pool.shutdown(wait=False, cancel_futures=True)


def _resolve(value: Any) -> Any:
    """``value`` with every pending hash replaced by its result.

    Raises:
        ConversionError: a source file could not be read while hashing it.
    """
    if isinstance(value, _Pending):
        try:
            return value.future.result()
        except OSError as exc:
            where = str(value.path)
            raise ConversionError(f"{where}: could not read it to hash it ({exc})", file=where) from exc
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    return value


def _read(path: Path, key: str | None, hashes: _Hashes) -> SourceCheckpoint:
    """``read_source`` with the source's hashes left pending on ``hashes``."""
    _check_source_kind(path)
    index = path.name.endswith(INDEX_SUFFIX)
    if key is not None and (path.is_dir() or index or _looks_like_safetensors(path)):
        raise ConversionError(
            f"{path}: key={key!r} applies to pickled checkpoints; a safetensors source holds one flat dict of tensors",
            file=str(path),
        )
    if path.is_dir():
        return _read_safetensors_dir(path, hashes)
    if index:
        return _read_sharded(path, hashes)
    if _looks_like_safetensors(path):
        return _single_safetensors(path, hashes)
    return _read_torch_source(path, key, hashes)


def _check_source_kind(path: Path) -> None:
    """Refuse a source that is neither a directory nor a regular file before anything opens it.

    Raises:
        ConversionError: missing, a FIFO, device or socket (reading could block forever), a
            link loop or an over-long name.
    """
    where = str(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConversionError(f"{where}: cannot read the source: {os_reason(exc)}", file=where) from None
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise ConversionError(
            f"{where}: is {kind_of(mode)}, not a checkpoint file or directory; refusing to read it "
            "(a pipe or device can block forever). Point at the real file.",
            file=where,
        )


# --------------------------------------------------------------------------- pickled files


def _read_torch_source(path: Path, key: str | None, hashes: _Hashes) -> SourceCheckpoint:
    """Find the tensor dict in a ``torch.save`` file; keep the rest as JSON or list it as left out."""
    digest = hashes.start(path)
    contents = read_torch_file(path, sha256=False)
    where = str(path)
    obj = contents.obj
    chosen = _auto_select(obj, where) if key is None else _select_key(obj, key, where)
    tensors = _at(obj, chosen)
    assert isinstance(tensors, dict)
    extractor = _Extractor(chosen)
    metadata = extractor.value(obj, ())
    if metadata is _DROP or metadata == {} or metadata == []:
        metadata = None
    record: dict[str, Any] = {
        "file": path.name,
        "size": contents.size,
        "sha256": digest,
        "format": contents.format,
        "container": _container_kind(obj, chosen),
        "key": "/".join(chosen) if chosen else None,
        "pickle_globals": list(contents.globals),
        "left_out": extractor.finish(),
    }
    return SourceCheckpoint(dict(tensors), metadata, record)


def _is_tensor_dict(value: Any) -> bool:
    """A non-empty dict of str -> tensor: what ``state_dict()`` returns."""
    if not isinstance(value, dict) or not value:
        return False
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _is_optimizer_state(name: str, value: Any) -> bool:
    """Optimizer state: by name (``optimizer``, ``optimizer_states``...) or by its shape."""
    if _OPTIMIZER_NAME.search(name):
        return True
    return isinstance(value, dict) and "state" in value and "param_groups" in value


def _tensor_dicts(obj: Any) -> list[tuple[KeyPath, dict[str, torch.Tensor]]]:
    """Every tensor dict in the container, outside optimizer state, in traversal order."""
    found: list[tuple[KeyPath, dict[str, torch.Tensor]]] = []
    seen: set[int] = set()  # a container reachable twice is visited once (shared sub-trees)

    def walk(value: Any, path: KeyPath) -> None:
        if len(path) > _MAX_SEARCH_DEPTH or (path and _is_optimizer_state(path[-1], value)):
            return
        if isinstance(value, dict | list | tuple):
            if id(value) in seen:
                return
            seen.add(id(value))
        if _is_tensor_dict(value):
            found.append((path, value))
        elif isinstance(value, dict):
            for k, item in value.items():
                walk(item, (*path, str(k)))
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(item, (*path, str(i)))

    walk(obj, ())
    return found


def _describe_candidates(candidates: Sequence[tuple[KeyPath, dict[str, torch.Tensor]]]) -> list[str]:
    """``state_dict  (12 tensors, 1.2 MB)`` lines for error messages."""
    return [f"{'/'.join(p) or '(the top level)'}  ({_count_tensors(d)})" for p, d in candidates]


def _count_tensors(value: Any) -> str:
    return _count_text(*_tensor_totals(value))


def _count_text(count: int, size: int) -> str:
    return f"{count} tensor{'' if count == 1 else 's'}, {human_bytes(size)}"


def _tensor_totals(value: Any) -> tuple[int, int]:
    """How many tensors a sub-tree holds and their bytes (a tensor met twice counts once)."""
    seen: set[int] = set()
    visited: set[int] = set()
    size = 0

    def walk(v: Any) -> None:
        nonlocal size
        if isinstance(v, torch.Tensor):
            if id(v) not in seen:
                seen.add(id(v))
                size += v.numel() * v.element_size()
            return
        if id(v) in visited:
            return
        visited.add(id(v))
        if isinstance(v, dict):
            for item in v.values():
                walk(item)
        elif isinstance(v, list | tuple | set | frozenset):
            for item in v:
                walk(item)

    walk(value)
    return len(seen), size


def _top_level_listing(obj: Any) -> str:
    """What the container holds at its top level, for the "no tensors found" message."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    parts = [f"{k!s} ({_kind(v)})" for k, v in list(obj.items())[:12]]
    more = f", ... ({len(obj) - 12} more)" if len(obj) > 12 else ""
    return "keys " + ", ".join(parts) + more if parts else "an empty dict"


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {describe(str(value.dtype).removeprefix('torch.'), tuple(value.shape))}"
    if isinstance(value, dict):
        return f"dict of {len(value)}"
    if isinstance(value, list | tuple):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _auto_select(obj: Any, where: str) -> KeyPath:
    """The path of the one tensor dict in the container, or a ConversionError that lists them."""
    candidates = _tensor_dicts(obj)
    if len(candidates) == 1:
        return candidates[0][0]
    if not candidates:
        raise ConversionError(
            f"{where}: found no dict of tensors to convert (outside optimizer state); expected a state dict "
            "(name -> tensor), bare or under a key such as 'state_dict', 'model', 'model_state_dict', 'module' "
            f"or 'net'. The file holds {_top_level_listing(obj)}.",
            file=where,
            candidates=[],
        )
    listing = "\n  ".join(_describe_candidates(candidates))
    raise ConversionError(
        f"{where}: found {len(candidates)} dicts of tensors and cannot tell which holds the model weights:\n  "
        f"{listing}\nPass key= (CLI: --key) naming one of them.",
        file=where,
        candidates=["/".join(p) for p, _ in candidates],
    )


def _select_key(obj: Any, key: str, where: str) -> KeyPath:
    """Resolve ``key``: a top-level entry of that exact name, else a ``/``-separated path."""
    if isinstance(obj, dict) and key in obj:
        path: KeyPath = (key,)
    else:
        path = tuple(key.split("/"))
    value: Any = obj
    for depth, part in enumerate(path):
        value = _child(value, part)
        if value is _MISSING:
            known = "/".join(path[:depth]) or "the top level"
            raise ConversionError(
                f"{where}: key {key!r} not found ({part!r} is not an entry of {known}). " + _candidate_text(obj),
                file=where,
                candidates=["/".join(p) for p, _ in _tensor_dicts(obj)],
            )
    if not _is_tensor_dict(value):
        raise ConversionError(
            f"{where}: key {key!r} holds a {_kind(value)}, not a dict of tensors (name -> tensor). "
            + _candidate_text(obj),
            file=where,
            candidates=["/".join(p) for p, _ in _tensor_dicts(obj)],
        )
    return path


def _candidate_text(obj: Any) -> str:
    candidates = _tensor_dicts(obj)
    if not candidates:
        return f"The file holds no dict of tensors outside optimizer state ({_top_level_listing(obj)})."
    return "Dicts of tensors in the file:\n  " + "\n  ".join(_describe_candidates(candidates))


class _Missing:
    """Marker for a path element that is not there."""


_MISSING: Final = _Missing()


def _child(value: Any, part: str) -> Any:
    if isinstance(value, dict):
        for k, item in value.items():
            if k == part or str(k) == part:
                return item
    elif isinstance(value, list | tuple) and part.isdigit() and int(part) < len(value):
        return value[int(part)]
    return _MISSING


def _at(obj: Any, path: KeyPath) -> Any:
    for part in path:
        obj = _child(obj, part)
    return obj


def _container_kind(obj: Any, chosen: KeyPath) -> str:
    """``state-dict`` (bare), ``lightning`` (a Lightning checkpoint's state_dict) or ``nested``."""
    if not chosen:
        return "state-dict"
    if (
        chosen == ("state_dict",)
        and isinstance(obj, dict)
        and ("pytorch-lightning_version" in obj or {"epoch", "global_step"} <= set(obj))
    ):
        return "lightning"
    return "nested"


class _Drop:
    """Marker for a value left out of the JSON metadata."""


_DROP: Final = _Drop()


class _Extractor:
    """Turns the container, minus the weights, into JSON; lists what cannot be JSON."""

    def __init__(self, chosen: KeyPath) -> None:
        self.chosen = chosen
        self.left_out: list[dict[str, Any]] = []
        self.more = 0
        # Where each container was first met: a shared sub-tree is written once, so a
        # pickle of lists that each hold the previous one twice stays linear.
        self.first: dict[int, KeyPath] = {}

    def leave_out(self, path: KeyPath, what: str, value: Any = None) -> _Drop:
        if len(self.left_out) >= _MAX_LEFT_OUT:
            self.more += 1
            return _DROP
        entry: dict[str, Any] = {"path": "/".join(path), "what": what}
        if value is not None:
            count, size = _tensor_totals(value)
            entry.update(tensors=count, bytes=size)
        self.left_out.append(entry)
        return _DROP

    def finish(self) -> list[dict[str, Any]]:
        if self.more:
            self.left_out.append({"path": "...", "what": f"and {self.more} more values that are not JSON"})
        return self.left_out

    def value(self, v: Any, path: KeyPath) -> Any:
        """The JSON form of ``v``, or ``_DROP`` (recorded in ``left_out``)."""
        if path == self.chosen:
            return _DROP  # the weights themselves
        if path and _is_optimizer_state(path[-1], v):
            return self.leave_out(path, "optimizer state", v)
        if isinstance(v, torch.Tensor):
            if v.dim() == 0 and not v.is_complex() and not v.is_meta:
                return _json_number(v.item())  # e.g. Lightning's best_model_score
            return self.leave_out(path, f"tensor {describe(str(v.dtype).removeprefix('torch.'), tuple(v.shape))}", v)
        if isinstance(v, dict | list | tuple | set | frozenset) and v:
            if id(v) in self.first:
                return self.leave_out(path, f"the same object as {'/'.join(self.first[id(v)]) or '(the top level)'}")
            self.first[id(v)] = path
        if isinstance(v, dict):
            if _is_tensor_dict(v):
                return self.leave_out(path, "dict of tensors", v)
            out: dict[str, Any] = {}
            for k, item in v.items():
                converted = self.value(item, (*path, str(k)))
                if converted is not _DROP:
                    out[k if isinstance(k, str) else repr(k)] = converted
            return out
        if isinstance(v, list | tuple):
            # A dropped item becomes null so the others keep their positions.
            items = [self.value(item, (*path, str(i))) for i, item in enumerate(v)]
            return [None if item is _DROP else item for item in items]
        if isinstance(v, set | frozenset):
            items = [self.value(item, (*path, "*")) for item in v]
            kept = [item for item in items if item is not _DROP]
            return sorted(kept, key=lambda item: json.dumps(item, sort_keys=True))
        if v is None or isinstance(v, bool | int | str):
            return v
        if isinstance(v, float):
            return _json_number(v)
        if isinstance(v, complex):
            return str(v)
        if isinstance(v, torch.dtype | torch.device):
            return str(v)
        if isinstance(v, bytes | bytearray):
            return self.leave_out(path, f"{len(v)} bytes")
        return self.leave_out(path, f"a {type(v).__name__} value")


def _json_number(value: bool | int | float | complex) -> Any:
    """A number as JSON; NaN and infinities (not JSON) as the strings JavaScript prints."""
    if isinstance(value, complex):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _jsonable(value: Any) -> Any:
    """Already-parsed JSON made safe for ``allow_nan=False``."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return _json_number(value)
    return value


# --------------------------------------------------------------------------- safetensors


def _looks_like_safetensors(path: Path) -> bool:
    """By name, or by content: an 8-byte little-endian header length followed by ``{``."""
    if path.name.endswith(".safetensors"):
        return True
    try:
        with open_regular(path, what="a checkpoint file", error=lambda message: ConversionError(message)) as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except (OSError, ConversionError):
        return False  # read_torch_file reports the problem
    if len(head) < 9 or head[8:9] != b"{":
        return False
    length: int = struct.unpack("<Q", head[:8])[0]
    return 2 <= length <= min(MAX_HEADER_BYTES, size - 8)


def _open_regular(path: Path, what: str) -> tuple[int, mmap.mmap]:
    """Size and a private read-only-in-practice map of a regular, non-empty file."""
    where = str(path)
    try:
        with open_regular(path, what=f"a {what}", error=lambda message: ConversionError(message, file=where)) as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ConversionError(
                    f"{where}: {size} bytes, too short for a {what} (8-byte header length, JSON header, data); "
                    "it is truncated or not a safetensors file",
                    file=where,
                )
            # ACCESS_COPY: torch wants a writable buffer; pages are never written back to the file.
            return size, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError as exc:
        raise ConversionError(f"{where}: cannot read the {what} ({exc.strerror})", file=where) from None


def _read_safetensors_file(path: Path, hashes: _Hashes) -> tuple[dict[str, torch.Tensor], Header, dict[str, Any]]:
    """Tensors of one safetensors file, mapped from disk, after checking every header entry.

    Returns:
        The tensors (sorted by key), the parsed header, and ``{file, size, sha256}`` (the
        hash pending on ``hashes``).

    Raises:
        ConversionError: truncated file, lying header (offsets outside the data, sizes
            that do not fit dtype and shape, overlapping tensors), or no tensors.
    """
    where = str(path)
    size, mapping = _open_regular(path, "safetensors file")
    digest = hashes.start(path)
    (length,) = struct.unpack("<Q", mapping[:8])
    prefix = mapping[: 8 + min(length, MAX_HEADER_BYTES, size - 8)]
    try:
        header = parse_header(prefix, size, file=where)
    except IntegrityError as exc:
        raise ConversionError(f"{exc} (read as a safetensors file)", file=where) from None
    if not header.entries:
        raise ConversionError(f"{where}: the safetensors file holds no tensors; nothing to convert", file=where)
    spans = sorted((e.byte_range, k) for k, e in header.entries.items() if e.byte_range[0] != e.byte_range[1])
    for (before, first), (after, second) in pairwise(spans):
        if after[0] < before[1]:
            raise ConversionError(
                f"{where}: header entries {first!r} (bytes {before[0]}-{before[1]}) and {second!r} (bytes "
                f"{after[0]}-{after[1]}) overlap; a safetensors file stores each tensor in its own bytes. "
                "The file is corrupt or hand-made; re-save it.",
                file=where,
            )
    data = torch.frombuffer(mapping, dtype=torch.uint8)
    tensors = {}
    for key in sorted(header.entries):
        entry = header.entries[key]
        start, end = entry.byte_range
        raw = data[start:end]
        if start % itemsize(entry.dtype):
            raw = raw.clone()  # an unaligned tensor (foreign writer) cannot be viewed in place
        tensors[key] = raw.view(getattr(torch, entry.dtype)).view(entry.shape)
    return tensors, header, {"file": path.name, "size": size, "sha256": digest}


def _single_safetensors(path: Path, hashes: _Hashes) -> SourceCheckpoint:
    """One ``.safetensors`` file: its tensors; its ``__metadata__`` strings become metadata."""
    tensors, header, facts = _read_safetensors_file(path, hashes)
    metadata = {"safetensors_metadata": dict(header.metadata)} if header.metadata else None
    record = {**facts, "format": "safetensors", "container": "state-dict", "key": None, "left_out": []}
    return SourceCheckpoint(tensors, metadata, record)


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


def _read_safetensors_dir(directory: Path, hashes: _Hashes) -> SourceCheckpoint:
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
            return _single_safetensors(singles[0], hashes)
        found = ", ".join(sorted(p.name for p in directory.iterdir())[:10]) or "nothing"
        raise ConversionError(
            f"{where}: expected a directory with a *{INDEX_SUFFIX} index and its shards (as written by "
            f"save_pretrained) or a single .safetensors file; found {found}. Pass a file path to convert a "
            "torch.save file.",
            file=where,
        )
    return _read_sharded(indexes[0], hashes)


def _read_sharded(index_path: Path, hashes: _Hashes) -> SourceCheckpoint:
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
        shard_tensors, header, facts = _read_safetensors_file(shard, hashes)
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
        metadata["index_metadata"] = _jsonable(index_metadata)
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


# --------------------------------------------------------------------------- convert


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    module: nn.Module | None = None,
    key: str | None = None,
    remap: Remap | None = None,
    lineage: Any = None,
    parents: Sequence[Any] = (),
    overwrite: bool = False,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Convert a ``.pth``/``.pt``/``.bin``/``.ckpt``, ``.safetensors`` file or sharded directory.

    Nothing from the source is executed. With ``module``, the converted keys are checked
    against it before anything is written, its module tree is recorded, and ties the
    source omitted (Hugging Face drops ``lm_head.weight`` when tied) become aliases.

    Args:
        src: the source file or directory.
        dst: the checkpoint directory to create.
        module: the model the weights belong to (it is only inspected, never modified;
            a meta-device module is fine).
        key: where the tensor dict lies in a pickled container, when ambiguous.
        remap: ``{regex: replacement}`` applied in order to the source keys first.
        lineage: arbitrary JSON recorded as ``lineage.user``.
        parents: as for :func:`save`.
        overwrite: replace an existing checkpoint at ``dst``.
        progress: draw a progress bar on stderr when it is a terminal.
        storage_options: fsspec options when ``src`` or ``dst`` is a URL: a remote source is
            downloaded to a temporary directory first; a remote destination is written locally
            and uploaded with its manifest last.

    Returns:
        The manifest written; ``lineage["source"]`` says what the source was, which key
        held the tensors, what was left out and which ties were added.

    Raises:
        UnsafeCheckpointError: the pickle references a global outside the allowlist.
        ConversionError: unreadable, damaged or ambiguous source.
        ModelMismatchError: the converted keys do not fit ``module`` (the report suggests
            the remap for a ``module.``/``model.`` prefix); nothing was written.
        RemapError: a remap rule matches no key or makes two keys collide.
        UnsupportedTensorError: a tensor safetensors cannot store (complex128, sparse...).
        CheckpointExistsError: ``dst`` exists and ``overwrite`` is False.
    """
    with contextlib.ExitStack() as stack:
        if is_url(src):
            from manifest_ckpt.storage.remote import downloaded

            src = stack.enter_context(downloaded(str(src), storage_options))
        if is_url(dst):
            from manifest_ckpt.storage.remote import staged_destination

            dst = stack.enter_context(staged_destination(str(dst), overwrite=overwrite, storage_options=storage_options))
        target = Path(dst)
        # Fail before reading a large source (save checks again just before writing).
        _check_destination(target, overwrite)
        hashes = _Hashes()
        try:
            return _convert(Path(src), target, hashes, module, key, remap, lineage, parents, overwrite, progress)
        finally:
            hashes.close()


def _convert(
    src: Path,
    target: Path,
    hashes: _Hashes,
    module: nn.Module | None,
    key: str | None,
    remap: Remap | None,
    lineage: Any,
    parents: Sequence[Any],
    overwrite: bool,
    progress: bool,
) -> Manifest:
    """``convert`` once the destination is known to be free; hashes finish while writing."""
    source = _read(src, key, hashes)
    names = apply_remap(source.tensors, remap)
    state = {names[k]: t for k, t in source.tensors.items()}
    check_keys(state, writer=f"convert {src}")
    _check_tensors(state, str(src))
    record = dict(source.record)
    record.update(remap=dict(remap) if remap else None, torch=torch.__version__.split("+")[0])
    modules = None
    if module is not None:
        live = capture(module)
        state, added, merged = _complete_ties(state, live.aliases, live.tensors)
        _check_against(state, live, str(src), remap)
        modules = module_tree(module)
        record.update(module=class_name(module), ties_added=added, ties_merged=merged, key_prefix=None)
    else:
        record.update(module=None, ties_added=[], ties_merged=[], key_prefix=_common_prefix(state))
    aliases = find_aliases(state)
    _check_footprint(state, aliases, str(src))
    total = sum(t.numel() * t.element_size() for k, t in state.items() if k not in aliases)
    with Progress(f"convert {record['file']}", total, enabled=progress) as bar:
        return save(
            state,
            target,
            lineage=lineage,
            metadata=source.metadata,
            parents=parents,
            overwrite=overwrite,
            # The current directory's git state says nothing about converted weights, and
            # leaving it out keeps two conversions of one file byte-identical.
            record_code=False,
            # Resolved after the weights are written: the source is hashed meanwhile.
            source=lambda: _resolve(record),
            modules=modules,
            progress=bar.advance,
        )


def _check_tensors(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse tensors without values before anything is written."""
    empty = [k for k, t in state.items() if t.is_meta]
    if empty:
        raise ConversionError(
            f"{where}: {len(empty)} tensors are on the meta device and hold no values ({', '.join(empty[:5])}); "
            "save real weights and convert those.",
            file=where,
        )


def _check_footprint(state: Mapping[str, torch.Tensor], aliases: Mapping[str, str], where: str) -> None:
    """Bound what conversion writes by the bytes the source really stores.

    Every stored key is written in full, so a tensor whose view repeats elements of its
    storage (``torch.zeros(1).expand(n)``, ``as_strided`` with overlapping strides), or
    several views that together cover more bytes than their shared storage holds, would
    turn a small file into a large one. Views that fit (``w[:4]`` and ``w[4:]``, or tied
    keys, which become aliases) are fine. Refusing, rather than storing each storage once,
    keeps the format free of strides and offsets; a reader never sees a view.

    Raises:
        ConversionError: naming the keys, their sizes and the storage's, and how to re-save.
    """
    by_storage: dict[int, list[str]] = {}
    storage_bytes: dict[int, int] = {}
    for key, tensor in state.items():
        if key in aliases or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        by_storage.setdefault(address, []).append(key)
        storage_bytes[address] = storage.nbytes()
    for address, keys in by_storage.items():
        available = storage_bytes[address]
        sizes = {k: state[k].numel() * state[k].element_size() for k in keys}
        for key in keys:
            tensor = state[key]
            if sizes[key] > available:
                expanded = any(s == 0 and n > 1 for s, n in zip(tensor.stride(), tensor.shape))
                how = "an expanded view (stride 0)" if expanded else "a view whose strides repeat elements"
                raise ConversionError(
                    f"{where}: {key!r} is {how}: shape {list(tensor.shape)}, strides {list(tensor.stride())}, "
                    f"{sizes[key]} bytes when written out, from a storage of only {available} bytes. Converting "
                    "it would write more than the source holds, so it is refused. If the expanded values are "
                    "really wanted, materialise them (`t.clone()`) in a trusted environment and re-save; "
                    "otherwise save the unexpanded tensor.",
                    file=where,
                )
        if sum(sizes.values()) > available:
            listed = ", ".join(f"{k!r} ({sizes[k]} bytes)" for k in keys[:5]) + (" ..." if len(keys) > 5 else "")
            raise ConversionError(
                f"{where}: {len(keys)} tensors are overlapping views of one {available}-byte storage ({listed}); "
                f"written out they would take {sum(sizes.values())} bytes, more than the source holds, so they are "
                "refused. Save each view as its own tensor (`{k: v.clone() for k, v in state.items()}`) in a "
                "trusted environment and convert that file, or keep only the whole tensor.",
                file=where,
            )


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _complete_ties(
    state: dict[str, torch.Tensor], module_aliases: Mapping[str, str], module_keys: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Make the module's ties aliases in the converted state; order keys as the module does.

    A tied key the source omits gets its partner's tensor (Hugging Face files drop
    ``lm_head.weight``); a tied key stored twice with the same bits is stored once. A tie
    the source contradicts (different values) is left for the comparison to report.

    Returns:
        The state in the module's key order (keys the module lacks last), the keys added,
        and the keys whose duplicate copies were merged.
    """
    groups: dict[str, list[str]] = {}
    for k in module_keys:
        groups.setdefault(module_aliases.get(k, k), []).append(k)
    state = dict(state)
    added: list[str] = []
    merged: list[str] = []
    for members in groups.values():
        present = [m for m in members if m in state]
        if len(members) < 2 or not present:
            continue
        lead = state[present[0]]
        for m in members:
            if m not in state:
                state[m] = lead
                added.append(m)
            elif (
                state[m] is not lead and not find_aliases({"a": lead, "b": state[m]}) and _bitwise_equal(lead, state[m])
            ):
                state[m] = lead
                merged.append(m)
    ordered = {k: state[k] for k in module_keys if k in state}
    ordered.update((k, t) for k, t in state.items() if k not in ordered)
    return ordered, sorted(added), sorted(merged)


def _check_against(state: Mapping[str, torch.Tensor], live: LiveState, where: str, remap: Remap | None) -> None:
    """Compare the converted state with the module (the same comparison ``load`` makes).

    Raises:
        ModelMismatchError: with every difference and, for a prefix, the remap that fixes it.
    """
    comparison = compare(capture(state).spec(), live.spec())
    report = comparison.report
    if report.ok:
        return
    if report.suggested_remap:
        combined = {**(remap or {}), **report.suggested_remap}
        flags = " ".join(f"--remap {shlex.quote(f'{p}={r}')}" for p, r in combined.items())
        hints = [h for h in report.hints if not h.startswith("load with remap=")]
        hints.append(f"convert with remap={combined!r} (CLI: {flags})")
        report = replace(report, hints=hints, suggested_remap=combined)
    raise ModelMismatchError(report, path=where)


def _common_prefix(state: Mapping[str, torch.Tensor]) -> str | None:
    """``module.``/``model.``/``_orig_mod.`` when every key carries it (worth a remap)."""
    for prefix in _KNOWN_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return prefix
    return None


# --------------------------------------------------------------------------- CLI


def conversion_text(manifest: Manifest, location: str) -> str:
    """The human summary ``manifest-ckpt convert`` prints: source, keys, aliases, left out, digest."""
    source: Mapping[str, Any] = manifest.lineage.get("source", {})
    rows: list[tuple[str, str]] = [
        (
            "source",
            f"{source.get('file')}: {source.get('format')}, {human_bytes(int(source.get('size', 0)))}, "
            f"sha256 {str(source.get('sha256', ''))[:16]}...",
        ),
    ]
    container, key = source.get("container"), source.get("key")
    where = f"tensors under {key!r}" if key else "tensors at the top level"
    rows.append(("container", f"{container} ({where})"))
    if source.get("remap"):
        rows.append(("remap", ", ".join(f"{shlex.quote(p)} -> {shlex.quote(r)}" for p, r in source["remap"].items())))
    if source.get("module"):
        rows.append(("module", f"checked against {source['module']}; module tree recorded"))
    else:
        rows.append(("module", "none given: keys not checked, layer classes unknown"))
    size = sum(f.size for f in manifest.files.values())
    rows.append(
        (
            "stored",
            f"{len(manifest.tensors)} tensors, {human_bytes(manifest.total_bytes)} in {len(manifest.files)} "
            f"file{'' if len(manifest.files) == 1 else 's'} ({human_bytes(size)})",
        )
    )
    added, merged = set(source.get("ties_added", [])), set(source.get("ties_merged", []))
    for alias, target in manifest.aliases.items():
        why = (
            " (the source omitted it; tied in the module)"
            if alias in added
            else " (stored twice with equal values; tied in the module)"
            if alias in merged
            else " (shared storage in the source)"
        )
        rows.append(("alias", f"{alias} -> {target}{why}"))
    if isinstance(manifest.metadata, Mapping) and manifest.metadata:
        rows.append(("kept", ", ".join(sorted(manifest.metadata)) + " (as JSON in metadata)"))
    for entry in source.get("left_out", []):
        counts = f": {_count_text(entry['tensors'], entry['bytes'])}" if "tensors" in entry else ""
        rows.append(("left out", f"{entry['path']} ({entry['what']}{counts})"))
    if source.get("key_prefix"):
        prefix = source["key_prefix"]
        flag = shlex.quote(f"^{re.escape(prefix)}=")
        rows.append(
            (
                "note",
                f"every key starts with {prefix!r} ({_KNOWN_PREFIXES[prefix]}); "
                f"convert with --remap {flag} to strip it",
            )
        )
    rows.append(("digest", manifest.digest))
    return f"converted {source.get('file')} -> {location}\n" + "\n".join(f"  {k:<10} {v}" for k, v in rows)


def conversion_json(manifest: Manifest, location: str) -> dict[str, Any]:
    """The ``--json`` document of a successful conversion."""
    return {
        "ok": True,
        "checkpoint": location,
        "digest": manifest.digest,
        "tensors": len(manifest.tensors),
        "bytes": manifest.total_bytes,
        "aliases": dict(manifest.aliases),
        "kept": sorted(manifest.metadata) if isinstance(manifest.metadata, Mapping) else [],
        "source": dict(manifest.lineage.get("source", {})),
    }


def cli_convert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``manifest-ckpt convert``: 0 converted, 1 the model does not match (nothing written).

    Other errors (unsafe or unreadable source, bad remap) propagate as ManifestCkptError,
    which ``cli.run`` reports with exit code 2.
    """
    from manifest_ckpt.cli.factory import build_model
    from manifest_ckpt.comparison.remap import parse_remap_args
    from manifest_ckpt.storage.remote import parse_storage_options

    remap = parse_remap_args(args.remap) or None
    model = build_model(args.model) if args.model else None
    try:
        manifest = convert(
            args.src,
            args.dst,
            module=model,
            key=args.key,
            remap=remap,
            overwrite=args.overwrite,
            progress=not args.quiet,
            storage_options=parse_storage_options(getattr(args, "storage_option", None)),
        )
    except ModelMismatchError as exc:
        if args.json:
            _emit(out, {"ok": False, "source": str(args.src), "model": args.model, **exc.report.to_dict()})
        else:
            err.write(f"MISMATCH {args.src} vs {args.model}: nothing was written\n{exc.report}\n")
        return 1
    if args.json:
        _emit(out, conversion_json(manifest, str(args.dst)))
    else:
        out.write(conversion_text(manifest, str(args.dst)) + "\n")
    return 0


def _emit(out: TextIO, document: Any) -> None:
    out.write(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
