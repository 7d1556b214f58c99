"""Key transforms beyond renames: stack, unstack, concatenate, split, transpose (pure, no torch).

A transform rewrites the checkpoint's key view after ``remap``: several keys become one
(``Stack``, ``Concatenate``), one becomes several (``Unstack``, ``Split``), or a key's
dimensions are swapped (``Transpose``); ``Rename`` moves keys like a remap rule inside a rule
set. Rules are declarative: keys are written as templates such as
``"{prefix}.experts.{index}.w1.weight"`` where ``{index}`` matches a number and any other
``{name}`` matches one or more characters; a target template reuses the source's names. So
every rule has an exact inverse (:func:`inverse`), which ``export_hf`` runs to write the
layout back.

:func:`simulate` applies rules to ``(dtype, shape)`` specs only: the transformed view is
compared with the module before any byte is read, and each produced key is a :class:`Node`
saying how to build it (``manifest_ckpt.assemble`` does, with torch). A rule that matches
no key, an incomplete or ragged group, or a collision is a :class:`TransformError` naming
the key.

:data:`RULE_SETS` holds transformers 5's mixture-of-experts layouts (its
``conversion_mapping``: ``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from manifest_ckpt.comparison.compare import StateSpec, TensorSpec, owner_of
from manifest_ckpt.errors import TransformError

__all__ = [
    "RULE_SETS",
    "Concatenate",
    "Node",
    "Rename",
    "Rule",
    "Split",
    "Stack",
    "Transpose",
    "Transforms",
    "Unstack",
    "choose_rule_set",
    "inverse",
    "parse_transforms_arg",
    "resolve_transforms",
    "rule_from_dict",
    "simulate",
    "transform_spec",
]

Spec = tuple[str, tuple[int, ...]]  # (dtype, shape)
_PLACEHOLDER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


# --- templates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    text: str
    names: tuple[str, ...]
    regex: re.Pattern[str]

    def format(self, values: Mapping[str, str]) -> str:
        return _PLACEHOLDER.sub(lambda m: values[m[1]], self.text)


def _template(text: str, rule: str) -> _Template:
    if not isinstance(text, str) or not text:
        raise TransformError(f"{rule}: key template {text!r} must be a non-empty string", rule=rule)
    parts, names, pos = [], [], 0
    for m in _PLACEHOLDER.finditer(text):
        parts.append(re.escape(text[pos : m.start()]))
        name = m[1]
        if name in names:
            parts.append(f"(?P={name})")
        else:
            names.append(name)
            parts.append(rf"(?P<{name}>\d+)" if name == "index" else rf"(?P<{name}>.+)")
        pos = m.end()
    parts.append(re.escape(text[pos:]))
    leftover = _PLACEHOLDER.sub("", text)
    if "{" in leftover or "}" in leftover:
        raise TransformError(f"{rule}: key template {text!r} has a brace that is not a {{name}} placeholder", rule=rule)
    return _Template(text, tuple(names), re.compile("".join(parts)))


def _needs(rule: str, source: _Template, target: _Template, *, index: Literal["drop", "add", "keep"]) -> None:
    """Check that the target can be formatted from the source's names (and ``{index}`` as the op needs)."""
    have = set(source.names) - ({"index"} if index == "drop" else set())
    want = set(target.names) - ({"index"} if index == "add" else set())
    if index == "drop" and "index" not in source.names:
        raise TransformError(f"{rule}: the source template {source.text!r} needs an {{index}} placeholder", rule=rule)
    if index == "add" and "index" not in target.names:
        raise TransformError(f"{rule}: the target template {target.text!r} needs an {{index}} placeholder", rule=rule)
    if index == "drop" and "index" in target.names:
        raise TransformError(f"{rule}: the target template {target.text!r} cannot use {{index}}", rule=rule)
    if not want <= have:
        raise TransformError(
            f"{rule}: the target template {target.text!r} uses {sorted(want - have)}, which the source "
            f"template {source.text!r} does not define",
            rule=rule,
        )


# --- the plan: how each key of the view is built --------------------------------------------


