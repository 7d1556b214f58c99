"""``load_file``: what a checkpoint holds, as plain objects, without live objects to load into."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import torch

from manifest_ckpt.format.manifest import Manifest
from manifest_ckpt.reader import _Weights
from manifest_ckpt.storage.store import open_store, read_store_manifest


def read_whole(weights: _Weights, manifest: Manifest, key: str) -> torch.Tensor:
    """A stored tensor read whole into new memory, its chunks assembled (the key may be an alias)."""
    entry = manifest.entry(key)
    out = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
    with torch.no_grad():
        for c in entry.pieces():
            out[tuple(slice(o, o + n) for o, n in zip(c.offsets, c.shape))] = weights.view(c, entry.dtype)
    return out


def read_state(
    weights: _Weights, manifest: Manifest, *, device: torch.device | None = None
) -> dict[str, Any]:
    """The checkpoint's content as plain objects (files bound by the caller), tensors in new memory.

    A weights checkpoint gives its flat state dict (ties as one tensor under each key); a
    training state its application state, each module as its flat state dict, each Stateful
    object as its saved state (an optimizer's keyed by parameter name).
    """
    from manifest_ckpt.training.tree import decode_entry

    def tensor(key: str) -> torch.Tensor:
        t = read_whole(weights, manifest, key)
        return t if device is None else t.to(device)

    if manifest.state is None:
        read: dict[str, torch.Tensor] = {}
        for key in manifest.keys():
            stored = manifest.aliases.get(key, key)
            if stored not in read:
                read[stored] = tensor(stored)
        return {key: read[manifest.aliases.get(key, key)] for key in manifest.keys()}

    def resolve(tag: str, key: str) -> Any:
        if tag == "tensor":
            return tensor(key)
        data = read_whole(weights, manifest, key).numpy().tobytes()
        return data if tag == "bytes" else io.BytesIO(data)

    state = decode_entry(manifest.state, resolve, manifest.extra_state)
    assert isinstance(state, dict)
    return state


def load_file(
    path: str | os.PathLike[str],
    *,
    verify_digests: bool = False,
    device: str | torch.device | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a checkpoint holds, checked against its manifest, with no module or template.

    Args:
        verify_digests: hash every tensor before returning any.
        device: where tensors are put (default: new CPU memory).

    Returns:
        For a weights checkpoint, its flat dict of tensors; for a training state, the
        nested application state with its plain values (see :func:`read_state`).

    Raises:
        ManifestError: invalid manifest, or weights files that do not belong to it.
        IntegrityError: a missing, truncated or (with ``verify_digests``) corrupt file.
    """
    store = open_store(path, storage_options=storage_options)
    manifest = read_store_manifest(store)
    weights = _Weights(store, manifest)
    weights.bind(manifest.files)
    if verify_digests:
        weights.verify(manifest.tensors)
    return read_state(weights, manifest, device=None if device is None else torch.device(device))
