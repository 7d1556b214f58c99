"""Regression tests for library bugs found by the property suites in tests/property/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.format.manifest import MANIFEST_NAME


def _as_floats(value: object) -> object:
    """The same JSON with every integer written as an integral float (8 -> 8.0)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, list):
        return [_as_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_floats(v) for k, v in value.items()}
    return value


def _integral_floats(path: Path, *, everywhere: bool) -> None:
    """Rewrite byte ranges (and with ``everywhere`` also sizes, shapes, versions) as floats."""
    doc = json.loads((path / MANIFEST_NAME).read_text())
    for entry in doc["tensors"].values():
        entry["byte_range"] = _as_floats(entry["byte_range"])
        if everywhere:
            entry["shape"] = _as_floats(entry["shape"])
    if everywhere:
        for f in doc["files"].values():
            f["size"] = float(f["size"])
        for m in doc["modules"].values():
            m["version"] = _as_floats(m["version"])
    (path / MANIFEST_NAME).write_text(json.dumps(doc))


def test_integral_floats_in_the_manifest_are_read_as_ints(tmp_path: Path) -> None:
    """Sizes, shapes, byte ranges and versions written as 8.0 (JSON Schema integers) are read as ints."""
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    mc.save(source, tmp_path / "ckpt", record_code=False)
    _integral_floats(tmp_path / "ckpt", everywhere=True)

    manifest = mc.read_manifest(tmp_path / "ckpt")
    entry = manifest.tensors["0.weight"]
    assert entry.shape == (2, 3) and all(type(d) is int for d in entry.shape)
    assert entry.byte_range is not None and all(type(b) is int for b in entry.byte_range)
    assert all(type(f.size) is int for f in manifest.files.values())
    assert manifest.modules is not None and type(manifest.modules["1"].version) is int


def test_integral_floats_in_byte_ranges_verify_and_load_bit_exact(tmp_path: Path) -> None:
    """verify and load used to fail with TypeError on a byte range such as [208.0, 232.0]."""
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    mc.save(source, tmp_path / "ckpt", record_code=False)
    _integral_floats(tmp_path / "ckpt", everywhere=False)

    mc.verify(tmp_path / "ckpt")
    target = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    mc.load(target, tmp_path / "ckpt", verify_digests=True)
    for (key, want), got in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(want, got), key


class _Expanded(nn.Module):
    """A module whose second parameter is an expanded view (stride 0: rows share memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Parameter(torch.ones(2))
        self.table = nn.Parameter(torch.arange(3.0).expand(2, 3))


def test_load_into_an_expanded_view_is_refused_before_any_copy(tmp_path: Path) -> None:
    """Loading used to write 'first' and then fail on 'table' with RuntimeError: now nothing is written."""
    mc.save(_Expanded(), tmp_path / "ckpt", record_code=False)
    target = _Expanded()
    with torch.no_grad():
        target.first.fill_(5.0)
    with pytest.raises(mc.UnsupportedTensorError, match=r"'table'.*expanded view"):
        mc.load(target, tmp_path / "ckpt")
    assert torch.equal(target.first, torch.full((2,), 5.0))


def test_load_into_a_meta_module_with_an_expanded_view_materialises_it(tmp_path: Path) -> None:
    """On the meta device the expanded view is replaced by a fresh dense tensor, so the load succeeds."""
    source = _Expanded()
    mc.save(source, tmp_path / "ckpt", record_code=False)
    with torch.device("meta"):
        target = _Expanded()
    result = mc.load(target, tmp_path / "ckpt")
    assert result.materialized == ["first", "table"]
    assert torch.equal(target.table, source.table)
    assert target.table.stride() == (3, 1)


def _twins(outer: str, first: str, second: str) -> nn.Module:
    """``{outer: {first: GRU, second: GRU}, "enc": Linear}`` with two identical GRUs (twin layers)."""
    return nn.ModuleDict(
        {
            outer: nn.ModuleDict({first: nn.GRU(1, 1, bias=False), second: nn.GRU(1, 1, bias=False)}),
            "enc": nn.Linear(1, 1, bias=False),
        }
    )


def test_hinted_remap_does_not_swap_twin_layers(tmp_path: Path) -> None:
    """'dec' renamed 'head' everywhere: the hint used to map dec.dec onto head.enc (twins crosswise)."""
    torch.manual_seed(0)
    source = _twins("dec", "enc", "dec")
    mc.save(source, tmp_path / "ckpt", record_code=False)
    target = _twins("head", "enc", "head")

    report = mc.check(target, tmp_path / "ckpt")
    assert report.suggested_remap == {r"(?<![^.])dec(?![^.])": "head"}
    mc.load(target, tmp_path / "ckpt", remap=report.suggested_remap)
    renamed = {k.replace("dec", "head"): v for k, v in source.state_dict().items()}
    assert renamed.keys() == target.state_dict().keys()
    for key, value in target.state_dict().items():
        assert torch.equal(value, renamed[key]), key


def test_a_name_renamed_in_two_places_gets_a_hint(tmp_path: Path) -> None:
    """'enc' renamed 'head' at two depths (twin embeddings): there used to be no hint at all."""
    torch.manual_seed(0)
    source = nn.ModuleDict({"enc": nn.ModuleDict({"enc": nn.Embedding(1, 1), "dec": nn.Embedding(1, 1)})})
    mc.save(source, tmp_path / "ckpt", record_code=False)
    target = nn.ModuleDict({"head": nn.ModuleDict({"head": nn.Embedding(1, 1), "dec": nn.Embedding(1, 1)})})

    report = mc.check(target, tmp_path / "ckpt")
    assert report.suggested_remap == {r"(?<![^.])enc(?![^.])": "head"}
    assert report.hints[0] == "checkpoint keys name a module 'enc' wherever the module names it 'head'"
    mc.load(target, tmp_path / "ckpt", remap=report.suggested_remap)
    assert torch.equal(target.get_parameter("head.head.weight"), source.get_parameter("enc.enc.weight"))
    assert torch.equal(target.get_parameter("head.dec.weight"), source.get_parameter("enc.dec.weight"))
