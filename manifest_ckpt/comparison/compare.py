"""Compare two state descriptions and explain every difference (no torch import).

One comparison serves ``check``/``load`` (checkpoint vs live module), the distributed
planner (checkpoint vs the union of every rank's state) and ``diff`` (checkpoint vs
checkpoint). Both sides are first reduced to a :class:`StateSpec`.
"""

from __future__ import annotations

import functools
import operator
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from manifest_ckpt.comparison.hints import cast_effect, problem_hints, uncastable
from manifest_ckpt.comparison.remap import apply_remap
from manifest_ckpt.comparison.report import Allowance, Problem, Report, sort_allowances, sort_problems
from manifest_ckpt.errors import PatternError
from manifest_ckpt.format.dtypes import describe
from manifest_ckpt.format.manifest import Manifest, json_entries, json_modules

# The "dtype" of a module's extra-state key (``get_extra_state``): compared by key only,
# so missing, unexpected and the allow policies treat it as torch's strict load does.
EXTRA_STATE = "extra_state"


class TensorSpec(NamedTuple):
    """What a key holds: dtype, shape, the module path that owns it, and (if known) its digest.

    The digest is known for a checkpoint's tensors; two keys with equal dtype and digest hold
    equal bits, which is what lets separate copies load into one tied tensor. A named tuple,
    not a dataclass: check builds one per key on each side, 200,000 for a mixture-of-experts
    model, and a tuple is built several times faster.
    """

    dtype: str
    shape: tuple[int, ...]
    owner: str
    digest: str | None = None

    def describe(self) -> str:
        return "extra state" if self.dtype == EXTRA_STATE else describe(self.dtype, self.shape)


# TensorSpec((dtype, shape, owner, digest)) without the named tuple's Python-level __new__.
new_spec: Callable[[tuple[str, tuple[int, ...], str, str | None]], TensorSpec] = functools.partial(
    tuple.__new__, TensorSpec
)


def owner_of(key: str) -> str:
    """The module path that owns a state-dict key (``""`` for the root)."""
    return key.rpartition(".")[0]


@dataclass(frozen=True)
class StateSpec:
    """A state dict's structure: every key (aliases included), ties, module classes and versions."""

    tensors: Mapping[str, TensorSpec]
    aliases: Mapping[str, str] = field(default_factory=dict)
    classes: Mapping[str, str | None] | None = None
    versions: Mapping[str, int | None] | None = None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> StateSpec:
        """The state-dict keys a checkpoint holds: its tensors (aliases included) and extra-state keys.

        Tensors that hold parts of extra state are not keys of their own.
        """
        parts = manifest.extra_state_refs() if manifest.extra_state else set()
        keys = [k for k in manifest.keys() if k not in parts] if parts else manifest.keys()
        aliases = manifest.aliases
        entries = json_entries(manifest.tensors)
        if entries is not None:  # read from JSON: no TensorEntry built for 100,000 keys
            rows = [entries[aliases.get(k, k)] for k in keys] if aliases else list(map(entries.__getitem__, keys))
            spec = new_spec
            tensors = {k: spec((t["dtype"], tuple(t["shape"]), k.rpartition(".")[0], t["digest"])) for k, t in zip(keys, rows)}
        else:
            tensors = {}
            for key in keys:
                entry = manifest.entry(key)
                tensors[key] = TensorSpec(entry.dtype, entry.shape, owner_of(key), entry.digest)
        for key in manifest.extra_state:
            tensors[key] = TensorSpec(EXTRA_STATE, (), owner_of(key))
        if manifest.modules is None:
            return cls(tensors, dict(aliases))
        modules = json_modules(manifest.modules)
        if modules is not None:
            classes = {p: m["class"] for p, m in modules.items()}
            versions = {p: m["version"] for p, m in modules.items()}
        else:
            classes = {p: m.cls for p, m in manifest.modules.items()}
            versions = {p: m.version for p, m in manifest.modules.items()}
        return cls(tensors, dict(aliases), classes, versions)

    def canonical(self, key: str) -> str:
        return self.aliases.get(key, key)

    def renamed(self, names: Mapping[str, str]) -> StateSpec:
        """The same state with keys renamed by ``{old: new}``; aliases and owners' classes follow."""
        if all(map(operator.eq, names, names.values())):
            return self
        tensors = {
            names[k]: TensorSpec(s.dtype, s.shape, owner_of(names[k]), s.digest) for k, s in self.tensors.items()
        }
        aliases = {names[a]: names[t] for a, t in self.aliases.items()}
        return StateSpec(tensors, aliases, self._moved(self.classes, names), self._moved(self.versions, names))

    def _moved(self, by_path: Mapping[str, _T] | None, names: Mapping[str, str]) -> dict[str, _T] | None:
        """A per-module mapping (class, version) extended to the renamed keys' new owners.

        A renamed key's new owner is the module that owned it before: without this, the class
        check looks classes up under new paths and silently passes after a remap.
        """
        if by_path is None:
            return None
        moved: dict[str, _T] = {}
        for old in self.tensors:
            if owner_of(old) in by_path:
                moved.setdefault(owner_of(names[old]), by_path[owner_of(old)])
        return {**by_path, **moved}


