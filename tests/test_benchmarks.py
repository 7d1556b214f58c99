"""The benchmark harness works: quick mode runs end to end and its outputs have the promised shape.

Nothing here asserts speed; only structure, arithmetic and rendering.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import run

REPO = Path(__file__).resolve().parent.parent
CONTENDERS = {
    "save": ["mc.save", "torch.save", "st.save_file"],
    "async_save": ["mc.async_save", "st.save_file"],
    "load": ["mc.load", "torch.load", "torch.load.mmap", "st.load_model"],
    "load_verify": ["mc.load.verify", "sha256", "mc.verify"],
    "check": ["mc.check", "mc.read_manifest"],
    "validate": ["mc.validate", "jsonschema"],
    "convert": ["mc.convert", "torch.load+save_file", "torch.load.mmap+save_file"],
}
PROBED = (
    {("load", c) for c in CONTENDERS["load"]}
    | {("load_verify", "mc.load.verify")}
    | {("convert", c) for c in CONTENDERS["convert"]}
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    """Run ``python -m benchmarks.run --quick`` once into a temporary directory."""
    base = tmp_path_factory.mktemp("bench")
    out = base / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out), "--workdir", str(base / "work")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "quick.json").read_text()), out, proc.stdout


def test_quick_run_covers_every_case_operation_and_contender(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    """Every case has a row for every contender of every operation, in order."""
    document, _, _ = quick_run
    assert document["format"] == run.JSON_FORMAT
    assert document["mode"] == "quick"
    assert [c["name"] for c in document["cases"]] == ["large", "small", "tiny", "bf16"]
    expected = [
        (case, op, c) for case in ["large", "small", "tiny", "bf16"] for op in run.OPERATIONS for c in CONTENDERS[op]
    ]
    assert [(r["case"], r["op"], r["contender"]) for r in document["results"]] == expected


def test_quick_run_rows_hold_five_timed_runs_and_consistent_figures(
    quick_run: tuple[dict[str, Any], Path, str],
) -> None:
    """Each measured row has 5 runs, min <= median <= max, GB/s where bytes move, ratios where peers exist."""
    document, _, _ = quick_run
    sizes = {c["name"]: c["bytes"] for c in document["cases"]}
    for r in document["results"]:
        if r["note"].startswith("skipped"):
            assert r["times_s"] == [] and r["median_s"] is None
            continue
        assert len(r["times_s"]) == 5, r
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["median_s"] == sorted(r["times_s"])[2]
        if r["op"] in ("save", "async_save", "load", "load_verify", "convert"):
            assert r["gb_per_s"] == pytest.approx(sizes[r["case"]] / r["median_s"] / 1e9)
        else:
            assert r["gb_per_s"] is None
        assert (r["ratio_to_best_peer"] is None) == (r["op"] == "check")


def test_quick_run_probes_memory_of_loads_and_conversions_only(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    """Peak extra RssAnon is an integer for every load and conversion contender, and absent elsewhere."""
    document, _, _ = quick_run
    for r in document["results"]:
        probed = (r["op"], r["contender"]) in PROBED and not r["note"].startswith("skipped")
        assert isinstance(r["rss_anon_extra_bytes"], int) == probed, r
        assert "memory probe failed" not in r["note"]


def test_quick_run_lists_every_target(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    """Five targets per case plus the 100,000-tensor check target, each with a measured value."""
    document, _, _ = quick_run
    targets = document["targets"]
    assert len(targets) == 4 * 5 + 1
    assert targets[-1]["case"] == "tiny" and targets[-1]["unit"] == "s"
    assert all(t["measured"] is not None and isinstance(t["met"], bool) for t in targets)
    issue13 = document["issue13_targets"]
    assert [t["case"] for t in issue13] == ["tiny"] * 5 + ["large"] * 3
    assert all(t["measured"] is not None and isinstance(t["met"], bool) for t in issue13)


def test_hashing_limit_is_hash_time_plus_write_time_per_core() -> None:
    """H + W / cores: 1 GB at 2 GB/s is 0.5 s, plus a 0.4 s save_file shared by 2 cores."""
    rows = [{"case": "large", "op": "save", "contender": "st.save_file", "median_s": 0.4}]
    machine = {"reference": {"sha256_2_threads_gb_s": 2.0}, "digest_workers": 2, "usable_cores": 2}
    assert run.hashing_limit(rows, {"name": "large", "bytes": 10**9}, machine) == pytest.approx(0.7)


def test_quick_run_writes_markdown_and_png_and_prints_the_table(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    """The table is printed and written as quick.md, with the chart beside it as a PNG when matplotlib is there."""
    _, out, stdout = quick_run
    table = (out / "quick.md").read_text()
    assert table in stdout
    assert "| case | operation | contender | median |" in table
    assert "### Targets" in table
    if importlib.util.find_spec("matplotlib") is None:  # the test environment pins no chart library
        assert not (out / "quick.png").exists()
    else:
        assert (out / "quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summarise_gives_median_min_and_max() -> None:
    """An even number of runs takes the mean of the middle two as the median."""
    assert run.summarise([4.0, 1.0, 3.0, 2.0]) == {"median_s": 2.5, "min_s": 1.0, "max_s": 4.0}


def test_add_ratios_divides_by_the_fastest_peer_only() -> None:
    """The fastest peer is 1.0; ours and info rows are measured against it; no peer, no ratio."""
    rows: list[dict[str, Any]] = [
        {"role": "ours", "median_s": 3.0},
        {"role": "peer", "median_s": 2.0},
        {"role": "peer", "median_s": 4.0},
        {"role": "info", "median_s": 1.0},
    ]
    run.add_ratios(rows)
    assert [r["ratio_to_best_peer"] for r in rows] == [1.5, 1.0, 2.0, 0.5]
    lonely: list[dict[str, Any]] = [{"role": "ours", "median_s": 3.0}]
    run.add_ratios(lonely)
    assert lonely[0]["ratio_to_best_peer"] is None


def _row(op: str, contender: str, median: float, pct: float | None = None) -> dict[str, Any]:
    return {"case": "tiny", "op": op, "contender": contender, "median_s": median, "rss_anon_extra_pct": pct}


def test_targets_compare_ratios_of_medians_with_their_limits() -> None:
    """Each target's measured value is the right ratio and ``met`` follows its direction."""
    rows = [
        _row("load", "mc.load", 1.0, pct=12.0),
        _row("load", "st.load_model", 1.0),
        _row("load", "torch.load", 10.0),
        _row("save", "mc.save", 3.0),
        _row("save", "st.save_file", 2.0),
        _row("load_verify", "mc.load.verify", 2.0),
        _row("load_verify", "sha256", 1.8),
        _row("check", "mc.check", 0.5),
    ]
    found = {t["target"]: (t["measured"], t["met"]) for t in run.targets(rows, [{"name": "tiny", "tensors": 100_000}])}
    assert found == {
        "load <= 1.05x safetensors load_model": (1.0, True),
        "load <= 0.2x torch.load + load_state_dict": (0.1, True),
        "save <= 1.0x safetensors save_file": (1.5, False),
        "verifying load >= 0.8x sha256 throughput": (0.9, True),
        "peak extra RssAnon during load <= 10% of weights": (12.0, False),
        "check of a 100,000-tensor checkpoint <= 1 s": (0.5, True),
    }


