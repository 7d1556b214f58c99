"""Tests of the ``manifest-ckpt`` command line, run in-process through ``cli.run``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

import manifest_ckpt as mc
from manifest_ckpt import cli
from manifest_ckpt._version import __version__
from manifest_ckpt.demo_models import tiny_gpt

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schema" / "manifest-v1.schema.json"
TINY = "manifest_ckpt.demo_models:tiny_gpt"
VARIANT = "manifest_ckpt.demo_models:tiny_gpt_variant"


def run(*argv: str) -> tuple[int, str, str]:
    """Run the CLI with ``argv``; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TinyGPT checkpoint (never modified by the tests that share it)."""
    path = tmp_path_factory.mktemp("cli") / "tiny"
    mc.save(tiny_gpt(), path, lineage={"run": "cli-test"}, record_code=False)
    return path


@pytest.fixture
def fresh_ckpt(tmp_path: Path) -> Path:
    """A TinyGPT checkpoint of this test's own, free to damage."""
    path = tmp_path / "tiny"
    mc.save(tiny_gpt(), path, record_code=False)
    return path


# -- inspect ---------------------------------------------------------------------------------


def test_inspect_shows_digest_tree_totals_and_lineage(ckpt: Path) -> None:
    """The human view lists the digest, the module tree with dtypes and shapes, ties, totals and lineage."""
    code, out, err = run("inspect", str(ckpt))
    assert (code, err) == (0, "")
    digest = mc.read_manifest(ckpt).digest
    lines = out.splitlines()
    assert f"digest      {digest}" in lines
    assert f"checkpoint  {ckpt}" in lines
    assert "tensors     28 stored tensors, 1 alias, 26 modules" in lines
    assert "(root)  manifest_ckpt.demo_models.TinyGPT" in lines
    assert "├── causal_mask  (non-persistent buffer, not stored)" in lines
    tree = out.split("module tree\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert tree[-9:] == [
        "├── lm_head  Linear",
        "│   └── weight  -> wte.weight (tied)",
        "├── ln_f  LayerNorm",
        "│   ├── weight  float32[32]",
        "│   └── bias  float32[32]",
        "├── wpe  Embedding",
        "│   └── weight  float32[16, 32]",
        "└── wte  Embedding",
        "    └── weight  float32[64, 32]",
    ]
    assert "│   │       ├── in_proj_weight  float32[96, 32]" in tree
    assert "├── blocks  ModuleList" in lines
    assert any(line.startswith("float32  28       19,712") for line in lines)
    assert '  user        {"run": "cli-test"}' in lines


def test_inspect_depth_limits_the_tree(ckpt: Path) -> None:
    """--depth 1 shows only the root's children, each with an ellipsis for what lies below."""
    code, out, _ = run("inspect", str(ckpt), "--depth", "1")
    assert code == 0
    tree = out.split("module tree\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert tree == [
        "(root)  manifest_ckpt.demo_models.TinyGPT",
        "├── causal_mask  (non-persistent buffer, not stored)",
        "├── blocks  ModuleList",
        "│   └── ...",
        "├── lm_head  Linear",
        "│   └── ...",
        "├── ln_f  LayerNorm",
        "│   └── ...",
        "├── wpe  Embedding",
        "│   └── ...",
        "└── wte  Embedding",
        "    └── ...",
    ]
    _, deeper, _ = run("inspect", str(ckpt), "--depth", "2")
    assert "│   ├── 0  TransformerEncoderLayer" in deeper
    assert "in_proj_weight" not in deeper


def test_inspect_json_has_the_manifest(ckpt: Path) -> None:
    """--json prints one JSON document with the digest, the dtype totals and the manifest itself."""
    code, out, _ = run("inspect", str(ckpt), "--json")
    assert code == 0
    doc = json.loads(out)
    manifest = mc.read_manifest(ckpt)
    assert doc["checkpoint"] == str(ckpt)
    assert doc["digest"] == manifest.digest
    assert doc["manifest"] == manifest.to_dict()
    assert doc["totals"] == [{"dtype": "float32", "tensors": 28, "elements": 19712, "bytes": 78848}]


