"""Tests for diff: structure (through compare), values (tile by tile, bounded), lineage, CLI exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.cli import run
from manifest_ckpt.comparison import diff as _diff
from manifest_ckpt.comparison.diff import TILE_ELEMENTS, _overlaps, _tiles, diff
from manifest_ckpt.format.manifest import Chunk, Manifest, TensorEntry, chunked_digest, compute_digest
from manifest_ckpt.storage.archive import pack
from manifest_ckpt.writer import write_safetensors
from tests._models import TiedNet


def cli(*argv: str) -> tuple[int, str, str]:
    """Run the command line in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def save_state(path: Path, state: dict[str, torch.Tensor], **kwargs: object) -> Path:
    """Save a plain state dict and return its path."""
    mc.save(state, path, record_code=False, **kwargs)  # type: ignore[arg-type]
    return path


def save_chunked(path: Path, state: dict[str, torch.Tensor], rows: int) -> Path:
    """Save a state dict whose 2-D tensors are split into chunks of ``rows`` rows, one file per chunk."""
    path.mkdir()
    files, tensors = {}, {}
    for key, value in state.items():
        dtype = str(value.dtype).removeprefix("torch.")
        chunks = []
        for start in range(0, value.shape[0], rows):
            piece = value[start : start + rows]
            layout = [(key, dtype, tuple(piece.shape))]
            name, entry, digests, ranges = write_safetensors(path, layout, [piece], False)
            files[name] = entry
            offsets = (start,) + (0,) * (value.dim() - 1)
            chunks.append(Chunk(offsets, tuple(piece.shape), name, ranges[0], digests[0]))
        tensors[key] = TensorEntry(dtype, tuple(value.shape), chunked_digest(tuple(chunks)), chunks=tuple(chunks))
    manifest = Manifest(
        digest=compute_digest(tensors, {}, None),
        files=dict(sorted(files.items())),
        tensors=tensors,
        aliases={},
        modules=None,
        lineage={"created_by": {"manifest_ckpt": "0", "torch": "0", "python": "0"}, "parents": []},
    )
    (path / "manifest.json").write_bytes(manifest.to_json())
    mc.verify(path)
    return path


# --------------------------------------------------------------------------- identical


