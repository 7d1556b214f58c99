"""Corruption sweep: byte flips and truncations over every region of checkpoint directories and archives.

A small checkpoint is saved as a directory and packed as an archive. The bytes of each file are
split into regions: ``manifest`` (manifest.json), ``st-length`` / ``st-header`` / ``st-padding``
/ ``st-data`` of the safetensors weights (the 8-byte length, the JSON header, the spaces that pad
it, the tensor bytes), and in the archive also ``tar-header`` (ustar and pax header blocks) and
``tar-padding`` (block padding and the end-of-archive blocks). Each variant flips one byte (XOR with
a random non-zero value) or truncates a file, and is then run, in a forked child with a timeout,
through ``verify``, a verifying ``load`` and a plain ``load``.

A variant must be rejected by ``verify`` and by the verifying load with a typed
``ManifestCkptError``, or be provably harmless: ``verify`` passes, the manifest read back equals
the original one, and the verifying load leaves every tensor bit-identical to the original. A
plain load (which hashes nothing, by design) may load changed tensor bytes, but must never raise
an untyped error or hang.

Run ``python -m harness.corrupt [--quick] [--seed N]``; it prints one JSON line of figures (tried,
rejected, harmless, wrongly_accepted, untyped, hangs, per region) and exits 1 when any variant was
wrongly accepted, untyped or hung.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import manifest_ckpt as mc
from harness.child import in_child
from manifest_ckpt.errors import ManifestCkptError
from manifest_ckpt.storage.store import read_manifest

_CASE_TIMEOUT = 30.0


def model() -> nn.Module:
    """The checkpointed module: a few parameters and a buffer, deterministic values."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3, bias=False))
    module.register_buffer("steps", torch.tensor([7], dtype=torch.int64))
    return module


@dataclass(frozen=True)
class Variant:
    """One damaged copy: ``kind`` is ``flip`` (at ``position``, XOR ``value``) or ``truncate`` (to ``position``)."""

    target: str  # "dir" or "archive"
    file: str  # file name inside the directory, or the archive's
    region: str
    kind: str
    position: int
    value: int = 0


def _safetensors_regions(data: bytes, base: int, out: list[tuple[str, int, int]]) -> None:
    """Regions of one safetensors file whose bytes start at ``base``."""
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + length]
    padded = len(header) - len(header.rstrip(b" "))
    out.append(("st-length", base, base + 8))
    out.append(("st-header", base + 8, base + 8 + length - padded))
    if padded:
        out.append(("st-padding", base + 8 + length - padded, base + 8 + length))
    out.append(("st-data", base + 8 + length, base + len(data)))


def directory_regions(directory: Path) -> dict[str, list[tuple[str, int, int]]]:
    """File name -> [(region, start, end)] for a checkpoint directory."""
    regions: dict[str, list[tuple[str, int, int]]] = {}
    for name in sorted(os.listdir(directory)):
        data = (directory / name).read_bytes()
        spans: list[tuple[str, int, int]] = []
        if name == "manifest.json":
            spans.append(("manifest", 0, len(data)))
        else:
            _safetensors_regions(data, 0, spans)
        regions[name] = spans
    return regions


def archive_regions(archive: Path) -> list[tuple[str, int, int]]:
    """[(region, start, end)] covering every byte of an archive."""
    data = archive.read_bytes()
    spans: list[tuple[str, int, int]] = []
    end = 0
    with tarfile.open(archive) as tar:
        for info in tar.getmembers():
            if end < info.offset:
                spans.append(("tar-padding", end, info.offset))
            spans.append(("tar-header", info.offset, info.offset_data))
            member = data[info.offset_data : info.offset_data + info.size]
            if info.name == "manifest.json":
                spans.append(("manifest", info.offset_data, info.offset_data + info.size))
            else:
                _safetensors_regions(member, info.offset_data, spans)
            end = info.offset_data + info.size
    spans.append(("tar-padding", end, len(data)))
    return [s for s in spans if s[2] > s[1]]


def plan(work: Path, rng: random.Random, per_region: int, cuts: int) -> list[Variant]:
    """Flips at up to ``per_region`` positions of every region (all when fewer) and ``cuts`` truncations per file."""
    variants: list[Variant] = []
    files: list[tuple[str, str, list[tuple[str, int, int]], int]] = [
        ("dir", name, spans, (work / "ckpt" / name).stat().st_size)
        for name, spans in directory_regions(work / "ckpt").items()
    ]
    files.append(("archive", "ckpt.tar", archive_regions(work / "ckpt.tar"), (work / "ckpt.tar").stat().st_size))
    for target, name, spans, size in files:
        by_region: dict[str, list[int]] = {}
        for region, start, end in spans:
            by_region.setdefault(region, []).extend(range(start, end))
        for region, positions in sorted(by_region.items()):
            chosen = positions if len(positions) <= per_region else rng.sample(positions, per_region)
            variants += [Variant(target, name, region, "flip", p, rng.randrange(1, 256)) for p in chosen]
        # Truncations: every region boundary (and one byte either side), then random lengths.
        lengths = {0, 1, size - 1} | {b + d for _, s, e in spans for b in (s, e) for d in (-1, 0, 1)}
        lengths = {n for n in lengths if 0 <= n < size}
        extra = sorted(set(range(size)) - lengths)
        lengths |= set(rng.sample(extra, min(cuts, len(extra))))
        for n in sorted(lengths):
            region = next((r for r, s, e in spans if s <= n < e), "end")
            variants.append(Variant(target, name, region, "truncate", n))
    return variants


