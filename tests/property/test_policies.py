"""Property 6: allowed missing keys keep their values; allowed unexpected keys are skipped."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

import manifest_ckpt as mc

from .strategies import (
    INDEXED,
    Arch,
    ContainerSpec,
    add_child,
    architectures,
    build,
    drop_child,
    free_subtrees,
    get_node,
    iter_nodes,
    new_child_name,
    non_persistent,
    persistent_leaves,
    record_example,
    removable,
    scratch,
    seeds,
    snapshot,
    state_bytes,
)


def _under(path: str) -> str:
    return re.escape(path) + r"\..*"


@given(data=st.data(), arch=architectures(), seed=seeds(), strict=st.booleans())
def test_allowed_differences_are_listed_and_left_alone(
    data: st.DataObject, arch: Arch, seed: int, strict: bool, tmp_path_factory: Any
) -> None:
    """A dropped subtree (allowed unexpected) is skipped, an added leaf (allowed missing) keeps its values."""
    source = build(arch, seed=seed)
    keys = list(source.state_dict(keep_vars=True))

    # Drop one subtree (if one can go without renumbering or untying) and/or add a leaf.
    droppable = [p for p in free_subtrees(arch, keys) if removable(arch, p)]
    dropped = data.draw(st.sampled_from([None, *droppable, *droppable]), label="dropped")
    root = arch.root if dropped is None else drop_child(arch.root, dropped)
    # An indexed container would give the added leaf the index just dropped.
    gap = None if dropped is None else dropped.rpartition(".")[0]
    parents = [p for p, n in iter_nodes(root) if isinstance(n, ContainerSpec) and not (p == gap and n.cls in INDEXED)]
    added = None
    if parents and (dropped is None or data.draw(st.booleans(), label="add too")):
        parent = data.draw(st.sampled_from(parents), label="parent")
        container = get_node(root, parent)
        assert isinstance(container, ContainerSpec)
        name = new_child_name(container, data.draw)
        added = f"{parent}.{name}" if parent else name
        assume(added != dropped)  # the same path again would be a replacement, not an addition
        root = add_child(root, parent, name, data.draw(persistent_leaves(), label="leaf"))
    changed = replace(arch, root=root)
    event(f"dropped a subtree: {dropped is not None}; added a leaf: {added is not None}")

    target = build(changed, seed=seed, invert=True)
    target_keys = list(target.state_dict(keep_vars=True))
    missing = sorted(k for k in target_keys if added is not None and k.startswith(added + "."))
    unexpected = sorted(k for k in keys if dropped is not None and k.startswith(dropped + "."))
    assert missing or unexpected
    assert sorted(set(keys) - set(target_keys)) == unexpected
    assert sorted(set(target_keys) - set(keys)) == missing

    with scratch(tmp_path_factory) as tmp:
        path = tmp / "ckpt"
        mc.save(source, path, record_code=False)
        before = snapshot(target)
        untouched = non_persistent(target)
        initial = state_bytes(target)

        # Allowing only the missing keys still refuses the unexpected ones, changing nothing.
        allow_missing = [] if added is None else [_under(added)]
        allow_unexpected = [] if dropped is None else [_under(dropped)]
        if unexpected:
            with pytest.raises(mc.ModelMismatchError) as caught:
                mc.load(target, path, allow_missing=allow_missing)
            assert [(p.kind, p.key) for p in caught.value.report.problems] == [("unexpected", k) for k in unexpected]
            assert snapshot(target) == before
        # And allowing only the unexpected ones refuses the missing ones.
        if missing:
            with pytest.raises(mc.ModelMismatchError) as caught:
                mc.load(target, path, allow_unexpected=allow_unexpected)
            assert [(p.kind, p.key) for p in caught.value.report.problems] == [("missing", k) for k in missing]
            assert snapshot(target) == before

        if strict:
            result = mc.load(target, path, allow_missing=allow_missing, allow_unexpected=allow_unexpected)
        else:
            result = mc.load(target, path, strict=False)
    assert result.left_initial == missing
    assert result.skipped == unexpected
    assert result.loaded == sorted(set(target_keys) - set(missing))
    loaded, saved = state_bytes(target), state_bytes(source)
    for key in target_keys:
        assert loaded[key] == (initial[key] if key in missing else saved[key]), key
    assert non_persistent(target) == untouched
    record_example()
