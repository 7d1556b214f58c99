"""Tests for save: the files it writes, determinism, atomicity, dtypes and errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt import writer
from tests._models import TiedNet, raw_bytes

ALL_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
    torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
    torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz,
]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype`` (covers NaN payloads and every bit pattern)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.empty(shape, dtype=dtype).element_size() * int(torch.tensor(shape).prod().item() if shape else 1)
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        data = data % 2
    return data.view(dtype).reshape(shape)


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_save_writes_manifest_and_weights_that_safetensors_opens(tmp_path: Path) -> None:
    """The weights file opens with plain safe_open and holds every stored tensor, bit-exact."""
    model = TiedNet()
    manifest = mc.save(model, tmp_path / "ck")
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == sorted(["manifest.json", *manifest.files])
    (weights,) = manifest.files
    with safe_open(str(tmp_path / "ck" / weights), "pt") as f:
        assert sorted(f.keys()) == sorted(manifest.tensors)
        for key in f.keys():
            assert torch.equal(raw_bytes(f.get_tensor(key)), raw_bytes(model.state_dict()[key]))
        assert f.metadata()["manifest_ckpt.content_digest"].startswith("sha256:")
    assert manifest.aliases == {"head.weight": "emb.weight"}
    assert "scratch" not in manifest.tensors
    assert manifest.modules is not None and manifest.modules[""].non_persistent_buffers == ("scratch",)
    assert manifest.modules["bn"].version == 2


def test_every_dtype_and_odd_shape_round_trips_bit_exact(tmp_path: Path) -> None:
    """Every storable dtype, 0-d and zero-size tensors come back with identical bytes."""
    state = {}
    for i, dtype in enumerate(ALL_DTYPES):
        name = str(dtype).removeprefix("torch.")
        state[f"{name}.full"] = random_tensor(dtype, (3, 5), seed=i)
        state[f"{name}.scalar"] = random_tensor(dtype, (), seed=100 + i)
        state[f"{name}.empty"] = torch.empty((0, 4), dtype=dtype)
    mc.save(state, tmp_path / "ck")
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    module = nn.Module()
    for k, v in target.items():
        module.register_buffer(k.replace(".", "_"), v)
    result = mc.load(module, tmp_path / "ck", remap={r"\.": "_"}, verify_digests=True)
    assert len(result.loaded) == len(state)
    for k, v in state.items():
        got = getattr(module, k.replace(".", "_"))
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.equal(raw_bytes(got), raw_bytes(v)), k


def test_non_contiguous_views_and_shared_storage_are_stored_as_values(tmp_path: Path) -> None:
    """A transposed view and two slices of one storage are saved by value, not as aliases."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"t": base.t(), "top": base[:2], "bottom": base[2:], "strided": base[:, ::2]}
    manifest = mc.save(state, tmp_path / "ck")
    assert manifest.aliases == {}
    with safe_open(str(tmp_path / "ck" / next(iter(manifest.files))), "pt") as f:
        for key, value in state.items():
            assert torch.equal(f.get_tensor(key), value), key


def test_small_and_large_tensors_interleaved_get_each_its_own_digest_and_bytes(tmp_path: Path) -> None:
    """Staged small tensors (several write blocks' worth), large, empty and non-plain ones, in any order, are
    written in layout order with the sha256 of their own bytes."""
    import hashlib

    torch.manual_seed(5)
    state: dict[str, torch.Tensor] = {f"s{i:02d}": torch.randn(15_000) for i in range(40)}  # 60 KB each: 2.4 MB
    state.update({f"l{i}": torch.randn(40_000) for i in range(3)})  # above the staging size
    state["conj"] = torch.randn(3, dtype=torch.complex64).conj()
    state["nc"] = torch.randn(5, 7).t()
    state["empty"] = torch.empty(0, 3)
    state["b"] = torch.arange(7, dtype=torch.int8)
    manifest = mc.save(state, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / next(iter(manifest.files))), "pt") as f:
        for key, t in state.items():
            want = raw_bytes(t.resolve_conj()).numpy().tobytes()
            assert raw_bytes(f.get_tensor(key)).numpy().tobytes() == want, key
            assert manifest.tensors[key].digest == "sha256:" + hashlib.sha256(want).hexdigest(), key
    mc.verify(tmp_path / "ck")


