"""Bad input to every command: exit 2 (1 only for a failed check), one line on stderr, never a traceback.

Issue 10, item 10: each message names the argument or path and says what to do.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import manifest_ckpt as mc
from manifest_ckpt import cli
from manifest_ckpt.demo_models import tiny_gpt

MODEL = "manifest_ckpt.demo_models:tiny_gpt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-errors") / "ck"
    mc.save(tiny_gpt(), path, record_code=False)
    mc.pack(path, path.parent / "ck.tar")
    return path


# (argv with {ck}/{tar}/{tmp} placeholders, text the one-line message must contain)
CASES = [
    (["inspect", "{tmp}/nope"], "{tmp}/nope: no such checkpoint"),
    (["inspect", "{ck}", "--depth", "x"], "argument --depth: invalid int value: 'x'"),
    (["verify", "{tmp}/nope"], "{tmp}/nope: no such checkpoint"),
    (["check", "{tmp}/nope", "--model", MODEL], "{tmp}/nope: no such checkpoint"),
    (["check", "{ck}", "--model", "no_such_pkg:f"], "--model 'no_such_pkg:f': importing 'no_such_pkg' failed"),
    (["check", "{ck}", "--model", MODEL, "--allow-missing", "("], "allow_missing: '(' is not a valid regular expression"),
    (["check", "{ck}", "--model", MODEL, "--allow-unexpected", "[a"], "allow_unexpected: '[a' is not a valid regular"),
    (["check", "{ck}", "--model", MODEL, "--remap", "(=x"], "remap pattern '(' is not a valid regular expression"),
    (["check", "{ck}"], "the following arguments are required: --model"),
    (["convert", "{tmp}/nope.pt", "{tmp}/out"], "{tmp}/nope.pt: cannot read the source"),
    (["convert", "{ck}", "{tmp}/no/such/out"], "{tmp}/no/such/out: cannot create the checkpoint directory there"),
    (["convert", "{ck}", "{tmp}/out2", "--allow-missing", "x"], "pass module= (CLI: --model)"),
    (["convert", "{ck}", "{tmp}/out3", "--model", MODEL, "--allow-unexpected", "("], "allow_unexpected: '('"),
    (["pack", "{ck}", "{tmp}/no/such/x.tar"], "{tmp}/no/such/x.tar: cannot create the archive there"),
    (["pack", "{tmp}/nope", "{tmp}/x.tar"], "{tmp}/nope: no such checkpoint"),
    (["pack", "{ck}", "{tar}"], "already exists"),
    (["unpack", "{tmp}/nope.tar", "{tmp}/out4"], "{tmp}/nope.tar: no such archive"),
    (["unpack", "{ck}/manifest.json", "{tmp}/out5"], "not an archive"),
    (["unpack", "{tar}", "{ck}"], "it exists and is not an empty directory"),
    (["diff", "{ck}", "{tmp}/nope"], "{tmp}/nope: no such checkpoint"),
    (["lineage", "{tmp}/nope"], "{tmp}/nope: no such checkpoint"),
    (["export-hf", "{tmp}/nope", "{tmp}/hf"], "{tmp}/nope: no such checkpoint"),
    (["bogus"], "invalid choice: 'bogus'"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(a[:2]) + f"#{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_exits_2_with_one_line(ckpt: Path, argv: list[str], message: str) -> None:
    fill = {"ck": str(ckpt), "tar": str(ckpt.parent / "ck.tar"), "tmp": str(ckpt.parent)}
    args = [a.format(**fill) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(args, out, err)
    assert code == 2
    lines = [line for line in err.getvalue().splitlines() if not line.startswith(("usage:", " "))]
    assert len(lines) == 1, err.getvalue()
    assert message.format(**fill) in lines[0]
    assert "Traceback" not in err.getvalue() + out.getvalue()


# Usage errors are argparse's (no command ran, so there is no JSON document to print).
RUNS = [c for c in CASES if c[0] != ["bogus"] and "--depth" not in c[0] and c[0] != ["check", "{ck}"]]


@pytest.mark.parametrize(("argv", "message"), RUNS, ids=[" ".join(a[:2]) + f"#{i}" for i, (a, _) in enumerate(RUNS)])
def test_bad_input_with_json_prints_a_typed_error_document(ckpt: Path, argv: list[str], message: str) -> None:
    """--json: stdout is one JSON document naming the error type; stderr keeps the line."""
    fill = {"ck": str(ckpt), "tar": str(ckpt.parent / "ck.tar"), "tmp": str(ckpt.parent)}
    args = [a.format(**fill) for a in argv] + ["--json"]
    out, err = io.StringIO(), io.StringIO()
    assert cli.run(args, out, err) == 2
    doc = json.loads(out.getvalue())
    assert doc["ok"] is False and doc["error"]["type"].endswith("Error")
    assert message.format(**fill) in doc["error"]["message"]
