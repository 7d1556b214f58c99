"""Human-readable views of a manifest: module tree, dtype totals, lineage (no torch import)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from manifest_ckpt.cli.progress import human_bytes
from manifest_ckpt.comparison.report import render_table
from manifest_ckpt.format.dtypes import describe, nbytes
from manifest_ckpt.format.manifest import Manifest


def short_class(name: str | None) -> str:
    """``Linear`` for torch's own layers, the full name for everything else."""
    if name is None:
        return "?"
    if name.startswith("torch.nn.modules."):
        return name.rpartition(".")[2]
    return name


def _children(paths: list[str]) -> dict[str, list[str]]:
    kids: dict[str, list[str]] = {p: [] for p in paths}
    for p in paths:
        if p:
            kids.setdefault(p.rpartition(".")[0], []).append(p)
    return kids


def module_tree(manifest: Manifest, *, max_depth: int | None = None) -> str:
    """The module tree with each tensor's dtype and shape; aliases point at their target."""
    modules = manifest.modules
    if modules is None:
        owners = sorted({k.rpartition(".")[0] for k in manifest.keys()})
        paths: set[str] = set()
        for owner in owners:
            parts = owner.split(".") if owner else []
            paths.update(".".join(parts[:i]) for i in range(len(parts) + 1))
        names = {p: [k.rpartition(".")[2] for k in manifest.keys() if k.rpartition(".")[0] == p] for p in paths}
        classes: Mapping[str, str | None] = dict.fromkeys(paths)
    else:
        paths = set(modules)
        names = {p: [*m.parameters, *m.buffers, *m.non_persistent_buffers] for p, m in modules.items()}
        classes = {p: m.cls for p, m in modules.items()}
    ordered = sorted(paths, key=lambda p: [int(s) if s.isdigit() else s for s in p.split(".")] if p else [])
    kids = _children(ordered)
    lines: list[str] = [f"(root)  {short_class(classes.get(''))}"]

    def leaf(path: str, name: str) -> str:
        key = f"{path}.{name}" if path else name
        if key in manifest.aliases:
            return f"{name}  -> {manifest.aliases[key]} (tied)"
        if key in manifest.tensors:
            t = manifest.tensors[key]
            return f"{name}  {describe(t.dtype, t.shape)}"
        return f"{name}  (non-persistent buffer, not stored)"

    def walk(path: str, prefix: str, depth: int) -> None:
        entries: list[tuple[str, str | None]] = [(leaf(path, n), None) for n in names.get(path, [])]
        entries += [(f"{c.rpartition('.')[2]}  {short_class(classes.get(c))}", c) for c in kids.get(path, [])]
        for i, (text, child) in enumerate(entries):
            last = i == len(entries) - 1
            lines.append(prefix + ("└── " if last else "├── ") + text)
            if child is not None:
                if max_depth is not None and depth + 1 >= max_depth:
                    if names.get(child) or kids.get(child):
                        lines.append(prefix + ("    " if last else "│   ") + "└── ...")
                    continue
                walk(child, prefix + ("    " if last else "│   "), depth + 1)

    walk("", "", 0)
    return "\n".join(lines)


def dtype_totals(manifest: Manifest) -> list[dict[str, Any]]:
    """Stored tensors, elements and bytes per dtype (aliases are not counted twice)."""
    totals: dict[str, list[int]] = {}
    for t in manifest.tensors.values():
        row = totals.setdefault(t.dtype, [0, 0, 0])
        row[0] += 1
        row[1] += nbytes(t.dtype, t.shape) // max(1, nbytes(t.dtype, ()))
        row[2] += t.nbytes
    return [{"dtype": d, "tensors": r[0], "elements": r[1], "bytes": r[2]} for d, r in sorted(totals.items())]


def summary(manifest: Manifest, location: str) -> str:
    """Header lines: where, digest, format, counts and sizes."""
    size = sum(f.size for f in manifest.files.values())
    rows = [
        ("checkpoint", location),
        ("digest", manifest.digest),
        ("format", f"manifest-ckpt {manifest.format_version}"),
        (
            "tensors",
            f"{_plural(len(manifest.tensors), 'stored tensor')}, {_plural(len(manifest.aliases), 'alias', 'aliases')}, "
            + (_plural(len(manifest.modules), "module") if manifest.modules is not None else "no module tree"),
        ),
        ("size", f"{human_bytes(manifest.total_bytes)} of tensor data in {_plural(len(manifest.files), 'file')} ({human_bytes(size)})"),
    ]
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def lineage_lines(manifest: Manifest) -> str:
    lineage = manifest.lineage
    made = lineage.get("created_by", {})
    rows = [("created by", ", ".join(f"{k} {v}" for k, v in made.items()))]
    code = lineage.get("code")
    if code:
        rows.append(("code", f"git {code['git_commit'][:12]}{' (dirty)' if code['git_dirty'] else ''}"))
    if "created_at" in lineage:
        rows.append(("created at", lineage["created_at"]))
    parents = lineage.get("parents", [])
    for p in parents:
        label = f" ({p['name']})" if p.get("name") else ""
        rows.append(("parent", f"{p['relation']} {p['digest'][:23]}...{label}"))
    if not parents:
        rows.append(("parents", "none"))
    if "source" in lineage:
        rows.append(("source", _compact(lineage["source"])))
    if "user" in lineage:
        rows.append(("user", _compact(lineage["user"])))
    if manifest.metadata is not None:
        rows.append(("metadata", _compact(manifest.metadata)))
    return "\n".join(f"  {k:<11} {v}" for k, v in rows)


def _compact(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def state_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """The application-state entries of a training state (empty for a weights checkpoint)."""
    from manifest_ckpt.comparison.state_view import entries

    return [] if manifest.state is None else [e.to_dict() for e in entries(manifest.state, inside_objects=False)]


def state_table(manifest: Manifest) -> str:
    """Which entries of a training state are modules, optimizers, schedulers, Stateful objects, values."""
    rows = [("entry", "kind", "class / value")]
    rows += [(r["key"], r["kind"], r["text"] or "-") for r in state_rows(manifest)]
    return render_table(rows)


def inspect_text(manifest: Manifest, location: str, *, max_depth: int | None = None) -> str:
    """The full ``inspect`` view."""
    totals = dtype_totals(manifest)
    table = render_table(
        [("dtype", "tensors", "elements", "bytes")]
        + [(r["dtype"], str(r["tensors"]), f"{r['elements']:,}", human_bytes(r["bytes"])) for r in totals]
    )
    return "\n\n".join(
        [
            summary(manifest, location),
            *(["application state (training state)\n" + state_table(manifest)] if manifest.state is not None else []),
            ("tensors" if manifest.state is not None else "module tree")
            + "\n"
            + module_tree(manifest, max_depth=max_depth),
            table,
            "lineage\n" + lineage_lines(manifest),
        ]
    )
