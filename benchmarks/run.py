"""Benchmark manifest-ckpt side by side with ``torch.save``/``torch.load`` and safetensors.

Run from the repository root::

    python -m benchmarks.run                  # full run (about 15 minutes on 2 cores)
    python -m benchmarks.run --quick          # tiny sizes, seconds: proves the harness works
    python -m benchmarks.run --update-readme  # full run, then refresh benchmarks/README.md

Every case is a synthetic module built here (nothing is downloaded). For each operation the
contenders run interleaved (A B C A B C ...) after one warm-up round, on page-cache-warm files
(see :func:`time_interleaved`);
the table gives the median of ``--repeats`` runs (5 by default), the min-max spread, GB/s, the
ratio to the best peer, and the peak extra anonymous memory (``RssAnon``) of loads and
conversions, measured in a fresh forked process (see :func:`_probe_child`). Results go to
``benchmarks/results/`` as Markdown, JSON and a PNG chart (``quick.*`` in quick mode).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import itertools
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.format.integrity import WORKERS

REPO: Final = Path(__file__).resolve().parent.parent
DEFAULT_OUT: Final = REPO / "benchmarks" / "results"
DEFAULT_WORK: Final = REPO / "benchmarks" / "work"
README: Final = REPO / "benchmarks" / "README.md"
JSON_FORMAT: Final = "manifest-ckpt-bench/1"
OPERATIONS: Final = ("save", "async_save", "load", "load_verify", "check", "validate", "convert")
# Where a fresh process records its anonymous memory; sampled every millisecond.
_STATUS: Final = "/proc/self/status"
_SAMPLE_S: Final = 0.001


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """A synthetic model: how to build it, what it stands for, which contenders it leaves out.

    Attributes:
        skip: ``(contender name, reason)`` pairs not run for this case (to keep a full run
            within its time budget where a contender adds nothing).
        skip_ops: ``(operation, reason)`` pairs whose every contender is left out.
        quick_warmup: warm up on the quick-size version of the case instead: for a case whose
            every run takes seconds, one-off costs of milliseconds vanish in the median anyway.
    """

    name: str
    title: str
    build: Callable[[], nn.Module]
    skip: tuple[tuple[str, str], ...] = ()
    skip_ops: tuple[tuple[str, str], ...] = ()
    quick_warmup: bool = False


@contextmanager
def _no_init() -> Iterator[None]:
    """Skip torch's random initialisation while building: values are filled afterwards.

    Only the set-up gets faster (50,000 ``nn.Linear`` take seconds to initialise); the
    modules and their class names stay the standard torch ones the checkpoint records.
    """
    classes = (nn.Linear, nn.Embedding, nn.RMSNorm)
    saved = [(c, c.__dict__["reset_parameters"]) for c in classes]
    try:
        for c in classes:
            setattr(c, "reset_parameters", lambda self: None)  # noqa: B010 - patching a method on purpose
        yield
    finally:
        for c, original in saved:
            setattr(c, "reset_parameters", original)  # noqa: B010


def _linear_tree(widths: Sequence[int], n_in: int, n_out: int) -> nn.Module:
    """Nested ``nn.Sequential`` with ``widths[i]`` children per level and Linear leaves.

    ``(10, 10, 20, 25)`` gives 50,000 Linear layers with keys like ``1.2.3.4.weight``. The
    nesting matters to the peers: torch's ``load_state_dict`` filters the state dict below a
    module once per child, so its cost grows with (children per level x keys); one flat
    level of 1,000 blocks would take minutes for a reason unrelated to file formats.
    """
    with _no_init():

        def level(i: int) -> nn.Module:
            if i == len(widths) - 1:
                return nn.Sequential(*(nn.Linear(n_in, n_out) for _ in range(widths[i])))
            return nn.Sequential(*(level(i + 1) for _ in range(widths[i])))

        return level(0)


def _linear_stack(layers: int, width: int) -> nn.Module:
    with _no_init():
        return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def _decoder(vocab: int, hidden: int, ffn: int, blocks: int) -> nn.Module:
    """A Llama-shaped decoder in bfloat16, built from standard torch layers only."""
    bf16 = torch.bfloat16

    def block() -> nn.Module:
        return nn.ModuleDict(
            {
                "attn_norm": nn.RMSNorm(hidden, dtype=bf16),
                "q": nn.Linear(hidden, hidden, bias=False, dtype=bf16),
                "k": nn.Linear(hidden, hidden, bias=False, dtype=bf16),
                "v": nn.Linear(hidden, hidden, bias=False, dtype=bf16),
                "o": nn.Linear(hidden, hidden, bias=False, dtype=bf16),
                "mlp_norm": nn.RMSNorm(hidden, dtype=bf16),
                "gate": nn.Linear(hidden, ffn, bias=False, dtype=bf16),
                "up": nn.Linear(hidden, ffn, bias=False, dtype=bf16),
                "down": nn.Linear(ffn, hidden, bias=False, dtype=bf16),
            }
        )

    with _no_init():
        return nn.ModuleDict(
            {
                "embed": nn.Embedding(vocab, hidden, dtype=bf16),
                "blocks": nn.ModuleList(block() for _ in range(blocks)),
                "norm": nn.RMSNorm(hidden, dtype=bf16),
                "lm_head": nn.Linear(hidden, vocab, bias=False, dtype=bf16),
            }
        )


_SAME_FOR_TINY = (
    "skipped for this case (time budget): with 4 MB of data, mapping the file changes nothing "
    "(trial run: within 1% of the row above)"
)


def cases(quick: bool) -> list[Case]:
    """The four cases of the issue, at full or quick (tiny) size."""
    if quick:
        return [
            Case("large", "32 large fp32 tensors (quick: 1 MB)", lambda: _linear_stack(16, 128)),
            Case("small", "many small fp32 tensors (quick: 200)", lambda: _linear_tree((10, 10), 50, 100)),
            Case("tiny", "tiny-tensor module (quick: 500 tensors)", lambda: _linear_tree((5, 5, 10), 4, 4)),
            Case("bf16", "bfloat16 decoder (quick)", lambda: _decoder(256, 64, 128, 2)),
        ]
    return [
        Case("large", "1 GB in 32 fp32 tensors (16 x Linear 4096)", lambda: _linear_stack(16, 4096)),
        Case(
            "small",
            "200 MB in 20,000 fp32 tensors (20x20x25 Linear 50->100)",
            lambda: _linear_tree((20, 20, 25), 50, 100),
        ),
        Case(
            "tiny",
            "100,000 tiny fp32 tensors (10x10x20x25 Linear 4->4)",
            lambda: _linear_tree((10, 10, 20, 25), 4, 4),
            skip=(
                ("torch.load.mmap", _SAME_FOR_TINY),
                ("torch.load.mmap+save_file", _SAME_FOR_TINY),
                ("mc.verify", "skipped for this case (time budget): the verifying load above includes it"),
            ),
            skip_ops=(
                ("load_verify", "skipped for this case (time budget): 4 MB hash in 0.1 s, the rest is the load above"),
                ("convert", "skipped for this case (time budget, 3 min): per-tensor costs show in the small case"),
            ),
            quick_warmup=True,
        ),
        Case("bf16", "bfloat16 Llama-shaped decoder, 8 blocks, hidden 1024", lambda: _decoder(32000, 1024, 2816, 8)),
    ]


def _fill(model: nn.Module, *, zeros: bool) -> None:
    """Give every tensor values (touching every page, so memory baselines include them)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if zeros:
                tensor.zero_()
            else:
                tensor.uniform_(-0.5, 0.5, generator=generator)


