"""Small built-in models for ``manifest-ckpt demo`` and for trying the CLI (``--model``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyGPT(nn.Module):
    """A two-block GPT-style language model with tied input and output embeddings."""

    def __init__(self, vocab: int = 64, width: int = 32, blocks: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(16, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, batch_first=True, norm_first=True)
            for _ in range(blocks)
        )
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.register_buffer("causal_mask", torch.ones(16, 16).tril().bool(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        mask = self.get_buffer("causal_mask")
        for block in self.blocks:
            x = block(x, src_mask=~mask[: x.shape[1], : x.shape[1]])
        return self.lm_head(self.ln_f(x))  # type: ignore[no-any-return]


class TinyGPTVariant(TinyGPT):
    """A look-alike that a TinyGPT checkpoint must not load into silently.

    Same names and mostly the same shapes, but RMSNorm instead of LayerNorm, an untied
    output head with a bias, bfloat16 position embeddings, and a wider feed-forward in the
    last block: together every kind of problem a report can list.
    """

    def __init__(self) -> None:
        super().__init__()
        width = self.wte.embedding_dim
        self.ln_f = nn.RMSNorm(width)  # type: ignore[assignment]
        self.lm_head = nn.Linear(width, self.wte.num_embeddings, bias=True)
        self.wpe.to(torch.bfloat16)
        last = self.blocks[-1]
        last.linear1 = nn.Linear(width, 4 * width)
        last.linear2 = nn.Linear(4 * width, width)


def tiny_gpt() -> TinyGPT:
    """A deterministic TinyGPT (seeded), the demo's model."""
    torch.manual_seed(0)
    return TinyGPT()


def tiny_gpt_variant() -> TinyGPTVariant:
    """The demo's wrong model."""
    torch.manual_seed(1)
    return TinyGPTVariant()
