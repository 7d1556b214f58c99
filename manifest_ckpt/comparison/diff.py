"""``diff``: what differs between two checkpoints (directories, archives, or one of each).

Three layers, each computed once:

* **structure**: keys, shapes, dtypes, layer classes and ties, by the same
  :func:`manifest_ckpt.comparison.compare.compare` that ``check`` uses (A plays the module, B the
  checkpoint), plus the module-tree fields no key carries (parameter-less modules, versions);
* **values**: for every key both hold with the same shape, whether its elements differ and by
  how much. Equal dtype and digest means equal bytes, so such tensors are never read; the
  others are compared tile by tile from memory-mapped views, holding at most a few tiles of
  :data:`TILE_ELEMENTS` elements in memory whatever the tensor size;
* **lineage**: recorded parents only one side has, and whether one side descends from the other.

torch is imported only when some tensor has to be read, so diffing identical checkpoints
(or structure only) stays light.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from manifest_ckpt.cli.progress import Progress
from manifest_ckpt.comparison.compare import StateSpec, compare
from manifest_ckpt.comparison.report import Problem, render_table
from manifest_ckpt.comparison.state_view import StateChange, differences
from manifest_ckpt.format import values
from manifest_ckpt.format.dtypes import describe
from manifest_ckpt.format.manifest import Chunk, Manifest, TensorEntry
from manifest_ckpt.lineage import short_digest
from manifest_ckpt.storage.store import Store, open_store, read_store_manifest

if TYPE_CHECKING:
    import torch

    from manifest_ckpt.reader import _Weights

PathLike = str | os.PathLike[str]

__all__ = ["TILE_ELEMENTS", "CheckpointDiff", "LineageDiff", "ValueChange", "diff"]

TILE_ELEMENTS = 1 << 20
"""Elements compared at a time (a few float64 copies of this many: tens of MB at most)."""

# compare() speaks of a module (A here) and a checkpoint (B); a diff speaks of two sides.
_KIND_NAMES = {"missing": "removed", "unexpected": "added"}


@dataclass(frozen=True)
class ValueChange:
    """A key whose values differ between A and B (same shape; dtypes may differ).

    Attributes:
        key: the state-dict key (an alias is listed under its own name too).
        a, b: dtype and shape on each side, such as ``float32[4, 4]``.
        elements: number of elements.
        changed: elements that differ: bitwise when the dtypes are equal (so ``-0.0`` vs
            ``0.0`` and NaN payloads count), by value after conversion otherwise.
        max_abs: largest ``|a - b|`` over changed elements finite on both sides (None
            when no changed element is finite on both sides).
        max_rel: largest ``|a - b| / max(|a|, |b|)`` over the same elements (0 to 2).
        nonfinite: changed elements where either side is NaN or infinite.
    """

    key: str
    a: str
    b: str
    elements: int
    changed: int
    max_abs: float | None
    max_rel: float | None
    nonfinite: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "a": self.a,
            "b": self.b,
            "elements": self.elements,
            "changed": self.changed,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "nonfinite": self.nonfinite,
        }


@dataclass(frozen=True)
class LineageDiff:
    """Differences in recorded parents (matched by digest and relation; labels ignored).

    Attributes:
        only_in_a, only_in_b: parents one side records and the other does not.
        b_from_a: the relation under which B records A as a parent, if it does.
        a_from_b: the relation under which A records B as a parent, if it does.
    """

    only_in_a: tuple[Mapping[str, Any], ...]
    only_in_b: tuple[Mapping[str, Any], ...]
    b_from_a: str | None
    a_from_b: str | None

    @property
    def differs(self) -> bool:
        return bool(self.only_in_a or self.only_in_b)

    def to_dict(self) -> dict[str, Any]:
        return {
            "only_in_a": [dict(p) for p in self.only_in_a],
            "only_in_b": [dict(p) for p in self.only_in_b],
            "b_from_a": self.b_from_a,
            "a_from_b": self.a_from_b,
        }


@dataclass(frozen=True)
class CheckpointDiff:
    """Everything that differs between checkpoints A and B; ``identical`` when nothing does.

    Attributes:
        a, b: the two locations; digest_a, digest_b: their checkpoint digests.
        structure: key, shape, dtype, class and tie differences; ``expected`` is A's side,
            ``found`` B's; kinds ``removed`` (only in A), ``added`` (only in B), ``shape``,
            ``dtype``, ``class``, ``alias``.
        suggested_remap: a key renaming that maps B's keys onto A's, when one explains
            added and removed keys.
        modules: module-tree differences no key shows (parameter-less modules, versions,
            non-persistent buffers), one sentence each.
        values: keys whose values differ, sorted by key.
        compared: keys held by both with the same shape (their values were compared).
        lineage: parent differences.
        notes: remarks that are not differences.
        state: application-state differences of training states (entries, classes and
            plain values; tensor values are in ``values``).
    """

    a: str
    b: str
    digest_a: str
    digest_b: str
    structure: tuple[Problem, ...]
    suggested_remap: Mapping[str, str] | None
    modules: tuple[str, ...]
    values: tuple[ValueChange, ...]
    compared: int
    lineage: LineageDiff
    notes: tuple[str, ...] = ()
    state: tuple[StateChange, ...] = ()

    @property
    def identical(self) -> bool:
        return not (self.structure or self.modules or self.values or self.state or self.lineage.differs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "identical": self.identical,
            "a": {"checkpoint": self.a, "digest": self.digest_a},
            "b": {"checkpoint": self.b, "digest": self.digest_b},
            "structure": [p.to_dict() for p in self.structure],
            "suggested_remap": None if self.suggested_remap is None else dict(self.suggested_remap),
            "modules": list(self.modules),
            "values": {"compared": self.compared, "changed": [v.to_dict() for v in self.values]},
            "state": [c.to_dict() for c in self.state],
            "lineage": self.lineage.to_dict(),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        out = [f"A  {self.a}  {short_digest(self.digest_a)}", f"B  {self.b}  {short_digest(self.digest_b)}", ""]
        if self.structure:
            out.append(f"structure: {_count(len(self.structure), 'difference')}")
            rows = [("kind", "key", "A", "B")]
            rows += [(p.kind, p.key or "(root)", p.expected or "-", p.found or "-") for p in self.structure]
            out.append(render_table(rows))
            if self.suggested_remap:
                out.append(f"hint: B's keys map onto A's with remap={dict(self.suggested_remap)!r}")
        else:
            out.append("structure: same keys, shapes, dtypes, classes and ties")
        out += [f"module: {line}" for line in self.modules]
        if self.state:
            out.append(f"state: {_count(len(self.state), 'difference')}")
            rows = [("kind", "entry", "A", "B")] + [(c.kind, c.key, c.a or "-", c.b or "-") for c in self.state]
            out.append(render_table(rows))
        if self.values:
            out.append(f"values: {len(self.values)} of {_count(self.compared, 'compared key')} changed")
            rows = [("key", "changed", "max abs", "max rel")]
            for v in self.values:
                if v.changed < 0:
                    changed = "digest differs (not read)"
                else:
                    extra = f" ({v.nonfinite} non-finite)" if v.nonfinite else ""
                    changed = f"{v.changed:,}/{v.elements:,}{extra}"
                rows.append((v.key, changed, _number(v.max_abs, 6), _number(v.max_rel, 3)))
            out.append(render_table(rows))
        else:
            out.append(f"values: all {_count(self.compared, 'compared key')} equal")
        out += self._lineage_lines()
        out += [f"note: {n}" for n in self.notes]
        out.append("")
        if self.identical:
            out.append("IDENTICAL")
        else:
            counts = [
                (len(self.structure) + len(self.modules), "structure difference"),
                (len(self.values), "changed key"),
                (len(self.state), "state difference"),
                (len(self.lineage.only_in_a) + len(self.lineage.only_in_b), "lineage difference"),
            ]
            out.append("DIFFERENT: " + ", ".join(_count(n, word) for n, word in counts if n))
        return "\n".join(out)

    def _lineage_lines(self) -> list[str]:
        lineage = self.lineage
        lines = []
        if lineage.b_from_a:
            lines.append(f"lineage: B records A as a parent ({lineage.b_from_a})")
        if lineage.a_from_b:
            lines.append(f"lineage: A records B as a parent ({lineage.a_from_b})")
        for side, parents, other in (("A", lineage.only_in_a, self.digest_b), ("B", lineage.only_in_b, self.digest_a)):
            for p in parents:
                if p["digest"] == other:
                    continue  # already said: one side records the other as a parent
                label = f" ({p['name']})" if p.get("name") else ""
                lines.append(f"lineage: only {side} records parent {p['relation']} {short_digest(p['digest'])}{label}")
        if not lines:
            lines.append("lineage: same parents")
        return lines


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def diff(
    a: PathLike,
    b: PathLike,
    *,
    values: bool = True,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> CheckpointDiff:
    """Compare checkpoints A and B: structure, values and lineage.

    Tensor digests are trusted as recorded (run ``verify`` to prove them); a key whose
    dtype and digest are equal on both sides is equal without reading it.

    Args:
        a, b: checkpoint directories, ``manifest.json`` paths or archives, in any mix.
        values: compare tensor values; when False, keys whose digests differ are listed
            without reading them (``changed`` and ``nonfinite`` are then -1, ``max_abs`` and
            ``max_rel`` None).
        progress: show progress on stderr, when it is a terminal, while values are read.

    Returns:
        The differences; ``.identical`` when there are none.

    Raises:
        CheckpointNotFoundError, ManifestError: a side is not a readable checkpoint.
        IntegrityError: a weights file needed for the value comparison is missing or truncated.
    """
    store_a = open_store(a, storage_options=storage_options)
    store_b = open_store(b, storage_options=storage_options)
    ma, mb = read_store_manifest(store_a), read_store_manifest(store_b)
    spec_a, spec_b = StateSpec.from_manifest(ma), StateSpec.from_manifest(mb)
    report = compare(spec_b, spec_a, satisfy_ties=False).report
    structure = tuple(
        Problem(_KIND_NAMES.get(p.kind, p.kind), p.key, p.expected, p.found)  # type: ignore[arg-type]
        for p in report.problems
    )
    reported_classes = {p.key for p in report.problems if p.kind == "class"}
    common = sorted(
        k
        for k in spec_a.tensors
        if k in spec_b.tensors
        and spec_a.tensors[k].shape == spec_b.tensors[k].shape
        and k not in ma.extra_state
        and k not in mb.extra_state
    )
    pending = [k for k in common if _may_differ(ma.entry(k), mb.entry(k))]
    if values and pending:
        changes = _value_changes(pending, store_a, ma, store_b, mb, progress=progress)
    else:
        changes = [_unread_change(k, ma.entry(k), mb.entry(k)) for k in pending]
    result = CheckpointDiff(
        a=store_a.location,
        b=store_b.location,
        digest_a=ma.digest,
        digest_b=mb.digest,
        structure=structure,
        suggested_remap=report.suggested_remap,
        modules=tuple(_module_differences(ma, mb, reported_classes)),
        values=tuple(changes),
        compared=len(common),
        lineage=_lineage_diff(ma, mb),
        state=tuple([*differences(ma.state, mb.state), *_extra_state_changes(ma, mb)]),
    )
    if ma.digest != mb.digest and not (result.structure or result.modules or result.values or result.state):
        # compute_digest covers how chunked tensors are split, which values do not show.
        note = "the digests differ only in how tensors are split into chunks; every value is bitwise equal"
        result = dataclasses.replace(result, notes=(note,))
    return result


def _extra_state_changes(ma: Manifest, mb: Manifest) -> Iterator[StateChange]:
    """Module extra state both sides hold that differs: its JSON, or the digest of a tensor in it.

    (An extra-state key only one side holds is a structure difference, as for any key.)
    """
    for key in sorted(ma.extra_state.keys() & mb.extra_state.keys()):
        na, nb = ma.extra_state[key], mb.extra_state[key]
        refs_a = [(tag, ma.entry(k).dtype, ma.entry(k).shape, ma.entry(k).digest) for tag, k, _ in values.iter_refs(na)]
        refs_b = [(tag, mb.entry(k).dtype, mb.entry(k).shape, mb.entry(k).digest) for tag, k, _ in values.iter_refs(nb)]
        if na != nb or refs_a != refs_b:
            yield StateChange("changed", key, values.describe(na, 60), values.describe(nb, 60))


def _may_differ(ea: TensorEntry, eb: TensorEntry) -> bool:
    """False when equal dtype and digest prove equal bytes (the tensor is then never read)."""
    return ea.dtype != eb.dtype or ea.digest != eb.digest


def _unread_change(key: str, ea: TensorEntry, eb: TensorEntry) -> ValueChange:
    return ValueChange(
        key, describe(ea.dtype, ea.shape), describe(eb.dtype, eb.shape), math.prod(ea.shape), -1, None, None, -1
    )


def _module_differences(ma: Manifest, mb: Manifest, reported_classes: set[str]) -> Iterator[str]:
    """Module-tree differences that no key shows (``compare`` covers owners of common keys)."""
    if ma.modules is None or mb.modules is None:
        if (ma.modules is None) != (mb.modules is None):
            side = "A" if mb.modules is None else "B"
            yield f"only {side} records a module tree (the other was saved from a state dict)"
        return
    for path in sorted(set(ma.modules) | set(mb.modules)):
        name = path or "(root)"
        x, y = ma.modules.get(path), mb.modules.get(path)
        if x is None or y is None:
            side, entry = ("B", y) if x is None else ("A", x)
            assert entry is not None
            yield f"{name} ({entry.cls}) only in {side}"
            continue
        if x.cls != y.cls and path not in reported_classes:
            yield f"{name} is {x.cls} in A, {y.cls} in B"
        if x.version != y.version:
            yield f"{name} ({x.cls}) has version {x.version} in A, {y.version} in B"
        if set(x.non_persistent_buffers) != set(y.non_persistent_buffers):
            yield (
                f"{name} has non-persistent buffers {sorted(x.non_persistent_buffers)} in A, "
                f"{sorted(y.non_persistent_buffers)} in B"
            )


def _lineage_diff(ma: Manifest, mb: Manifest) -> LineageDiff:
    def ident(p: Mapping[str, Any]) -> tuple[str, str]:
        return str(p["digest"]), str(p["relation"])

    ids_a = {ident(p) for p in ma.parents}
    ids_b = {ident(p) for p in mb.parents}
    return LineageDiff(
        only_in_a=tuple(p for p in ma.parents if ident(p) not in ids_b),
        only_in_b=tuple(p for p in mb.parents if ident(p) not in ids_a),
        b_from_a=next((str(p["relation"]) for p in mb.parents if p["digest"] == ma.digest), None),
        a_from_b=next((str(p["relation"]) for p in ma.parents if p["digest"] == mb.digest), None),
    )


# -- values -----------------------------------------------------------------------------


@dataclass
class _Stats:
    """Running totals of one key's comparison."""

    changed: int = 0
    max_abs: float | None = None
    max_rel: float | None = None
    nonfinite: int = 0