_T = TypeVar("_T")


@dataclass(frozen=True)
class Comparison:
    """The report plus what the policies decided, for ``load`` to act on.

    Attributes:
        allowed_missing: module keys the checkpoint lacks, allowed by policy (left as they are).
        skipped: checkpoint keys the module lacks, allowed by policy (not loaded).
        cast: keys whose values are converted to the module's dtype.
        tie_filled: ``{module key: partner}`` for keys the checkpoint lacks whose tie partner
            in the module is loaded (so they are loaded too, through the shared tensor).
        untied: module keys loaded from a checkpoint tie the module does not have (``untie=True``).
        discarded: checkpoint keys whose different values were dropped for a module tie (``tie=True``).
    """

    report: Report
    allowed_missing: list[str]
    skipped: list[str]
    cast: list[str]
    tie_filled: dict[str, str] = field(default_factory=dict)
    untied: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)


def _pattern_list(patterns: Iterable[str] | str) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def compile_patterns(patterns: Iterable[str] | str, argument: str) -> re.Pattern[str] | None:
    """One ``re.fullmatch``-able pattern for a policy argument's patterns (None for none).

    A single string is one pattern (not a sequence of one-character patterns).

    Raises:
        PatternError: a pattern is not a string or not a valid regular expression, naming
            the argument and the pattern.
    """
    pats = _pattern_list(patterns)
    for p in pats:
        if not isinstance(p, str):
            raise PatternError(
                f"{argument}: {p!r} is a {type(p).__name__}; give regular expressions as strings", argument=argument,
                pattern=repr(p),
            )
        try:
            re.compile(p)
        except re.error as exc:
            raise PatternError(
                f"{argument}: {p!r} is not a valid regular expression ({exc}); escape literal characters "
                f"with re.escape (for example {re.escape(p)!r}) or fix the pattern",
                argument=argument,
                pattern=p,
            ) from None
    return re.compile("|".join(f"(?:{p})" for p in pats)) if pats else None


def _matching(patterns: list[str], key: str) -> str:
    """The first of ``patterns`` that fullmatches ``key`` (for the report)."""
    return next((p for p in patterns if re.fullmatch(p, key)), patterns[0])