def test_copies_are_identical_without_reading_any_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory and its archive compare identical from digests alone; CLI exits 0 and prints IDENTICAL."""
    mc.save(TiedNet(), tmp_path / "ck")
    pack(tmp_path / "ck", tmp_path / "ck.tar")

    def no_reads(*args: object, **kwargs: object) -> None:
        raise AssertionError("equal digests must not be read")

    monkeypatch.setattr(_diff, "_value_changes", no_reads)
    result = diff(tmp_path / "ck", tmp_path / "ck.tar")
    assert result.identical and result.values == () and result.structure == ()
    assert result.compared == 9  # 8 stored keys and the tied head.weight
    code, out, err = cli("diff", str(tmp_path / "ck"), str(tmp_path / "ck.tar"))
    assert code == 0 and err == ""
    assert out.endswith("values: all 9 compared keys equal\nlineage: same parents\n\nIDENTICAL\n")


def test_diff_of_identical_checkpoints_does_not_import_torch(tmp_path: Path) -> None:
    """`manifest-ckpt diff` of identical checkpoints stays light: torch is never imported."""
    mc.save(TiedNet(), tmp_path / "ck")
    pack(tmp_path / "ck", tmp_path / "ck.tar")
    code = (
        "import sys, io\n"
        "from manifest_ckpt.cli import run\n"
        f"rc = run(['diff', {str(tmp_path / 'ck')!r}, {str(tmp_path / 'ck.tar')!r}], stdout=io.StringIO())\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- values


def test_value_changes_are_counted_with_max_abs_and_max_rel(tmp_path: Path) -> None:
    """Changed elements, max |a-b| and max |a-b|/max(|a|,|b|) are exact; unchanged keys are not listed."""
    a = {"w": torch.tensor([[1.0, 2.0], [4.0, -8.0]]), "same": torch.arange(6.0)}
    b = {"w": torch.tensor([[1.0, 2.5], [4.0, -6.0]]), "same": torch.arange(6.0)}
    result = diff(save_state(tmp_path / "a", a), save_state(tmp_path / "b", b))
    (change,) = result.values
    assert change.to_dict() == {
        "key": "w",
        "a": "float32[2, 2]",
        "b": "float32[2, 2]",
        "elements": 4,
        "changed": 2,
        "max_abs": 2.0,
        "max_rel": 0.25,
        "nonfinite": 0,
    }
    assert result.structure == () and result.compared == 2 and not result.identical
    code, out, _ = cli("diff", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 1
    assert "values: 1 of 2 compared keys changed\n" in out
    assert "w    2/4      2        0.25\n" in out
    assert out.endswith("DIFFERENT: 1 changed key\n")


def test_bitwise_changes_and_non_finite_values(tmp_path: Path) -> None:
    """-0.0 vs 0.0 counts as changed with max_abs 0; NaN vs a number is non-finite; equal NaN bits are unchanged."""
    nan = float("nan")
    a = {"z": torch.tensor([0.0, 1.0]), "n": torch.tensor([nan, 1.0, 2.0]), "i": torch.tensor([float("inf"), 3.0])}
    b = {"z": torch.tensor([-0.0, 1.0]), "n": torch.tensor([nan, nan, 2.0]), "i": torch.tensor([float("inf"), 3.0])}
    result = diff(save_state(tmp_path / "a", a), save_state(tmp_path / "b", b))
    by_key = {v.key: v for v in result.values}
    assert sorted(by_key) == ["n", "z"]
    assert (by_key["z"].changed, by_key["z"].max_abs, by_key["z"].max_rel, by_key["z"].nonfinite) == (1, 0.0, 0.0, 0)
    assert (by_key["n"].changed, by_key["n"].max_abs, by_key["n"].max_rel, by_key["n"].nonfinite) == (1, None, None, 1)
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["values"]["changed"][0]["max_abs"] is None


def test_dtype_change_is_structural_and_values_are_compared_after_conversion(tmp_path: Path) -> None:
    """float32 -> bfloat16 is a dtype difference, and the rounding error it caused is measured."""
    w = torch.tensor([1.0, 1.0078125, 3.14159, 100.0])
    result = diff(save_state(tmp_path / "a", {"w": w}), save_state(tmp_path / "b", {"w": w.to(torch.bfloat16)}))
    (problem,) = result.structure
    assert (problem.kind, problem.key, problem.expected, problem.found) == ("dtype", "w", "float32[4]", "bfloat16[4]")
    (change,) = result.values
    rounded = w.to(torch.bfloat16).to(torch.float64)
    assert change.changed == 1  # only pi is not a bfloat16 value
    assert change.max_abs == float((w.to(torch.float64) - rounded).abs().max())
    assert change.max_rel == float((w.to(torch.float64) - rounded).abs().max() / w[2].abs().to(torch.float64))


def test_int_bool_and_complex_tensors_are_compared(tmp_path: Path) -> None:
    """Integer, bool and complex values are compared bitwise and measured in float64 / complex128."""
    a = {"i": torch.tensor([1, 2, 3]), "b": torch.tensor([True, False]), "c": torch.tensor([1 + 1j, 2j])}
    b = {"i": torch.tensor([1, 7, 3]), "b": torch.tensor([True, True]), "c": torch.tensor([1 + 1j, 2 + 2j])}
    result = diff(save_state(tmp_path / "a", a), save_state(tmp_path / "b", b))
    by_key = {v.key: (v.changed, v.max_abs, v.max_rel) for v in result.values}
    assert by_key["i"] == (1, 5.0, 5 / 7)
    assert by_key["b"] == (1, 1.0, 1.0)
    assert by_key["c"][0] == 1 and by_key["c"][1] == pytest.approx(2.0)
    assert by_key["c"][2] == pytest.approx(2.0 / abs(2 + 2j))


def test_whole_and_chunked_storage_of_equal_values_is_identical(tmp_path: Path) -> None:
    """The same values stored whole in A and in chunks in B are identical; the digest difference is explained."""
    torch.manual_seed(0)
    state = {"w": torch.randn(8, 4), "v": torch.randn(5, 3)}
    whole = save_state(tmp_path / "whole", state)
    chunked = save_chunked(tmp_path / "chunked", state, rows=3)
    result = diff(whole, chunked)
    assert result.digest_a != result.digest_b
    assert result.identical and result.values == ()
    assert result.notes == (
        "the digests differ only in how tensors are split into chunks; every value is bitwise equal",
    )


def test_value_change_inside_one_chunk_is_located(tmp_path: Path) -> None:
    """A change in the last chunk of a chunked tensor is found when the other side is stored whole."""
    torch.manual_seed(0)
    state = {"w": torch.randn(8, 4)}
    changed = {"w": state["w"].clone()}
    changed["w"][7, 3] += 0.5
    changed["w"][6, 0] = -changed["w"][6, 0]
    result = diff(save_state(tmp_path / "a", state), save_chunked(tmp_path / "b", changed, rows=3))
    (change,) = result.values
    assert change.changed == 2
    expected_abs = max(0.5, 2 * abs(float(state["w"][6, 0])))
    assert change.max_abs == pytest.approx(expected_abs, rel=1e-6)
    assert change.max_rel == pytest.approx(2.0)


def test_tiny_tiles_give_the_same_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Comparing 7 elements at a time (rows split across tiles) gives exactly the one-tile result."""
    torch.manual_seed(1)
    a = {"w": torch.randn(6, 5, 4), "s": torch.tensor(2.0)}
    b = {"w": a["w"] + torch.randn(6, 5, 4) * (torch.rand(6, 5, 4) > 0.7), "s": torch.tensor(3.0)}
    pa, pb = save_state(tmp_path / "a", a), save_state(tmp_path / "b", b)
    full = diff(pa, pb).to_dict()
    monkeypatch.setattr(_diff, "TILE_ELEMENTS", 7)
    assert diff(pa, pb).to_dict() == full
    assert {v["key"] for v in full["values"]["changed"]} == {"s", "w"}