def _value_changes(
    keys: list[str], store_a: Store, ma: Manifest, store_b: Store, mb: Manifest, *, progress: bool
) -> list[ValueChange]:
    """Read and compare the keys whose digests differ; return those whose values differ."""
    from manifest_ckpt.reader import _Weights  # imports torch: only when values must be read

    weights_a, weights_b = _Weights(store_a, ma), _Weights(store_b, mb)
    stored = {(ma.aliases.get(k, k), mb.aliases.get(k, k)) for k in keys}
    weights_a.bind({c.file for ka, _ in stored for c in ma.tensors[ka].pieces()})
    weights_b.bind({c.file for _, kb in stored for c in mb.tensors[kb].pieces()})
    total = sum(ma.tensors[ka].nbytes for ka, _ in stored)
    # Tied keys share one stored tensor: compare each stored pair once.
    cache: dict[tuple[str, str], _Stats] = {}
    changes = []
    with Progress("diff values", total, enabled=progress) as bar:
        for key in keys:
            pair = (ma.aliases.get(key, key), mb.aliases.get(key, key))
            if pair not in cache:
                ea, eb = ma.tensors[pair[0]], mb.tensors[pair[1]]
                cache[pair] = _compare_tensor(ea, eb, weights_a, weights_b)
                bar.advance(ea.nbytes)
            stats = cache[pair]
            if stats.changed:
                ea, eb = ma.entry(key), mb.entry(key)
                changes.append(
                    ValueChange(
                        key,
                        describe(ea.dtype, ea.shape),
                        describe(eb.dtype, eb.shape),
                        math.prod(ea.shape),
                        stats.changed,
                        stats.max_abs,
                        stats.max_rel,
                        stats.nonfinite,
                    )
                )
    return changes