@dataclass(frozen=True)
class Node:
    """How a key of the transformed view is built from checkpoint keys.

    ``op`` is ``"source"`` (the checkpoint tensor ``key``), ``"stack"`` / ``"concat"``
    (``parts`` along ``args[0]``), ``"select"`` (index ``args[1]`` of dim ``args[0]``),
    ``"narrow"`` (``args[2]`` elements of dim ``args[0]`` from ``args[1]``) or ``"transpose"``
    (dims ``args[0]`` and ``args[1]``).
    """

    op: Literal["source", "stack", "concat", "select", "narrow", "transpose"]
    dtype: str
    shape: tuple[int, ...]
    parts: tuple[Node, ...] = ()
    args: tuple[int, ...] = ()
    key: str | None = None
    note: str = field(default="", compare=False)

    def sources(self) -> list[str]:
        """The checkpoint keys this node reads, in order."""
        if self.op == "source":
            assert self.key is not None
            return [self.key]
        return [k for p in self.parts for k in p.sources()]

    def describe(self) -> str:
        text = f"{self.dtype} {list(self.shape)}"
        return f"{text} ({self.note})" if self.note else text


def _leaf(key: str, spec: Spec) -> Node:
    return Node("source", spec[0], tuple(spec[1]), key=key)


# --- rules ----------------------------------------------------------------------------------


