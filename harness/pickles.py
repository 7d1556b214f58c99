"""Hostile-pickle harness: a corpus of live code-running torch files, none of which may run in convert.

The corpus crosses gadgets (os/posix/subprocess/eval/exec/runpy/importlib/``__import__``/nested
``pickle.loads``/timeit/cProfile/dotted attribute paths through allowlisted-looking modules), the
opcode styles of ``harness.hostile.STYLES`` (GLOBAL, STACK_GLOBAL with memo tricks, INST, OBJ,
NEWOBJ/NEWOBJ_EX, FRAME) and containers (bare pickle, legacy torch format with the payload as
main or magic pickle or injected into a real legacy file, a zip with its ``data.pkl`` swapped,
fickling-style injection at the head or tail of a real ``torch.save`` pickle, stored or deflated,
a pickle-then-zip polyglot, a Hugging Face ``pytorch_model.bin``). Every payload creates its own
sentinel file when it runs.

1. Convert: each file goes through ``mc.convert`` in a forked child with a timeout. The outcome
   must be a typed ``ManifestCkptError``, or a conversion identical (same digest) to saving the
   benign tensors the file carries; then no sentinel may exist.
2. Control: each file is loaded unsafely (``torch.load(weights_only=False)``, then a bare
   ``pickle.load`` if that ran nothing) in a forked child; its sentinel must appear, proving the
   payload is live. A dead payload is a harness failure.

Run ``python -m harness.pickles [--quick] [--seed N]``; it prints one JSON line of figures
(tried, live, refused, accepted, wrongly_accepted, executed, untyped, hangs, dead) and exits 1 when
any file was wrongly accepted, executed, untyped, hung or dead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import pickletools
import random
import shutil
import sys
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import manifest_ckpt as mc
from harness import hostile
from harness.child import in_child
from harness.hostile import STYLES, Call, Global
from manifest_ckpt.errors import ManifestCkptError
from manifest_ckpt.storage.store import read_manifest

# Styles whose pickle runs at protocol 2: fix_imports maps ``__builtin__``, dotted names are not paths.
_PROTO2_STYLES = frozenset({"GLOBAL", "GLOBAL-memo-call", "INST", "OBJ"})
CONTAINERS = (
    "bare",
    "legacy-main",
    "legacy-magic",
    "legacy-inject",
    "zip-swap",
    "zip-inject-head",
    "zip-inject-tail",
    "zip-inject-deflated",
    "zip-renamed-inject",
    "polyglot-pickle-zip",
    "hf-bin",
)
# Containers whose unsafe load still returns the carrier's tensors: converting them is allowed
# only when the result is exactly those tensors (nothing of the payload survives).
_CARRYING = frozenset(
    {
        "clean",
        "legacy-inject",
        "zip-inject-head",
        "zip-inject-tail",
        "zip-inject-deflated",
        "zip-renamed-inject",
        "hf-bin",
    }
)
_CASE_TIMEOUT = 30.0


def carrier_state() -> dict[str, torch.Tensor]:
    """The benign tensors of every carrier file."""
    generator = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 4, generator=generator), "b": torch.arange(4, dtype=torch.float32)}


def gadgets(sentinel: Path, scripts: Path) -> dict[str, Call]:
    """Gadget name -> call tree that creates ``sentinel`` when unpickled."""
    shell = f"touch {sentinel}"
    argv = ["touch", str(sentinel)]
    code = f"open({str(sentinel)!r}, 'w').close()"
    script = scripts / f"{sentinel.name}.py"
    script.write_text(code + "\n")
    os_system = Call(Global("os", "system"), shell)

    def imported(importer: Global) -> Call:  # getattr(importer("os"), "system")(shell)
        return Call(Call(Global("builtins", "getattr"), Call(importer, "os"), "system"), shell)

    return {
        "os.system": os_system,
        "posix.system": Call(Global("posix", "system"), shell),
        "os.popen": Call(Global("os", "popen"), shell),
        "subprocess.Popen": Call(Global("subprocess", "Popen"), argv),
        "subprocess.run": Call(Global("subprocess", "run"), argv),
        "subprocess.call": Call(Global("subprocess", "call"), argv),
        "subprocess.check_call": Call(Global("subprocess", "check_call"), argv),
        "subprocess.check_output": Call(Global("subprocess", "check_output"), argv),
        "subprocess.getoutput": Call(Global("subprocess", "getoutput"), shell),
        "builtins.eval": Call(Global("builtins", "eval"), code),
        "builtins.exec": Call(Global("builtins", "exec"), code),
        "__builtin__.eval": Call(Global("__builtin__", "eval"), code),
        "runpy.run_path": Call(Global("runpy", "run_path"), str(script)),
        "importlib.import_module+getattr": imported(Global("importlib", "import_module")),
        "builtins.__import__+getattr": imported(Global("builtins", "__import__")),
        "pickle.loads(nested)": Call(Global("pickle", "loads"), hostile.payload_pickle(os_system, "GLOBAL")),
        "timeit.timeit(setup)": Call(Global("timeit", "timeit"), "pass", code),
        "cProfile.run": Call(Global("cProfile", "run"), code),
        "torch.serialization.os.system": Call(Global("torch.serialization", "os.system"), shell),
        "torch.serialization.pickle.loads": Call(
            Global("torch.serialization", "pickle.loads"), hostile.payload_pickle(os_system, "GLOBAL")
        ),
    }


def _valid(gadget: str, style: str, container: str) -> bool:
    """Combinations that are live by construction (the control still proves each one)."""
    proto2 = style in _PROTO2_STYLES
    if gadget.startswith("__builtin__") and not proto2:
        return False  # only protocol < 3 maps __builtin__ to builtins
    if gadget.startswith("torch.serialization.") and proto2:
        return False  # dotted names are attribute paths only at protocol 4
    return not (style == "INST" and "+" in gadget)  # INST names its callable; a chain has none


@dataclass
class Case:
    """One corpus file."""

    index: int
    gadget: str
    style: str
    container: str
    path: Path
    sentinel: Path

    @property
    def name(self) -> str:
        return f"{self.container}/{self.style}/{self.gadget}"


class Carriers:
    """Real torch.save files of ``carrier_state`` and their pickles."""

    def __init__(self, work: Path) -> None:
        state = carrier_state()
        self.zip_path = work / "carrier.pt"
        torch.save(state, self.zip_path)
        with zipfile.ZipFile(self.zip_path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            self.data_pkl = archive.read(name)
        legacy = work / "carrier-legacy.pt"
        torch.save(state, legacy, _use_new_zipfile_serialization=False)
        self.legacy = legacy.read_bytes()
        self.legacy_main = _nth_pickle_span(self.legacy, 3)  # magic, protocol, sys_info, then main

    def zip_with_pickle(self, dst: Path, data_pkl: bytes, *, deflate: bool = False, prefix: str | None = None) -> Path:
        """The carrier zip with its data.pkl replaced (optionally deflated, optionally renamed)."""
        with zipfile.ZipFile(self.zip_path) as original, zipfile.ZipFile(dst, "w") as out:
            for info in original.infolist():
                data = data_pkl if info.filename.endswith("/data.pkl") else original.read(info)
                name = info.filename
                if prefix is not None:
                    name = prefix + name[name.index("/") :]
                compress = zipfile.ZIP_DEFLATED if deflate and info.filename.endswith("/data.pkl") else 0
                out.writestr(zipfile.ZipInfo(name, date_time=info.date_time), data, compress_type=compress)
        return dst


def _nth_pickle_span(data: bytes, n: int) -> tuple[int, int]:
    """Byte span of the ``n``-th (0-based) pickle in a stream of concatenated pickles."""
    start = 0
    for _ in range(n + 1):
        begin = start
        for opcode, _arg, pos in pickletools.genops(data[start:]):
            if opcode.name == "STOP":
                start = begin + pos + 1
                break
    return begin, start


def build(case: Case, payload: Call, carriers: Carriers) -> None:
    """Write ``case.path``."""
    container, style = case.container, case.style
    whole = hostile.payload_pickle(payload, style)
    proto4 = style not in _PROTO2_STYLES
    # A carrier pickle is protocol 2; STACK_GLOBAL styles switch it to 4 first (dotted paths work).
    injected = (hostile.PROTO4 if proto4 else b"") + hostile.assemble(payload, style) + b"0"

    def inject(carrier: bytes, at: str) -> bytes:
        if at == "head":
            return carrier[:2] + injected + carrier[2:]
        return carrier[:-1] + injected + hostile.STOP

    if container == "bare":
        case.path.write_bytes(whole)
    elif container == "legacy-main":
        case.path.write_bytes(hostile.legacy_bytes(whole))
    elif container == "legacy-magic":
        legacy = hostile.legacy_bytes(pickle.dumps([], protocol=2))
        first = _nth_pickle_span(legacy, 0)[1]
        case.path.write_bytes(whole + legacy[first:])
    elif container == "legacy-inject":
        begin, end = carriers.legacy_main
        data = carriers.legacy
        case.path.write_bytes(data[:begin] + inject(data[begin:end], "head") + data[end:])
    elif container == "zip-swap":
        carriers.zip_with_pickle(case.path, whole)
    elif container in ("zip-inject-head", "zip-inject-tail"):
        carriers.zip_with_pickle(case.path, inject(carriers.data_pkl, container.rsplit("-", 1)[1]))
    elif container == "zip-inject-deflated":
        carriers.zip_with_pickle(case.path, inject(carriers.data_pkl, "head"), deflate=True)
    elif container == "zip-renamed-inject":
        carriers.zip_with_pickle(case.path, inject(carriers.data_pkl, "tail"), prefix="weights")
    elif container == "polyglot-pickle-zip":
        case.path.write_bytes(whole + carriers.zip_path.read_bytes())
    elif container == "hf-bin":
        case.path.mkdir()
        carriers.zip_with_pickle(case.path / "pytorch_model.bin", inject(carriers.data_pkl, "head"))
    else:
        raise ValueError(container)


def corpus(work: Path, seed: int, limit: int | None) -> list[Case]:
    """Every valid (container, style, gadget) case, or ``limit`` of them sampled across containers."""
    sentinels, scripts, files = work / "sentinels", work / "scripts", work / "files"
    for folder in (sentinels, scripts, files):
        folder.mkdir()
    names = list(gadgets(sentinels / "probe", scripts))
    combos = [(c, s, g) for c in CONTAINERS for s in STYLES for g in names if _valid(g, s, c)]
    if limit is not None:
        rng = random.Random(seed)
        rng.shuffle(combos)
        by_container: dict[str, list[tuple[str, str, str]]] = {}
        for combo in combos:
            by_container.setdefault(combo[0], []).append(combo)
        picked: list[tuple[str, str, str]] = []
        while len(picked) < limit and any(by_container.values()):  # round robin over containers
            for group in by_container.values():
                if group and len(picked) < limit:
                    picked.append(group.pop())
        combos = picked
    carriers = Carriers(work)
    cases = []
    for index, (container, style, gadget) in enumerate(combos):
        sentinel = sentinels / f"s{index}"
        suffix = "" if container == "hf-bin" else (".pkl" if container == "bare" else ".pt")
        case = Case(index, gadget, style, container, files / f"f{index}{suffix}", sentinel)
        build(case, gadgets(sentinel, scripts)[gadget], carriers)
        cases.append(case)
    return cases


def convert_outcome(case: Case, out: Path, expected_digest: str) -> str:
    """``refused <Error>``, ``faithful``, ``accepted <why>``, ``untyped <Error>`` or ``hang``."""

    def work() -> str:
        try:
            mc.convert(case.path, out)
        except ManifestCkptError as exc:
            return f"refused {type(exc).__name__}"
        except BaseException as exc:  # noqa: BLE001 - an untyped error is a finding
            return f"untyped {type(exc).__name__}: {str(exc)[:200]}"
        try:
            mc.verify(out)
            digest = read_manifest(out).digest
        except ManifestCkptError as exc:
            return f"accepted output does not verify: {type(exc).__name__}"
        if case.container in _CARRYING and digest == expected_digest:
            return "faithful"
        return f"accepted digest {digest[:16]}"

    return in_child(work, _CASE_TIMEOUT, quiet=True)


def control_outcome(case: Case) -> str:
    """Load ``case`` unsafely in a child: ``torch.load`` first, a bare ``pickle.load`` if that ran nothing.

    The caller then looks for the sentinel. Some polyglots are dead under ``torch.load`` (it takes
    them for TorchScript zips and stops) but live under any plain unpickler, which reads the
    pickle at their head; the line says which loader the control used last.
    """
    path = case.path / "pytorch_model.bin" if case.container == "hf-bin" else case.path

    def work() -> str:
        with contextlib.suppress(Exception):  # the payload's result is rarely a valid checkpoint
            torch.load(path, weights_only=False)
        _wait_for([case.sentinel], 1.0)
        if case.sentinel.exists():
            return "torch.load"
        with contextlib.suppress(Exception), open(path, "rb") as f:
            pickle.load(f)  # the control: proving the payload live is its job
        return "pickle.load"

    return in_child(work, _CASE_TIMEOUT, quiet=True)


def _wait_for(paths: list[Path], seconds: float) -> None:
    """Wait until every path exists or ``seconds`` passed (spawned commands finish late)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(p.exists() for p in paths):
        time.sleep(0.02)


