"""Loading through torch.distributed.checkpoint: a storage reader and a checking load planner.

The reader presents a manifest checkpoint to DCP as its ``Metadata`` (global shape, dtype
and chunks of every key), so DCP's own planning reshards a save on N ranks onto M ranks of
another placement. The planner compares every rank's live state dict with the manifest and
the coordinator raises one report for all of them, before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_local_load_plan
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from manifest_ckpt.comparison.compare import StateSpec, TensorSpec, compare, compile_patterns, owner_of
from manifest_ckpt.comparison.introspect import module_tree
from manifest_ckpt.comparison.remap import Remap, apply_remap
from manifest_ckpt.comparison.report import Problem, Report, sort_problems
from manifest_ckpt.distributed.state import live_spec, torch_dtype_name
from manifest_ckpt.distributed.tree import DcpView, dcp_view, materialize, refs_of
from manifest_ckpt.errors import IntegrityError, ManifestCkptError, ModelMismatchError
from manifest_ckpt.format.manifest import Chunk, Manifest
from manifest_ckpt.reader import _Weights
from manifest_ckpt.storage.store import is_url, open_store, read_store_manifest
from manifest_ckpt.training.plain import read_whole


@dataclass(frozen=True)
class ChunkIndex:
    """``Metadata.storage_data`` of a manifest checkpoint: each DCP chunk's stored piece.

    Attributes:
        manifest: the checkpoint's manifest.
        spec: its structure under the (remapped) names the live state dict uses.
        chunks: ``MetadataIndex(name, offsets)`` -> ``(stored key, chunk)``.
        location: where the checkpoint is, for messages.
    """

    manifest: Manifest
    spec: StateSpec
    chunks: dict[MetadataIndex, tuple[str, Chunk]]
    location: str
    view: DcpView | None = None


_Read = tuple[ReadItem, str, Chunk]  # a read item, its stored key, the stored piece it reads


@dataclass(frozen=True)
class _Span:
    """The bytes ``[start, end)`` of a weights file that a rank's reads of one stored piece cover."""

    file: str
    start: int
    end: int
    first: int  # the piece's element at ``start``
    reads: list[_Read]


@dataclass(frozen=True)
class _RankState:
    """A rank's local plan ``planner_data``: the structure of its live state dict."""

    spec: StateSpec
    values: frozenset[str] = frozenset()