def compare(
    checkpoint: StateSpec,
    module: StateSpec,
    *,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    strict: bool = True,
    cast: bool = False,
    check_classes: bool = True,
    untie: bool = False,
    tie: bool = False,
    satisfy_ties: bool = True,
) -> Comparison:
    """List every difference between the (already remapped) checkpoint and the module.

    Every difference a policy lets through is listed in ``report.allowed`` with the policy.

    Args:
        allow_missing: patterns (``re.fullmatch``) of module keys the checkpoint may lack.
        allow_unexpected: patterns of checkpoint keys the module may lack; they are skipped.
        strict: when False, every missing and unexpected key is allowed (as in torch).
        cast: when True, dtype differences are accepted and listed for casting.
        check_classes: compare layer classes of modules owning matching keys (when False,
            differences are still listed, as allowed).
        untie: a checkpoint tie may load into module tensors that are separate (each gets
            a copy of the stored value).
        tie: separate checkpoint tensors with different values may load into one tied module
            tensor: the tie's first key (module order) that the checkpoint holds gives the
            value, the other keys' values are discarded.
        satisfy_ties: module keys the checkpoint lacks are satisfied by a tie partner it has,
            and separate checkpoint copies with equal digests satisfy a module tie. ``diff``
            turns this off: there both sides are checkpoints and any difference counts.
    """
    missing_pats = _pattern_list(allow_missing)
    unexpected_pats = _pattern_list(allow_unexpected)
    missing_ok = compile_patterns(missing_pats, "allow_missing")
    unexpected_ok = compile_patterns(unexpected_pats, "allow_unexpected")
    problems: list[Problem] = []
    allowed: list[Allowance] = []
    allowed_missing: list[str] = []
    skipped: list[str] = []
    to_cast: list[str] = []

    # One pass per side with plain dict lookups: check and load run this on 100,000 keys.
    wanted, stored = module.tensors, checkpoint.tensors
    tie_filled = _tie_partners(module, stored) if satisfy_ties and module.aliases else {}
    missing = {}
    common = []
    mismatched = []
    for key, want in wanted.items():
        have = stored.get(key)
        if have is not None:
            common.append(key)
            if want.shape != have.shape or want.dtype != have.dtype:
                mismatched.append((key, want, have))
        elif key in tie_filled:
            allowed.append(
                Allowance("missing", key, "tie partner", f"tied to {tie_filled[key]} in the module; loaded from it")
            )
        elif not strict or (missing_ok and missing_ok.fullmatch(key)):
            allowed_missing.append(key)
            by = "strict=False" if not strict else f"allow_missing {_matching(missing_pats, key)}"
            allowed.append(Allowance("missing", key, by, "not in the checkpoint; keeps its current value"))
        else:
            missing[key] = want
            problems.append(Problem("missing", key, want.describe(), None))
    unexpected = {}
    if len(common) != len(stored):
        for key, have in stored.items():
            if key in wanted:
                continue
            if not strict or (unexpected_ok and unexpected_ok.fullmatch(key)):
                skipped.append(key)
                by = "strict=False" if not strict else f"allow_unexpected {_matching(unexpected_pats, key)}"
                allowed.append(Allowance("unexpected", key, by, "not in the module; not loaded"))
            else:
                unexpected[key] = have
                problems.append(Problem("unexpected", key, None, have.describe()))

    dtype_pairs = {}
    for key, want, have in mismatched:
        if want.shape != have.shape:
            problems.append(Problem("shape", key, want.describe(), have.describe()))
        elif cast and uncastable(have.dtype, want.dtype) is None:
            to_cast.append(key)
            effect = cast_effect(have.dtype, want.dtype)
            allowed.append(Allowance("dtype", key, "cast=True", f"{have.describe()} -> {want.dtype}: {effect}"))
        else:
            dtype_pairs[key] = (have.dtype, want.dtype)
            problems.append(Problem("dtype", key, want.describe(), have.describe()))

    # Equal class and version tables (a module against its own checkpoint) differ for no owner.
    if (
        checkpoint.classes is not None
        and module.classes is not None
        and (checkpoint.classes != module.classes or checkpoint.versions != module.versions)
    ):
        owners = sorted({owner_of(k) for k in common})
        for path in owners:
            want_cls, have_cls = module.classes.get(path), checkpoint.classes.get(path)
            if want_cls and have_cls and not same_class(want_cls, have_cls):
                if check_classes:
                    problems.append(Problem("class", path, want_cls, have_cls))
                else:
                    allowed.append(Allowance(
                        "class", path, "check_classes=False", f"checkpoint from {have_cls}, loaded into {want_cls}"
                    ))
        allowed += _version_notes(checkpoint, module, owners)

    # Only a key that is an alias, or the target of one, on either side can be in a tie group
    # of more than one key; every other key is "not tied" on both sides and cannot differ.
    ties = _Ties()
    if checkpoint.aliases or module.aliases:
        ties = _compare_ties(checkpoint, module, common, untie=untie, tie=tie, equal_digests=satisfy_ties)
        problems += ties.problems
        allowed += ties.allowed
    hints: list[str] = []
    remap = None
    # A tie-filled key may still be where a renamed checkpoint key belongs (a renamed tied
    # head): offered to the remap search too, so the hint names the rename.
    targets = {**missing, **{k: wanted[k] for k in tie_filled}}
    if targets and unexpected:
        remap, hints = suggest_remap(checkpoint, module, unexpected, targets)
    explained = _remapped(remap, unexpected) if remap else {}
    hints += problem_hints(
        problems,
        explained_missing=explained.values(),
        explained_unexpected=explained,
        dtype_pairs=dtype_pairs,
        module_keys=wanted,
        checkpoint_keys=stored,
    )
    report = Report(sort_problems(problems), hints, remap, checked=len(common), allowed=sort_allowances(allowed))
    return Comparison(report, allowed_missing, skipped, to_cast, tie_filled, ties.untied, ties.discarded)


