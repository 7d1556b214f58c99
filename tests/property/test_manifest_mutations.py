"""Property 5b: a mutated manifest.json gives ManifestError or IntegrityError, nothing else.

No other exception type, no hang (a timer interrupts), no large allocation (peak RSS is
watched), and a load that does succeed puts exactly the saved bytes in place.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import event, given
from hypothesis import strategies as st

import manifest_ckpt as mc
from harness.child import time_limit
from manifest_ckpt.format.manifest import (
    MANIFEST_NAME,
    Chunk,
    FormatVersionWarning,
    _tensor_from_dict,
    chunked_digest,
    compute_digest,
    modules_from_dict,
)

from .strategies import (
    architectures,
    build,
    manifest_mutations,
    record_example,
    rename_file,
    scratch,
    seeds,
    snapshot,
    state_bytes,
)

CAUGHT = (mc.ManifestError, mc.IntegrityError)
TIME_LIMIT_S = 20.0
RSS_GROWTH_LIMIT_KIB = 256 * 1024
T = TypeVar("T")


def attempt(
    fn: Callable[[], T], allowed: tuple[type[BaseException], ...] = CAUGHT
) -> tuple[T | None, BaseException | None]:
    """Run ``fn``; return its result, or the allowed exception it raised (anything else propagates)."""
    with time_limit(TIME_LIMIT_S), warnings.catch_warnings():
        # A newer minor format version is read with a warning, which is fine here.
        warnings.simplefilter("ignore", FormatVersionWarning)
        try:
            return fn(), None
        except allowed as exc:
            return None, exc


def _peak_kib() -> int:
    """The process's peak resident memory in KiB (macOS reports bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def redigest(doc: Any) -> bool:
    """Recompute the digests a forger would fix up, so deeper checks get exercised."""
    try:
        for t in doc["tensors"].values():
            if "chunks" in t:
                t["digest"] = chunked_digest(
                    tuple(
                        Chunk(tuple(c["offsets"]), tuple(c["shape"]), c["file"], tuple(c["byte_range"]), c["digest"])
                        for c in t["chunks"]
                    )
                )
        tensors = {k: _tensor_from_dict(t) for k, t in doc["tensors"].items()}
        modules = modules_from_dict(doc["modules"])
        doc["digest"] = compute_digest(tensors, doc["aliases"], modules)
    except Exception:  # noqa: BLE001 - a document too broken to digest is still a fine mutation
        return False
    return True


def _raw_mutation(data: st.DataObject, text: bytes) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "deep"]), label="raw mutation")
    event(f"manifest bytes: {kind}")
    if kind == "flip":
        i = data.draw(st.integers(0, len(text) - 1), label="byte")
        return text[:i] + bytes([text[i] ^ data.draw(st.integers(1, 255), label="mask")]) + text[i + 1 :]
    if kind == "truncate":
        return text[: data.draw(st.integers(0, len(text) - 1), label="cut")]
    if kind == "insert":
        i = data.draw(st.integers(0, len(text)), label="at")
        return text[:i] + data.draw(st.binary(min_size=1, max_size=8), label="garbage") + text[i:]
    depth = data.draw(st.sampled_from([50, 900, 5000, 200_000]), label="depth")
    body = text.rstrip().removesuffix(b"}")
    return body + b',"metadata":' + b"[" * depth + b"]" * depth + b"}"


@given(data=st.data(), arch=architectures(max_depth=1), seed=seeds(), max_file_size=st.none() | st.integers(1, 64))
def test_mutated_manifest_raises_only_manifest_or_integrity_errors(
    data: st.DataObject, arch: Any, seed: int, max_file_size: int | None, tmp_path_factory: Any
) -> None:
    """read_manifest, verify, check and load of a mutated manifest raise only the two documented errors."""
    source = build(arch, seed=seed)
    target = build(arch, seed=seed, invert=True)
    saved = state_bytes(source)
    before = snapshot(target)
    peak = _peak_kib()

    with scratch(tmp_path_factory) as tmp:
        path = tmp / "ckpt"
        mc.save(source, path, max_file_size=max_file_size, record_code=False)
        text = (path / MANIFEST_NAME).read_bytes()
        doc = json.loads(text)
        how = data.draw(st.sampled_from(["document", "document", "forged", "bytes", "link"]), label="how")
        forged = False
        if how == "bytes":
            mutated = _raw_mutation(data, text)
        else:
            if how == "link":
                # A weights file name that is a link to a copy outside the checkpoint.
                name = data.draw(st.sampled_from(sorted(doc["files"])), label="linked file")
                outside = tmp / "outside.safetensors"
                shutil.copyfile(path / name, outside)
                (path / "link.safetensors").symlink_to(Path("..") / outside.name)
                rename_file(doc, name, "link.safetensors")
                changes = [f"link: {name} -> a copy outside the checkpoint"]
            else:
                doc, changes = data.draw(manifest_mutations(doc), label="mutations")
            forged = how != "document" and redigest(doc)
            for change in changes:
                event(f"manifest edit: {change.split(' ')[0].split(':')[0]}")
            mutated = json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
        (path / MANIFEST_NAME).write_bytes(mutated)

        # A forged manifest (digests fixed up) may describe another architecture.
        mismatch_ok = (*CAUGHT, mc.ModelMismatchError) if forged else CAUGHT
        _, read_error = attempt(lambda: mc.read_manifest(path))
        _, verify_error = attempt(lambda: mc.verify(path))
        report, check_error = attempt(lambda: mc.check(build(arch, seed=seed), path))
        result, load_error = attempt(lambda: mc.load(target, path), mismatch_ok)

    event(
        f"outcome: read {'ok' if read_error is None else 'refused'}, load {'ok' if load_error is None else 'refused'}"
    )
    if read_error is not None:
        assert verify_error is not None and check_error is not None and load_error is not None
    if report is not None and not forged:
        assert report.ok, str(report)
    if result is None:
        assert snapshot(target) == before
    else:
        # Whatever the manifest says, a load that succeeds put exactly the saved bytes in place.
        assert state_bytes(target) == saved
    growth = _peak_kib() - peak
    assert growth < RSS_GROWTH_LIMIT_KIB, f"peak memory grew by {growth} KiB"
    record_example()