class Rule:
    """Base of the transform rules; each is a frozen dataclass with ``apply`` and ``inverse``."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def apply(self, view: dict[str, Node]) -> dict[str, Node]:
        raise NotImplementedError

    def inverse(self) -> Rule:
        raise NotImplementedError

    def _name(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items() if k != 'op')})"


def _no_match(rule: Rule, templates: Iterable[str], view: Mapping[str, Node]) -> TransformError:
    sample = ", ".join(repr(k) for k in list(view)[:5]) + (", ..." if len(view) > 5 else "")
    pats = " / ".join(repr(t) for t in templates)
    return TransformError(
        f"{rule._name()}: {pats} matches no key (keys at that point: {sample}); fix the template or drop the rule",
        rule=rule._name(),
        unmatched=True,
    )


def _rebuild(view: Mapping[str, Node], consumed: set[str], produced: Mapping[str, Node], rule: Rule) -> dict[str, Node]:
    """The view without ``consumed`` keys, with ``produced`` ones; refuses a produced key that already exists."""
    out = {k: n for k, n in view.items() if k not in consumed}
    for key, node in produced.items():
        if key in out:
            raise TransformError(
                f"{rule._name()}: produces {key!r}, which the checkpoint already holds; the rule does not fit "
                "this layout",
                rule=rule._name(),
                key=key,
            )
        out[key] = node
    return out


def _check_dim(rule: Rule, key: str, dim: int, ndim: int) -> None:
    if not 0 <= dim < ndim:
        raise TransformError(
            f"{rule._name()}: {key!r} has {ndim} dimensions, dim {dim} is out of range", rule=rule._name(), key=key
        )


@dataclass(frozen=True)
class Rename(Rule):
    """Rename every key matching ``source`` to ``target`` (templates: ``"{p}.block_sparse_moe.{rest}"``)."""

    source: str
    target: str

    def __post_init__(self) -> None:
        _needs(self._name(), _template(self.source, self._name()), _template(self.target, self._name()), index="keep")

    def to_dict(self) -> dict[str, Any]:
        return {"op": "rename", "source": self.source, "target": self.target}

    def inverse(self) -> Rule:
        return Rename(self.target, self.source)

    def apply(self, view: dict[str, Node]) -> dict[str, Node]:
        src, dst = _template(self.source, ""), _template(self.target, "")
        moved: dict[str, Node] = {}
        for key, node in view.items():
            m = src.regex.fullmatch(key)
            if m is not None:
                moved[key] = node
        if not moved:
            raise _no_match(self, [self.source], view)
        produced = {}
        for key, node in moved.items():
            m = src.regex.fullmatch(key)
            assert m is not None
            produced[dst.format(m.groupdict())] = node
        if len(produced) != len(moved):
            raise TransformError(f"{self._name()}: renames two keys onto one", rule=self._name())
        return _rebuild(view, set(moved), produced, self)


@dataclass(frozen=True)
class Stack(Rule):
    """Stack the keys matching ``source`` (numbered by ``{index}``, 0..n-1) along a new dimension ``dim``."""

    source: str
    target: str
    dim: int = 0

    def __post_init__(self) -> None:
        _needs(self._name(), _template(self.source, self._name()), _template(self.target, self._name()), index="drop")

    def to_dict(self) -> dict[str, Any]:
        return {"op": "stack", "source": self.source, "target": self.target, "dim": self.dim}

    def inverse(self) -> Rule:
        return Unstack(self.target, self.source, self.dim)

    def apply(self, view: dict[str, Node]) -> dict[str, Node]:
        src, dst = _template(self.source, ""), _template(self.target, "")
        groups: dict[str, dict[int, str]] = {}
        for key in view:
            m = src.regex.fullmatch(key)
            if m is not None:
                groups.setdefault(dst.format(m.groupdict()), {})[int(m["index"])] = key
        if not groups:
            raise _no_match(self, [self.source], view)
        produced = {}
        for target, members in groups.items():
            indices = sorted(members)
            if indices != list(range(len(indices))):
                absent = sorted(set(range(indices[-1] + 1)) - set(indices))
                raise TransformError(
                    f"{self._name()}: {target!r} would stack indices {indices}, expected 0..{indices[-1]}: "
                    f"{src.format({**_groups(src, members[indices[0]]), 'index': str(absent[0])})!r} is missing. "
                    "The checkpoint is incomplete or not of this layout.",
                    rule=self._name(),
                    key=target,
                )
            parts = tuple(view[members[i]] for i in indices)
            _same(self, target, [members[i] for i in indices], parts)
            first = parts[0]
            _check_dim(self, target, self.dim, len(first.shape) + 1)
            shape = (*first.shape[:self.dim], len(parts), *first.shape[self.dim:])
            note = f"stack of {len(parts)} keys, indices {indices}"
            produced[target] = Node("stack", first.dtype, shape, parts, (self.dim,), note=note)
        used = {k for members in groups.values() for k in members.values()}
        return _rebuild(view, used, produced, self)


@dataclass(frozen=True)
class Unstack(Rule):
    """Split each key matching ``source`` along ``dim`` into one key per index (``target`` has ``{index}``)."""

    source: str
    target: str
    dim: int = 0

    def __post_init__(self) -> None:
        _needs(self._name(), _template(self.source, self._name()), _template(self.target, self._name()), index="add")

    def to_dict(self) -> dict[str, Any]:
        return {"op": "unstack", "source": self.source, "target": self.target, "dim": self.dim}

    def inverse(self) -> Rule:
        return Stack(self.target, self.source, self.dim)

    def apply(self, view: dict[str, Node]) -> dict[str, Node]:
        src, dst = _template(self.source, ""), _template(self.target, "")
        produced: dict[str, Node] = {}
        used = set()
        for key, node in view.items():
            m = src.regex.fullmatch(key)
            if m is None:
                continue
            _check_dim(self, key, self.dim, len(node.shape))
            shape = node.shape[: self.dim] + node.shape[self.dim + 1 :]
            for i in range(node.shape[self.dim]):
                name = dst.format({**m.groupdict(), "index": str(i)})
                produced[name] = Node("select", node.dtype, shape, (node,), (self.dim, i))
            used.add(key)
        if not used:
            raise _no_match(self, [self.source], view)
        return _rebuild(view, used, produced, self)


@dataclass(frozen=True)
class Concatenate(Rule):
    """Join one key per ``sources`` template, in order, along the existing dimension ``dim``.

    ``sizes``, when given, is each part's length along ``dim`` (checked); the inverse
    :class:`Split` uses it, or equal parts when it is None.
    """

    sources: tuple[str, ...]
    target: str
    dim: int = 0
    sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        if self.sizes is not None:
            object.__setattr__(self, "sizes", tuple(self.sizes))
        if len(self.sources) < 2 or (self.sizes is not None and len(self.sizes) != len(self.sources)):
            raise TransformError(f"{self._name()}: needs two or more sources (and one size per source)", rule=self._name())
        dst = _template(self.target, self._name())
        for s in self.sources:
            _needs(self._name(), _template(s, self._name()), dst, index="keep")

    def to_dict(self) -> dict[str, Any]:
        return {"op": "concat", "sources": list(self.sources), "target": self.target, "dim": self.dim,
                "sizes": None if self.sizes is None else list(self.sizes)}  # fmt: skip

    def inverse(self) -> Rule:
        return Split(self.target, self.sources, self.dim, self.sizes)

    def apply(self, view: dict[str, Node]) -> dict[str, Node]:
        templates = [_template(s, "") for s in self.sources]
        dst = _template(self.target, "")
        groups: dict[str, list[str | None]] = {}
        for key in view:
            for i, t in enumerate(templates):
                m = t.regex.fullmatch(key)
                if m is not None:
                    groups.setdefault(dst.format(m.groupdict()), [None] * len(templates))[i] = key
                    break
        if not groups:
            raise _no_match(self, self.sources, view)
        produced = {}
        for target, members in groups.items():
            absent = [self.sources[i] for i, k in enumerate(members) if k is None]
            if absent:
                raise TransformError(
                    f"{self._name()}: {target!r} lacks its part {absent[0]!r} (found {[k for k in members if k]})",
                    rule=self._name(),
                    key=target,
                )
            keys = [k for k in members if k is not None]
            parts = tuple(view[k] for k in keys)
            first = parts[0]
            _check_dim(self, target, self.dim, len(first.shape))
            shapes = [p.shape[: self.dim] + p.shape[self.dim + 1 :] for p in parts]
            sizes = tuple(p.shape[self.dim] for p in parts)
            if len(set(shapes)) != 1 or len({p.dtype for p in parts}) != 1 or (self.sizes and sizes != self.sizes):
                listing = "; ".join(f"{k!r}: {p.describe()}" for k, p in zip(keys, parts))
                raise TransformError(
                    f"{self._name()}: the parts of {target!r} do not fit together along dim {self.dim}"
                    f"{f' with sizes {list(self.sizes)}' if self.sizes else ''}: {listing}",
                    rule=self._name(),
                    key=target,
                )
            shape = (*first.shape[:self.dim], sum(sizes), *first.shape[self.dim + 1:])
            produced[target] = Node("concat", first.dtype, shape, parts, (self.dim,), note=f"concat of {len(parts)}")
        used = {k for members in groups.values() for k in members if k is not None}
        return _rebuild(view, used, produced, self)


@dataclass(frozen=True)
class Split(Rule):
    """Cut each key matching ``source`` along ``dim`` into one key per ``targets`` template.

    ``sizes`` gives each part's length; None cuts equal parts (the length must divide).
    """

    source: str
    targets: tuple[str, ...]
    dim: int = 0
    sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.sizes is not None:
            object.__setattr__(self, "sizes", tuple(self.sizes))
        if len(self.targets) < 2 or (self.sizes is not None and len(self.sizes) != len(self.targets)):
            raise TransformError(f"{self._name()}: needs two or more targets (and one size per target)", rule=self._name())
        src = _template(self.source, self._name())
        for t in self.targets:
            _needs(self._name(), src, _template(t, self._name()), index="keep")

    def to_dict(self) -> dict[str, Any]:
        return {"op": "split", "source": self.source, "targets": list(self.targets), "dim": self.dim,
                "sizes": None if self.sizes is None else list(self.sizes)}  # fmt: skip

    def inverse(self) -> Rule:
        return Concatenate(self.targets, self.source, self.dim, self.sizes)

    def apply(self, view: dict[str, Node]) -> dict[str, Node]:
        src = _template(self.source, "")
        templates = [_template(t, "") for t in self.targets]
        produced: dict[str, Node] = {}
        used = set()
        for key, node in view.items():
            m = src.regex.fullmatch(key)
            if m is None:
                continue
            _check_dim(self, key, self.dim, len(node.shape))
            length, n = node.shape[self.dim], len(templates)
            sizes = self.sizes if self.sizes is not None else ((length // n,) * n if length % n == 0 else None)
            if sizes is None or sum(sizes) != length:
                raise TransformError(
                    f"{self._name()}: {key!r} ({node.describe()}) has {length} along dim {self.dim}, which does not "
                    f"split into {list(sizes) if sizes else f'{n} equal parts'}",
                    rule=self._name(),
                    key=key,
                )
            start = 0
            for t, size in zip(templates, sizes):
                shape = (*node.shape[:self.dim], size, *node.shape[self.dim + 1:])
                produced[t.format(m.groupdict())] = Node("narrow", node.dtype, shape, (node,), (self.dim, start, size))
                start += size
            used.add(key)
        if not used:
            raise _no_match(self, [self.source], view)
        return _rebuild(view, used, produced, self)


@dataclass(frozen=True)
class Transpose(Rule):
    """Swap dimensions ``dims`` of each key matching ``source``, renamed to ``target`` (default: same key)."""

    source: str
    target: str | None = None
    dims: tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        if len(self.dims) != 2:
            raise TransformError(f"{self._name()}: dims must be two dimensions", rule=self._name())
        src = _template(self.source, self._name())
        _needs(self._name(), src, _template(self.target or self.source, self._name()), index="keep")

    def to_dict(self) -> dict[str, Any]:
        return {"op": "transpose", "source": self.source, "target": self.target, "dims": list(self.dims)}

    def inverse(self) -> Rule:
        return Transpose(self.target or self.source, self.source, self.dims)

    def apply(self, view: dict[str, Node]) -> dict[str, Node]:
        src, dst = _template(self.source, ""), _template(self.target or self.source, "")
        produced: dict[str, Node] = {}
        used = set()
        a, b = self.dims
        for key, node in view.items():
            m = src.regex.fullmatch(key)
            if m is None:
                continue
            for d in (a, b):
                _check_dim(self, key, d, len(node.shape))
            shape = list(node.shape)
            shape[a], shape[b] = shape[b], shape[a]
            produced[dst.format(m.groupdict())] = Node("transpose", node.dtype, tuple(shape), (node,), (a, b))
            used.add(key)
        if not used:
            raise _no_match(self, [self.source], view)
        return _rebuild(view, used, produced, self)


def _groups(template: _Template, key: str) -> dict[str, str]:
    m = template.regex.fullmatch(key)
    return dict(m.groupdict()) if m else {}


def _same(rule: Rule, target: str, keys: Sequence[str], parts: Sequence[Node]) -> None:
    specs = {(p.dtype, p.shape) for p in parts}
    if len(specs) != 1:
        listing = "; ".join(f"{k!r}: {p.describe()}" for k, p in list(zip(keys, parts))[:6])
        raise TransformError(
            f"{rule._name()}: the keys stacked into {target!r} differ in dtype or shape: {listing}",
            rule=rule._name(),
            key=target,
        )


_RULES: Final[dict[str, type[Rule]]] = {
    "rename": Rename, "stack": Stack, "unstack": Unstack, "concat": Concatenate, "split": Split, "transpose": Transpose,
}  # fmt: skip


def rule_from_dict(doc: Mapping[str, Any]) -> Rule:
    """A rule from its ``to_dict()`` form (as recorded in a lineage or written in a JSON rules file).

    Raises:
        TransformError: an unknown ``op`` or bad fields, naming them.
    """
    if not isinstance(doc, Mapping) or doc.get("op") not in _RULES:
        raise TransformError(f"transform {doc!r}: expected an object whose 'op' is one of {sorted(_RULES)}")
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in doc.items() if k != "op"}
    try:
        return _RULES[doc["op"]](**fields)
    except TypeError as exc:
        raise TransformError(f"transform {dict(doc)!r}: {exc}") from None


# --- rule sets ------------------------------------------------------------------------------

_FUSED_MOE = (
    # transformers' qwen2_moe mapping, which it also uses for Qwen3-MoE, DeepSeek-V2/V3, OLMoE...
    Stack("{prefix}.mlp.experts.{index}.gate_proj.weight", "{prefix}.mlp.experts.gate_proj"),
    Stack("{prefix}.mlp.experts.{index}.up_proj.weight", "{prefix}.mlp.experts.up_proj"),
    Concatenate(("{prefix}.mlp.experts.gate_proj", "{prefix}.mlp.experts.up_proj"), "{prefix}.mlp.experts.gate_up_proj", 1),
    Stack("{prefix}.mlp.experts.{index}.down_proj.weight", "{prefix}.mlp.experts.down_proj"),
)

RULE_SETS: Final[Mapping[str, tuple[Rule, ...]]] = {
    "mixtral": (
        Rename("{prefix}.block_sparse_moe.{rest}", "{prefix}.mlp.{rest}"),
        Stack("{prefix}.mlp.experts.{index}.w1.weight", "{prefix}.mlp.experts.w1"),
        Stack("{prefix}.mlp.experts.{index}.w3.weight", "{prefix}.mlp.experts.w3"),
        Concatenate(("{prefix}.mlp.experts.w1", "{prefix}.mlp.experts.w3"), "{prefix}.mlp.experts.gate_up_proj", 1),
        Stack("{prefix}.mlp.experts.{index}.w2.weight", "{prefix}.mlp.experts.down_proj"),
    ),
    "qwen2_moe": _FUSED_MOE,
}
"""Named rule sets: save_pretrained's per-expert keys -> transformers 5's fused expert tensors."""

# The names transformers maps onto these sets (conversion_mapping), accepted as aliases.
_ALIASES: Final = {"qwen3_moe": "qwen2_moe", "deepseek_v2": "qwen2_moe", "deepseek_v3": "qwen2_moe", "olmoe": "qwen2_moe"}

Transforms = str | Sequence[Rule]


def resolve_transforms(transforms: Transforms | None) -> tuple[str | None, tuple[Rule, ...]]:
    """``(rule set name or None, rules)`` for a ``transforms=`` argument.

    Raises:
        TransformError: an unknown rule set name, or something that is not a rule.
    """
    if transforms is None:
        return None, ()
    if isinstance(transforms, str):
        name = _ALIASES.get(transforms, transforms)
        if name not in RULE_SETS:
            known = sorted({*RULE_SETS, *_ALIASES})
            raise TransformError(f"transforms={transforms!r}: no such rule set; known: {', '.join(known)}")
        return name, RULE_SETS[name]
    rules = tuple(transforms)
    bad = [r for r in rules if not isinstance(r, Rule)]
    if bad:
        raise TransformError(
            f"transforms: {bad[0]!r} is not a rule; give a rule set name or Stack/Unstack/Concatenate/Split/"
            "Transpose/Rename rules"
        )
    return None, rules


def inverse(rules: Sequence[Rule]) -> tuple[Rule, ...]:
    """The rules that undo ``rules``: each rule's inverse, in reverse order."""
    return tuple(r.inverse() for r in reversed(rules))


