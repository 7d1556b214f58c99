"""Time sharded save and resharded load: manifest_ckpt.distributed against plain DCP.

Two ranks (gloo on 127.0.0.1, CPU) hold a model of float32 matrices as DTensors sharded
by rows. Each repeat, in alternating order:

- save: ``manifest_ckpt.distributed.save`` vs ``dcp.save`` with ``FileSystemWriter``
  (both with their defaults: files fsync'ed before the commit marker; ``--no-fsync`` turns
  that off on both sides, leaving the CPU cost: hashing against DCP's serialisation);
- resharded load: both checkpoints loaded into DTensors sharded by columns, so every rank
  reads pieces of both ranks' files; ``manifest_ckpt.distributed.load`` (structure check,
  file binding; and once more with ``verify_digests=True``) vs ``dcp.load`` with
  ``FileSystemReader``.

Times are taken on rank 0 between barriers; medians and ratios are printed, and written as
JSON with ``--json PATH``. Loads read from the page cache (the files were just written).

Run from the repository root:
``PYTHONPATH=. python benchmarks/bench_distributed.py [--quick] [--size-mb 1024] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from manifest_ckpt import distributed as mcd

WORLD = 2


def _model(size_mb: int, mesh: Any, placement: Shard, *, zeros: bool) -> dict[str, DTensor]:
    """``size_mb`` MiB of float32 as 16 square-ish matrices (or one per MiB when small)."""
    count = 16 if size_mb >= 16 else max(1, size_mb)
    side = int((size_mb * 2**20 / 4 / count) ** 0.5) // WORLD * WORLD
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i in range(count):
        full = torch.zeros(side, side) if zeros else torch.randn(side, side, generator=gen)
        out[f"layers.{i}.weight"] = distribute_tensor(full, mesh, [placement], src_data_rank=None)
    return out


def _timed(run: Callable[[], object]) -> float:
    dist.barrier()
    start = time.perf_counter()
    run()
    dist.barrier()
    return time.perf_counter() - start


def _check(loaded: dict[str, DTensor], size_mb: int, mesh: Any) -> None:
    """Both loads must give the saved values (compared on the local shards)."""
    want = _model(size_mb, mesh, Shard(1), zeros=False)
    for key, value in loaded.items():
        if not torch.equal(value.to_local(), want[key].to_local()):
            raise AssertionError(f"{key}: loaded values differ from the saved ones")


def _rank(rank: int, port: int, args: argparse.Namespace, workdir: str, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=600))
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        state = _model(args.size_mb, mesh, Shard(0), zeros=False)
        root = Path(workdir)
        ours, theirs = root / "manifest", root / "dcp"

        def clear() -> None:
            if rank == 0:
                shutil.rmtree(ours, ignore_errors=True)
                shutil.rmtree(theirs, ignore_errors=True)
            dist.barrier()

        save_runs: dict[str, Callable[[], object]] = {
            "manifest": lambda: mcd.save(state, ours, record_code=False, fsync=args.fsync),
            "dcp": lambda: dcp_save(state, storage_writer=FileSystemWriter(theirs, sync_files=args.fsync)),
        }
        times: dict[str, list[float]] = {"save:manifest": [], "save:dcp": []}
        # One untimed round warms allocators, imports and the page cache.
        for repeat in range(args.repeats + 1):
            order = list(save_runs) if repeat % 2 == 0 else list(reversed(save_runs))
            for name in order:
                clear()
                elapsed = _timed(save_runs[name])
                if repeat:
                    times[f"save:{name}"].append(elapsed)

        clear()
        mcd.save(state, ours, record_code=False, fsync=args.fsync)
        dcp_save(state, storage_writer=FileSystemWriter(theirs, sync_files=args.fsync))
        state.clear()  # free the saved values before the load targets are allocated
        target = _model(args.size_mb, mesh, Shard(1), zeros=True)
        load_runs: dict[str, Callable[[], object]] = {
            "manifest": lambda: mcd.load(target, ours),
            "manifest+verify": lambda: mcd.load(target, ours, verify_digests=True),
            "dcp": lambda: dcp_load(target, storage_reader=FileSystemReader(theirs)),
        }
        for name in load_runs:
            times[f"load:{name}"] = []
        for repeat in range(args.repeats + 1):
            order = list(load_runs) if repeat % 2 == 0 else list(reversed(load_runs))
            for name in order:
                for value in target.values():
                    value.to_local().zero_()
                elapsed = _timed(load_runs[name])
                _check(target, args.size_mb, mesh)
                if repeat:
                    times[f"load:{name}"].append(elapsed)
        if rank == 0:
            Path(out).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="model size in MiB (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument(
        "--no-fsync", dest="fsync", action="store_false", help="neither side fsyncs (measures CPU cost, not the disk)"
    )
    parser.add_argument("--quick", action="store_true", help="8 MiB, 3 rounds: seconds, for a smoke test")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.repeats = 8, 3
    workdir = tempfile.mkdtemp(prefix="bench-dcp-", dir=args.workdir)
    out = os.path.join(workdir, "times.json")
    try:
        mp.spawn(_rank, args=(_free_port(), args, workdir, out), nprocs=WORLD, join=True)  # type: ignore[attr-defined,no-untyped-call]
        times = json.loads(Path(out).read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {
        "save": medians["save:manifest"] / medians["save:dcp"],
        "load": medians["load:manifest"] / medians["load:dcp"],
        "load+verify": medians["load:manifest+verify"] / medians["load:dcp"],
    }
    print(
        f"2 ranks, {args.size_mb} MiB float32 sharded by rows; load resharded by columns; {args.repeats} rounds; "
        f"fsync {'on' if args.fsync else 'off'} (both sides)"
    )
    print(f"{'operation':<24}{'median s':>10}{'GB/s':>8}   all runs (s)")
    for name, values in times.items():
        rate = args.size_mb * 2**20 / 1e9 / medians[name]
        print(f"{name:<24}{medians[name]:>10.3f}{rate:>8.2f}   {' '.join(f'{v:.3f}' for v in values)}")
    for name, ratio in ratios.items():
        print(f"ratio {name:<18}{ratio:>10.2f}x plain DCP")
    if args.json:
        result = {"size_mb": args.size_mb, "fsync": args.fsync, "times": times, "medians": medians, "ratios": ratios}
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
