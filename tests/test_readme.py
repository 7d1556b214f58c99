"""The README is kept true: its API example and command-line session run as written and print what it shows."""

from __future__ import annotations

import contextlib
import io
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import manifest_ckpt as mc
from manifest_ckpt import cli
from manifest_ckpt._version import __version__

README = Path(__file__).resolve().parent.parent / "README.md"
# The Python version of the machine the README's outputs were captured on (its inspect output says).
_README_PYTHON = re.search(r"python (\d+\.\d+\.\d+), torch", README.read_text(encoding="utf-8"))[1]  # type: ignore[index]


def _blocks(section: str) -> list[tuple[str, str]]:
    """The fenced blocks (language, body) of the README section headed ``## {section}``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    return [(m[1], m[2]) for m in re.finditer(r"```(\w+)\n(.*?)```", body, re.S)]


def _this_machine(text: str) -> str:
    """The README's output with the versions of the machine it was captured on replaced by this one's."""
    return re.sub(
        r"manifest_ckpt \S+, python \S+, torch \S+",
        f"manifest_ckpt {__version__}, python {platform.python_version()}, torch {torch.__version__.split('+')[0]}",
        text,
    )


@pytest.fixture
def api_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, dict[str, Any]]:
    """Run the API section's example in an empty directory, as a script.

    Returns its stdout, the output the README shows, and the script's globals.
    """
    (_, code), (_, shown) = _blocks("The API")[:2]
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    namespace: dict[str, Any] = {"__name__": "__main__"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)  # the README's own example code
    return out.getvalue(), shown, namespace


def test_api_example_prints_what_the_readme_shows(api_example: tuple[str, str, dict[str, Any]]) -> None:
    """The API example's real output is the README's, digest and refusal report included."""
    printed, shown, _ = api_example
    assert printed == shown


def test_command_line_session_runs_as_shown(
    api_example: tuple[str, str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ``$ manifest-ckpt ...`` line of the command-line section prints what follows it; ``echo $?`` its code."""
    # models.py of the README's comment, building the example script's own Net class.
    (tmp_path / "models.py").write_text(
        "import sys\n\ndef wide():\n    return sys.modules['readme_example'].Net(width=32)\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    example = types.ModuleType("readme_example")
    example.__dict__.update(api_example[2])
    monkeypatch.setitem(sys.modules, "readme_example", example)
    session = next(body for lang, body in _blocks("The command line") if lang == "console")
    assert len(re.findall(r"^\$ ", session, flags=re.M)) == 4
    _session(session)


def test_demo_output_shown_is_the_demos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo excerpt in the command-line section is, verbatim, part of what `manifest-ckpt demo --dir demo` prints."""
    excerpt = next(body for lang, body in _blocks("The command line") if lang == "text")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    assert cli.run(["demo", "--dir", "demo"], stdout=out, stderr=io.StringIO()) == 0
    assert excerpt in out.getvalue()



def _session(body: str, scripts: dict[str, str] | None = None, env: pytest.MonkeyPatch | None = None) -> None:
    """Run a console block in the current directory and compare every command's output with the block's.

    ``manifest-ckpt`` lines run in-process; other lines run in bash (``python NAME.py`` runs
    ``scripts[NAME.py]``, a script the document shows; ``export`` sets the variable through
    ``env``; ``pip install`` is left to the test environment). ``echo $?`` and ``# exit N``
    lines check the previous command's exit code.
    """
    code = None
    for entry in re.split(r"^\$ ", body, flags=re.M)[1:]:
        line, _, shown = entry.partition("\n")
        shown = shown.removesuffix("\n\n") + "\n" if shown.endswith("\n\n") else shown  # a blank line between commands
        exit_line = re.search(r"^# exit (\d+)\n\Z", shown, re.M)
        if exit_line is not None:
            shown = shown[: exit_line.start()]
        argv = shlex.split(line, comments=True)
        if argv == ["echo", "$?"]:
            assert f"{code}\n" == shown
            continue
        if argv[:2] == ["pip", "install"]:
            continue
        if argv[0] == "export":
            assert env is not None and len(argv) == 2 and shown == "", line
            env.setenv(*argv[1].split("=", 1))
            continue
        if argv[0] == "manifest-ckpt":
            out, err = io.StringIO(), io.StringIO()
            code = cli.run(argv[1:], stdout=out, stderr=err)
            printed = out.getvalue() + err.getvalue()
        elif argv[0] == "python":
            assert scripts is not None and len(argv) == 2, line
            script = io.StringIO()
            with contextlib.redirect_stdout(script):
                exec(compile(scripts[argv[1]], argv[1], "exec"), {"__name__": "__main__"})  # the document's own script
            code, printed = 0, script.getvalue()
        else:
            done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=False)
            code, printed = done.returncode, done.stdout + done.stderr
            if argv[0] == "sha256sum" and platform.python_version() != _README_PYTHON:
                # A packed manifest records the Python version: here only the files' equality is comparable.
                assert len({row.split()[0] for row in printed.splitlines()}) == 1, line
                printed = shown
        assert printed == _this_machine(shown), line
        if exit_line is not None:
            assert code == int(exit_line[1]), line


def _scripts(document: str) -> dict[str, str]:
    """The document's python blocks whose first line is ``# NAME.py``, by name."""
    return {
        name: body
        for body in re.findall(r"```python\n(.*?)```", document, re.S)
        for name in re.findall(r"\A# (\w+\.py)\n", body)
    }


def test_training_state_example_prints_what_the_readme_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The training-state example (torch's optimizer matched by position, ours by name) prints the README's output."""
    (_, code), (_, shown) = _blocks("Training state")[:2]
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})  # the README's own example code
    assert out.getvalue() == shown


def _archive_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run docs/archives.md's setup script in an empty directory; the document's text."""
    docs = (README.parent / "docs" / "archives.md").read_text(encoding="utf-8")
    setup = re.search(r"```python\n(.*?)```", docs, re.S)
    assert setup is not None
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(README.parent))
    exec(compile(setup[1], "docs/archives.md", "exec"), {"__name__": "__main__"})  # the docs' own setup script
    return docs


def test_archive_session_runs_as_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pack, a byte-identical pack of a copy with other mtimes and modes, diff and lineage print the README's output."""
    _archive_setup(tmp_path, monkeypatch)
    # elsewhere/: the copy with other timestamps and permissions that the README's comment describes.
    shutil.copytree("runs/base", "elsewhere")
    os.utime("elsewhere/manifest.json", (978307200, 978307200))
    os.chmod("elsewhere/manifest.json", 0o600)
    os.mkdir("archive")
    assert cli.run(["pack", "elsewhere", "elsewhere.tar"], stdout=io.StringIO(), stderr=io.StringIO()) == 0
    for lang, body in _blocks("Archives, diff and lineage"):
        if lang == "console":
            _session(body)


def test_archives_document_runs_as_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every console session of docs/archives.md (pack, verify, a flipped bit, unpack, diff, lineage) prints what it shows."""
    docs = _archive_setup(tmp_path, monkeypatch)
    os.mkdir("archive")
    scripts = _scripts(docs)
    assert sorted(scripts) == ["evil.py", "flip.py"]
    sessions = re.findall(r"```console\n(.*?)```", docs, re.S)
    assert len(sessions) >= 5
    for body in sessions:
        _session(body, scripts)


def test_object_storage_session_runs_as_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/storage.md's session (verify a checkpoint on S3, a URL without one) against a local S3 server."""
    pytest.importorskip("s3fs")
    from manifest_ckpt.demo_models import tiny_gpt
    from tests.test_remote import S3

    server = S3()
    try:
        server.fs.mkdir("ckpts")
        mc.save(tiny_gpt(), "s3://ckpts/run1/step-100", storage_options=server.options)
        docs = (README.parent / "docs" / "storage.md").read_text(encoding="utf-8")
        session = re.findall(r"```console\n(.*?)```", docs, re.S)[0]
        session = session.replace("http://127.0.0.1:9000", server.endpoint)  # the server's port is its own
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(name, "testing")
        monkeypatch.chdir(tmp_path)
        _session(session, env=monkeypatch)
    finally:
        server.server.stop()
