"""Smoke runs of the attack harnesses (harness/): the quick mode of each must find nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _quick(name: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", f"harness.{name}", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")
def test_crash_harness_quick_finds_no_broken_state() -> None:
    figures = _quick("crash")
    assert figures["broken"] == 0 and figures["recovery_failures"] == 0, figures
    assert isinstance(figures["kills"], int) and figures["kills"] >= 10, figures
    operations = {key.split(":")[0] for key in figures["outcomes"]}  # type: ignore[union-attr]
    assert operations == {"overwrite", "new", "pack", "convert", "unpack"}, figures


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork")
def test_pickles_harness_quick_runs_no_payload_and_proves_each_live() -> None:
    figures = _quick("pickles")
    assert figures["executed"] == 0 and figures["wrongly_accepted"] == 0, figures
    assert figures["untyped"] == 0 and figures["hangs"] == 0, figures
    # The controls: every payload ran under an unsafe load, and clean carriers convert faithfully.
    assert figures["dead"] == 0 and figures["live"] == figures["tried"] == 22, figures
    assert figures["containers"] == 11 and figures["clean_carriers_faithful"] == 2, figures


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork")
def test_corrupt_harness_quick_accepts_no_damage() -> None:
    figures = _quick("corrupt")
    assert figures["wrongly_accepted"] == 0 and figures["untyped"] == 0 and figures["hangs"] == 0, figures
    assert figures["rejected"] >= 60 and figures["tried"] == figures["rejected"] + figures["harmless"], figures
    regions = {key.split(":")[1] for key in figures["regions"]}  # type: ignore[union-attr]
    assert {"manifest", "st-length", "st-header", "st-padding", "st-data", "tar-header", "tar-padding"} <= regions


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and flock")
def test_concurrency_harness_quick_never_mixes_or_breaks() -> None:
    figures = _quick("concurrency")
    assert figures["failures"] == [] and figures["mixed"] == 0 and figures["broken"] == 0, figures
    assert figures["untyped"] == 0 and figures["hangs"] == 0, figures
    assert isinstance(figures["reads_ok"], int) and figures["reads_ok"] >= 10, figures


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGALRM")
def test_fuzz_harness_quick_finds_no_untyped_error_or_hang() -> None:
    figures = _quick("fuzz")
    assert figures["untyped"] == 0 and figures["hangs"] == 0, figures
    targets = figures["targets"]
    assert isinstance(targets, dict) and sorted(targets) == ["manifest", "pickle", "safetensors_header", "tar"]
    assert all(t["tried"] == 60 for t in targets.values()), targets