def _weights_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# --------------------------------------------------------------------------- contenders

# A run returns an optional clean-up (deleting what it wrote), called outside the timing.
Run = Callable[[], Callable[[], None] | None]


@dataclass(frozen=True)
class Contender:
    """One way of doing an operation.

    Attributes:
        name: short stable identifier, used in JSON and by the memory probe.
        label: what the table shows.
        role: ``ours`` (the manifest-ckpt row the targets use), ``peer`` (what users would
            otherwise call) or ``info`` (an extra manifest-ckpt row, for context).
        run: the timed call.
        memory: whether its peak extra anonymous memory is probed.
        note: why it was skipped, or a caveat.
    """

    name: str
    label: str
    role: str
    run: Run | None
    memory: bool = False
    note: str = ""


@dataclass
class Ctx:
    """One case's model and files on disk."""

    case: Case
    model: nn.Module
    work: Path
    _counter: Iterator[int] = field(default_factory=itertools.count)

    @property
    def ckpt(self) -> Path:
        return self.work / "ckpt"

    @property
    def pth(self) -> Path:
        return self.work / "model.pth"

    @property
    def safetensors(self) -> Path:
        return self.work / "model.safetensors"

    def fresh(self, tag: str) -> Path:
        """A new output path under ``work/out`` (the directory exists)."""
        out = self.work / "out"
        out.mkdir(parents=True, exist_ok=True)
        return out / f"{tag}-{os.getpid()}-{next(self._counter)}"


def _remover(path: Path) -> Callable[[], None]:
    def remove() -> None:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    return remove


def _find_convert() -> Callable[..., Any] | None:
    """``manifest_ckpt.sources.convert`` (the .pth converter), or None while it does not exist."""
    found: Any = getattr(mc, "convert", None)
    if found is None:
        try:
            import manifest_ckpt.sources.convert as found
        except ImportError:
            return None
    if not callable(found):  # the module rather than the function
        found = getattr(found, "convert", None)
    return found if callable(found) else None


def _save_ops(ctx: Ctx) -> list[Contender]:
    from safetensors.torch import save_file

    def ours() -> Callable[[], None]:
        dst = ctx.fresh("mc")
        mc.save(ctx.model, dst, record_code=False)
        return _remover(dst)

    def torch_save() -> Callable[[], None]:
        dst = ctx.fresh("pth")
        torch.save(ctx.model.state_dict(), dst)
        return _remover(dst)

    def st_save() -> Callable[[], None]:
        dst = ctx.fresh("st")
        save_file(ctx.model.state_dict(), dst)
        return _remover(dst)

    return [
        Contender("mc.save", "manifest-ckpt save (sha256 digests)", "ours", ours),
        Contender("torch.save", "torch.save(state_dict)", "peer", torch_save),
        Contender("st.save_file", "safetensors save_file", "peer", st_save),
    ]


def _async_save_ops(ctx: Ctx) -> list[Contender]:
    """The time ``mc.async_save`` blocks its caller (the staging copy), against a whole ``save_file``.

    The timed call returns once the state is staged; waiting for the background write (and
    deleting it) is the clean-up, outside the timing, so the next run starts on a quiet machine.
    """
    from safetensors.torch import save_file

    def ours() -> Callable[[], None]:
        dst = ctx.fresh("mc-async")
        future = mc.async_save(ctx.model, dst, record_code=False)

        def finish() -> None:
            future.result()
            _remover(dst)()

        return finish

    def st_save() -> Callable[[], None]:
        dst = ctx.fresh("st-async")
        save_file(ctx.model.state_dict(), dst)
        return _remover(dst)

    return [
        Contender("mc.async_save", "manifest-ckpt async_save: time the caller is blocked", "ours", ours),
        Contender("st.save_file", "safetensors save_file", "peer", st_save),
    ]


