"""Time manifest schema validation: the reference ``jsonschema`` against jsonschema-rs.

Run from the repository root: ``PYTHONPATH=. python benchmarks/validate_speed.py [N ...]``
(default: 10000 and 100000 tensors; ``--no-reference`` skips the slow jsonschema run).
Columns: json.loads with and without the cyclic GC, jsonschema-rs's boolean check alone,
``validate()`` (which runs that check), and ``jsonschema.Draft202012Validator.validate``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from manifest_ckpt.format.schema import _validator, load_schema, validate


def _digest(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


def synthetic_manifest(n_tensors: int) -> dict[str, Any]:
    """A schema-valid manifest with ``n_tensors`` tensors in 8 files, one module per two tensors."""
    files = {f"model-{i:05d}-of-00008.safetensors": {"size": 10**9, "header_sha256": "a" * 64} for i in range(8)}
    names = sorted(files)
    tensors: dict[str, Any] = {}
    modules: dict[str, Any] = {
        "": {"class": "Net", "version": None, "parameters": [], "buffers": [], "non_persistent_buffers": []}
    }
    for i in range(n_tensors):
        layer, param = divmod(i, 2)
        key = f"layers.{layer}.{'weight' if param == 0 else 'bias'}"
        entry: dict[str, Any] = {"dtype": "float32", "shape": [64, 64] if param == 0 else [64], "digest": _digest(i)}
        if i % 1000 == 999:
            entry["chunks"] = [
                {
                    "offsets": [0, 0],
                    "shape": [32, 64],
                    "file": names[0],
                    "byte_range": [0, 8192],
                    "digest": _digest(-i),
                },
                {
                    "offsets": [32, 0],
                    "shape": [32, 64],
                    "file": names[1],
                    "byte_range": [0, 8192],
                    "digest": _digest(-i - 1),
                },
            ]
        else:
            entry["file"] = names[i % 8]
            entry["byte_range"] = [i * 16384, i * 16384 + 16384]
        tensors[key] = entry
        if param == 0:
            modules[f"layers.{layer}"] = {
                "class": "torch.nn.modules.linear.Linear",
                "version": None,
                "parameters": ["weight", "bias"],
                "buffers": [],
                "non_persistent_buffers": [],
            }
    return {
        "format": "manifest-ckpt",
        "format_version": "1.0.0",
        "digest": _digest(-1),
        "record_digest": _digest(-2),
        "files": files,
        "tensors": tensors,
        "aliases": {"head.weight": "layers.0.weight"},
        "modules": modules,
        "lineage": {"created_by": {"manifest_ckpt": "0.1.0", "torch": "2.13.0", "python": "3.11.9"}, "parents": []},
    }


def _best(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` runs, in seconds (the machine is shared; the minimum is the signal)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _parse_without_gc(text: str) -> object:
    # json.loads of a big manifest allocates ~10**6 containers; the cyclic GC then dominates.
    gc.disable()
    try:
        return json.loads(text)
    finally:
        gc.enable()


def _measure(n: int, *, reference: bool) -> str:
    text = json.dumps(synthetic_manifest(n))
    doc = json.loads(text)
    compiled = _validator()
    assert compiled.is_valid(doc), "the synthetic manifest must be valid"
    t_parse = _best(lambda: json.loads(text), 3)
    t_parse_nogc = _best(lambda: _parse_without_gc(text), 3)
    t_check = _best(lambda: compiled.is_valid(doc), 5)
    t_validate = _best(lambda: validate(doc), 5)
    t_ref = float("nan")
    if reference:
        from jsonschema import Draft202012Validator

        ref = Draft202012Validator(load_schema())
        t_ref = _best(lambda: ref.validate(doc), 1)
    return (
        f"{n:>8} {len(text) / 2**20:>7.1f}MiB {t_parse:>9.3f}s {t_parse_nogc:>9.3f}s "
        f"{t_check:>9.3f}s {t_validate:>9.3f}s {t_ref:>10.3f}s"
    )


def main(argv: list[str]) -> int:
    """Print one line of timings per manifest size."""
    reference = "--no-reference" not in argv
    sizes = [int(a) for a in argv if not a.startswith("--")] or [10_000, 100_000]
    print(
        f"{'tensors':>8} {'size':>10} {'json.loads':>10} {'(no gc)':>10} {'is_valid':>10} {'validate':>10} {'jsonschema':>11}"
    )
    for n in sizes:
        print(_measure(n, reference=reference), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