def _same_state(module: nn.Module, original: dict[str, torch.Tensor]) -> bool:
    state = module.state_dict()
    return state.keys() == original.keys() and all(
        state[k].dtype == v.dtype
        and state[k].shape == v.shape
        and state[k].contiguous().view(torch.uint8).equal(v.contiguous().view(torch.uint8))
        for k, v in original.items()
    )


def judge(path: Path, original_manifest: Any, original: dict[str, torch.Tensor]) -> str:
    """Outcome of one damaged checkpoint at ``path`` (run in a child)."""

    def step(action: Callable[[], object]) -> str | None:
        try:
            action()
        except ManifestCkptError as exc:
            return type(exc).__name__
        return None

    def fresh() -> nn.Module:
        module = model()
        with torch.no_grad():
            for tensor in module.state_dict().values():
                tensor.zero_()
        return module

    def work() -> str:
        plain = step(lambda: mc.load(fresh(), path))  # may load changed bytes; must stay typed
        verified = step(lambda: mc.verify(path))
        target = fresh()
        pinned = step(lambda: mc.load(target, path, verify_digests=True))
        if verified is not None and pinned is not None:
            return f"rejected {verified}"
        if verified is None and pinned is None:
            if read_manifest(path) == original_manifest and _same_state(target, original):
                return "harmless"
            return "wrongly_accepted: verify and verifying load pass with changed content"
        return f"wrongly_accepted: verify {verified or 'passed'}, verifying load {pinned or 'passed'}, plain {plain}"

    return in_child(work, _CASE_TIMEOUT)


def _apply(work: Path, variant: Variant) -> tuple[Path, Path, bytes]:
    """Damage the file in place; return (checkpoint path, damaged file, its original bytes)."""
    checkpoint = work / ("ckpt" if variant.target == "dir" else "ckpt.tar")
    damaged = checkpoint / variant.file if variant.target == "dir" else checkpoint
    original = damaged.read_bytes()
    if variant.kind == "flip":
        data = bytearray(original)
        data[variant.position] ^= variant.value
        damaged.write_bytes(bytes(data))
    else:
        damaged.write_bytes(original[: variant.position])
    return checkpoint, damaged, original


def run(per_region: int, cuts: int, seed: int) -> dict[str, Any]:
    """Save, pack, sweep; return the figures."""
    torch.set_num_threads(1)  # the process forks: keep it free of worker threads
    _ = (mc.load, mc.verify, mc.pack)  # import once here, not in every forked child
    rng = random.Random(seed)
    started = time.monotonic()
    outcomes: Counter[str] = Counter()
    regions: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mc-corrupt-") as tmp:
        work = Path(tmp)
        module = model()
        original = {k: v.clone() for k, v in module.state_dict().items()}
        mc.save(module, work / "ckpt", record_code=False)
        mc.pack(work / "ckpt", work / "ckpt.tar")
        manifest = read_manifest(work / "ckpt")
        variants = plan(work, rng, per_region, cuts)
        for variant in variants:
            checkpoint, damaged, before = _apply(work, variant)
            try:
                outcome = judge(checkpoint, manifest, original)
            finally:
                damaged.write_bytes(before)
            kind = outcome.split(" ", 1)[0].rstrip(":")
            outcomes[kind] += 1
            regions[f"{variant.target}:{variant.region}:{variant.kind}:{kind}"] += 1
            if kind not in ("rejected", "harmless"):
                failures.append({**variant.__dict__, "outcome": outcome})
        shutil.rmtree(work / "ckpt")
    return {
        "harness": "corrupt",
        "tried": len(variants),
        "rejected": outcomes["rejected"],
        "harmless": outcomes["harmless"],
        "wrongly_accepted": outcomes["wrongly_accepted"],
        "untyped": outcomes["untyped"] + outcomes["crash"],
        "hangs": outcomes["hang"],
        "regions": dict(sorted(regions.items())),
        "failures": failures[:10],
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.corrupt", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few positions per region, for CI (seconds)")
    parser.add_argument("--per-region", type=int, default=None, help="flips per region (default 2000, --quick 4)")
    parser.add_argument("--cuts", type=int, default=None, help="random truncations per file (default 300, --quick 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    per_region = args.per_region if args.per_region is not None else (4 if args.quick else 2000)
    cuts = args.cuts if args.cuts is not None else (2 if args.quick else 300)
    figures = run(per_region, cuts, args.seed)
    print(json.dumps(figures, sort_keys=True))
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
