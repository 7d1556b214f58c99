"""Faithful, all-or-nothing loads (issue 10): what torch's load_state_dict does, or a typed refusal before any copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt import plain_copy, reader


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))


def _bits(module: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() for k, v in module.state_dict().items()}


def test_inference_mode_target_outside_inference_mode_is_refused_before_any_copy_as_torch_refuses(
    tmp_path: Path,
) -> None:
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    with torch.inference_mode():
        ours, theirs = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)), _net()
        theirs.load_state_dict(ours.state_dict())
    before = _bits(ours)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        theirs.load_state_dict(saved.state_dict())
    with pytest.raises(mc.UnsupportedTensorError) as info:
        mc.load(ours, tmp_path / "ck")
    assert "0.weight, 0.bias, 1.weight, 1.bias, 2.weight, 2.bias (6 in all)" in str(info.value)
    assert _bits(ours) == before


def test_inference_mode_target_inside_inference_mode_loads_as_torch_does(tmp_path: Path) -> None:
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    with torch.inference_mode():
        ours = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
        theirs = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
        theirs.load_state_dict(saved.state_dict())
        result = mc.load(ours, tmp_path / "ck")
    assert result.loaded == sorted(saved.state_dict())
    assert _bits(ours) == _bits(theirs) == _bits(saved)
    assert all(p.is_inference() for p in ours.parameters())


def test_normal_target_loaded_inside_inference_mode_equals_torch(tmp_path: Path) -> None:
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    ours, theirs = _net(), _net()
    with torch.no_grad():
        for p in (*ours.parameters(), *theirs.parameters()):
            p.zero_()
    with torch.inference_mode():
        theirs.load_state_dict(saved.state_dict())
        mc.load(ours, tmp_path / "ck")
    assert _bits(ours) == _bits(theirs) == _bits(saved)
    assert not any(p.is_inference() for p in ours.parameters())


def _failing_fill(monkeypatch: pytest.MonkeyPatch, after: int, exc: BaseException) -> None:
    """Make the copy phase fail inside the ``after``-th copy, once that copy has written its target."""
    real = reader._fill
    calls = {"n": 0}

    def fill(target: torch.Tensor, *args: Any) -> None:
        real(target, *args)
        calls["n"] += 1
        if calls["n"] == after:
            raise exc

    monkeypatch.setattr(reader, "_fill", fill)


@pytest.mark.parametrize("after", [1, 3, 6])
def test_a_failure_mid_copy_restores_every_tensor_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    """A copy that can fail (here every one: a cast) fails mid-way: every tensor is put back bit for bit."""
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    torch.manual_seed(1)
    target = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).double()
    # One non-contiguous target (the clone path), one NaN with a payload (bits, not values, are restored).
    target[0].weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64).t())
    with torch.no_grad():
        target[2].bias.view(torch.int64)[0] = 0x7FF8000000000123
    before = _bits(target)
    _failing_fill(monkeypatch, after, OSError("simulated read error"))
    with pytest.raises(mc.LoadAbortedError, match="simulated read error") as info:
        mc.load(target, tmp_path / "ck", cast=True)
    assert info.value.key == list(target.state_dict())[after - 1]
    assert _bits(target) == before
    assert not target[0].weight.is_contiguous()


def test_the_failing_key_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LoadAbortedError names the key whose copy failed and the cause."""
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    target = _net().double()
    order = [k for k in target.state_dict()]
    _failing_fill(monkeypatch, 2, RuntimeError("boom"))
    with pytest.raises(mc.LoadAbortedError) as info:
        mc.load(target, tmp_path / "ck", cast=True)
    assert info.value.key == order[1]
    assert f"copying {order[1]!r} into the module failed (RuntimeError: boom)" in str(info.value)