def test_inspect_accepts_the_manifest_file_itself(ckpt: Path) -> None:
    """inspect PATH/manifest.json shows the same checkpoint."""
    code, out, _ = run("inspect", str(ckpt / "manifest.json"), "--json")
    assert code == 0
    assert json.loads(out)["digest"] == mc.read_manifest(ckpt).digest


def test_inspect_of_a_missing_path_exits_2(tmp_path: Path) -> None:
    """A path that does not exist is unreadable input: exit 2 with the path named on stderr."""
    code, out, err = run("inspect", str(tmp_path / "nope"))
    assert (code, out) == (2, "")
    assert err == f"error: {tmp_path / 'nope'}: no such checkpoint (file or directory not found)\n"


def test_inspect_of_a_broken_manifest_exits_2_with_json_error(tmp_path: Path) -> None:
    """An invalid manifest is exit 2; with --json the error type, file and field are on stdout."""
    (tmp_path / "manifest.json").write_text('{"format": "manifest-ckpt", "format_version": "9.0.0"}')
    code, out, err = run("inspect", str(tmp_path), "--json")
    assert code == 2
    error = json.loads(out)["error"]
    assert error["type"] == "UnsupportedVersionError"
    assert error["field"] == "$.format_version"
    assert error["file"] == f"{tmp_path}/manifest.json"
    assert "format version 9.0.0 is not supported" in err


# -- verify ---------------------------------------------------------------------------------


def test_verify_ok(ckpt: Path) -> None:
    """A good checkpoint verifies: exit 0, the digest and the counts on stdout."""
    code, out, err = run("verify", str(ckpt), "--quiet")
    assert (code, err) == (0, "")
    manifest = mc.read_manifest(ckpt)
    assert out.splitlines() == [
        f"OK {ckpt}",
        f"  digest   {manifest.digest}",
        f"  verified 28 tensors, {manifest.total_bytes:,} bytes in 1 file",
    ]


