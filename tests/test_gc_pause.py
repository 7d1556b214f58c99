"""Tests of ``manifest_ckpt.gc_pause``: the collector is paused, resumed, and still finds cycles."""

from __future__ import annotations

import gc
import weakref

import pytest

from manifest_ckpt.gc_pause import gc_paused


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_paused_inside_resumed_after_and_nested_pauses_resume_once() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # only the outermost resumes it
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_resumed_after_an_exception() -> None:
    with pytest.raises(ValueError), gc_paused():
        raise ValueError("boom")
    assert gc.isenabled()


def test_cyclic_garbage_made_while_paused_is_still_collected() -> None:
    """Promoted to the oldest generation, not frozen: a full collection frees it."""
    with gc_paused():
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        alive = weakref.ref(a)
        del a, b
    assert gc.get_freeze_count() == 0
    assert alive() is not None  # a cycle: only the collector frees it
    gc.collect()
    assert alive() is None