def _remapped(remap: Mapping[str, str], unexpected: Mapping[str, TensorSpec]) -> dict[str, str]:
    """``{unexpected key: its new name}`` under a suggested remap (keys it renames only)."""
    try:
        names = apply_remap(list(unexpected), remap)
    except Exception:  # noqa: BLE001 - a suggestion that cannot be applied explains nothing
        return {}
    return {k: new for k, new in names.items() if new != k}


def _tie_partners(module: StateSpec, stored: Mapping[str, TensorSpec]) -> dict[str, str]:
    """``{module key: partner}`` for each key the checkpoint lacks whose module tie has a key it holds.

    The partner is the tie's first key (module order) in the checkpoint: the key ``load``
    copies from, so the shared tensor (and with it the lacking key) receives its value.
    """
    tied = {k for pair in module.aliases.items() for k in pair}
    groups: dict[str, list[str]] = defaultdict(list)
    for key in module.tensors:
        if key in tied:
            groups[module.canonical(key)].append(key)
    out: dict[str, str] = {}
    for members in groups.values():
        present = [k for k in members if k in stored]
        if present:
            out.update((k, present[0]) for k in members if k not in stored)
    return out


def same_class(a: str, b: str) -> bool:
    """Whether two qualified class names name the same class.

    A class defined in a script is recorded as ``__main__.Name``; the same class imported from
    its module elsewhere is ``pkg.module.Name``. Those match on the qualified name alone.
    """
    if a == b:
        return True
    for main, other in ((a, b), (b, a)):
        if main.startswith("__main__."):
            return other.endswith("." + main.removeprefix("__main__."))
    return False


def _version_notes(checkpoint: StateSpec, module: StateSpec, owners: Iterable[str]) -> list[Allowance]:
    """Modules whose ``_version`` differs between the checkpoint and the module: reported, never silent.

    torch passes the stored version to the module's ``_load_from_state_dict``, whose
    migrations (BatchNorm adding ``num_batches_tracked``) depend on it.
    """
    if checkpoint.versions is None or module.versions is None:
        return []
    notes = []
    for path in owners:
        have, want = checkpoint.versions.get(path), module.versions.get(path)
        if have is not None and want is not None and have != want:
            cls = module.classes.get(path) if module.classes else None
            detail = f"saved at _version {have}, the module is at _version {want}: {version_migration(cls, have, want)}"
            notes.append(Allowance("version", path, "module version", detail))
    return notes


