"""Mismatch problems and the report that lists them all (no torch import)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# "hook": a module's own load machinery (pre-hooks, _load_from_state_dict) could not be run
# on the checkpoint's description, or reported errors; ``key`` is the module path.
ProblemKind = Literal["missing", "unexpected", "shape", "dtype", "class", "alias", "hook"]
AllowanceKind = Literal["missing", "unexpected", "dtype", "class", "alias", "version"]

_KIND_ORDER = {"missing": 0, "unexpected": 1, "shape": 2, "dtype": 3, "class": 4, "alias": 5, "hook": 6}


@dataclass(frozen=True)
class Problem:
    """One difference between the module (``expected``) and the checkpoint (``found``).

    ``key`` is a state-dict key, or a module path for ``class`` problems (``""`` is the root).
    """

    kind: ProblemKind
    key: str
    expected: str | None
    found: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "expected": self.expected, "found": self.found}


@dataclass(frozen=True)
class Allowance:
    """A difference that did not stop ``check``/``load``, and what let it through.

    ``by`` is the option that allowed it (``allow_missing``, ``strict=False``, ``cast=True``,
    ``check_classes=False``, ``untie=True``, ``tie=True``) or the fact that did (``tie partner``,
    ``equal digests``, ``module version``); ``detail`` says what happens to the key.
    """

    kind: AllowanceKind
    key: str
    by: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "by": self.by, "detail": self.detail}


@dataclass(frozen=True)
class Report:
    """Every difference found by ``check``, with hints; ``ok`` when there is none."""

    problems: list[Problem]
    hints: list[str] = field(default_factory=list)
    suggested_remap: dict[str, str] | None = None
    checked: int = 0
    # A rule set of comparison.transforms that fits (per-expert keys against fused experts).
    suggested_transforms: str | None = None
    allowed: list[Allowance] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_kind(self, kind: ProblemKind) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "problems": [p.to_dict() for p in self.problems],
            "hints": list(self.hints),
            "suggested_remap": self.suggested_remap,
            "suggested_transforms": self.suggested_transforms,
            "allowed": [a.to_dict() for a in self.allowed],
        }

    def __str__(self) -> str:
        lines = []
        if self.ok:
            line = f"OK: {self.checked} keys match (names, shapes, dtypes, classes, ties)"
            if self.allowed:
                line += f"; {_allowed_summary(self.allowed)}, listed below"
            lines.append(line)
        else:
            rows = [("kind", "key", "module expects", "checkpoint has")]
            rows += [(p.kind, p.key or "(root)", p.expected or "-", p.found or "-") for p in self.problems]
            lines.append(render_table(rows))
            counts = ", ".join(f"{n} {k}" for k, n in _count(self.problems).items())
            lines.append(f"{len(self.problems)} problems ({counts})")
        if self.allowed:
            rows = [("allowed", "key", "by", "what happens")]
            rows += [(a.kind, a.key or "(root)", a.by, a.detail) for a in self.allowed]
            # The detail column is a sentence: cutting it would hide what the policy did.
            lines.append(render_table(rows, max_width=60, keep_last=True))
            if not self.ok:
                lines.append(_allowed_summary(self.allowed))
        lines += [f"hint: {h}" for h in self.hints]
        return "\n".join(lines)


def sort_problems(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (_KIND_ORDER[p.kind], p.key))


def _allowed_summary(allowed: Sequence[Allowance]) -> str:
    counts = ", ".join(f"{n} {k}" for k, n in _count(allowed).items())
    return f"{len(allowed)} allowed ({counts})"


def sort_allowances(allowed: list[Allowance]) -> list[Allowance]:
    order = {**_KIND_ORDER, "version": len(_KIND_ORDER)}
    return sorted(allowed, key=lambda a: (order[a.kind], a.key))


def _count(problems: Sequence[Problem | Allowance]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in problems:
        out[p.kind] = out.get(p.kind, 0) + 1
    return out


def render_table(rows: Sequence[Sequence[str]], *, max_width: int = 60, keep_last: bool = False) -> str:
    """A plain-text table with a header rule; long cells are shortened in the middle.

    With ``keep_last`` the last column (a sentence) is printed whole.
    """

    def cut(cell: str) -> str:
        return cell if len(cell) <= max_width else cell[: max_width // 2 - 2] + "..." + cell[-(max_width // 2 - 1) :]

    cells = [[cut(c) if not (keep_last and i == len(row) - 1) else c for i, c in enumerate(row)] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    if keep_last:  # a whole sentence need not stretch the header rule
        widths[-1] = min(widths[-1], max_width)
    out = []
    for n, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