@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 9, 3), (4, 1, 1, 6)])
@pytest.mark.parametrize("limit", [1, 4, 7, 1000])
def test_tiles_cover_every_element_once_within_the_limit(shape: tuple[int, ...], limit: int) -> None:
    """_tiles partitions a shape into tiles of at most ``limit`` elements (or one element when limit is smaller)."""
    seen = torch.zeros(shape, dtype=torch.int64)
    for tile in _tiles(shape, limit):
        region = seen[tile]
        assert region.numel() <= max(limit, 1)
        region += 1
    assert bool((seen == 1).all())


def test_overlaps_of_two_chunkings_tile_the_tensor_exactly() -> None:
    """Row chunks of A meeting column chunks of B cover each element of the tensor exactly once."""
    rows = (Chunk((0, 0), (3, 6), "a", (0, 0), "x"), Chunk((3, 0), (2, 6), "a", (0, 0), "x"))
    cols = (Chunk((0, 0), (5, 2), "b", (0, 0), "x"), Chunk((0, 2), (5, 4), "b", (0, 0), "x"))
    seen = torch.zeros(5, 6, dtype=torch.int64)
    for _, _, low, high in _overlaps(rows, cols):
        seen[tuple(slice(lo, h) for lo, h in zip(low, high))] += 1
    assert bool((seen == 1).all())
    assert len(list(_overlaps(rows, cols))) == 4


