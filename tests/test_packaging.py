"""Tests for what the package ships: the schema inside the wheel, the console script, py.typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import manifest_ckpt
from manifest_ckpt.format.schema import load_schema

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself supports 3.10


def test_wheel_config_ships_the_schema_where_the_package_loads_it() -> None:
    """pyproject force-includes schema/ as manifest_ckpt/schema, the path load_schema reads first."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = config["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["force-include"] == {"schema": "manifest_ckpt/schema"}
    assert config["project"]["scripts"] == {"manifest-ckpt": "manifest_ckpt.cli:main"}


def test_loaded_schema_is_the_published_file() -> None:
    """The schema used at run time is the one in schema/, byte for byte as JSON."""
    published = json.loads((ROOT / "schema" / "manifest-v1.schema.json").read_text())
    assert load_schema() == published
    assert published["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_package_is_typed_and_declares_torch_floor() -> None:
    """py.typed ships with the package; users get torch>=2.6, the tests a pinned 2.13.0."""
    assert (Path(manifest_ckpt.__file__).parent / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "torch>=2.6" in config["project"]["dependencies"]
    pins = (ROOT / "requirements" / "test.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins
