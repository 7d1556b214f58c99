"""Compare two state descriptions and explain every difference (no torch import).

One comparison serves ``check``/``load`` (checkpoint vs live module), the distributed
planner (checkpoint vs the union of every rank's state) and ``diff`` (checkpoint vs
checkpoint). Both sides are first reduced to a :class:`StateSpec`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from manifest_ckpt.comparison.remap import apply_remap
from manifest_ckpt.comparison.report import Problem, Report, sort_problems
from manifest_ckpt.errors import PatternError
from manifest_ckpt.format.dtypes import PACKED, describe
from manifest_ckpt.format.manifest import Manifest

# The "dtype" of a module's extra-state key (``get_extra_state``): compared by key only,
# so missing, unexpected and the allow policies treat it as torch's strict load does.
EXTRA_STATE = "extra_state"


@dataclass(frozen=True)
class TensorSpec:
    """What a key holds: dtype, shape, and the module path that owns it."""

    dtype: str
    shape: tuple[int, ...]
    owner: str

    def describe(self) -> str:
        return "extra state" if self.dtype == EXTRA_STATE else describe(self.dtype, self.shape)


def owner_of(key: str) -> str:
    """The module path that owns a state-dict key (``""`` for the root)."""
    return key.rpartition(".")[0]


@dataclass(frozen=True)
class StateSpec:
    """A state dict's structure: every key (aliases included), ties and module classes."""

    tensors: Mapping[str, TensorSpec]
    aliases: Mapping[str, str] = field(default_factory=dict)
    classes: Mapping[str, str | None] | None = None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> StateSpec:
        """The state-dict keys a checkpoint holds: its tensors (aliases included) and extra-state keys.

        Tensors that hold parts of extra state are not keys of their own.
        """
        tensors = {}
        parts = manifest.extra_state_refs() if manifest.extra_state else set()
        for key in manifest.keys():
            if key in parts:
                continue
            entry = manifest.entry(key)
            tensors[key] = TensorSpec(entry.dtype, entry.shape, owner_of(key))
        for key in manifest.extra_state:
            tensors[key] = TensorSpec(EXTRA_STATE, (), owner_of(key))
        classes = None if manifest.modules is None else {p: m.cls for p, m in manifest.modules.items()}
        return cls(tensors, dict(manifest.aliases), classes)

    def canonical(self, key: str) -> str:
        return self.aliases.get(key, key)

    def renamed(self, names: Mapping[str, str]) -> StateSpec:
        """The same state with keys renamed by ``{old: new}``; aliases and owners' classes follow."""
        if all(old == new for old, new in names.items()):
            return self
        tensors = {names[k]: TensorSpec(s.dtype, s.shape, owner_of(names[k])) for k, s in self.tensors.items()}
        aliases = {names[a]: names[t] for a, t in self.aliases.items()}
        classes = None
        if self.classes is not None:
            # A renamed key's new owner is the module that owned it before: without this, the
            # class check looks classes up under new paths and silently passes after a remap.
            moved: dict[str, str | None] = {}
            for old in self.tensors:
                moved.setdefault(owner_of(names[old]), self.classes.get(owner_of(old)))
            classes = {**self.classes, **moved}
        return StateSpec(tensors, aliases, classes)


@dataclass(frozen=True)
class Comparison:
    """The report plus what the policies decided, for ``load`` to act on."""

    report: Report
    allowed_missing: list[str]
    skipped: list[str]
    cast: list[str]


def compile_patterns(patterns: Iterable[str] | str, argument: str) -> re.Pattern[str] | None:
    """One ``re.fullmatch``-able pattern for a policy argument's patterns (None for none).

    A single string is one pattern (not a sequence of one-character patterns).

    Raises:
        PatternError: a pattern is not a string or not a valid regular expression, naming
            the argument and the pattern.
    """
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
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