def test_rss_anon_reads_this_process(tmp_path: Path) -> None:
    """RssAnon grows by at least the size of a freshly touched 64 MB buffer."""
    import os

    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        before = run.rss_anon(fd)
        block = bytearray(64 << 20)
        block[::4096] = b"\x01" * len(block[::4096])
        after = run.rss_anon(fd)
    finally:
        os.close(fd)
    assert after - before >= 60 << 20
    del block


def test_update_readme_replaces_only_the_marked_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quick_run: tuple[dict[str, Any], Path, str]
) -> None:
    """Text outside the markers survives; the results table and the README's targets table are the new run's."""
    document, _, _ = quick_run
    (tmp_path / "benchmarks").mkdir()
    bench_readme, readme = tmp_path / "benchmarks" / "README.md", tmp_path / "README.md"
    bench_readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\noutro\n")
    readme.write_text("top\n<!-- targets:start -->\nold targets\n<!-- targets:end -->\nbottom\n")
    monkeypatch.setattr(run, "README", bench_readme)
    monkeypatch.setattr(run, "REPO", tmp_path)
    run.update_readme(document, "| new |\n", "results.png")
    assert bench_readme.read_text() == (
        "intro\n<!-- results:start -->\n| new |\n\n![ratios to the best peer](results/results.png)\n"
        "<!-- results:end -->\noutro\n"
    )
    assert readme.read_text() == f"top\n<!-- targets:start -->\n{run.targets_markdown(document)}<!-- targets:end -->\nbottom\n"


def test_targets_table_has_a_row_per_target_with_both_sides(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    """One row per issue-13 target: our median (min - max), the peer's where there is one, the ratio, met or not."""
    document, _, _ = quick_run
    rows = [line for line in run.targets_markdown(document).splitlines() if line.startswith("| ") and "target |" not in line]
    assert len(rows) == len(document["issue13_targets"]) == 8
    for line, t in zip(rows, document["issue13_targets"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == t["target"]
        assert cells[1] == run._figure(t["ours"], "memory" in t["target"]) != "—"
        assert cells[3] == f"{t['measured']:.3g}{t['unit']}"
        assert cells[4] == ("yes" if t["met"] else "**no**")
    assert rows[2].split("|")[3].strip().startswith("safetensors")  # the load target names its peer


def test_missing_markers_stop_the_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A README without the markers is not silently left stale: the update stops with the markers named."""
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    monkeypatch.setattr(run, "README", readme)
    with pytest.raises(SystemExit, match=re.escape("markers <!-- results:start --> ... <!-- results:end --> not found")):
        run.update_readme({}, "| new |\n", "results.png")


def test_unknown_case_is_refused_before_anything_runs() -> None:
    """A misspelt --cases value stops the run with a message naming the choices."""
    with pytest.raises(SystemExit, match="unknown case: huge; choose from large, small, tiny, bf16"):
        run.main(["--quick", "--cases", "huge", "--no-memory"])
