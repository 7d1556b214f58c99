"""``async_save``: copy the state into a staging buffer, return, write and hash in the background.

The caller is blocked only for the copy (pinned host memory where CUDA is present, so copies
from the GPU run at full speed). The copy is then handed to the ordinary :func:`save` on a
background thread, so an async save writes exactly the bytes a synchronous save of the same
state writes, with the same atomicity (a staging directory renamed into place; the manifest
written last) and the same digest. Whatever ``save`` accepts is snapshotted the same way: a
module becomes its state dict plus its module tree (``save(..., modules=)``); in mappings,
lists and tuples every tensor is copied and ties between tensors are kept.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from manifest_ckpt.comparison.introspect import _identity, capture
from manifest_ckpt.errors import SaveInProgressError, UnsupportedTensorError
from manifest_ckpt.format.manifest import Manifest, ModuleEntry
from manifest_ckpt.gc_pause import gc_paused
from manifest_ckpt.storage.store import is_url

__all__ = ["async_save"]

# Every staged tensor starts on this boundary, so a view of any dtype is aligned.
_ALIGN = 64
# Tensors up to this size are copied with one memmove; copy_ costs microseconds a call.
_MEMMOVE_MAX = 1 << 16
_PLAIN = (torch.Tensor, nn.Parameter)

_lock = threading.Lock()
_in_flight: dict[str, Future[Manifest]] = {}
# Staging buffers not used by a pending save, kept for the next call (at most two).
_free_buffers: list[torch.Tensor] = []
_KEEP_BUFFERS = 2
_executor: ThreadPoolExecutor | None = None


def async_save(obj: nn.Module | Mapping[str, Any], path: str | os.PathLike[str], **save_options: Any) -> Future[Manifest]:
    """Save like :func:`manifest_ckpt.save`, blocking only while the state is copied.

    Once this returns, the caller may change or free its tensors: the checkpoint holds the
    values they had at the call. Writing and hashing run on a background thread, one save at
    a time; at interpreter exit a pending save is finished first (the interpreter joins the
    worker before it exits), and a process killed meanwhile leaves no checkpoint at ``path``
    (a new checkpoint is renamed into place only when complete) or, for ``overwrite=True``,
    the previous one (its manifest is replaced last, atomically).

    Args:
        obj: what ``save`` accepts (a module or a state dict).
        path: the checkpoint directory.
        **save_options: ``save``'s keyword options, passed on unchanged.

    Returns:
        A future whose ``result()`` is the manifest, or raises what ``save`` would have raised.

    Raises:
        SaveInProgressError: a save to ``path`` started by ``async_save`` has not finished;
            wait for its future first. (Raised here, not through the future: the caller
            must know at once that this state was not taken.)
    """
    if isinstance(obj, nn.Module) and "modules" in save_options:
        raise TypeError(
            "async_save(module, modules=...): a module records its own tree; pass modules= only with a state dict"
        )
    key = _path_key(path)
    future: Future[Manifest] = Future()
    with _lock:
        pending = _in_flight.get(key)
        if pending is not None and not pending.done():
            raise SaveInProgressError(
                f"{path}: an async_save to this path is still running; call .result() on its future before "
                "saving there again (two writers to one checkpoint would race)"
            )
        _in_flight[key] = future
    try:
        snapshot, module_tree, buffer = _snapshot(obj)
    except Exception as exc:  # noqa: BLE001 - every failure of the save surfaces on its future
        with _lock:
            _in_flight.pop(key, None)
        future.set_exception(exc)
        return future
    except BaseException:
        with _lock:
            _in_flight.pop(key, None)
        raise

    def run() -> None:
        from manifest_ckpt.writer import save

        if not future.set_running_or_notify_cancel():  # pragma: no cover - nothing cancels it
            return
        try:
            state, options = snapshot, save_options
            if module_tree is not None:
                state = snapshot["tensors"]
                options = {**save_options, "modules": module_tree, "extra_state": snapshot["extra"]}
            manifest = save(state, path, **options)
        except BaseException as exc:  # noqa: BLE001 - the caller's future carries every failure
            _release(key, future, buffer)
            future.set_exception(exc)
        else:
            # The buffer goes back before the future resolves: a caller that waits and saves
            # again (a training loop) always finds it, and copies into warm memory.
            _release(key, future, buffer)
            future.set_result(manifest)

    _pool().submit(run)
    return future


def _release(key: str, future: Future[Manifest], buffer: torch.Tensor) -> None:
    """The save of ``future`` is over: ``key`` is free again and its buffer kept for the next call."""
    with _lock:
        if _in_flight.get(key) is future:
            del _in_flight[key]
        if len(_free_buffers) < _KEEP_BUFFERS:
            _free_buffers.append(buffer)


def _finish_pending() -> None:
    """At interpreter exit, wait for every pending save (errors stay on their futures)."""
    with _lock:
        pending = list(_in_flight.values())
    for future in pending:
        # exception() waits without raising the save's error; only a cancelled future raises.
        with contextlib.suppress(CancelledError):
            future.exception()


# The interpreter's exit first runs the threading-atexit hooks, newest first, then joins
# threads; concurrent.futures' own hook (registered when ThreadPoolExecutor was imported
# above) forbids new pool tasks, which save's hashing threads need. Ours is registered
# later, so it runs before that one: the pending save completes as if the caller had waited.
# (atexit.register would run only after those hooks.)
threading._register_atexit(_finish_pending)  # type: ignore[attr-defined]


def _path_key(path: str | os.PathLike[str]) -> str:
    """One key per destination, however it is spelled."""
    text = os.fspath(path)
    return text if is_url(text) else os.path.realpath(text)


def _pool() -> ThreadPoolExecutor:
    # One worker: saves run one after another (each already hashes on every core), and the
    # interpreter joins it at exit, so a pending save completes before the process ends.
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="manifest-ckpt-save")
        return _executor


@gc_paused()
def _snapshot(obj: Any) -> tuple[Any, dict[str, ModuleEntry] | None, torch.Tensor]:
    """A copy of ``obj`` that ``save`` writes identically, its module tree, and the buffer it lives in.

    A module becomes ``{"tensors": its state dict, "extra": its extra state}`` (ties kept: tied
    keys get one staged tensor) and its tree.
    """
    if isinstance(obj, nn.Module):
        state = capture(obj, extra_state=True)
        inner = _tensors_in(state.extra)  # tensors inside module extra state
        _refuse_meta([*state.tensors.values(), *inner])
        # capture found the ties already (state.aliases): each stored key is staged once.
        keys = [k for k in state.tensors if k not in state.aliases]
        copies, buffer = _stage_all([state.tensors[k] for k in keys] + inner)
        staged = dict(zip(keys, copies))
        snapshot = {k: staged[state.aliases.get(k, k)] for k in state.tensors}
        # Extra state is staged with the tensors; run() hands it to save apart from them.
        extra = _replace_tensors(state.extra, {_identity(t): c for t, c in zip(inner, copies[len(keys) :])}, {})
        return {"tensors": snapshot, "extra": extra}, state.modules, buffer
    leaves = _tensors_in(obj)
    _refuse_meta(leaves)
    unique: dict[tuple[object, ...], torch.Tensor] = {}
    for t in leaves:
        unique.setdefault(_identity(t), t)
    copies, buffer = _stage_all(list(unique.values()))
    return _replace_tensors(obj, dict(zip(unique, copies)), {}), None, buffer


def _refuse_meta(tensors: Iterable[torch.Tensor]) -> None:
    if any(t.is_meta for t in tensors):
        # save() words this error; raise it now rather than copying a tensor that has no values.
        raise UnsupportedTensorError(
            "cannot save a tensor on the meta device: it has no values; materialise the module first"
        )


def _stage_all(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Contiguous copies of ``tensors`` (same dtypes and shapes) in one staging buffer, and the buffer.

    Small plain CPU tensors of one dtype and shape (the many tiny tensors of a real model's
    norms and biases) are laid out back to back and their copies made by one ``unbind`` of
    the region, each filled by one memmove; any other tensor is staged on its own.
    """
    groups: dict[tuple[torch.dtype, tuple[int, ...]], list[int]] = {}
    alone: list[int] = []
    for i, t in enumerate(tensors):
        if (
            type(t) in _PLAIN
            and t.is_cpu
            and t.is_contiguous()
            and 0 < t.nbytes <= _MEMMOVE_MAX
            and not (t.is_conj() or t.is_neg())
        ):
            groups.setdefault((t.dtype, tuple(t.shape)), []).append(i)
        else:
            alone.append(i)
    offset = 0
    placed: list[tuple[int, tuple[torch.dtype, tuple[int, ...]], list[int]]] = []
    for group, members in groups.items():
        placed.append((offset, group, members))
        offset += _aligned(len(members) * tensors[members[0]].nbytes)
    singles = []
    for i in alone:
        singles.append((offset, i))
        offset += _aligned(tensors[i].numel() * tensors[i].element_size())
    on_gpu = any(tensors[i].device.type == "cuda" for i in alone)
    buffer = _buffer(offset, pinned=on_gpu and torch.cuda.is_available())
    copies: list[torch.Tensor | None] = [None] * len(tensors)
    for start, (dtype, shape), members in placed:
        size = tensors[members[0]].nbytes
        region = buffer[start : start + len(members) * size].view(dtype).view(len(members), *shape)
        base = region.data_ptr()
        for at, (i, view) in enumerate(zip(members, region.unbind(0))):
            ctypes.memmove(base + at * size, tensors[i].data_ptr(), size)
            copies[i] = view
    for start, i in singles:
        copies[i] = _stage(tensors[i], buffer, start)
    if on_gpu:
        torch.cuda.synchronize()  # the caller may change its GPU tensors once we return
    done = [c for c in copies if c is not None]
    assert len(done) == len(tensors)
    return done, buffer


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _buffer(nbytes: int, *, pinned: bool) -> torch.Tensor:
    """A free staging buffer of at least ``nbytes`` (reused across calls), or a new one."""
    with _lock:
        for i, buf in enumerate(_free_buffers):
            if buf.numel() >= nbytes and buf.is_pinned() == pinned:
                return _free_buffers.pop(i)
        if _free_buffers:
            _free_buffers.pop(0)  # too small or the wrong kind: let it go rather than hoard
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)


