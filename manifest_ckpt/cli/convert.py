"""``manifest-ckpt convert``: run :func:`convert` and print what it did."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Mapping
from typing import Any, TextIO

from manifest_ckpt.cli.progress import human_bytes
from manifest_ckpt.errors import ModelMismatchError
from manifest_ckpt.format.manifest import Manifest
from manifest_ckpt.sources.convert import KNOWN_PREFIXES, convert
from manifest_ckpt.sources.torch_file import count_text

__all__ = ["cli_convert", "conversion_json", "conversion_text"]


def conversion_text(manifest: Manifest, location: str) -> str:
    """The human summary ``manifest-ckpt convert`` prints: source, keys, aliases, left out, digest."""
    source: Mapping[str, Any] = manifest.lineage.get("source", {})
    rows: list[tuple[str, str]] = [
        (
            "source",
            f"{source.get('file')}: {source.get('format')}, {human_bytes(int(source.get('size', 0)))}, "
            f"sha256 {str(source.get('sha256', ''))[:16]}...",
        ),
    ]
    container, key = source.get("container"), source.get("key")
    where = f"tensors under {key!r}" if key else "tensors at the top level"
    rows.append(("container", f"{container} ({where})"))
    if source.get("remap"):
        rows.append(("remap", ", ".join(f"{shlex.quote(p)} -> {shlex.quote(r)}" for p, r in source["remap"].items())))
    if source.get("transforms"):
        t = source["transforms"]
        what = f"rule set {t['rule_set']}" if t.get("rule_set") else f"{len(t['rules'])} rules"
        rows.append(("transform", f"{what}: {t['built_keys']} keys built (stack/concat...) after remap"))
    if source.get("module"):
        rows.append(("module", f"checked against {source['module']}; module tree recorded"))
    else:
        rows.append(("module", "none given: keys not checked, layer classes unknown"))
    size = sum(f.size for f in manifest.files.values())
    rows.append(
        (
            "stored",
            f"{len(manifest.tensors)} tensors, {human_bytes(manifest.total_bytes)} in {len(manifest.files)} "
            f"file{'' if len(manifest.files) == 1 else 's'} ({human_bytes(size)})",
        )
    )
    added, merged = set(source.get("ties_added", [])), set(source.get("ties_merged", []))
    for alias, target in manifest.aliases.items():
        why = (
            " (the source omitted it; tied in the module)"
            if alias in added
            else " (stored twice with equal values; tied in the module)"
            if alias in merged
            else " (shared storage in the source)"
        )
        rows.append(("alias", f"{alias} -> {target}{why}"))
    allowed: dict[tuple[str, str], list[str]] = {}
    for a in source.get("allowed", []):
        allowed.setdefault((a["kind"], a["by"]), []).append(a["key"])
    for (kind, by), keys in allowed.items():
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        rows.append(("allowed", f"{len(keys)} {kind} by {by}: {shown}"))
    if isinstance(manifest.metadata, Mapping) and manifest.metadata:
        rows.append(("kept", ", ".join(sorted(manifest.metadata)) + " (as JSON in metadata)"))
    for entry in source.get("left_out", []):
        counts = f": {count_text(entry['tensors'], entry['bytes'])}" if "tensors" in entry else ""
        rows.append(("left out", f"{entry['path']} ({entry['what']}{counts})"))
    if source.get("key_prefix"):
        prefix = source["key_prefix"]
        flag = shlex.quote(f"^{re.escape(prefix)}=")
        rows.append(
            (
                "note",
                f"every key starts with {prefix!r} ({KNOWN_PREFIXES[prefix]}); convert with --remap {flag} to strip it",
            )
        )
    rows.append(("digest", manifest.digest))
    return f"converted {source.get('file')} -> {location}\n" + "\n".join(f"  {k:<10} {v}" for k, v in rows)


def conversion_json(manifest: Manifest, location: str) -> dict[str, Any]:
    """The ``--json`` document of a successful conversion."""
    return {
        "ok": True,
        "checkpoint": location,
        "digest": manifest.digest,
        "tensors": len(manifest.tensors),
        "bytes": manifest.total_bytes,
        "aliases": dict(manifest.aliases),
        "kept": sorted(manifest.metadata) if isinstance(manifest.metadata, Mapping) else [],
        "source": dict(manifest.lineage.get("source", {})),
    }


def cli_convert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``manifest-ckpt convert``: 0 converted, 1 the model does not match (nothing written).

    Other errors (unsafe or unreadable source, bad remap) propagate as ManifestCkptError,
    which ``cli.run`` reports with exit code 2.
    """
    from manifest_ckpt.cli.factory import build_model
    from manifest_ckpt.comparison.remap import parse_remap_args
    from manifest_ckpt.comparison.transforms import parse_transforms_arg
    from manifest_ckpt.storage.remote import parse_storage_options

    remap = parse_remap_args(args.remap) or None
    model = build_model(args.model) if args.model else None
    try:
        manifest = convert(
            args.src,
            args.dst,
            module=model,
            key=args.key,
            remap=remap,
            transforms=parse_transforms_arg(args.transforms),
            overwrite=args.overwrite,
            progress=not args.quiet,
            storage_options=parse_storage_options(getattr(args, "storage_option", None)),
            strict=args.strict,
            allow_missing=args.allow_missing,
            allow_unexpected=args.allow_unexpected,
            untie=args.untie,
            tie=args.tie,
        )
    except ModelMismatchError as exc:
        if args.json:
            _emit(out, {"ok": False, "source": str(args.src), "model": args.model, **exc.report.to_dict()})
        else:
            err.write(f"MISMATCH {args.src} vs {args.model}: nothing was written\n{exc.report}\n")
        return 1
    if args.json:
        _emit(out, conversion_json(manifest, str(args.dst)))
    else:
        out.write(conversion_text(manifest, str(args.dst)) + "\n")
    return 0


def _emit(out: TextIO, document: Any) -> None:
    out.write(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
