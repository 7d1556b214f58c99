"""Fuzz targets: the manifest reader, the safetensors header parser, the tar reader and the pickle scanner.

Each target takes bytes derived from a valid input (a real manifest, safetensors header, archive
or ``torch.save`` file) by hypothesis: byte flips, insertions and deletions, truncation, splices
of hostile tokens (huge integers, lone surrogates, deep nesting, duplicate keys, NUL bytes,
long names) and, for the JSON inputs, structural edits (a random node replaced by a random JSON
value). The target must return normally or raise a typed ``ManifestCkptError``; any other
exception is an ``untyped`` finding, and an example running past its time limit (SIGALRM) a
``hang``. Findings are counted, not shrunk, so one run measures them all.

Run ``python -m harness.fuzz [--quick | --deep] [--examples N] [--seed N] [--target NAME]``
(``--quick``: 60 examples per target for CI; default 2,000; ``--deep``: 50,000). It prints one
JSON line of figures (tried, untyped, hangs, per target) and exits 1 on any finding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import manifest_ckpt as mc
from harness.child import Hang, time_limit
from manifest_ckpt.errors import ManifestCkptError
from manifest_ckpt.format.manifest import Manifest
from manifest_ckpt.format.safetensors_header import parse_header
from manifest_ckpt.sources.torch_pickle import read_torch_file
from manifest_ckpt.storage.tar import index_archive

_EXAMPLE_SECONDS = 10
_TOKENS = [
    b"9" * 5000,
    b"-1",
    b"1e999",
    b"NaN",
    b'"\\ud800"',
    b"[" * 600,
    b"{" * 600,
    b"\x00",
    b'"a":1,"a":2',
    b'"__metadata__"',
    b"\xff\xfe",
    b"18446744073709551616",
    b"A" * 300,
    b"/../../etc/passwd",
    b"\x80\x02cos\nsystem\n",
    b"\x93",
    b"\x94h\x00",
]


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few random byte-level edits."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "token", "truncate", "duplicate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "token":
            data[at:at] = draw(st.sampled_from(_TOKENS))
        elif kind == "truncate":
            del data[at:]
        elif kind == "duplicate" and data:
            end = min(len(data), at + draw(st.integers(1, 512)))
            data[at:at] = data[at:end]
    return bytes(data)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.sampled_from(["F32", "BF16", "sha256:" + "0" * 64, "1.0.0", "", "__metadata__"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def edited_json(draw: st.DrawFn, document: Any) -> bytes:
    """``document`` with a random node (found by walking down) replaced by a random JSON value."""
    copy = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        node, path = copy, []
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
            path.append((node, key))
            node = node[key]
        if path:
            parent, key = path[-1]
            if isinstance(parent, dict) and draw(st.booleans()):
                del parent[key]
            else:
                parent[key] = draw(_JSON)
    return json.dumps(copy, indent=draw(st.sampled_from([None, 1]))).encode()


class Inputs:
    """Valid inputs the mutations start from, written once."""

    def __init__(self, work: Path) -> None:
        torch.manual_seed(0)
        state = {"a.weight": torch.randn(3, 4), "a.bias": torch.zeros(3), "n": torch.arange(5)}
        state["tied"] = state["a.weight"]
        mc.save(state, work / "ckpt", record_code=False)
        self.manifest = (work / "ckpt" / "manifest.json").read_bytes()
        weights = next(p for p in (work / "ckpt").iterdir() if p.suffix == ".safetensors")
        self.safetensors = weights.read_bytes()
        mc.pack(work / "ckpt", work / "ckpt.tar")
        self.archive = (work / "ckpt.tar").read_bytes()
        torch.save(state, work / "state.pt")
        self.torch_zip = (work / "state.pt").read_bytes()
        torch.save(state, work / "legacy.pt", _use_new_zipfile_serialization=False)
        self.torch_legacy = (work / "legacy.pt").read_bytes()
        self.scratch = work / "scratch"


def targets(inputs: Inputs) -> dict[str, tuple[st.SearchStrategy[bytes], Callable[[bytes], object]]]:
    """Target name -> (strategy of inputs, the call under test)."""
    header_length = int.from_bytes(inputs.safetensors[:8], "little")
    header_doc = json.loads(inputs.safetensors[8 : 8 + header_length])
    data = inputs.safetensors[8 + header_length :]

    def with_length(header: bytes) -> bytes:
        return len(header).to_bytes(8, "little") + header + data

    def in_file(read: Callable[[str], object]) -> Callable[[bytes], object]:
        def call(blob: bytes) -> object:
            inputs.scratch.write_bytes(blob)
            return read(str(inputs.scratch))

        return call

    return {
        "manifest": (
            mutated(inputs.manifest) | edited_json(json.loads(inputs.manifest)),
            lambda blob: Manifest.from_json(blob, file="manifest.json"),
        ),
        "safetensors_header": (
            mutated(inputs.safetensors) | edited_json(header_doc).map(with_length),
            lambda blob: parse_header(blob, len(blob), file="weights.safetensors"),
        ),
        "tar": (mutated(inputs.archive), in_file(index_archive)),
        "pickle": (
            mutated(inputs.torch_zip) | mutated(inputs.torch_legacy),
            in_file(lambda path: read_torch_file(path, sha256=False)),
        ),
    }


def fuzz(
    name: str, strategy: st.SearchStrategy[bytes], call: Callable[[bytes], object], examples: int, run_seed: int
) -> dict[str, Any]:
    """Run ``examples`` inputs through ``call``; count outcomes, keep the first findings."""
    outcomes: Counter[str] = Counter()
    findings: list[str] = []

    @seed(run_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def target(blob: bytes) -> None:
        try:
            with time_limit(_EXAMPLE_SECONDS):
                call(blob)
            outcomes["accepted"] += 1
        except ManifestCkptError:
            outcomes["refused"] += 1
        except Hang:
            outcomes["hang"] += 1
            findings.append(f"hang on {blob[:80]!r}")
        except Exception as exc:  # noqa: BLE001 - an untyped error is the finding
            outcomes["untyped"] += 1
            findings.append(f"{type(exc).__name__}: {str(exc)[:160]} on {blob[:80]!r}")

    target()
    return {
        "tried": sum(outcomes.values()),
        "accepted": outcomes["accepted"],
        "refused": outcomes["refused"],
        "untyped": outcomes["untyped"],
        "hangs": outcomes["hang"],
        "findings": findings[:5],
    }


def run(examples: int, run_seed: int, only: str | None) -> dict[str, Any]:
    """Fuzz every target (or ``only``); return the figures."""
    started = time.monotonic()
    warnings.simplefilter("ignore")  # torch warns about odd pickle protocols in mutated files
    per_target: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mc-fuzz-") as tmp:
        inputs = Inputs(Path(tmp))
        for name, (strategy, call) in targets(inputs).items():
            if only is None or name == only:
                per_target[name] = fuzz(name, strategy, call, examples, run_seed)
        if inputs.scratch.exists():
            os.unlink(inputs.scratch)
    return {
        "harness": "fuzz",
        "tried": sum(t["tried"] for t in per_target.values()),
        "untyped": sum(t["untyped"] for t in per_target.values()),
        "hangs": sum(t["hangs"] for t in per_target.values()),
        "targets": per_target,
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.fuzz", description=__doc__.splitlines()[0])
    depth = parser.add_mutually_exclusive_group()
    depth.add_argument("--quick", action="store_true", help="60 examples per target, for CI (seconds)")
    depth.add_argument("--deep", action="store_true", help="50,000 examples per target (on demand)")
    parser.add_argument("--examples", type=int, default=None, help="examples per target (default 2,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", choices=["manifest", "safetensors_header", "tar", "pickle"], default=None)
    args = parser.parse_args(argv)
    examples = args.examples or (60 if args.quick else 50_000 if args.deep else 2_000)
    figures = run(examples, args.seed, args.target)
    print(json.dumps(figures, sort_keys=True))
    return 1 if figures["untyped"] or figures["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
