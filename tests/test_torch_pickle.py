"""Tests of the safe reader of pickled torch checkpoints in ``manifest_ckpt.sources.torch_pickle``."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import pickletools
import random
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from harness import hostile
from manifest_ckpt.errors import ConversionError, UnsafeCheckpointError
from manifest_ckpt.sources import torch_pickle as _torch_pickle
from manifest_ckpt.sources.torch_pickle import ALLOWED_GLOBALS, TorchFileContents, read_torch_file

# Every dtype torch.save writes that safetensors also stores.
DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2}
FORMATS = {"torch-zip": True, "torch-legacy": False}  # format -> _use_new_zipfile_serialization


class TinyNet(nn.Module):
    """A user-defined module, pickled by reference to this test module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)


def save(obj: Any, path: Path, fmt: str = "torch-zip") -> Path:
    """``torch.save`` in the given format; returns the path."""
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor of random bit patterns (NaN payloads, subnormals, -0.0 included)."""
    rng = random.Random(seed)
    count = 1
    for dim in shape:
        count *= dim
    if dtype == torch.bool:
        return torch.tensor([rng.random() < 0.5 for _ in range(count)], dtype=torch.bool).reshape(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.tensor(list(rng.randbytes(count * itemsize)), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when dtype, shape, strides and every byte agree."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy())
        == bytes(b.contiguous().reshape(-1).view(torch.uint8).numpy())
    )


def data_ptr(t: torch.Tensor) -> int:
    """Address of a tensor's underlying storage."""
    return t.untyped_storage().data_ptr()


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zip_round_trip_is_bit_exact_for_every_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    """Every safetensors dtype comes back from a zip checkpoint with identical bytes, shape and strides."""
    tensors = {
        "matrix": random_tensor(dtype, (3, 5), seed=1),
        "scalar": random_tensor(dtype, (), seed=2),
        "empty": random_tensor(dtype, (0, 4), seed=3),
    }
    contents = read_torch_file(save(tensors, tmp_path / "model.pt"))
    assert contents.format == "torch-zip"
    assert sorted(contents.obj) == ["empty", "matrix", "scalar"]
    for key, tensor in tensors.items():
        assert same_bits(contents.obj[key], tensor), key


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d not in FLOAT8], ids=str)
def test_legacy_round_trip_is_bit_exact_for_every_pre_float8_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    """Legacy (non-zip) files round-trip every dtype that existed before float8, bit for bit."""
    tensors = {"matrix": random_tensor(dtype, (4, 3), seed=4), "scalar": random_tensor(dtype, (), seed=5)}
    contents = read_torch_file(save(tensors, tmp_path / "model.pth", "torch-legacy"))
    assert contents.format == "torch-legacy"
    for key, tensor in tensors.items():
        assert same_bits(contents.obj[key], tensor), key


def test_legacy_float8_is_a_conversion_error(tmp_path: Path) -> None:
    """float8 in the legacy format (which torch itself cannot read back) is a ConversionError, not a crash."""
    path = save({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}, tmp_path / "f8.pth", "torch-legacy")
    with pytest.raises(ConversionError, match="could not read the torch-legacy checkpoint") as info:
        read_torch_file(path)
    assert info.value.file == str(path)


def test_non_contiguous_tensor_keeps_its_strides(tmp_path: Path) -> None:
    """A transposed tensor is saved with its storage and comes back with the same strides and values."""
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    contents = read_torch_file(save({"t": base.t()}, tmp_path / "t.pt"))
    assert contents.obj["t"].stride() == (1, 4)
    assert torch.equal(contents.obj["t"], base.t())


@pytest.mark.parametrize("fmt", FORMATS)
def test_nested_containers_and_scalars_round_trip(tmp_path: Path, fmt: str) -> None:
    """Dicts, lists, tuples and plain scalars nest freely and come back equal."""
    w = torch.ones(2, 2)
    obj = {
        "model": OrderedDict([("layer.weight", w)]),
        "list": [1, 2.5, "three", None, True, [torch.zeros(1), (4, "five")]],
        "tuple": (1, (2, (3,))),
        "bytes": b"\x00\xffraw",
        "big": 2**70,
        "neg": -3,
        "unicode": "héllo ✓",
    }
    got = read_torch_file(save(obj, tmp_path / "nested.pt", fmt)).obj
    assert type(got["model"]) is OrderedDict
    assert torch.equal(got["model"]["layer.weight"], w)
    assert got["list"][:5] == [1, 2.5, "three", None, True]
    assert torch.equal(got["list"][5][0], torch.zeros(1))
    assert got["list"][5][1] == (4, "five")
    assert got["tuple"] == (1, (2, (3,)))
    assert (got["bytes"], got["big"], got["neg"], got["unicode"]) == (b"\x00\xffraw", 2**70, -3, "héllo ✓")