def version_migration(cls: str | None, have: int, want: int) -> str:
    """What changes between two ``_version`` values of a module class, as far as torch defines it."""
    norm = cls is not None and cls.startswith(("torch.nn.modules.batchnorm.", "torch.nn.modules.instancenorm."))
    if norm and have < 2 <= want:
        return (
            "torch's norm-layer migration (versions before 2, running stats tracked) sets num_batches_tracked to 0 "
            "when the checkpoint lacks it; every other tensor is loaded as stored"
        )
    if have > want:
        return "the checkpoint is newer than the module's code; tensors are loaded as stored, check the layout"
    return f"no layout change is known for {cls or 'this module'}; tensors are loaded as stored"


@dataclass
class _Ties:
    problems: list[Problem] = field(default_factory=list)
    allowed: list[Allowance] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)


def _groups(spec: StateSpec, keys: list[str]) -> dict[str, list[str]]:
    """``{key: its tie group among keys}``, each group in the order of ``keys``."""
    members: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        members[spec.canonical(key)].append(key)
    return {key: group for group in members.values() for key in group}


def _tie_text(group: list[str], lead: str, key: str) -> str:
    if len(group) == 1:
        return "not tied"
    return f"tied to {lead}" if lead != key else "tied to " + ", ".join(sorted(set(group) - {key}))


def _compare_ties(
    checkpoint: StateSpec, module: StateSpec, common: list[str], *, untie: bool, tie: bool, equal_digests: bool
) -> _Ties:
    """Keys whose tie group differs between the two sides, and the opt-ins that allow it.

    Module ties: each tie group's first key (module order) in the checkpoint is its lead; a
    partner whose checkpoint value is another stored tensor is a problem, unless the digests
    are equal (same bits) or ``tie``. Checkpoint ties: the group's stored key (or first key)
    is its lead; a partner the module keeps separate is a problem, unless ``untie``. A tie is
    counted once: the lead is not reported, its partners are.
    """
    tied = {k for spec in (checkpoint, module) for pair in spec.aliases.items() for k in pair}
    keys = [k for k in common if k in tied]
    in_module, in_checkpoint = _groups(module, keys), _groups(checkpoint, keys)
    keyset = set(keys)

    def ckpt_lead(key: str) -> str:
        canon = checkpoint.canonical(key)
        return canon if canon in keyset else min(in_checkpoint[key])

    out = _Ties()
    reported: set[str] = set()
    for key in keys:
        group = in_module[key]
        lead = group[0]
        if key == lead or checkpoint.canonical(key) == checkpoint.canonical(lead):
            continue
        a, b = checkpoint.tensors[lead], checkpoint.tensors[key]
        if equal_digests and a.digest is not None and a.digest == b.digest and a.dtype == b.dtype:
            out.allowed.append(Allowance(
                "alias", key, "equal digests",
                f"stored apart from {lead} with the same bits; the module ties them, loaded once",
            ))
        elif tie:
            out.discarded.append(key)
            out.allowed.append(Allowance(
                "alias", key, "tie=True", f"tied to {lead} in the module; {lead}'s stored value is loaded, this key's is discarded"
            ))
        else:
            reported.add(key)
            out.problems.append(
                Problem("alias", key, f"tied to {lead}", _tie_text(in_checkpoint[key], ckpt_lead(key), key))
            )
    for key in keys:
        lead = ckpt_lead(key)
        if key == lead or key in reported or module.canonical(key) == module.canonical(lead):
            continue
        if untie:
            out.untied.append(key)
            out.allowed.append(Allowance(
                "alias", key, "untie=True",
                f"tied to {lead} in the checkpoint, separate in the module: gets its own copy of the stored value",
            ))
        else:
            out.problems.append(
                Problem("alias", key, _tie_text(in_module[key], in_module[key][0], key), f"tied to {lead}")
            )
    return out


