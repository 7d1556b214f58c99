"""Build the tensors a key transform plan describes (the torch side of :mod:`comparison.transforms`).

``convert`` and ``export_hf`` build each transformed key (:func:`build`: views of the stored
tensors where the op allows, new memory for a stack or concatenation); ``load`` writes each
part straight into its region of the module's tensor (:func:`fill`), so a fused tensor is
never built twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from manifest_ckpt.comparison.transforms import Node

__all__ = ["build", "fill"]


def build(node: Node, leaf: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The node's values; ``leaf(key)`` gives a source tensor (selects, narrows and transposes stay views)."""
    if node.op == "source":
        assert node.key is not None
        return leaf(node.key)
    if node.op == "stack":
        return torch.stack([build(p, leaf) for p in node.parts], dim=node.args[0])
    if node.op == "concat":
        return torch.cat([build(p, leaf) for p in node.parts], dim=node.args[0])
    (part,) = node.parts
    inner = build(part, leaf)
    if node.op == "select":
        return inner.select(node.args[0], node.args[1])
    if node.op == "narrow":
        return inner.narrow(node.args[0], node.args[1], node.args[2])
    return inner.transpose(node.args[0], node.args[1])


def fill(
    out: torch.Tensor,
    node: Node,
    fill_leaf: Callable[[torch.Tensor, str], None],
    leaf: Callable[[str], torch.Tensor],
) -> None:
    """Write the node's values into ``out`` (same shape; dtype cast by ``copy_``).

    A stack or concatenation fills each part's region of ``out``, a transpose fills the
    transposed view of ``out``, and a source is written by ``fill_leaf(region, key)``; only
    a select or narrow of a source reads it through ``leaf``.
    """
    if node.op == "source":
        assert node.key is not None
        fill_leaf(out, node.key)
    elif node.op == "stack":
        for i, part in enumerate(node.parts):
            fill(out.select(node.args[0], i), part, fill_leaf, leaf)
    elif node.op == "concat":
        start = 0
        for part in node.parts:
            size = part.shape[node.args[0]]
            fill(out.narrow(node.args[0], start, size), part, fill_leaf, leaf)
            start += size
    elif node.op == "transpose":
        fill(out.transpose(node.args[0], node.args[1]), node.parts[0], fill_leaf, leaf)
    else:
        out.copy_(build(node, leaf))
