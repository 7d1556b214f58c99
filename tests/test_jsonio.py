"""Strict JSON (``manifest_ckpt.format.jsonio``): every reader refuses what json.loads lets through, typed."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import save_file
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.errors import ConversionError, IntegrityError, ManifestError
from manifest_ckpt.format import jsonio
from manifest_ckpt.format.manifest import Manifest
from manifest_ckpt.format.safetensors_header import parse_header

HUGE_INT = "9" * 5000  # past Python's 4,300-digit int() limit


@pytest.fixture
def manifest_text(tmp_path: Path) -> tuple[Path, str]:
    """A saved checkpoint and its manifest.json text."""
    torch.manual_seed(0)
    mc.save(nn.Linear(2, 2), tmp_path / "ckpt")
    return tmp_path / "ckpt", (tmp_path / "ckpt" / "manifest.json").read_text()


def rewrite(ckpt: Path, old: str, new: str) -> None:
    """Replace ``old`` (which must occur) by ``new`` in the checkpoint's manifest.json."""
    path = ckpt / "manifest.json"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_duplicate_manifest_key_is_refused(manifest_text: tuple[Path, str]) -> None:
    """A key given twice in one manifest object is a ManifestError naming the key (no last-wins)."""
    ckpt, _ = manifest_text
    rewrite(ckpt, '"aliases": {}', '"aliases": {}, "aliases": {}')
    with pytest.raises(ManifestError, match=r'the key "aliases" appears twice in one JSON object'):
        mc.read_manifest(ckpt)


def test_huge_integer_in_manifest_is_refused(manifest_text: tuple[Path, str]) -> None:
    """A 5,000-digit integer is a ManifestError, not a bare ValueError from int()."""
    ckpt, _ = manifest_text
    rewrite(ckpt, '"aliases": {}', f'"aliases": {{}}, "x": {HUGE_INT}')
    with pytest.raises(ManifestError, match="holds an integer of more than 4300 digits"):
        mc.read_manifest(ckpt)


@pytest.mark.parametrize("version", ["\u00b2.0.0", "1.0.\u0663", "1." + "0" * 5000 + ".0"])
def test_format_version_must_be_ascii_digits(manifest_text: tuple[Path, str], version: str) -> None:
    """Superscript or Arabic-Indic digits and 5,000-digit parts are refused at $.format_version."""
    ckpt, _ = manifest_text
    rewrite(ckpt, '"format_version": "1.0.0"', f'"format_version": {json.dumps(version)}')
    with pytest.raises(ManifestError) as info:
        mc.read_manifest(ckpt)
    assert info.value.field == "$.format_version"