@pytest.mark.parametrize("fmt", FORMATS)
def test_lightning_like_checkpoint_becomes_plain_data(tmp_path: Path, fmt: str) -> None:
    """A Lightning-style dict reads with its Namespace as a dict and numpy values as Python values."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    checkpoint = {
        "state_dict": model.state_dict(),
        "epoch": 7,
        "global_step": 1234,
        "pytorch-lightning_version": "2.4.0",
        "hyper_parameters": {
            "args": argparse.Namespace(lr=1e-3, layers=[3, 2], name="tiny", dropout=None),
            "best_score": np.float64(0.875),
            "seed": np.int64(-42),
            "flag": np.bool_(True),
            "half": np.float32(1.5),
            "dtype": np.dtype("float16"),
            "dtype_class": np.float32,
        },
        "optimizer_states": [optimizer.state_dict()],
    }
    got = read_torch_file(save(checkpoint, tmp_path / "last.ckpt", fmt)).obj
    assert (got["epoch"], got["global_step"], got["pytorch-lightning_version"]) == (7, 1234, "2.4.0")
    hp = got["hyper_parameters"]
    assert hp["args"] == {"lr": 1e-3, "layers": [3, 2], "name": "tiny", "dropout": None}
    assert type(hp["args"]) is dict
    assert (hp["best_score"], hp["seed"], hp["flag"], hp["half"]) == (0.875, -42, True, 1.5)
    assert [type(hp[k]) for k in ("best_score", "seed", "flag", "half")] == [float, int, bool, float]
    assert (hp["dtype"], hp["dtype_class"]) == ("float16", "float32")
    for key, tensor in model.state_dict().items():
        assert torch.equal(got["state_dict"][key], tensor), key
    state = got["optimizer_states"][0]
    assert state["param_groups"][0]["lr"] == 1e-3
    assert torch.equal(state["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_numpy_scalars_decode_every_byte_order_and_width(tmp_path: Path) -> None:
    """Big-endian and every fixed-width numpy scalar decodes to the same Python value numpy holds."""
    values = {
        "u2": np.uint16(65535),
        "i1": np.int8(-128),
        "f2": np.float16(-0.5),
        "c8": np.complex64(1 + 2j),
        "be_i4": np.dtype(">i4").type(-7),
        "be_f8": np.array([3.25], dtype=">f8")[0],
    }
    got = read_torch_file(save(values, tmp_path / "np.pt")).obj
    assert got == {"u2": 65535, "i1": -128, "f2": -0.5, "c8": 1 + 2j, "be_i4": -7, "be_f8": 3.25}


def test_module_state_dict_keeps_ordered_dict_and_metadata(tmp_path: Path) -> None:
    """A module's state_dict reads back as an OrderedDict that still carries ``_metadata``."""
    state = nn.Linear(2, 2).state_dict()
    got = read_torch_file(save(state, tmp_path / "sd.pt")).obj
    assert type(got) is OrderedDict
    assert list(got) == ["weight", "bias"]
    assert got._metadata == state._metadata  # type: ignore[attr-defined]


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_storage_survives_reading(tmp_path: Path, fmt: str) -> None:
    """Tied weights share one storage after reading, and a saved view stays a view at its offset."""
    w = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    other = torch.ones(3)
    got = read_torch_file(save({"emb": w, "head": w, "row": w[2], "other": other}, tmp_path / "tied.pt", fmt)).obj
    assert got["emb"] is got["head"] or data_ptr(got["emb"]) == data_ptr(got["head"])
    assert data_ptr(got["row"]) == data_ptr(got["emb"])
    assert got["row"].storage_offset() == 6
    assert torch.equal(got["row"], w[2])
    assert data_ptr(got["other"]) != data_ptr(got["emb"])