def test_verify_json_ok(ckpt: Path) -> None:
    """verify --json reports ok, digest and counts."""
    code, out, _ = run("verify", str(ckpt), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["ok"] is True
    assert (doc["digest"], doc["tensors"], doc["files"]) == (mc.read_manifest(ckpt).digest, 28, 1)


def corrupt_one_byte(path: Path, key: str) -> str:
    """Flip one byte inside ``key``'s data; return the weights file name."""
    entry = mc.read_manifest(path).tensors[key]
    assert entry.file is not None and entry.byte_range is not None
    weights = path / entry.file
    data = bytearray(weights.read_bytes())
    data[entry.byte_range[0] + 5] ^= 0x01
    weights.write_bytes(bytes(data))
    return entry.file


def test_verify_detects_one_corrupted_byte(fresh_ckpt: Path) -> None:
    """One flipped bit in ln_f.weight fails verify with exit 1, naming the key and the file."""
    name = corrupt_one_byte(fresh_ckpt, "ln_f.weight")
    code, out, err = run("verify", str(fresh_ckpt), "--quiet")
    assert (code, out) == (1, "")
    assert err.startswith(
        f"FAILED {fresh_ckpt}\n{fresh_ckpt}: 1 tensors do not match their digests:\n  ln_f.weight ({name} bytes "
    )
    code, out, _ = run("verify", str(fresh_ckpt), "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False
    assert doc["error"]["type"] == "IntegrityError"
    assert (doc["error"]["key"], doc["error"]["file"]) == ("ln_f.weight", name)


def test_verify_detects_a_truncated_file(fresh_ckpt: Path) -> None:
    """A weights file cut short fails verify with exit 1 and the file named."""
    weights = next(fresh_ckpt.glob("weights-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])
    code, _, err = run("verify", str(fresh_ckpt), "--quiet")
    assert code == 1
    assert weights.name in err and "the manifest says" in err


def test_verify_of_a_missing_path_exits_2(tmp_path: Path) -> None:
    """verify on a path that does not exist is exit 2 (unreadable input), not 1."""
    code, out, err = run("verify", str(tmp_path / "nope"))
    assert (code, out) == (2, "")
    assert "no such checkpoint" in err


def test_verify_of_a_directory_without_manifest_exits_2(tmp_path: Path) -> None:
    """verify on a directory that is not a checkpoint is exit 2 and says what is missing."""
    code, _, err = run("verify", str(tmp_path))
    assert code == 2
    assert "no manifest.json" in err


# -- check ----------------------------------------------------------------------------------


def test_check_matching_model_exits_0(ckpt: Path) -> None:
    """check against the model the checkpoint came from is OK (exit 0)."""
    code, out, err = run("check", str(ckpt), "--model", TINY)
    assert (code, err) == (0, "")
    assert out == f"OK {ckpt} vs {TINY}\nOK: 29 keys match (names, shapes, dtypes, classes, ties)\n"


def test_check_wrong_model_exits_1_listing_every_kind(ckpt: Path) -> None:
    """The look-alike model fails with exit 1 and a table showing all six kinds of problem."""
    code, out, _ = run("check", str(ckpt), "--model", VARIANT)
    assert code == 1
    assert out.startswith(f"MISMATCH {ckpt} vs {VARIANT}\n")
    lines = out.splitlines()
    count = next(i for i, line in enumerate(lines) if line.endswith(" alias)"))
    rows = {line.split()[0]: line.split()[1] for line in lines[3:count]}
    assert rows == {
        "missing": "lm_head.bias",
        "unexpected": "ln_f.bias",
        "shape": "blocks.1.linear2.weight",
        "dtype": "wpe.weight",
        "class": "ln_f",
        "alias": "lm_head.weight",
    }
    assert lines[count] == "8 problems (1 missing, 1 unexpected, 3 shape, 1 dtype, 1 class, 1 alias)"
    # One hint per kind, each naming the option (Python and CLI) that allows it, after the table.
    hints = lines[count + 1 :]
    assert [h.split(":")[0] for h in hints] == ["hint"] * 6
    assert "allow_missing=['lm_head\\\\.bias'] (CLI: --allow-missing 'lm_head\\.bias')" in hints[0]
    assert "allow_unexpected=['ln_f\\\\.bias'] (CLI: --allow-unexpected 'ln_f\\.bias')" in hints[1]
    assert hints[2].startswith("hint: shapes differ for blocks.1.linear1.weight") and "no option" in hints[2]
    assert "cast=True (CLI: --cast)" in hints[3] and "float32 -> bfloat16 lossy" in hints[3]
    assert "check_classes=False (CLI: --no-check-classes)" in hints[4]
    assert "untie=True (CLI: --untie)" in hints[5] and "lm_head.weight" in hints[5]


def test_check_json_report(ckpt: Path) -> None:
    """check --json prints the report: ok, checked, every problem with expected/found, hints."""
    code, out, _ = run("check", str(ckpt), "--model", VARIANT, "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False
    assert (doc["checkpoint"], doc["model"]) == (str(ckpt), VARIANT)
    assert {p["kind"] for p in doc["problems"]} == {"missing", "unexpected", "shape", "dtype", "class", "alias"}
    assert {"kind": "dtype", "key": "wpe.weight", "expected": "bfloat16[16, 32]", "found": "float32[16, 32]"} in doc[
        "problems"
    ]
    assert doc["suggested_remap"] is None
    code, out, _ = run("check", str(ckpt), "--model", TINY, "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_check_policies_on_the_command_line(ckpt: Path) -> None:
    """--allow-missing, --allow-unexpected and --cast remove exactly those problems."""
    code, out, _ = run(
        "check",
        str(ckpt),
        "--model",
        VARIANT,
        "--json",
        "--allow-missing",
        r"lm_head\.bias",
        "--allow-unexpected",
        r"ln_f\..*",
        "--cast",
    )
    assert code == 1
    assert {p["kind"] for p in json.loads(out)["problems"]} == {"shape", "class", "alias"}


def test_check_with_remap_and_suggested_remap(tmp_path: Path) -> None:
    """A 'module.'-prefixed checkpoint fails with the suggested remap printed, and passes with --remap."""
    path = tmp_path / "ddp"
    mc.save({f"module.{k}": v for k, v in tiny_gpt().state_dict().items()}, path, record_code=False)
    code, out, _ = run("check", str(path), "--model", TINY)
    assert code == 1
    assert "hint: load with remap={'^module\\\\.': ''}" in out
    code, out, _ = run("check", str(path), "--model", TINY, "--remap", r"^module\.=")
    assert code == 0, out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "expected pkg.module:factory or path/to/file.py:factory"),
        ("no_such_package_xyz:f", "importing 'no_such_package_xyz' failed: ModuleNotFoundError"),
        ("manifest_ckpt.demo_models:nope", "'manifest_ckpt.demo_models' has no attribute 'nope'"),
        ("manifest_ckpt.demo_models:torch", "calling torch() failed: TypeError"),
        ("json:dumps", "calling dumps() failed: TypeError"),
        ("manifest_ckpt._version:__version__", "calling __version__() failed"),
        ("missing_file.py:f", "file 'missing_file.py' does not exist"),
    ],
)
def test_check_bad_model_spec_exits_2(ckpt: Path, spec: str, message: str) -> None:
    """A --model that cannot be imported or does not build an nn.Module is exit 2 with the reason."""
    code, out, err = run("check", str(ckpt), "--model", spec)
    assert (code, out) == (2, "")
    assert err.startswith(f"error: --model {spec!r}") or err.startswith("error: --model: ")
    assert message in err


def test_check_model_factory_returning_a_non_module_exits_2(ckpt: Path, tmp_path: Path) -> None:
    """A factory that returns something other than an nn.Module is exit 2, naming what it gave."""
    factory = tmp_path / "factory.py"
    factory.write_text("def build():\n    return {'weight': 1}\n")
    code, _, err = run("check", str(ckpt), "--model", f"{factory}:build")
    assert code == 2
    assert "build gave a dict, expected an nn.Module" in err


def test_check_model_from_a_python_file(ckpt: Path, tmp_path: Path) -> None:
    """--model path/to/file.py:factory imports the file and checks the model it builds."""
    factory = tmp_path / "mymodel.py"
    factory.write_text("from manifest_ckpt.demo_models import tiny_gpt\n\ndef build():\n    return tiny_gpt()\n")
    code, _, _ = run("check", str(ckpt), "--model", f"{factory}:build")
    assert code == 0


@pytest.mark.parametrize(
    ("remap", "message"),
    [
        ("noequals", "--remap 'noequals': expected REGEX=REPLACEMENT"),
        ("(=x", "remap pattern '(' is not a valid regular expression"),
        (r"^nothing\.=", r"remap pattern '^nothing\\.' matches no checkpoint key"),
        (r"^wpe\.=wte.", "remap renames both 'wpe.weight' and 'wte.weight' to 'wte.weight'"),
    ],
    ids=["no-equals", "invalid-regex", "matches-nothing", "collision"],
)
def test_check_bad_remap_exits_2(ckpt: Path, remap: str, message: str) -> None:
    """A malformed, invalid, useless or colliding --remap is exit 2 with the reason, never a silent no-op."""
    code, out, err = run("check", str(ckpt), "--model", TINY, "--remap", remap)
    assert (code, out) == (2, "")
    assert message in err


def test_check_of_a_missing_checkpoint_exits_2(tmp_path: Path) -> None:
    """check on a path that does not exist is exit 2."""
    code, _, err = run("check", str(tmp_path / "nope"), "--model", TINY)
    assert code == 2 and "no such checkpoint" in err


# -- schema, demo, usage -------------------------------------------------------------------


def test_schema_prints_the_schema_file() -> None:
    """schema prints JSON equal to schema/manifest-v1.schema.json."""
    code, out, err = run("schema")
    assert (code, err) == (0, "")
    assert json.loads(out) == json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def test_demo_runs_offline_and_succeeds(tmp_path: Path) -> None:
    """demo --dir saves, inspects, verifies, refuses the look-alike and loads through the suggested remap: exit 0."""
    code, out, err = run("demo", "--dir", str(tmp_path))
    assert (code, err) == (0, "")
    assert "8 problems (1 missing, 1 unexpected, 3 shape, 1 dtype, 1 class, 1 alias)" in out
    assert "hint: load with remap={'^module\\\\.': ''}" in out
    assert "module left untouched by the refused load: True" in out
    assert "bit-exact: True; lm_head still tied to wte: True" in out
    assert out.endswith("demo finished: every step behaved as promised\n")
    assert (tmp_path / "tiny-gpt" / "manifest.json").is_file()


def test_schema_json_prints_the_same_document() -> None:
    """schema --json is accepted (every command takes --json) and prints the schema document itself."""
    assert run("schema", "--json") == run("schema")


def test_demo_json_reports_every_step(tmp_path: Path) -> None:
    """demo --json prints one JSON document: each step's outcome, nothing of the narrative."""
    code, out, err = run("demo", "--dir", str(tmp_path), "--json")
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert (document["ok"], document["failures"]) == (True, 0)
    assert [s["step"] for s in document["steps"]] == [
        "save", "inspect", "verify", "refuse_wrong_model", "refuse_prefixed_keys", "load_with_remap",
    ]
    assert all(s["ok"] for s in document["steps"])
    by_name = {s["step"]: s for s in document["steps"]}
    assert by_name["save"]["digest"] == mc.read_manifest(tmp_path / "tiny-gpt").digest
    assert by_name["refuse_wrong_model"]["problems"] == 8
    assert by_name["refuse_prefixed_keys"]["suggested_remap"] == {"^module\\.": ""}
    assert by_name["load_with_remap"]["bit_exact"] is True


def test_every_command_takes_json() -> None:
    """Each subcommand's help lists --json (the brief: --json on every command)."""
    parser = cli._parser(io.StringIO())
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert sorted(commands) == [
        "check", "convert", "demo", "diff", "export-hf", "inspect", "lineage", "pack", "schema", "unpack", "verify",
    ]
    for name, sub in commands.items():
        assert "--json" in sub._option_string_actions, name


def test_demo_creates_its_directory(tmp_path: Path) -> None:
    """demo --dir with a directory that does not exist yet creates it (regression: exited 2)."""
    target = tmp_path / "new" / "demo"
    code, _, err = run("demo", "--dir", str(target))
    assert (code, err) == (0, "")
    assert (target / "tiny-gpt-ddp" / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "the following arguments are required: COMMAND"),
        (("bogus",), "argument COMMAND: invalid choice: 'bogus'"),
        (("inspect",), "the following arguments are required: path"),
        (("check", "x"), "the following arguments are required: --model"),
        (("inspect", "x", "--depth", "deep"), "argument --depth: invalid int value: 'deep'"),
        (("verify", "x", "--nope"), "unrecognized arguments: --nope"),
    ],
)
def test_bad_usage_exits_2_with_usage_on_stderr(argv: tuple[str, ...], message: str) -> None:
    """No command, an unknown command, a missing argument or an unknown option is exit 2, usage on stderr."""
    code, out, err = run(*argv)
    assert (code, out) == (2, "")
    assert err.startswith("usage: manifest-ckpt")
    assert message in err


def test_version_prints_on_stdout() -> None:
    """--version prints the version on stdout and exits 0 (regression: it went to stderr)."""
    assert run("--version") == (0, f"manifest-ckpt {__version__}\n", "")


def test_help_prints_on_stdout() -> None:
    """--help lists every command on stdout and exits 0."""
    code, out, err = run("--help")
    assert (code, err) == (0, "")
    for command in ("inspect", "verify", "check", "schema", "demo"):
        assert command in out
    code, out, _ = run("check", "--help")
    assert code == 0 and "--allow-missing" in out


def test_main_exits_with_the_code(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """main() is a thin wrapper: sys.exit(run()) with sys.argv."""
    monkeypatch.setattr("sys.argv", ["manifest-ckpt", "schema"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 0
    assert json.loads(capsys.readouterr().out)["title"].startswith("manifest-ckpt manifest")


# -- failures: exit 2 with a one-line reason, never a traceback ---------------------------------


def _no_traceback(out: str, err: str) -> None:
    assert "Traceback" not in out + err
    assert 'File "' not in out + err


def test_invalid_allow_pattern_is_exit_2_naming_the_argument(ckpt: Path) -> None:
    """A bad --allow-missing regex is a PatternError: exit 2, the argument and pattern named, no traceback."""
    code, out, err = run("check", str(ckpt), "--model", TINY, "--allow-missing", "(unclosed")
    assert code == 2
    assert err.startswith("error: allow_missing: '(unclosed' is not a valid regular expression")
    _no_traceback(out, err)


def test_missing_output_directory_is_exit_2_for_pack_and_convert(ckpt: Path, tmp_path: Path) -> None:
    """pack and convert into a directory that does not exist: exit 2 (DestinationError), nothing written."""
    code, out, err = run("pack", str(ckpt), str(tmp_path / "no" / "such" / "x.tar"), "--quiet")
    assert code == 2
    assert "its parent directory" in err and "does not exist" in err and "mkdir -p" in err
    _no_traceback(out, err)
    src = tmp_path / "w.pth"
    import torch

    torch.save({"w": torch.ones(2)}, src)
    code, out, err = run("convert", str(src), str(tmp_path / "no" / "ck"), "--quiet", "--json")
    assert code == 2
    assert json.loads(out)["error"]["type"] == "DestinationError"
    _no_traceback(out, err)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(28, "No space left on device", "/data/x.tar"), "/data/x.tar: No space left on device (ENOSPC); the disk is full"),
        (OSError(30, "Read-only file system", "/ro/x.tar"), "/ro/x.tar: Read-only file system (EROFS); the file system is read-only"),
        (PermissionError(13, "Permission denied", "/root/x.tar"), "/root/x.tar: Permission denied (EACCES); permission denied"),
        (MemoryError(), "out of memory"),
        (RecursionError("maximum recursion depth exceeded"), "the input is nested too deeply"),
        (ZeroDivisionError("division by zero"), "internal error ZeroDivisionError: division by zero; this is a bug"),
    ],
)
def test_environment_failures_are_exit_2_with_one_line(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, expected: str
) -> None:
    """Disk full, read-only, permission, memory, recursion and even a bug: exit 2, one line on stderr."""
    from manifest_ckpt.storage import archive

    def fail(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(archive, "write_archive", fail)
    code, out, err = run("pack", str(ckpt), str(tmp_path / "x.tar"), "--quiet")
    assert code == 2
    assert err.startswith(f"error: {expected}")
    assert err.count("\n") == 1
    _no_traceback(out, err)


def test_environment_failure_with_json_names_errno_and_file(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--json puts the failure on stdout: type, errno name, file and the same one-line message."""
    from manifest_ckpt.storage import archive

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device", "/data/x.tar")

    monkeypatch.setattr(archive, "write_archive", fail)
    code, out, _ = run("pack", str(ckpt), str(tmp_path / "x.tar"), "--quiet", "--json")
    assert code == 2
    document = json.loads(out)
    assert document["ok"] is False
    assert document["error"]["type"] == "OSError"
    assert document["error"]["errno"] == "ENOSPC"
    assert document["error"]["file"] == "/data/x.tar"


def test_unreadable_input_is_exit_2_and_failed_check_is_exit_1(ckpt: Path, tmp_path: Path) -> None:
    """An unreadable manifest is exit 2; a checkpoint that does not fit the model is exit 1."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    code, out, err = run("inspect", str(bad))
    assert code == 2
    _no_traceback(out, err)
    code, _, _ = run("check", str(ckpt), "--model", VARIANT)
    assert code == 1
