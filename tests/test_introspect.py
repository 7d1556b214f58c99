"""Tests of ``manifest_ckpt.comparison.introspect``: keys, ties, the module tree and what cannot be stored."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from manifest_ckpt.comparison.compare import TensorSpec
from manifest_ckpt.comparison.introspect import capture, class_name, dtype_name, find_aliases
from manifest_ckpt.errors import InvalidKeyError, ManifestCkptError, UnsupportedTensorError
from manifest_ckpt.format.manifest import ModuleEntry
from tests.property.strategies import DTYPES

LINEAR = "torch.nn.modules.linear.Linear"


class Gpt2Like(nn.Module):
    """GPT-2's layout: transformer.wte tied to lm_head, declared after it."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(10, 4), "ln_f": nn.LayerNorm(4)})
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.transformer["wte"].weight


class T5Like(nn.Module):
    """T5's three tied embeddings: shared, encoder.embed_tokens, decoder.embed_tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(6, 2)
        self.encoder = nn.Module()
        self.encoder.embed_tokens = self.shared
        self.decoder = nn.Module()
        self.decoder.embed_tokens = self.shared


class WithBuffers(nn.Module):
    """A BatchNorm, a persistent buffer, a non-persistent buffer and a None buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mask", torch.ones(4, 4).tril().bool(), persistent=False)
        self.register_buffer("unused", None)


class Versioned(nn.Module):
    """A module that declares its own state-dict version."""

    _version = 7

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


# -- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory", [Gpt2Like, T5Like, WithBuffers, lambda: nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))]
)
def test_keys_equal_state_dict_keys_in_order(factory: Any) -> None:
    """capture() holds exactly the state_dict() keys, in the same order, tied keys included."""
    model = factory()
    state = capture(model)
    assert list(state.tensors) == list(model.state_dict())
    for key, tensor in model.state_dict(keep_vars=True).items():
        assert state.tensors[key] is tensor


def test_module_tree_declares_exactly_the_stored_keys() -> None:
    """Every module's parameters and persistent buffers, joined to its path, are the state-dict keys."""
    model = WithBuffers()
    modules = capture(model).modules
    assert modules is not None
    declared = [f"{p}.{n}" if p else n for p, m in modules.items() for n in m.persistent_names()]
    assert sorted(declared) == sorted(model.state_dict())


# -- ties ---------------------------------------------------------------------------------------


def test_gpt2_tie_makes_the_later_key_an_alias_of_the_first() -> None:
    """lm_head.weight (later in the state dict) is recorded as an alias of transformer.wte.weight."""
    state = capture(Gpt2Like())
    assert state.aliases == {"lm_head.weight": "transformer.wte.weight"}


def test_three_way_tie_points_every_partner_at_the_first_key() -> None:
    """T5's three tied keys become two aliases of the first one."""
    state = capture(T5Like())
    assert state.aliases == {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }


def test_shared_submodule_aliases_each_tensor_and_appears_at_both_paths() -> None:
    """One Linear registered at two paths gives aliases for its weight and bias, and two tree entries."""
    model = nn.Module()
    shared = nn.Linear(2, 2)
    model.a = shared
    model.b = shared
    state = capture(model)
    assert list(state.tensors) == ["a.weight", "a.bias", "b.weight", "b.bias"]
    assert state.aliases == {"b.weight": "a.weight", "b.bias": "a.bias"}
    assert state.modules is not None
    assert state.modules["a"] == state.modules["b"] == ModuleEntry(LINEAR, 1, ("weight", "bias"))
    assert state.owners["a"] is state.owners["b"] is shared


def test_views_of_one_storage_are_tied_only_when_identical() -> None:
    """Same storage, offset, shape, stride and dtype is a tie; another slice or dtype of the storage is not."""
    base = torch.arange(8, dtype=torch.float32)
    tensors = {
        "a": base,
        "same": base.view(8),
        "slice": base[2:6],
        "bytes": base.view(torch.int32),
        "reshaped": base.view(2, 4),
    }
    assert find_aliases(tensors) == {"same": "a"}


def test_equal_values_in_separate_tensors_are_not_tied() -> None:
    """Two tensors with equal values but separate storage are not aliases."""
    assert capture({"a": torch.zeros(3), "b": torch.zeros(3)}).aliases == {}