def test_same_tensor_under_two_keys_becomes_an_alias(tmp_path: Path) -> None:
    """A state dict holding one tensor twice stores it once and records the later key as alias."""
    w = torch.randn(3, 3)
    manifest = mc.save({"a": w, "b": w, "c": w.clone()}, tmp_path / "ck")
    assert manifest.aliases == {"b": "a"}
    assert sorted(manifest.tensors) == ["a", "c"]


def test_saving_twice_gives_byte_identical_directories(tmp_path: Path) -> None:
    """Same tensors and arguments: same file names and bytes, same digest."""
    model = TiedNet()
    m1 = mc.save(model, tmp_path / "a", lineage={"run": 1, "lr": [0.1, 0.01]})
    m2 = mc.save(model, tmp_path / "b", lineage={"run": 1, "lr": [0.1, 0.01]})
    assert dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")
    assert m1.digest == m2.digest


def test_digest_follows_values_not_lineage_or_file_layout(tmp_path: Path) -> None:
    """Lineage, metadata and file splitting keep the digest; one changed value changes it."""
    model = TiedNet()
    base = mc.save(model, tmp_path / "a").digest
    assert mc.save(model, tmp_path / "b", lineage={"x": 1}, metadata={"y": 2}).digest == base
    split = mc.save(model, tmp_path / "c", max_file_size=64)
    assert len(split.files) > 1 and split.digest == base
    with torch.no_grad():
        model.fc.bias[0] += 1
    assert mc.save(model, tmp_path / "d").digest != base


def test_no_wall_clock_unless_asked_and_source_date_epoch_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """created_at appears only with SOURCE_DATE_EPOCH (exact) or timestamp=True."""
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert "created_at" not in mc.save(TiedNet(), tmp_path / "a").lineage
    assert "created_at" in mc.save(TiedNet(), tmp_path / "b", timestamp=True).lineage
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert mc.save(TiedNet(), tmp_path / "c").lineage["created_at"] == "2023-11-14T22:13:20Z"


def test_lineage_records_versions_code_and_user_json(tmp_path: Path) -> None:
    """Versions of the library, torch and Python, and nested user JSON are recorded as given."""
    user = {"dataset": "toy", "epochs": 3, "lr": [0.1, 0.01], "nested": {"ok": True, "none": None}}
    lineage = mc.save(TiedNet(), tmp_path / "ck", lineage=user, record_code=False).lineage
    assert lineage["user"] == user
    assert lineage["created_by"]["manifest_ckpt"] == mc.__version__
    assert lineage["created_by"]["torch"] == torch.__version__.split("+")[0]
    assert "code" not in lineage
    assert mc.read_manifest(tmp_path / "ck").lineage["user"] == user


def test_lineage_outside_json_is_refused_before_writing(tmp_path: Path) -> None:
    """A lineage value that is not JSON raises ManifestError naming it; nothing is written."""
    with pytest.raises(mc.ManifestError, match="lineage must be plain JSON"):
        mc.save(TiedNet(), tmp_path / "ck", lineage={"when": object()})
    with pytest.raises(mc.ManifestError, match="metadata must be plain JSON"):
        mc.save(TiedNet(), tmp_path / "ck2", metadata={"nan": float("nan")})
    assert os.listdir(tmp_path) == []


def test_existing_destination_needs_overwrite(tmp_path: Path) -> None:
    """A second save to the same path is refused unless overwrite=True."""
    mc.save(TiedNet(), tmp_path / "ck")
    with pytest.raises(mc.CheckpointExistsError, match="overwrite=True"):
        mc.save(TiedNet(), tmp_path / "ck")


