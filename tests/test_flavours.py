"""Every tensor flavour that can reach ``save`` is stored faithfully or refused with a typed error (issue 10, item 7)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import manifest_ckpt as mc


def _values(t: torch.Tensor) -> bytes:
    """The bytes of a tensor's values (lazy conj/neg resolved), in row-major order."""
    plain = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return plain.view(torch.uint8).numpy().tobytes()


def _base() -> torch.Tensor:
    return torch.arange(24, dtype=torch.float32).reshape(4, 6) - 7.5


FAITHFUL: dict[str, Callable[[], torch.Tensor]] = {
    "transposed view": lambda: _base().t(),
    "offset slice of a larger storage": lambda: _base()[1:3, 2:5],
    "strided view": lambda: _base()[:, ::2],
    "expanded view": lambda: torch.arange(3.0).expand(4, 3),
    "channels-last": lambda: torch.arange(2 * 3 * 4 * 5, dtype=torch.float32)
    .reshape(2, 3, 4, 5)
    .contiguous(memory_format=torch.channels_last),
    "conj of complex": lambda: torch.complex(_base(), -_base()).conj(),
    "neg view": lambda: torch._neg_view(_base()),
    "neg view of conj": lambda: torch._neg_view(torch.complex(_base(), _base() * 2).conj()),
    "conj of real (no-op)": lambda: _base().conj(),
    "requires_grad leaf": lambda: _base().requires_grad_(),
    "non-leaf with grad": lambda: _base().requires_grad_() * 2,
    "parameter": lambda: nn.Parameter(_base()),
    "inference tensor": lambda: _inference(_base),
    "plain subclass": lambda: _base().as_subclass(_Plain),
    "0-d": lambda: torch.tensor(3.25),
    "zero-size": lambda: torch.empty(0, 3),
    "float8_e8m0fnu": lambda: torch.arange(256, dtype=torch.uint8).view(torch.float8_e8m0fnu).reshape(16, 16),
    "float4_e2m1fn_x2": lambda: torch.arange(256, dtype=torch.uint8).view(torch.float4_e2m1fn_x2).reshape(8, 32),
    "bool": lambda: torch.tensor([True, False, True]),
    "uint64": lambda: torch.tensor([0, 2**63 + 5], dtype=torch.uint64),
}


class _Plain(torch.Tensor):
    """A subclass without ``__torch_dispatch__``: its storage holds its values."""


def _inference(make: Callable[[], torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return make()


@pytest.mark.parametrize("flavour", list(FAITHFUL))
def test_flavour_is_stored_faithfully(tmp_path: Path, flavour: str) -> None:
    tensor = FAITHFUL[flavour]()
    expected = _values(tensor)
    mc.save({"t": tensor}, tmp_path / "ck")
    mc.verify(tmp_path / "ck")
    target = nn.Module()
    target.register_buffer("t", torch.zeros(tensor.shape, dtype=tensor.dtype))
    mc.load(target, tmp_path / "ck")
    assert _values(target.t) == expected
    assert _values(tensor) == expected  # saving changed nothing


def _sparse_coo() -> torch.Tensor:
    return _base().to_sparse()


def _quiet(make: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``make`` without torch's beta/prototype/deprecation warnings (they are torch's, not ours)."""

    def quiet() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make()

    return quiet


def _quantized() -> torch.Tensor:
    return torch.quantize_per_tensor(_base(), 0.5, 0, torch.qint8)


def _two_tensor() -> torch.Tensor:
    from torch.testing._internal.two_tensor import TwoTensor

    return TwoTensor(_base(), _base() + 1)


REFUSED: dict[str, tuple[Callable[[], torch.Tensor], str]] = {
    "sparse COO": (_sparse_coo, "sparse"),
    "sparse CSR": (_quiet(lambda: _base().to_sparse_csr()), "only dense tensors are stored"),
    "nested": (_quiet(lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])), "only dense tensors"),
    "quantized": (_quiet(_quantized), r"\(quantized\)"),
    "dispatch subclass": (_two_tensor, "override __torch_dispatch__"),
    "meta": (lambda: torch.empty(2, 3, device="meta"), "meta device"),
    "complex128": (lambda: torch.zeros(2, dtype=torch.complex128), "which safetensors cannot store"),
    "lazy": (lambda: nn.LazyLinear(2).weight, "uninitialised lazy"),
}


@pytest.mark.parametrize("flavour", list(REFUSED))
def test_flavour_is_refused_with_a_typed_error_before_writing(tmp_path: Path, flavour: str) -> None:
    make, reason = REFUSED[flavour]
    with pytest.raises(mc.UnsupportedTensorError, match=reason) as info:
        mc.save({"t": make()}, tmp_path / "ck")
    assert "'t'" in str(info.value) or " t" in str(info.value)
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("key", ["__metadata__", ""])
def test_reserved_and_empty_keys_are_refused_by_save(tmp_path: Path, key: str) -> None:
    with pytest.raises(mc.InvalidKeyError):
        mc.save({key: torch.ones(1)}, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