def test_parameters_read_as_tensors(tmp_path: Path) -> None:
    """An nn.Parameter saved inside a dict reads back as a tensor with the same values."""
    p = nn.Parameter(torch.randn(2, 2))
    got = read_torch_file(save({"p": p}, tmp_path / "p.pt")).obj["p"]
    assert isinstance(got, torch.Tensor)
    assert torch.equal(got.detach(), p.detach())


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_facts_are_reported(tmp_path: Path, fmt: str) -> None:
    """size, sha256, format and the sorted globals describe the file that was read."""
    path = save({"w": torch.ones(2), "b": torch.zeros(1, dtype=torch.int64)}, tmp_path / "facts.pt", fmt)
    contents = read_torch_file(path)
    assert isinstance(contents, TorchFileContents)
    assert contents.format == fmt
    assert contents.size == path.stat().st_size
    assert contents.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert contents.globals == (
        "collections.OrderedDict",
        "torch.FloatStorage",
        "torch.LongStorage",
        "torch._utils._rebuild_tensor_v2",
    )


def test_accepts_pathlike_and_str(tmp_path: Path) -> None:
    """Both a Path and a str path are accepted and give the same contents."""
    path = save({"w": torch.ones(1)}, tmp_path / "w.pt")
    assert read_torch_file(path).sha256 == read_torch_file(str(path)).sha256


@pytest.mark.parametrize(("fmt", "mmap"), [("torch-zip", True), ("torch-legacy", False)])
def test_torch_load_is_weights_only_and_maps_zip_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, mmap: bool
) -> None:
    """torch.load is always called with weights_only=True, on CPU, and with mmap for zip files."""
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    read_torch_file(save({"w": torch.ones(2)}, tmp_path / "m.pt", fmt))
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": mmap}]


def test_compressed_zip_is_read_without_mmap(tmp_path: Path) -> None:
    """A re-zipped checkpoint with deflated records still reads correctly (mmap would see compressed bytes)."""
    src = save({"w": torch.arange(100, dtype=torch.float32)}, tmp_path / "src.pt")
    dst = tmp_path / "deflated.pt"
    with zipfile.ZipFile(src) as original, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
        for info in original.infolist():
            out.writestr(info.filename, original.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert torch.equal(read_torch_file(dst).obj["w"], torch.arange(100, dtype=torch.float32))


# --------------------------------------------------------------------------- hostile files


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "subprocess.Popen", "subprocess.run"])
def test_reduce_payload_is_refused_and_never_runs(tmp_path: Path, fmt: str, payload: str) -> None:
    """A ``__reduce__`` payload is refused with UnsafeCheckpointError naming its global; the sentinel never appears."""
    sentinel = tmp_path / "pwned"
    obj, global_name = hostile.payloads(sentinel)[payload]
    path = save({"weight": torch.ones(1), "evil": obj}, tmp_path / "evil.pt", fmt)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_file(path)
    assert info.value.global_name == global_name
    assert info.value.file == str(path)
    assert f"`{global_name}`" in str(info.value)
    assert "Nothing from the file was executed" in str(info.value)
    assert not sentinel.exists()


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "subprocess.Popen", "subprocess.run"])
def test_reduce_payloads_are_live(tmp_path: Path, payload: str) -> None:
    """Control: the same file loaded unsafely does create the sentinel, so the refusal tests can fail."""
    sentinel = tmp_path / "pwned"
    obj, _ = hostile.payloads(sentinel)[payload]
    loaded = torch.load(save({"evil": obj}, tmp_path / "evil.pt"), weights_only=False)
    if isinstance(loaded["evil"], subprocess.Popen):
        loaded["evil"].wait(timeout=30)
    assert sentinel.exists()


def hand_built(kind: str, sentinel: Path) -> bytes:
    """A hand-built hostile pickle (raw opcode bytes) of the given kind."""
    if kind == "GLOBAL":
        return hostile.global_pickle(sentinel)
    return hostile.stack_global_pickle(sentinel, memoized=kind == "STACK_GLOBAL-memoized")


HAND_BUILT = ["GLOBAL", "STACK_GLOBAL", "STACK_GLOBAL-memoized"]


@pytest.mark.parametrize("container", ["zip-swapped-data.pkl", "legacy", "bare-pickle"])
@pytest.mark.parametrize("kind", HAND_BUILT)
def test_hand_built_global_pickles_are_refused(tmp_path: Path, kind: str, container: str) -> None:
    """GLOBAL and STACK_GLOBAL (direct or memoized) pickles are refused in every container; nothing runs."""
    sentinel = tmp_path / "pwned"
    raw = hand_built(kind, sentinel)
    path = tmp_path / "evil.pt"
    if container == "zip-swapped-data.pkl":
        legit = save({"w": torch.ones(3)}, tmp_path / "legit.pt")
        hostile.swap_data_pkl(legit, path, raw)
    elif container == "legacy":
        path.write_bytes(hostile.legacy_bytes(raw))
    else:
        path.write_bytes(raw)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_file(path)
    assert info.value.global_name == "os.system"
    assert "`os.system`" in str(info.value)
    assert not sentinel.exists()


@pytest.mark.parametrize("kind", HAND_BUILT)
def test_hand_built_pickles_are_live(tmp_path: Path, kind: str) -> None:
    """Control: plain pickle.loads of each hand-built pickle does create the sentinel."""
    sentinel = tmp_path / "pwned"
    pickle.loads(hand_built(kind, sentinel))
    assert sentinel.exists()


def test_swapped_data_pkl_is_live_under_unsafe_torch_load(tmp_path: Path) -> None:
    """Control: torch.load(weights_only=False) of the swapped zip runs the payload."""
    sentinel = tmp_path / "pwned"
    legit = save({"w": torch.ones(3)}, tmp_path / "legit.pt")
    torch.load(hostile.swap_data_pkl(legit, tmp_path / "evil.pt", hostile.global_pickle(sentinel)), weights_only=False)
    assert sentinel.exists()


def test_unresolvable_stack_global_is_refused(tmp_path: Path) -> None:
    """A STACK_GLOBAL whose names are not literal strings is treated as unsafe, naming the opcode."""
    legit = save({"w": torch.ones(3)}, tmp_path / "legit.pt")
    path = hostile.swap_data_pkl(legit, tmp_path / "evil.pt", hostile.unresolvable_stack_global_pickle())
    with pytest.raises(UnsafeCheckpointError, match="STACK_GLOBAL at byte 11") as info:
        read_torch_file(path)
    assert info.value.global_name is None


def test_global_before_truncation_is_still_reported_as_unsafe(tmp_path: Path) -> None:
    """A hostile pickle cut short after its GLOBAL is refused as unsafe, not merely as corrupt."""
    sentinel = tmp_path / "pwned"
    legit = save({"w": torch.ones(3)}, tmp_path / "legit.pt")
    path = hostile.swap_data_pkl(legit, tmp_path / "evil.pt", hostile.global_pickle(sentinel)[:20])
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_file(path)
    assert info.value.global_name == "os.system"
    assert not sentinel.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_linear_module_is_refused_with_resave_advice(tmp_path: Path, fmt: str) -> None:
    """``torch.save(nn.Linear(2, 2))`` is refused, naming the class and saying how to save a state dict."""
    path = save(nn.Linear(2, 2), tmp_path / "model.pt", fmt)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_file(path)
    assert info.value.global_name == "torch.nn.modules.linear.Linear"
    assert "torch.save(model.state_dict()" in str(info.value)
    assert "whole pickled model" in str(info.value)


def test_user_module_subclass_is_refused_with_resave_advice(tmp_path: Path) -> None:
    """A pickled user nn.Module subclass is refused with the state-dict advice, naming the user class."""
    path = save(TinyNet(), tmp_path / "model.pt")
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_file(path)
    assert info.value.global_name is not None
    assert info.value.global_name.endswith("test_torch_pickle.TinyNet")
    assert "torch.save(model.state_dict()" in str(info.value)


def test_numpy_arrays_are_refused(tmp_path: Path) -> None:
    """numpy arrays need numpy's reconstruct machinery, which is not on the allowlist."""
    path = save({"a": np.zeros(2)}, tmp_path / "np.pt")
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_file(path)
    assert info.value.global_name is not None
    assert info.value.global_name.endswith("multiarray._reconstruct")


def test_torch_refusal_is_wrapped_as_unsafe(tmp_path: Path) -> None:
    """When torch's own unpickler refuses (APPEND onto a dict), the error is an UnsafeCheckpointError."""
    legit = save({"w": torch.ones(3)}, tmp_path / "legit.pt")
    path = hostile.swap_data_pkl(legit, tmp_path / "odd.pt", b"\x80\x02}Na.")
    with pytest.raises(UnsafeCheckpointError, match="Can only append to lists") as info:
        read_torch_file(path)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


def test_allowlist_holds_no_code_runners() -> None:
    """The allowlist contains only data constructors: no os, sys, subprocess, eval/exec, or imports."""
    dangerous = ("os.", "posix.", "nt.", "sys.", "subprocess.", "builtins.eval", "builtins.exec", "builtins.getattr")
    assert not [name for name in ALLOWED_GLOBALS if name.startswith(dangerous)]
    assert "builtins.__import__" not in ALLOWED_GLOBALS
    assert "torch.nn.modules.linear.Linear" not in ALLOWED_GLOBALS


def test_stand_ins_replace_numpy_and_argparse() -> None:
    """The extras registered with torch are this module's stand-ins, never the real numpy or argparse objects."""
    extras = _torch_pickle._EXTRA_SAFE_GLOBALS
    assert extras["argparse.Namespace"] is not argparse.Namespace
    assert extras["numpy.dtype"] is not np.dtype
    assert all(getattr(stand_in, "__module__", "") == _torch_pickle.__name__ for stand_in in extras.values())


# --------------------------------------------------------------------------- scanner


def scan_bytes(data: bytes) -> _torch_pickle._Scan:
    """Run the opcode scanner over one pickle."""
    scan = _torch_pickle._Scan({}, [], set(), set())
    _torch_pickle._scan_pickle(io.BytesIO(data), scan)
    return scan


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_scanner_finds_globals_at_every_protocol(protocol: int) -> None:
    """GLOBAL (protocols 0-3) and STACK_GLOBAL (4-5) references are both collected and named."""
    data = pickle.dumps([OrderedDict(a=1), subprocess.Popen, torch.Size([2])], protocol=protocol)
    scan = scan_bytes(data)
    assert list(scan.globals) == ["collections.OrderedDict", "subprocess.Popen", "torch.Size"]
    assert scan.unresolved == []
    expected = {"STACK_GLOBAL"} if protocol >= 4 else {"GLOBAL"}
    assert expected <= {op.name for op, _, _ in pickletools.genops(data)}


def test_scanner_rejects_truncated_pickle() -> None:
    """A pickle without its STOP opcode is reported as corrupt."""
    with pytest.raises(_torch_pickle._CorruptPickle):
        scan_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=2)[:-1])


def test_pickle_protocol_4_checkpoint_is_unsupported(tmp_path: Path) -> None:
    """A checkpoint saved with pickle_protocol=4 is a ConversionError telling how to re-save it."""
    path = tmp_path / "p4.pt"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=4)
    with pytest.raises(ConversionError, match="without `pickle_protocol`") as info:
        read_torch_file(path)
    assert "STACK_GLOBAL" in str(info.value)


# --------------------------------------------------------------------------- damaged input


def expect_conversion_error(path: Path, fragment: str) -> ConversionError:
    """Assert reading ``path`` raises ConversionError naming the file and containing ``fragment``."""
    with pytest.raises(ConversionError) as info:
        read_torch_file(path)
    assert info.value.file == str(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)
    return info.value


def test_random_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    """Random bytes are refused, saying a zip or a legacy pickle stream was expected."""
    path = tmp_path / "noise.pt"
    path.write_bytes(b"\x13" + random.Random(0).randbytes(4095))
    expect_conversion_error(path, "expected a zip archive")


def test_empty_file_is_refused(tmp_path: Path) -> None:
    """An empty file is refused as empty."""
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    expect_conversion_error(path, "the file is empty")


