"""``torch.save`` files (``.pth``, ``.pt``, ``.bin``, Lightning ``.ckpt``): find the tensor dict.

The file is read by :func:`torch_pickle.read_torch_file` (an opcode scan against an
allowlist, then torch's weights-only unpickler); nothing in it runs. The one dict of
tensors outside optimizer state is the model (``key=`` picks one when there are several);
everything else becomes JSON metadata or is listed as left out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import torch

from manifest_ckpt.cli.progress import human_bytes
from manifest_ckpt.errors import ConversionError
from manifest_ckpt.format.dtypes import describe
from manifest_ckpt.sources.source import Hashes, SourceCheckpoint, json_number
from manifest_ckpt.sources.torch_pickle import read_torch_file

__all__ = ["count_text", "read_torch_source"]

# Container nesting followed when looking for the tensor dict (Lightning's is at depth 1).
_MAX_SEARCH_DEPTH: Final = 8
_MAX_LEFT_OUT: Final = 50
_OPTIMIZER_NAME: Final = re.compile(r"optim", re.IGNORECASE)

# Where a value lies in a pickled container: dict keys and list indices, as strings.
KeyPath = tuple[str, ...]


def read_torch_source(path: Path, key: str | None, hashes: Hashes) -> SourceCheckpoint:
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
    return count_text(*_tensor_totals(value))


def count_text(count: int, size: int) -> str:
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
                return json_number(v.item())  # e.g. Lightning's best_model_score
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
            return json_number(v)
        if isinstance(v, complex):
            return str(v)
        if isinstance(v, torch.dtype | torch.device):
            return str(v)
        if isinstance(v, bytes | bytearray):
            return self.leave_out(path, f"{len(v)} bytes")
        return self.leave_out(path, f"a {type(v).__name__} value")