def compare(
    checkpoint: StateSpec,
    module: StateSpec,
    *,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    strict: bool = True,
    cast: bool = False,
    check_classes: bool = True,
) -> Comparison:
    """List every difference between the (already remapped) checkpoint and the module.

    Args:
        allow_missing: patterns (``re.fullmatch``) of module keys the checkpoint may lack.
        allow_unexpected: patterns of checkpoint keys the module may lack; they are skipped.
        strict: when False, every missing and unexpected key is allowed (as in torch).
        cast: when True, dtype differences are accepted and listed for casting.
        check_classes: compare layer classes of modules owning matching keys.
    """
    missing_ok = compile_patterns(allow_missing, "allow_missing")
    unexpected_ok = compile_patterns(allow_unexpected, "allow_unexpected")
    problems: list[Problem] = []
    allowed_missing: list[str] = []
    skipped: list[str] = []
    to_cast: list[str] = []

    # One pass per side with plain dict lookups: check and load run this on 100,000 keys.
    wanted, stored = module.tensors, checkpoint.tensors
    missing = {}
    common = []
    mismatched = []
    for key, want in wanted.items():
        have = stored.get(key)
        if have is not None:
            common.append(key)
            if want.shape != have.shape or want.dtype != have.dtype:
                mismatched.append((key, want, have))
        elif not strict or (missing_ok and missing_ok.fullmatch(key)):
            allowed_missing.append(key)
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
            else:
                unexpected[key] = have
                problems.append(Problem("unexpected", key, None, have.describe()))

    for key, want, have in mismatched:
        if want.shape != have.shape:
            problems.append(Problem("shape", key, want.describe(), have.describe()))
        elif cast and not _uncastable(have.dtype, want.dtype):
            to_cast.append(key)
        else:
            problems.append(Problem("dtype", key, want.describe(), have.describe()))

    if check_classes and checkpoint.classes is not None and module.classes is not None:
        owners = sorted({owner_of(k) for k in common})
        for path in owners:
            want_cls, have_cls = module.classes.get(path), checkpoint.classes.get(path)
            if want_cls and have_cls and not same_class(want_cls, have_cls):
                problems.append(Problem("class", path, want_cls, have_cls))

    # Only a key that is an alias, or the target of one, on either side can be in a tie group
    # of more than one key; every other key is "not tied" on both sides and cannot differ.
    tied = {k for spec in (checkpoint, module) for pair in spec.aliases.items() for k in pair}
    if tied:
        problems += _tie_problems(checkpoint, module, [k for k in common if k in tied])
    hints: list[str] = []
    remap = None
    if missing and unexpected:
        remap, hints = suggest_remap(checkpoint, module, unexpected, missing)
    report = Report(sort_problems(problems), hints, remap, checked=len(common))
    return Comparison(report, allowed_missing, skipped, to_cast)


def _uncastable(source: str, target: str) -> bool:
    """Casts ``cast=True`` never makes.

    A complex value cast to a real dtype loses its imaginary part; packed 4-bit floats
    (``float4_e2m1fn_x2``) have no conversion kernel in torch, to or from anything.
    """
    if source in PACKED or target in PACKED:
        return True
    return source.startswith("complex") and not target.startswith("complex")


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


def _tie_problems(checkpoint: StateSpec, module: StateSpec, common: list[str]) -> list[Problem]:
    """Keys whose tie group differs between the two sides (tied on one, separate on the other).

    A tie counted once: the group's lead (its stored key) is not reported, its partners are.
    """
    common_set = set(common)

    def groups(spec: StateSpec) -> tuple[dict[str, frozenset[str]], dict[str, str]]:
        members: dict[str, set[str]] = defaultdict(set)
        for key in common:
            members[spec.canonical(key)].add(key)
        group, lead = {}, {}
        for canon, keys in members.items():
            frozen = frozenset(keys)
            head = canon if canon in common_set else min(keys)
            for key in keys:
                group[key], lead[key] = frozen, head
        return group, lead

    group_c, lead_c = groups(checkpoint)
    group_m, lead_m = groups(module)

    def tie_text(group: frozenset[str], head: str, key: str) -> str:
        if len(group) == 1:
            return "not tied"
        return f"tied to {head}" if head != key else "tied to " + ", ".join(sorted(group - {key}))

    problems = []
    for key in sorted(common):
        if group_c[key] != group_m[key] and not (lead_c[key] == key and lead_m[key] == key):
            problems.append(
                Problem("alias", key, tie_text(group_m[key], lead_m[key], key), tie_text(group_c[key], lead_c[key], key))
            )
    return problems


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