def test_missing_file_and_directory_are_refused(tmp_path: Path) -> None:
    """A missing path and a directory are ConversionErrors, not OSErrors."""
    expect_conversion_error(tmp_path / "missing.pt", "cannot read the checkpoint (No such file or directory)")
    expect_conversion_error(tmp_path, "is not a regular file")


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_zip_is_refused(tmp_path: Path, fraction: float) -> None:
    """A zip checkpoint cut short loses its directory and is refused as truncated or damaged."""
    data = save({"w": torch.ones(64)}, tmp_path / "full.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    expect_conversion_error(path, "truncated or damaged")


def test_zip_with_garbage_after_magic_is_refused(tmp_path: Path) -> None:
    """Bytes that only start like a zip are refused."""
    path = tmp_path / "fake.pt"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    expect_conversion_error(path, "Expected an intact torch.save file")


def test_truncated_data_pkl_is_refused(tmp_path: Path) -> None:
    """A well-formed zip whose data.pkl is cut in half is refused as an incomplete pickle."""
    legit = save({"w": torch.ones(3), "b": torch.zeros(2)}, tmp_path / "legit.pt")
    with zipfile.ZipFile(legit) as z:
        data_pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    path = hostile.swap_data_pkl(legit, tmp_path / "cut.pt", data_pkl[: len(data_pkl) // 2])
    expect_conversion_error(path, "data.pkl is not a complete pickle")


@pytest.mark.parametrize(
    ("cut", "fragment"),
    [
        (8, "inside the legacy torch.save header"),
        (60, "the legacy header"),
        (300, "the pickled object"),
        (-40, "unexpected EOF"),
    ],
)
def test_truncated_legacy_file_is_refused(tmp_path: Path, cut: int, fragment: str) -> None:
    """A legacy file cut in its header, its object pickle, or its storage bytes is a ConversionError."""
    data = save({"w": torch.arange(64, dtype=torch.float32)}, tmp_path / "full.pth", "torch-legacy").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[:cut])
    expect_conversion_error(path, fragment)


def test_zip_without_data_pkl_is_refused(tmp_path: Path) -> None:
    """A zip archive lacking data.pkl is refused, saying which layout was expected."""
    path = hostile.zip_with(tmp_path / "other.zip", {"archive/version": b"3\n", "archive/data/0": b"\x00" * 4})
    expect_conversion_error(path, "no data.pkl record")


def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    """A zip that looks like a TorchScript archive is refused with advice to re-save a state dict."""
    path = hostile.zip_with(
        tmp_path / "ts.pt", {"archive/data.pkl": b"\x80\x02}.", "archive/constants.pkl": b"\x80\x02)."}
    )
    expect_conversion_error(path, "TorchScript")


def test_duplicate_zip_members_are_refused(tmp_path: Path) -> None:
    """A zip with two members of the same name (reader-dependent contents) is refused."""
    path = tmp_path / "dup.pt"
    with zipfile.ZipFile(path, "w") as out, pytest.warns(UserWarning, match="Duplicate name"):
        out.writestr("archive/data.pkl", b"\x80\x02}.")
        out.writestr("archive/data.pkl", b"\x80\x02}.")
    expect_conversion_error(path, "duplicate members")


def test_plain_pickle_without_magic_is_refused(tmp_path: Path) -> None:
    """A harmless pickle that is not a torch.save stream is refused for lacking the legacy magic."""
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    expect_conversion_error(path, "expected the legacy magic number")


def test_huge_length_prefix_fails_fast(tmp_path: Path) -> None:
    """A string claiming 4 GiB in a tiny legacy file is refused as incomplete without allocating it."""
    path = tmp_path / "liar.pth"
    path.write_bytes(hostile.legacy_bytes(b"\x80\x02X\xff\xff\xff\xff" + b"a" * 10))
    expect_conversion_error(path, "only 16 remain")


def test_clamped_reader_never_reads_past_the_file_or_a_long_line(tmp_path: Path) -> None:
    """The legacy scan's reader caps read(n) at the bytes left and readline at _MAX_LINE."""
    limit = _torch_pickle._MAX_LINE
    path = tmp_path / "blob"
    path.write_bytes(b"a" * (2 * limit + 5))
    with open(path, "rb") as f:
        reader = _torch_pickle._ClampedReader(f, 2 * limit + 5)
        assert len(reader.readline()) == limit
        assert reader.read(1 << 50) == b"a" * (limit + 5)  # an uncapped read would try to allocate a petabyte
        assert reader.read(10) == b""


def test_reference_cycle_is_refused(tmp_path: Path) -> None:
    """A list that contains itself is refused rather than handed to a caller that walks the tree."""
    legit = save({"w": torch.ones(3)}, tmp_path / "legit.pt")
    path = hostile.swap_data_pkl(legit, tmp_path / "cycle.pt", b"\x80\x02]q\x00h\x00a.")
    expect_conversion_error(path, "reference cycle")


def test_absurd_nesting_is_refused(tmp_path: Path) -> None:
    """Containers nested hundreds deep are refused instead of overflowing the stack."""
    legit = save({"w": torch.ones(3)}, tmp_path / "legit.pt")
    path = hostile.swap_data_pkl(legit, tmp_path / "deep.pt", b"\x80\x02" + b"]" * 500 + b"a" * 499 + b".")
    expect_conversion_error(path, "nested more than")


def test_shared_sub_containers_are_walked_once(tmp_path: Path) -> None:
    """A DAG of lists each referencing the next twice (2**150 paths) is read in linear time."""
    legit = save({"w": torch.ones(3)}, tmp_path / "legit.pt")
    path = hostile.swap_data_pkl(legit, tmp_path / "dag.pt", hostile.doubling_dag_pickle(150))
    top = read_torch_file(path).obj
    assert len(top) == 2 and top[0] is top[1]


def test_oversized_storage_claim_is_refused(tmp_path: Path) -> None:
    """A data.pkl claiming more storage bytes than its record holds is refused, not read past the file."""
    small = save({"w": torch.ones(3)}, tmp_path / "small.pt")
    big = save({"w": torch.ones(1000)}, tmp_path / "big.pt")
    with zipfile.ZipFile(big) as z:
        big_pkl = z.read("big/data.pkl")
    path = hostile.swap_data_pkl(small, tmp_path / "liar.pt", big_pkl)
    expect_conversion_error(path, "storages declare 4000 bytes but the file has only")


def test_read_leaves_no_files_behind(tmp_path: Path) -> None:
    """Reading creates nothing next to the checkpoint."""
    path = save({"w": torch.ones(2)}, tmp_path / "w.pt")
    before = sorted(os.listdir(tmp_path))
    read_torch_file(path)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(
    ("module", "name", "opcode"),
    [
        ("torch.storage", "UntypedStorage", b"R"),
        ("torch.storage", "TypedStorage", b"R"),
        ("torch", "FloatStorage", b"R"),
        ("torch", "Tensor", b"R"),
        ("torch", "Tensor", b"\x81"),  # NEWOBJ
        ("builtins", "bytearray", b"R"),
    ],
)
def test_constructor_called_with_a_bare_size_is_refused(tmp_path: Path, module: str, name: str, opcode: bytes) -> None:
    """A storage, tensor or bytearray built from an integer (uninitialised memory) is refused before torch runs."""
    base = save({"w": torch.ones(1)}, tmp_path / "base.pt")
    path = hostile.swap_data_pkl(base, tmp_path / "alloc.pt", hostile.sized_call(module, name, 1 << 20, opcode))
    with pytest.raises(UnsafeCheckpointError, match=r"calls `.*` at byte \d+ to build an object from a bare size") as info:
        read_torch_file(path)
    assert info.value.global_name == f"{module}.{name}"


def test_tensor_rebuilt_on_a_sized_storage_is_refused(tmp_path: Path) -> None:
    """_rebuild_tensor_v2 over TypedStorage(n) would expose n uninitialised floats: refused naming TypedStorage."""
    base = save({"w": torch.ones(1)}, tmp_path / "base.pt")
    path = hostile.swap_data_pkl(base, tmp_path / "alloc.pt", hostile.rebuilt_from_sized_storage(1 << 20))
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_file(path)
    assert info.value.global_name == "torch.storage.TypedStorage"


def test_bytearray_from_data_is_still_read(tmp_path: Path) -> None:
    """A real bytearray value (built from its bytes, as torch.save writes it) is not mistaken for an allocation."""
    path = save({"w": torch.ones(1), "blob": bytearray(b"abc")}, tmp_path / "b.pt")
    assert read_torch_file(path).obj["blob"] == bytearray(b"abc")