def _load_ops(ctx: Ctx) -> list[Contender]:
    from safetensors.torch import load_model

    def ours() -> None:
        mc.load(ctx.model, ctx.ckpt)

    def torch_load() -> None:
        ctx.model.load_state_dict(torch.load(ctx.pth, weights_only=True))

    def torch_mmap() -> None:
        ctx.model.load_state_dict(torch.load(ctx.pth, weights_only=True, mmap=True))

    def st_load() -> None:
        load_model(ctx.model, ctx.safetensors)

    return [
        Contender("mc.load", "manifest-ckpt load (all structure checks)", "ours", ours, memory=True),
        Contender("torch.load", "torch.load + load_state_dict", "peer", torch_load, memory=True),
        Contender("torch.load.mmap", "torch.load(mmap=True) + load_state_dict", "peer", torch_mmap, memory=True),
        Contender("st.load_model", "safetensors load_model", "peer", st_load, memory=True),
    ]


def _hash_only(ckpt: Path, workers: int) -> Run:
    """Hash every stored tensor's bytes with sha256 on ``workers`` threads, and nothing else.

    The work is split into ``workers`` lists of equal byte counts (a tensor is one sha256
    stream, so it cannot be split), each hashed in a plain loop: the ceiling a verifying
    load can approach.
    """
    manifest = mc.read_manifest(ckpt)
    pieces = sorted(
        ((c.file, c.byte_range) for t in manifest.tensors.values() for c in t.pieces()),
        key=lambda p: p[1][0] - p[1][1],
    )
    lists: list[list[tuple[str, tuple[int, int]]]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for piece in pieces:  # largest first, each to the least-loaded list
        i = loads.index(min(loads))
        lists[i].append(piece)
        loads[i] += piece[1][1] - piece[1][0]

    def run() -> None:
        maps: dict[str, mmap.mmap] = {}
        for name in manifest.files:
            with open(ckpt / name, "rb") as f:
                maps[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        views = {name: memoryview(m) for name, m in maps.items()}

        def work(items: list[tuple[str, tuple[int, int]]]) -> list[str]:
            return [hashlib.sha256(views[f][s:e]).hexdigest() for f, (s, e) in items]

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, lists))
        for view in views.values():
            view.release()
        for m in maps.values():
            m.close()

    return run


def _load_verify_ops(ctx: Ctx) -> list[Contender]:
    def ours() -> None:
        mc.load(ctx.model, ctx.ckpt, verify_digests=True)

    def verify() -> None:
        mc.verify(ctx.ckpt)

    return [
        Contender("mc.load.verify", "manifest-ckpt load(verify_digests=True)", "ours", ours, memory=True),
        Contender(
            "sha256", f"sha256 of the same bytes, {WORKERS} threads (hash only)", "peer", _hash_only(ctx.ckpt, WORKERS)
        ),
        Contender("mc.verify", "manifest-ckpt verify (no load)", "info", verify),
    ]


def _check_ops(ctx: Ctx) -> list[Contender]:
    def ours() -> None:
        mc.check(ctx.model, ctx.ckpt)

    def read() -> None:
        mc.read_manifest(ctx.ckpt)

    return [
        Contender("mc.check", "manifest-ckpt check (parse + validate + compare)", "ours", ours),
        Contender("mc.read_manifest", "manifest-ckpt read_manifest (parse + validate)", "info", read),
    ]


def _validate_ops(ctx: Ctx) -> list[Contender]:
    from jsonschema import Draft202012Validator

    from manifest_ckpt.format import schema as _validate

    document = json.loads((ctx.ckpt / "manifest.json").read_bytes())
    reference = Draft202012Validator(_validate.load_schema())

    def ours() -> None:
        _validate.validate(document)

    def plain() -> None:
        reference.validate(document)

    return [
        Contender("mc.validate", "manifest-ckpt schema validation (jsonschema-rs)", "ours", ours),
        Contender("jsonschema", "jsonschema Draft202012Validator.validate", "peer", plain),
    ]


def _convert_ops(ctx: Ctx) -> list[Contender]:
    from safetensors.torch import save_file

    convert = _find_convert()

    def ours() -> Callable[[], None]:
        assert convert is not None
        dst = ctx.fresh("conv-mc")
        convert(ctx.pth, dst)
        return _remover(dst)

    def by_hand() -> Callable[[], None]:
        dst = ctx.fresh("conv-st")
        save_file(torch.load(ctx.pth, weights_only=True), dst)
        return _remover(dst)

    def by_hand_mmap() -> Callable[[], None]:
        dst = ctx.fresh("conv-st-mmap")
        save_file(torch.load(ctx.pth, weights_only=True, mmap=True), dst)
        return _remover(dst)

    missing = "skipped: manifest_ckpt.sources.convert does not exist yet" if convert is None else ""
    return [
        Contender(
            "mc.convert", "manifest-ckpt convert (.pth -> checkpoint)", "ours", ours if convert else None, True, missing
        ),
        Contender("torch.load+save_file", "torch.load + safetensors save_file", "peer", by_hand, memory=True),
        Contender("torch.load.mmap+save_file", "torch.load(mmap=True) + save_file", "peer", by_hand_mmap, memory=True),
    ]


_OPS: Final[dict[str, Callable[[Ctx], list[Contender]]]] = {
    "save": _save_ops,
    "async_save": _async_save_ops,
    "load": _load_ops,
    "load_verify": _load_verify_ops,
    "check": _check_ops,
    "validate": _validate_ops,
    "convert": _convert_ops,
}


def _prepare(ctx: Ctx) -> None:
    """Write the files every operation reads, and check the benchmark measures a valid load."""
    from safetensors.torch import save_file

    if ctx.work.exists():
        shutil.rmtree(ctx.work)
    ctx.work.mkdir(parents=True)
    mc.save(ctx.model, ctx.ckpt, record_code=False)
    state = ctx.model.state_dict()
    torch.save(state, ctx.pth)
    save_file(state, ctx.safetensors)
    report = mc.check(ctx.model, ctx.ckpt)
    if not report.ok:
        raise RuntimeError(f"benchmark checkpoint does not match its own module:\n{report}")


# --------------------------------------------------------------------------- timing


