"""``save``: write a checkpoint directory atomically, deterministically, content-addressed."""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, NamedTuple

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from manifest_ckpt._version import __version__
from manifest_ckpt.comparison.introspect import LiveState, capture, dtype_name
from manifest_ckpt.errors import CheckpointExistsError, ManifestError, UnsupportedTensorError
from manifest_ckpt.format import jsonio, values
from manifest_ckpt.format.binding import content_digest
from manifest_ckpt.format.dtypes import nbytes
from manifest_ckpt.format.integrity import WORKERS, digest_bytes
from manifest_ckpt.format.keys import check_keys
from manifest_ckpt.format.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ModuleEntry,
    TensorEntry,
    compute_digest,
    required_version,
)
from manifest_ckpt.format.safetensors_header import CONTENT_KEY, build_header, written_metadata
from manifest_ckpt.gc_pause import gc_paused
from manifest_ckpt.storage import commit
from manifest_ckpt.storage.store import is_url, read_manifest, require_parent_dir
from manifest_ckpt.training.tree import Encoder, capture_app, is_app_state

_PLAIN_TENSOR_TYPES: Final = (torch.Tensor, nn.Parameter, nn.Buffer)
RELATIONS = ("fine-tuned-from", "converted-from", "merged-from", "quantized-from", "resumed-from", "derived-from")
_WRITE_BLOCK = 64 << 20
# Small tensors are written through a buffer this size (one system call per tensor would
# dominate a 100,000-tensor save) and hashed in batches of at least _HASH_BATCH bytes.
_WRITE_BUFFER = 1 << 20
_HASH_BATCH = 4 << 20
# At most this many written bytes wait for their digest (memory only for tensors that had
# to be copied to the CPU first; module tensors on the CPU are hashed in place).
_PIPELINE_BYTES = 256 << 20
# Tensors up to this size are staged into the write block and hashed on the writing thread.
_SMALL = 64 << 10
_PLACEHOLDER: Final = "sha256:" + "0" * 64
_memmove = ctypes.memmove


class _Planned(NamedTuple):  # a tuple: built 100,000 times per save, where a frozen dataclass costs 1-2 us each
    key: str
    tensor: torch.Tensor
    dtype: str
    shape: tuple[int, ...]


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (the caller keeps the tensor alive)."""
    size = tensor.numel() * tensor.element_size()
    if size == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * size).from_address(tensor.data_ptr())).cast("B")


def _to_cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values as a plain contiguous CPU tensor, ready to be written byte for byte.

    A lazily conjugated or negated view (``x.conj()``, ``torch._neg_view(x)``) keeps its
    storage unchanged and a flag; its bytes are not its values until resolved (both calls
    return the tensor itself when the flag is not set, so the common path pays nothing).
    """
    t = tensor.detach()
    if t.is_meta:
        raise UnsupportedTensorError(
            "cannot save a tensor on the meta device: it has no values; materialise the module first"
        )
    if t.device.type != "cpu":
        t = t.cpu()
    return t.resolve_conj().resolve_neg().contiguous()


def require_storable(tensors: Mapping[str, torch.Tensor], *, writer: str) -> None:
    """Refuse, before anything is written, what would not be stored as the values the user has.

    Keys must be storable (:func:`check_keys`); meta tensors have no values; a tensor
    subclass that overrides ``__torch_dispatch__`` (a wrapper such as a fake, functional or
    packed tensor) has no plain storage whose bytes are its values. Layouts, quantized and
    nested tensors and dtypes are refused by ``capture``.

    Raises:
        InvalidKeyError: a key is empty, reserved, too long or not encodable.
        UnsupportedTensorError: naming every meta tensor or wrapper subclass.
    """
    check_keys(tensors, writer=writer)
    lazy = [k for k, t in tensors.items() if is_lazy(t)]
    if lazy:
        raise UnsupportedTensorError(
            f"{writer}: {len(lazy)} tensors are uninitialised lazy parameters or buffers and have no shape or "
            f"values yet ({', '.join(lazy[:5])}{', ...' if len(lazy) > 5 else ''}); run one forward pass with a "
            "sample batch (or load a checkpoint into the module) before saving. Nothing was written."
        )
    meta = [k for k, t in tensors.items() if t.is_meta]
    if meta:
        raise UnsupportedTensorError(
            f"{writer}: {len(meta)} tensors are on the meta device and have no values ({', '.join(meta[:5])}"
            f"{', ...' if len(meta) > 5 else ''}); materialise the module (load or initialise it) before saving. "
            "Nothing was written."
        )
    plain = torch.Tensor.__torch_dispatch__
    wrapped = [
        (k, type(t))
        for k, t in tensors.items()
        if type(t) not in _PLAIN_TENSOR_TYPES and getattr(type(t), "__torch_dispatch__", plain) is not plain
    ]
    if wrapped:
        listing = ", ".join(f"{k!r} ({c.__module__}.{c.__qualname__})" for k, c in wrapped[:5])
        raise UnsupportedTensorError(
            f"{writer}: tensor subclasses that override __torch_dispatch__ hold no plain values to store: {listing}. "
            "Convert them to plain tensors first (for a DTensor use manifest_ckpt.distributed.save, or "
            ".full_tensor()). Nothing was written."
        )