def _overlaps(
    pieces_a: tuple[Chunk, ...], pieces_b: tuple[Chunk, ...]
) -> Iterator[tuple[Chunk, Chunk, tuple[int, ...], tuple[int, ...]]]:
    """``(chunk of A, chunk of B, low corner, high corner)`` of every region both cover.

    The two sides may split a tensor differently (one whole, one in chunks, or different
    chunks); the regions where a chunk of A meets a chunk of B tile the tensor exactly.
    """
    for ca in pieces_a:
        for cb in pieces_b:
            low = tuple(max(x, y) for x, y in zip(ca.offsets, cb.offsets))
            high = tuple(min(x + s, y + t) for x, s, y, t in zip(ca.offsets, ca.shape, cb.offsets, cb.shape))
            if all(h > lo for lo, h in zip(low, high)):
                yield ca, cb, low, high


def _tiles(shape: tuple[int, ...], limit: int) -> Iterator[tuple[slice, ...]]:
    """Slices that tile ``shape`` with at most ``limit`` elements each (one row if a row is larger)."""
    if not shape:
        yield ()
        return
    inner = math.prod(shape[1:])
    if inner <= limit:
        step = max(1, limit // max(inner, 1))
        rest = tuple(slice(None) for _ in shape[1:])
        for start in range(0, shape[0], step):
            yield (slice(start, min(start + step, shape[0])), *rest)
        return
    for i in range(shape[0]):
        for inner_tile in _tiles(shape[1:], limit):
            yield (slice(i, i + 1), *inner_tile)


def _compare_tensor(ea: TensorEntry, eb: TensorEntry, weights_a: _Weights, weights_b: _Weights) -> _Stats:
    """Compare one stored tensor of A with one of B (same shape), region by region, tile by tile."""
    stats = _Stats()
    for ca, cb, low, high in _overlaps(ea.pieces(), eb.pieces()):
        view_a = weights_a.view(ca, ea.dtype)[tuple(slice(lo - o, h - o) for lo, h, o in zip(low, high, ca.offsets))]
        view_b = weights_b.view(cb, eb.dtype)[tuple(slice(lo - o, h - o) for lo, h, o in zip(low, high, cb.offsets))]
        shape = tuple(h - lo for lo, h in zip(low, high))
        for tile in _tiles(shape, TILE_ELEMENTS):
            _compare_tile(view_a[tile], view_b[tile], stats)
    return stats


def _compare_tile(x: torch.Tensor, y: torch.Tensor, stats: _Stats) -> None:
    """Add one tile's differences to ``stats`` (copies at most a few tiles' worth of memory)."""
    import torch

    wide = torch.complex128 if x.is_complex() or y.is_complex() else torch.float64
    if x.dtype == y.dtype:
        bits = _bits_dtype(x.element_size())
        differ = x.view(bits) != y.view(bits)
    else:
        xw, yw = x.to(wide), y.to(wide)
        differ = (xw != yw) & ~(torch.isnan(xw) & torch.isnan(yw))
    count = int(differ.sum())
    if not count:
        return
    xs, ys = x[differ].to(wide), y[differ].to(wide)
    finite = torch.isfinite(xs) & torch.isfinite(ys)
    stats.changed += count
    stats.nonfinite += count - int(finite.sum())
    xs, ys = xs[finite], ys[finite]
    if not xs.numel():
        return
    delta = (xs - ys).abs()
    scale = torch.maximum(xs.abs(), ys.abs())
    # Both sides zero (0.0 vs -0.0): bits differ, the values do not.
    rel = torch.where(scale > 0, delta / torch.where(scale > 0, scale, 1.0), 0.0)
    stats.max_abs = max(stats.max_abs or 0.0, float(delta.max()))
    stats.max_rel = max(stats.max_rel or 0.0, float(rel.max()))


def _bits_dtype(size: int) -> torch.dtype:
    """The integer dtype whose elements are ``size`` bytes, to compare raw bits."""
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