def time_interleaved(
    contenders: Sequence[Contender], repeats: int, warmup: Sequence[Contender] | None = None
) -> dict[str, list[float]]:
    """One warm-up round, then ``repeats`` rounds running every contender once, in order.

    The warm-up round runs ``warmup`` (for a case marked ``quick_warmup``, the same
    contenders on its quick-size version: same code paths at a fraction of the cost) or,
    without it, ``contenders``; it is not recorded. Garbage is collected before each call and clean-ups run after it, both
    untimed. The cyclic GC stays enabled during the calls, as in a real process (so
    collections that a call's own allocations trigger are part of its time).
    """

    def once(c: Contender) -> float:
        assert c.run is not None
        gc.collect()
        start = time.perf_counter()
        cleanup = c.run()
        elapsed = time.perf_counter() - start
        if cleanup is not None:
            cleanup()
        return elapsed

    live = [c for c in contenders if c.run is not None]
    warm = {c.name: c for c in (warmup if warmup is not None else contenders) if c.run is not None}
    for c in live:
        once(warm.get(c.name, c))
    times: dict[str, list[float]] = {c.name: [] for c in live}
    for _ in range(repeats):
        for c in live:
            times[c.name].append(once(c))
    return times


def _apply_skips(case: Case, contenders: list[Contender]) -> list[Contender]:
    """The contenders with those the case skips left without a run, and the reason noted."""
    reasons = dict(case.skip)
    return [
        Contender(c.name, c.label, c.role, None, c.memory, reasons[c.name]) if c.name in reasons else c
        for c in contenders
    ]