def test_overwrite_replaces_weights_and_keeps_unrelated_files(tmp_path: Path) -> None:
    """Overwriting swaps the manifest atomically, deletes the old weights, keeps other files."""
    first = mc.save(TiedNet(), tmp_path / "ck")
    (tmp_path / "ck" / "README.txt").write_text("notes")
    second = mc.save(TiedNet(), tmp_path / "ck", overwrite=True)
    assert first.files.keys() != second.files.keys()
    assert sorted(os.listdir(tmp_path / "ck")) == sorted(["manifest.json", "README.txt", *second.files])
    mc.verify(tmp_path / "ck")


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    """A non-empty directory without manifest.json is never overwritten."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.bin").write_bytes(b"x")
    with pytest.raises(mc.CheckpointExistsError, match="not a checkpoint"):
        mc.save(TiedNet(), tmp_path / "data", overwrite=True)
    assert os.listdir(tmp_path / "data") == ["precious.bin"]


def test_crash_while_writing_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception in the middle of a save leaves no checkpoint and no temporary files."""
    calls = {"n": 0}
    real = writer._is_plain  # asked of every tensor as it is written

    def failing(t: torch.Tensor) -> bool:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(t)

    monkeypatch.setattr(writer, "_is_plain", failing)
    with pytest.raises(OSError, match="disk full"):
        mc.save(TiedNet(), tmp_path / "ck")
    assert os.listdir(tmp_path) == []


def test_crash_while_overwriting_keeps_the_old_checkpoint_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed overwrite leaves the previous checkpoint loadable and verifiable."""
    model = TiedNet()
    old = mc.save(model, tmp_path / "ck")

    def failing(t: torch.Tensor) -> bool:
        raise OSError("disk full")

    monkeypatch.setattr(writer, "_is_plain", failing)
    with pytest.raises(OSError):
        mc.save(TiedNet(), tmp_path / "ck", overwrite=True)
    monkeypatch.undo()
    mc.verify(tmp_path / "ck")
    assert mc.read_manifest(tmp_path / "ck").digest == old.digest
    assert sorted(os.listdir(tmp_path / "ck")) == sorted(["manifest.json", *old.files])


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (torch.zeros(2, dtype=torch.complex128), "complex128"),
        (torch.zeros(2, 2).to_sparse(), "layout"),
        (torch.empty(2, device="meta"), "meta"),
        (object(), "without pickle: bad.key \\(builtins.object\\)"),
    ],
)
def test_what_cannot_be_stored_is_refused_clearly(tmp_path: Path, value: object, match: str) -> None:
    """Unsupported dtypes, layouts, meta tensors and objects that need pickle raise ManifestCkptError, write nothing."""
    with pytest.raises(mc.ManifestCkptError, match=match):
        mc.save({"bad.key": value}, tmp_path / "ck")  # type: ignore[dict-item]
    assert not (tmp_path / "ck").exists()


def test_split_files_respect_the_size_limit_and_alignment(tmp_path: Path) -> None:
    """max_file_size spreads tensors over files; each tensor starts at a multiple of its itemsize."""
    state = {f"t{i}": torch.randn(16, dtype=torch.float64) for i in range(6)}
    state["flags"] = torch.ones(3, dtype=torch.bool)
    manifest = mc.save(state, tmp_path / "ck", max_file_size=300)
    # 6 x 128 bytes of float64 two per file, the 3 bool bytes fit beside the last pair.
    assert len(manifest.files) == 3
    per_file: dict[str, int] = {}
    for t in manifest.tensors.values():
        per_file[t.file or ""] = per_file.get(t.file or "", 0) + t.nbytes
    assert sorted(per_file.values()) == [256, 256, 259]
    for key, t in manifest.tensors.items():
        assert t.byte_range is not None
        assert t.byte_range[0] % state[key].element_size() == 0
    document = json.loads((tmp_path / "ck" / "manifest.json").read_bytes())
    assert document["format"] == "manifest-ckpt" and document["format_version"] == "1.0.0"


def test_parents_are_recorded_by_digest_and_base_name(tmp_path: Path) -> None:
    """A parent given by path is recorded as its digest with the relation and base name only."""
    parent = mc.save(TiedNet(), tmp_path / "base")
    child = mc.save(TiedNet(), tmp_path / "ft", parents=[(tmp_path / "base", "fine-tuned-from")])
    assert child.parents == [{"digest": parent.digest, "relation": "fine-tuned-from", "name": "base"}]
    with pytest.raises(mc.ManifestError, match="relation"):
        mc.save(TiedNet(), tmp_path / "x", parents=[(parent.digest, "copied-from")])


# -- every tensor flavour that reaches save: stored faithfully or refused with a typed error ----


def _values(t: torch.Tensor) -> torch.Tensor:
    """What the user sees in ``t``, as a plain contiguous tensor's bytes."""
    return t.detach().resolve_conj().resolve_neg().as_subclass(torch.Tensor).contiguous().reshape(-1).view(torch.uint8)


