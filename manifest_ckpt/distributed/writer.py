"""Saving through torch.distributed.checkpoint: a save planner and a storage writer.

Every rank writes the chunks it owns into safetensors files of the manifest-ckpt layout
(content digest in the header, one chunk per tensor per file, absolute byte ranges),
digesting each chunk while it is written. The coordinator's ``finish`` then writes
``manifest.json``, the commit marker: until it exists the directory is no checkpoint.

At a URL (``s3://...``) the coordinator checks the destination first; each rank writes its
files into a local temporary directory and uploads them (content-addressed names, so no
rank's object is part of any checkpoint yet); the coordinator then uploads ``manifest.json``
last and only then deletes the objects it replaced (``storage/remote.py``, as ``save`` does).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from manifest_ckpt.comparison.introspect import module_tree
from manifest_ckpt.distributed.state import local_aliases, require_tensors, torch_dtype_name
from manifest_ckpt.distributed.tree import encode_state
from manifest_ckpt.errors import (
    CheckpointExistsError,
    ManifestCkptError,
    ManifestError,
    UnsupportedOptionError,
    UnsupportedTensorError,
    UnsupportedValueError,
)
from manifest_ckpt.format import values as _values
from manifest_ckpt.format.dtypes import itemsize, nbytes
from manifest_ckpt.format.keys import check_keys
from manifest_ckpt.format.manifest import (
    MANIFEST_NAME,
    Chunk,
    FileEntry,
    Manifest,
    ModuleEntry,
    TensorEntry,
    chunked_digest,
    compute_digest,
    required_version,
)
from manifest_ckpt.storage import commit
from manifest_ckpt.storage.store import is_url
from manifest_ckpt.training.tree import Encoder
from manifest_ckpt.writer import (
    _lineage,
    _require_json,
    content_file_name,
    write_safetensors,
)


@dataclass(frozen=True)
class _LocalSaveInfo:
    """A rank's local plan ``planner_data``: torch's flattening mappings, its ties, its value tree."""

    mappings: Any
    aliases: dict[str, str]
    tree: Any


@dataclass
class ManifestStorageMeta(StorageMeta):
    """What :class:`ManifestStorageWriter` tells the planner: the checkpoint will be a manifest one.

    :class:`ManifestSavePlanner` then hands DCP the tensors under their dotted keys and keeps
    the rest of the state as the value tree; under another writer it plans as DCP does.
    """


@dataclass(frozen=True)
class _GlobalSaveInfo:
    """A global ``SavePlan.planner_data``: the ties every rank sees (alias -> key saved), the tree."""

    aliases: dict[str, str]
    tree: Any


@dataclass(frozen=True)
class _RankFiles:
    """A rank's ``SavePlan.storage_data``: its index (which makes its file names unique) and
    the staging directory, a sibling of the checkpoint, that every rank writes into."""

    index: int
    staging: str


@dataclass(frozen=True)
class StoredChunk:
    """Where one written chunk landed (``WriteResult.storage_data``)."""

    file: str
    byte_range: tuple[int, int]
    digest: str
    shape: tuple[int, ...]
    file_entry: FileEntry


@dataclass(frozen=True)
class StoredValue:
    """A non-tensor value of DCP's default save planner (``WriteResult.storage_data``).

    The value is stored as JSON (its node of docs/format.md §8), never pickled; the tensors and
    byte strings inside it are written to the rank's files, each ``key -> (dtype, chunk)``.
    """

    node: Any
    tensors: dict[str, tuple[str, StoredChunk]]


class ManifestSavePlanner(DefaultSavePlanner):
    """torch's default save planner, plus: values stored without pickle, ties saved once.

    The state dict may nest dicts and lists and hold plain values and byte strings, as for
    ``dcp.save`` (``get_state_dict``'s optimizer ``param_groups``, a step count...); anything
    else is refused with :class:`~manifest_ckpt.errors.UnsupportedValueError` before any
    write. Under :class:`ManifestStorageWriter` the tensors are planned under their dotted
    keys and the rest becomes the checkpoint's value tree; under another writer (torch's
    ``FileSystemWriter``) the planning is DCP's own.

    A tie (the same tensor under two keys, such as tied embeddings) is recorded as an alias
    when every rank sees it; the alias's chunks are then not written a second time.

    Args:
        ties: the ties, when they cannot be seen in the state dict this planner gets (a
            staged copy for ``async_save`` holds separate copies of tied tensors).
    """

    def __init__(self, *, ties: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ties = None if ties is None else dict(ties)
        self.aliases: dict[str, str] = {}
        self.tree: Any = None

    def set_up_planner(
        self,
        state_dict: dict[str, Any],
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        tree, tensors = encode_state(state_dict)
        # Refused here, in planning, before any rank writes a byte.
        check_keys(tensors, writer="distributed.save")
        require_tensors(tensors)
        if isinstance(storage_meta, ManifestStorageMeta):
            self.tree = tree
            super().set_up_planner(tensors, storage_meta, is_coordinator)
        else:
            super().set_up_planner(state_dict, storage_meta, is_coordinator)
        if self.ties is None:
            self.aliases = local_aliases(tensors)
        else:
            self.aliases = {k: v for k, v in self.ties.items() if k in tensors and v in tensors}

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        return dataclasses.replace(plan, planner_data=_LocalSaveInfo(plan.planner_data, self.aliases, self.tree))

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        infos = [p.planner_data for p in all_plans]
        if not all(isinstance(i, _LocalSaveInfo) for i in infos):
            raise ManifestCkptError(
                "ManifestSavePlanner: a rank used another planner; every rank must use the same one"
            )
        # A tie only some ranks see is stored twice rather than guessed.
        first = infos[0].aliases
        aliases = {k: v for k, v in first.items() if all(i.aliases.get(k) == v for i in infos[1:])}
        plans, metadata = super().create_global_plan(
            [dataclasses.replace(p, planner_data=i.mappings) for p, i in zip(all_plans, infos)]
        )
        # The ties travel in the global plans, which ManifestStorageWriter reads (it writes an
        # alias's chunks once); another writer ignores them and writes every key. DCP's Metadata
        # keeps only torch's own types, so that a checkpoint written by FileSystemWriter under
        # this planner unpickles where manifest_ckpt is not installed.
        # The coordinator's tree is the checkpoint's (DCP, too, keeps one rank's non-tensor values).
        plans = [dataclasses.replace(p, planner_data=_GlobalSaveInfo(aliases, infos[0].tree)) for p in plans]
        return plans, metadata


class ManifestStorageWriter(FileSystemWriter):
    """A DCP storage writer whose checkpoint is an ordinary manifest-ckpt directory.

    Each rank writes its chunks as safetensors files (``weights-<digest16>-rank<N>.safetensors``),
    hashing each chunk on a second thread while writing it; the coordinator writes
    ``manifest.json`` last. Builds on :class:`FileSystemWriter` for paths, staging
    (``async_save``) and checkpoint ids; the data and metadata formats are this library's.

    Args:
        path: the checkpoint directory (created with its parents).
        module: record this module's tree (classes, parameters, buffers); the state dict's
            keys must then be the module's own ``state_dict()`` keys.
        lineage, metadata, parents, record_code, timestamp: as in :func:`manifest_ckpt.save`.
        overwrite: replace an existing checkpoint at ``path``.
        sync_files: fsync every file before the manifest commits them (DCP's default).
        thread_count: write each rank's chunks as this many files, on as many threads
            (as ``FileSystemWriter`` does).
        single_file_per_rank: False writes one file per chunk (as ``FileSystemWriter`` does).
        per_thread_copy_ahead, cache_staged_state_dict: as for ``FileSystemWriter`` (a copy-ahead
            budget of its writer threads, which change no byte written; staging kept between
            ``async_save`` calls).
        serialization_format: ``SerializationFormat.SAFETENSORS``, what every file is.
        storage_options: fsspec options when ``path`` is a URL (``s3://bucket/ck``), the same
            on every rank; each rank uploads its own files.

    Raises:
        UnsupportedOptionError: ``_extensions`` (stream transforms such as ``ZStandard``):
            compressed data could not be memory-mapped, digested per tensor or read by
            ``manifest_ckpt.load``; a ``thread_count`` below 1; or ``serialization_format=TORCH_SAVE``
            (the files are safetensors).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        module: nn.Module | None = None,
        lineage: Any = None,
        metadata: Any = None,
        parents: Sequence[Any] = (),
        record_code: bool = True,
        timestamp: bool = False,
        overwrite: bool = False,
        sync_files: bool = True,
        thread_count: int = 1,
        single_file_per_rank: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        extensions = kwargs.pop("_extensions", None)
        if extensions:
            names = ", ".join(type(e).__name__ for e in extensions)
            raise UnsupportedOptionError(
                f"ManifestStorageWriter: _extensions={names} is not supported: a manifest checkpoint stores raw "
                "tensor bytes in safetensors files (memory-mapped on load, digested per tensor). Leave "
                "_extensions out (compress finished checkpoints with an external tool if you must)."
            )
        form = kwargs.get("serialization_format")
        if form is not None and form != SerializationFormat.SAFETENSORS:
            raise UnsupportedOptionError(
                f"ManifestStorageWriter: serialization_format={form} cannot be honoured: every file of a manifest "
                "checkpoint is safetensors. Pass SerializationFormat.SAFETENSORS or leave it out."
            )
        if not isinstance(thread_count, int) or isinstance(thread_count, bool) or thread_count < 1:
            raise UnsupportedOptionError(f"ManifestStorageWriter: thread_count must be an int >= 1, got {thread_count!r}")
        # The parent's own overwrite check looks for DCP's pickled ``.metadata``; ours is below.
        super().__init__(
            path,
            sync_files=sync_files,
            overwrite=True,
            thread_count=thread_count,
            single_file_per_rank=single_file_per_rank,
            **kwargs,
        )
        _require_json("lineage", lineage)
        _require_json("metadata", metadata)
        self.modules: dict[str, ModuleEntry] | None = None if module is None else module_tree(module)
        self.user_lineage = lineage
        self.user_metadata = metadata
        self.parents = tuple(parents)
        self.record_code = record_code
        self.timestamp = timestamp
        self.replace = overwrite
        self.is_coordinator = False
        self.manifest: Manifest | None = None
        self._lineage_doc: dict[str, Any] | None = None
        self._aliases: dict[str, str] = {}
        self._tree: Any = None
        self._stage: commit.Stage | None = None
        self.storage_options = dict(storage_options or {})
        self.url: str | None = str(path).rstrip("/") if is_url(path) else None
        self._destination: Any = None  # the coordinator's checked remote.Destination

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:
            self.url = str(checkpoint_id).rstrip("/") if is_url(checkpoint_id) else None

    @property
    def checkpoint_id(self) -> str | os.PathLike[str]:
        return self.url if self.url is not None else self.path

    def storage_meta(self) -> StorageMeta | None:
        return ManifestStorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)
        self.is_coordinator = is_coordinator
        if not kwargs.get("use_collectives", True):
            raise ManifestCkptError(
                "ManifestStorageWriter needs use_collectives=True: one coordinator writes the manifest that "
                "lists every rank's files"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if self.modules is not None:
            _check_module_keys(self.modules, {item.index.fqn for item in plan.items})
        if self.url is None:
            target = Path(self.path)
            _check_destination(target, self.replace)
            self.fs.mkdir(target.parent)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # Lineage reads parent manifests and git state: fail here, before any rank writes.
        self._lineage_doc = _lineage(self.user_lineage, self.parents, self.record_code, self.timestamp, None)
        info = plans[0].planner_data if plans else None
        self._aliases = dict(info.aliases) if isinstance(info, _GlobalSaveInfo) else {}
        self._tree = info.tree if isinstance(info, _GlobalSaveInfo) else None
        if self._tree is not None and self.modules is not None:
            raise ManifestError(
                "module= records one module's tree, but the state dict is an application state (nested, or "
                "holding values that are not tensors); leave module= out",
                field="modules",
            )
        if self.url is not None:
            from manifest_ckpt.storage import remote

            # Checked once, here, before any rank uploads a byte; ``finish`` commits against it.
            self._destination = remote.check_destination(
                self.url, overwrite=self.replace, storage_options=self.storage_options
            )
            staging = ""
        else:
            # The coordinator holds the staging directory's lock from here to the commit in
            # ``finish`` (storage/commit.py): ranks write into it, never into the checkpoint.
            if self._stage is not None:
                self._stage.close()
            self._stage = commit.open_stage(Path(self.path), overwrite=self.replace, fsync=self.sync_files)
            staging = self._stage.directory.name
        return [
            dataclasses.replace(
                p, items=[it for it in p.items if it.index.fqn not in self._aliases], storage_data=_RankFiles(i, staging)
            )
            for i, p in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        if not isinstance(plan.storage_data, _RankFiles):
            raise ManifestCkptError("ManifestStorageWriter.write_data: the plan was not made by this storage writer")
        rank = plan.storage_data.index
        try:
            # A value DCP's default planner would pickle is encoded (or refused) before this rank writes.
            values = _encode_values(plan.items, planner)
            tensors = [item for item in plan.items if item.type != WriteItemType.BYTE_IO]
            if isinstance(planner, DefaultSavePlanner) and not isinstance(planner, ManifestSavePlanner):
                # DCP's own planner checks nothing: a sparse tensor is refused by name here, not mid-write.
                require_tensors({item.index.fqn: planner.lookup_object(item.index) for item in tensors})
            files = _files_of(tensors, self.thread_count if self.single_file_per_rank else None)
            if self.url is not None:
                results = self._upload(rank, files, values, planner)
            else:
                staging = Path(self.path).parent / plan.storage_data.staging
                results = self._write(staging, rank, files, values, planner, self.sync_files)
        except BaseException:
            self.abandon()
            raise
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _upload(
        self, rank: int, files: list[list[WriteItem]], values: _RankValues, planner: SavePlanner
    ) -> list[WriteResult]:
        """Write this rank's files locally, then upload them; the manifest that lists them comes later."""
        from manifest_ckpt.storage import remote

        assert self.url is not None
        with tempfile.TemporaryDirectory(prefix=".manifest-ckpt-upload.") as tmp:
            results = self._write(Path(tmp), rank, files, values, planner, False)
            names = sorted({c.file for r in results for c in _result_chunks(r.storage_data)})
            remote.upload_files(self.url, Path(tmp), names, storage_options=self.storage_options)
        return results

    def _write(
        self,
        directory: Path,
        rank: int,
        files: list[list[WriteItem]],
        values: _RankValues,
        planner: SavePlanner,
        fsync: bool,
    ) -> list[WriteResult]:
        results: list[WriteResult] = _write_values(directory, rank, values, fsync)
        if self.thread_count > 1 and len(files) > 1:
            with ThreadPoolExecutor(min(self.thread_count, len(files))) as pool:
                jobs = [pool.submit(_write_file, directory, rank, j, items, planner, fsync) for j, items in enumerate(files)]
                for job in jobs:
                    results += job.result()
        else:
            for j, items in enumerate(files):
                results += _write_file(directory, rank, j, items, planner, fsync)
        return results

    def abandon(self) -> None:
        """Give up a save that failed: the staging directory goes, the checkpoint at the path stays as it was."""
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        self._destination = None

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        try:
            self._finish(metadata, results)
        except BaseException:
            # A refusal found only now (a value's tensor under a state-dict key, module= with
            # nested state) must leave nothing beside the path either.
            self.abandon()
            raise

    def _finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        aliases = self._aliases
        lineage = self._lineage_doc
        if lineage is None:
            lineage = _lineage(self.user_lineage, self.parents, self.record_code, self.timestamp, None)
        tree = self._tree
        if tree is None:
            # Another planner (DCP's default): the nesting is rebuilt from its object paths.
            tree = default_plan_tree(metadata, results)
            if tree is not None and self.modules is not None:
                raise ManifestError(
                    "module= records one module's tree, but the state dict is an application state (nested, or "
                    "holding values that are not tensors); leave module= out",
                    field="modules",
                )
        manifest = build_manifest(metadata, results, aliases, self.modules, lineage, self.user_metadata, tree)
        if self.url is not None:
            from manifest_ckpt.storage import remote

            if self._destination is None:
                raise ManifestCkptError("ManifestStorageWriter.finish: prepare_global_plan did not run here")
            # Every rank's files are uploaded (DCP calls finish only when all writes succeeded).
            remote.commit_manifest(self._destination, manifest.to_json(), manifest.files)
            self._destination = None
        elif self._stage is None:
            raise ManifestCkptError("ManifestStorageWriter.finish: no staged save (prepare_global_plan did not run here)")
        else:
            try:
                # Under the checkpoint's lock: move the files in, commit the manifest, delete what
                # it does not reference (the old manifest's files, leftovers of killed saves).
                self._stage.commit(manifest.to_json(), manifest.files)
            finally:
                self._stage.close()
                self._stage = None
        self.manifest = manifest
        # DCP broadcasts this Metadata from the coordinator to every rank: it carries the
        # manifest to the callers of ``save`` on all of them.
        metadata.storage_data = manifest


def build_manifest(
    metadata: Metadata,
    results: list[list[WriteResult]],
    aliases: Mapping[str, str],
    modules: dict[str, ModuleEntry] | None,
    lineage: dict[str, Any],
    user_metadata: Any,
    tree: Any = None,
) -> Manifest:
    """The manifest of a distributed save from every rank's write results.

    A tensor written as one chunk covering all of it is recorded whole (``file`` and
    ``byte_range``), exactly as ``save`` records it, so an unsharded state gets the same
    checkpoint digest either way. Empty chunks of a non-empty tensor hold nothing and are
    left out. A value ``tree`` makes the checkpoint a training state (``$.extensions.state``).

    Raises:
        ManifestError: the results do not make a consistent manifest (a planner bug).
    """
    pieces: dict[str, list[Chunk]] = defaultdict(list)
    files: dict[str, FileEntry] = {}
    inner: dict[str, tuple[str, tuple[int, ...]]] = {}  # tensors inside values: key -> (dtype, shape)
    for rank_results in results:
        for result in rank_results:
            stored = result.storage_data
            if isinstance(stored, StoredValue):
                for key, (dtype, part) in stored.tensors.items():
                    if key in pieces or isinstance(metadata.state_dict_metadata.get(key), TensorStorageMetadata):
                        raise UnsupportedValueError(
                            f"{key!r}: a value of {result.index.fqn!r} holds a tensor or byte string whose dotted key "
                            "is also a key of the state dict; rename one of them",
                            keys=(key,),
                        )
                    inner[key] = (dtype, part.shape)
                    pieces[key].append(Chunk((0,) * len(part.shape), part.shape, part.file, part.byte_range, part.digest))
                    files[part.file] = part.file_entry
                continue
            if not isinstance(stored, StoredChunk):
                raise ManifestError(f"write result for {result.index.fqn!r} was not produced by ManifestStorageWriter")
            offsets = tuple(result.index.offset or ())
            pieces[result.index.fqn].append(Chunk(offsets, stored.shape, stored.file, stored.byte_range, stored.digest))
            files[stored.file] = stored.file_entry
    tensors: dict[str, TensorEntry] = {}
    for key in sorted(pieces):
        if key in inner:
            dtype, shape = inner[key]
        else:
            md = metadata.state_dict_metadata[key]
            assert isinstance(md, TensorStorageMetadata)
            dtype, shape = torch_dtype_name(md.properties.dtype), tuple(md.size)
        chunks = sorted(pieces[key], key=lambda c: c.offsets)
        if nbytes(dtype, shape) > 0:
            chunks = [c for c in chunks if nbytes(dtype, c.shape) > 0]
        if len(chunks) == 1 and chunks[0].shape == shape and not any(chunks[0].offsets):
            c = chunks[0]
            tensors[key] = TensorEntry(dtype, shape, c.digest, file=c.file, byte_range=c.byte_range)
        else:
            tensors[key] = TensorEntry(dtype, shape, chunked_digest(tuple(chunks)), chunks=tuple(chunks))
    used = {c.file for t in tensors.values() for c in t.pieces()}
    extensions = None if tree is None else {"state": tree}
    manifest = Manifest(
        digest=compute_digest(tensors, dict(sorted(aliases.items())), modules, extensions),
        files={name: files[name] for name in sorted(used)},
        tensors=tensors,
        aliases=dict(sorted(aliases.items())),
        modules=modules,
        lineage=lineage,
        metadata=user_metadata,
        format_version=required_version(extensions),
        extensions=extensions,
    )
    problems = list(manifest.iter_consistency_problems())
    if problems:
        listing = "\n".join(f"  {path}: {message}" for path, message in problems[:10])
        raise ManifestError(f"the distributed save produced an inconsistent manifest:\n{listing}", field=problems[0][0])
    return manifest


def default_plan_tree(metadata: Metadata, results: list[list[WriteResult]]) -> Any | None:
    """The value tree of a save planned by DCP's default planner, or None for a flat dict of tensors.

    That planner flattens nested state to dotted keys and records each key's object path in
    ``Metadata.planner_data``; the nesting is rebuilt from those paths with DCP's own
    ``set_element``, so a template-free read gives what it gives for torch's own checkpoint
    (what DCP's flattening drops, such as empty dicts, is dropped here too).
    """
    nodes = {
        r.index.fqn: r.storage_data.node for rank in results for r in rank if isinstance(r.storage_data, StoredValue)
    }
    mappings = metadata.planner_data if isinstance(metadata.planner_data, Mapping) else {}
    order = [k for k in mappings if k in metadata.state_dict_metadata]
    order += [k for k in metadata.state_dict_metadata if k not in mappings]
    paths = {key: tuple(mappings.get(key, (key,))) for key in order}
    if not nodes and all(path == (key,) for key, path in paths.items()):
        return None

    nested: dict[str, Any] = {}
    for key in order:
        set_element(nested, paths[key], _Placed(nodes.get(key, {"tensor": key})))
    return _placed_tree(nested)


@dataclass(frozen=True)
class _Placed:
    """A leaf's node, put at its object path while the nesting is rebuilt."""

    node: Any


def _placed_tree(obj: Any) -> Any:
    """The value tree of dicts and lists ``set_element`` built around :class:`_Placed` leaves."""
    if isinstance(obj, _Placed):
        return obj.node
    if isinstance(obj, dict):
        return {"dict": [[name, _placed_tree(child)] for name, child in obj.items()]}
    if isinstance(obj, list):
        return [_placed_tree(child) for child in obj]
    return obj  # a list slot no path filled: None


@dataclass(frozen=True)
class _RankValues:
    """A rank's non-tensor values (DCP's ``BYTE_IO`` items), encoded: each item's node, their tensors."""

    nodes: list[tuple[WriteItem, Any]]
    tensors: dict[str, torch.Tensor]


def _encode_values(items: list[WriteItem], planner: SavePlanner) -> _RankValues:
    """Encode the values DCP's default planner would pickle, from the objects themselves.

    Raises:
        UnsupportedValueError: a value that needs pickle (naming every one), or a planner
            that hands the writer only pickled bytes.
    """
    wanted = [item for item in items if item.type == WriteItemType.BYTE_IO]
    if not wanted:
        return _RankValues([], {})
    if not isinstance(planner, DefaultSavePlanner):
        keys = tuple(item.index.fqn for item in wanted)
        raise UnsupportedValueError(
            f"{type(planner).__name__} hands the storage writer non-tensor values ({', '.join(map(repr, keys[:5]))}) "
            "only pickled, and a manifest checkpoint never stores pickle; plan with torch's DefaultSavePlanner "
            "(or a subclass) or with ManifestSavePlanner. Nothing was committed.",
            keys=keys,
        )
    encoder = Encoder()
    nodes = [(item, encoder.value(planner.lookup_object(item.index), item.index.fqn)) for item in wanted]
    encoder.finish()
    return _RankValues(nodes, encoder.tensors)


def _write_values(directory: Path, rank: int, values: _RankValues, fsync: bool) -> list[WriteResult]:
    """Write the tensors inside a rank's values (one file) and describe each value."""
    chunks: dict[str, tuple[str, StoredChunk]] = {}
    if values.tensors:
        keys = sorted(values.tensors, key=lambda k: (-values.tensors[k].element_size(), k))
        layout = [(k, torch_dtype_name(values.tensors[k].dtype), tuple(values.tensors[k].shape)) for k in keys]
        name, entry, digests, ranges = write_safetensors(
            directory,
            layout,
            (values.tensors[k] for k in keys),
            fsync,
            name=lambda header_sha256: content_file_name(header_sha256, f"-rank{rank}-values"),
        )
        for (key, dtype, shape), digest, rng in zip(layout, digests, ranges):
            chunks[key] = (dtype, StoredChunk(name, rng, digest, shape, entry))
    return [
        WriteResult(
            index=item.index,
            size_in_bytes=0,
            storage_data=StoredValue(node, {k: chunks[k] for _, k, _ in _values.iter_refs(node)}),
        )
        for item, node in values.nodes
    ]


def _result_chunks(stored: Any) -> list[StoredChunk]:
    """The chunks a write result put in files."""
    if isinstance(stored, StoredChunk):
        return [stored]
    if isinstance(stored, StoredValue):
        return [c for _, c in stored.tensors.values()]
    return []


def _files_of(items: list[WriteItem], buckets: int | None) -> list[list[WriteItem]]:
    """Split a rank's items into files holding at most one chunk of each tensor.

    ``buckets`` files per rank (``thread_count``), balanced by size as ``FileSystemWriter``
    balances them, or one file per chunk when ``buckets`` is None (``single_file_per_rank=False``).
    A bucket holding several chunks of one tensor (a ShardedTensor with several local
    shards) becomes one more file per extra chunk. Empty buckets make no file.
    """
    for item in items:
        if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
            raise UnsupportedTensorError(
                f"{item.index.fqn!r} is not a tensor; a manifest checkpoint stores tensors only "
                "(use ManifestSavePlanner, which says so before anything is written)"
            )
    if buckets is None:
        return [[item] for item in items]
    groups: list[list[WriteItem]] = [[] for _ in range(buckets)]
    sizes = [0] * buckets
    # Largest first into the emptiest bucket; ties go to the lower bucket, so it is deterministic.
    for item in sorted(items, key=lambda it: -_item_bytes(it)):
        j = min(range(buckets), key=lambda b: (sizes[b], b))
        groups[j].append(item)
        sizes[j] += _item_bytes(item)
    files: list[list[WriteItem]] = []
    for group in groups:
        seen: dict[str, int] = defaultdict(int)
        start = len(files)
        for item in group:
            j = start + seen[item.index.fqn]
            seen[item.index.fqn] += 1
            if j == len(files):
                files.append([])
            files[j].append(item)
    return files


def _item_bytes(item: WriteItem) -> int:
    assert item.tensor_data is not None
    return nbytes(torch_dtype_name(item.tensor_data.properties.dtype), tuple(item.tensor_data.chunk.sizes))


def _write_file(
    directory: Path,
    rank: int,
    j: int,
    items: list[WriteItem],
    planner: SavePlanner,
    fsync: bool,
) -> list[WriteResult]:
    """Write one rank file and describe each chunk in it."""
    layout: list[tuple[str, str, tuple[int, ...]]] = []
    for item in items:
        assert item.tensor_data is not None
        layout.append(
            (item.index.fqn, torch_dtype_name(item.tensor_data.properties.dtype), tuple(item.tensor_data.chunk.sizes))
        )
    # Largest element first, as ``save`` does: every chunk then starts aligned to its dtype.
    order = sorted(range(len(items)), key=lambda i: (-itemsize(layout[i][1]), layout[i][0]))
    items = [items[i] for i in order]
    layout = [layout[i] for i in order]

    def values() -> Any:
        for item, (key, _, shape) in zip(items, layout):
            tensor = planner.resolve_data(item)
            assert isinstance(tensor, torch.Tensor)
            if tuple(tensor.shape) != shape:
                raise ManifestCkptError(
                    f"{key!r}: the planner resolved a {list(tensor.shape)} tensor for a {list(shape)} chunk"
                )
            yield tensor

    suffix = f"rank{rank}" if j == 0 else f"rank{rank}-{j}"
    name, entry, digests, ranges = write_safetensors(
        directory,
        layout,
        values(),
        fsync,
        name=lambda header_sha256: content_file_name(header_sha256, f"-{suffix}"),
    )
    return [
        WriteResult(
            index=item.index,
            size_in_bytes=nbytes(dtype, shape),
            storage_data=StoredChunk(name, rng, digest, shape, entry),
        )
        for item, (_, dtype, shape), digest, rng in zip(items, layout, digests, ranges)
    ]


def _check_destination(target: Path, overwrite: bool) -> None:
    """Refuse to write over what is not ours, or over a checkpoint without ``overwrite``."""
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise CheckpointExistsError(f"{target} exists and is not a checkpoint directory; refusing to write into it")
    if (target / MANIFEST_NAME).is_file():
        if not overwrite:
            raise CheckpointExistsError(f"{target} already holds a checkpoint; pass overwrite=True to replace it")
        return
    strangers = sorted(n for n in os.listdir(target) if not commit.is_leftover(n))
    if strangers:
        raise CheckpointExistsError(
            f"{target} is a non-empty directory without {MANIFEST_NAME} (it holds {strangers[0]!r}); refusing to "
            "write into what is not a manifest-ckpt checkpoint. Choose another path or empty it."
        )


def _check_module_keys(modules: Mapping[str, ModuleEntry], keys: set[str]) -> None:
    """The module tree must declare exactly the state dict's keys, or the manifest would lie."""
    declared = {f"{path}.{name}" if path else name for path, m in modules.items() for name in m.persistent_names()}
    if declared == keys:
        return
    extra, absent = sorted(keys - declared), sorted(declared - keys)
    parts = []
    if extra:
        parts.append(f"{len(extra)} state-dict keys the module does not declare (first: {extra[0]!r})")
    if absent:
        parts.append(f"{len(absent)} module keys missing from the state dict (first: {absent[0]!r})")
    raise ManifestError(
        f"module= was given but its tree does not match the state dict: {'; '.join(parts)}. Pass the "
        "module's own state_dict() (not nested under a prefix such as 'model'), or leave module= out.",
        field="modules",
    )
