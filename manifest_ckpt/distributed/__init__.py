"""Sharded checkpoints with torch.distributed.checkpoint (DCP): many ranks, one verified manifest.

``save`` / ``async_save`` / ``load`` mirror ``dcp.save`` / ``dcp.async_save`` / ``dcp.load``
and run DCP's own engine with this library's storage classes and planners:

- :class:`ManifestStorageWriter`: every rank writes its chunks as safetensors files of the
  manifest-ckpt layout, digesting each chunk while writing it; the coordinator writes
  ``manifest.json`` last, the atomic commit marker.
- :class:`ManifestSavePlanner`: DCP's default planner, refusing non-tensors and saving ties once.
- :class:`ManifestStorageReader`: presents the manifest to DCP so a save on N ranks loads
  on M ranks with another placement; checks file binding (and digests when asked) on
  every rank before any rank reads.
- :class:`ManifestLoadPlanner`: compares every rank's live state dict with the checkpoint
  and raises one :class:`~manifest_ckpt.ModelMismatchError` on every rank, before any read;
  never casts unless asked.

The result is an ordinary manifest checkpoint: ``manifest_ckpt.verify``, ``read_manifest``
and single-process ``manifest_ckpt.load`` (which assembles the chunks) work on it.
Errors are this library's on every rank: DCP's ``CheckpointException`` is unwrapped to
the first rank's :class:`~manifest_ckpt.ManifestCkptError`.
"""

from __future__ import annotations

import concurrent.futures
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.stateful import Stateful

from manifest_ckpt.comparison.remap import Remap
from manifest_ckpt.distributed.reader import ManifestLoadPlanner, ManifestStorageReader
from manifest_ckpt.distributed.writer import ManifestSavePlanner, ManifestStorageWriter
from manifest_ckpt.errors import ManifestCkptError, RankFailedError
from manifest_ckpt.format.manifest import Manifest

__all__ = [
    "ManifestLoadPlanner",
    "ManifestSavePlanner",
    "ManifestStorageReader",
    "ManifestStorageWriter",
    "async_save",
    "load",
    "save",
]

PathLike = str | os.PathLike[str]