class ManifestStorageReader(FileSystemReader):
    """A DCP storage reader for manifest checkpoints, with resharding.

    Before the coordinator lets any rank read, each rank checks that the weights files it
    will read belong to the manifest (size and header digest) and, with
    ``verify_digests``, hashes every chunk it will read; a failure on any rank stops all.

    Args:
        path: the checkpoint directory (or its ``manifest.json``), or a URL (``s3://...``).
        remap: ``{regex: replacement}`` applied in order to checkpoint keys.
        verify_digests: hash the chunks this rank reads before any rank copies a byte.
        expect_digest: refuse a checkpoint whose digest is not this one.
        storage_options: fsspec options when ``path`` is a URL, the same on every rank.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        remap: Remap | None = None,
        verify_digests: bool = False,
        expect_digest: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, **kwargs)
        # DCP's ``self.path`` is a ``Path``, which would mangle a URL: the original is kept.
        self.source: str | os.PathLike[str] = path
        self.storage_options = dict(storage_options or {})
        self.remap = remap
        self.verify_digests = verify_digests
        self.expect_digest = expect_digest
        self.index: ChunkIndex | None = None
        self.weights: _Weights | None = None
        # DCP turns a failed read_metadata into an AssertionError carrying only its text;
        # the original is kept here for ``manifest_ckpt.distributed.load`` to raise.
        self.failure: ManifestCkptError | None = None
        # Object storage without verification: this rank's byte spans, fetched while planning.
        self._fetched: dict[tuple[str, int, int], bytearray] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        super().reset(checkpoint_id)
        self._fetched = {}
        if checkpoint_id:
            self.source = checkpoint_id

    @property
    def checkpoint_id(self) -> str | os.PathLike[str]:
        return str(self.source) if is_url(self.source) else self.path

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.failure is not None:
            # DCP retries with rank=... for rank-local metadata, which this format has not.
            raise self.failure
        try:
            return self._read_metadata()
        except ManifestCkptError as exc:
            self.failure = exc
            raise

    def _read_metadata(self) -> Metadata:
        store = open_store(self.source, storage_options=self.storage_options)
        manifest = read_store_manifest(store)
        if self.expect_digest is not None and manifest.digest != self.expect_digest:
            raise IntegrityError(
                f"{store.location}: checkpoint digest is {manifest.digest}, expected {self.expect_digest}; "
                "this is not the checkpoint you pinned"
            )
        view = dcp_view(manifest)
        # DCP's key of each stored tensor: the tree's leaves (a training state), else the keys.
        dcp_keys = {key: key for key in manifest.keys()} if view is None else {v: k for k, v in view.tensors.items()}
        names = apply_remap(list(dcp_keys.values()), self.remap)
        spec = StateSpec.from_manifest(manifest)
        if view is not None:  # tensors inside values (a tuple of tensors) are no leaves of DCP's
            spec = StateSpec(
                {k: t for k, t in spec.tensors.items() if k in dcp_keys},
                {a: t for a, t in spec.aliases.items() if a in dcp_keys and t in dcp_keys},
                spec.classes,
            )
        spec = spec.renamed({key: names[dcp_key] for key, dcp_key in dcp_keys.items()})
        state_dict_metadata: dict[str, Any] = {}
        planner_data: dict[str, tuple[str | int, ...]] = {}
        chunks: dict[MetadataIndex, tuple[str, Chunk]] = {}
        for key, dcp_key in dcp_keys.items():
            name = names[dcp_key]
            renamed = name != dcp_key or view is None
            planner_data[name] = (name,) if renamed else view.mappings[dcp_key]  # type: ignore[union-attr]
            stored = manifest.aliases.get(key, key)
            entry = manifest.tensors[stored]
            pieces = entry.pieces()
            state_dict_metadata[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=getattr(torch, entry.dtype)),
                size=torch.Size(entry.shape),
                chunks=[ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.shape)) for c in pieces],
            )
            for c in pieces:
                chunks[MetadataIndex(name, c.offsets)] = (stored, c)
        if view is not None:
            for key in view.values:
                state_dict_metadata[key] = BytesStorageMetadata()
                planner_data[key] = view.mappings[key]
        self.index = ChunkIndex(manifest, spec, chunks, store.location, view)
        self.weights = _Weights(store, manifest)
        return Metadata(
            state_dict_metadata=state_dict_metadata,
            # The object path of every key, for the planners that rebuild the nesting
            # (dcp_to_torch_save, _load_state_dict_from_keys); a weights checkpoint is flat.
            planner_data=planner_data,
            storage_data=self.index,
            storage_meta=StorageMeta(checkpoint_id=store.location, load_id=self.load_id),
        )

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        if not isinstance(metadata.storage_data, ChunkIndex):
            raise ManifestCkptError("ManifestStorageReader: the metadata was not read by this reader")
        self.index = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        # Problems are carried to the coordinator in the plan rather than raised here, so the
        # coordinator can report a mismatch first and stop every rank before any read.
        try:
            self._check_files(plan.items)
        except ManifestCkptError as exc:
            return dataclasses.replace(plan, storage_data=exc)
        return plan

    def _check_files(self, items: Iterable[ReadItem]) -> None:
        assert self.index is not None and self.weights is not None
        pieces = set()
        for item in items:
            if item.type == LoadItemType.BYTE_IO:
                pieces |= {
                    (k, c)
                    for k in self._value_refs(item.storage_index.fqn)
                    for c in self.index.manifest.entry(k).pieces()
                }
            else:
                pieces.add(self.index.chunks[item.storage_index])
        if not pieces:
            return
        files = {c.file for _, c in pieces}
        self.weights.bind(files)
        if self.verify_digests and not self.weights.store.mapped:
            # Object storage: just this rank's pieces, each byte fetched once and hashed on the
            # way, then copied from memory by read_data (so no rank copies before all verified).
            self.weights.prefetch(sorted(pieces, key=lambda p: (p[1].file, p[1].byte_range)), verify=True)
        elif self.verify_digests:
            self.weights.verify_pieces(sorted(pieces, key=lambda p: (p[0], p[1].offsets)))
        elif not self.weights.store.mapped:
            # Object storage: fetch this rank's spans now, so a dropped connection or a changed
            # object on any rank stops every rank before any copies (memory: this rank's share).
            self._fetched = self._fetch_spans(self._span_reads(items)[0])

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        for plan in plans:
            if isinstance(plan.storage_data, BaseException):
                raise plan.storage_data
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        assert self.index is not None and self.weights is not None
        allow_cast = bool(getattr(planner, "allow_cast", False))
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                self._read_value(item, planner)
        spans, empty = self._span_reads(plan.items)
        with torch.no_grad():
            for item, stored, _ in empty:  # nothing to read, but the planner still takes the (empty) tensor
                self._copy(
                    item, stored, torch.empty(tuple(item.lengths), dtype=_dtype(self, stored)), planner, allow_cast
                )
            if self.weights.store.mapped or self.verify_digests:  # mapped, or prefetched and verified
                for span in spans:
                    for item, stored, chunk in span.reads:
                        source = self.weights.view(chunk, self.index.manifest.tensors[stored].dtype)
                        self._copy(
                            item, stored, source[_region(item.storage_offsets, item.lengths)], planner, allow_cast
                        )
            else:
                # Fetched while planning; a span the plan did not have then is fetched now.
                missing = [s for s in spans if (s.file, s.start, s.end) not in self._fetched]
                self._fetched.update(self._fetch_spans(missing))
                self._copy_spans(spans, self._fetched, planner, allow_cast)
                self._fetched = {}
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _span_reads(self, items: Iterable[ReadItem]) -> tuple[list[_Span], list[_Read]]:
        """This rank's tensor reads grouped by stored piece: the byte span covering each piece's regions.

        Per stored piece only the bytes spanning the regions this rank reads are fetched (the
        rows of a dim-0 shard exactly); reads of an empty region need no bytes and come apart.
        """
        assert self.index is not None
        groups: dict[tuple[str, int, int], list[_Read]] = defaultdict(list)
        empty: list[_Read] = []
        for item in items:
            if item.type == LoadItemType.BYTE_IO:
                continue
            stored, chunk = self.index.chunks[item.storage_index]
            read = (item, stored, chunk)
            if any(n == 0 for n in item.lengths):
                empty.append(read)
            else:
                groups[(chunk.file, chunk.byte_range[0], chunk.byte_range[1])].append(read)
        spans = []
        for (name, start, _), reads in sorted(groups.items()):
            chunk = reads[0][2]
            first = min(_flat_index(chunk.shape, item.storage_offsets) for item, _, _ in reads)
            last = max(
                _flat_index(chunk.shape, [o + n - 1 for o, n in zip(item.storage_offsets, item.lengths)])
                for item, _, _ in reads
            )
            size = _dtype(self, reads[0][1]).itemsize
            spans.append(_Span(name, start + first * size, start + (last + 1) * size, first, reads))
        return spans, empty

    def _fetch_spans(self, spans: list[_Span]) -> dict[tuple[str, int, int], bytearray]:
        """Every span's bytes from the store (ranged, concurrent), each byte once."""
        assert self.weights is not None
        ranges = [(s.file, s.start, s.end) for s in spans]
        buffers = [bytearray(end - start) for _, start, end in ranges]
        for index, offset, piece in self.weights.store.stream(ranges):
            memoryview(buffers[index])[offset : offset + len(piece)] = piece
        return dict(zip(ranges, buffers))

    def _copy_spans(
        self,
        spans: list[_Span],
        fetched: Mapping[tuple[str, int, int], bytearray],
        planner: LoadPlanner,
        allow_cast: bool,
    ) -> None:
        """Copy each read's region out of its span's fetched bytes."""
        for span in spans:
            buf = fetched[(span.file, span.start, span.end)]
            for item, stored, chunk in span.reads:
                flat = torch.frombuffer(buf, dtype=torch.uint8).view(_dtype(self, stored))
                region = flat.as_strided(
                    tuple(item.lengths),
                    _strides(chunk.shape),
                    _flat_index(chunk.shape, item.storage_offsets) - span.first,
                )
                self._copy(item, stored, region, planner, allow_cast)

    def _copy(self, item: ReadItem, stored: str, region: torch.Tensor, planner: LoadPlanner, allow_cast: bool) -> None:
        """Copy a read's stored region into the planner's tensor, refusing a shape or (uncast) dtype difference."""
        assert self.index is not None
        target = planner.resolve_tensor(item).detach()
        if target.shape != region.shape:
            raise ManifestCkptError(
                f"{item.dest_index.fqn!r}: the plan reads {list(region.shape)} into {list(target.shape)}"
            )
        if target.dtype != region.dtype and not allow_cast:
            # Guard for planners that do not compare dtypes first (DCP's own casts silently).
            want = torch_dtype_name(target.dtype)
            problem = Problem("dtype", item.dest_index.fqn, f"{want}", f"{self.index.manifest.tensors[stored].dtype}")
            raise ModelMismatchError(Report([problem], ["load with cast=True to convert"]), path=self.index.location)
        target.copy_(region)
        planner.commit_tensor(item, target)

    def _value_refs(self, key: str) -> list[str]:
        assert self.index is not None
        view = self.index.view
        if view is None or key not in view.values:
            raise ManifestCkptError(f"{key!r}: {self.index.location} holds no value under this key")
        return refs_of(view.values[key], view)

    def _read_value(self, item: ReadItem, planner: LoadPlanner) -> None:
        """Hand a value leaf to the planner: as the object to ours, as torch.load-able bytes to DCP's.

        DCP's planners ``torch.load`` every non-tensor; the stream given to them is made here
        from the JSON tree (no pickle is ever read from the checkpoint).
        """
        assert self.index is not None and self.index.view is not None and self.weights is not None
        key = item.storage_index.fqn
        self._value_refs(key)
        value = materialize(self.index.view.values[key], self.index.view, self._whole)
        if isinstance(planner, ManifestLoadPlanner):
            planner.load_value(item, value)
            return
        stream = io.BytesIO()
        torch.save(value, stream)
        stream.seek(0)
        planner.load_bytes(item, stream)

    def _whole(self, key: str) -> torch.Tensor:
        assert self.index is not None and self.weights is not None
        return read_whole(self.weights, self.index.manifest, key)


