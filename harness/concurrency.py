"""Concurrency harness: racing writers and a reader on one checkpoint path.

Each round forks, at the same instant:

* two writers, each saving (``overwrite=True``) several versions to the same path, one of them
  re-saving the very first version again and again (the same file names as the old checkpoint);
* a reader loading the path (``verify_digests=True``) in a loop into a zeroed module;
* and, on a fresh path, two writers saving without ``overwrite``: exactly one must win and the
  other get ``CheckpointExistsError``.

Invariants: every save returns normally (writers are serialised by the advisory lock); every
read either loads one complete version (all tensors of one save) or is refused with a typed
``ManifestCkptError``, never a mix; afterwards the path verifies, holds the version its last save
wrote, and contains no file its manifest does not list, with no staging leftovers beside it.

Run ``python -m harness.concurrency [--quick] [--seed N]``; it prints one JSON line of figures
(tried, saves, reads, reads_ok, reads_refused, mixed, broken, untyped, hangs) and exits 1 on
any mixed read, broken result, untyped error or hang.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

import manifest_ckpt as mc
from harness.child import in_child
from harness.crash import _leftovers
from manifest_ckpt.errors import CheckpointExistsError, ManifestCkptError

_TIMEOUT = 120.0
_SHAPES = {"a": (32, 32), "b": (300,), "c": (4, 5, 6)}


def state(version: int) -> dict[str, torch.Tensor]:
    """Every tensor of version ``version`` holds the value ``version``: a mix is visible."""
    return {name: torch.full(shape, float(version)) for name, shape in _SHAPES.items()}


class Holder(nn.Module):
    """A module with exactly the checkpoint's keys."""

    def __init__(self) -> None:
        super().__init__()
        for name, shape in _SHAPES.items():
            self.register_buffer(name, torch.zeros(shape))


def _versions_in(module: nn.Module) -> set[float]:
    return {float(v) for t in module.state_dict().values() for v in t.unique().tolist()}


def _writer(target: Path, versions: list[int], start: float) -> str:
    def work() -> str:
        _wait_until(start)
        done = []
        for version in versions:
            try:
                mc.save(state(version), target, overwrite=True, record_code=False)
            except ManifestCkptError as exc:
                return f"failed {type(exc).__name__}: {str(exc)[:200]}"
            done.append(version)
        return "ok " + json.dumps(done)

    return work()


def _reader(target: Path, start: float, seconds: float) -> str:
    counts: Counter[str] = Counter()
    _wait_until(start)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        module = Holder()
        try:
            mc.load(module, target, verify_digests=True)
        except ManifestCkptError as exc:
            counts[f"refused {type(exc).__name__}"] += 1
            continue
        seen = _versions_in(module)
        counts["ok" if len(seen) == 1 else "mixed"] += 1
    return json.dumps(counts)


def _new_path_writer(target: Path, version: int, start: float) -> str:
    _wait_until(start)
    try:
        mc.save(state(version), target, record_code=False)
    except CheckpointExistsError:
        return "exists"
    return "won"


def _wait_until(start: float) -> None:
    while time.time() < start:
        time.sleep(0.0005)


def _fork(work: Any) -> tuple[int, int]:
    """Fork ``work`` (returns a line); (pid, read end of its pipe)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        line = in_child(work, _TIMEOUT)  # a grandchild, so a hang is reported, not waited on
        os.write(write_end, line.encode()[:60000])
        os._exit(0)
    os.close(write_end)
    return pid, read_end


def _collect(pid: int, read_end: int) -> str:
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode() or "crash"


def round_(work: Path, index: int, rng: random.Random, saves: int) -> dict[str, Any]:
    """One round; returns its outcomes."""
    target = work / f"ckpt{index}"
    mc.save(state(0), target, record_code=False)
    first = [rng.choice([0, 1]) for _ in range(saves)]  # re-saves the old content (same file names)
    second = [rng.choice([2, 3]) for _ in range(saves)]
    fresh = work / f"new{index}"
    start = time.time() + 0.05
    children = [
        _fork(lambda: _writer(target, first, start)),
        _fork(lambda: _writer(target, second, start)),
        _fork(lambda: _reader(target, start, 0.05 * saves + 0.2)),
        _fork(lambda: _new_path_writer(fresh, 4, start)),
        _fork(lambda: _new_path_writer(fresh, 5, start)),
    ]
    lines = [_collect(pid, fd) for pid, fd in children]
    problems: list[str] = []
    writers, reader, racers = lines[:2], lines[2], lines[3:]
    last: set[int] = set()
    for line, versions in zip(writers, (first, second)):
        if line != "ok " + json.dumps(versions):
            problems.append(f"writer: {line}")
        last.add(versions[-1])
    reads: Counter[str] = Counter()
    try:
        reads.update(json.loads(reader))
    except ValueError:
        problems.append(f"reader: {reader}")
    if reads["mixed"]:
        problems.append(f"reader saw {reads['mixed']} mixed loads")
    if sorted(racers) != ["exists", "won"]:
        problems.append(f"new-path race: {racers}")
    for path, expected in ((target, last), (fresh, {4, 5})):
        try:
            mc.verify(path)
            module = Holder()
            mc.load(module, path, verify_digests=True)
            held = _versions_in(module)
            if len(held) != 1 or int(held.pop()) not in expected:
                problems.append(
                    f"{path.name}: holds {sorted(_versions_in(module))}, expected one of {sorted(expected)}"
                )
        except ManifestCkptError as exc:
            problems.append(f"{path.name}: broken: {type(exc).__name__}: {str(exc)[:200]}")
        if left := _leftovers(path):
            problems.append(f"{path.name}: leftovers {left}")
    return {"lines": lines, "reads": dict(reads), "problems": problems}


def run(rounds: int, saves: int, seed: int) -> dict[str, Any]:
    """Run ``rounds`` races; return the figures."""
    torch.set_num_threads(1)  # the process forks: keep it free of worker threads
    _ = (mc.save, mc.load, mc.verify)  # import once here, not in every child
    rng = random.Random(seed)
    started = time.monotonic()
    reads: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    kinds: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="mc-concurrency-") as tmp:
        for index in range(rounds):
            result = round_(Path(tmp), index, rng, saves)
            for key, count in result["reads"].items():
                reads[key] += count
            for line in result["lines"]:
                if line in ("hang", "crash") or line.startswith("untyped"):
                    kinds[line.split(" ", 1)[0]] += 1
            if result["problems"]:
                failures.append({"round": index, "problems": result["problems"][:5]})
                kinds["broken"] += sum(1 for p in result["problems"] if "broken" in p or "holds" in p)
    refused = {k: v for k, v in reads.items() if k.startswith("refused")}
    return {
        "harness": "concurrency",
        "tried": rounds,
        "saves": rounds * (2 * saves + 2),
        "reads": sum(reads.values()),
        "reads_ok": reads["ok"],
        "reads_refused": sum(refused.values()),
        "refusals": refused,
        "mixed": reads["mixed"],
        "broken": kinds["broken"],
        "untyped": kinds["untyped"] + kinds["crash"],
        "hangs": kinds["hang"],
        "failures": failures[:10],
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.concurrency", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds for CI (seconds)")
    parser.add_argument("--rounds", type=int, default=None, help="races (default 100, --quick 4)")
    parser.add_argument("--saves", type=int, default=6, help="saves per writer per round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (4 if args.quick else 100)
    figures = run(rounds, args.saves, args.seed)
    print(json.dumps(figures, sort_keys=True))
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