def _read_back(path: Path, key: str, like: torch.Tensor) -> torch.Tensor:
    """Load ``key`` into a fresh zero buffer of ``like``'s dtype and shape; return its bytes."""
    holder = nn.Module()
    holder.register_buffer(key, torch.zeros(like.shape, dtype=like.dtype))
    mc.load(holder, path, strict=False)
    return getattr(holder, key).reshape(-1).view(torch.uint8)


class _FunctionOnly(torch.Tensor):
    """A subclass that only overrides __torch_function__: plain storage, plain values."""


_BASE = torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5.5
_COMPLEX = torch.complex(_BASE, -_BASE).to(torch.complex64)

FAITHFUL = {
    "transposed": _BASE.t(),
    "strided": _BASE[:, ::2],
    "expanded": torch.ones(4).expand(3, 4),
    "channels_last": torch.arange(16.0).reshape(1, 4, 2, 2).to(memory_format=torch.channels_last),
    "conj": _COMPLEX.conj(),
    "conj_transposed": _COMPLEX.conj().t(),
    "neg": torch._neg_view(_BASE),
    "neg_conj": torch._neg_view(_COMPLEX.conj()),
    "requires_grad": nn.Parameter(_BASE.clone(), requires_grad=True),
    "non_leaf": (nn.Parameter(_BASE.clone()) * 2),
    "function_subclass": _BASE.clone().as_subclass(_FunctionOnly),
    "e8m0": torch.arange(12, dtype=torch.uint8).view(torch.float8_e8m0fnu),
    "f4": torch.arange(12, dtype=torch.uint8).reshape(3, 4).view(torch.float4_e2m1fn_x2),
    "f4_strided": torch.arange(24, dtype=torch.uint8).reshape(3, 8)[:, ::2].view(torch.float4_e2m1fn_x2),
}


@pytest.mark.parametrize("name", sorted(FAITHFUL))
def test_tensor_flavours_are_stored_as_their_values(tmp_path: Path, name: str) -> None:
    """Views, lazy conj/neg views, autograd tensors, subclasses and new dtypes store the values the user sees."""
    value = FAITHFUL[name]
    mc.save({name: value}, tmp_path / "ck")
    mc.verify(tmp_path / "ck")
    assert torch.equal(_read_back(tmp_path / "ck", name, value), _values(value))


def test_a_lazy_conj_view_beside_its_base_is_not_an_alias(tmp_path: Path) -> None:
    """x and x.conj() share storage and strides but differ in value: both are stored, not tied."""
    manifest = mc.save({"x": _COMPLEX, "y": _COMPLEX.conj(), "z": torch._neg_view(_BASE), "w": _BASE}, tmp_path / "ck")
    assert manifest.aliases == {}
    assert torch.equal(_read_back(tmp_path / "ck", "y", _COMPLEX), _values(_COMPLEX.conj()))
    assert torch.equal(_read_back(tmp_path / "ck", "z", _BASE), _values(-_BASE))