_MAX_CANDIDATES = 16
_MAX_RULES_TRIED = 32


def _signature(spec: TensorSpec, key: str, classes: Mapping[str, str | None] | None) -> tuple[object, ...]:
    cls = classes.get(spec.owner) if classes else None
    return (spec.shape, key.rpartition(".")[2], cls)


def suggest_remap(
    checkpoint: StateSpec,
    module: StateSpec,
    unexpected: Mapping[str, TensorSpec],
    missing: Mapping[str, TensorSpec],
) -> tuple[dict[str, str] | None, list[str]]:
    """Find renaming rules that pair unexpected checkpoint keys with missing module keys.

    First rules: prefix rules (``module.`` from DDP, ``model.`` from Lightning, any renamed
    subtree) and segment rules (one module name renamed wherever it occurs, as a refactoring
    does), chosen greedily by how many keys they explain and accepted only when every
    checkpoint key they touch lands on a missing key of the same shape; then one-to-one
    pairs by shape, leaf name and class. The result is simulated with ``apply_remap``
    before it is suggested.
    """
    rules: dict[str, str] = {}
    stories: list[str] = []
    pairs: dict[str, str] = {}
    u_left, m_left = dict(unexpected), dict(missing)

    def fits(u: str, m: str) -> bool:
        a, b = u_left.get(u), m_left.get(m)
        # Shapes only: a dtype difference is its own problem (and cast= its own opt-in),
        # it must not hide a rename.
        return a is not None and b is not None and a.shape == b.shape

    while u_left and m_left:
        by_suffix: dict[str, list[str]] = defaultdict(list)
        for m in m_left:
            for i in _dot_splits(m):
                by_suffix[m[i:]].append(m[:i])
        support: dict[tuple[str, str, str], int] = defaultdict(int)
        for u in u_left:
            for i in _dot_splits(u):
                candidates = by_suffix.get(u[i:], ())
                if len(candidates) > _MAX_CANDIDATES:
                    continue  # a short common suffix such as "weight" says nothing
                for b in candidates:
                    if u[:i] != b and fits(u, b + u[i:]):
                        support[("prefix", u[:i], b)] += 1
        for rule, n in _segment_support(u_left, m_left, fits).items():
            support[rule] += n
        best = None
        # Most keys explained first: a name renamed everywhere (segment rule) explains all its
        # keys at once, where prefix rules, one per place, could pair identical twin layers
        # crosswise. At equal support the prefix rule reads better.
        ranked = sorted(
            support.items(), key=lambda kv: (-kv[1], kv[0][0] != "prefix", len(kv[0][1]) + len(kv[0][2]), kv[0])
        )
        for (kind, a, b), n in ranked[:_MAX_RULES_TRIED]:
            rename = _rule(kind, a, b)
            touched = {k: new for k in checkpoint.tensors if (new := rename(k)) != k}
            distinct = len(set(touched.values())) == len(touched)
            if n >= 2 and distinct and all(fits(k, new) for k, new in touched.items()):
                best = (kind, a, b, touched)
                break
        if best is None:
            break
        kind, a, b, touched = best
        if kind == "prefix":
            rules["^" + re.escape(a)] = b
            stories.append(f"checkpoint keys {_prefix_story('^' + re.escape(a), b)}")
        else:
            rules[_SEGMENT.format(re.escape(a))] = b.replace("\\", "\\\\")
            stories.append(f"checkpoint keys name a module {a!r} wherever the module names it {b!r}")
        for k, new in touched.items():
            pairs[k] = new
            del u_left[k], m_left[new]

    groups_u: dict[tuple[object, ...], list[str]] = defaultdict(list)
    groups_m: dict[tuple[object, ...], list[str]] = defaultdict(list)
    for u, spec in u_left.items():
        groups_u[_signature(spec, u, checkpoint.classes)].append(u)
    for m, spec in m_left.items():
        groups_m[_signature(spec, m, module.classes)].append(m)
    singles: dict[str, str] = {}
    for sig, us in groups_u.items():
        ms = groups_m.get(sig, [])
        if len(us) == 1 and len(ms) == 1:
            singles[us[0]] = ms[0]
    if not pairs and not singles:
        return None, []
    pairs.update(singles)

    remap = dict(rules)
    remap.update({"^" + re.escape(u) + "$": m for u, m in singles.items()})
    if not _simulates(checkpoint, remap, pairs):
        remap = {"^" + re.escape(u) + "$": m for u, m in pairs.items()}
    hints = list(stories)
    for u, m in singles.items():
        hints.append(f"checkpoint key {u!r} pairs one-to-one with {m!r} (same shape, name and layer class)")
    left = len(unexpected) - len(pairs)
    tail = f" ({left} unexpected keys stay unexplained)" if left else ""
    hints.append(f"load with remap={remap!r}{tail}")
    return remap, hints