def _stage(t: torch.Tensor, buffer: torch.Tensor, offset: int) -> torch.Tensor:
    """Copy ``t`` into ``buffer`` at ``offset``; return the contiguous copy (same dtype and shape)."""
    nbytes = t.numel() * t.element_size()
    region = buffer[offset : offset + nbytes]
    if nbytes == 0:
        return torch.empty(t.shape, dtype=t.dtype)
    out = region.view(t.dtype).view(t.shape)
    src = t.detach()
    if (
        nbytes <= _MEMMOVE_MAX
        and src.is_cpu
        and src.is_contiguous()
        and not (src.is_conj() or src.is_neg())
        and type(src) is torch.Tensor
    ):
        ctypes.memmove(out.data_ptr(), src.data_ptr(), nbytes)
    else:
        out.copy_(src, non_blocking=src.device.type == "cuda")
    return out


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in a state: mapping values, list and tuple items, nested."""
    found: list[torch.Tensor] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def _replace_tensors(value: Any, staged: Mapping[tuple[object, ...], torch.Tensor], memo: dict[int, Any]) -> Any:
    """``value`` with each tensor replaced by its staged copy and every other leaf copied."""
    if isinstance(value, torch.Tensor):
        return staged[_identity(value)]
    if isinstance(value, Mapping):
        return {k: _replace_tensors(v, staged, memo) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_replace_tensors(v, staged, memo) for v in value)
    if isinstance(value, list):
        return [_replace_tensors(v, staged, memo) for v in value]
    return copy.deepcopy(value, memo)

