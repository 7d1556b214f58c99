"""Small models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class TiedNet(nn.Module):
    """Embedding tied to an output head, a BatchNorm (int64 buffer) and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scratch", torch.full((3,), 7.0), persistent=False)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a Linear whose weight is stored transposed (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


class Gpt2Mlp(nn.Module):
    def __init__(self, use_conv1d: bool) -> None:
        super().__init__()
        self.c_fc = Conv1D(8, 8) if use_conv1d else nn.Linear(8, 8)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of every parameter and buffer, persistent or not."""
    out = {f"p:{k}": v.detach().clone() for k, v in module.named_parameters(remove_duplicate=False)}
    out.update({f"b:{k}": v.detach().clone() for k, v in module.named_buffers(remove_duplicate=False)})
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes, shapes and bytes (NaN-safe: compares the raw bits)."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert torch.equal(raw_bytes(x), raw_bytes(y)), key


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)
