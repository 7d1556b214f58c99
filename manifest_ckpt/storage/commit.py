"""Writing a checkpoint directory: staging, an advisory lock per path, crash-atomic commit, cleanup.

Every writer of this library (``save`` and so ``convert``, the distributed commit, ``unpack``)
goes through :func:`begin`:

1. Its files are written into a **staging directory**, a hidden sibling of the checkpoint
   (``.<name>.<random>.tmp``) holding a lock file that the writer keeps locked
   (``fcntl.flock``, exclusive) until it is done. Nothing is written into the checkpoint
   itself before the commit, so no other writer can see or delete half-written files.
2. **Commit.** When the checkpoint does not exist, the staging directory is renamed onto it
   (atomic; the lock file moves with it, so the writer still holds the path's lock). When
   it exists (``overwrite``), the writer takes the checkpoint's own lock
   (``<checkpoint>/.manifest-ckpt.lock``, created while a writer holds it and removed when it
   lets go), moves its weights files in under their content-addressed names, then replaces
   ``manifest.json`` (the commit marker).
3. **Cleanup**, still under the lock: files the manifest on disk at that moment does not
   reference are deleted, but only the previous manifest's files and leftovers of killed
   writers (``weights-*.safetensors``, ``.weights.*.tmp``, ``.manifest.json.*.tmp``); staging
   siblings whose lock nobody holds (their writer died) are removed.

A kill at any instant leaves the old checkpoint or the new one, both valid: before the
manifest is replaced the old manifest's files are all in place (a moved-in file that takes an
old name has the same header, so the old manifest describes it exactly), and after it the
new manifest's files are. The lock is advisory: it serialises writers that use it (every
writer of this library), not other programs. Where ``fcntl`` does not exist (Windows)
writers still stage and commit atomically, but concurrent writers are not serialised.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from manifest_ckpt.errors import CheckpointExistsError, ManifestCkptError
from manifest_ckpt.format.integrity import atomic_write_bytes, fsync_dir
from manifest_ckpt.format.manifest import MANIFEST_NAME

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME: Final = ".manifest-ckpt.lock"
_STAGING_SUFFIX: Final = ".tmp"


def is_leftover(name: str) -> bool:
    """Files a writer of this library leaves in a checkpoint directory when it is killed."""
    return (
        (name.startswith("weights-") and name.endswith(".safetensors"))
        or (name.startswith(".weights.") and name.endswith(".tmp"))
        or (name.startswith(f".{MANIFEST_NAME}.") and name.endswith(".tmp"))
        or name == LOCK_NAME
    )


def referenced_files(manifest: bytes) -> set[str] | None:
    """The file names a manifest lists (top-level names only), or None if it is unreadable."""
    try:
        document = json.loads(manifest)
        names = document["files"]
        return {n for n in names if isinstance(n, str) and "/" not in n and not n.startswith(".")}
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def _read_referenced(directory: Path) -> set[str] | None:
    try:
        return referenced_files((directory / MANIFEST_NAME).read_bytes())
    except OSError:
        return None


def _flock(path: Path, *, blocking: bool, create: bool) -> int | None:
    """An fd of ``path`` holding an exclusive flock, or None when it is held elsewhere (non-blocking)."""
    flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o644)
    if fcntl is None:  # pragma: no cover - Windows
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_checkpoint(directory: Path) -> int:
    """Take ``directory``'s writer lock (waiting for the holder); return the fd to release."""
    while True:
        fd = _flock(directory / LOCK_NAME, blocking=True, create=True)
        assert fd is not None
        # The directory may have been removed and re-created while we waited: the lock must be
        # on the lock file the path names now.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(directory / LOCK_NAME, follow_symlinks=False)):
                return fd
        os.close(fd)


def release(directory: Path, fd: int) -> None:
    """Release a lock from :func:`lock_checkpoint`, removing its lock file first.

    Safe because every locker re-checks, once it holds the lock, that the path still names
    the file it locked (:func:`lock_checkpoint`): a writer that waited on the removed file
    tries again on the new one.
    """
    try:
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(directory / LOCK_NAME, follow_symlinks=False)):
                os.unlink(directory / LOCK_NAME)
    finally:
        os.close(fd)