def test_values_are_read_one_bounded_tile_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tile handed to the comparison holds at most TILE_ELEMENTS elements of each side."""
    pa = save_state(tmp_path / "a", {"w": torch.zeros(64, 48)})
    pb = save_state(tmp_path / "b", {"w": torch.ones(64, 48)})
    sizes: list[int] = []
    original = _diff._compare_tile

    def spy(x: torch.Tensor, y: torch.Tensor, stats: _diff._Stats) -> None:
        sizes.append(max(x.numel(), y.numel()))
        original(x, y, stats)

    monkeypatch.setattr(_diff, "_compare_tile", spy)
    monkeypatch.setattr(_diff, "TILE_ELEMENTS", 100)
    (change,) = diff(pa, pb).values
    assert change.changed == 64 * 48 and change.max_abs == 1.0
    assert max(sizes) <= 100 and sum(sizes) == 64 * 48
    assert TILE_ELEMENTS == 1 << 20  # the default: 8 MiB per float64 copy


def test_no_values_lists_digest_changes_without_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """values=False (--no-values) lists keys whose digests differ with unknown magnitudes."""
    pa = save_state(tmp_path / "a", {"w": torch.zeros(3)})
    pb = save_state(tmp_path / "b", {"w": torch.ones(3)})
    monkeypatch.setattr(_diff, "_value_changes", None)
    (change,) = diff(pa, pb, values=False).values
    assert (change.key, change.changed, change.max_abs, change.max_rel) == ("w", -1, None, None)
    code, out, _ = cli("diff", "--no-values", str(pa), str(pb))
    assert code == 1 and "digest differs (not read)" in out


# --------------------------------------------------------------------------- structure


class Small(nn.Module):
    def __init__(self, width: int = 4, act: type[nn.Module] = nn.ReLU, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(4, width, bias=bias)
        self.act = act()
        self.out = nn.Linear(width, 2)


def test_structure_differences_come_from_compare(tmp_path: Path) -> None:
    """Removed, added and reshaped keys and a parameter-less layer swap are each reported once."""
    mc.save(Small(), tmp_path / "a", record_code=False)
    model = Small(width=5, act=nn.GELU, bias=False)
    model.register_buffer("extra", torch.zeros(1))
    mc.save(model, tmp_path / "b", record_code=False)
    result = diff(tmp_path / "a", tmp_path / "b")
    assert [(p.kind, p.key, p.expected, p.found) for p in result.structure] == [
        ("removed", "fc.bias", "float32[4]", None),
        ("added", "extra", None, "float32[1]"),
        ("shape", "fc.weight", "float32[4, 4]", "float32[5, 4]"),
        ("shape", "out.weight", "float32[2, 4]", "float32[2, 5]"),
    ]
    assert result.modules == ("act is torch.nn.modules.activation.ReLU in A, torch.nn.modules.activation.GELU in B",)
    code, out, _ = cli("diff", "--json", str(tmp_path / "a"), str(tmp_path / "b"))
    document = json.loads(out)
    assert code == 1 and document["identical"] is False
    assert [p["kind"] for p in document["structure"]] == ["removed", "added", "shape", "shape"]


def test_class_and_tie_differences(tmp_path: Path) -> None:
    """A Linear swapped for a look-alike class and an untied head are reported as class and alias problems."""

    class Twin(nn.Linear):
        pass

    tied = TiedNet()
    untied = TiedNet()
    untied.head.weight = nn.Parameter(untied.emb.weight.detach().clone())
    untied.fc = Twin(4, 4)
    mc.save(tied, tmp_path / "a", record_code=False)
    mc.save(untied, tmp_path / "b", record_code=False)
    kinds = {(p.kind, p.key) for p in diff(tmp_path / "a", tmp_path / "b").structure}
    assert ("class", "fc") in kinds
    assert ("alias", "head.weight") in kinds


def test_renamed_prefix_suggests_a_remap(tmp_path: Path) -> None:
    """Keys moved under a new prefix are listed and the renaming that explains them is suggested."""
    state = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}
    pa = save_state(tmp_path / "a", state)
    pb = save_state(tmp_path / "b", {f"model.{k}": v for k, v in state.items()})
    result = diff(pa, pb)
    assert result.suggested_remap == {"^model\\.": ""}
    assert "hint: B's keys map onto A's with remap={'^model\\\\.': ''}" in str(result)


# --------------------------------------------------------------------------- lineage


def test_lineage_differences(tmp_path: Path) -> None:
    """A child records its parent: the relation is named and the parent counts as a lineage difference."""
    base = mc.save(TiedNet(), tmp_path / "base", record_code=False)
    mc.save(TiedNet(), tmp_path / "ft", parents=[(tmp_path / "base", "fine-tuned-from")], record_code=False)
    result = diff(tmp_path / "base", tmp_path / "ft")
    assert result.lineage.b_from_a == "fine-tuned-from" and result.lineage.a_from_b is None
    assert result.lineage.only_in_b == ({"digest": base.digest, "relation": "fine-tuned-from", "name": "base"},)
    assert "lineage: B records A as a parent (fine-tuned-from)" in str(result)
    reverse = diff(tmp_path / "ft", tmp_path / "base")
    assert reverse.lineage.a_from_b == "fine-tuned-from"


def test_same_weights_with_other_parents_differ_only_in_lineage(tmp_path: Path) -> None:
    """Equal weights recorded with a different parent are DIFFERENT because of lineage alone."""
    model = TiedNet()
    mc.save(TiedNet(), tmp_path / "p", record_code=False)  # other random values: another digest
    mc.save(model, tmp_path / "a", record_code=False)
    mc.save(model, tmp_path / "b", parents=[(tmp_path / "p", "resumed-from")], record_code=False)
    result = diff(tmp_path / "a", tmp_path / "b")
    assert result.digest_a == result.digest_b and result.values == () and not result.identical
    code, out, _ = cli("diff", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 1 and out.endswith("DIFFERENT: 1 lineage difference\n")
    assert "lineage: only B records parent resumed-from sha256:" in out


# --------------------------------------------------------------------------- errors


def test_unreadable_side_exits_2(tmp_path: Path) -> None:
    """A missing or invalid checkpoint on either side is exit 2 with the path named."""
    pa = save_state(tmp_path / "a", {"w": torch.zeros(1)})
    code, _, err = cli("diff", str(pa), str(tmp_path / "missing"))
    assert code == 2 and str(tmp_path / "missing") in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{")
    code, out, err = cli("diff", "--json", str(tmp_path / "bad"), str(pa))
    assert code == 2 and json.loads(out)["error"]["type"] == "ManifestError"


def test_missing_weights_file_for_a_changed_tensor_is_an_integrity_error(tmp_path: Path) -> None:
    """When a tensor must be read and its file is gone, diff raises IntegrityError naming the file."""
    pa = save_state(tmp_path / "a", {"w": torch.zeros(3)})
    pb = save_state(tmp_path / "b", {"w": torch.ones(3)})
    (name,) = mc.read_manifest(pb).files
    (pb / name).unlink()
    with pytest.raises(mc.IntegrityError, match="missing") as caught:
        diff(pa, pb)
    assert caught.value.file == name


def test_public_names_are_the_functions() -> None:
    """mc.diff, mc.pack, mc.unpack and mc.ancestry are the functions even after their modules are imported."""
    import manifest_ckpt.lineage
    import manifest_ckpt.storage.archive

    assert mc.diff is diff and mc.CheckpointDiff is _diff.CheckpointDiff
    assert mc.pack is manifest_ckpt.storage.archive.pack and mc.unpack is manifest_ckpt.storage.archive.unpack
    assert mc.ancestry is manifest_ckpt.lineage.ancestry and mc.Ancestry is manifest_ckpt.lineage.Ancestry
    assert {"diff", "pack", "unpack", "ancestry", "CheckpointDiff", "Ancestry"} <= set(mc.__all__)
