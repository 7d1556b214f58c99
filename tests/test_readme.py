"""The README is kept true: its API example and command-line session run as written and print what it shows."""

from __future__ import annotations

import contextlib
import io
import platform
import re
import shlex
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from manifest_ckpt import cli
from manifest_ckpt._version import __version__

README = Path(__file__).resolve().parent.parent / "README.md"


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
    commands = re.split(r"^\$ ", session, flags=re.M)[1:]
    assert len(commands) == 4
    code = None
    for entry in commands:
        line, _, shown = entry.partition("\n")
        shown = shown.removesuffix("\n\n") + "\n" if shown.endswith("\n\n") else shown  # a blank line between commands
        argv = shlex.split(line, comments=True)
        if argv == ["echo", "$?"]:
            assert f"{code}\n" == shown
            continue
        assert argv[0] == "manifest-ckpt"
        out, err = io.StringIO(), io.StringIO()
        code = cli.run(argv[1:], stdout=out, stderr=err)
        assert err.getvalue() == ""
        assert out.getvalue() == _this_machine(shown), line


def test_demo_output_shown_is_the_demos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo excerpt in the command-line section is, verbatim, part of what `manifest-ckpt demo --dir demo` prints."""
    excerpt = next(body for lang, body in _blocks("The command line") if lang == "text")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    assert cli.run(["demo", "--dir", "demo"], stdout=out, stderr=io.StringIO()) == 0
    assert excerpt in out.getvalue()