def test_ctrl_c_mid_copy_restores_and_is_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the copies that can be undone: the module is put back and KeyboardInterrupt propagates."""
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    torch.manual_seed(2)
    target = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).double()
    before = _bits(target)
    _failing_fill(monkeypatch, 4, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        mc.load(target, tmp_path / "ck", cast=True)
    assert _bits(target) == before
    monkeypatch.undo()
    mc.load(target, tmp_path / "ck", cast=True)
    assert _bits(target) == _bits(saved.double())


def test_a_failing_copy_runs_before_any_plain_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies that can fail run first: when one fails, the plain targets (never saved) are still untouched."""
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    torch.manual_seed(3)
    target = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    target[2].weight = nn.Parameter(torch.randn(3, 2).t())  # the last key: the only copy that can fail
    before = _bits(target)
    _failing_fill(monkeypatch, 1, OSError("simulated read error"))
    with pytest.raises(mc.LoadAbortedError) as info:
        mc.load(target, tmp_path / "ck")
    assert info.value.key == "2.weight"
    assert _bits(target) == before


def test_plain_copies_save_no_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain copies (same dtype, contiguous CPU targets) keep no second copy of the model; others are saved."""
    saved = _net()
    mc.save(saved, tmp_path / "ck")
    recorded: list[list[str]] = []
    real = reader._Undo

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, tensors: Any) -> None:
            super().__init__(tensors)
            recorded.append([str(t.shape) for t in self.tensors])

    monkeypatch.setattr(reader, "_Undo", Spy)
    target = _net()
    target[0].weight = nn.Parameter(torch.zeros(4, 3).t())
    mc.load(target, tmp_path / "ck")
    assert recorded == [["torch.Size([3, 4])"]]
    assert _bits(target) == _bits(saved)


def test_ctrl_c_during_plain_copies_is_delivered_once_the_module_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while plain copies run is held: every tensor is loaded, then KeyboardInterrupt is raised."""
    import signal

    from manifest_ckpt import plain_copy

    saved = _net()
    mc.save(saved, tmp_path / "ck")
    real = plain_copy._memmove
    calls = {"n": 0}

    def memmove(dst: int, src: int, size: int) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)
        return real(dst, src, size)

    monkeypatch.setattr(plain_copy, "_memmove", memmove)
    target = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    # Python's own Ctrl-C handler, whatever an earlier test or plugin left installed.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        interrupted = False
        try:
            mc.load(target, tmp_path / "ck")
        except KeyboardInterrupt:
            interrupted = True
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
    assert (interrupted, calls["n"]) == (True, 6)
    assert _bits(target) == _bits(saved)


def test_overlapping_targets_keep_torchs_copy_order(tmp_path: Path) -> None:
    """A plain target sharing memory with one that is not: copies stay in state-dict order, as torch's."""

    class Overlap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            base = torch.zeros(3, 3)
            self.register_buffer("row", base[0])  # plain (contiguous), first in the state dict
            self.register_buffer("col", base[:, 0])  # not contiguous; shares element [0, 0] with row

    source = {"row": torch.tensor([1.0, 2.0, 3.0]), "col": torch.tensor([7.0, 8.0, 9.0])}
    mc.save(source, tmp_path / "ck")
    ours, theirs = Overlap(), Overlap()
    theirs.load_state_dict(source)
    mc.load(ours, tmp_path / "ck", check_classes=False)
    assert ours.row.tolist() == theirs.row.tolist() == [7.0, 2.0, 3.0]
    assert ours.col.tolist() == theirs.col.tolist() == [7.0, 8.0, 9.0]


def test_large_plain_copies_split_across_threads_are_bit_identical(tmp_path: Path) -> None:
    """Tensors above the split size (odd byte counts included) load bit for bit, ties kept."""
    from manifest_ckpt import plain_copy

    torch.manual_seed(4)
    n = plain_copy._SPLIT_MIN // 4 + 3  # not a whole number of pages
    saved = nn.ModuleDict({"a": nn.Embedding(1, n), "b": nn.Linear(n, 1, bias=True)})
    saved["b"].weight = saved["a"].weight
    mc.save(saved, tmp_path / "ck")
    target = nn.ModuleDict({"a": nn.Embedding(1, n), "b": nn.Linear(n, 1, bias=True)})
    target["b"].weight = target["a"].weight
    version = target["a"].weight._version
    mc.load(target, tmp_path / "ck")
    assert _bits(target) == _bits(saved)
    assert target["b"].weight is target["a"].weight
    assert target["a"].weight._version > version


def _large_net() -> nn.Module:
    """A tensor read straight into the module (plain_copy.READ_MIN bytes and more) after small ones."""
    torch.manual_seed(5)
    n = plain_copy.READ_MIN // 4 * 3 + 5  # three segments' worth, not a whole number of pages
    return nn.ModuleDict({"a": nn.Linear(3, 2), "z": nn.Embedding(1, n)})


