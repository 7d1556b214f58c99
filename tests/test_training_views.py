"""inspect, diff and verify of training states (issue 12, item 6)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.cli import run


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def app(step: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2)
    for _ in range(step):
        model(torch.ones(1, 3)).sum().backward()
        optim.step()
        sched.step()
    return {"model": model, "optim": optim, "sched": sched, "progress": {"step": step, "tag": "run"}, "blob": b"xy"}


def save(path: Path, step: int) -> Path:
    mc.save(app(step), path, record_code=False)
    return path


def test_inspect_shows_the_application_state_tree(tmp_path: Path) -> None:
    ck = save(tmp_path / "ck", 1)
    code, out, _ = cli("inspect", str(ck), "--json")
    assert code == 0
    rows = {r["key"]: (r["kind"], r["text"]) for r in json.loads(out)["state"]}
    assert rows == {
        "model": ("module", "torch.nn.modules.container.Sequential"),
        "optim": ("optimizer", "torch.optim.adam.Adam"),
        "sched": ("scheduler", "torch.optim.lr_scheduler.StepLR"),
        "progress": ("dict", ""),
        "progress.step": ("value", "1"),
        "progress.tag": ("value", "'run'"),
        "blob": ("bytes", "blob"),
    }
    code, text, _ = cli("inspect", str(ck))
    assert code == 0
    assert "application state (training state)" in text
    line = next(row for row in text.splitlines() if row.startswith("optim "))
    assert line.split() == ["optim", "optimizer", "torch.optim.adam.Adam"]


def test_inspect_of_a_weights_checkpoint_has_no_state(tmp_path: Path) -> None:
    mc.save(nn.Linear(2, 2), tmp_path / "ck")
    code, out, _ = cli("inspect", str(tmp_path / "ck"), "--json")
    assert code == 0 and json.loads(out)["state"] is None
    assert "application state" not in cli("inspect", str(tmp_path / "ck"))[1]


def test_diff_compares_two_training_states(tmp_path: Path) -> None:
    a, b = save(tmp_path / "a", 1), save(tmp_path / "b", 2)
    code, out, _ = cli("diff", str(a), str(b), "--json")
    assert code == 1
    state = {c["key"]: (c["kind"], c["a"], c["b"]) for c in json.loads(out)["state"]}
    assert state["progress.step"] == ("changed", "1", "2")
    assert state["sched.last_epoch"] == ("changed", "1", "2")
    assert "optim.state.0.weight.exp_avg" in {v["key"] for v in json.loads(out)["values"]["changed"]}
    code, text, _ = cli("diff", str(a), str(b))
    assert code == 1 and "state: " in text and "state difference" in text.splitlines()[-1]


def test_diff_names_added_and_removed_entries_and_classes(tmp_path: Path) -> None:
    first = app(1)
    mc.save(first, tmp_path / "a", record_code=False)
    second = {**first, "ema": {"decay": 0.9}}
    second["optim"] = torch.optim.SGD(first["model"].parameters(), lr=0.1)
    second["sched"] = torch.optim.lr_scheduler.StepLR(second["optim"], step_size=2)
    del second["blob"]
    mc.save(second, tmp_path / "b", record_code=False)
    result = mc.diff(tmp_path / "a", tmp_path / "b")
    changes = {c.key: (c.kind, c.a, c.b) for c in result.state}
    assert changes["optim"] == ("changed", "optimizer torch.optim.adam.Adam", "optimizer torch.optim.sgd.SGD")
    assert changes["ema"] == ("added", None, "dict")
    assert changes["blob"] == ("removed", "bytes", None)
    assert "ema.decay" not in changes  # a new subtree is named once, at its top
    assert not result.identical


def test_diff_of_identical_training_states(tmp_path: Path) -> None:
    a, b = save(tmp_path / "a", 2), save(tmp_path / "b", 2)
    code, out, _ = cli("diff", str(a), str(b))
    assert code == 0 and out.rstrip().endswith("IDENTICAL")


def _edit_progress(path: Path, value: int) -> None:
    manifest = path / "manifest.json"
    document = json.loads(manifest.read_text())
    tree = document["extensions"]["state"]["dict"]
    progress = next(node for name, node in tree if name == "progress")
    progress["dict"][0][1] = value
    manifest.write_text(json.dumps(document, indent=1))


def test_verify_covers_plain_values(tmp_path: Path) -> None:
    """A JSON value edited in the manifest fails verify: the digest covers the state tree."""
    ck = save(tmp_path / "ck", 1)
    assert cli("verify", str(ck), "--quiet")[0] == 0
    _edit_progress(ck, 7)
    code, out, _ = cli("verify", str(ck), "--quiet", "--json")
    assert code == 1 and json.loads(out)["ok"] is False
    assert "$.digest" in json.loads(out)["error"]["message"]


class WithExtra(nn.Linear):
    """A layer whose extra state is a dict holding a count and a tensor."""

    def __init__(self, count: int, scale: float) -> None:
        super().__init__(2, 2)
        self.extra = {"count": count, "scale": torch.full((2,), scale)}

    def get_extra_state(self) -> dict[str, Any]:
        return self.extra

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.extra = state


def test_diff_compares_module_extra_state(tmp_path: Path) -> None:
    """Extra state that differs in a value or in a tensor it holds is a state difference; equal extra state is none."""

    def saved(name: str, count: int, scale: float, *, training: bool) -> Path:
        torch.manual_seed(0)
        model = nn.Sequential(WithExtra(count, scale))
        mc.save({"model": model, "progress": {"step": 1}} if training else model, tmp_path / name, record_code=False)
        return tmp_path / name

    for training, key in ((True, "model.0._extra_state"), (False, "0._extra_state")):
        a = saved(f"a{training}", 1, 0.5, training=training)
        assert mc.diff(a, saved(f"same{training}", 1, 0.5, training=training)).identical
        count = mc.diff(a, saved(f"count{training}", 2, 0.5, training=training))
        assert [(c.kind, c.key) for c in count.state] == [("changed", key)]
        assert "'count': 1" in (count.state[0].a or "") and "'count': 2" in (count.state[0].b or "")
        tensor = mc.diff(a, saved(f"tensor{training}", 1, 0.25, training=training))
        assert [(c.kind, c.key) for c in tensor.state] == [("changed", key)] and not tensor.structure
        code, out, _ = cli("diff", str(a), str(tmp_path / f"count{training}"))
        assert code == 1 and key in out