def save(
    state_dict: dict[str, Any],
    path: PathLike,
    *,
    module: nn.Module | None = None,
    lineage: Any = None,
    metadata: Any = None,
    parents: Sequence[Any] = (),
    overwrite: bool = False,
    record_code: bool = True,
    timestamp: bool = False,
    fsync: bool = True,
    process_group: dist.ProcessGroup | None = None,
    no_dist: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Save a (sharded) state dict from every rank as one manifest checkpoint; call on all ranks.

    DTensor and ShardedTensor values are saved chunk by chunk, each rank writing its own;
    replicated tensors are written once. Without an initialised process group this saves
    from the one process.

    Args:
        state_dict: the (possibly nested) state dict, as for ``dcp.save``; tensors only.
        path: the checkpoint directory, on storage every rank can reach, or a URL
            (``s3://bucket/ck``): each rank uploads its files, the coordinator the manifest last.
        module: record this module's tree; the state dict must then be its ``state_dict()``.
        lineage, metadata, parents, record_code, timestamp: as in :func:`manifest_ckpt.save`.
        overwrite: replace an existing checkpoint at ``path``.
        fsync: flush every file to disk before the manifest commits it (DCP's default).
        process_group: the group to save with (default: the default group).
        no_dist: save from this process alone, with no collective, even where a process
            group is initialised (as ``dcp.save(no_dist=True)``; for code that runs on one
            rank, such as a Lightning ``CheckpointIO``).
        storage_options: fsspec options when ``path`` is a URL (the same on every rank).

    Returns:
        The manifest, on every rank.

    Raises:
        CheckpointExistsError: ``path`` holds a checkpoint and ``overwrite`` is False.
        UnsupportedTensorError: a value is not a tensor or cannot be stored faithfully.
    """
    writer = _writer(path, module, lineage, metadata, parents, overwrite, record_code, timestamp, fsync, storage_options)
    state = _resolved(state_dict, list(state_dict), process_group, no_dist, f"distributed save to {path}")
    try:
        with _library_errors(lambda: None, f"distributed save to {path}"), _single_process_quiet(no_dist):
            result = dcp_save(
                state,
                storage_writer=writer,
                planner=ManifestSavePlanner(),
                process_group=process_group,
                no_dist=no_dist,
            )
    except BaseException:
        writer.abandon()  # another rank failed: this one's staging directory goes too
        raise
    return _manifest_of(result)


def async_save(
    state_dict: dict[str, Any],
    path: PathLike,
    *,
    module: nn.Module | None = None,
    lineage: Any = None,
    metadata: Any = None,
    parents: Sequence[Any] = (),
    overwrite: bool = False,
    record_code: bool = True,
    timestamp: bool = False,
    fsync: bool = True,
    process_group: dist.ProcessGroup | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> concurrent.futures.Future[Manifest]:
    """``save`` in the background: stage a CPU copy now, write it on a thread; call on all ranks.

    The process group needs a CPU backend (gloo), as for ``dcp.async_save``. Issue no other
    collective on that group until the future is done.

    Returns:
        A future of the manifest; its exception is this library's error, as for ``save``.
    """
    writer = _writer(path, module, lineage, metadata, parents, overwrite, record_code, timestamp, fsync, storage_options)
    # The staged copy no longer shares storage between tied keys: find the ties (and refuse
    # what cannot be stored) on the caller's state dict, now, on every rank alike.
    probe = ManifestSavePlanner()
    state = _resolved(state_dict, list(state_dict), process_group, False, f"distributed async_save to {path}", probe)
    try:
        with _library_errors(lambda: None, f"distributed async_save to {path}"):
            response = dcp_async_save(
                state,
                storage_writer=writer,
                planner=ManifestSavePlanner(ties=probe.aliases),
                process_group=process_group,
            )
    except BaseException:
        writer.abandon()
        raise
    inner = response if isinstance(response, concurrent.futures.Future) else response.upload_completion
    outer: concurrent.futures.Future[Manifest] = concurrent.futures.Future()

    def done(future: concurrent.futures.Future[Any]) -> None:
        try:
            outer.set_result(_manifest_of(future.result()))
        except CheckpointException as exc:
            writer.abandon()  # a rank failed while writing: DCP never calls finish, which would clean up
            error = _unwrap(exc, None, f"distributed async_save to {path}")
            error.__cause__ = exc
            outer.set_exception(error)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            writer.abandon()
            outer.set_exception(exc)

    inner.add_done_callback(done)
    return outer


def load(
    state_dict: dict[str, Any],
    path: PathLike,
    *,
    strict: bool = True,
    remap: Remap | None = None,
    cast: bool = False,
    verify_digests: bool = False,
    expect_digest: str | None = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    module: nn.Module | None = None,
    check_classes: bool = True,
    process_group: dist.ProcessGroup | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Load a manifest checkpoint into every rank's (sharded) state dict, in place; call on all ranks.

    The checkpoint may have been saved on any number of ranks with any placement, or by
    :func:`manifest_ckpt.save`. Every rank's state dict is compared with the manifest first;
    all problems of all ranks are raised as one report, on every rank, before any read.

    Args:
        state_dict: the state dict to fill (DTensor, ShardedTensor or plain tensors), as for
            ``dcp.load``; its tensors must already have their final shape and placement.
        path: the checkpoint directory, or a URL (``s3://bucket/ck``).
        strict, remap, cast, allow_missing, allow_unexpected, check_classes: as in
            :func:`manifest_ckpt.load`; ``module`` supplies the layer classes to compare.
        verify_digests: hash every chunk a rank reads before any rank copies a byte.
        expect_digest: refuse a checkpoint whose digest is not this one.
        process_group: the group to load with (default: the default group).
        storage_options: fsspec options when ``path`` is a URL (the same on every rank).

    Returns:
        The checkpoint's manifest.

    Raises:
        ModelMismatchError: some rank's state differs from the checkpoint (``.report`` lists all).
        IntegrityError: a missing, truncated or (with ``verify_digests``) corrupt file.
        ManifestError: invalid manifest, or weights files that do not belong to it.
    """
    reader = ManifestStorageReader(
        path, remap=remap, verify_digests=verify_digests, expect_digest=expect_digest, storage_options=storage_options
    )
    planner = ManifestLoadPlanner(
        strict=strict,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        cast=cast,
        module=module,
        check_classes=check_classes,
    )
    what = f"distributed load from {path}"
    # As dcp.load: each Stateful's state_dict() (in key order) is filled, then handed back to it.
    keys = sorted(state_dict)
    resolved = _resolved(state_dict, keys, process_group, False, what)
    with _library_errors(lambda: reader.failure, what), _single_process_quiet():
        dcp_load(resolved, storage_reader=reader, planner=planner, process_group=process_group)
    for key in keys:
        elem = state_dict[key]
        if isinstance(elem, Stateful):
            elem.load_state_dict(resolved[key])
        else:
            state_dict[key] = resolved[key]
    assert reader.index is not None
    return reader.index.manifest


def _writer(
    path: PathLike,
    module: nn.Module | None,
    lineage: Any,
    metadata: Any,
    parents: Sequence[Any],
    overwrite: bool,
    record_code: bool,
    timestamp: bool,
    fsync: bool,
    storage_options: Mapping[str, Any] | None,
) -> ManifestStorageWriter:
    return ManifestStorageWriter(
        path,
        module=module,
        lineage=lineage,
        metadata=metadata,
        parents=parents,
        record_code=record_code,
        timestamp=timestamp,
        overwrite=overwrite,
        sync_files=fsync,
        storage_options=storage_options,
    )


def _manifest_of(result: Metadata) -> Manifest:
    manifest = result.storage_data
    if not isinstance(manifest, Manifest):
        raise ManifestCkptError("the distributed save finished without a manifest (was the writer replaced?)")
    return manifest


def _resolved(
    state_dict: dict[str, Any],
    keys: Iterable[str],
    process_group: dist.ProcessGroup | None,
    no_dist: bool,
    what: str,
    probe: ManifestSavePlanner | None = None,
) -> dict[str, Any]:
    """The state dict (its ``keys``, in that order) with each ``Stateful`` replaced by its ``state_dict()``, as DCP does first.

    A failure on one rank (a ``Stateful``'s own error, a value ``probe`` refuses) is raised on
    every rank, where DCP would leave the other ranks waiting in its first collective.
    """
    refused: ManifestCkptError | None = None
    state: dict[str, Any] = {}
    try:
        state = {k: state_dict[k].state_dict() if isinstance(state_dict[k], Stateful) else state_dict[k] for k in keys}
        if probe is not None:
            probe.set_up_planner(state)
    except ManifestCkptError as exc:
        refused = exc
    except Exception as exc:  # noqa: BLE001 - user code's own error, named by rank on every rank
        rank = dist.get_rank(process_group) if dist.is_available() and dist.is_initialized() else 0
        refused = RankFailedError(
            f"{what} failed on rank {rank}: {type(exc).__name__}: {exc}; fix the cause on that rank and run it again"
        )
        refused.__cause__ = exc
    if not no_dist:
        refused = _any_rank(refused, process_group)
    if refused is not None:
        raise refused
    return state


def _any_rank(error: ManifestCkptError | None, process_group: dist.ProcessGroup | None) -> ManifestCkptError | None:
    """The lowest rank's error, on every rank (one gather of the group); this one's without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return error
    gathered: list[ManifestCkptError | None] = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(gathered, error, group=process_group)
    return next((e for e in gathered if e is not None), None)


def _unwrap(exc: CheckpointException, local: ManifestCkptError | None, what: str) -> ManifestCkptError:
    """This library's error behind DCP's wrapper: the local one, else the lowest rank's, else a RankFailedError."""
    if local is not None:
        return local
    failures = {rank: exc.failures[rank][0] for rank in sorted(exc.failures)}
    for error in failures.values():
        if isinstance(error, ManifestCkptError):
            return error
    if not failures:
        return RankFailedError(f"{what} failed: {exc}", failures=failures)
    rank, error = next(iter(failures.items()))
    others = sorted(failures)[1:]
    also = f" (and on rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))})" if others else ""
    return RankFailedError(
        f"{what} failed on rank {rank}{also}: {type(error).__name__}: {error}; fix the cause on that rank "
        "and run it again (the __cause__, DCP's CheckpointException, holds each rank's traceback)",
        failures=failures,
    )


@contextmanager
def _library_errors(local: Callable[[], ManifestCkptError | None], what: str) -> Iterator[None]:
    """Raise this library's error rather than DCP's ``CheckpointException`` that wraps it."""
    try:
        yield
    except CheckpointException as exc:
        raise _unwrap(exc, local(), what) from exc


@contextmanager
def _single_process_quiet(quiet: bool = False) -> Iterator[None]:
    """Without a process group DCP warns that it saves or loads in one process: that is the intent."""
    if dist.is_available() and dist.is_initialized() and not quiet:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
