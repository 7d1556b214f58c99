"""``export_hf``: write a checkpoint the way ``save_pretrained`` does, for transformers and friends.

The layout is transformers 5's: ``model.safetensors``, or ``model-0000k-of-0000N.safetensors``
shards plus ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``) when
the weights exceed ``max_shard_size``; every file's ``__metadata__`` holds ``"format": "pt"``
and, unless ``record_digest=False``, the checkpoint's digest (``"manifest_ckpt.digest"``, also
in the index's metadata), so provenance survives the boundary. Files are laid out exactly as
the ``safetensors`` library lays them out (:mod:`.safetensors_file`), streamed one tensor at a
time from the memory-mapped checkpoint; with ``record_digest=False`` an unsharded export
is byte-identical to ``save_pretrained``'s file. Tied keys (the checkpoint's aliases) are left out,
as transformers leaves them out: ``from_pretrained`` re-ties them. Shards are filled greedily
in the checkpoint's (sorted) key order, with ``huggingface_hub``'s rule.

Every tensor is hashed against the manifest before anything is written, so an export
carries the manifest's guarantee across the boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from manifest_ckpt.assemble import build
from manifest_ckpt.comparison.transforms import RULE_SETS, inverse, simulate
from manifest_ckpt.errors import CheckpointExistsError, ExportError
from manifest_ckpt.exporters.safetensors_file import OutTensor, write_safetensors
from manifest_ckpt.format.dtypes import nbytes
from manifest_ckpt.format.integrity import atomic_write_bytes
from manifest_ckpt.format.manifest import Manifest
from manifest_ckpt.reader import _Weights
from manifest_ckpt.storage.store import is_url, open_store, read_store_manifest
from manifest_ckpt.training.plain import read_whole

__all__ = ["HFExport", "export_hf", "parse_shard_size", "plan_shards"]

WEIGHTS_NAME: Final = "model.safetensors"
INDEX_NAME: Final = "model.safetensors.index.json"
DIGEST_KEY: Final = "manifest_ckpt.digest"
# The experts modules whose fused tensors save_pretrained writes back per expert, and with
# which rule set (transformers' conversion_mapping).
_EXPERT_CLASSES: Final = {
    "MixtralExperts": "mixtral",
    "Qwen2MoeExperts": "qwen2_moe",
    "Qwen3MoeExperts": "qwen2_moe",
    "DeepseekV2Experts": "qwen2_moe",
    "DeepseekV3Experts": "qwen2_moe",
}
# save_pretrained's default in transformers 5.
DEFAULT_MAX_SHARD_SIZE: Final = "50GB"
# huggingface_hub.serialization's units: decimal, two letters.
_SIZE_UNITS: Final = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
# The weight files a save_pretrained directory may hold (replaced by an export with overwrite).
_HF_WEIGHTS: Final = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


@dataclass(frozen=True)
class HFExport:
    """What :func:`export_hf` wrote.

    Attributes:
        directory: the output directory.
        files: the safetensors files written, in shard order.
        index: the index file name, or None when the weights fit one file.
        weight_map: tensor name -> file, as in the index.
        total_size: bytes of tensor data written (the index's ``metadata.total_size``).
        dropped_ties: alias keys left out, each with the key that holds its values.
        digest: the exported checkpoint's digest.
        unfused: the MoE rule sets whose fused expert tensors were split back into
            per-expert keys (``mixtral``, ``qwen2_moe``), as save_pretrained writes them.
    """

    directory: str
    files: tuple[str, ...]
    index: str | None
    weight_map: Mapping[str, str]
    total_size: int
    dropped_ties: Mapping[str, str]
    digest: str
    unfused: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "files": list(self.files),
            "index": self.index,
            "tensors": len(self.weight_map),
            "total_size": self.total_size,
            "dropped_ties": dict(self.dropped_ties),
            "digest": self.digest,
            "unfused": list(self.unfused),
        }


def parse_shard_size(value: int | str) -> int:
    """Bytes from an int or a ``"5GB"``-style string, as ``huggingface_hub.parse_size_to_int`` reads it.

    Raises:
        ExportError: not a positive size with a TB/GB/MB/KB unit.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ExportError(f"max_shard_size={value!r}: expected an int of bytes or a string such as '5GB'")
    if isinstance(value, str):
        text = value.strip()
        unit = text[-2:].upper()
        try:
            number = float(text[:-2].strip()) if unit in _SIZE_UNITS else None
        except ValueError:
            number = None
        if number is None:
            raise ExportError(
                f"max_shard_size={value!r}: expected a number and a unit (TB, GB, MB or KB, as in '5GB'), "
                "or an int of bytes"
            )
        value = int(number * _SIZE_UNITS[unit])
    if value <= 0:
        raise ExportError(f"max_shard_size={value!r}: must be at least one byte")
    return value


def plan_shards(sizes: Mapping[str, int], max_size: int) -> list[list[str]]:
    """Keys per shard, filled in order; a tensor larger than ``max_size`` gets a shard of its own.

    The rule of ``huggingface_hub.split_torch_state_dict_into_shards``: no packing
    optimisation, so the same keys always give the same shards.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    filled = 0
    for key, size in sizes.items():
        if size > max_size:
            shards.append([key])
            continue
        if filled + size > max_size:
            shards.append(current)
            current, filled = [], 0
        current.append(key)
        filled += size
    if current:
        shards.append(current)
    return shards


def export_hf(
    ckpt: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    record_digest: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> HFExport:
    """Write a checkpoint's weights as a ``save_pretrained`` directory (see the module docstring).

    Only weight files are written; put the model's ``config.json`` beside them
    (``model.config.save_pretrained(out_dir)``) for ``from_pretrained``.

    Args:
        ckpt: checkpoint directory, ``manifest.json``, archive or URL.
        out_dir: directory or URL (``s3://...``) to write into (created if missing; other
            files in it, such as ``config.json``, are left alone).
        max_shard_size: bytes per shard, an int or a string such as ``"5GB"``; default
            ``"50GB"``, as ``save_pretrained``.
        overwrite: replace weight files a previous save left in ``out_dir`` (stale shards
            of another layout are removed, as ``save_pretrained`` removes them).
        record_digest: record the checkpoint's digest in every file's ``__metadata__`` and
            in the index (``"manifest_ckpt.digest"``), so provenance survives the export;
            transformers ignores the extra key. False writes exactly ``save_pretrained``'s bytes.
        storage_options: fsspec options when ``ckpt`` or ``out_dir`` is a URL.

    Raises:
        ExportError: bad ``max_shard_size``, an unusable ``out_dir``, a training-state
            checkpoint, or a dtype safetensors cannot store.
        CheckpointExistsError: ``out_dir`` holds Hugging Face weight files and ``overwrite`` is False.
        IntegrityError, ManifestError: the checkpoint is damaged; nothing was written.
    """
    limit = parse_shard_size(DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
    if is_url(out_dir):
        return _export_to_url(ckpt, str(out_dir), limit, overwrite, record_digest, storage_options)
    target = Path(out_dir)
    existing = _existing_weights(target, overwrite)
    store = open_store(ckpt, storage_options=storage_options)
    manifest = read_store_manifest(store)
    if manifest.state is not None:
        raise ExportError(
            f"{store.location}: a training state (Lightning/application state), not model weights; "
            "export a weights checkpoint (manifest_ckpt.save(model, path))",
            file=store.location,
        )
    weights = _Weights(store, manifest)
    weights.bind(manifest.files)
    weights.map_files(manifest.files)
    weights.verify(manifest.tensors)

    # Fused MoE experts go back to save_pretrained's per-expert keys: the module tree says
    # which layout, and its rule set runs backwards (comparison.transforms.inverse).
    unfused = sorted({_EXPERT_CLASSES[c] for c in _classes(manifest) if c in _EXPERT_CLASSES})
    if len(unfused) > 1:
        raise ExportError(
            f"{store.location}: the module tree mixes expert layouts {unfused}; export_hf writes one layout",
            file=store.location,
        )
    specs = {k: (manifest.tensors[k].dtype, manifest.tensors[k].shape) for k in sorted(manifest.tensors)}
    plan = simulate(specs, inverse(RULE_SETS[unfused[0]]) if unfused else ())
    keys = sorted(plan)
    sizes = {k: nbytes(plan[k].dtype, plan[k].shape) for k in keys}
    shards = plan_shards(sizes, limit)
    count = len(shards)
    names = [WEIGHTS_NAME] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
    total = sum(sizes.values())

    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-hf-", dir=target))
    metadata = {"format": "pt", **({DIGEST_KEY: manifest.digest} if record_digest else {})}
    source = _Source(weights, manifest)
    try:
        for name, shard in zip(names, shards):
            out = [
                OutTensor(k, plan[k].dtype, plan[k].shape, functools.partial(build, plan[k], source.whole))
                for k in shard
            ]
            write_safetensors(staging / name, out, metadata)
        index = None
        if count > 1:
            index = INDEX_NAME
            atomic_write_bytes(staging / INDEX_NAME, _index_bytes(manifest, weight_map, total, record_digest))
        # Weights first, the index last: a reader never finds an index naming absent shards.
        for name in names:
            os.replace(staging / name, target / name)
        if index is not None:
            os.replace(staging / index, target / index)
        written = {*names, *([index] if index else [])}
        for stale in existing - written:
            with contextlib.suppress(FileNotFoundError):
                (target / stale).unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return HFExport(
        directory=str(target),
        files=tuple(names),
        index=index,
        weight_map=weight_map,
        total_size=total,
        dropped_ties=dict(sorted(manifest.aliases.items())),
        digest=manifest.digest,
        unfused=tuple(unfused),
    )


def _export_to_url(
    ckpt: str | os.PathLike[str],
    url: str,
    limit: int,
    overwrite: bool,
    record_digest: bool,
    storage_options: Mapping[str, Any] | None,
) -> HFExport:
    """Export into a local temporary directory, then upload: shards first, the index last, stale shards removed.

    A reader of ``url`` meanwhile finds the old layout, or shards of the new one beside the old
    index; it never finds an index naming a shard that is not there yet.
    """
    from manifest_ckpt.storage import remote

    url = url.rstrip("/")
    existing = {n for n in remote.list_names(url, storage_options) if _HF_WEIGHTS.fullmatch(n)}
    if existing and not overwrite:
        raise _exists(url, existing)
    with tempfile.TemporaryDirectory(prefix=".export-hf-") as tmp:
        result = export_hf(
            ckpt, tmp, max_shard_size=limit, record_digest=record_digest, storage_options=storage_options
        )
        remote.upload_files(url, Path(tmp), result.files, storage_options=storage_options)
        if result.index is not None:
            remote.upload_files(url, Path(tmp), [result.index], storage_options=storage_options)
    remote.remove_names(url, existing - {*result.files, *([result.index] if result.index else [])}, storage_options)
    return dataclasses.replace(result, directory=url)


class _Source:
    """Stored tensors for the writer: views of the memory map; chunked ones assembled, the last two kept.

    Per-expert keys interleave two fused tensors per layer (``down_proj``, ``gate_proj``,
    ``up_proj`` of expert 0, then of expert 1...), so two assembled tensors are enough to
    assemble each one once.
    """

    def __init__(self, weights: _Weights, manifest: Manifest) -> None:
        self.weights = weights
        self.manifest = manifest
        self._assembled: dict[str, torch.Tensor] = {}

    def whole(self, key: str) -> torch.Tensor:
        entry = self.manifest.tensors[key]
        if entry.chunks is None:
            return self.weights.view(entry.pieces()[0], entry.dtype)
        if key not in self._assembled:
            if len(self._assembled) >= 2:
                del self._assembled[next(iter(self._assembled))]
            self._assembled[key] = read_whole(self.weights, self.manifest, key)
        return self._assembled[key]



def _classes(manifest: Manifest) -> set[str]:
    """The recorded module classes, by bare name."""
    return {(m.cls or "").rsplit(".", 1)[-1] for m in (manifest.modules or {}).values()}


def _existing_weights(target: Path, overwrite: bool) -> set[str]:
    """The Hugging Face weight files already in ``target`` (refused unless ``overwrite``)."""
    if not target.exists():
        return set()
    if not target.is_dir():
        raise ExportError(f"{target}: exists and is not a directory; export_hf writes a directory", file=str(target))
    found = {n for n in os.listdir(target) if _HF_WEIGHTS.fullmatch(n)}
    if found and not overwrite:
        raise _exists(str(target), found)
    return found


def _exists(where: str, found: set[str]) -> CheckpointExistsError:
    return CheckpointExistsError(
        f"{where}: already holds weights ({', '.join(sorted(found))}); pass overwrite=True "
        "(CLI: --overwrite) to replace them, or choose another directory (nothing was written)"
    )


def _index_bytes(manifest: Manifest, weight_map: Mapping[str, str], total: int, record_digest: bool) -> bytes:
    """The index as save_pretrained writes it: two-space indent, sorted keys, a final newline."""
    metadata: dict[str, Any] = {"total_size": total, **({DIGEST_KEY: manifest.digest} if record_digest else {})}
    if manifest.modules is not None:
        # transformers 5 records num_parameters(): each parameter once, ties counted once.
        params = {f"{m}.{p}" if m else p for m, entry in manifest.modules.items() for p in entry.parameters}
        metadata["total_parameters"] = sum(
            _numel(manifest.tensors[k].shape) for k in params if k in manifest.tensors
        )
    document = {"metadata": metadata, "weight_map": dict(weight_map)}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
