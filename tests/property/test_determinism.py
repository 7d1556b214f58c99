"""Property 2: saving is deterministic and every manifest is schema-valid and round-trips."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from hypothesis import given
from hypothesis import strategies as st

import manifest_ckpt as mc
from manifest_ckpt.format.manifest import MANIFEST_NAME

from .strategies import Arch, architectures, build, has_data, record_example, scratch, seeds

SCHEMA = Path(__file__).resolve().parents[2] / "schema" / "manifest-v1.schema.json"


@cache
def _validator() -> Any:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@given(
    arch=architectures(),
    seed=seeds(),
    max_file_size=st.none() | st.integers(1, 256),
    other_size=st.none() | st.integers(1, 256),
)
def test_saving_is_deterministic_and_the_manifest_is_valid(
    arch: Arch, seed: int, max_file_size: int | None, other_size: int | None, tmp_path_factory: Any
) -> None:
    """Two saves (of one module and of a rebuilt twin) give identical bytes; the manifest validates and round-trips.

    The digest names the content: another split into files keeps it, other values change it.
    """
    module = build(arch, seed=seed)
    twin = build(arch, seed=seed)
    with scratch(tmp_path_factory) as tmp:
        first = mc.save(module, tmp / "a", max_file_size=max_file_size, record_code=False)
        second = mc.save(module, tmp / "b", max_file_size=max_file_size, record_code=False)
        third = mc.save(twin, tmp / "c", max_file_size=max_file_size, record_code=False)
        files = _files(tmp / "a")
        assert _files(tmp / "b") == files
        assert _files(tmp / "c") == files
        assert first.digest == second.digest == third.digest
        assert set(files) == {MANIFEST_NAME, *first.files}

        document = json.loads(files[MANIFEST_NAME])
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in _validator().iter_errors(document)]
        assert errors == []
        reread = mc.read_manifest(tmp / "a")
        assert reread.to_dict() == document
        assert reread.to_json() == files[MANIFEST_NAME]
        # The fast canonical encoder writes exactly what json's own indenting encoder would.
        assert files[MANIFEST_NAME] == (json.dumps(document, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()
        assert reread == first
        mc.verify(tmp / "a")

        resplit = mc.save(module, tmp / "e", max_file_size=other_size, record_code=False)
        assert resplit.digest == first.digest

        if has_data(module):
            other = mc.save(
                build(arch, seed=seed, invert=True), tmp / "d", max_file_size=max_file_size, record_code=False
            )
            assert other.digest != first.digest
            # The same keys, dtypes and shapes in the same files: only the data differs.
            assert {k: (t.dtype, t.shape) for k, t in other.tensors.items()} == {
                k: (t.dtype, t.shape) for k, t in first.tensors.items()
            }
    record_example()