@pytest.mark.parametrize("field", ["lineage", "metadata", "extensions"])
def test_deep_free_form_fields_are_refused_at_parse_time(manifest_text: tuple[Path, str], field: str) -> None:
    """Lineage, metadata or extensions nested 500 levels give a ManifestError at that field, not RecursionError."""
    ckpt, text = manifest_text
    document = json.loads(text)
    deep: object = 1
    for _ in range(500):
        deep = [deep]
    if field == "lineage":
        document["lineage"]["user"] = deep
    else:
        document[field] = deep
    (ckpt / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(ManifestError, match=f"nested more than {jsonio.MAX_DEPTH} levels") as info:
        mc.read_manifest(ckpt)
    assert info.value.field == f"$.{field}"


def test_lone_surrogate_in_a_manifest_key_is_refused(manifest_text: tuple[Path, str]) -> None:
    """An escaped lone surrogate (which UTF-8 cannot write back) is a ManifestError; a real pair is fine."""
    ckpt, _ = manifest_text
    rewrite(ckpt, '"aliases": {}', '"aliases": {"\\ud800": "weight"}')
    with pytest.raises(ManifestError, match="lone UTF-16 surrogate"):
        mc.read_manifest(ckpt)
    assert jsonio.loads(b'{"\\ud83d\\ude00": 1}', where="x", what="y", error=ManifestError) == {"\U0001f600": 1}


def test_save_refuses_what_the_reader_refuses(tmp_path: Path) -> None:
    """save refuses too-deep or surrogate-holding metadata/lineage with ManifestError naming the field."""
    deep: object = 1
    for _ in range(jsonio.MAX_DEPTH + 1):
        deep = {"a": deep}
    with pytest.raises(ManifestError, match=r"metadata cannot be stored: .* nested more than") as info:
        mc.save(nn.Linear(2, 2), tmp_path / "a", metadata=deep)
    assert info.value.field == "metadata"
    with pytest.raises(ManifestError, match=r"lineage cannot be stored: .*lone UTF-16 surrogate"):
        mc.save(nn.Linear(2, 2), tmp_path / "b", lineage={"note": "\udc80"})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_metadata_at_the_depth_limit_round_trips(tmp_path: Path) -> None:
    """Metadata exactly at the limit saves and reads back equal (the bound is not off by one)."""
    deep: object = 1
    for _ in range(jsonio.MAX_DEPTH - 1):
        deep = [deep]
    mc.save(nn.Linear(2, 2), tmp_path / "c", metadata=deep)
    assert Manifest.from_json((tmp_path / "c" / "manifest.json").read_bytes()).metadata == deep


def header_blob(body: bytes) -> bytes:
    return struct.pack("<Q", len(body)) + body


def test_duplicate_header_key_is_refused_like_safetensors(tmp_path: Path) -> None:
    """A header naming a tensor twice (at two places) is refused by parse_header, and by safetensors too.

    safetensors keeps the last copy and then finds the first one's bytes uncovered; identical
    copies it accepts, which parse_header refuses as well (there is no reason to write one).
    """
    first = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    second = '{"dtype":"U8","shape":[1],"data_offsets":[1,2]}'
    blob = header_blob(f'{{"w":{first},"w":{second}}}'.encode()) + b"\x01\x02"
    with pytest.raises(IntegrityError, match='the key "w" appears twice'):
        parse_header(blob, len(blob), file="w.safetensors")
    path = tmp_path / "dup.safetensors"
    path.write_bytes(blob)
    with pytest.raises(safetensors.SafetensorError, match="invalid offset"):
        safetensors.safe_open(str(path), "pt")
    same = header_blob(f'{{"w":{first},"w":{first}}}'.encode()) + b"\x01"
    with pytest.raises(IntegrityError, match='the key "w" appears twice'):
        parse_header(same, len(same), file="w.safetensors")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"w":{"dtype":"U8","shape":[' + HUGE_INT.encode() + b'],"data_offsets":[0,1]}}', "4300 digits"),
        (b'{"\\udfff":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', "lone UTF-16 surrogate"),
        (b'{"w":{"dtype":"U8","shape":' + b"[" * 900 + b"]" * 900 + b',"data_offsets":[0,1]}}', "not a list of"),
    ],
    ids=["huge-int", "surrogate-key", "deep-shape"],
)
def test_hostile_header_values_are_integrity_errors(body: bytes, fragment: str) -> None:
    """Huge integers, surrogate keys and deeply nested shapes give IntegrityError, never ValueError/RecursionError."""
    blob = header_blob(body) + b"\x00"
    with pytest.raises(IntegrityError, match=fragment):
        parse_header(blob, len(blob), file="w.safetensors")


def test_duplicate_key_in_hf_index_is_refused(tmp_path: Path) -> None:
    """A sharded index with a weight_map key twice is a ConversionError naming the key."""
    directory = tmp_path / "hf"
    directory.mkdir()
    save_file({"w": torch.ones(2)}, directory / "m.safetensors")
    (directory / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "m.safetensors", "w": "other.safetensors"}}'
    )
    with pytest.raises(ConversionError, match='the key "w" appears twice'):
        mc.convert(directory, tmp_path / "out")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"dtype": "float32"', '"dtype": "int8", "dtype": "float32"'),  # schema-valid once collapsed
        ('"aliases": {}', '"aliases" : {}, "aliases": {}'),  # whitespace before the colon
        ('"aliases": {}', '"aliases"\n:{"a": "weight", "a": "weight"}'),
    ],
)
def test_duplicate_key_is_refused_on_the_fast_path_too(manifest_text: tuple[Path, str], old: str, new: str) -> None:
    """A repeated key deep in a tensor entry, or spelled with a spaced colon, is still refused by name."""
    ckpt, _ = manifest_text
    rewrite(ckpt, old, new)
    with pytest.raises(ManifestError, match=r"the key \"(dtype|aliases|a)\" appears twice in one JSON object"):
        mc.read_manifest(ckpt)


@pytest.mark.parametrize(
    "text",
    [b'{"a": NaN}', b'{"a": ' + HUGE_INT.encode() + b"}", b'"\\ud800"', b'{"a" : 1}', b"\xef\xbb\xbf{}", b"{", b'{"a": "\xff"}'],
)
def test_decode_fast_leaves_what_it_cannot_vouch_for_to_loads(text: bytes) -> None:
    """NaN, huge integers, lone surrogates, spaced colons, a BOM and broken text get None: loads decides."""
    assert jsonio.decode_fast(text) is None


def test_decode_fast_bound_counts_every_key_written() -> None:
    """The bound counts a repeated key that the parsed document has collapsed, so counting finds it."""
    document, bound = jsonio.decode_fast(b'{"a": {"b": 1, "b": 2}, "c": [{"d": "x\\":"}]}') or (None, 0)
    assert document == {"a": {"b": 2}, "c": [{"d": 'x":'}]}
    assert (bound, jsonio.count_keys(document)) == (6, 4)  # 5 keys written + the string's '":'; 4 parsed
