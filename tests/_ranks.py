"""Real gloo process groups on 127.0.0.1 for tests: start N ranks of a test file, collect each rank's JSON.

A test file that runs ranks is also a script: ``python tests/<file>.py SCENARIO RANK WORLD PORT
DIRECTORY`` is one rank; :func:`rank_main` starts its process group, runs the named scenario and
writes what the rank saw to ``DIRECTORY/SCENARIO-RANK.json``, which :func:`run_ranks` returns.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# scenario(rank, world, directory) -> what the rank saw (JSON)
Scenario = Callable[[int, int, Path], dict[str, Any]]


def rank_main(scenarios: Mapping[str, Scenario], argv: list[str]) -> None:
    """One rank: join the group, run ``argv[0]``'s scenario, write its JSON, leave the group."""
    import torch.distributed as dist

    scenario, rank, world, port, directory = argv[0], int(argv[1]), int(argv[2]), argv[3], Path(argv[4])
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = port
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = scenarios[scenario](rank, world, directory)
        (directory / f"{scenario}-{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(
    script: Path, scenario: str, world: int, directory: Path, *, timeout: float = 150
) -> list[dict[str, Any]]:
    """Start ``world`` processes of ``script`` as one gloo group and collect each rank's JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    port = free_port()
    logs = [directory / f"{scenario}-{rank}.log" for rank in range(world)]
    procs = []
    for rank in range(world):
        with open(logs[rank], "wb") as log:
            argv = [sys.executable, str(script), scenario, str(rank), str(world), str(port), str(directory)]
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode != 0]
    if failed:
        text = "\n".join(f"--- rank {r} (exit {rc}) ---\n{logs[r].read_text()[-4000:]}" for r, rc in failed)
        pytest.fail(f"{scenario} on {world} ranks failed:\n{text}")
    return [json.loads((directory / f"{scenario}-{rank}.json").read_text()) for rank in range(world)]