def test_empty_tensors_are_tied_only_by_identity() -> None:
    """Zero-size tensors have no meaningful address: distinct ones are not tied, the same object is."""
    e = torch.empty(0, 3)
    assert find_aliases({"x": torch.empty(0, 3), "y": torch.empty(0, 3)}) == {}
    assert find_aliases({"x": e, "y": e}) == {"y": "x"}


# -- buffers and versions ---------------------------------------------------------------------


def test_non_persistent_buffers_are_listed_in_the_tree_but_not_captured() -> None:
    """A non-persistent buffer is not a captured tensor but is named in its module's entry; None buffers are skipped."""
    state = capture(WithBuffers())
    assert "mask" not in state.tensors and "unused" not in state.tensors
    assert state.modules is not None
    assert state.modules[""] == ModuleEntry(
        f"{__name__}.WithBuffers", 1, parameters=(), buffers=("steps",), non_persistent_buffers=("mask",)
    )


def test_batchnorm_version_and_buffers_are_recorded() -> None:
    """BatchNorm has _version 2 and its three running buffers; Linear has 1; a custom _version is kept."""
    state = capture(WithBuffers())
    assert state.modules is not None
    assert state.modules["bn"] == ModuleEntry(
        "torch.nn.modules.batchnorm.BatchNorm1d",
        2,
        parameters=("weight", "bias"),
        buffers=("running_mean", "running_var", "num_batches_tracked"),
    )
    assert state.tensors["bn.num_batches_tracked"].dtype == torch.int64
    assert capture(nn.Linear(1, 1)).modules == {"": ModuleEntry(LINEAR, 1, ("weight", "bias"))}
    versioned = capture(Versioned()).modules
    assert versioned is not None and versioned[""].version == 7


def test_non_integer_version_is_recorded_as_null() -> None:
    """A _version that is not an int (or is a bool) is recorded as None rather than written as garbage."""
    for bad in ("2", True, 1.5):
        model = nn.Linear(1, 1)
        model._version = bad  # type: ignore[assignment]
        modules = capture(model).modules
        assert modules is not None and modules[""].version is None


def test_class_names_are_fully_qualified() -> None:
    """Classes are recorded as module.qualname, nested classes included."""
    assert class_name(nn.Linear(1, 1)) == LINEAR
    modules = capture(Gpt2Like()).modules
    assert modules is not None
    assert modules[""].cls == f"{__name__}.Gpt2Like"
    assert modules["transformer"].cls == "torch.nn.modules.container.ModuleDict"
    assert modules["transformer.ln_f"].cls == "torch.nn.modules.normalization.LayerNorm"


def test_spec_has_dtypes_shapes_owners_and_classes() -> None:
    """spec() reduces the capture to dtype names, shapes, owner paths, aliases and classes."""
    spec = capture(Gpt2Like()).spec()
    assert spec.tensors["transformer.wte.weight"] == TensorSpec("float32", (10, 4), "transformer.wte")
    assert spec.tensors["lm_head.weight"] == TensorSpec("float32", (10, 4), "lm_head")
    assert spec.aliases == {"lm_head.weight": "transformer.wte.weight"}
    assert spec.classes is not None and spec.classes["lm_head"] == LINEAR


# -- meta modules --------------------------------------------------------------------------------


def test_meta_module_is_captured_with_its_ties() -> None:
    """A module built on the meta device is captured like a real one: keys, tree and ties by identity."""
    with torch.device("meta"):
        model = Gpt2Like()
    state = capture(model)
    assert list(state.tensors) == list(model.state_dict())
    assert all(t.is_meta for t in state.tensors.values())
    assert state.aliases == {"lm_head.weight": "transformer.wte.weight"}
    assert state.spec().tensors["transformer.ln_f.weight"] == TensorSpec("float32", (4,), "transformer.ln_f")


