"""Tests of ``format.keys``: which state-dict keys every writer refuses, and that all of them do."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import manifest_ckpt as mc
from manifest_ckpt import distributed as mcd
from manifest_ckpt.format.keys import MAX_KEY_LENGTH, check_keys, key_problem

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schema" / "manifest-v1.schema.json"

BAD_KEYS = ["", "__metadata__", "x" * (MAX_KEY_LENGTH + 1), "lone\udc80"]


def test_the_length_limit_is_the_schemas() -> None:
    """MAX_KEY_LENGTH equals the schema's $defs.key maxLength (and minLength is 1)."""
    key = json.loads(SCHEMA_FILE.read_text())["$defs"]["key"]
    assert (key["minLength"], key["maxLength"]) == (1, MAX_KEY_LENGTH)


@pytest.mark.parametrize("key", BAD_KEYS)
def test_each_bad_key_has_a_reason(key: str) -> None:
    """Empty, reserved, over-long and unencodable keys each get a reason; a normal key gets none."""
    assert key_problem(key) is not None
    assert key_problem("transformer.h.0.attn.c_attn.weight") is None


def test_every_bad_key_is_named_at_once() -> None:
    """check_keys lists every offending key in one error, the first one as .key."""
    with pytest.raises(mc.InvalidKeyError) as info:
        check_keys(["ok", *BAD_KEYS], writer="save")
    text = str(info.value)
    assert text.startswith("save: 4 state-dict keys cannot be stored")
    for why in ("is empty", "is reserved", f"is {MAX_KEY_LENGTH + 1} characters long", "lone surrogate"):
        assert why in text
    assert info.value.key == ""


@pytest.mark.parametrize("key", BAD_KEYS[1:])
def test_convert_refuses_bad_keys_before_writing(tmp_path: Path, key: str) -> None:
    """convert of a .pth holding an unstorable key raises InvalidKeyError and writes nothing."""
    src = tmp_path / "src.pth"
    torch.save({"fine": torch.ones(1), key: torch.ones(1)}, src)
    with pytest.raises(mc.InvalidKeyError, match=r"^convert .*src\.pth: 1 state-dict key cannot be stored"):
        mc.convert(src, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src.pth"]


@pytest.mark.parametrize("key", ["", "__metadata__"])
def test_distributed_save_refuses_bad_keys_before_writing(tmp_path: Path, key: str) -> None:
    """distributed.save refuses the empty and the reserved key in planning: no directory is left."""
    with pytest.raises(mc.InvalidKeyError, match=r"distributed\.save: 1 state-dict key cannot be stored"):
        mcd.save({"fine": torch.ones(1), key: torch.ones(1)}, tmp_path / "ck")
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())