def save(
    obj: nn.Module | Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    lineage: Any = None,
    metadata: Any = None,
    overwrite: bool = False,
    parents: Sequence[Any] = (),
    max_file_size: int | None = None,
    record_code: bool = True,
    timestamp: bool = False,
    fsync: bool = False,
    source: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    modules: Mapping[str, ModuleEntry] | None = None,
    progress: Callable[[int], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    extra_state: Mapping[str, Any] | None = None,
) -> Manifest:
    """Save a module, a state dict or an application state as a checkpoint directory.

    Args:
        obj: an ``nn.Module`` (its module tree is recorded), a plain state dict, or an
            application state: a (nested) dict of modules, optimizers, LR schedulers, other
            Stateful objects, tensors and plain values, saved as a training state
            (:mod:`manifest_ckpt.training`; optimizer state keyed by parameter name).
        path: the checkpoint directory to create.
        lineage: arbitrary JSON recorded as ``lineage.user``.
        metadata: arbitrary JSON recorded as ``metadata``.
        overwrite: replace an existing checkpoint at ``path`` (atomically).
        parents: checkpoints this one derives from: paths, digests (``sha256:...``) or
            manifests, optionally as ``(parent, relation)`` pairs; recorded by digest.
        max_file_size: split tensors across several weights files of at most this many
            bytes (a tensor larger than the limit gets a file of its own).
        record_code: record the git commit and dirty flag of the current directory.
        timestamp: record the current time (``SOURCE_DATE_EPOCH`` is always honoured).
        fsync: flush files and directory to disk before returning.
        source: what a converted checkpoint came from (recorded as ``lineage.source``), or a
            callable returning it, called once the weights are written (so a converter can
            hash its input meanwhile).
        modules: the module tree to record for a state dict ``obj`` (``introspect.module_tree``
            of the module it belongs to); it must declare exactly the state dict's keys.
        progress: called with each tensor's byte count once it is written.
        extra_state: module extra state by key for a state dict ``obj`` saved with ``modules=``
            (what ``capture(module, extra_state=True)`` sets apart; ``async_save`` of a module).
        storage_options: fsspec options when ``path`` is a URL (``s3://bucket/ck``, ...): the
            checkpoint is written to a local staging directory, then uploaded weights first and
            ``manifest.json`` last (see :mod:`manifest_ckpt.storage.remote`).

    Raises:
        CheckpointExistsError: ``path`` exists and ``overwrite`` is False.
        UnsupportedTensorError: a tensor cannot be stored faithfully.
        UnsupportedValueError: a value of an application state needs pickle (all named).
        ManifestError: ``modules`` does not declare exactly the state dict's keys.

    Returns:
        The manifest written.
    """
    if is_url(path):
        from manifest_ckpt.storage.remote import staged_destination

        # The destination is checked before the save; the upload commits the manifest last.
        with staged_destination(str(path), overwrite=overwrite, storage_options=storage_options) as local:
            manifest = save(
                obj,
                local,
                lineage=lineage,
                metadata=metadata,
                parents=parents,
                max_file_size=max_file_size,
                record_code=record_code,
                timestamp=timestamp,
                fsync=False,
                source=source,
                modules=modules,
                progress=progress,
            )
        return manifest
    target = Path(path)
    extensions: dict[str, Any] | None = None
    if is_app_state(obj) and modules is None:
        state, extensions = capture_app(obj)
    else:
        state = capture(obj, extra_state=True)
        if extra_state:
            state = replace(state, extra={**state.extra, **extra_state})
        state, extensions = _with_extra_state(state)
    require_storable(state.tensors, writer="save")
    if modules is not None:
        parts = {k for n in (extensions or {}).get("extra_state", {}).values() for _, k, _ in values.iter_refs(n)}
        state = _with_modules(state, obj, modules, parts)
    _check_destination(target, overwrite)
    # Fail on bad JSON before any byte is written.
    deferred = source if callable(source) else None
    lineage_doc = _lineage(lineage, parents, record_code, timestamp, None if callable(source) else source)
    _require_json("metadata", metadata)
    # Written into a locked staging directory, then committed under the path's lock
    # (storage/commit.py): crash-atomic, and safe against concurrent writers of the path.
    with commit.begin(target, overwrite=overwrite, fsync=fsync) as stage:
        manifest = _write_into(
            stage.directory, state, lineage_doc, metadata, max_file_size, fsync, progress, deferred, extensions
        )
        stage.commit(manifest.to_json(), manifest.files)
    return manifest


def _with_extra_state(state: LiveState) -> tuple[LiveState, dict[str, Any] | None]:
    """The state with its module extra state encoded: ``extensions.extra_state`` and the tensors it holds.

    Extra state that is JSON, a tensor, bytes, or a dict / list / tuple of these, is stored
    (tensors under the dotted key of their place in the value, docs/format.md §9).

    Raises:
        UnsupportedValueError: naming every extra-state value that would need pickle.
        ManifestError: a tensor of extra state would be stored under a key the state uses.
    """
    if not state.extra:
        return state, None
    encoder = Encoder()
    nodes = {key: encoder.value(value, key) for key, value in state.extra.items()}
    encoder.finish()
    clash = sorted(k for k in encoder.tensors if k in state.tensors)
    if clash:
        raise ManifestError(
            f"save: module extra state would store tensors under {', '.join(map(repr, clash[:5]))}, which are "
            "also state-dict keys; rename the parameter or buffer. Nothing was written.",
            field="extensions.extra_state",
        )
    # Stored apart even when they share memory with a parameter: their keys are no state-dict keys.
    tensors = {**state.tensors, **encoder.tensors}
    return replace(state, tensors=tensors, extra={}), {"extra_state": nodes}


def _with_modules(
    state: LiveState,
    obj: nn.Module | Mapping[str, torch.Tensor],
    modules: Mapping[str, ModuleEntry],
    parts: Iterable[str] = (),
) -> LiveState:
    """The captured state dict with a module tree supplied by the caller (``save(..., modules=)``).

    ``parts`` are the stored tensors of module extra state, which no module declares.

    Raises:
        TypeError: ``obj`` is a module, which records its own tree.
        ManifestError: the tree declares keys the state dict lacks, or the reverse; the
            manifest would be inconsistent and unreadable.
    """
    if isinstance(obj, nn.Module):
        raise TypeError(
            "save(module, modules=...): a module records its own tree; pass modules= only with a state dict"
        )
    declared = {f"{path}.{name}" if path else name for path, m in modules.items() for name in m.persistent_names()}
    missing, extra = sorted(declared - set(state.tensors)), sorted(set(state.tensors) - declared - set(parts))
    if missing or extra:
        listing = [f"declared but not in the state dict: {k!r}" for k in missing[:5]]
        listing += [f"in the state dict but declared by no module: {k!r}" for k in extra[:5]]
        raise ManifestError(
            "save(..., modules=): the module tree and the state dict disagree "
            f"({len(missing)} declared keys missing, {len(extra)} keys undeclared):\n  "
            + "\n  ".join(listing)
            + "\nPass the tree of the module this state dict belongs to.",
            field="modules",
        )
    return replace(state, modules=dict(modules))


def _check_destination(target: Path, overwrite: bool) -> None:
    require_parent_dir(target, "checkpoint directory")
    if not target.exists() and not target.is_symlink():
        return
    if not overwrite:
        raise CheckpointExistsError(f"{target} already exists; pass overwrite=True to replace it")
    if not target.is_dir() or target.is_symlink():
        raise CheckpointExistsError(f"{target} exists and is not a checkpoint directory; refusing to replace it")
    if not (target / MANIFEST_NAME).is_file() and any(not commit.is_leftover(n) for n in os.listdir(target)):
        raise CheckpointExistsError(
            f"{target} is a non-empty directory without {MANIFEST_NAME}; refusing to overwrite what is not a "
            "checkpoint. Choose another path or empty it."
        )


@gc_paused()  # the manifest of 100,000 tensors is millions of acyclic objects; collections only slow it
def _write_into(
    directory: Path,
    state: LiveState,
    lineage: dict[str, Any],
    metadata: Any,
    max_file_size: int | None,
    fsync: bool,
    progress: Callable[[int], None] | None = None,
    deferred_source: Callable[[], Mapping[str, Any]] | None = None,
    extensions: dict[str, Any] | None = None,
) -> Manifest:
    """Write the weights files into ``directory`` and return the manifest that lists them.

    ``extensions`` holds the entry tree of a training state (``{"state": tree}``).
    """
    planned = [
        _Planned(k, t, dtype_name(t, k), tuple(t.shape)) for k, t in state.tensors.items() if k not in state.aliases
    ]
    tensors: dict[str, TensorEntry] = {}
    files: dict[str, FileEntry] = {}
    for group in _group_files(planned, max_file_size):
        name, entry, written = _write_weights_file(directory, group, fsync, progress)
        files[name] = entry
        tensors.update(written)
    tensors = dict(sorted(tensors.items()))
    aliases = dict(sorted(state.aliases.items()))
    modules = state.modules
    if deferred_source is not None:
        source = deferred_source()
        _require_json("source", source)
        lineage = {**lineage, "source": dict(source)}
    manifest = Manifest(
        digest=compute_digest(tensors, aliases, modules, extensions),
        files=dict(sorted(files.items())),
        tensors=tensors,
        aliases=aliases,
        modules=modules,
        lineage=lineage,
        metadata=metadata,
        format_version=required_version(extensions),
        extensions=extensions,
    )
    return manifest


def _group_files(planned: list[_Planned], max_file_size: int | None) -> list[list[_Planned]]:
    """Order tensors largest element first (keeps each aligned) and split them by size."""
    ordered = sorted(planned, key=lambda p: (-p.tensor.element_size(), p.key))
    if not max_file_size:
        return [ordered]
    groups: list[list[_Planned]] = [[]]
    size = 0
    for p in ordered:
        n = nbytes(p.dtype, p.shape)
        if groups[-1] and size + n > max_file_size:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += n
    return groups


def _write_weights_file(
    directory: Path,
    group: list[_Planned],
    fsync: bool,
    progress: Callable[[int], None] | None = None,
) -> tuple[str, FileEntry, dict[str, TensorEntry]]:
    """Write one content-addressed safetensors file holding whole tensors."""
    layout = [(p.key, p.dtype, p.shape) for p in group]

    def values() -> Iterator[torch.Tensor]:
        for p in group:
            yield p.tensor
            # The writer asks for the next tensor once this one is written (its digest may
            # still be running on another thread).
            if progress is not None:
                progress(nbytes(p.dtype, p.shape))

    name, entry, digests, ranges = write_safetensors(directory, layout, values(), fsync)
    written = {
        p.key: TensorEntry(p.dtype, p.shape, d, file=name, byte_range=r) for p, d, r in zip(group, digests, ranges)
    }
    return name, entry, written


def content_file_name(header_sha256: str, suffix: str = "") -> str:
    """The name of a weights file: its header's sha256, shortened (and a suffix such as a rank).

    The header states every key, dtype, shape and byte offset and, through its content
    digest, the data: two files with one name hold the same bytes.
    """
    return f"weights-{header_sha256.removeprefix('sha256:')[:16]}{suffix}.safetensors"


def write_safetensors(
    directory: Path,
    layout: Sequence[tuple[str, str, tuple[int, ...]]],
    tensors: Iterable[torch.Tensor],
    fsync: bool,
    name: Callable[[str], str] = content_file_name,
) -> tuple[str, FileEntry, list[str], list[tuple[int, int]]]:
    """Write one safetensors file, digesting the tensors on every core while writing them.

    The header carries the file's content digest, known only after the data is hashed, so a
    placeholder of the same length is written first and replaced at the end. Shared by
    ``save`` and the distributed storage writer.

    Args:
        layout: ``(key, manifest dtype, shape)`` of each tensor, in data order.
        tensors: the values in the same order, produced lazily; written tensors whose digest
            is still running are held, at most ``_PIPELINE_BYTES`` of them.
        name: maps the hex sha256 of the file's header to its final name in ``directory``.

    Returns:
        The file name, its manifest entry, each tensor's digest and absolute byte range.
    """
    placeholder = written_metadata(_PLACEHOLDER)
    header, ranges = build_header(layout, placeholder)
    fd, tmp = tempfile.mkstemp(prefix=".weights.", suffix=".tmp", dir=directory)
    digests: list[str] = []
    # Large tensors reach the hashing threads in batches of at least _HASH_BATCH bytes (one
    # task per tensor would cost more than hashing it); a batch is submitted before its last
    # tensor is written, so hashing overlaps the writes, and results are taken in order.
    # Small plain tensors are gathered into one staging block (a memmove each), written with
    # one call and hashed here from the block: hashlib holds the GIL for buffers this small, so
    # a thread would gain nothing, and each tensor costs a few calls instead of a dozen.
    pending: deque[tuple[Future[list[str]], int]] = deque()
    batch: list[memoryview] = []
    keep: list[torch.Tensor] = []  # tensor_buffer views do not keep their tensors alive
    batched = held = 0
    block = bytearray(_WRITE_BUFFER)
    block_view = memoryview(block)
    block_base = tensor_buffer_address(block)
    spans: list[tuple[int, int]] = []
    used = 0
    try:
        with os.fdopen(fd, "wb", buffering=_WRITE_BUFFER) as f, ThreadPoolExecutor(WORKERS) as pool:

            def flush_block() -> None:
                nonlocal used
                if not spans:
                    return
                submit_batch()  # digests are taken in file order: the tensors written before go first
                f.write(block_view[:used])
                done: Future[list[str]] = Future()
                done.set_result([_sha256_prefixed(block_view[a:b]) for a, b in spans])
                pending.append((done, 0))
                spans.clear()
                used = 0

            def submit_batch() -> None:
                nonlocal batch, keep, batched, held
                if batch:
                    pending.append((pool.submit(_digest_all, batch, keep), batched))
                    held += batched
                    batch, keep, batched = [], [], 0

            f.write(header)
            for tensor in tensors:
                size = tensor.nbytes
                if _is_plain(tensor) and size <= _SMALL:
                    if used + size > _WRITE_BUFFER:
                        flush_block()
                    if size:
                        _memmove(block_base + used, tensor.data_ptr(), size)
                    spans.append((used, used + size))
                    used += size
                    continue
                flush_block()  # the staged tensors come first in the file
                cpu = _to_cpu_contiguous(tensor)
                buf = tensor_buffer(cpu)
                batch.append(buf)
                keep.append(cpu)
                batched += len(buf)
                if batched >= _HASH_BATCH:
                    submit_batch()
                for start in range(0, len(buf), _WRITE_BLOCK):
                    f.write(buf[start : start + _WRITE_BLOCK])
                del buf, cpu
                while pending and held > _PIPELINE_BYTES:
                    future, pending_size = pending.popleft()
                    digests += future.result()
                    held -= pending_size
            flush_block()
            submit_batch()
            del batch, keep
            while pending:
                digests += pending.popleft()[0].result()
            if len(digests) != len(layout):
                raise ValueError(f"write_safetensors: {len(layout)} tensors in the layout, {len(digests)} given")
            content = content_digest(zip([key for key, _, _ in layout], digests))
            final_header = _with_content_digest(header, layout, content)
            assert len(final_header) == len(header)
            f.seek(0)
            f.write(final_header)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        header_sha256 = hashlib.sha256(final_header).hexdigest()
        file_name = name(header_sha256)
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / file_name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    size = ranges[-1][1] if ranges else len(final_header)
    entry = FileEntry(size=size, header_sha256=header_sha256)
    return file_name, entry, digests, ranges


def _with_content_digest(header: bytes, layout: Sequence[tuple[str, str, tuple[int, ...]]], content: str) -> bytes:
    """``header`` (built with the placeholder digest) with the file's content digest in its place.

    The placeholder's ``"key":"value"`` pair can occur in the JSON text only as the metadata
    entry (a string literal holds no unescaped quote), so one occurrence is that entry; the
    header is rebuilt otherwise (never, in practice), giving the same bytes.
    """
    old = f'"{CONTENT_KEY}":"{_PLACEHOLDER}"'.encode()
    if header.count(old) == 1:
        return header.replace(old, f'"{CONTENT_KEY}":"{content}"'.encode())
    return build_header(layout, written_metadata(content))[0]


def tensor_buffer_address(block: bytearray) -> int:
    """The address of a bytearray's first byte (the bytearray must not be resized meanwhile)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(block))


def _is_plain(t: torch.Tensor) -> bool:
    """A CPU tensor whose memory from ``data_ptr()`` is its values, as ``_to_cpu_contiguous`` would give."""
    return (
        type(t) in _PLAIN_TENSOR_TYPES
        and t.is_cpu
        and t.is_contiguous()
        and not (t.is_conj() or t.is_neg() or t.is_meta)
    )


def _sha256_prefixed(data: memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _digest_all(buffers: list[memoryview], keep: list[torch.Tensor]) -> list[str]:
    """Digests of ``buffers`` in order (``keep`` holds their tensors alive meanwhile)."""
    return [digest_bytes(b) for b in buffers]


def _require_json(what: str, value: Any) -> None:
    """Refuse what the reader would refuse: not JSON, nested too deeply, lone surrogates.

    Raises:
        ManifestError: naming the field and the problem.
    """
    problem = jsonio.check_value(value, what)
    if problem is not None:
        raise ManifestError(f"{what} cannot be stored: {problem}; pass plainer JSON", field=what)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ManifestError(
            f"{what} must be plain JSON (dicts with string keys, lists, strings, finite numbers, bools, None): {exc}",
            field=what,
        ) from None


def _lineage(
    user: Any,
    parents: Sequence[Any],
    record_code: bool,
    timestamp: bool,
    source: Mapping[str, Any] | None,
) -> dict[str, Any]:
    _require_json("lineage", user)
    doc: dict[str, Any] = {
        "created_by": {
            "manifest_ckpt": __version__,
            "torch": torch.__version__.split("+")[0],
            "python": platform.python_version(),
        },
        "parents": [resolve_parent(p) for p in parents],
    }
    if record_code and (code := _git_state()) is not None:
        doc["code"] = code
    created_at = _created_at(timestamp)
    if created_at is not None:
        doc["created_at"] = created_at
    if source is not None:
        _require_json("source", source)
        doc["source"] = dict(source)
    if user is not None:
        doc["user"] = user
    return doc


def resolve_parent(parent: Any) -> dict[str, str]:
    """A lineage parent entry from a path, digest, manifest, or ``(any of those, relation)``.

    Only the digest and the parent's base name are recorded, never an absolute path.
    """
    relation = "derived-from"
    if isinstance(parent, tuple):
        parent, relation = parent
    if relation not in RELATIONS:
        raise ManifestError(f"parent relation {relation!r} is not one of {', '.join(RELATIONS)}", field="parents")
    if isinstance(parent, Manifest):
        return {"digest": parent.digest, "relation": relation}
    text = os.fspath(parent)
    if text.startswith("sha256:") and len(text) == 71:
        return {"digest": text, "relation": relation}
    return {"digest": read_manifest(text).digest, "relation": relation, "name": Path(text).name}


def _created_at(timestamp: bool) -> str | None:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None and epoch.strip().isdigit():
        moment = datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc)
    elif timestamp:
        moment = datetime.datetime.now(tz=datetime.timezone.utc).replace(microsecond=0)
    else:
        return None
    return moment.isoformat().replace("+00:00", "Z")


def _git_state() -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout the process runs in, if any."""
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run
    try:
        head = run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        if head.returncode != 0:
            return None
        status = run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    if len(commit) not in (40, 64):
        return None
    return {"git_commit": commit, "git_dirty": bool(status.stdout.strip())}


if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("manifest-ckpt writes little-endian safetensors data and needs a little-endian host")