def test_separate_meta_tensors_are_not_tied() -> None:
    """Meta tensors share no address, so separate ones are never mistaken for a tie."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert capture(model).aliases == {}


# -- plain state dicts --------------------------------------------------------------------------


def test_plain_state_dict_has_no_module_tree() -> None:
    """A mapping of tensors is captured with modules None, no owners, and ties still found."""
    w = torch.ones(2, 2)
    state = capture({"a.weight": w, "b.weight": w, "step": torch.tensor(3)})
    assert state.modules is None and state.owners == {}
    assert state.aliases == {"b.weight": "a.weight"}
    assert state.spec().classes is None
    assert state.spec().tensors["step"] == TensorSpec("int64", (), "")


def test_state_dict_from_a_model_round_trips_its_keys() -> None:
    """capture(model.state_dict()) sees the same keys and ties as capture(model), without classes."""
    model = Gpt2Like()
    from_dict = capture(model.state_dict())
    from_module = capture(model)
    assert list(from_dict.tensors) == list(from_module.tensors)
    assert from_dict.aliases == from_module.aliases


# -- state-dict hooks -----------------------------------------------------------------------------


def test_state_dict_hook_keys_are_declared_in_the_tree() -> None:
    """Keys renamed or added by a state-dict hook are declared by the tree, so the manifest stays consistent (regression)."""
    model = nn.Linear(2, 2)

    def hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        state[prefix + "renamed"] = state.pop(prefix + "weight")
        state["extra.scale"] = torch.ones(1)

    model._register_state_dict_hook(hook)
    state = capture(model)
    assert list(state.tensors) == ["bias", "renamed", "extra.scale"]
    assert state.modules == {
        "": ModuleEntry(LINEAR, 1, parameters=("bias",), buffers=("renamed",)),
        "extra": ModuleEntry(None, None, buffers=("scale",)),
    }


# -- what cannot be stored ----------------------------------------------------------------------


def test_non_tensor_state_is_refused_naming_the_key() -> None:
    """A module's extra state (a dict) is refused with UnsupportedTensorError naming its key and the fix."""

    class WithExtra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(1, 1)

        def get_extra_state(self) -> Any:
            return {"step": 1}

        def set_extra_state(self, state: Any) -> None:
            pass

    with pytest.raises(UnsupportedTensorError) as info:
        capture(WithExtra())
    assert str(info.value).startswith("state dict entry '_extra_state' is a dict, not a tensor")
    assert "save(..., metadata=...)" in str(info.value)
    with pytest.raises(UnsupportedTensorError, match="'n' is a int, not a tensor"):
        capture({"n": 3})


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex32])
def test_unsupported_dtype_is_refused_naming_the_key(dtype: torch.dtype) -> None:
    """A dtype safetensors cannot store is refused naming the key, the dtype and the supported list."""
    with pytest.raises(UnsupportedTensorError) as info:
        capture({"z": torch.zeros(2, dtype=dtype)})
    assert str(info.value).startswith(f"tensor 'z' has dtype {dtype}, which safetensors cannot store; supported: bool,")


def test_every_supported_dtype_is_named() -> None:
    """dtype_name gives the manifest name of every dtype safetensors stores."""
    for name in DTYPES:
        assert dtype_name(torch.zeros(1, dtype=getattr(torch, name)), "k") == name


def test_sparse_tensor_is_refused() -> None:
    """A sparse tensor is refused with the advice to call .to_dense()."""
    with pytest.raises(
        UnsupportedTensorError,
        match=r"tensor 's' has layout torch.sparse_coo; only dense tensors are stored\. Call \.to_dense\(\)",
    ):
        capture({"s": torch.eye(2).to_sparse()})


def test_quantized_tensor_is_refused() -> None:
    """A quantized tensor is refused as not dense, with the advice to dequantize."""
    # torch warns once per process that quantized creation is deprecated; whether this test
    # is the first to ask depends on test order, so the warning is ignored, not asserted.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    with pytest.raises(UnsupportedTensorError, match=r"tensor 'q' has layout .* \(quantized\)"):
        capture({"q": q})


@pytest.mark.parametrize("key", ["", 3, None])
def test_keys_must_be_non_empty_strings(key: Any) -> None:
    """An empty or non-string key is refused as an InvalidKeyError naming it."""
    with pytest.raises(InvalidKeyError, match=f"state dict key {re.escape(repr(key))} is not a non-empty string"):
        capture({key: torch.zeros(1)})


