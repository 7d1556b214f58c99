"""Property 5a: any flipped byte or truncation of a weights file is caught, and load refuses it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

import manifest_ckpt as mc

from .strategies import Arch, architectures, build, has_data, record_example, scratch, seeds, snapshot

CAUGHT = (mc.IntegrityError, mc.ManifestError)


@given(
    data=st.data(),
    arch=architectures(),
    seed=seeds(),
    max_file_size=st.none() | st.integers(1, 256),
)
def test_flipped_byte_and_truncation_are_caught(
    data: st.DataObject, arch: Arch, seed: int, max_file_size: int | None, tmp_path_factory: Any
) -> None:
    """verify and load(verify_digests=True) refuse a flipped byte anywhere and a cut at any offset."""
    source = build(arch, seed=seed)
    assume(has_data(source))
    target = build(arch, seed=seed, invert=True)
    before = snapshot(target)
    with scratch(tmp_path_factory) as tmp:
        path = tmp / "ckpt"
        manifest = mc.save(source, path, max_file_size=max_file_size, record_code=False)
        name = data.draw(st.sampled_from(sorted(manifest.files)), label="file")
        weights = path / name
        original = weights.read_bytes()
        header_end = 8 + int.from_bytes(original[:8], "little")

        # Headers dominate tiny files: aim at the data half of the time.
        in_data = header_end < len(original) and data.draw(st.booleans(), label="in data")
        low, high = (header_end, len(original) - 1) if in_data else (0, header_end - 1)
        position = data.draw(st.integers(low, high), label="position")
        mask = data.draw(st.integers(1, 255), label="xor mask")
        event("flip in header" if position < header_end else "flip in data")
        flipped = bytearray(original)
        flipped[position] ^= mask
        weights.write_bytes(bytes(flipped))
        with pytest.raises(CAUGHT) as caught:
            mc.verify(path)
        if in_data:
            # The header still binds the file, so the data digest names the one tensor hit.
            hit = [
                k
                for k, t in manifest.tensors.items()
                if t.file == name and t.byte_range is not None and t.byte_range[0] <= position < t.byte_range[1]
            ]
            error = caught.value
            assert isinstance(error, mc.IntegrityError)
            assert (error.file, error.key) == (name, *hit)
        with pytest.raises(CAUGHT):
            mc.load(target, path, verify_digests=True)
        assert snapshot(target) == before

        cut = data.draw(st.integers(0, len(original) - 1), label="truncated to")
        weights.write_bytes(original[:cut])
        with pytest.raises(CAUGHT):
            mc.verify(path)
        # A short file is refused even without hashing: sizes are checked before any copy.
        with pytest.raises(CAUGHT):
            mc.load(target, path)
        assert snapshot(target) == before

        weights.write_bytes(original)
        mc.verify(path)
    record_example()