def _weights_file(ckpt: Path) -> Path:
    (file,) = ckpt.glob("*.safetensors")
    return file


def test_a_file_truncated_after_the_check_is_refused_with_the_module_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A weights file cut between binding and copying: IntegrityError naming it, nothing of the module changed."""
    mc.save(_large_net(), tmp_path / "ck")
    file = _weights_file(tmp_path / "ck")
    real = reader._Weights.bind

    def bind_then_truncate(self: Any, names: Any) -> None:
        real(self, names)
        with open(file, "r+b") as f:  # another process cuts the file once the load has checked it
            f.truncate(file.stat().st_size - 4096)

    monkeypatch.setattr(reader._Weights, "bind", bind_then_truncate)
    target = _large_net()
    target["a"].weight = nn.Parameter(torch.zeros(3, 2).t())  # a saved (non-plain) copy too
    torch.manual_seed(6)
    with torch.no_grad():
        for t in target.parameters():
            t.copy_(torch.randn_like(t))
    before = _bits(target)
    with pytest.raises(mc.IntegrityError) as info:
        mc.load(target, tmp_path / "ck")
    assert info.value.file == file.name
    assert "when the load checked it" in str(info.value) and "Nothing was loaded" in str(info.value)
    assert _bits(target) == before


def test_a_file_cut_while_it_is_read_raises_naming_the_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file cut during the plain reads: IntegrityError naming file and key; the saved copies are put back."""
    from manifest_ckpt.storage.store import DirectoryStore

    saved = _large_net()
    mc.save(saved, tmp_path / "ck")
    file = _weights_file(tmp_path / "ck")
    real = DirectoryStore.read_into
    cut = {"done": False}

    def cut_then_read(self: Any, name: str, start: int, out: memoryview) -> None:
        if not cut["done"]:  # the first read finds the file already cut below the big tensor's data
            cut["done"] = True
            with open(file, "r+b") as f:
                f.truncate(file.stat().st_size - 3 * plain_copy.READ_MIN)
        real(self, name, start, out)

    monkeypatch.setattr(DirectoryStore, "read_into", cut_then_read)
    target = _large_net()
    target["a"].weight = nn.Parameter(torch.zeros(3, 2).t())  # not contiguous: saved, copied first
    before = _bits(target)
    with pytest.raises(mc.IntegrityError) as info:
        mc.load(target, tmp_path / "ck")
    assert (info.value.file, info.value.key) == (file.name, "z.weight")
    assert "was cut while being read" in str(info.value) and "partially loaded" in str(info.value)
    after = _bits(target)
    assert after["a.weight"] == before["a.weight"]  # the copy that had its bytes saved was undone


def test_large_tensors_read_from_an_archive_member_are_bit_identical(tmp_path: Path) -> None:
    """Reads straight into the module start at the member's offset in the archive: same bits as torch."""
    from manifest_ckpt.storage.archive import pack

    saved = _large_net()
    mc.save(saved, tmp_path / "ck")
    pack(tmp_path / "ck", tmp_path / "ck.tar")
    target = _large_net()
    with torch.no_grad():
        for t in target.parameters():
            t.zero_()
    mc.load(target, tmp_path / "ck.tar")
    assert _bits(target) == _bits(saved)


def test_read_into_a_cut_file_raises_integrity_error(tmp_path: Path) -> None:
    """Store.read_into past the end of a file cut after it was opened: a typed error naming the file."""
    from manifest_ckpt.storage.store import open_store

    mc.save(_large_net(), tmp_path / "ck")
    file = _weights_file(tmp_path / "ck")
    store = open_store(tmp_path / "ck")
    size = store.file_size(file.name)
    out = bytearray(100)
    store.read_into(file.name, size - 100, memoryview(out))
    assert bytes(out) == file.read_bytes()[-100:]
    with open(file, "r+b") as f:
        f.truncate(size - 50)
    assert store.file_size(file.name) == size - 50
    with pytest.raises(mc.IntegrityError) as info:
        store.read_into(file.name, size - 100, memoryview(out))
    assert info.value.file == file.name
    assert f"ends at byte {size - 50}" in str(info.value)
