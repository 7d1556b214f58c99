"""``pack`` and ``unpack``: a checkpoint as one reproducible, page-aligned tar file.

``pack`` writes ``manifest.json`` and exactly the weights files the manifest lists (stray
files in the directory are left out) with :func:`manifest_ckpt.storage.tar.write_archive`: sorted
members, fixed metadata and every member's data on a 4096-byte boundary, so the same
checkpoint gives the same bytes on any machine and ``load``/``verify`` read the archive in
place. ``unpack`` refuses hostile archives (escaping names, links, devices, duplicates) and
writes nothing when it refuses.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from manifest_ckpt.cli.progress import Progress
from manifest_ckpt.errors import ArchiveError, CheckpointExistsError, CheckpointNotFoundError
from manifest_ckpt.format.integrity import atomic_write_bytes
from manifest_ckpt.format.manifest import MANIFEST_NAME, Manifest
from manifest_ckpt.storage import commit
from manifest_ckpt.storage.archive_store import open_archive_store
from manifest_ckpt.storage.store import (
    DirectoryStore,
    Store,
    is_url,
    open_store,
    read_store_manifest,
    require_parent_dir,
)
from manifest_ckpt.storage.tar import extract_members, write_archive

PathLike = str | os.PathLike[str]

__all__ = ["pack", "unpack"]


def pack(
    ckpt: PathLike,
    out: PathLike,
    *,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write the checkpoint directory ``ckpt`` as one reproducible archive file ``out``.

    The archive holds ``manifest.json`` first, then the weights files the manifest lists,
    sorted, with mtime ``SOURCE_DATE_EPOCH`` (or 0), mode 0644, uid/gid 0 and no owner
    names. Copies of a checkpoint packed anywhere give identical bytes. ``out`` is written
    to a temporary sibling and renamed, so it is never left half-written.

    Args:
        ckpt: a checkpoint directory or its ``manifest.json``.
        out: the archive file to create.
        overwrite: replace ``out`` if it exists (it must be a file).
        verify: hash every tensor before packing, so a corrupt checkpoint is never archived;
            when False only the cheap manifest/weights binding is checked.
        progress: show progress on stderr when it is a terminal.
        storage_options: fsspec options when ``ckpt`` or ``out`` is a URL (the checkpoint is
            downloaded to a temporary directory first; the archive is uploaded in one PUT).

    Returns:
        The packed checkpoint's manifest.

    Raises:
        CheckpointExistsError: ``out`` exists and ``overwrite`` is False, or it is a directory.
        ArchiveError: ``ckpt`` is already an archive, or a file changed while it was packed.
        ManifestError, IntegrityError: the checkpoint is invalid or corrupt (nothing written).
    """
    if is_url(ckpt) or is_url(out):
        return _pack_remote(ckpt, out, overwrite=overwrite, verify=verify, progress=progress,
                            storage_options=storage_options)
    store = open_store(ckpt)
    if not isinstance(store, DirectoryStore):
        raise ArchiveError(
            f"{store.location} is already an archive; archives are reproducible, so copy the file "
            "(or `manifest-ckpt unpack` it and pack the directory)",
            file=store.location,
        )
    manifest = read_store_manifest(store)
    target = Path(out)
    _check_target(target, overwrite)
    _check_weights(store, manifest, ckpt, verify=verify, progress=progress)
    files = [(MANIFEST_NAME, store.root / MANIFEST_NAME)]
    files += [(name, store.resolve(name)) for name in manifest.files]
    total = sum(manifest.files[name].size for name in manifest.files)
    with Progress(f"pack {store.location}", total, enabled=progress) as bar:
        last = 0

        def advance(done: int, _total: int) -> None:
            nonlocal last
            bar.advance(done - last)
            last = done

        write_archive(files, target, progress=advance)
    return manifest