def summarise(times: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of durations in seconds."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Set ``ratio_to_best_peer`` on the rows of one case and operation (None without peers)."""
    peers = [r["median_s"] for r in rows if r["role"] == "peer" and r.get("median_s") is not None]
    best = min(peers) if peers else None
    for r in rows:
        median = r.get("median_s")
        r["ratio_to_best_peer"] = None if best is None or median is None else median / best


# --------------------------------------------------------------------------- memory


def rss_anon(fd: int) -> int:
    """This process's resident anonymous memory in bytes, from an open ``/proc/self/status``."""
    text = os.pread(fd, 16384, 0).decode()
    start = text.index("RssAnon:") + len("RssAnon:")
    return int(text[start : text.index("kB", start)]) * 1024


class _Sampler(threading.Thread):
    """Reads ``RssAnon`` every millisecond and keeps the peak."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.peak = rss_anon(fd)
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(_SAMPLE_S):
            self.peak = max(self.peak, rss_anon(self.fd))
            self.samples += 1

    def finish(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, rss_anon(self.fd))


def _probe_child(job: dict[str, Any], quick: bool, workdir: Path) -> dict[str, Any]:
    """Measure one contender's peak extra ``RssAnon`` in this freshly forked process.

    The process imported torch and the libraries but never ran a tensor operation before
    forking (GNU OpenMP cannot survive a fork after a parallel region). Here it builds the
    case's module, touches every page of it, collects garbage and reads the baseline; a
    sampling thread then reads ``/proc/self/status`` every millisecond (the switch interval
    is shortened so pure-Python phases yield to it) while the operation runs once. Heap left
    over from earlier work is what makes in-process figures too low, hence a fresh process.
    """
    case = next(c for c in cases(quick) if c.name == job["case"])
    # A conversion reads a file into a new checkpoint: the module would only be dead weight.
    model = nn.Module() if job["op"] == "convert" else case.build()
    _fill(model, zeros=True)
    ctx = Ctx(case, model, workdir / case.name)
    contender = next(c for c in _OPS[job["op"]](ctx) if c.name == job["contender"])
    assert contender.run is not None
    sys.setswitchinterval(0.0002)
    fd = os.open(_STATUS, os.O_RDONLY)
    gc.collect()
    base = rss_anon(fd)
    sampler = _Sampler(fd)
    sampler.start()
    cleanup = contender.run()
    peak = sampler.finish()
    if cleanup is not None:
        cleanup()
    return {"baseline": base, "peak": peak, "extra": peak - base, "samples": sampler.samples}


def _warm_libraries(workdir: Path) -> None:
    """Import and exercise, on one-element tensors, everything the probes call.

    One-time costs (imports, the schema compiled on first use) are then paid before the fork
    and not counted as memory of the operation. One-element tensors never start OpenMP.
    """
    from safetensors.torch import load_file, save_file

    warm = workdir / "_warm"
    if warm.exists():
        shutil.rmtree(warm)
    warm.mkdir(parents=True)
    state = {"weight": torch.zeros(1, 1)}
    mc.save(state, warm / "ckpt", record_code=False)
    mc.read_manifest(warm / "ckpt")
    mc.load(nn.Linear(1, 1, bias=False), warm / "ckpt", verify_digests=True)
    torch.save(state, warm / "w.pth")
    torch.load(warm / "w.pth", weights_only=True)
    torch.load(warm / "w.pth", weights_only=True, mmap=True)
    save_file(state, warm / "w.st")
    load_file(warm / "w.st")
    shutil.rmtree(warm)


def _probe_server(quick: bool, workdir: Path) -> int:
    """Answer one JSON job per stdin line with one JSON result line, each in a forked child."""
    _warm_libraries(workdir)
    gc.collect()
    gc.freeze()  # children inherit it: their collections skip torch's own objects
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report through the pipe, never return
            os.close(read_end)
            try:
                result = _probe_child(job, quick, workdir)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which records it
                result = {"error": f"{type(exc).__name__}: {exc}"}
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(write_end, data) :]
            os._exit(0)
        os.close(write_end)
        chunks = []
        while block := os.read(read_end, 65536):
            chunks.append(block)
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        answer = b"".join(chunks).decode() or json.dumps({"error": f"probe process died (wait status {status})"})
        print(answer, flush=True)
    return 0


class Prober:
    """The main process's handle on the probe server (a fresh interpreter)."""

    def __init__(self, quick: bool, workdir: Path) -> None:
        argv = [sys.executable, "-m", "benchmarks.run", "--_probe-server", "--workdir", str(workdir)]
        self.proc = subprocess.Popen(
            [*argv, "--quick"] if quick else argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        self._ask(None)

    def _ask(self, job: dict[str, Any] | None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if job is not None:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"memory probe server exited (code {self.proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def probe(self, case: str, op: str, contender: str) -> dict[str, Any]:
        return self._ask({"case": case, "op": op, "contender": contender})

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# --------------------------------------------------------------------------- machine


def _reference_points(size: int) -> dict[str, float]:
    """sha256 on one thread and on ``WORKERS`` threads, and a tensor copy, in GB/s."""
    data = torch.randint(0, 256, (size,), dtype=torch.uint8)
    view = data.numpy().data
    start = time.perf_counter()
    hashlib.sha256(view).digest()
    one = size / (time.perf_counter() - start) / 1e9
    parts = [view[i : i + size // WORKERS] for i in range(0, size, size // WORKERS)]
    with ThreadPoolExecutor(WORKERS) as pool:
        start = time.perf_counter()
        list(pool.map(lambda p: hashlib.sha256(p).digest(), parts))
        many = size / (time.perf_counter() - start) / 1e9
    target = torch.empty_like(data)
    target.copy_(data)
    start = time.perf_counter()
    target.copy_(data)
    copy = size / (time.perf_counter() - start) / 1e9
    return {"sha256_1_thread_gb_s": one, f"sha256_{WORKERS}_threads_gb_s": many, "tensor_copy_gb_s": copy}


def _first(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _filesystem(path: Path) -> str:
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def machine(workdir: Path, quick: bool) -> dict[str, Any]:
    """What the numbers were measured on."""
    from importlib.metadata import version

    return {
        "cpu": _first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory": _first("/proc/meminfo", "MemTotal"),
        "os": platform.platform(),
        "workdir_filesystem": _filesystem(workdir.resolve()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "safetensors": version("safetensors"),
        "jsonschema": version("jsonschema"),
        "numpy": version("numpy"),
        "manifest_ckpt": mc.__version__,
        "digest_workers": WORKERS,
        # Other work on the machine skews every figure; recorded so readers can tell.
        "load_average_start": list(os.getloadavg()),
        "reference": _reference_points((16 if quick else 256) << 20),
    }


# --------------------------------------------------------------------------- the run


def run_case(
    case: Case,
    ops: Sequence[str],
    repeats: int,
    workdir: Path,
    prober: Prober | None,
    log: Callable[[str], None],
    *,
    quick: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Build, prepare, time and probe one case; return its description and result rows."""
    started = time.perf_counter()
    model = case.build()
    _fill(model, zeros=False)
    ctx = Ctx(case, model, workdir / case.name)
    _prepare(ctx)
    warm_ctx = ctx
    if case.quick_warmup and not quick:
        small = next(c for c in cases(True) if c.name == case.name)
        warm_model = small.build()
        _fill(warm_model, zeros=False)
        warm_ctx = Ctx(small, warm_model, workdir / f"{case.name}-warmup")
        _prepare(warm_ctx)
    # Written files are cached but dirty; flushing them now keeps writeback out of the timings.
    os.sync()
    state = model.state_dict()
    info: dict[str, Any] = {
        "name": case.name,
        "title": case.title,
        "tensors": len(state),
        "bytes": _weights_bytes(model),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
    }
    del state
    log(
        f"[{case.name}] {info['tensors']} tensors, {info['bytes'] / 1e6:.1f} MB, set up in {time.perf_counter() - started:.1f} s"
    )
    rows: list[dict[str, Any]] = []
    for op in ops:
        skipped_op = dict(case.skip_ops).get(op)
        if skipped_op is not None:  # rows that say so; labels from the (cheaper) warm-up context
            contenders = [Contender(c.name, c.label, c.role, None, c.memory, skipped_op) for c in _OPS[op](warm_ctx)]
        else:
            contenders = _apply_skips(case, _OPS[op](ctx))
        started = time.perf_counter()
        times = time_interleaved(contenders, repeats, _OPS[op](warm_ctx) if warm_ctx is not ctx else None)
        op_rows = []
        for c in contenders:
            row: dict[str, Any] = {"case": case.name, "op": op, "contender": c.name, "label": c.label, "role": c.role}
            row["note"] = c.note
            row["times_s"] = times.get(c.name, [])
            row.update(
                summarise(row["times_s"]) if row["times_s"] else {"median_s": None, "min_s": None, "max_s": None}
            )
            moves_weights = op in ("save", "async_save", "load", "load_verify", "convert")
            row["gb_per_s"] = info["bytes"] / row["median_s"] / 1e9 if moves_weights and row["median_s"] else None
            row["rss_anon_extra_bytes"] = None
            row["rss_anon_extra_pct"] = None
            if prober is not None and c.memory and c.run is not None:
                answer = prober.probe(case.name, op, c.name)
                if "error" in answer:
                    row["note"] = f"memory probe failed: {answer['error']}"
                else:
                    row["rss_anon_extra_bytes"] = answer["extra"]
                    row["rss_anon_extra_pct"] = 100 * answer["extra"] / info["bytes"]
            op_rows.append(row)
        add_ratios(op_rows)
        rows += op_rows
        log(f"[{case.name}] {op}: {time.perf_counter() - started:.1f} s")
    del ctx, model, warm_ctx
    gc.collect()
    shutil.rmtree(workdir / case.name, ignore_errors=True)
    shutil.rmtree(workdir / f"{case.name}-warmup", ignore_errors=True)
    return info, rows


def _row(rows: list[dict[str, Any]], case: str, op: str, contender: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["case"] == case and r["op"] == op and r["contender"] == contender), None)


def _median(rows: list[dict[str, Any]], case: str, op: str, contender: str) -> float | None:
    row = _row(rows, case, op, contender)
    return None if row is None else row["median_s"]


def targets(rows: list[dict[str, Any]], case_infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target of the issue, per case, as ``measured`` against ``limit``."""
    out: list[dict[str, Any]] = []

    def add(target: str, case: str, measured: float | None, limit: float, sense: str, unit: str) -> None:
        met = None if measured is None else (measured <= limit if sense == "<=" else measured >= limit)
        out.append({"target": target, "case": case, "measured": measured, "limit": limit, "sense": sense,
                    "unit": unit, "met": met})  # fmt: skip

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    for info in case_infos:
        name = info["name"]
        ours_load = _median(rows, name, "load", "mc.load")
        add(
            "load <= 1.05x safetensors load_model",
            name,
            ratio(ours_load, _median(rows, name, "load", "st.load_model")),
            1.05,
            "<=",
            "x",
        )
        add(
            "load <= 0.2x torch.load + load_state_dict",
            name,
            ratio(ours_load, _median(rows, name, "load", "torch.load")),
            0.2,
            "<=",
            "x",
        )
        add(
            "save <= 1.0x safetensors save_file",
            name,
            ratio(_median(rows, name, "save", "mc.save"), _median(rows, name, "save", "st.save_file")),
            1.0,
            "<=",
            "x",
        )
        verify_share = ratio(
            _median(rows, name, "load_verify", "sha256"), _median(rows, name, "load_verify", "mc.load.verify")
        )
        add("verifying load >= 0.8x sha256 throughput", name, verify_share, 0.8, ">=", "x")
        memory = _row(rows, name, "load", "mc.load")
        pct = None if memory is None or memory["rss_anon_extra_pct"] is None else memory["rss_anon_extra_pct"]
        add("peak extra RssAnon during load <= 10% of weights", name, pct, 10.0, "<=", "%")
    tiny = next((i for i in case_infos if i["name"] == "tiny"), None)
    if tiny is not None:
        add(
            f"check of a {tiny['tensors']:,}-tensor checkpoint <= 1 s",
            "tiny",
            _median(rows, "tiny", "check", "mc.check"),
            1.0,
            "<=",
            "s",
        )
    return out


def hashing_limit(rows: list[dict[str, Any]], case: dict[str, Any], machine_info: dict[str, Any]) -> float | None:
    """H + W / cores (issue 13): sha256 of the case's bytes on every core, plus ``save_file``'s time shared out.

    H comes from the sha256 reference point measured at the start of the run, W is the
    median ``save_file`` of the same run. Hashing and writing compete for the same cores, so
    a save that hashes every byte cannot beat this.
    """
    write = _median(rows, case["name"], "save", "st.save_file")
    rate = machine_info.get("reference", {}).get(f"sha256_{machine_info.get('digest_workers')}_threads_gb_s")
    cores = machine_info.get("usable_cores") or 1
    if write is None or not rate:
        return None
    return case["bytes"] / (rate * 1e9) + write / cores


def issue13_targets(
    rows: list[dict[str, Any]], case_infos: list[dict[str, Any]], machine_info: dict[str, Any]
) -> list[dict[str, Any]]:
    """The targets of issue 13 (per-tensor cost, save on the hashing limit, async save), where their case ran."""
    out: list[dict[str, Any]] = []

    def add(
        target: str, case: str, measured: float | None, limit: float, unit: str, ours: str, peer: str | None = None
    ) -> None:
        """``ours``/``peer``: ``op:contender`` of the rows compared, kept with their figures for the README."""
        met = None if measured is None else measured <= limit

        def figures(ref: str | None) -> dict[str, Any] | None:
            row = None if ref is None else _row(rows, case, *ref.split(":", 1))
            if row is None:
                return None
            return {k: row[k] for k in ("label", "median_s", "min_s", "max_s", "rss_anon_extra_bytes")}

        out.append({"target": target, "case": case, "measured": measured, "limit": limit, "sense": "<=",
                    "unit": unit, "met": met, "ours": figures(ours), "peer": figures(peer)})  # fmt: skip

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    infos = {i["name"]: i for i in case_infos}
    if "tiny" in infos:
        n = f"{infos['tiny']['tensors']:,} tensors"
        add(f"{n}: check <= 0.5 s", "tiny", _median(rows, "tiny", "check", "mc.check"), 0.5, "s", "check:mc.check")
        add(f"{n}: read_manifest <= 0.3 s", "tiny", _median(rows, "tiny", "check", "mc.read_manifest"), 0.3, "s",
            "check:mc.read_manifest")
        add(f"{n}: load <= 1.0x load_model", "tiny",
            ratio(_median(rows, "tiny", "load", "mc.load"), _median(rows, "tiny", "load", "st.load_model")), 1.0, "x",
            "load:mc.load", "load:st.load_model")  # fmt: skip
        add(f"{n}: save with digests <= 1.0x save_file", "tiny",
            ratio(_median(rows, "tiny", "save", "mc.save"), _median(rows, "tiny", "save", "st.save_file")), 1.0, "x",
            "save:mc.save", "save:st.save_file")  # fmt: skip
        ours, peer = _row(rows, "tiny", "load", "mc.load"), _row(rows, "tiny", "load", "st.load_model")
        add(f"{n}: peak extra memory of load <= 1.5x load_model's", "tiny",
            None if ours is None or peer is None else ratio(ours["rss_anon_extra_bytes"], peer["rss_anon_extra_bytes"]),
            1.5, "x", "load:mc.load", "load:st.load_model")  # fmt: skip
    if "large" in infos:
        large = infos["large"]
        add("1 GB in 32 tensors: load <= 1.0x load_model", "large",
            ratio(_median(rows, "large", "load", "mc.load"), _median(rows, "large", "load", "st.load_model")), 1.0, "x",
            "load:mc.load", "load:st.load_model")  # fmt: skip
        limit_s = hashing_limit(rows, large, machine_info)
        add("1 GB in 32 tensors: save with digests <= 1.1x (H + W / cores)", "large",
            ratio(_median(rows, "large", "save", "mc.save"), limit_s), 1.1, "x",
            "save:mc.save", "save:st.save_file")  # fmt: skip
        out[-1]["reference_s"] = limit_s
        add("1 GB: async_save blocks <= 0.3x save_file", "large",
            ratio(_median(rows, "large", "async_save", "mc.async_save"), _median(rows, "large", "async_save", "st.save_file")),
            0.3, "x", "async_save:mc.async_save", "async_save:st.save_file")  # fmt: skip
    return out


# --------------------------------------------------------------------------- output


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.3f}"
    return f"{value * 1000:.2f} ms"


def _range(row: dict[str, Any]) -> str:
    if row["min_s"] is None:
        return "—"
    return f"{_seconds(row['min_s'])} - {_seconds(row['max_s'])}"


def _mb(value: int | None, pct: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1e6:.1f} MB ({pct:.1f}%)" if pct is not None else f"{value / 1e6:.1f} MB"


def _loads(values: list[float] | None) -> str:
    return "unknown" if not values else " / ".join(f"{v:.2f}" for v in values)


def markdown(document: dict[str, Any]) -> str:
    """The results as Markdown: machine, method, the table and the targets."""
    m = document["machine"]
    ref = m["reference"]
    refs = ", ".join(f"{k.removesuffix('_gb_s').replace('_', ' ')} {v:.2f} GB/s" for k, v in ref.items())
    lines = [
        f"## Results ({document['mode']} run, {document['started']})",
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} cores, {m['memory']} RAM, {m['os']}; working files on "
        f"{m['workdir_filesystem']}, page-cache warm. Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), safetensors {m['safetensors']}, jsonschema {m['jsonschema']}, "
        f"manifest-ckpt {m['manifest_ckpt']} ({m['digest_workers']} digest threads). Reference points: {refs}. "
        f"Load average (1, 5, 15 min) at start {_loads(m.get('load_average_start'))}, "
        f"at end {_loads(m.get('load_average_end'))}; run took {document.get('duration_s', 0) / 60:.1f} min.",
        "",
        f"Method: {document['method']['summary']}",
        "",
        "| case | operation | contender | median | min - max | GB/s | x best peer | peak extra RssAnon |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    infos = {c["name"]: c for c in document["cases"]}
    for r in document["results"]:
        info = infos[r["case"]]
        case = f"{r['case']} ({info['tensors']:,} t, {info['bytes'] / 1e6:,.0f} MB)"
        label = f"**{r['label']}**" if r["role"] == "ours" else r["label"]
        if r["note"]:
            label += f" — {r['note']}"
        gbps = "—" if r["gb_per_s"] is None else f"{r['gb_per_s']:.2f}"
        ratio = "—" if r["ratio_to_best_peer"] is None else f"{r['ratio_to_best_peer']:.2f}"
        lines.append(
            f"| {case} | {r['op']} | {label} | {_seconds(r['median_s'])} | {_range(r)} | {gbps} | {ratio} | "
            f"{_mb(r['rss_anon_extra_bytes'], r['rss_anon_extra_pct'])} |"
        )
    sections = (("Targets", document["targets"]), ("Targets of issue 13", document.get("issue13_targets", [])))
    for title, found in sections:
        if not found:
            continue
        lines += ["", f"### {title}", "", "| target | case | measured (median) | limit | met |", "|---|---|---:|---:|---|"]
        for t in found:
            measured = "—" if t["measured"] is None else f"{t['measured']:.3g}{t['unit']}"
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            lines.append(f"| {t['target']} | {t['case']} | {measured} | {t['sense']} {t['limit']:g}{t['unit']} | {met} |")
    return "\n".join(lines) + "\n"


def chart(document: dict[str, Any], path: Path) -> bool:
    """A PNG of every contender's ratio to the best peer, one panel per operation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in document["results"] if r["ratio_to_best_peer"] is not None]
    ops = [op for op in OPERATIONS if any(r["op"] == op for r in rows)]
    if not ops:
        return False
    case_names = [c["name"] for c in document["cases"]]
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 2.6 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        labels = list(dict.fromkeys(r["label"] for r in rows if r["op"] == op))
        width = 0.8 / max(1, len(labels))
        for i, label in enumerate(labels):
            xs, ys = [], []
            for j, case in enumerate(case_names):
                row = next((r for r in rows if r["op"] == op and r["case"] == case and r["label"] == label), None)
                if row is not None:
                    xs.append(j + i * width)
                    ys.append(row["ratio_to_best_peer"])
            ax.bar(xs, ys, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(case_names))], case_names)
        ax.set_title(f"{op}: time / best peer's time (lower is faster)", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"manifest-ckpt benchmarks ({document['mode']}, {document['machine']['cpu']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


_README_START: Final = "<!-- results:start -->"
_README_END: Final = "<!-- results:end -->"


_TARGETS_START: Final = "<!-- targets:start -->"
_TARGETS_END: Final = "<!-- targets:end -->"


def _figure(f: dict[str, Any] | None, memory: bool) -> str:
    if f is None:
        return "—"
    if memory:
        return "—" if f["rss_anon_extra_bytes"] is None else f"{f['rss_anon_extra_bytes'] / 1e6:,.0f} MB"
    return f"{_unit(f['median_s'])} ({_unit(f['min_s'])} - {_unit(f['max_s'])})"


def _unit(seconds: float | None) -> str:
    text = _seconds(seconds)
    return text if text.endswith(("ms", "—")) else f"{text} s"


def targets_markdown(document: dict[str, Any]) -> str:
    """Issue 13's targets as the top-level README shows them: the run, then one row per target."""
    m = document["machine"]
    lines = [
        f"Full run of {document['started'][:10]}: {m['cpu']}, {m['usable_cores']} cores, working files on "
        f"{m['workdir_filesystem']}, Python {m['python']}, torch {m['torch']}, load average at start "
        f"{_loads(m.get('load_average_start'))}; median of {document['method']['repeats']} runs (min - max):",
        "",
        "| target | manifest-ckpt | peer | measured | met |",
        "|---|---:|---:|---:|---|",
    ]
    for t in document.get("issue13_targets", []):
        memory = "memory" in t["target"]
        measured = "—" if t["measured"] is None else f"{t['measured']:.3g}{t['unit']}"
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        peer = _figure(t.get("peer"), memory)
        if t.get("peer") is not None and not memory:
            peer = f"{t['peer']['label']}: {peer}"
        if t.get("reference_s") is not None:
            peer = f"H + W/cores = {_unit(t['reference_s'])}; {peer}"
        lines.append(f"| {t['target']} | {_figure(t.get('ours'), memory)} | {peer} | {measured} | {met} |")
    return "\n".join(lines) + "\n"


def _replace_between(path: Path, start: str, end: str, body: str) -> None:
    text = path.read_text(encoding="utf-8")
    head, found, rest = text.partition(start)
    if not found or end not in rest:
        raise SystemExit(f"{path}: markers {start} ... {end} not found; add them where the table goes")
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{body}{end}{tail}", encoding="utf-8")


def update_readme(document: dict[str, Any], table: str, png_name: str) -> None:
    """Replace the results section of ``benchmarks/README.md`` and the targets table of the README with this run."""
    _replace_between(README, _README_START, _README_END, f"{table}\n![ratios to the best peer](results/{png_name})\n")
    _replace_between(REPO / "README.md", _TARGETS_START, _TARGETS_END, targets_markdown(document))


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds); proves the harness, not speed")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per contender after the warm-up (>= 1)")
    parser.add_argument("--cases", default="", help="comma-separated subset of: large, small, tiny, bf16")
    parser.add_argument("--ops", default="", help=f"comma-separated subset of: {', '.join(OPERATIONS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the .md, .json and .png go")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORK, help="scratch space for checkpoints")
    parser.add_argument("--no-memory", action="store_true", help="skip the RssAnon probes")
    parser.add_argument("--update-readme", action="store_true", help="put the table in benchmarks/README.md and the targets in README.md")
    parser.add_argument("--_probe-server", action="store_true", help=argparse.SUPPRESS)
    return parser


def _subset(text: str, allowed: Sequence[str], what: str) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()] or list(allowed)
    unknown = [t for t in chosen if t not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; print the table; write Markdown, JSON and PNG; return the exit code."""
    args = _parser().parse_args(argv)
    workdir: Path = args.workdir.resolve()
    if args._probe_server:
        return _probe_server(args.quick, workdir)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    all_cases = cases(args.quick)
    chosen = _subset(args.cases, [c.name for c in all_cases], "case")
    ops = _subset(args.ops, OPERATIONS, "operation")
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    clock = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"{time.perf_counter() - clock:7.1f}s {message}", file=sys.stderr, flush=True)

    log("measuring reference points")
    document: dict[str, Any] = {
        "format": JSON_FORMAT,
        "mode": "quick" if args.quick else "full",
        "started": started.isoformat().replace("+00:00", "Z"),
        "machine": machine(workdir, args.quick),
        "method": {
            "repeats": args.repeats,
            "warmup_rounds": 1,
            "order": "interleaved",
            "page_cache": "warm",
            "memory": None if args.no_memory else "fresh forked process per contender, RssAnon sampled every 1 ms",
            "summary": (
                f"median of {args.repeats} runs, contenders interleaved (A B C A B C) after one warm-up round "
                "(for the 100,000-tensor case, whose runs take seconds each, the warm-up runs each contender on "
                "the quick-size version of the case: same code paths, a fraction of the time). Files page-cache warm: written just before, flushed with sync, "
                "RAM far larger than the files. A full garbage collection before each run, untimed; the GC stays "
                "enabled during runs as in a real process. Saves write to the same file system without fsync, as "
                "all three do by default; manifest-ckpt save runs with record_code=False (the git call depends on "
                "the repository, not the weights). Peak extra RssAnon: one run in a freshly forked process that "
                "built and touched the module first, sampled every 1 ms; mmap'd file pages are page cache, not "
                "anonymous memory. x best peer = median / fastest peer's median (for load_verify the peer is "
                "hashing alone)."
            ),
        },
        "cases": [],
        "results": [],
        "targets": [],
    }
    if args.quick:
        # Quick mode proves the harness, not speed: leave torch's objects out of the collection
        # before each run (0.2 s each, most of a quick run). Full runs keep the real heap.
        gc.collect()
        gc.freeze()
    prober = None if args.no_memory else Prober(args.quick, workdir)
    try:
        for case in all_cases:
            if case.name in chosen:
                info, rows = run_case(case, ops, args.repeats, workdir, prober, log, quick=args.quick)
                document["cases"].append(info)
                document["results"] += rows
    finally:
        if prober is not None:
            prober.close()
    document["targets"] = targets(document["results"], document["cases"])
    document["issue13_targets"] = issue13_targets(document["results"], document["cases"], document["machine"])
    document["duration_s"] = time.perf_counter() - clock
    document["machine"]["load_average_end"] = list(os.getloadavg())
    table = markdown(document)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "results"
    (args.out / f"{stem}.json").write_text(json.dumps(document, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    drew = chart(document, args.out / f"{stem}.png")
    if args.update_readme:
        update_readme(document, table, f"{stem}.png")
    log(f"wrote {args.out / stem}.md, .json{', .png' if drew else ' (no matplotlib: no chart)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
