"""Small Hugging Face models built from configs (never downloaded weights), shared by the HF tests."""

from __future__ import annotations

from typing import Any

import torch


def llama_config(*, tied: bool = False, **overrides: Any) -> Any:
    """A two-layer Llama config with grouped-query attention; ``overrides`` replace any field."""
    import transformers

    fields: dict[str, Any] = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": tied,
    }
    return transformers.LlamaConfig(**{**fields, **overrides})


def llama(seed: int, *, tied: bool = False, **overrides: Any) -> Any:
    """``LlamaForCausalLM`` of :func:`llama_config`, in eval mode, initialised from ``seed``."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(tied=tied, **overrides)).eval()