@pytest.mark.parametrize("obj", [[torch.zeros(1)], torch.zeros(1), "model", None])
def test_neither_module_nor_mapping_is_a_type_error(obj: Any) -> None:
    """Anything that is not an nn.Module or a mapping raises TypeError naming its type."""
    with pytest.raises(TypeError, match=f"got {type(obj).__name__}$"):
        capture(obj)


def test_unsupported_tensor_error_is_in_the_family() -> None:
    """UnsupportedTensorError is a ManifestCkptError and a TypeError."""
    assert issubclass(UnsupportedTensorError, ManifestCkptError)
    assert issubclass(UnsupportedTensorError, TypeError)


class _Scratch(nn.Module):
    """A persistent and a non-persistent buffer, a None parameter and a None buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kept", torch.ones(2))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.register_buffer("absent", None)
        self.register_parameter("unset", None)
        self.w = nn.Parameter(torch.ones(3))


def _shared() -> nn.Module:
    block = nn.Linear(2, 2)
    return nn.Sequential(block, nn.ReLU(), block, nn.Linear(2, 2, bias=False))


def _deep_with_gaps() -> nn.Module:
    """Five levels, several children a level, a None child in between (named_modules skips it)."""
    module: nn.Module = nn.Linear(2, 2)
    for depth in range(5):
        level = nn.ModuleDict({"b": module, "a": nn.Sequential(nn.Linear(1, 1), nn.ReLU())})
        level.register_module("gap", None)
        level.add_module(f"z{depth}", nn.LayerNorm(2))
        module = level
    return module


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ModuleDict({"a": _Scratch()})),
        _shared,
        Gpt2Like,
        lambda: nn.TransformerEncoderLayer(8, 2, 16),
        _deep_with_gaps,
    ],
    ids=["nested", "shared-submodule", "tied", "transformer", "deep-with-gaps"],
)
def test_walk_gives_what_state_dict_and_module_tree_give(make: Any) -> None:
    """One traversal gives state_dict(keep_vars=True)'s keys in order with the same tensor objects, and the tree."""
    from manifest_ckpt.comparison.introspect import _walk, module_tree

    module = make()
    walked = _walk(module)
    assert walked is not None
    state, owners, tree = walked
    reference = module.state_dict(keep_vars=True)
    assert list(state) == list(reference)
    assert all(state[k] is reference[k] for k in reference)
    assert list(owners.items()) == list(module.named_modules(remove_duplicate=False))
    assert list(tree.items()) == list(module_tree(module).items())


class _WithExtra(nn.Linear):
    def get_extra_state(self) -> Any:
        return {"step": 1}

    def set_extra_state(self, state: Any) -> None:
        pass


class _OwnModules(nn.Sequential):
    def named_modules(self, *args: Any, **kwargs: Any) -> Any:
        return super().named_modules(*args, **kwargs)


def _hooked() -> nn.Module:
    module = nn.Sequential(nn.Linear(2, 2))
    module[0].register_state_dict_post_hook(lambda m, sd, prefix, local: None)
    return module


@pytest.mark.parametrize(
    "make",
    [
        _hooked,
        lambda: nn.Sequential(_WithExtra(2, 2)),
        lambda: nn.Sequential(nn.LazyLinear(2)),
        lambda: nn.Sequential(_OwnModules(nn.Linear(2, 2))),
    ],
    ids=["state-dict-hook", "extra-state", "lazy", "own-named-modules"],
)
def test_walk_leaves_modules_that_change_their_state_dict_to_torch(make: Any) -> None:
    """A state-dict hook, extra state or a lazy module: no walk, capture asks state_dict (and still agrees)."""
    from manifest_ckpt.comparison.introspect import _walk

    module = make()
    assert _walk(module) is None
    live = capture(module, extra_state=True)
    assert set(live.tensors) | set(live.extra) == set(module.state_dict(keep_vars=True))


def test_a_module_holding_itself_is_left_to_torch() -> None:
    """A module cycle: the walk stops at the recursion limit and capture raises torch's RecursionError."""
    from manifest_ckpt.comparison.introspect import _walk

    module = nn.Sequential(nn.Linear(2, 2))
    module.add_module("again", module)
    assert _walk(module) is None
    with pytest.raises(RecursionError):
        capture(module)