def remove_abandoned_staging(target: Path) -> None:
    """Remove staging siblings of ``target`` whose writer died (nobody holds their lock).

    A directory with a lock file (the finished ``LOCK_NAME`` or the ``LOCK_NAME.new`` a writer
    creates before renaming it in) is removed only while this cleaner holds its flock. Checking
    and then removing would race with a writer that creates its lock file in between (two
    concurrent saves once deleted each other's staging directories that way).
    """
    prefix = f".{target.name}."
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(_STAGING_SUFFIX)):
            continue
        path = target.parent / name
        with contextlib.suppress(OSError):
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            _remove_if_abandoned(path)


def _remove_if_abandoned(path: Path) -> None:
    for lock_name in (LOCK_NAME, f"{LOCK_NAME}.new"):
        try:
            fd = _flock(path / lock_name, blocking=False, create=False)
        except FileNotFoundError:
            continue
        if fd is None:
            return  # a live writer holds it
        try:
            shutil.rmtree(path)
        finally:
            os.close(fd)
        return
    # No lock file. A live writer has its lock file before it writes any other file, so a
    # directory holding files but no lock file is abandoned (its writer was killed while
    # removing it). An empty one may belong to a writer between mkdir and creating its lock
    # file: rmdir is atomic and fails once anything appeared in it.
    entries = os.listdir(path)
    if LOCK_NAME in entries or f"{LOCK_NAME}.new" in entries:
        return  # appeared since it was looked for: a live writer
    if entries:
        shutil.rmtree(path)
    else:
        os.rmdir(path)


@dataclass
class Stage:
    """A writer's staging directory for one checkpoint path (see the module docstring).

    Attributes:
        target: the checkpoint directory being written.
        directory: where the writer puts its files until :meth:`commit`.
    """

    target: Path
    directory: Path
    overwrite: bool
    fsync: bool
    _lock: int | None = field(default=None, repr=False)
    _done: bool = field(default=False, repr=False)

    def commit(self, manifest: bytes, files: Iterable[str]) -> None:
        """Make the staged checkpoint the one at ``target``: atomically, under the path's lock.

        Args:
            manifest: the ``manifest.json`` bytes.
            files: the weights file names it lists (all in :attr:`directory`).

        Raises:
            CheckpointExistsError: another writer created ``target`` meanwhile and
                ``overwrite`` is False, or ``target`` is not a checkpoint directory.
        """
        names = sorted(set(files))
        # The commit marker goes into the staging directory before the rename, so the rename
        # itself is the commit: a kill at any point leaves no directory at ``target`` or a
        # complete one, never weights without their manifest.
        atomic_write_bytes(self.directory / MANIFEST_NAME, manifest, fsync=self.fsync)
        try:
            os.rename(self.directory, self.target)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
        else:
            # The staging directory, with its lock file, is now the checkpoint (still locked).
            self.directory = self.target
            if self.fsync:
                fsync_dir(self.target.parent)
            self._finish(names)
            return
        self._commit_into_existing(manifest, names)

    def _commit_into_existing(self, manifest: bytes, names: list[str]) -> None:
        if not self.target.is_dir() or self.target.is_symlink():
            raise CheckpointExistsError(f"{self.target} exists and is not a checkpoint directory; refusing to replace it")
        lock = lock_checkpoint(self.target)
        try:
            if not self.overwrite and os.path.lexists(self.target / MANIFEST_NAME):
                raise CheckpointExistsError(
                    f"{self.target} holds a checkpoint (another writer may have created it while this one ran); "
                    "pass overwrite=True to replace it, or choose another path (nothing was written there)"
                )
            strangers = sorted(n for n in os.listdir(self.target) if not is_leftover(n) and n != MANIFEST_NAME)
            previous = _read_referenced(self.target)
            if previous is None and strangers:
                raise CheckpointExistsError(
                    f"{self.target} holds {strangers[0]!r} but no readable {MANIFEST_NAME}; refusing to write "
                    "into what is not a manifest-ckpt checkpoint. Choose another path or empty it."
                )
            for name in names:
                _move_in(self.directory / name, self.target / name)
            if self.fsync:
                fsync_dir(self.target)
            atomic_write_bytes(self.target / MANIFEST_NAME, manifest, fsync=self.fsync)
            sweep(self.target, previous or set(), referenced=names)
        finally:
            release(self.target, lock)
        self._finish(names)

    def _finish(self, names: list[str]) -> None:
        if self.directory == self.target:
            sweep(self.target, set(), referenced=names)
        self.close()

    def __del__(self) -> None:
        # Dropped without commit or close: a StorageWriter that DCP never calls again after
        # another rank failed. Its staging goes when it is collected, not at process exit.
        if not self._done:
            with contextlib.suppress(Exception):
                self.close()

    def close(self) -> None:
        """Release the staging lock and remove the staging directory (unless it became the checkpoint).

        The lock file goes last: a writer killed while removing its staging directory leaves
        either a locked-file-less directory a cleaner may remove, or one whose lock nobody holds.
        """
        self._done = True
        staging = self.directory != self.target
        if staging:
            _empty_except_lock(self.directory)
        if self._lock is not None:
            # After a rename commit the lock file is the checkpoint's own: removed on release,
            # so a checkpoint at rest holds no lock file.
            release(self.directory, self._lock)
            self._lock = None
        if staging:
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)


