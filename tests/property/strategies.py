"""Shared hypothesis strategies: random module architectures, their values and their mutations.

An architecture is drawn as a pure description (:class:`Arch`, frozen dataclasses) and built
into an ``nn.Module`` on demand, so the same architecture can be built again with other
values, on the meta device, or with one deliberate difference (a :class:`Mutation`). Tensor
values are random bit patterns (NaN payloads, negative zeros, every float8 code) drawn from a
seed, so "bit-exact" means every byte.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

# -- example counting (printed by conftest.py in the pytest summary) -----------------------

EXAMPLES: Counter[str] = Counter()


def record_example() -> None:
    """Count one completed example of the running test (read by the terminal summary)."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "unknown")
    EXAMPLES[current.rsplit(" (", 1)[0]] += 1


@contextlib.contextmanager
def scratch(factory: Any) -> Iterator[Path]:
    """A fresh directory per hypothesis example (function-scoped ``tmp_path`` is shared by all)."""
    with tempfile.TemporaryDirectory(dir=factory.getbasetemp()) as d:
        yield Path(d)


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**32 - 1)


# -- dtypes --------------------------------------------------------------------------------

# Every dtype the manifest format stores (the library's _dtypes.DTYPES, spelled out here so
# a dtype dropped there is noticed).
DTYPES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
)
FLOAT_CASTS = ("float16", "bfloat16", "float64")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest dtype name."""
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


# -- the description of an architecture ------------------------------------------------------

TensorKind = Literal["parameter", "buffer", "non_persistent"]
Layout = Literal["contiguous", "transposed", "strided"]


@dataclass(frozen=True)
class TensorDecl:
    """A raw tensor owned by a custom module: a parameter or a (non-)persistent buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: TensorKind
    layout: Layout = "contiguous"


@dataclass(frozen=True)
class ViewDecl:
    """A tensor that is a strided view of its leaf's shared storage."""

    name: str
    kind: Literal["parameter", "buffer"]
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class SharedDecl:
    """One storage of ``numel`` elements and several views of it at different offsets."""

    dtype: str
    numel: int
    views: tuple[ViewDecl, ...]


@dataclass(frozen=True)
class RawLeafSpec:
    """A custom leaf module holding raw tensors."""

    cls: Literal["RawLeaf", "OtherRawLeaf"]
    tensors: tuple[TensorDecl, ...]
    shared: SharedDecl | None = None


@dataclass(frozen=True)
class TorchLeafSpec:
    """A torch layer built as ``nn.<cls>(*args, **kwargs)``, optionally cast to ``dtype``."""

    cls: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()
    dtype: str | None = None


@dataclass(frozen=True)
class ContainerSpec:
    """A container; ``Block`` is a custom container that may own tensors itself."""

    cls: Literal["Sequential", "ModuleList", "ModuleDict", "Block"]
    children: tuple[tuple[str, Node], ...]
    own: tuple[TensorDecl, ...] = ()


Node = RawLeafSpec | TorchLeafSpec | ContainerSpec


@dataclass(frozen=True)
class Arch:
    """A module tree plus parameter ties ``(dst key, src key)``: dst becomes src's Parameter."""

    root: ContainerSpec
    ties: tuple[tuple[str, str], ...] = ()


INDEXED = ("Sequential", "ModuleList")
NAMES = ("enc", "dec", "head", "body", "fc", "proj", "attn", "norm", "mlp", "emb", "stem", "gate", "out", "neck")
TENSOR_NAMES = ("weight", "bias", "scale", "table", "mask", "t0", "t1", "t2", "t3")


# -- modules ------------------------------------------------------------------------------


class RawLeaf(nn.Module):
    """A custom leaf whose tensors come straight from a :class:`RawLeafSpec`."""

    def __init__(self, spec: RawLeafSpec) -> None:
        super().__init__()
        _register_raw(self, spec.tensors)
        if spec.shared is not None:
            base = torch.empty(spec.shared.numel, dtype=torch_dtype(spec.shared.dtype))
            self._shared_base = base  # plain attribute: the storage the views share, not state
            for v in spec.shared.views:
                view = base.as_strided(v.shape, v.stride, v.offset)
                if v.kind == "parameter":
                    self.register_parameter(v.name, nn.Parameter(view, requires_grad=_grad_ok(view.dtype)))
                else:
                    self.register_buffer(v.name, view)


class OtherRawLeaf(RawLeaf):
    """The same tensors as :class:`RawLeaf` under another class name (for class swaps)."""


class Block(nn.Module):
    """A custom container that may own tensors of its own."""

    def __init__(self, own: tuple[TensorDecl, ...]) -> None:
        super().__init__()
        _register_raw(self, own)