def unpack(
    archive: PathLike,
    dest: PathLike,
    *,
    verify: bool = True,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Extract a checkpoint archive into the new directory ``dest``, all or nothing.

    Every member is checked before anything is written: names that escape ``dest``
    (absolute, ``..``), links, devices, fifos and duplicate names are refused, and so is
    an archive whose manifest is invalid or does not match its weights files.

    Args:
        archive: an archive written by :func:`pack` (any plain tar of a checkpoint's files works).
        dest: a directory that does not exist yet (or is empty); parents are created.
        verify: hash every tensor in place before extracting, so a corrupt archive is refused.
        progress: show progress on stderr when it is a terminal.
        storage_options: fsspec options when ``archive`` or ``dest`` is a URL (the archive is
            downloaded first; an extracted checkpoint is uploaded with its manifest last).

    Returns:
        The extracted checkpoint's manifest.

    Raises:
        ArchiveError: a hostile or corrupt archive (nothing written).
        CheckpointNotFoundError: ``archive`` is not a tar file with ``manifest.json`` at its root.
        CheckpointExistsError: ``dest`` exists and is not an empty directory.
        ManifestError, IntegrityError: invalid manifest or corrupt weights (nothing written).
    """
    if is_url(archive) or is_url(dest):
        return _unpack_remote(archive, dest, verify=verify, progress=progress, storage_options=storage_options)
    source = Path(archive)
    if not source.exists():
        raise CheckpointNotFoundError(f"{source}: no such archive (file not found); check the path", file=str(source))
    store = open_archive_store(source) if source.is_file() else None
    if store is None:
        raise CheckpointNotFoundError(
            f"{source}: not an archive (expected a tar file written by `manifest-ckpt pack`)", file=str(source)
        )
    target = Path(dest)
    # Checked before anything is read, so a refusal comes before a long verify.
    occupied = target.is_symlink() or (target.exists() and (not target.is_dir() or any(target.iterdir())))
    if occupied:
        raise CheckpointExistsError(
            f"cannot unpack {source} into {target}: it exists and is not an empty directory; "
            "choose a new directory or remove it first"
        )
    manifest_bytes = store.manifest_bytes()
    manifest = Manifest.from_json(manifest_bytes, file=f"{store.location}/{MANIFEST_NAME}")
    # Cheap refusal of a hostile or mismatched archive before anything is copied.
    _check_weights(store, manifest, source, verify=False, progress=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    with commit.begin(target, overwrite=False) as stage:
        # Only the files the manifest lists are extracted, then the copies are checked, not the
        # archive: an archive swapped or rewritten meanwhile cannot slip in unverified bytes.
        extract_members(source, sorted(manifest.files), stage.directory)
        atomic_write_bytes(stage.directory / MANIFEST_NAME, manifest_bytes)
        _check_weights(open_store(stage.directory), manifest, stage.directory, verify=verify, progress=progress)
        stage.commit(manifest_bytes, manifest.files)
    return manifest


def _pack_remote(
    ckpt: PathLike, out: PathLike, *, overwrite: bool, verify: bool, progress: bool,
    storage_options: Mapping[str, Any] | None,
) -> Manifest:
    """``pack`` where either side is a URL: stage locally, then pack, then upload."""
    from manifest_ckpt.storage.remote import downloaded, upload_file

    with contextlib.ExitStack() as stack:
        source = stack.enter_context(downloaded(str(ckpt), storage_options)) if is_url(ckpt) else ckpt
        if not is_url(out):
            return pack(source, out, overwrite=overwrite, verify=verify, progress=progress)
        staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".manifest-ckpt-pack.")))
        manifest = pack(source, staging / "checkpoint.tar", verify=verify, progress=progress)
        upload_file(staging / "checkpoint.tar", str(out), overwrite=overwrite, storage_options=storage_options)
        return manifest


def _unpack_remote(
    archive: PathLike, dest: PathLike, *, verify: bool, progress: bool, storage_options: Mapping[str, Any] | None
) -> Manifest:
    """``unpack`` where either side is a URL: download the archive, extract, upload manifest last."""
    from manifest_ckpt.storage.remote import downloaded, upload_checkpoint

    with contextlib.ExitStack() as stack:
        source = stack.enter_context(downloaded(str(archive), storage_options)) if is_url(archive) else archive
        if not is_url(dest):
            return unpack(source, dest, verify=verify, progress=progress)
        staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".manifest-ckpt-unpack.")))
        manifest = unpack(source, staging / "checkpoint", verify=verify, progress=progress)
        upload_checkpoint(staging / "checkpoint", str(dest), overwrite=False, storage_options=storage_options)
        return manifest


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file unless asked, never replace a directory, need the parent."""
    require_parent_dir(target, "archive")
    if target.is_dir() and not target.is_symlink():
        raise CheckpointExistsError(
            f"{target} is a directory; give the archive's file name, such as {target}/model.tar"
        )
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise CheckpointExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")


def _check_weights(store: Store, manifest: Manifest, path: PathLike, *, verify: bool, progress: bool) -> None:
    """Bind every weights file to the manifest (cheap) and, with ``verify``, hash every tensor."""
    # reader imports torch, which `inspect` must not pay for, so it is imported here.
    from manifest_ckpt.reader import _Weights, verify_report

    if verify:
        verify_report(path, progress=progress)
    else:
        _Weights(store, manifest).bind(manifest.files)
