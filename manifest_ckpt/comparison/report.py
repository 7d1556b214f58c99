"""Mismatch problems and the report that lists them all (no torch import)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# "hook": a module's own load machinery (pre-hooks, _load_from_state_dict) could not be run
# on the checkpoint's description, or reported errors; ``key`` is the module path.
ProblemKind = Literal["missing", "unexpected", "shape", "dtype", "class", "alias", "hook"]

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
class Report:
    """Every difference found by ``check``, with hints; ``ok`` when there is none."""

    problems: list[Problem]
    hints: list[str] = field(default_factory=list)
    suggested_remap: dict[str, str] | None = None
    checked: int = 0
    # A rule set of comparison.transforms that fits (per-expert keys against fused experts).
    suggested_transforms: str | None = None

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
        }

    def __str__(self) -> str:
        if self.ok:
            return f"OK: {self.checked} keys match (names, shapes, dtypes, classes, ties)"
        rows = [("kind", "key", "module expects", "checkpoint has")]
        rows += [(p.kind, p.key or "(root)", p.expected or "-", p.found or "-") for p in self.problems]
        lines = [render_table(rows)]
        counts = ", ".join(f"{n} {k}" for k, n in _count(self.problems).items())
        lines.append(f"{len(self.problems)} problems ({counts})")
        lines += [f"hint: {h}" for h in self.hints]
        return "\n".join(lines)


def sort_problems(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (_KIND_ORDER[p.kind], p.key))


def _count(problems: list[Problem]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in problems:
        out[p.kind] = out.get(p.kind, 0) + 1
    return out


def render_table(rows: Sequence[Sequence[str]], *, max_width: int = 60) -> str:
    """A plain-text table with a header rule; long cells are shortened in the middle."""

    def cut(cell: str) -> str:
        return cell if len(cell) <= max_width else cell[: max_width // 2 - 2] + "..." + cell[-(max_width // 2 - 1) :]

    cells = [[cut(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    out = []
    for n, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