def run(limit: int | None, seed: int) -> dict[str, Any]:
    """Build the corpus, convert every file, then prove every payload live; return the figures."""
    torch.set_num_threads(1)  # the process forks: keep it free of worker threads
    _ = (mc.convert, mc.verify)  # import once here, not in every forked child
    started = time.monotonic()
    outcomes: Counter[str] = Counter()
    failures: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="mc-pickles-") as tmp:
        work = Path(tmp)
        cases = corpus(work, seed, limit)
        mc.save(carrier_state(), work / "expected", record_code=False)
        expected = read_manifest(work / "expected").digest
        # The clean carriers must convert faithfully: a converter that refused everything would pass.
        carriers = [work / "carrier.pt", work / "carrier-legacy.pt"]
        clean = [
            convert_outcome(Case(-1, "-", "-", "clean", p, work / "none"), work / f"clean{i}", expected)
            for i, p in enumerate(carriers)
        ]
        if clean != ["faithful", "faithful"]:
            failures.append({"case": "clean carriers", "kind": "not faithful", "convert": repr(clean)})
        converted = {case.index: convert_outcome(case, work / f"out{case.index}", expected) for case in cases}
        time.sleep(0.5)  # a payload that spawned a process would have created its sentinel by now
        executed = {case.index for case in cases if case.sentinel.exists()}
        controls = {case.index: control_outcome(case) for case in cases}
        _wait_for([c.sentinel for c in cases], 5.0)
        for case in cases:  # under load a spawned command can lag: one more unsafe load, alone
            if not case.sentinel.exists():
                controls[case.index] += " / retried: " + control_outcome(case)
                _wait_for([case.sentinel], 10.0)
        for case in cases:
            outcome = converted[case.index]
            kind = outcome.split(" ", 1)[0]
            if case.index in executed:
                kind = "executed"
            elif not case.sentinel.exists():
                kind = "dead"
            outcomes[kind] += 1
            if kind not in ("refused", "faithful"):
                failures.append({"case": case.name, "kind": kind, "convert": outcome, "control": controls[case.index]})
        live = len(cases) - outcomes["dead"]
        live_pickle_only = sum(1 for c in cases if controls[c.index].endswith("pickle.load") and c.sentinel.exists())
        shutil.rmtree(work / "files")
    return {
        "harness": "pickles",
        "tried": len(cases),
        "live": live,
        "live_only_under_pickle_load": live_pickle_only,
        "refused": outcomes["refused"],
        "accepted": outcomes["faithful"],
        "wrongly_accepted": outcomes["accepted"],
        "executed": outcomes["executed"],
        "untyped": outcomes["untyped"],
        "hangs": outcomes["hang"] + outcomes["crash"],
        "dead": outcomes["dead"],
        "clean_carriers_faithful": clean.count("faithful"),
        "containers": len({c.container for c in cases}),
        "styles": len({c.style for c in cases}),
        "gadgets": len({c.gadget for c in cases}),
        "failures": failures[:10],
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.pickles", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a sample across every container for CI (seconds)")
    parser.add_argument("--limit", type=int, default=None, help="sample this many files (default: all; --quick 22)")
    parser.add_argument("--seed", type=int, default=0, help="which sample --quick/--limit takes")
    args = parser.parse_args(argv)
    limit = args.limit if args.limit is not None else (22 if args.quick else None)
    figures = run(limit, args.seed)
    print(json.dumps(figures, sort_keys=True))
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