def simulate(specs: Mapping[str, Spec], rules: Sequence[Rule]) -> dict[str, Node]:
    """Apply ``rules`` in order to the key view ``{key: (dtype, shape)}``; nothing is read.

    Returns:
        ``{key: Node}`` for every key of the result: untouched and renamed keys are
        ``"source"`` nodes, produced keys say how they are built.

    Raises:
        TransformError: a rule matches no key, a group is incomplete or ragged, or a key
            is produced twice (see each rule).
    """
    view = {k: _leaf(k, s) for k, s in specs.items()}
    for rule in rules:
        view = rule.apply(view)
    return view


def choose_rule_set(specs: Mapping[str, Spec], module: Mapping[str, Spec], *, refuse_broken: bool = False) -> str | None:
    """The rule set that turns the checkpoint's keys into keys the module holds, if one does.

    Each set is simulated: it is chosen only when it runs without error and every key it
    builds is one the module holds with that shape (a hint is never a guess).

    Args:
        refuse_broken: raise, rather than skip a set, when its layout is recognised (its rules
            match keys and the module holds keys it would build) but the keys do not fit it:
            a missing expert, experts of different shapes.

    Raises:
        TransformError: with ``refuse_broken``, naming the key that cannot be built.
    """
    for name, rules in RULE_SETS.items():
        try:
            view = simulate(specs, rules)
        except TransformError as exc:
            if refuse_broken and not exc.unmatched and _wanted(rules, specs, module):
                raise
            continue
        built = {k: n for k, n in view.items() if n.op != "source"}
        if built and all(k in module and module[k][1] == n.shape for k, n in built.items()):
            return name
    return None