def _empty_except_lock(directory: Path) -> None:
    """Remove everything in ``directory`` but its lock file."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name == LOCK_NAME:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _move_in(source: Path, destination: Path) -> None:
    """Move a staged weights file into the checkpoint under its content-addressed name.

    A file already there under that name is replaced only by one with the same header: its
    name is the header's sha256, and the header states every key, dtype, shape, offset and
    (through the content digest) the data, so a manifest that lists the old file describes
    the new one exactly. A different header under the same name (a hash-prefix collision, or
    a file not written by this library) is refused rather than replaced.
    """
    try:
        old = _header_bytes(destination)
    except FileNotFoundError:
        old = None
    if old is not None and old != _header_bytes(source):
        raise ManifestCkptError(
            f"{destination} exists with another header than the file this save wrote under that name; refusing "
            "to replace a file the checkpoint may list. Save to a new path."
        )
    os.replace(source, destination)


def _header_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        return prefix + f.read(min(length, 100_000_000))


def sweep(target: Path, previous: set[str], *, referenced: Iterable[str] | None = None) -> None:
    """Delete what the manifest on disk now does not reference: ``previous`` files and leftovers.

    Call with ``target``'s lock held. Nothing is deleted when the manifest cannot be read.

    Args:
        referenced: the files the manifest on disk lists, when the caller has just written it
            (under the lock): re-reading and parsing it costs a second at 100,000 tensors.
    """
    if referenced is None:
        known = _read_referenced(target)
        if known is None:
            return
    else:
        known = {n for n in referenced if "/" not in n and not n.startswith(".")}
    for name in os.listdir(target):
        if name in known or name in (LOCK_NAME, MANIFEST_NAME):
            continue
        if name in previous or is_leftover(name):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                (target / name).unlink()


@contextlib.contextmanager
def begin(target: Path, *, overwrite: bool, fsync: bool = False) -> Iterator[Stage]:
    """Stage a write to checkpoint directory ``target``; the body must call ``Stage.commit``.

    Leaving the block without committing (an error, an interrupt) removes the staging
    directory; a killed process leaves it to the next writer of ``target``.

    Raises:
        CheckpointExistsError: see :meth:`Stage.commit`.
    """
    stage = open_stage(target, overwrite=overwrite, fsync=fsync)
    try:
        yield stage
    finally:
        stage.close()


def open_stage(target: Path, *, overwrite: bool, fsync: bool = False) -> Stage:
    """A new :class:`Stage` for ``target`` (call ``commit`` then, or ``close`` to abandon it)."""
    remove_abandoned_staging(target)
    while True:
        directory = target.parent / f".{target.name}.{secrets.token_hex(8)}{_STAGING_SUFFIX}"
        os.mkdir(directory, 0o755)
        # The lock file appears under its name already locked (created aside, then renamed),
        # so a cleaner never finds it unlocked while this writer is alive.
        fresh = directory / f"{LOCK_NAME}.new"
        try:
            lock = _flock(fresh, blocking=True, create=True)
        except FileNotFoundError:
            continue  # removed by a cleaner that took it for abandoned: take another name
        try:
            os.rename(fresh, directory / LOCK_NAME)
        except FileNotFoundError:
            os.close(lock)  # type: ignore[arg-type]
            continue
        os.chmod(directory, 0o755)
        return Stage(target, directory, overwrite, fsync, lock)
