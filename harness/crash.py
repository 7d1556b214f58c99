"""kill -9 crash harness: a writer killed at any point leaves the old checkpoint, the new one, or none.

A forked child runs one operation (``save`` over an existing checkpoint, ``save`` to a new path,
``pack`` over an existing archive, ``convert`` or ``unpack`` to a new path) and is killed with SIGKILL either at
an instrumented point (just before or after the k-th filesystem call that commits, renames,
removes or syncs) or after a random delay. The parent then checks the invariant:

* the target verifies and holds exactly the old or the new tensors, or (new path) is absent;
* never a manifest without its files, never a target that fails ``verify``;
* the next operation on the same target succeeds and leaves no staging or temporary leftovers.

Run ``python -m harness.crash [--quick] [--seed N]``; it prints one JSON line of figures and exits 1
when any kill left a broken state.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import manifest_ckpt as mc
from manifest_ckpt.errors import ManifestCkptError
from manifest_ckpt.storage.store import read_manifest

OPERATIONS = ("overwrite", "new", "pack", "convert", "unpack")
# Filesystem calls at which a kill is injected (module attribute, name).
_POINTS: tuple[tuple[Any, str], ...] = (
    (os, "replace"),
    (os, "rename"),
    (os, "unlink"),
    (os, "rmdir"),
    (os, "mkdir"),
    (os, "fsync"),
    (shutil, "rmtree"),
)


def state(version: int) -> dict[str, torch.Tensor]:
    """Tensors of checkpoint version ``version``: distinct digests per version."""
    return {
        "w": torch.full((64, 64), float(version)),
        "b": torch.arange(256, dtype=torch.float32) + version,
    }


def _instrument(kill_at: int, after: bool) -> None:
    """Make the ``kill_at``-th instrumented call (counted across all of them) SIGKILL this process."""
    count = 0

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            if count == kill_at and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if count == kill_at and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return call

    for module, name in _POINTS:
        setattr(module, name, wrap(getattr(module, name)))


def count_calls(operation: str, work: Path) -> int:
    """How many instrumented calls one ``operation`` makes (run once on a scratch target)."""
    count = 0
    originals = [(module, name, getattr(module, name)) for module, name in _POINTS]

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            return original(*args, **kwargs)

        return call

    scratch = work / "scratch"
    if operation in ("overwrite", "pack"):  # these replace an existing target
        _run(operation, work, 0, scratch)
    try:
        for module, name, original in originals:
            setattr(module, name, wrap(original))
        _run(operation, work, 1, scratch)
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
    (shutil.rmtree if scratch.is_dir() else os.unlink)(scratch)
    return count


def _run(operation: str, work: Path, version: int, target: Path) -> None:
    if operation == "overwrite":
        mc.save(state(version), target, overwrite=True, record_code=False)
    elif operation == "new":
        mc.save(state(version), target, record_code=False)
    elif operation == "pack":
        mc.pack(work / f"v{version}", target, overwrite=True)
    elif operation == "unpack":
        mc.unpack(work / f"v{version}.tar", target)
    else:
        mc.convert(work / f"v{version}.pth", target)


def _target(operation: str, work: Path, trial: int) -> Path:
    if operation == "overwrite":
        return work / "ckpt"
    if operation == "pack":
        return work / "ckpt.tar"
    return work / f"{operation}-{trial}"


def _versions(path: Path, digests: dict[str, int]) -> int | None:
    """The version held at ``path`` (after ``verify``), or None when it is not a known version."""
    manifest = read_manifest(path)
    return digests.get(manifest.tensors["w"].digest)


def _leftovers(target: Path) -> list[str]:
    """Names next to or inside ``target`` that a killed writer leaves."""
    prefix = f".{target.name}."
    other = f".{target.name}.tar."  # the archive ckpt.tar's temporaries are not ckpt's
    names = [n for n in os.listdir(target.parent) if n.startswith(prefix) and not n.startswith(other)]
    if target.is_dir():
        referenced = set(json.loads((target / "manifest.json").read_bytes()).get("files", {}))
        names += [
            f"{target.name}/{name}"
            for name in os.listdir(target)
            if name != "manifest.json" and name not in referenced
        ]
    return names


def _classify(operation: str, target: Path, old: int | None, new: int, digests: dict[str, int]) -> str:
    if not target.exists():
        return "absent" if old is None else "broken: old checkpoint gone"
    try:
        mc.verify(target)
        held = _versions(target, digests)
    except ManifestCkptError as exc:
        return f"broken: {type(exc).__name__}: {str(exc)[:120]}"
    if held == old:
        return "old"
    if held == new:
        return "new"
    return f"broken: holds version {held}"


def trial(
    work: Path, operation: str, trial_index: int, rng: random.Random, digests: dict[str, int], calls: int
) -> dict[str, Any]:
    """Fork, run ``operation``, kill it; return the outcome and the recovery check."""
    target = _target(operation, work, trial_index)
    old = _versions(target, digests) if target.exists() else None
    new = rng.choice([v for v in digests.values() if v != old])
    random_delay = rng.random() < 0.25
    kill_at, after = rng.randint(1, calls), rng.random() < 0.5
    delay = rng.uniform(0.0, 0.03)
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 0
        try:
            if not random_delay:
                _instrument(kill_at, after)
            _run(operation, work, new, target)
        except BaseException:  # noqa: BLE001 - report any failure of the op to the parent
            code = 3
        os._exit(code)
    if random_delay:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status)
    if not killed and os.WEXITSTATUS(status) != 0:
        return {"operation": operation, "outcome": "broken: operation failed without a kill"}
    outcome = _classify(operation, target, old, new, digests)
    if not killed and outcome != "new":
        outcome = f"broken: completed but target is {outcome}"
    # Recovery: the next operation on the same target succeeds and leaves no leftovers.
    recovery = "ok"
    try:
        if operation in ("new", "convert", "unpack"):
            if target.exists():
                shutil.rmtree(target)
            _run(operation, work, new, target)
        else:
            _run(operation, work, new, target)
        if _classify(operation, target, None, new, digests) != "new":
            recovery = "broken: recovery did not write the new version"
        elif left := _leftovers(target):
            recovery = f"leftovers: {left}"
    except ManifestCkptError as exc:
        recovery = f"broken: recovery failed: {type(exc).__name__}: {exc}"
    return {"operation": operation, "killed": killed, "outcome": outcome, "recovery": recovery}


def _prepare(work: Path, versions: int) -> dict[str, int]:
    digests = {}
    for version in range(versions):
        ref = work / f"v{version}"
        mc.save(state(version), ref, record_code=False)
        torch.save(state(version), work / f"v{version}.pth")
        mc.pack(ref, work / f"v{version}.tar")
        digests[read_manifest(ref).tensors["w"].digest] = version
    mc.save(state(0), work / "ckpt", record_code=False)
    mc.pack(work / "v0", work / "ckpt.tar")
    return digests


def run(trials: int, seed: int) -> dict[str, Any]:
    """Run ``trials`` kills spread over the operations; return the figures."""
    torch.set_num_threads(1)  # the parent forks: keep it free of worker threads
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    killed = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mc-crash-") as tmp:
        work = Path(tmp)
        digests = _prepare(work, 3)
        calls = {operation: count_calls(operation, work) for operation in OPERATIONS}
        for index in range(trials):
            operation = OPERATIONS[index % len(OPERATIONS)]
            result = trial(work, operation, index, rng, digests, calls[operation])
            killed += bool(result.get("killed"))
            outcomes[f"{result['operation']}:{result['outcome']}"] += 1
            if result["outcome"].startswith("broken") or result.get("recovery", "ok") != "ok":
                failures.append(result)
    return {
        "harness": "crash",
        "tried": trials,
        "kills": killed,
        "broken": sum(1 for f in failures if f["outcome"].startswith("broken")),
        "recovery_failures": sum(1 for f in failures if f.get("recovery", "ok") != "ok"),
        "outcomes": dict(sorted(outcomes.items())),
        "failures": failures[:10],
        "instrumented_calls": calls,
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.crash", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run for CI (a few seconds)")
    parser.add_argument("--trials", type=int, default=None, help="number of kills (default 400, --quick 24)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    trials = args.trials if args.trials is not None else (24 if args.quick else 400)
    figures = run(trials, args.seed)
    print(json.dumps(figures, sort_keys=True))
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