def _wanted(rules: Sequence[Rule], specs: Mapping[str, Spec], module: Mapping[str, Spec]) -> bool:
    """Whether the module holds, and the checkpoint lacks, a key the rules' final outputs would name."""
    made: list[str] = []
    used: set[str] = set()
    for r in rules:
        doc = r.to_dict()
        if doc["op"] == "rename":
            continue
        used.update([doc["source"]] if "source" in doc else doc["sources"])
        made.extend(doc["targets"] if "targets" in doc else [doc["target"] or doc["source"]])
    outputs = [_template(t, "") for t in made if t not in used]
    return any(k not in specs and t.regex.fullmatch(k) for t in outputs for k in module)


def transform_spec(spec: StateSpec, rules: Sequence[Rule]) -> tuple[StateSpec, dict[str, str], dict[str, Node]]:
    """``spec`` as ``rules`` leave it, for the comparison with a module.

    Returns:
        The transformed spec; ``{new key: key in spec}`` for keys that were only renamed; and
        ``{new key: Node}`` for keys built from others (their nodes name keys of ``spec``).
        The class of a built key's owner is unknown (None): the checkpoint's module tree
        describes the layout before the transform.

    Raises:
        TransformError: as :func:`simulate`; also a tied key that a rule would do more than
            rename (a tie cannot follow a stack or split).
    """
    view = simulate({k: (t.dtype, t.shape) for k, t in spec.tensors.items()}, rules)
    renamed: dict[str, str] = {}
    built: dict[str, Node] = {}
    for key, node in view.items():
        if node.op == "source":
            assert node.key is not None
            renamed[key] = node.key
        else:
            built[key] = node
    new_name = {old: new for new, old in renamed.items()}
    for alias, target in spec.aliases.items():
        for k in (alias, target):
            if k not in new_name:
                raise TransformError(
                    f"{k!r} is tied ({alias!r} shares {target!r}'s tensor) and a transform builds other keys from it; "
                    "transforms may only rename tied keys",
                    key=k,
                )
    tensors = {new: TensorSpec(spec.tensors[old].dtype, spec.tensors[old].shape, owner_of(new)) for new, old in renamed.items()}
    tensors.update((k, TensorSpec(n.dtype, n.shape, owner_of(k))) for k, n in built.items())
    aliases = {new_name[a]: new_name[t] for a, t in spec.aliases.items()}
    classes = None
    if spec.classes is not None:
        moved: dict[str, str | None] = {}
        for new, old in renamed.items():
            moved.setdefault(owner_of(new), spec.classes.get(owner_of(old)))
        classes = {**spec.classes, **moved, **{owner_of(k): None for k in built}}
    return StateSpec(tensors, aliases, classes), renamed, built


def parse_transforms_arg(value: str | None) -> Transforms | None:
    """The CLI's ``--transforms``: a rule set name, or a ``.json`` file holding a list of rules.

    Each rule in the file is written as :meth:`Rule.to_dict` gives it, e.g.
    ``{"op": "stack", "source": "{p}.experts.{index}.w1.weight", "target": "{p}.experts.w1", "dim": 0}``.

    Raises:
        TransformError: an unreadable file, not a list, or a bad rule, naming the file.
    """
    if value is None or not value.endswith(".json"):
        return value
    try:
        with open(value, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise TransformError(f"--transforms {value}: cannot read a JSON list of rules ({exc})") from None
    if not isinstance(doc, list):
        raise TransformError(f"--transforms {value}: expected a JSON list of rules, found {type(doc).__name__}")
    return [rule_from_dict(d) for d in doc]