def _grad_ok(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _register_raw(module: nn.Module, decls: tuple[TensorDecl, ...]) -> None:
    for d in decls:
        dtype = torch_dtype(d.dtype)
        if d.layout == "transposed":
            t = torch.empty(tuple(reversed(d.shape)), dtype=dtype).permute(*reversed(range(len(d.shape))))
        elif d.layout == "strided":
            # Every other row of a taller tensor: non-contiguous, with a storage offset.
            t = torch.empty((2 * d.shape[0] + 1, *d.shape[1:]), dtype=dtype)[1::2]
        else:
            t = torch.empty(d.shape, dtype=dtype)
        if d.kind == "parameter":
            module.register_parameter(d.name, nn.Parameter(t, requires_grad=_grad_ok(dtype)))
        else:
            module.register_buffer(d.name, t, persistent=d.kind == "buffer")


def _torch_class(name: str) -> type[nn.Module]:
    if name == "NonDynamicallyQuantizableLinear":
        return nn.modules.linear.NonDynamicallyQuantizableLinear
    cls: type[nn.Module] = getattr(nn, name)
    assert issubclass(cls, nn.Module)
    return cls


def _build_node(node: Node) -> nn.Module:
    if isinstance(node, RawLeafSpec):
        return RawLeaf(node) if node.cls == "RawLeaf" else OtherRawLeaf(node)
    if isinstance(node, TorchLeafSpec):
        module = _torch_class(node.cls)(*node.args, **dict(node.kwargs))
        return module.to(torch_dtype(node.dtype)) if node.dtype else module
    children = [(name, _build_node(child)) for name, child in node.children]
    if node.cls == "Sequential":
        return nn.Sequential(OrderedDict(children))
    if node.cls == "ModuleList":
        return nn.ModuleList([m for _, m in children])
    if node.cls == "ModuleDict":
        return nn.ModuleDict(dict(children))
    block = Block(node.own)
    for name, m in children:
        block.add_module(name, m)
    return block


def build(arch: Arch, *, seed: int = 0, invert: bool = False, meta: bool = False) -> nn.Module:
    """Build the module tree, apply the ties, then fill every tensor from ``seed``.

    Args:
        invert: fill with the bitwise complement of the ``seed`` values (every byte differs).
        meta: build under ``torch.device("meta")`` (no values).
    """
    if meta:
        with torch.device("meta"):
            module = _build_node(arch.root)
    else:
        module = _build_node(arch.root)
    for dst, src in arch.ties:
        owner, _, name = dst.rpartition(".")
        setattr(module.get_submodule(owner), name, module.get_parameter(src))
    if not meta:
        fill(module, seed, invert=invert)
    return module


def named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer (non-persistent ones included), tied names repeated."""
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, *, invert: bool) -> torch.Tensor:
    """A tensor of random bytes (for bool, random 0/1), or their complement."""
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(
        0, 256, (numel * torch.empty((), dtype=dtype).element_size(),), dtype=torch.uint8, generator=gen
    )
    if invert:
        raw = raw ^ 0xFF
    if dtype == torch.bool:
        raw = raw & 1
    return raw.view(dtype).reshape(shape)


def overlaps(t: torch.Tensor) -> bool:
    """Whether several elements share one memory location (an expanded view)."""
    return any(size > 1 and stride == 0 for size, stride in zip(t.shape, t.stride()))


def fill(module: nn.Module, seed: int, *, invert: bool = False) -> None:
    """Overwrite every tensor (once per object, in name order) with random bits from ``seed``.

    Shared storages are filled first; expanded views, which cannot be written, take their
    values from them.
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    bases = [b for m in module.modules() if isinstance(b := getattr(m, "_shared_base", None), torch.Tensor)]
    with torch.no_grad():
        for base in bases:
            if not base.is_meta:
                base.copy_(random_bits(tuple(base.shape), base.dtype, gen, invert=invert))
        for _, t in sorted(named_tensors(module), key=lambda kv: kv[0]):
            if id(t) in seen or t.is_meta or overlaps(t):
                continue
            seen.add(id(t))
            t.copy_(random_bits(tuple(t.shape), t.dtype, gen, invert=invert))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements as bytes, in row-major order."""
    # A fresh tensor: .contiguous() may keep odd strides on size-1 dims, which view() refuses.
    dense = torch.empty(tuple(t.shape), dtype=t.dtype).copy_(t.detach())
    return bytes(dense.reshape(-1).view(torch.uint8).numpy().tobytes()) if dense.numel() else b""


def snapshot(module: nn.Module) -> dict[str, tuple[object, ...]]:
    """Identity, dtype, shape and bytes of every tensor: equal snapshots mean "bitwise unchanged"."""
    return {
        name: (id(t), t.dtype, tuple(t.shape), t.is_meta, None if t.is_meta else tensor_bytes(t))
        for name, t in named_tensors(module)
    }


def state_bytes(module: nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    """dtype, shape and bytes of every state-dict key."""
    return {k: (t.dtype, tuple(t.shape), tensor_bytes(t)) for k, t in module.state_dict(keep_vars=True).items()}


def non_persistent(module: nn.Module) -> dict[str, tuple[object, ...]]:
    """The snapshot restricted to non-persistent buffers."""
    persistent = set(module.state_dict(keep_vars=True))
    return {k: v for k, v in snapshot(module).items() if k not in persistent}


# -- navigating and editing a description -------------------------------------------------


def iter_nodes(node: Node, path: str = "") -> Iterator[tuple[str, Node]]:
    """Every ``(path, node)`` in the tree, root first."""
    yield path, node
    if isinstance(node, ContainerSpec):
        for name, child in node.children:
            yield from iter_nodes(child, f"{path}.{name}" if path else name)


def get_node(root: Node, path: str) -> Node:
    node = root
    for part in path.split(".") if path else []:
        assert isinstance(node, ContainerSpec)
        node = dict(node.children)[part]
    return node


def edit(root: ContainerSpec, path: str, fn: Any) -> ContainerSpec:
    """A copy of the tree with the node at ``path`` replaced by ``fn(node)``."""
    out = _edit(root, path.split(".") if path else [], fn)
    assert isinstance(out, ContainerSpec)
    return out


def _edit(node: Node, parts: list[str], fn: Any) -> Node:
    if not parts:
        result: Node = fn(node)
        return result
    assert isinstance(node, ContainerSpec)
    head, rest = parts[0], parts[1:]
    return replace(node, children=tuple((k, _edit(c, rest, fn) if k == head else c) for k, c in node.children))


def keys_under(keys: object, path: str) -> list[str]:
    """The state-dict keys owned by the subtree at ``path`` (sorted)."""
    return sorted(k for k in keys if k.startswith(path + "."))  # type: ignore[attr-defined]


def tied_keys(arch: Arch) -> set[str]:
    return {k for pair in arch.ties for k in pair}


# -- strategies: leaves ----------------------------------------------------------------------

small = st.integers(1, 3)


@st.composite
def shapes(draw: st.DrawFn, *, max_rank: int = 5) -> tuple[int, ...]:
    """Rank 0 to 5, dims 0 to 3, at most 48 elements."""
    rank = draw(st.integers(0, max_rank))
    dims = draw(st.lists(st.integers(0, 3) if rank <= 3 else st.integers(0, 2), min_size=rank, max_size=rank))
    numel = 1
    for d in dims:
        numel *= d
    assume(numel <= 48)
    return tuple(dims)


@st.composite
def tensor_decls(draw: st.DrawFn, name: str, *, kinds: tuple[TensorKind, ...]) -> TensorDecl:
    shape = draw(shapes())
    dtype = draw(st.sampled_from(DTYPES))
    layouts: list[Layout] = ["contiguous"]
    if len(shape) >= 2 and shape[0] > 1 and shape[-1] > 1:
        layouts.append("transposed")
    if len(shape) >= 1:
        layouts.append("strided")
    return TensorDecl(name, shape, dtype, draw(st.sampled_from(kinds)), draw(st.sampled_from(layouts)))


@st.composite
def shared_decls(draw: st.DrawFn, taken: set[str], *, expanded: bool = False) -> SharedDecl:
    """Two or three views of one storage at distinct offsets (they may overlap).

    ``expanded`` also allows a stride-0 view (``expand()``), whose elements share memory.
    """
    dtype = draw(st.sampled_from(DTYPES))
    numel = draw(st.integers(4, 24))
    names = [n for n in TENSOR_NAMES if n not in taken]
    count = draw(st.integers(2, min(3, len(names))))
    offsets = draw(st.lists(st.integers(0, numel - 1), min_size=count, max_size=count, unique=True))
    views = []
    for name, offset in zip(names[:count], offsets):
        room = numel - offset
        shape: tuple[int, ...]
        stride: tuple[int, ...]
        if expanded and draw(st.booleans()):
            shape, stride = (draw(st.integers(2, 3)), draw(st.integers(1, room))), (0, 1)
        elif draw(st.booleans()) and room >= 4:
            # A transposed 2-d view: non-contiguous.
            rows = draw(st.integers(1, 2))
            cols = draw(st.integers(1, room // rows))
            shape, stride = (cols, rows), (1, cols)
        else:
            length = draw(st.integers(0, room))
            shape, stride = (length,), (1,)
        kind: Literal["parameter", "buffer"] = draw(st.sampled_from(["parameter", "buffer"]))
        views.append(ViewDecl(name, kind, offset, shape, stride))
    return SharedDecl(dtype, numel, tuple(views))


@st.composite
def raw_leaves(draw: st.DrawFn, *, persistent: bool = False, expanded: bool = False) -> RawLeafSpec:
    """A custom leaf with random raw tensors (and sometimes a shared storage)."""
    count = draw(st.integers(1 if persistent else 0, 3))
    names = draw(st.permutations(TENSOR_NAMES))[:count]
    kinds: tuple[TensorKind, ...] = ("parameter", "buffer", "non_persistent")
    decls = [draw(tensor_decls(n, kinds=kinds)) for n in names]
    if persistent:
        decls[0] = replace(decls[0], kind="parameter")
    shared = draw(shared_decls(set(names), expanded=expanded)) if len(names) <= 2 and draw(st.booleans()) else None
    return RawLeafSpec(draw(st.sampled_from(["RawLeaf", "OtherRawLeaf"])), tuple(decls), shared)


def _torch(cls: str, *args: Any, **kwargs: Any) -> TorchLeafSpec:
    return TorchLeafSpec(cls, args, tuple(sorted(kwargs.items())))


flag = st.booleans()
TORCH_LEAVES: dict[str, st.SearchStrategy[TorchLeafSpec]] = {
    "Linear": st.builds(lambda i, o, bias: _torch("Linear", i, o, bias=bias), small, small, flag),
    "Bilinear": st.builds(lambda i, j, o, bias: _torch("Bilinear", i, j, o, bias=bias), small, small, small, flag),
    "Conv1d": st.builds(lambda i, o, k, bias: _torch("Conv1d", i, o, k, bias=bias), small, small, small, flag),
    "Conv2d": st.builds(
        lambda i, o, k, bias: _torch("Conv2d", i, o, k, bias=bias), small, small, st.integers(1, 2), flag
    ),
    "Conv3d": st.builds(lambda i, o, bias: _torch("Conv3d", i, o, 1, bias=bias), small, small, flag),
    "ConvTranspose2d": st.builds(
        lambda i, o, k, bias: _torch("ConvTranspose2d", i, o, k, bias=bias), small, small, st.integers(1, 2), flag
    ),
    "Embedding": st.builds(lambda n, d: _torch("Embedding", n, d), st.integers(1, 5), small),
    "EmbeddingBag": st.builds(lambda n, d: _torch("EmbeddingBag", n, d, mode="mean"), st.integers(1, 5), small),
    "LayerNorm": st.builds(
        lambda shape, affine, bias: _torch("LayerNorm", shape, elementwise_affine=affine, bias=bias),
        st.lists(small, min_size=1, max_size=2).map(tuple),
        flag,
        flag,
    ),
    "GroupNorm": st.builds(lambda g, k, affine: _torch("GroupNorm", g, g * k, affine=affine), small, small, flag),
    "BatchNorm1d": st.builds(
        lambda n, affine, track: _torch("BatchNorm1d", n, affine=affine, track_running_stats=track), small, flag, flag
    ),
    "BatchNorm2d": st.builds(
        lambda n, affine, track: _torch("BatchNorm2d", n, affine=affine, track_running_stats=track), small, flag, flag
    ),
    "RNN": st.builds(
        lambda i, h, n, bias, bi: _torch("RNN", i, h, n, bias=bias, bidirectional=bi),
        small,
        small,
        st.integers(1, 2),
        flag,
        flag,
    ),
    "LSTM": st.builds(
        lambda i, h, p, bias, bi: _torch("LSTM", i, h, 1, bias=bias, bidirectional=bi, proj_size=p),
        small,
        st.integers(2, 3),
        st.integers(0, 1),
        flag,
        flag,
    ),
    "GRU": st.builds(lambda i, h, bias: _torch("GRU", i, h, 1, bias=bias), small, small, flag),
    "MultiheadAttention": st.builds(
        lambda h, k, bias, kv, kdim: _torch(
            "MultiheadAttention", h * k, h, bias=bias, add_bias_kv=kv, kdim=kdim, vdim=kdim
        ),
        st.integers(1, 2),
        small,
        flag,
        flag,
        st.none() | small,
    ),
    "TransformerEncoderLayer": st.builds(
        lambda h, k, ff: _torch("TransformerEncoderLayer", h * k, h, ff, dropout=0.0), st.integers(1, 2), small, small
    ),
    "PReLU": st.builds(lambda n: _torch("PReLU", n), small),
}
# Classes with the same state dict: swapping one for another is a pure class difference.
SWAPS = {
    "Linear": "NonDynamicallyQuantizableLinear",
    "NonDynamicallyQuantizableLinear": "Linear",
    "BatchNorm1d": "BatchNorm2d",
    "BatchNorm2d": "BatchNorm1d",
    "RawLeaf": "OtherRawLeaf",
    "OtherRawLeaf": "RawLeaf",
}
# Leaves whose parameters must not be replaced by another module's (RNNs cache them).
NO_TIE_DST = ("RNN", "LSTM", "GRU")


def torch_leaves() -> st.SearchStrategy[TorchLeafSpec]:
    return st.one_of(*TORCH_LEAVES.values())


def leaves(*, expanded: bool = False) -> st.SearchStrategy[Node]:
    """Custom and torch leaves, half and half (one_of would flatten to 1 in 18 custom)."""
    raw = raw_leaves(expanded=expanded)
    return st.booleans().flatmap(lambda custom: raw if custom else torch_leaves())


def persistent_leaves() -> st.SearchStrategy[Node]:
    """Leaves that own at least one state-dict key."""
    return st.one_of(
        raw_leaves(persistent=True),
        st.sampled_from(["Linear", "Bilinear", "Embedding", "Conv1d", "PReLU", "GRU"]).flatmap(
            TORCH_LEAVES.__getitem__
        ),
    )


# -- strategies: trees and architectures ---------------------------------------------------------


@st.composite
def containers(draw: st.DrawFn, depth: int = 2, *, named: bool = False, expanded: bool = False) -> ContainerSpec:
    """A container of leaves and containers (``named``: a ModuleDict or Block at every level)."""
    kinds: list[Literal["Sequential", "ModuleList", "ModuleDict", "Block"]] = (
        ["ModuleDict", "Block"] if named else ["Sequential", "ModuleList", "ModuleDict", "Block"]
    )
    cls = draw(st.sampled_from(kinds))
    count = draw(st.integers(1, 3))
    leaf = leaves(expanded=expanded)
    child = leaf if depth <= 0 else st.one_of(leaf, leaf, containers(depth - 1, named=named, expanded=expanded))
    kids = [draw(child) for _ in range(count)]
    if count > 1 and draw(st.booleans()):
        # Stacked identical layers, as in real models: equal shapes to tie, twins to tell apart.
        kids[-1] = kids[0]
    if cls in INDEXED:
        names = [str(i) for i in range(count)]
    else:
        names = draw(st.lists(st.sampled_from(NAMES), min_size=count, max_size=count, unique=True))
    own: tuple[TensorDecl, ...] = ()
    if cls == "Block" and draw(st.booleans()):
        own = (draw(tensor_decls(draw(st.sampled_from(TENSOR_NAMES)), kinds=("parameter", "buffer"))),)
    return ContainerSpec(cls, tuple(zip(names, kids)), own)


def param_table(arch: Arch) -> dict[str, tuple[torch.dtype, tuple[int, ...], str]]:
    """Parameter key -> (dtype, shape, owner class name), built on the meta device (cheap)."""
    module = build(arch, meta=True)
    owners = dict(module.named_modules(remove_duplicate=False))
    return {
        key: (p.dtype, tuple(p.shape), type(owners[key.rpartition(".")[0]]).__name__)
        for key, p in module.named_parameters(remove_duplicate=False)
    }


def tie_candidates(arch: Arch) -> list[tuple[str, str]]:
    """Untied ``(dst, src)`` pairs of equal dtype and shape in different modules."""
    table = param_table(arch)
    busy = tied_keys(arch)
    free = sorted(k for k in table if k not in busy)
    pairs = []
    for dst in free:
        if table[dst][2] in NO_TIE_DST:
            continue
        for src in free:
            if src != dst and dst.rpartition(".")[0] != src.rpartition(".")[0] and table[dst][:2] == table[src][:2]:
                pairs.append((dst, src))
    return pairs


@st.composite
def architectures(draw: st.DrawFn, *, max_depth: int = 2, named: bool = False, expanded: bool = False) -> Arch:
    """A random module tree with up to two parameter ties (``expanded``: may hold stride-0 views)."""
    arch = Arch(draw(containers(draw(st.integers(0, max_depth)), named=named, expanded=expanded)))
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):
            arch = _with_tied_leaf(draw, arch)
            continue
        pairs = tie_candidates(arch)
        if pairs:
            arch = replace(arch, ties=(*arch.ties, draw(st.sampled_from(pairs))))
    return arch


def _with_tied_leaf(draw: st.DrawFn, arch: Arch) -> Arch:
    """Add a raw leaf to the root whose parameter is tied to an existing free parameter.

    Equal shapes are rare by chance, so ties are mostly made this way; the new leaf goes
    first or last, so the tie's stored key is sometimes the new one, sometimes the old.
    """
    table = param_table(arch)
    busy = tied_keys(arch)
    free = sorted(k for k in table if k not in busy)
    if not free:
        return arch
    src = draw(st.sampled_from(free))
    dtype, shape, _ = table[src]
    name = new_child_name(arch.root, draw)
    leaf = RawLeafSpec("RawLeaf", (TensorDecl("weight", shape, str(dtype).removeprefix("torch."), "parameter"),))
    first = arch.root.cls != "ModuleList" and draw(st.booleans())
    children = ((name, leaf), *arch.root.children) if first else (*arch.root.children, (name, leaf))
    return Arch(replace(arch.root, children=children), (*arch.ties, (f"{name}.weight", src)))


def has_data(module: nn.Module) -> bool:
    """Whether some state-dict tensor holds at least one byte."""
    return any(t.numel() > 0 for t in module.state_dict(keep_vars=True).values())


# -- mutations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """One deliberate architecture difference and what ``check`` must report for it.

    ``expected`` holds the ``(kind, key)`` pairs known from the description alone; for
    ``add``, ``rename`` and ``cast`` the caller completes them from the built modules, using
    ``path`` (the subtree concerned) and ``new_path`` (its name after a rename).
    """

    kind: str
    arch: Arch
    expected: frozenset[tuple[str, str]]
    path: str | None = None
    new_path: str | None = None
    pair: tuple[str, str] | None = None


def free_subtrees(arch: Arch, keys: list[str]) -> list[str]:
    """Non-root subtrees owning state-dict keys, none of them tied."""
    busy = tied_keys(arch)
    out = []
    for path, _ in iter_nodes(arch.root):
        under = keys_under(keys, path) if path else []
        if under and not any(k in busy for k in under):
            out.append(path)
    return out


def removable(arch: Arch, path: str) -> bool:
    """Whether dropping ``path`` renumbers no sibling (only the last of an indexed container)."""
    parent, _, name = path.rpartition(".")
    node = get_node(arch.root, parent)
    assert isinstance(node, ContainerSpec)
    return node.cls not in INDEXED or name == node.children[-1][0]


def drop_child(root: ContainerSpec, path: str) -> ContainerSpec:
    parent, _, name = path.rpartition(".")
    return edit(root, parent, lambda n: replace(n, children=tuple(c for c in n.children if c[0] != name)))


def add_child(root: ContainerSpec, parent: str, name: str, leaf: Node) -> ContainerSpec:
    return edit(root, parent, lambda n: replace(n, children=(*n.children, (name, leaf))))


def _rename(root: ContainerSpec, path: str, new: str) -> ContainerSpec:
    parent, _, name = path.rpartition(".")
    return edit(root, parent, lambda n: replace(n, children=tuple((new if k == name else k, c) for k, c in n.children)))


def new_child_name(container: ContainerSpec, draw: Callable[[st.SearchStrategy[str]], str]) -> str:
    """A child name the container does not use yet (the next index for indexed containers)."""
    if container.cls in INDEXED:
        return str(len(container.children))
    taken = {k for k, _ in container.children} | {d.name for d in container.own}
    free = [n for n in NAMES if n not in taken]
    return draw(st.sampled_from(free)) if free else f"extra{len(taken)}"


@st.composite
def mutations(draw: st.DrawFn, arch: Arch, keys: list[str]) -> Mutation:
    """One mutation of ``arch`` among those that apply, with its exact expected report.

    ``keys`` are the state-dict keys of ``arch``; expectations that depend on keys of the
    mutated architecture (``add``, ``rename``) are finished by the caller from its build.
    """
    options = []
    free = free_subtrees(arch, keys)
    if droppable := [p for p in free if removable(arch, p)]:
        options.append("drop")
    options.append("add")
    renamable = [p for p in free if get_node(arch.root, p.rpartition(".")[0]).cls not in INDEXED]
    if renamable:
        options.append("rename")
    busy = tied_keys(arch)
    plain = [
        (path, d)
        for path, node in iter_nodes(arch.root)
        if isinstance(node, RawLeafSpec)
        for d in node.tensors
        if d.kind != "non_persistent" and f"{path}.{d.name}" not in busy
    ]
    if plain:
        options += ["reshape", "retype"]
    castable = [
        path
        for path, node in iter_nodes(arch.root)
        if isinstance(node, TorchLeafSpec)
        and node.dtype is None
        and keys_under(keys, path)
        and not any(k in busy for k in keys_under(keys, path))
    ]
    if castable:
        options.append("cast")
    swappable = [
        path
        for path, node in iter_nodes(arch.root)
        if isinstance(node, (RawLeafSpec, TorchLeafSpec)) and node.cls in SWAPS and _owns_direct(keys, path)
    ]
    if swappable:
        options.append("swap")
    if tie_candidates(arch):
        options.append("tie")
    if arch.ties:
        options.append("untie")
    # Hypothesis leans to the first option: put the ones that are rarely applicable first.
    order = ["tie", "untie", "reshape", "retype", "swap", "cast", "rename", "add", "drop"]
    kind = draw(st.sampled_from(sorted(options, key=order.index)))

    if kind == "drop":
        path = draw(st.sampled_from(droppable))
        expected = {("unexpected", k) for k in keys_under(keys, path)}
        return Mutation(kind, replace(arch, root=drop_child(arch.root, path)), frozenset(expected), path)
    if kind == "add":
        parents = [p for p, n in iter_nodes(arch.root) if isinstance(n, ContainerSpec)]
        parent = draw(st.sampled_from(parents))
        container = get_node(arch.root, parent)
        assert isinstance(container, ContainerSpec)
        name = new_child_name(container, draw)
        path = f"{parent}.{name}" if parent else name
        leaf = draw(persistent_leaves())
        # "missing" keys are known after building; the caller fills them in.
        return Mutation(kind, replace(arch, root=add_child(arch.root, parent, name, leaf)), frozenset(), path)
    if kind == "rename":
        path = draw(st.sampled_from(renamable))
        parent = path.rpartition(".")[0]
        container = get_node(arch.root, parent)
        assert isinstance(container, ContainerSpec)
        new = new_child_name(container, draw)
        new_path = f"{parent}.{new}" if parent else new
        return Mutation(kind, replace(arch, root=_rename(arch.root, path, new)), frozenset(), path, new_path)
    if kind in ("reshape", "retype"):
        path, decl = draw(st.sampled_from(plain))
        if kind == "reshape":
            shape = draw(shapes().filter(lambda s: s != decl.shape))
            layout: Layout = "contiguous"
            changed = replace(decl, shape=shape, layout=layout)
        else:
            changed = replace(decl, dtype=draw(st.sampled_from([d for d in DTYPES if d != decl.dtype])))
        root = edit(
            arch.root,
            path,
            lambda n: replace(n, tensors=tuple(changed if d.name == decl.name else d for d in n.tensors)),
        )
        problem = "shape" if kind == "reshape" else "dtype"
        return Mutation(kind, replace(arch, root=root), frozenset({(problem, f"{path}.{decl.name}")}))
    if kind == "cast":
        path = draw(st.sampled_from(castable))
        dtype = draw(st.sampled_from(FLOAT_CASTS))
        root = edit(arch.root, path, lambda n: replace(n, dtype=dtype))
        # Only floating tensors are cast by Module.to; the caller checks which keys changed.
        return Mutation(kind, replace(arch, root=root), frozenset(), path)
    if kind == "swap":
        path = draw(st.sampled_from(swappable))
        root = edit(arch.root, path, lambda n: replace(n, cls=SWAPS[n.cls]))
        return Mutation(kind, replace(arch, root=root), frozenset({("class", path)}))
    if kind == "tie":
        dst, src = draw(st.sampled_from(tie_candidates(arch)))
        # Which key of the pair is reported depends on the state-dict order: the caller knows it.
        return Mutation(kind, replace(arch, ties=(*arch.ties, (dst, src))), frozenset(), pair=(dst, src))
    assert kind == "untie"
    pair = draw(st.sampled_from(arch.ties))
    ties = tuple(t for t in arch.ties if t != pair)
    return Mutation(kind, replace(arch, ties=ties), frozenset(), pair=pair)


def _owns_direct(keys: list[str], path: str) -> bool:
    return any(k.rpartition(".")[0] == path for k in keys)


# -- renamings (remap property) -----------------------------------------------------------------


@dataclass(frozen=True)
class Renaming:
    """A checkpoint architecture and a module architecture whose keys differ by ``rename``."""

    kind: str
    saved: Arch
    loaded: Arch
    pattern: str
    replacement: str

    def rename(self, key: str) -> str:
        """The module key that holds checkpoint key ``key``."""
        return re.sub(self.pattern, self.replacement, key)


def _wrap(arch: Arch, name: str) -> Arch:
    ties = tuple((f"{name}.{d}", f"{name}.{s}") for d, s in arch.ties)
    return Arch(ContainerSpec("Block", ((name, arch.root),)), ties)


@st.composite
def renamings(draw: st.DrawFn) -> Renaming:
    """A consistent renaming: a prefix added, removed or swapped, or a child renamed everywhere."""
    kind = draw(st.sampled_from(["add_prefix", "strip_prefix", "swap_prefix", "rename_all", "rename_all"]))
    arch = draw(architectures(named=kind == "rename_all" and draw(st.booleans())))
    wrapper = draw(st.sampled_from(["module", "model", "backbone", "net"]))
    if kind == "add_prefix":
        return Renaming(kind, _wrap(arch, wrapper), arch, "^" + re.escape(wrapper + "."), "")
    if kind == "strip_prefix":
        return Renaming(kind, arch, _wrap(arch, wrapper), "^", wrapper + ".")
    if kind == "swap_prefix":
        other = draw(st.sampled_from([w for w in ("module", "model", "backbone", "net") if w != wrapper]))
        return Renaming(kind, _wrap(arch, wrapper), _wrap(arch, other), "^" + re.escape(wrapper + "."), other + ".")
    # Rename one child name N -> M in every named container that has it (a refactoring).
    named = sorted(
        {
            k
            for _, n in iter_nodes(arch.root)
            if isinstance(n, ContainerSpec) and n.cls not in INDEXED
            for k, _ in n.children
        }
    )
    assume(named)
    old = draw(st.sampled_from(named))
    used = {k for _, n in iter_nodes(arch.root) if isinstance(n, ContainerSpec) for k, _ in n.children}
    new = draw(st.sampled_from([n for n in NAMES if n not in used] or ["renamed"]))
    root = arch.root

    def rename_in(node: Node) -> Node:
        if not isinstance(node, ContainerSpec):
            return node
        kids = tuple((new if (k == old and node.cls not in INDEXED) else k, rename_in(c)) for k, c in node.children)
        return replace(node, children=kids)

    pattern = r"(^|(?<=\.))" + re.escape(old) + r"(?=\.)"
    # Ties follow the rename (their keys are state-dict keys of the renamed modules).
    loaded_root = rename_in(root)
    assert isinstance(loaded_root, ContainerSpec)
    loaded = Arch(loaded_root, tuple((_sub(pattern, new, d), _sub(pattern, new, s)) for d, s in arch.ties))
    return Renaming(kind, arch, loaded, pattern, new)


def _sub(pattern: str, replacement: str, key: str) -> str:
    return re.sub(pattern, replacement, key)


# -- manifest.json mutations (corruption property) ----------------------------------------------

HOSTILE_STRINGS = (
    "",
    ".",
    "..",
    "../weights.safetensors",
    "../../etc/passwd",
    "/etc/passwd",
    "a/../../b.safetensors",
    "weights/./x.safetensors",
    "C:\\weights.safetensors",
    "weights\x00.safetensors",
    "manifest.json",
    "sha256:" + "0" * 64,
    "0" * 64,
    "float32",
    "bool",
    "complex128",
    "1.0.0",
    "1.9.0",
    "2.0.0",
    "manifest-ckpt",
    "x" * 300,  # longer than any relpath may be
)
HUGE_INTS = (2**31, 2**32 + 1, 2**53 - 1, 2**53, 2**62, 2**63, 2**64 + 7, 10**30, -1, -(2**63))

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70),
    st.sampled_from(HUGE_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(HOSTILE_STRINGS),
)
json_values = st.recursive(
    json_leaves,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=6,
)

JsonPath = tuple[str | int, ...]


def json_paths(doc: Any, at: JsonPath = ()) -> Iterator[JsonPath]:
    """Every node below the root of a JSON document, as a path of keys and indices."""
    items: Any = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield (*at, k)
        yield from json_paths(v, (*at, k))


def _parent(doc: Any, path: JsonPath) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


def rename_file(doc: dict[str, Any], old: str, new: str) -> None:
    """Rename a weights file in ``files`` and in every tensor (and chunk) that points at it."""
    if isinstance(doc.get("files"), dict):
        doc["files"] = {new if k == old else k: v for k, v in doc["files"].items()}
    tensors = doc.get("tensors")
    for t in tensors.values() if isinstance(tensors, dict) else ():
        chunks = t.get("chunks") if isinstance(t, dict) else None
        for piece in [t, *(chunks if isinstance(chunks, list) else [])]:
            if isinstance(piece, dict) and piece.get("file") == old:
                piece["file"] = new


@st.composite
def manifest_mutations(draw: st.DrawFn, doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """One to three random edits of a (deep-copied) manifest document, and their descriptions."""
    import copy

    doc = copy.deepcopy(doc)
    done = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(
            st.sampled_from(
                [
                    "replace",
                    "replace",
                    "delete",
                    "add",
                    "rename_key",
                    "number",
                    "integral_float",
                    "file_name",
                    "huge_shape",
                    "swap_ranges",
                ]
            )
        )
        paths = list(json_paths(doc))
        if op == "file_name" and isinstance(doc.get("files"), dict) and doc["files"]:
            old = draw(st.sampled_from(sorted(doc["files"])))
            new = draw(st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=12))
            rename_file(doc, old, new)
            done.append(f"file_name: {old!r} -> {new!r}")
        elif op == "huge_shape" and isinstance(doc.get("tensors"), dict) and doc["tensors"]:
            key = draw(st.sampled_from(sorted(doc["tensors"])))
            entry = doc["tensors"][key]
            if not isinstance(entry, dict):
                continue
            dims = draw(st.lists(st.sampled_from(HUGE_INTS[:7]) | st.integers(0, 3), min_size=1, max_size=4))
            entry["shape"] = dims
            start = entry.get("byte_range", [None])[0] if isinstance(entry.get("byte_range"), list) else None
            if draw(st.booleans()) and type(start) is int:
                # Make the byte range agree with the huge shape, as a careful forger would.
                count = 1
                for d in dims:
                    count *= d
                entry["byte_range"] = [start, start + 4 * count]
            done.append(f"huge_shape: {key!r} {dims}")
        elif op == "swap_ranges" and isinstance(doc.get("tensors"), dict) and len(doc["tensors"]) >= 2:
            a, b = draw(st.lists(st.sampled_from(sorted(doc["tensors"])), min_size=2, max_size=2, unique=True))
            ta, tb = doc["tensors"][a], doc["tensors"][b]
            if not (isinstance(ta, dict) and isinstance(tb, dict)):
                continue
            for field in ("file", "byte_range"):
                if field in ta and field in tb:
                    ta[field], tb[field] = tb[field], ta[field]
            done.append(f"swap_ranges: {a!r} and {b!r}")
        elif op == "add":
            containers = [p for p in [(), *paths] if isinstance(_get(doc, p), (dict, list))]
            where = draw(st.sampled_from(containers))
            node = _get(doc, where)
            value = draw(json_values)
            if isinstance(node, dict):
                name = draw(
                    st.sampled_from(["extra", "chunks", "file", "byte_range", "extensions", "metadata"])
                    | st.text(max_size=8)
                )
                node[name] = value
                done.append(f"add: {name!r} at {list(where)}")
            else:
                node.append(value)
                done.append(f"add: item to {list(where)}")
        elif paths:
            if op in ("number", "integral_float"):
                paths = [p for p in paths if type(_get(doc, p)) is int] or paths
            where = draw(st.sampled_from(paths))
            parent = _parent(doc, where)
            if op == "replace":
                parent[where[-1]] = draw(json_values)
            elif op == "delete":
                del parent[where[-1]]
            elif op == "rename_key" and isinstance(parent, dict):
                new_key = draw(st.text(max_size=10) | st.sampled_from(HOSTILE_STRINGS))
                parent[new_key] = parent.pop(where[-1])
            elif op == "number" and type(parent[where[-1]]) is int:
                parent[where[-1]] += draw(st.sampled_from([-1, 1, 2, 8, -8, 2**40]))
            elif op == "integral_float" and type(parent[where[-1]]) is int:
                # JSON Schema counts 8.0 as an integer: the reader must still not use it as an index.
                parent[where[-1]] = float(parent[where[-1]])
            else:
                continue
            done.append(f"{op}: at {list(where)}")
    return doc, done


def _get(doc: Any, path: JsonPath) -> Any:
    for part in path:
        doc = doc[part]
    return doc
