"""``read_manifest``, ``check``, ``load`` and ``verify``: compare first, copy only when all agree."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import hashlib
import io
import os
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import increment_version
from torch.nn.modules.module import _IncompatibleKeys

from manifest_ckpt import assemble, machinery, plain_copy
from manifest_ckpt.cli.progress import Progress
from manifest_ckpt.comparison.compare import EXTRA_STATE, Comparison, StateSpec, TensorSpec, compare, owner_of
from manifest_ckpt.comparison.introspect import LiveState, capture, dtype_name
from manifest_ckpt.comparison.remap import Remap, apply_remap
from manifest_ckpt.comparison.report import Allowance, Problem, Report, sort_problems
from manifest_ckpt.comparison.transforms import Node, Transforms, choose_rule_set, resolve_transforms, transform_spec
from manifest_ckpt.errors import (
    DeviceUnavailableError,
    IntegrityError,
    LoadAbortedError,
    ManifestCkptError,
    ManifestError,
    ModelMismatchError,
    TransformError,
    UnsupportedTensorError,
)
from manifest_ckpt.format import values
from manifest_ckpt.format.binding import Piece, file_problems, is_written_header
from manifest_ckpt.format.manifest import EXTRA_STATE_NAME, Chunk, Manifest, TensorEntry, json_entries
from manifest_ckpt.format.safetensors_header import MAX_HEADER_BYTES, parse_header
from manifest_ckpt.gc_pause import gc_paused
from manifest_ckpt.storage.store import Store, open_store, read_store_manifest
from manifest_ckpt.training.tree import is_app_state

PathLike = str | os.PathLike[str]
# Tensors up to this size are copied with one memmove (see _fill); larger ones use torch's
# multi-threaded copy_, where the per-call overhead no longer matters.
_MEMMOVE_MAX = 1 << 20
# Dtypes torch cannot copy_ (no kernel), copied as their bytes; compare refuses casting them.
_BYTE_COPIED = frozenset({torch.float4_e2m1fn_x2})


@dataclass(frozen=True)
class LoadResult:
    """What ``load`` did.

    Attributes:
        loaded: module keys that received checkpoint values (tie-filled keys included).
        cast: module keys whose values were converted to the module's dtype (``cast=True``).
        retied: keys that share one tensor after loading (tied in both module and checkpoint).
        left_initial: module keys the checkpoint lacks, allowed by policy; left as they were.
        skipped: checkpoint keys the module lacks, allowed by policy; not loaded.
        materialized: keys that were on the meta device and now hold real tensors.
        manifest: the checkpoint's manifest.
        tie_filled: ``{module key: partner}`` for keys the checkpoint lacks that were loaded
            through their module tie (Hugging Face files omit ``lm_head.weight``).
        untied: module keys loaded from a checkpoint tie the module does not have (``untie=True``).
        discarded: checkpoint keys whose values were dropped for a module tie (``tie=True``).
        allowed: every difference a policy or fact let through, with what let it (the report's list).
    """

    loaded: list[str]
    cast: list[str]
    retied: list[str]
    left_initial: list[str]
    skipped: list[str]
    materialized: list[str]
    manifest: Manifest = field(repr=False)
    tie_filled: dict[str, str] = field(default_factory=dict)
    untied: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)
    allowed: list[Allowance] = field(default_factory=list)


@gc_paused()  # 100,000 keys allocate millions of acyclic objects; collections would only traverse them
def check(
    module: nn.Module | Mapping[str, Any],
    path: PathLike,
    *,
    remap: Remap | None = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    strict: bool = True,
    cast: bool = False,
    check_classes: bool = True,
    transforms: Transforms | None = None,
    untie: bool = False,
    tie: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Report:
    """Compare a checkpoint with a live module; change nothing.

    Reads the manifest and the weights files' headers, never tensor data: an OK report
    means ``load`` with the same options would copy every value without error, unless
    tensor bytes were changed on disk (which only hashing finds: ``verify``, or ``load``
    with ``expect_digest`` or ``verify_digests``).

    Options are ``load``'s; every difference an option lets through is in ``report.allowed``.

    Returns:
        A :class:`Report` listing every missing, unexpected, shape, dtype, class and alias
        difference at once, with hints (such as the remap that fixes a prefix).

    ``transforms`` are applied after ``remap``, as ``load`` applies them; without them, a
    checkpoint of per-expert keys against a fused-expert module gets a hint naming the rule
    set that fits (``Report.suggested_transforms``).

    Raises:
        ManifestError: invalid manifest, or weights files whose headers disagree with it.
        IntegrityError: a weights file is missing or has another size than recorded.
        TransformError: a transform matches no key or does not fit the keys it matches.

    An application state (a dict of modules, optimizers, schedulers, Stateful objects and
    values) is compared entry by entry with a training state (:mod:`manifest_ckpt.training`).
    """
    if is_app_state(module):
        from manifest_ckpt.training.restore import check_state

        _no_transforms(transforms)
        return check_state(
            module,
            path,
            remap=remap,
            allow_missing=allow_missing,
            allow_unexpected=allow_unexpected,
            strict=strict,
            cast=cast,
            check_classes=check_classes,
            storage_options=storage_options,
        )
    store = open_store(path, storage_options=storage_options)
    manifest = read_store_manifest(store)
    _Weights(store, manifest).bind(manifest.files)
    comparison, _ = _compare(
        manifest, capture(module, extra_state=True), remap, allow_missing, allow_unexpected, strict, cast, check_classes, module,
        transforms,
        untie=untie, tie=tie,
    )
    return comparison.report


@dataclass(frozen=True)
class _Plan:
    """Where each key ``load`` fills comes from, once the module's load machinery has run.

    Attributes:
        source: ``{key: checkpoint key}`` for keys that receive a stored tensor as it is.
        derived: keys whose value the module's machinery computes (a migration's default,
            a hook's transform); ``load`` runs the machinery over the stored values for them.
        names: ``{key: checkpoint key}`` for every checkpoint key after remapping.
        versions: ``{module path: _version}`` as recorded, under the remapped paths.
        built: ``{key: Node}`` for keys a transform builds from checkpoint keys (the nodes
            name checkpoint keys).
    """

    source: dict[str, str]
    names: dict[str, str]
    derived: frozenset[str] = frozenset()
    versions: dict[str, int] | None = None
    built: Mapping[str, Node] = field(default_factory=dict)


@gc_paused()  # 100,000 keys allocate a few million acyclic objects; collections would only traverse them
def _compare(
    manifest: Manifest,
    live: LiveState,
    remap: Remap | None,
    allow_missing: Iterable[str],
    allow_unexpected: Iterable[str],
    strict: bool,
    cast: bool,
    check_classes: bool,
    module: nn.Module | Mapping[str, torch.Tensor] | None = None,
    transforms: Transforms | None = None,
    *,
    untie: bool = False,
    tie: bool = False,
) -> tuple[Comparison, _Plan]:
    """Compare after remapping, transforming (simulated: nothing is read) and the module's own
    load machinery; also say where each key comes from."""
    names = apply_remap(_state_keys(manifest), remap)
    spec = StateSpec.from_manifest(manifest).renamed(names)
    renamed = dict(zip(names.values(), names))
    plan = _Plan(renamed, renamed)
    _, rules = resolve_transforms(transforms)
    ran = isinstance(module, nn.Module) and machinery.any_rewrites(module, live.owners.values() or None)
    if rules:
        if ran:
            raise TransformError(
                "transforms= with a module whose load hooks or _load_from_state_dict rewrite the state dict is not "
                "supported (the hooks would see keys the checkpoint does not hold); convert the checkpoint with "
                "transforms= first, then load it"
            )
        spec, kept, built = transform_spec(spec, rules)
        plan = _Plan(
            {new: renamed[before] for new, before in kept.items()},
            renamed,
            built={k: _relabel(n, renamed) for k, n in built.items()},
        )
    original = spec
    hook_problems: list[Problem] = []
    if ran:
        assert isinstance(module, nn.Module)
        spec, plan, hook_problems = _rewritten(module, manifest, spec, names, strict)

    def against(checkpoint: StateSpec) -> Comparison:
        lazy_shapes = {k: checkpoint.tensors[k].shape for k in live.lazy if k in checkpoint.tensors}
        return compare(
            checkpoint,
            live.spec(lazy_shapes),
            allow_missing=allow_missing,
            allow_unexpected=allow_unexpected,
            strict=strict,
            cast=cast,
            check_classes=check_classes,
            untie=untie,
            tie=tie,
        )

    comparison = against(spec)
    report = comparison.report
    if not rules and report.by_kind("missing") and report.by_kind("unexpected"):
        # Per-expert keys against fused expert tensors: name the rule set that fits (simulated),
        # or say why the layout it recognises does not fit (an expert missing...).
        name, hint = None, None
        try:
            name = choose_rule_set(
                {k: (t.dtype, t.shape) for k, t in spec.tensors.items()},
                {k: (t.dtype, t.shape) for k, t in live.spec().tensors.items()},
                refuse_broken=True,
            )
        except TransformError as exc:
            hint = f"the checkpoint holds per-expert keys for the module's fused expert tensors, but they do not fit: {exc}"
        if name is not None:
            hint = (
                f"the checkpoint holds per-expert keys where the module has fused expert tensors: load with "
                f"transforms={name!r} (CLI: --transforms {name})"
            )
        if hint is not None:
            comparison = replace(
                comparison, report=replace(report, hints=[hint, *report.hints], suggested_transforms=name)
            )
    if ran and (hook_problems or not comparison.report.ok):
        report = comparison.report
        # A remap is suggested from the checkpoint's own keys: a migration's defaults (BatchNorm
        # fills a num_batches_tracked it lacks) would otherwise hide the prefix that is wrong.
        plain = against(original).report
        suggested, hints = (plain.suggested_remap, plain.hints) if plain.suggested_remap else (report.suggested_remap, report.hints)
        # The table shortens long cells; each hook problem is also given whole as a hint.
        hints = [*hints, *(f"module {p.key or '(root)'}: {p.found}" for p in hook_problems)]
        problems = sort_problems([*report.problems, *hook_problems])
        comparison = replace(
            comparison, report=replace(report, problems=problems, hints=hints, suggested_remap=suggested)
        )
    return comparison, plan


def _relabel(node: Node, key_of: Mapping[str, str]) -> Node:
    """``node`` with its source keys renamed by ``key_of`` (remapped names back to checkpoint keys)."""
    if node.op == "source":
        assert node.key is not None
        return replace(node, key=key_of[node.key])
    return replace(node, parts=tuple(_relabel(p, key_of) for p in node.parts))


def _state_keys(manifest: Manifest) -> list[str]:
    """The checkpoint's state-dict keys: its tensors and aliases (not those inside extra state), its extra state."""
    if not manifest.extra_state:
        return manifest.keys()
    parts = manifest.extra_state_refs()
    return sorted([*(k for k in manifest.keys() if k not in parts), *manifest.extra_state])


def _versions(manifest: Manifest, names: Mapping[str, str], module: nn.Module) -> dict[str, int] | None:
    """The ``_version`` each module's load machinery is told (torch's ``state_dict._metadata``).

    The recorded versions, under remapped paths. A checkpoint saved from a state dict records
    none: every module is told none, as torch's ``load_state_dict`` of a plain dict does (and
    BatchNorm then fills a ``num_batches_tracked`` it lacks). A checkpoint with a module tree
    is a current one: a module it does not hold is told its own version, so nothing is
    migrated into it and its keys are reported missing.
    """
    if manifest.modules is None:
        return None
    versions = {p: m.version for p, m in manifest.modules.items() if m.version is not None}
    moved = {owner_of(new): versions.get(owner_of(old)) for old, new in names.items() if old != new}
    for path, version in moved.items():
        if version is None:
            versions.pop(path, None)
        else:
            versions[path] = version
    for path, sub in module.named_modules(remove_duplicate=False):
        own = getattr(sub, "_version", None)
        if path not in versions and path not in moved and isinstance(own, int):
            versions[path] = own
    return versions


def _rewritten(
    module: nn.Module, manifest: Manifest, spec: StateSpec, names: Mapping[str, str], strict: bool
) -> tuple[StateSpec, _Plan, list[Problem]]:
    """The checkpoint's description as the module's load machinery leaves it (run on meta placeholders)."""
    original = {new: old for old, new in names.items()}
    placeholders: dict[str, Any] = machinery.placeholders_for(
        {k: (s.dtype, s.shape) for k, s in spec.tensors.items() if s.dtype != EXTRA_STATE}, spec.aliases
    )
    for key, s in spec.tensors.items():
        if s.dtype == EXTRA_STATE:
            placeholders[key] = _extra_value(manifest, original[key], _meta_value(manifest))
    origin: dict[int, str] = {}
    for key, t in placeholders.items():
        origin.setdefault(id(t), original[key])
    versions = _versions(manifest, names, module)
    rewritten = machinery.rewrite(module, placeholders, versions, placeholders=True, strict=strict)
    problems = [Problem("hook", path, None, text) for path, text in rewritten.problems]
    tensors: dict[str, TensorSpec] = {}
    source: dict[str, str] = {}
    derived: set[str] = set()
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, value in rewritten.state.items():
        if key.rpartition(".")[2] == EXTRA_STATE_NAME:
            tensors[key] = TensorSpec(EXTRA_STATE, (), owner_of(key))
            if id(value) in origin:
                source[key] = origin[id(value)]
            else:
                derived.add(key)
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(Problem("hook", owner_of(key), None, f"its load machinery puts a {type(value).__name__} under {key!r}, not a tensor"))
            continue
        try:
            dtype = dtype_name(value, key)
        except UnsupportedTensorError as exc:
            problems.append(Problem("hook", owner_of(key), None, str(exc)))
            continue
        # A placeholder passed through unchanged still stands for its stored bytes (equal digests tie).
        digest = manifest.entry(origin[id(value)]).digest if id(value) in origin else None
        tensors[key] = TensorSpec(dtype, tuple(value.shape), owner_of(key), digest)
        lead = first.setdefault(id(value), key)
        if lead != key:
            aliases[key] = lead  # one tensor under two keys: tied, as in a state dict
        if id(value) in origin:
            source[key] = origin[id(value)]
        else:
            derived.add(key)
    rewritten_spec = StateSpec(tensors, aliases, spec.classes, spec.versions)
    return rewritten_spec, _Plan(source, original, frozenset(derived), versions), problems


# Piece((key, dtype, shape, byte_range, digest, field)) without the named tuple's Python-level __new__.
_piece_of: Callable[[tuple[str, str, Any, Any, str, str]], Piece] = functools.partial(tuple.__new__, Piece)


class _Weights:
    """Checked, memory-mapped access to a checkpoint's tensor bytes."""

    def __init__(self, store: Store, manifest: Manifest) -> None:
        self.store = store
        self.manifest = manifest
        self._buffers: dict[str, tuple[torch.Tensor, int]] = {}
        # Pieces fetched by ``prefetch`` from a store that is not mapped: (file, start, end) -> bytes.
        self._pieces: dict[tuple[str, int, int], bytearray] = {}
        self._by_file: dict[str, list[Piece]] | None = None

    @gc_paused()  # 100,000 pieces and a header of 100,000 entries: no cycles to collect
    def bind(self, names: Iterable[str]) -> None:
        """Check, reading headers only, that each weights file holds what the manifest says.

        Size and header digest as recorded, then every rule of :mod:`manifest_ckpt.format.binding`:
        the header's entries are exactly the manifest's pieces (dtype, shape, byte range), each
        aligned to its element size, tiling the data with no gap, overlap or trailing byte,
        and the header's content digest is the one the manifest's tensor digests give. So a
        manifest beside another run's weights, or a self-consistent forgery that would fail
        half-way through a copy, is refused before any byte is copied. Tensor data is not
        read: hashing it is :meth:`verify`'s job.

        Raises:
            IntegrityError: a file is missing, truncated, or of another size than recorded.
            ManifestError: headers and manifest disagree (every problem, raised once).
        """
        problems: list[tuple[str, str, str]] = []
        for name in sorted(set(names)):
            expected = self.manifest.files[name]
            size = self.store.file_size(name)
            where = f"{self.store.location}/{name}"
            if size != expected.size:
                raise IntegrityError(
                    f"{where}: {size} bytes, the manifest says {expected.size}; the file is truncated or was "
                    "replaced. Restore it or re-save the checkpoint.",
                    file=name,
                )
            # Copy only the header the length prefix announces, not MAX_HEADER_BYTES of
            # tensor data (100 MB of memory and time on every load); parse_header bounds it.
            # The pieces tile the data right after the header, so the first piece's start is
            # where the header should end: prefix and header in one read (one request, not
            # two, on object storage), or the prefix first when the file says otherwise.
            pieces = self._pieces_by_file().get(name, [])
            guess = min((p.byte_range[0] for p in pieces), default=size)
            head = self.store.read_range(name, 0, guess) if 8 <= guess <= min(size, 8 + MAX_HEADER_BYTES) else b""
            length = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
            if length < 0 or 8 + length > len(head):
                length = int.from_bytes(self.store.read_range(name, 0, min(size, 8)), "little")
                head = self.store.read_range(name, 0, min(size, 8 + min(length, MAX_HEADER_BYTES)))
            raw = bytes(head[: 8 + length])
            if hashlib.sha256(raw).hexdigest() == expected.header_sha256 and is_written_header(raw, size, pieces):
                continue  # the very header the writer makes for these pieces: bound, nothing to parse
            header = parse_header(head, size, file=where)
            pieces = [p._replace(shape=tuple(p.shape), byte_range=(p.byte_range[0], p.byte_range[1])) for p in pieces]
            file_field = f'$.files["{name}"]'
            found = hashlib.sha256(header.raw).hexdigest()
            if found != expected.header_sha256:
                problems.append((name, file_field + ".header_sha256", (
                    f"is {expected.header_sha256[:16]}..., the file's header hashes to {found[:16]}...: this "
                    "weights file does not belong to this manifest (other values or another checkpoint)"
                )))
            problems += [(name, at, msg) for at, msg in file_problems(header, size, pieces, field=file_field)]
        if problems:
            listing = "\n".join(f"  {name}: {at} {msg}" for name, at, msg in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise ManifestError(
                f"{self.store.location}: manifest and weights files disagree ({len(problems)} problems):\n"
                f"{listing}{more}\nKeep each manifest.json with its own weights files; re-save the checkpoint "
                "from its source.",
                file=problems[0][0],
                field=problems[0][1],
            )

    def recheck(self, names: Iterable[str]) -> None:
        """Check again, just before copying, that each bound local file still has its recorded size.

        Object storage is not asked again (a request per file); its reads check every length.

        Raises:
            IntegrityError: a file was cut or grown since :meth:`bind`.
        """
        if not self.store.mapped:
            return
        for name in sorted(set(names)):
            size, expected = self.store.file_size(name), self.manifest.files[name].size
            if size != expected:
                raise IntegrityError(
                    f"{self.store.location}/{name}: {size} bytes now, {expected} when the load checked it: the "
                    "file changed since (is something rewriting it?). Nothing was loaded; restore the file or "
                    "re-save the checkpoint, then load again.",
                    file=name,
                )

    def _pieces_by_file(self) -> dict[str, list[Piece]]:
        """The manifest's pieces grouped by file (built once: binding is per file)."""
        if self._by_file is None:
            by_file: dict[str, list[Piece]] = {}
            entries = json_entries(self.manifest.tensors)
            if entries is not None:  # read from JSON: pieces straight from the entries
                # Shapes and byte ranges stay the entries' lists (the written-header check takes
                # them as they are; bind makes them tuples for the full rules): 100,000 pieces.
                piece_of = _piece_of
                for key, e in entries.items():
                    if "chunks" in e:
                        continue
                    piece = piece_of((key, e["dtype"], e["shape"], e["byte_range"], e["digest"], ""))
                    by_file.setdefault(e["file"], []).append(piece)
            for key, t in self.manifest.tensors.items() if entries is None else self._chunked(entries):
                if t.chunks is None:  # most tensors: no Chunk built
                    assert t.file is not None and t.byte_range is not None
                    piece = Piece(key, t.dtype, t.shape, t.byte_range, t.digest, "")
                    by_file.setdefault(t.file, []).append(piece)
                    continue
                for i, c in enumerate(t.chunks):
                    at = f'$.tensors["{key}"].chunks[{i}]'
                    by_file.setdefault(c.file, []).append(Piece(key, t.dtype, c.shape, c.byte_range, c.digest, at))
            self._by_file = by_file
        return self._by_file

    def _chunked(self, entries: Mapping[str, Mapping[str, Any]]) -> Iterator[tuple[str, TensorEntry]]:
        """The chunked tensors among JSON entries, as entries."""
        tensors = self.manifest.tensors
        return ((key, tensors[key]) for key, e in entries.items() if "chunks" in e)

    def map_files(self, names: Iterable[str]) -> None:
        """Map (a remote store: fetch whole, concurrently) each named file now."""
        for name in sorted(set(names)):
            self.store.file_map(name)

    def prefetch(self, jobs: Iterable[tuple[str, Chunk]], *, verify: bool) -> None:
        """Fetch exactly the bytes of these ``(key, piece)`` pairs from a store that is not mapped.

        Each piece's range is read once (the store's concurrent ranged blocks) into memory of its
        own size, hashed on the way when ``verify``; :meth:`raw` then serves it. So a load that
        needs values before copying holds the tensors it reads, never whole files.

        Raises:
            IntegrityError: with ``verify``, pieces whose bytes do not match their digests (all named).
        """
        todo = {(c.file, *c.byte_range): (key, c) for key, c in jobs}
        ranges = sorted(r for r in todo if r not in self._pieces)
        buffers = [bytearray(end - start) for _, start, end in ranges]
        hashers = [hashlib.sha256() for _ in ranges] if verify else []
        for index, offset, piece in self.store.stream(ranges):
            memoryview(buffers[index])[offset : offset + len(piece)] = piece
            if verify:
                hashers[index].update(piece)
        if verify:
            found = ("sha256:" + h.hexdigest() for h in hashers)
            self.raise_mismatches([(*todo[r], d) for r, d in zip(ranges, found) if d != todo[r][1].digest])
        self._pieces.update(zip(ranges, buffers))

    def raw(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's bytes as a uint8 tensor mapped from the file (no copy).

        A store that is not mapped (object storage) serves a prefetched piece, else reads just
        this piece's byte range (never the whole file).
        """
        if not self.store.mapped:
            where = (chunk.file, *chunk.byte_range)
            data = self._pieces.get(where)
            if data is None:
                data = bytearray(chunk.byte_range[1] - chunk.byte_range[0])
                for _, offset, piece in self.store.stream([where]):
                    memoryview(data)[offset : offset + len(piece)] = piece
            return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        if chunk.file not in self._buffers:
            mapping, offset, _ = self.store.file_map(chunk.file)
            self._buffers[chunk.file] = (torch.frombuffer(mapping, dtype=torch.uint8), offset)
        buf, offset = self._buffers[chunk.file]
        start, end = chunk.byte_range
        return buf[offset + start : offset + end]

    def address(self, file: str) -> int:
        """The address of the first byte of a mapped file's data (the mapping is kept)."""
        if file not in self._buffers:
            mapping, offset, _ = self.store.file_map(file)
            self._buffers[file] = (torch.frombuffer(mapping, dtype=torch.uint8), offset)
        buf, offset = self._buffers[file]
        return buf.data_ptr() + offset

    def view(self, chunk: Chunk, dtype: str) -> torch.Tensor:
        raw = self.raw(chunk)
        return raw.view(getattr(torch, dtype)).view(chunk.shape)

    def verify(self, keys: Iterable[str], *, progress: Callable[[int], None] | None = None) -> None:
        """Hash the stored bytes of ``keys`` and raise once, naming every mismatch."""
        tensors = self.manifest.tensors
        # A job, a chunk and a reader per tensor are a few hundred thousand acyclic objects at
        # 100,000 tensors; collections they would trigger traverse the whole heap for nothing.
        with gc_paused():
            jobs = [(key, c) for key in sorted(set(keys)) for c in tensors[key].pieces()]
            self.verify_pieces(jobs, progress=progress)

    def verify_pieces(
        self, jobs: list[tuple[str, Chunk]], *, progress: Callable[[int], None] | None = None
    ) -> None:
        """Hash the given ``(key, chunk)`` pieces and raise once, naming every mismatch.

        The distributed reader verifies only the chunks its rank reads.
        """
        found = self.store.digest_ranges([(c.file, *c.byte_range) for _, c in jobs], progress=progress)
        self.raise_mismatches([(key, c, d) for (key, c), d in zip(jobs, found) if d != c.digest])

    def raise_mismatches(self, bad: list[tuple[str, Chunk, str]]) -> None:
        """Raise one :class:`IntegrityError` naming every ``(key, chunk, digest found)``, if any."""
        if bad:
            lines = "\n".join(
                f"  {key} ({c.file} bytes {c.byte_range[0]}-{c.byte_range[1]}): expected {c.digest[:23]}..., "
                f"found {d[:23]}..."
                for key, c, d in bad[:20]
            )
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise IntegrityError(
                f"{self.store.location}: {len(bad)} tensors do not match their digests:\n{lines}{more}\n"
                "The weights files are corrupt; restore them from a good copy.",
                file=bad[0][1].file,
                key=bad[0][0],
            )


def verify(
    path: PathLike, *, search: Iterable[PathLike] = (), storage_options: Mapping[str, Any] | None = None
) -> None:
    """Prove what can be proven offline: schema, file binding, sizes and every digest.

    Args:
        search: directories and archives where recorded parents are looked up by digest;
            each parent found is verified too (a parent not found is not a failure).

    Raises:
        ManifestError: invalid manifest, or manifest and weights that do not belong together.
        IntegrityError: a missing, truncated or corrupt file, or a parent found that does not verify.
    """
    verify_report(path, search=search, storage_options=storage_options)


def verify_report(
    path: PathLike,
    *,
    progress: bool = False,
    search: Iterable[PathLike] = (),
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``verify``, returning what was proven (for the CLI); same errors as ``verify``."""
    store = open_store(path, storage_options=storage_options)
    manifest = read_store_manifest(store)
    weights = _Weights(store, manifest)
    weights.bind(manifest.files)
    with Progress(f"verify {store.location}", manifest.total_bytes, enabled=progress) as bar:
        weights.verify(manifest.tensors, progress=bar.advance)
    result: dict[str, Any] = {
        "digest": manifest.digest,
        "tensors": len(manifest.tensors),
        "bytes": manifest.total_bytes,
        "files": len(manifest.files),
    }
    if manifest.parents:
        from manifest_ckpt.lineage import check_parents

        # Parents found under ``search`` are verified in full; raises if one does not verify.
        result.update(
            check_parents(manifest, store.location, search, progress=progress, storage_options=storage_options)
        )
    return result


def load(
    module: nn.Module | Mapping[str, Any],
    path: PathLike,
    *,
    strict: bool = True,
    remap: Remap | None = None,
    cast: bool = False,
    verify_digests: bool = False,
    expect_digest: str | None = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    check_classes: bool = True,
    untie: bool = False,
    tie: bool = False,
    device: str | torch.device | None = None,
    transforms: Transforms | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadResult:
    """Load a checkpoint into ``module`` after checking that it matches, all or nothing.

    Args:
        strict: when False, missing and unexpected keys are allowed (and listed).
        remap: ``{regex: replacement}`` applied in order to checkpoint keys.
        cast: allow dtype differences and convert to the module's dtypes.
        verify_digests: hash every tensor to be loaded before copying any of it (from a URL:
            while streaming it into the module; a mismatch puts every byte back).
        expect_digest: refuse a checkpoint whose digest is not this one. Implies
            ``verify_digests``: the digest covers the tensor digests, and hashing the bytes
            to be loaded against them is what proves they are the pinned ones.
        allow_missing, allow_unexpected: ``re.fullmatch`` patterns of allowed differences.
        check_classes: compare layer classes (off for deliberate architecture swaps).
        untie: load a checkpoint tie into module tensors that are separate: each gets a copy
            of the stored value (torch does this silently; here it is refused without it).
        tie: load separate checkpoint tensors holding different values into one tied module
            tensor: the tie's first key (module order) in the checkpoint gives the value, the
            others are discarded (listed in ``discarded``). Equal copies (equal digests) and a
            tied key the checkpoint omits need no option.
        device: where tensors of a meta-device module are materialised (default CPU).
        transforms: key transforms applied after ``remap``: a rule set name (``"mixtral"``,
            ``"qwen2_moe"``...) or rules of :mod:`manifest_ckpt.comparison.transforms`
            (``Stack``, ``Concatenate``...). The transformed view is compared first; each part
            is then copied straight into its region of the module's tensor.
        storage_options: fsspec options when ``path`` is a URL (``s3://...``).

    Raises:
        ModelMismatchError: the module and the checkpoint differ (``.report`` lists all).
        IntegrityError: missing or corrupt files, or ``expect_digest`` does not match.
        ManifestError: invalid manifest or weights that do not belong to it.
        UnsupportedTensorError: a module tensor cannot be written (an expanded view).
        TransformError: a transform matches no key or does not fit the keys it matches.

    An application state (a dict of modules, optimizers, schedulers, Stateful objects and
    values, as saved) is checked whole, then restored in place (:mod:`manifest_ckpt.training`);
    a difference raises :class:`~manifest_ckpt.errors.StateMismatchError` with nothing changed.
    """
    if is_app_state(module):
        from manifest_ckpt.training.restore import load_state

        _no_transforms(transforms)
        return load_state(
            module,
            path,
            remap=remap,
            allow_missing=allow_missing,
            allow_unexpected=allow_unexpected,
            strict=strict,
            cast=cast,
            check_classes=check_classes,
            verify_digests=verify_digests,
            expect_digest=expect_digest,
            device=device,
            storage_options=storage_options,
        )
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"load: expected an nn.Module or an application state (a dict of modules, optimizers, values...), "
            f"got {type(module).__name__}"
        )
    target_device = resolve_device(device)
    store = open_store(path, storage_options=storage_options)
    manifest = read_store_manifest(store)
    if expect_digest is not None and manifest.digest != expect_digest:
        raise IntegrityError(
            f"{store.location}: checkpoint digest is {manifest.digest}, expected {expect_digest}; "
            "this is not the checkpoint you pinned"
        )
    steps = load_steps(
        module, store, manifest, strict=strict, remap=remap, cast=cast, verifying=verify_digests or expect_digest is not None,
        allow_missing=allow_missing, allow_unexpected=allow_unexpected, check_classes=check_classes, untie=untie,
        tie=tie, target_device=target_device, transforms=transforms,
    )
    next(steps)  # checked: nothing has changed yet
    return finish_steps(steps)


def finish_steps(steps: Generator[Report, None, LoadResult]) -> LoadResult:
    """Run a :func:`load_steps` generator, paused at its check point, to the end."""
    try:
        next(steps)
    except StopIteration as done:
        result: LoadResult = done.value
        return result
    raise AssertionError("load_steps pauses once")


def load_steps(
    module: nn.Module,
    store: Store,
    manifest: Manifest,
    *,
    strict: bool,
    remap: Remap | None,
    cast: bool,
    verifying: bool,
    allow_missing: Iterable[str],
    allow_unexpected: Iterable[str],
    check_classes: bool,
    untie: bool,
    tie: bool,
    target_device: torch.device,
    transforms: Transforms | None,
    weights: _Weights | None = None,
) -> Generator[Report, None, LoadResult]:
    """``load`` of a module in two steps: check, pause, then change the module.

    The generator first compares, plans and checks everything that can refuse the load
    (files bound, digests verified), then pauses, yielding the comparison's report: nothing
    of the module has changed yet. A
    training state pauses each module entry's load there until every entry is checked.
    ``weights`` is an already bound reader of the whole checkpoint (a module entry's
    ``manifest`` then lists its tensors only).

    Raises:
        As :func:`load`, before the pause; :class:`LoadAbortedError` after it.
    """
    live = capture(module, extra_state=True)
    comparison, plan = _compare(
        manifest, live, remap, allow_missing, allow_unexpected, strict, cast, check_classes, module, transforms,
        untie=untie, tie=tie,
    )
    if not comparison.report.ok:
        raise ModelMismatchError(comparison.report, path=store.location)

    # One copy per live tensor: keys tied in the module share one target, filled from the
    # first key of the tie group that the checkpoint holds.
    source_key, derived, built = plan.source, plan.derived, plan.built
    skipped = set(comparison.skipped)
    chosen: dict[str, str] = {}
    for key in live.tensors:
        if (key in source_key or key in derived or key in built) and key not in skipped:
            chosen.setdefault(live.aliases.get(key, key), key)
    targets = list(chosen.values())
    _require_writable(live, targets)
    if target_device.type != "meta":
        _require_materialised(module, live, targets)
    extra = [k for k in live.extra if (k in source_key or k in derived) and k not in skipped]
    computed = [k for k in [*targets, *extra] if k in derived]
    # The machinery may read any stored tensor to compute a derived value.
    aliases = manifest.aliases
    stored = (
        set(manifest.tensors)
        if computed
        else {_stored(manifest, k) for t in targets if t in built for k in built[t].sources()}
        | {aliases.get(k, k) for k in (source_key[t] for t in targets if t not in built)}
    )
    referenced: set[str] = set()  # what extra state references (read as values, before any copy)
    for key in extra:
        if key in source_key:
            referenced |= {_stored(manifest, ref) for _, ref, _ in values.iter_refs(manifest.extra_state[source_key[key]])}
    stored |= referenced
    if weights is None:
        weights = _Weights(store, manifest)
    files = _files_of(manifest, stored)
    weights.bind(files)
    # Object storage: the needed ranges stream straight into the targets (bounded memory, each
    # byte fetched once, hashed on the way); a mismatch restores the module like any failure.
    # Transformed keys stream into their regions of the targets; machinery that computes
    # values (derived keys) needs the stored values first.
    streamed = not store.mapped and not computed and all(_streamable(built[k]) for k in targets if k in built)
    if not store.mapped:
        # Values needed before copying are fetched piece by piece (just their byte ranges, each
        # once, verified on the way), never whole files.
        early = referenced if streamed else stored
        weights.prefetch(((k, c) for k in sorted(early) for c in manifest.tensors[k].pieces()), verify=verifying)
    elif verifying:
        # Map each file before hashing, so the bytes hashed are the bytes copied.
        weights.map_files(files)
        weights.verify(stored)
    yield comparison.report
    # A file cut since it was bound (while the load was paused here, or by another process)
    # is refused now, before any copy: nothing of the module has changed yet.
    weights.recheck(files)
    given = _machinery_values(module, weights, manifest, plan, computed, strict) if computed else {}
    read = _read_value(weights, manifest)
    extra_values = {k: given[k] if k in given else _extra_value(manifest, source_key[k], read) for k in extra}
    # What set_extra_state replaces is kept, to be put back if anything after it fails.
    extra_before = {k: _copied(live.owners[owner_of(k)].get_extra_state()) for k in extra}

    def fill(target: torch.Tensor, key: str) -> None:
        if key in given:
            with torch.no_grad():
                target.copy_(given[key])
        elif key in built:
            # A transformed key: each source goes straight into its region of the target.
            with torch.no_grad():
                assemble.fill(
                    target,
                    built[key],
                    lambda region, k: _fill(region, weights, manifest, _stored(manifest, k)),
                    lambda k: _stored_value(weights, manifest, _stored(manifest, k)),
                )
        else:
            _fill(target, weights, manifest, _stored(manifest, source_key[key]))

    lazy = {k for k in targets if k in live.lazy}
    materialize = {k for k in targets if k in lazy or live.tensors[k].is_meta}
    fresh: dict[str, torch.Tensor] = {}
    # Meta and lazy tensors are built in full before the module is touched, so a failure leaves it as it was.
    for key in sorted(materialize):
        old = live.tensors[key]
        shape = (
            tuple(given[key].shape)
            if key in given
            else built[key].shape
            if key in built
            else manifest.entry(source_key[key]).shape
        )
        fresh[key] = torch.empty(shape, dtype=old.dtype, device=old.data.device if key in lazy else target_device)
        if not streamed:
            fill(fresh[key], key)
    in_place = [k for k in targets if k not in materialize]
    # Plain copies (the bound file's bytes straight into the target, plain_copy.py) fail only
    # if the file is cut while being read; they run after every other copy, with Ctrl-C held,
    # so only the others need their bytes saved, unless a step after the copy can fail
    # (set_extra_state, a post-hook: everything is saved).
    plain: list[plain_copy.Job] = []
    plain_keys: list[str] = []
    sequential = in_place
    if store.mapped and not streamed and not extra and not _has_post_hooks(live, module):
        plain, plain_keys, sequential = _plain_jobs(in_place, live, weights, source_key, given, built)
    # Each saved target's bytes are kept until the last copy succeeds, so a failure (a copy
    # error, Ctrl-C) puts back what was overwritten: the module is never half-loaded.
    undo = _Undo(live.tensors[k] for k in sequential)
    done = 0
    try:
        with torch.no_grad():
            if streamed:
                jobs: list[tuple[torch.Tensor, str]] = []
                for k in targets:
                    target = fresh[k] if k in fresh else live.tensors[k]
                    if k in built:  # each source into its region of the target
                        assemble.fill(target, built[k], lambda region, s: jobs.append((region, _stored(manifest, s))), _no_value)
                    else:
                        jobs.append((target, _stored(manifest, source_key[k])))
                _stream_fill(weights, jobs, verify=verifying)
                done = len(in_place)
            for key in sequential[done:]:
                fill(live.tensors[key], key)
                done += 1
    except BaseException as exc:
        # A stream writes into every target at once: all of them are put back.
        undo.restore(len(in_place) if streamed else done + 1)
        if isinstance(exc, (ManifestCkptError, KeyboardInterrupt)) or not isinstance(exc, Exception):
            raise
        failed = None if streamed else sequential[done]
        raise LoadAbortedError(
            f"{store.location}: copying {'the weights' if failed is None else repr(failed)} into the module failed "
            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}); every tensor already loaded was "
            "restored, so the module is as it was. Fix the cause and load again.",
            key=failed,
        ) from exc
    with plain_copy.interrupts_held() if plain else contextlib.nullcontext():
        try:
            plain_copy.copy_all(plain, store.read_into)
        except plain_copy.ReadFailed as failed:
            undo.restore(len(undo.tensors))
            raise _read_failed(store, plain, plain_keys, failed) from failed.error
        revert = _assign_materialized(module, live, fresh)
    set_done: list[str] = []
    what = "set_extra_state"
    try:
        for key in extra:
            live.owners[owner_of(key)].set_extra_state(extra_values[key])
            set_done.append(key)  # (one that raised is not called again to put its state back)
        what = "a load post-hook"
        _run_post_hooks(module, sorted(comparison.allowed_missing), sorted(comparison.skipped), strict)
    except BaseException as exc:
        for key in reversed(set_done):
            live.owners[owner_of(key)].set_extra_state(extra_before[key])
        revert()
        undo.restore(len(undo.tensors))
        if not isinstance(exc, Exception):
            raise
        raise LoadAbortedError(
            f"{store.location}: {what} of the module failed after copying ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]}); every tensor was restored, so the module is as it "
            "was (state the hook itself changed outside the module's tensors excepted). Fix the hook and load again."
        ) from exc

    fillable = source_key.keys() | derived | built.keys()
    # A tie-filled key received the checkpoint's value too, through the tensor it shares.
    loaded = sorted(
        [*(k for k in live.tensors if (k in fillable and k not in skipped) or k in comparison.tie_filled), *extra]
    )
    retied = sorted(k for k in live.aliases if k in fillable and k not in targets)
    return LoadResult(
        loaded=loaded,
        cast=sorted(comparison.cast),
        retied=retied,
        left_initial=sorted(comparison.allowed_missing),
        skipped=sorted(comparison.skipped),
        materialized=sorted(k for k in live.tensors if live.aliases.get(k, k) in materialize),
        manifest=manifest,
        tie_filled=dict(sorted(comparison.tie_filled.items())),
        untied=sorted(comparison.untied),
        discarded=sorted(comparison.discarded),
        allowed=list(comparison.report.allowed),
    )


def _copied(value: Any) -> Any:
    """A deep copy of extra state (so putting it back restores it), or the value if it cannot be copied."""
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - user objects: restoring the same object is the best left
        return value


def _no_transforms(transforms: Transforms | None) -> None:
    if transforms is not None:
        raise TransformError(
            "transforms= applies to a module's weights, not to an application state; load the module on its own "
            "(mc.load(model, path, transforms=...)) or convert the checkpoint first"
        )


def _stored(manifest: Manifest, key: str) -> str:
    """The stored tensor a checkpoint key names (itself, or the target of its alias)."""
    return manifest.aliases.get(key, key)


def _extra_value(manifest: Manifest, key: str, resolve: Callable[[str, str], Any]) -> Any:
    """The extra state stored under checkpoint ``key``, its tensors and bytes given by ``resolve``."""
    return values.decode_value(manifest.extra_state[key], resolve)


def _meta_value(manifest: Manifest) -> Callable[[str, str], Any]:
    """Placeholders for what extra state references: meta tensors, and bytes as empty strings."""

    def resolve(tag: str, key: str) -> Any:
        entry = manifest.entry(key)
        if tag == "tensor":
            return torch.empty(entry.shape, dtype=getattr(torch, entry.dtype), device="meta")
        return b"" if tag == "bytes" else io.BytesIO()

    return resolve


def _read_value(weights: _Weights, manifest: Manifest) -> Callable[[str, str], Any]:
    """What extra state references, read into new memory (a module keeps it after the load)."""

    def resolve(tag: str, key: str) -> Any:
        tensor = _stored_value(weights, manifest, _stored(manifest, key)).clone()
        if tag == "tensor":
            return tensor
        data = tensor.numpy().tobytes()
        return data if tag == "bytes" else io.BytesIO(data)

    return resolve


def _stored_value(weights: _Weights, manifest: Manifest, key: str) -> torch.Tensor:
    """A stored tensor's value: a view of the mapping when whole, assembled when chunked."""
    entry = manifest.tensors[key]
    if entry.chunks is None:
        return weights.view(entry.pieces()[0], entry.dtype)
    out = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
    _fill(out, weights, manifest, key)
    return out


def _machinery_values(
    module: nn.Module, weights: _Weights, manifest: Manifest, plan: _Plan, keys: list[str], strict: bool
) -> dict[str, torch.Tensor]:
    """Run the module's load machinery over the stored values; the values it gives ``keys``.

    Raises:
        LoadAbortedError: the machinery failed on the values (it ran on their description),
            before anything was copied.
    """
    read = _read_value(weights, manifest)
    state = {
        new: _extra_value(manifest, old, read) if old in manifest.extra_state else _stored_value(weights, manifest, _stored(manifest, old))
        for new, old in plan.names.items()
    }
    rewritten = machinery.rewrite(module, state, plan.versions, placeholders=False, strict=strict)
    if rewritten.problems or any(
        k not in rewritten.state or (k.rpartition(".")[2] != EXTRA_STATE_NAME and not isinstance(rewritten.state[k], torch.Tensor))
        for k in keys
    ):
        path, why = rewritten.problems[0] if rewritten.problems else ("", "gave no tensor for a key it described")
        raise LoadAbortedError(
            f"{weights.store.location}: module {path or '(root)'}: {why}. Nothing was copied; the module is as it was."
        )
    return {k: rewritten.state[k] for k in keys}


def _run_post_hooks(module: nn.Module, missing: list[str], unexpected: list[str], strict: bool) -> None:
    """Call every load post-hook as torch does (children first), with the keys it would get.

    Raises:
        LoadAbortedError: under ``strict``, a hook reported keys as missing or unexpected
            (torch's load_state_dict fails then).
    """
    keys = _IncompatibleKeys(missing, unexpected)
    before = (list(missing), list(unexpected))

    def visit(sub: nn.Module) -> None:
        for child in sub._modules.values():
            if child is not None:
                visit(child)
        for hook in sub._load_state_dict_post_hooks.values():
            hook(sub, keys)

    visit(module)
    if strict and (len(missing) > len(before[0]) or len(unexpected) > len(before[1])):
        added = sorted(set(missing) - set(before[0])) + sorted(set(unexpected) - set(before[1]))
        raise LoadAbortedError(
            f"a load post-hook reported {', '.join(map(repr, added[:5]))} as missing or unexpected, which fails "
            "torch's strict load_state_dict; load with strict=False or fix the hook"
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device meta tensors are materialised on (CPU by default), checked to exist here.

    Raises:
        DeviceUnavailableError: ``device`` is not a device name, or this machine (or this
            torch build) does not have it; names the argument and what is available.
    """
    if device is None:
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise DeviceUnavailableError(
            f"device={device!r} is not a torch device ({exc}); use 'cpu', 'cuda', 'cuda:0', 'mps'..."
        ) from None
    if resolved.type in ("cpu", "meta"):
        return resolved
    try:
        # Allocating nothing on it is the one test every backend answers the same way.
        torch.empty(0, device=resolved)
    except (AssertionError, RuntimeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        count = torch.cuda.device_count() if resolved.type == "cuda" and torch.cuda.is_available() else 0
        available = ", ".join(["cpu", *(f"cuda:{i}" for i in range(count))])
        raise DeviceUnavailableError(
            f"device={device!r} is not available on this machine ({reason}); available: {available}. "
            "Pass one of those, or leave device= unset to materialise on the CPU. Nothing was loaded."
        ) from None
    return resolved


def _require_writable(live: LiveState, targets: Iterable[str]) -> None:
    """Refuse, before any copy, targets that copy_ cannot write (so a load stays all or nothing)."""
    expanded, frozen = [], []
    tensors, lazy = live.tensors, live.lazy
    inference_mode = torch.is_inference_mode_enabled()
    for key in targets:
        t = tensors[key]
        if key in lazy:
            continue  # materialised into a fresh tensor
        # An expanded view (stride 0 along a dim of size > 1) maps several elements to one
        # memory location; torch refuses to copy into it, which would fail half-way through.
        # (A contiguous tensor with elements has no such dim: the strides need not be read.)
        if (
            not (t.is_contiguous() and t.numel())
            and not t.is_meta
            and any(size > 1 and stride == 0 for size, stride in zip(t.shape, t.stride()))
        ):
            expanded.append(f"{key!r} (shape {list(t.shape)}, stride {list(t.stride())})")
        # torch allows in-place writes to inference tensors only inside inference mode; its
        # load_state_dict fails there after copying earlier keys. We refuse before the first.
        if not inference_mode and t.is_inference():
            frozen.append(key)
    if expanded:
        raise UnsupportedTensorError(
            f"module tensors {', '.join(expanded[:10])}{' ...' if len(expanded) > 10 else ''} are expanded views (an expanded view maps "
            "several elements to one memory location), so they cannot be loaded into. Give each its "
            "own storage first (e.g. replace it with nn.Parameter(t.clone())); nothing was loaded."
        )
    if frozen:
        raise UnsupportedTensorError(
            f"module tensors {', '.join(frozen[:10])}{' ...' if len(frozen) > 10 else ''} "
            f"({len(frozen)} in all) are inference tensors (the module was built under torch.inference_mode()), "
            "which torch writes only inside inference mode. Call load inside `with torch.inference_mode():` "
            "(as torch's load_state_dict needs), or build the module outside it; nothing was loaded."
        )


def _require_materialised(module: nn.Module, live: LiveState, targets: Iterable[str]) -> None:
    """Refuse, before any copy, a load that would leave tensors of the module on the meta device.

    Meta tensors have no values: a non-persistent buffer (which no checkpoint holds, such as a
    rotary embedding's ``inv_freq``) or a key the policies let be missing would stay on meta,
    and the module's first forward would fail far from the cause.
    """
    # One pass over the modules' own tables finds whether anything is on meta at all (the
    # usual answer is no; naming every tensor costs seconds at 100,000 tensors).
    owners = live.owners.values() if live.owners else module.modules()
    if not any(
        t is not None and t.is_meta for sub in owners for table in (sub._parameters, sub._buffers) for t in table.values()
    ):
        return
    filled = {id(live.tensors[k]) for k in targets if live.tensors[k].is_meta}
    persistent = {id(t) for t in live.tensors.values()}
    left: list[tuple[bool, str]] = []
    seen: set[int] = set()
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if t.is_meta and id(t) not in filled and id(t) not in seen:
            seen.add(id(t))
            left.append((id(t) in persistent, name))
    if not left:
        return
    left.sort()  # non-persistent buffers first: the usual case
    names = [name for _, name in left]
    kinds = "non-persistent buffers" if not any(p for p, _ in left) else "tensors"
    raise UnsupportedTensorError(
        f"{len(names)} {kinds} of the module are on the meta device and the checkpoint does not fill them: "
        f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}. They would stay without values and the first "
        "forward would fail. Build the module inside `with mc.init_empty():` (parameters and persistent buffers "
        "on meta, non-persistent buffers computed as usual), or initialise these tensors before loading; "
        "nothing was loaded."
    )


def _files_of(manifest: Manifest, keys: Iterable[str]) -> set[str]:
    """The weights files holding the stored tensors ``keys`` (read from the JSON entries when there are)."""
    raw = json_entries(manifest.tensors)
    if raw is not None:
        found = {e["file"] for e in map(raw.__getitem__, keys) if "chunks" not in e}
        found.update(c["file"] for k in keys if "chunks" in raw[k] for c in raw[k]["chunks"])
        return found
    entries = [manifest.tensors[k] for k in keys]
    files = {e.file for e in entries if e.chunks is None and e.file is not None}
    files.update(c.file for e in entries if e.chunks is not None for c in e.chunks)
    return files


def _has_post_hooks(live: LiveState, module: nn.Module) -> bool:
    owners = live.owners.values() if live.owners else module.modules()
    return any(sub._load_state_dict_post_hooks for sub in owners)


def _plain_jobs(
    in_place: list[str],
    live: LiveState,
    weights: _Weights,
    source_key: Mapping[str, str],
    given: Mapping[str, torch.Tensor],
    built: Mapping[str, Node],
) -> tuple[list[plain_copy.Job], list[str], list[str]]:
    """Split the in-place targets into plain copies (:data:`plain_copy.Job`), their keys, and the rest, in order.

    When a plain target shares memory with one of the rest, running the rest first could
    change which write lands last; then every copy stays in order (all saved, as before).
    """
    manifest = weights.manifest
    tensors, aliases, live_tensors = manifest.tensors, manifest.aliases, live.tensors
    raw = json_entries(tensors)
    special = given.keys() | built.keys()
    dtypes: dict[str, torch.dtype] = {}
    bases: dict[str, int] = {}
    plain: list[plain_copy.Job] = []
    keys: list[str] = []
    rest: list[str] = []
    plain_types = plain_copy.PLAIN_TYPES
    read_min = plain_copy.READ_MIN
    with gc_paused():  # 100,000 small tuples, no cycles
        for key in in_place:
            target = live_tensors[key]
            # plain_copy.is_plain_target, inlined (a call per tensor shows at 100,000 tensors).
            if (
                (special and key in special)
                or type(target) not in plain_types
                or not target.is_cpu
                or not target.is_contiguous()
                or target.is_inference()
                or target.is_conj()
                or target.is_neg()
            ):
                rest.append(key)
                continue
            stored = source_key[key]
            stored = aliases.get(stored, stored)
            # The JSON entry when the manifest was read (no TensorEntry built), else the entry.
            if raw is not None:
                doc = raw[stored]
                if "chunks" in doc:
                    rest.append(key)
                    continue
                name, (start, end), file = doc["dtype"], doc["byte_range"], doc["file"]
            else:
                entry = tensors[stored]
                if entry.chunks is not None or entry.byte_range is None or entry.file is None:
                    rest.append(key)
                    continue
                name, (start, end), file = entry.dtype, entry.byte_range, entry.file
            dtype = dtypes.get(name)
            if dtype is None:
                dtype = dtypes[name] = getattr(torch, name)
            size = target.nbytes
            if target.dtype is not dtype or size != end - start:
                rest.append(key)
                continue
            if size >= read_min:  # read by the store straight into the target
                plain.append((target, target.data_ptr(), size, start, file))
            else:  # one memmove from the bound mapping
                base = bases.get(file)
                if base is None:
                    base = bases[file] = weights.address(file)
                plain.append((target, target.data_ptr(), size, base + start, None))
            keys.append(key)
    if plain and rest:
        others = {live_tensors[k].untyped_storage().data_ptr() for k in rest if not live_tensors[k].is_meta}
        if any(job[0].untyped_storage().data_ptr() in others for job in plain):
            return [], [], in_place
    return plain, keys, rest


def _read_failed(
    store: Store, jobs: list[plain_copy.Job], keys: list[str], failed: plain_copy.ReadFailed
) -> IntegrityError:
    """The error for a plain read that failed: the file was cut (or failed) while being copied."""
    key, file = keys[failed.index], jobs[failed.index][4]
    return IntegrityError(
        f"{store.location}: reading {key!r} from {file} failed while loading: {failed.error} The tensors "
        "whose copies could fail were restored, but those read straight from the files were written "
        "(the other reads completed): the module is partially loaded. Load it again from an intact checkpoint.",
        file=file,
        key=key,
    )


class _Undo:
    """The bytes of tensors about to be overwritten, to put them back if the load fails.

    Contiguous CPU tensors are saved into one buffer with memmove (cheap at 100,000 small
    tensors); any other tensor is cloned.
    """

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        fast = [t for t in self.tensors if _is_plain_cpu(t)]
        self._pool = torch.empty(sum(t.nbytes for t in fast), dtype=torch.uint8)
        self._saved: list[tuple[int, int] | torch.Tensor] = []
        at, base = 0, self._pool.data_ptr()
        with torch.no_grad():
            for t in self.tensors:
                if _is_plain_cpu(t):
                    if t.nbytes:
                        ctypes.memmove(base + at, t.data_ptr(), t.nbytes)
                    self._saved.append((at, t.nbytes))
                    at += t.nbytes
                else:
                    self._saved.append(_as_bytes(t).clone())

    def restore(self, count: int) -> None:
        """Put back the first ``count`` tensors (those a copy may have changed)."""
        with torch.no_grad():
            for t, saved in zip(self.tensors[:count], self._saved[:count]):
                if isinstance(saved, torch.Tensor):
                    _as_bytes(t).copy_(saved)
                else:
                    at, size = saved
                    if size:
                        ctypes.memmove(t.data_ptr(), self._pool.data_ptr() + at, size)
                    increment_version(t)


def _is_plain_cpu(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter) and t.is_cpu and t.is_contiguous() and not (
        t.is_inference() or t.is_conj() or t.is_neg()
    )


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor as something clone and copy_ handle bit for bit (packed 4-bit floats as bytes)."""
    return t.view(torch.uint8) if t.dtype in _BYTE_COPIED else t


def _fill(target: torch.Tensor, weights: _Weights, manifest: Manifest, stored_key: str) -> None:
    """Copy a stored tensor into ``target`` chunk by chunk (casting if dtypes differ)."""
    entry = manifest.tensors[stored_key]
    start, end = entry.byte_range or (0, 0)
    if (
        entry.chunks is None
        and weights.store.mapped
        and end - start <= _MEMMOVE_MAX
        and type(target) in (torch.Tensor, nn.Parameter)
        and target.is_cpu
        and target.dtype is getattr(torch, entry.dtype)
        and target.nbytes == end - start
        and target.is_contiguous()
        and not (target.is_inference() or target.is_conj() or target.is_neg())
    ):
        # A small whole tensor of the same dtype: one memmove from the mapping. Building
        # source views and calling copy_ costs ~15 us a tensor, most of a 100,000-tensor load.
        assert entry.file is not None
        if entry.file not in weights._buffers:
            weights.raw(entry.pieces()[0])  # maps the file once
        buf, offset = weights._buffers[entry.file]
        if end - start:
            ctypes.memmove(target.data_ptr(), buf.data_ptr() + offset + start, end - start)
        increment_version(target)  # as copy_ does, so autograd still sees an in-place change
        return
    with torch.no_grad():
        for chunk in entry.pieces():
            source = weights.view(chunk, entry.dtype)
            region = target[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.shape))]
            if region.dtype in _BYTE_COPIED and source.dtype is region.dtype:
                # torch has no copy kernel for packed 4-bit floats; the bytes are the values.
                region, source = region.view(torch.uint8), source.view(torch.uint8)
            region.copy_(source)


def _streamable(node: Node) -> bool:
    """True when every source of a transformed key lands in a region of the target (no select or narrow)."""
    return node.op in ("source", "stack", "concat", "transpose") and all(_streamable(p) for p in node.parts)


def _no_value(key: str) -> torch.Tensor:
    raise AssertionError(f"{key!r}: a streamed transform read a value (_streamable admits no select or narrow)")


def _stream_fill(weights: _Weights, jobs: list[tuple[torch.Tensor, str]], *, verify: bool) -> None:
    """Fill each ``(target, stored key)`` from the store's stream of the needed byte ranges.

    A whole stored tensor of the target's dtype goes straight into a plain CPU target's bytes;
    any other piece (a chunk, a cast, another device) is gathered in a buffer of its own size
    and copied into its region once complete. So beyond the targets, memory holds the store's
    window of blocks and at most the pieces that are being gathered. With ``verify`` each piece
    is hashed as it arrives; mismatches are raised once, after the stream, naming them all.
    """
    manifest = weights.manifest
    sinks: list[_Sink] = []
    for target, key in jobs:
        entry = manifest.tensors[key]
        sinks += [_Sink(target, key, entry.dtype, c, entry.chunks is None) for c in entry.pieces()]
    hashers = [hashlib.sha256() for _ in sinks] if verify else []
    ranges = [(s.chunk.file, *s.chunk.byte_range) for s in sinks]
    for index, offset, piece in weights.store.stream(ranges):
        if verify:
            hashers[index].update(piece)
        sinks[index].write(offset, piece)
    if verify:
        weights.raise_mismatches(
            [(s.key, s.chunk, d) for s, d in zip(sinks, ("sha256:" + h.hexdigest() for h in hashers)) if d != s.chunk.digest]
        )


class _Sink:
    """Where one stored piece's streamed bytes go: the target's own bytes, or a buffer then its region."""

    def __init__(self, target: torch.Tensor, key: str, dtype: str, chunk: Chunk, whole: bool) -> None:
        self.target, self.key, self.dtype, self.chunk = target, key, dtype, chunk
        self.size = chunk.byte_range[1] - chunk.byte_range[0]
        self.received = 0
        self.direct = (
            whole and _is_plain_cpu(target) and target.dtype is getattr(torch, dtype) and target.nbytes == self.size
        )
        self.buffer: torch.Tensor | None = None
        self.view: memoryview | None = None

    def write(self, offset: int, piece: memoryview) -> None:
        if self.view is None:
            if not self.direct:
                self.buffer = torch.empty(self.size, dtype=torch.uint8)
            self.view = _writable(self.target if self.direct else self.buffer)
        self.view[offset : offset + len(piece)] = piece
        self.received += len(piece)
        if self.received < self.size:
            return
        if self.direct:
            increment_version(self.target)  # as copy_ does, so autograd sees an in-place change
            return
        assert self.buffer is not None
        source = self.buffer.view(getattr(torch, self.dtype)).view(self.chunk.shape)
        region = self.target[tuple(slice(o, o + n) for o, n in zip(self.chunk.offsets, self.chunk.shape))]
        if region.dtype in _BYTE_COPIED and source.dtype is region.dtype:
            region, source = region.view(torch.uint8), source.view(torch.uint8)
        region.copy_(source)
        self.buffer = self.view = None


def _writable(t: torch.Tensor | None) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    assert t is not None
    return memoryview((ctypes.c_ubyte * t.nbytes).from_address(t.data_ptr())).cast("B")


def _assign_materialized(
    module: nn.Module, live: LiveState, fresh: Mapping[str, torch.Tensor]
) -> Callable[[], None]:
    """Put materialised tensors in place of meta and lazy ones, once per tie group, keeping ties.

    A lazy parameter or buffer is materialised in place, as its ``materialize`` does (the
    object stays, so references to it keep working). Returns a function that undoes it all.
    """
    undo: list[Callable[[], None]] = []
    replacement: dict[int, torch.Tensor] = {}
    for key, tensor in fresh.items():
        old = live.tensors[key]
        if key in live.lazy:
            undo.append(_materialize_lazy(old, tensor))
            continue
        new: torch.Tensor = nn.Parameter(tensor, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else tensor
        replacement[id(old)] = new
    if replacement:
        for sub in module.modules():
            tables: tuple[dict[str, Any], ...] = (sub._parameters, sub._buffers)
            for table in tables:
                for name, t in list(table.items()):
                    if t is not None and id(t) in replacement:
                        table[name] = replacement[id(t)]
                        undo.append(functools.partial(table.__setitem__, name, t))

    def revert() -> None:
        for step in reversed(undo):
            step()

    return revert


def _materialize_lazy(lazy: torch.Tensor, value: torch.Tensor) -> Callable[[], None]:
    """Make an uninitialised lazy tensor hold ``value``; return how to make it lazy again."""
    old_class, old_data = type(lazy), lazy.data
    with torch.no_grad():
        lazy.data = value
    lazy.__class__ = lazy.cls_to_become  # type: ignore[attr-defined]

    def revert() -> None:
        lazy.__class__ = old_class
        with torch.no_grad():
            lazy.data = old_data

    return revert