# A whole dot-separated segment of a key: not preceded or followed by anything but a dot.
_SEGMENT = r"(?<![^.]){}(?![^.])"


def _rule(kind: str, a: str, b: str) -> Callable[[str], str]:
    """The renaming a candidate rule makes: prefix ``a`` -> ``b``, or segment ``a`` -> ``b``."""
    if kind == "prefix":
        return lambda key: b + key[len(a) :] if key.startswith(a) else key
    return lambda key: ".".join(b if s == a else s for s in key.split("."))


def _segment_support(
    u_left: Mapping[str, TensorSpec], m_left: Mapping[str, TensorSpec], fits: Callable[[str, str], bool]
) -> dict[tuple[str, str, str], int]:
    """Count, for each segment rename ``a -> b``, the unexpected keys it would pair.

    A pair supports ``a -> b`` when the keys have the same number of segments and differ
    only where one has ``a`` and the other ``b``. Missing keys are bucketed by segment count,
    leaf name and shape; a crowded bucket says nothing and is skipped (as for prefixes).
    """
    buckets: dict[tuple[object, ...], list[list[str]]] = defaultdict(list)
    for m, spec in m_left.items():
        parts = m.split(".")
        buckets[(len(parts), parts[-1], spec.shape)].append(parts)
    support: dict[tuple[str, str, str], int] = defaultdict(int)
    for u, spec in u_left.items():
        parts = u.split(".")
        candidates = buckets.get((len(parts), parts[-1], spec.shape), [])
        if len(candidates) > _MAX_CANDIDATES:
            continue
        for other in candidates:
            diffs = {(x, y) for x, y in zip(parts, other) if x != y}
            if len(diffs) == 1:
                ((a, b),) = diffs
                if fits(u, ".".join(other)):
                    support[("segment", a, b)] += 1
    return support


def _prefix_story(pattern: str, replacement: str) -> str:
    prefix = re.sub(r"\\(.)", r"\1", pattern[1:])
    if not replacement:
        origin = {"module.": " (saved from DistributedDataParallel?)", "model.": " (saved from Lightning?)"}
        return f"carry the prefix {prefix!r} that the module lacks{origin.get(prefix, '')}"
    if not prefix:
        return f"lack the prefix {replacement!r} that the module has"
    return f"under {prefix!r} match module keys under {replacement!r}"


def _dot_splits(key: str) -> list[int]:
    """Positions where a key can be split into a prefix ending in '.' and a suffix."""
    return [0] + [i + 1 for i, ch in enumerate(key) if ch == "."]


def _simulates(checkpoint: StateSpec, remap: dict[str, str], pairs: Mapping[str, str]) -> bool:
    try:
        names = apply_remap(checkpoint.tensors, remap)
    except Exception:  # noqa: BLE001 - any failure means "do not suggest this form"
        return False
    return all(names[k] == pairs.get(k, k) for k in checkpoint.tensors)