def _quantized() -> torch.Tensor:
    return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)


def _two_tensor() -> torch.Tensor:
    from torch.testing._internal.two_tensor import TwoTensor

    return TwoTensor(torch.ones(2), torch.zeros(2))


REFUSED = {
    "sparse_coo": (lambda: torch.eye(2).to_sparse(), mc.UnsupportedTensorError, "layout"),
    "sparse_csr": (lambda: torch.eye(2).to_sparse_csr(), mc.UnsupportedTensorError, "layout"),
    "nested": (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), mc.UnsupportedTensorError, "layout"),
    "quantized": (_quantized, mc.UnsupportedTensorError, "quantized"),
    "meta": (lambda: torch.empty(2, device="meta"), mc.UnsupportedTensorError, "meta device"),
    "complex128": (lambda: torch.zeros(2, dtype=torch.complex128), mc.UnsupportedTensorError, "complex128"),
    "complex32": (lambda: torch.zeros(2, dtype=torch.complex32), mc.UnsupportedTensorError, "complex32"),
    "wrapper_subclass": (_two_tensor, mc.UnsupportedTensorError, "__torch_dispatch__"),
    "f4_scalar": (
        lambda: torch.zeros((), dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
        mc.UnsupportedTensorError,
        "reshape it to",
    ),
}


@pytest.mark.filterwarnings("ignore:.*(prototype|deprecated|beta|experimental).*:UserWarning")
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_tensor_flavours_that_cannot_be_stored_are_refused_typed(tmp_path: Path, name: str) -> None:
    """Sparse, nested, quantized, meta, unstorable dtypes and wrapper subclasses: a typed error naming the key, nothing written."""
    make, error, match = REFUSED[name]
    with pytest.raises(error, match=match) as info:
        mc.save({"ok": torch.ones(1), f"bad.{name}": make()}, tmp_path / "ck")
    assert f"bad.{name}" in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("__metadata__", "reserved"),
        ("x" * 4097, "4097 characters long"),
        ("bad\ud800", "lone surrogate"),
    ],
)
def test_unstorable_keys_are_refused_before_writing(tmp_path: Path, key: str, why: str) -> None:
    """Reserved, over-long and unencodable keys raise InvalidKeyError naming why; nothing is written."""
    with pytest.raises(mc.InvalidKeyError, match=why) as info:
        mc.save({"fine": torch.ones(1), key: torch.ones(1)}, tmp_path / "ck")
    assert info.value.key == key
    assert os.listdir(tmp_path) == []


def test_a_key_of_the_maximum_length_is_stored(tmp_path: Path) -> None:
    """A 4096-character key is within the schema and round-trips."""
    key = "k" * 4096
    manifest = mc.save({key: torch.ones(1)}, tmp_path / "ck")
    assert list(manifest.tensors) == [key]
    mc.verify(tmp_path / "ck")


def test_save_into_a_missing_parent_is_a_destination_error(tmp_path: Path) -> None:
    """save names the missing parent directory and says to create it."""
    with pytest.raises(mc.DestinationError, match=r"parent directory .* does not exist; create it first"):
        mc.save({"w": torch.ones(1)}, tmp_path / "no" / "ck")


def test_file_names_cover_dtype_and_shape_not_only_keys_and_data(tmp_path: Path) -> None:
    """The same bytes under the same key but another shape or dtype get another file name (issue 11, item 4)."""
    names = set()
    for i, tensor in enumerate([torch.zeros(4), torch.zeros(2, 2), torch.zeros(4).view(torch.int32)]):
        manifest = mc.save({"w": tensor}, tmp_path / f"ck{i}", record_code=False)
        ((name, entry),) = manifest.files.items()
        assert name == f"weights-{entry.header_sha256[:16]}.safetensors"
        names.add(name)
    assert len(names) == 3