def _region(offsets: Iterable[int], lengths: Iterable[int]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offsets, lengths))


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides (in elements) of a contiguous tensor of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _flat_index(shape: tuple[int, ...], index: Iterable[int]) -> int:
    """The row-major position of element ``index`` in a contiguous tensor of ``shape``."""
    return sum(i * s for i, s in zip(index, _strides(shape)))


def _dtype(reader: ManifestStorageReader, stored: str) -> torch.dtype:
    assert reader.index is not None
    dtype: torch.dtype = getattr(torch, reader.index.manifest.tensors[stored].dtype)
    return dtype


class ManifestLoadPlanner(DefaultLoadPlanner):
    """torch's default load planner, checked first: all ranks' states against the checkpoint.

    Every rank sends the structure of its live state dict (global shapes, dtypes, ties) with
    its local plan; the coordinator compares each with the checkpoint and raises a single
    :class:`ModelMismatchError` listing the problems of all ranks, which DCP delivers to every
    rank before any data is read. dtypes are never converted unless ``cast=True``.

    Works with any DCP checkpoint's metadata; with :class:`ManifestStorageReader` it also
    compares ties and, given ``module``, layer classes.
    """

    def __init__(
        self,
        *,
        strict: bool = True,
        allow_missing: Iterable[str] = (),
        allow_unexpected: Iterable[str] = (),
        cast: bool = False,
        module: nn.Module | None = None,
        check_classes: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.strict = strict
        self.allow_missing = tuple(allow_missing)
        self.allow_unexpected = tuple(allow_unexpected)
        self.allow_cast = cast
        self.modules = None if module is None else module_tree(module)
        self.check_classes = check_classes

    def _compare(self, live: _RankState) -> Report:
        report = compare(
            self._reference(),
            live.spec,
            allow_missing=self.allow_missing,
            allow_unexpected=self.allow_unexpected,
            strict=self.strict,
            cast=self.allow_cast,
            check_classes=self.check_classes,
        ).report
        extra = self._value_problems(live.values)
        if not extra:
            return report
        return dataclasses.replace(report, problems=sort_problems([*report.problems, *extra]))

    def _value_problems(self, live: frozenset[str]) -> list[Problem]:
        """Values (not tensors) the live state expects and the checkpoint lacks, or the reverse."""
        assert self.metadata is not None
        stored = {k for k, md in self.metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)}
        if not self.strict:
            return []
        missing_ok = compile_patterns(self.allow_missing, "allow_missing")
        unexpected_ok = compile_patterns(self.allow_unexpected, "allow_unexpected")
        problems = [
            Problem("missing", key, "value", None)
            for key in sorted(live - stored)
            if not (missing_ok and missing_ok.fullmatch(key))
        ]
        problems += [
            Problem("unexpected", key, None, "value")
            for key in sorted(stored - live)
            if not (unexpected_ok and unexpected_ok.fullmatch(key))
        ]
        return problems

    def load_value(self, read_item: ReadItem, value: Any) -> None:
        """Put a value leaf in place, as ``load_bytes`` does after unpickling (here there is no pickle)."""
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], value)
        else:
            self.state_dict[read_item.dest_index.fqn] = value

    def _reference(self) -> StateSpec:
        assert self.metadata is not None
        index = self.metadata.storage_data
        if isinstance(index, ChunkIndex):
            return index.spec
        tensors = {
            key: TensorSpec(torch_dtype_name(md.properties.dtype), tuple(md.size), owner_of(key))
            for key, md in self.metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }
        return StateSpec(tensors)

    def create_local_plan(self) -> LoadPlan:
        tensors = {k: v for k, v in self.state_dict.items() if isinstance(v, torch.Tensor)}
        live = _RankState(live_spec(tensors, self.modules), frozenset(k for k in self.state_dict if k not in tensors))
        items: list[ReadItem] = []
        if self._compare(live).ok:
            assert self.metadata is not None
            # Keys allowed to be missing are skipped (strict=False); the rest was checked above.
            items = create_default_local_load_plan(self.state_dict, self.metadata, strict=False).items
        return LoadPlan(items, planner_data=_RankState(live.spec, live.values))

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        states = [p.planner_data for p in global_plan]
        if not all(isinstance(s, _RankState) for s in states):
            raise ManifestCkptError(
                "ManifestLoadPlanner: a rank used another planner; every rank must use the same one"
            )
        report = merge_reports([self._compare(s) for s in states])
        if not report.ok:
            index = self.metadata.storage_data if self.metadata is not None else None
            raise ModelMismatchError(report, path=index.location if isinstance(index, ChunkIndex) else None)
        return [dataclasses.replace(p, planner_data=None) for p in global_plan]


def merge_reports(reports: list[Report]) -> Report:
    """One report for all ranks: every problem once, and which ranks alone have it."""
    where: dict[Problem, list[int]] = defaultdict(list)
    for rank, report in enumerate(reports):
        for problem in report.problems:
            where[problem].append(rank)
    problems = sort_problems(list(where))
    hints: list[str] = []
    for report in reports:
        hints += [h for h in report.hints if h not in hints]
    partial = [(p, ranks) for p, ranks in ((p, where[p]) for p in problems) if len(ranks) < len(reports)]
    for problem, ranks in partial[:10]:
        hints.append(
            f"{problem.kind} {problem.key or '(root)'!r}: only on rank{'s' if len(ranks) > 1 else ''} {_ranks(ranks)}"
        )
    if len(partial) > 10:
        hints.append(f"... and {len(partial) - 10} more problems seen on some ranks only")
    if partial:
        hints.append(
            "the ranks' state dicts differ from each other: every rank must hold the same keys, shapes and dtypes"
        )
    first = reports[0] if reports else Report([])
    return Report(problems, hints, first.suggested_remap, first.checked)


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
