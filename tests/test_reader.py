"""Tests for check, load and verify: compare first, copy all or nothing, refuse bad input."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.format.manifest import FormatVersionWarning
from tests._models import Gpt2Mlp, TiedNet, assert_bitwise_equal, snapshot


@pytest.fixture
def saved(tmp_path: Path) -> tuple[TiedNet, Path]:
    torch.manual_seed(0)
    model = TiedNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_()
        model.bn.num_batches_tracked.fill_(17)
    mc.save(model, tmp_path / "ck")
    return model, tmp_path / "ck"


def weights_file(path: Path) -> Path:
    (name,) = mc.read_manifest(path).files
    return path / name


def test_load_round_trip_is_bit_exact_and_keeps_ties(saved: tuple[TiedNet, Path]) -> None:
    """Every parameter and buffer matches bit for bit; the tie survives; the non-persistent buffer is untouched."""
    model, path = saved
    torch.manual_seed(1)
    target = TiedNet()
    with torch.no_grad():
        target.scratch.fill_(-1.0)
    result = mc.load(target, path)
    assert_bitwise_equal(
        {k: v for k, v in snapshot(model).items() if "scratch" not in k},
        {k: v for k, v in snapshot(target).items() if "scratch" not in k},
    )
    assert target.head.weight is target.emb.weight
    assert torch.equal(target.scratch, torch.full((3,), -1.0))
    assert result.retied == ["head.weight"]
    assert result.loaded == sorted(model.state_dict())


def test_check_reports_every_kind_of_problem_at_once(saved: tuple[TiedNet, Path]) -> None:
    """Missing, unexpected, shape, dtype, class and alias problems come in one report."""
    _, path = saved

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 5)  # shape
            self.bn = nn.InstanceNorm1d(4, affine=True, track_running_stats=True)  # class at equal shapes
            self.head = nn.Linear(4, 10, bias=False)  # untied: alias
            self.extra = nn.Linear(2, 2)  # missing
            self.emb.to(torch.float64)  # dtype

    report = mc.check(Other(), path)
    assert not report.ok
    kinds = {(p.kind, p.key) for p in report.problems}
    assert kinds == {
        ("missing", "extra.weight"),
        ("missing", "extra.bias"),
        ("shape", "fc.weight"),
        ("shape", "fc.bias"),
        ("class", "bn"),
        ("dtype", "emb.weight"),
        ("alias", "head.weight"),
    }
    shape = report.by_kind("shape")[0]
    assert (shape.key, shape.expected, shape.found) == ("fc.bias", "float32[5]", "float32[4]")
    table = str(report)
    for key in ("extra.weight", "fc.weight", "emb.weight", "head.weight", "InstanceNorm1d"):
        assert key in table


def test_unexpected_keys_are_reported(saved: tuple[TiedNet, Path]) -> None:
    """Keys the module lacks are listed as unexpected with what the checkpoint holds."""
    _, path = saved

    class Smaller(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    report = mc.check(Smaller(), path)
    assert {p.key for p in report.by_kind("unexpected")} == {
        "fc.weight", "fc.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"
    }
    assert report.by_kind("unexpected")[0].expected is None


def test_refused_load_leaves_the_module_bitwise_unchanged(saved: tuple[TiedNet, Path]) -> None:
    """ModelMismatchError carries the report and no tensor of the module changed."""
    _, path = saved
    target = TiedNet()
    target.fc = nn.Linear(4, 5)
    before = snapshot(target)
    with pytest.raises(mc.ModelMismatchError) as info:
        mc.load(target, path)
    assert {p.key for p in info.value.report.problems} == {"fc.weight", "fc.bias"}
    assert "fc.weight" in str(info.value)
    assert_bitwise_equal(before, snapshot(target))


def test_gpt2_conv1d_into_linear_of_same_shape_is_a_class_problem(tmp_path: Path) -> None:
    """A transposed-meaning Conv1D weight never lands silently in a same-shape Linear."""
    mc.save(Gpt2Mlp(use_conv1d=True), tmp_path / "ck")
    report = mc.check(Gpt2Mlp(use_conv1d=False), tmp_path / "ck")
    assert [(p.kind, p.key) for p in report.problems] == [("class", "c_fc")]
    assert report.problems[0].expected == "torch.nn.modules.linear.Linear"
    assert report.problems[0].found == "tests._models.Conv1D"
    assert mc.check(Gpt2Mlp(use_conv1d=False), tmp_path / "ck", check_classes=False).ok


def test_cast_is_opt_in_and_listed(saved: tuple[TiedNet, Path]) -> None:
    """A bfloat16 module refuses float32 weights unless cast=True, which converts and lists them."""
    model, path = saved
    target = TiedNet().to(torch.bfloat16)
    with pytest.raises(mc.ModelMismatchError):
        mc.load(target, path)
    result = mc.load(target, path, cast=True)
    assert "fc.weight" in result.cast and "bn.num_batches_tracked" not in result.cast
    assert torch.equal(target.fc.weight, model.fc.weight.to(torch.bfloat16))


def test_policies_list_what_was_left_and_skipped(saved: tuple[TiedNet, Path]) -> None:
    """Allowed missing keys keep their initial values; allowed unexpected keys are skipped."""
    model, path = saved

    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight
            self.adapter = nn.Linear(4, 4)

    target = Partial()
    initial = target.adapter.weight.detach().clone()
    result = mc.load(target, path, allow_missing=[r"adapter\..*"], allow_unexpected=[r"(fc|bn)\..*"])
    assert result.left_initial == ["adapter.bias", "adapter.weight"]
    assert result.skipped == sorted(k for k in model.state_dict() if k.startswith(("fc.", "bn.")))
    assert torch.equal(target.adapter.weight, initial)
    assert torch.equal(target.emb.weight, model.emb.weight)
    lax = mc.load(Partial(), path, strict=False)
    assert lax.left_initial == result.left_initial and lax.skipped == result.skipped


def test_remap_rule_that_matches_nothing_is_an_error(saved: tuple[TiedNet, Path]) -> None:
    """A remap pattern that renames nothing raises RemapError instead of doing nothing."""
    _, path = saved
    with pytest.raises(mc.RemapError, match=r"\^module"):
        mc.load(TiedNet(), path, remap={r"^module\.": ""})


def test_prefix_hint_remap_makes_the_load_succeed(tmp_path: Path) -> None:
    """A Lightning-style 'model.' prefix is reported with a remap that then loads bit-exact."""
    model = TiedNet()
    mc.save({f"model.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ck")
    report = mc.check(TiedNet(), tmp_path / "ck")
    assert report.suggested_remap == {r"^model\.": ""}
    assert any("Lightning" in h for h in report.hints)
    target = TiedNet()
    mc.load(target, tmp_path / "ck", remap=report.suggested_remap)
    assert_bitwise_equal(
        {k: v for k, v in snapshot(model).items() if "scratch" not in k},
        {k: v for k, v in snapshot(target).items() if "scratch" not in k},
    )


def test_meta_module_is_materialised_with_ties(saved: tuple[TiedNet, Path]) -> None:
    """A module built on the meta device gets real tensors from the file, still tied.

    Built under torch.device("meta"), its non-persistent buffer would stay on meta: refused.
    Built with mc.init_empty(), it is computed as usual and the load succeeds.
    """
    model, path = saved
    with torch.device("meta"):
        bare = TiedNet()
    with pytest.raises(mc.UnsupportedTensorError, match=r"^1 non-persistent buffers .*: scratch\."):
        mc.load(bare, path)
    with mc.init_empty():
        target = TiedNet()
    assert target.fc.weight.is_meta and torch.equal(target.scratch, torch.full((3,), 7.0))
    result = mc.load(target, path)
    assert target.fc.weight.device.type == "cpu" and isinstance(target.fc.weight, nn.Parameter)
    assert target.head.weight is target.emb.weight
    assert torch.equal(target.bn.running_mean, model.bn.running_mean)
    assert "fc.weight" in result.materialized and "head.weight" in result.materialized


def test_expect_digest_pins_the_checkpoint(saved: tuple[TiedNet, Path]) -> None:
    """A load pinned to another digest is refused before anything is read."""
    _, path = saved
    digest = mc.read_manifest(path).digest
    mc.load(TiedNet(), path, expect_digest=digest)
    with pytest.raises(mc.IntegrityError, match="expected sha256:0000"):
        mc.load(TiedNet(), path, expect_digest="sha256:" + "0" * 64)


def test_flipped_data_byte_is_caught_by_verify_and_verified_load(saved: tuple[TiedNet, Path]) -> None:
    """One flipped byte in tensor data: verify and load(verify_digests=True) name the tensor."""
    _, path = saved
    manifest = mc.read_manifest(path)
    entry = manifest.tensors["fc.weight"]
    assert entry.byte_range is not None
    f = weights_file(path)
    data = bytearray(f.read_bytes())
    data[entry.byte_range[0] + 1] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(mc.IntegrityError, match=r"fc\.weight"):
        mc.verify(path)
    target = TiedNet()
    before = snapshot(target)
    with pytest.raises(mc.IntegrityError, match=r"fc\.weight"):
        mc.load(target, path, verify_digests=True)
    assert_bitwise_equal(before, snapshot(target))


def test_manifest_beside_other_weights_is_refused_cheaply(tmp_path: Path) -> None:
    """Same names and shapes, other values: the header binding refuses the pair without hashing data."""
    mc.save(TiedNet(), tmp_path / "a")
    mc.save(TiedNet(), tmp_path / "b")
    wa, wb = weights_file(tmp_path / "a"), weights_file(tmp_path / "b")
    shutil.copy(wb, wa)
    with pytest.raises(mc.ManifestError, match="does not belong to this manifest") as info:
        mc.load(TiedNet(), tmp_path / "a")
    assert info.value.file == wa.name


def test_truncated_and_missing_weights_are_integrity_errors(saved: tuple[TiedNet, Path]) -> None:
    """A truncated file and a deleted file each raise IntegrityError naming the file."""
    _, path = saved
    f = weights_file(path)
    data = f.read_bytes()
    f.write_bytes(data[:-5])
    with pytest.raises(mc.IntegrityError, match="truncated") as info:
        mc.load(TiedNet(), path)
    assert info.value.file == f.name
    f.unlink()
    with pytest.raises(mc.IntegrityError, match="missing"):
        mc.verify(path)


def test_lying_header_length_is_refused(saved: tuple[TiedNet, Path]) -> None:
    """A header length pointing past the end of the file raises IntegrityError, not a crash."""
    _, path = saved
    f = weights_file(path)
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    f.write_bytes(bytes(data))
    with pytest.raises(mc.IntegrityError, match="header claims"):
        mc.verify(path)


def _edit_manifest(path: Path, edit: object) -> None:
    document = json.loads((path / "manifest.json").read_bytes())
    edit(document)  # type: ignore[operator]
    (path / "manifest.json").write_text(json.dumps(document))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "a/../../b"])
def test_file_names_escaping_the_directory_are_refused(saved: tuple[TiedNet, Path], name: str) -> None:
    """Traversal and absolute paths in the manifest are schema violations naming the field."""
    _, path = saved

    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        old = next(iter(doc["files"]))
        doc["files"][name] = doc["files"].pop(old)

    _edit_manifest(path, edit)
    with pytest.raises(mc.ManifestError) as info:
        mc.load(TiedNet(), path)
    assert "files" in (info.value.field or "")


def test_symlink_leading_outside_is_refused(saved: tuple[TiedNet, Path], tmp_path: Path) -> None:
    """A weights file that is a link to a file outside the checkpoint is never read."""
    _, path = saved
    f = weights_file(path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(f, outside)
    os.symlink(outside, f)
    with pytest.raises(mc.ManifestError, match="outside the checkpoint"):
        mc.verify(path)


def test_malformed_manifest_json_names_the_file(saved: tuple[TiedNet, Path]) -> None:
    """Broken JSON raises ManifestError naming manifest.json."""
    _, path = saved
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(mc.ManifestError, match=r"manifest\.json: not valid JSON"):
        mc.check(TiedNet(), path)


def test_format_versions(saved: tuple[TiedNet, Path]) -> None:
    """A newer minor version warns and loads; another major version is refused."""
    _, path = saved
    _edit_manifest(path, lambda d: d.update(format_version="1.7.0"))
    with pytest.warns(FormatVersionWarning, match="1.7.0"):
        mc.load(TiedNet(), path)
    _edit_manifest(path, lambda d: d.update(format_version="2.0.0"))
    with pytest.raises(mc.UnsupportedVersionError, match="upgrade manifest-ckpt"):
        mc.read_manifest(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    """A missing path or a directory without manifest.json raises CheckpointNotFoundError."""
    with pytest.raises(mc.CheckpointNotFoundError, match="no such checkpoint"):
        mc.read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(mc.CheckpointNotFoundError, match=r"no manifest\.json"):
        mc.load(TiedNet(), tmp_path / "empty")


def test_loads_with_manifest_path_and_split_files(tmp_path: Path) -> None:
    """Pointing at manifest.json works, and a checkpoint split over files loads the same."""
    model = TiedNet()
    mc.save(model, tmp_path / "ck", max_file_size=40)
    target = TiedNet()
    mc.load(target, tmp_path / "ck" / "manifest.json", verify_digests=True)
    assert torch.equal(target.fc.weight, model.fc.weight)


# -- typed errors on bad arguments --------------------------------------------------------------


@pytest.mark.parametrize("argument", ["allow_missing", "allow_unexpected"])
def test_an_invalid_policy_pattern_is_a_pattern_error(tmp_path: Path, argument: str) -> None:
    """An invalid regex raises PatternError naming the argument and pattern, for check and load alike."""
    mc.save(nn.Linear(2, 2), tmp_path / "ck")
    for call in (mc.check, mc.load):
        with pytest.raises(mc.PatternError, match=rf"^{argument}: '\[oops' is not a valid regular expression") as info:
            call(nn.Linear(2, 2), tmp_path / "ck", **{argument: ["fine", "[oops"]})
        assert (info.value.argument, info.value.pattern) == (argument, "[oops")


def test_a_single_pattern_string_is_one_pattern(tmp_path: Path) -> None:
    """allow_missing="bias" is the pattern 'bias', not the patterns 'b', 'i', 'a', 's'."""
    mc.save({"weight": torch.ones(2, 2)}, tmp_path / "ck")
    result = mc.load(nn.Linear(2, 2), tmp_path / "ck", allow_missing="bias")
    assert result.left_initial == ["bias"]


@pytest.mark.parametrize("device", ["cuda:7", "no-such-device"])
def test_an_unavailable_device_is_refused_before_loading(tmp_path: Path, device: str) -> None:
    """device= naming a device this machine lacks (or no device) raises DeviceUnavailableError; nothing changes."""
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    mc.save(nn.Linear(2, 2), tmp_path / "ck")
    with torch.device("meta"):
        target = nn.Linear(2, 2)
    with pytest.raises(mc.DeviceUnavailableError, match=f"device={device!r} is not"):
        mc.load(target, tmp_path / "ck", device=device)
    assert target.weight.is_meta
