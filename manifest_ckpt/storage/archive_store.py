"""Read a checkpoint packed in a tar archive in place: one mmap, members at their offsets (no torch).

The archive is indexed once (headers only, hostile members refused by
:func:`manifest_ckpt.storage.tar.index_archive`) and mapped once; each weights file is then the slice
``[member.offset, member.offset + member.size)`` of that one mapping. Nothing is extracted.
"""

from __future__ import annotations

import mmap
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from manifest_ckpt.errors import ArchiveError, CheckpointNotFoundError, IntegrityError, ManifestError
from manifest_ckpt.format.integrity import open_regular
from manifest_ckpt.format.manifest import MANIFEST_NAME
from manifest_ckpt.storage.store import MAX_MANIFEST_BYTES as _MAX_MANIFEST_BYTES
from manifest_ckpt.storage.store import MappedStore
from manifest_ckpt.storage.tar import ArchiveMember, index_archive, is_archive


@dataclass
class ArchiveStore(MappedStore):
    """A checkpoint inside one archive file, read through a single memory map.

    Attributes:
        path: the archive file.
        location: the archive path as given, for messages.
        members: the archive's regular files by normalized name.
    """

    path: Path
    location: str
    members: dict[str, ArchiveMember]
    _mapping: mmap.mmap | None = field(default=None, repr=False)
    _fd: int = field(default=-1, repr=False)

    def _map(self) -> mmap.mmap:
        if self._mapping is None:
            with open_regular(
                self.path, what="an archive", error=lambda message: ArchiveError(message, file=self.location)
            ) as f:
                size = os.fstat(f.fileno()).st_size
                end = max((m.offset + m.size for m in self.members.values()), default=0)
                if size < end:
                    raise IntegrityError(
                        f"{self.location}: the archive shrank to {size} bytes since it was indexed "
                        f"(members end at byte {end}); something is rewriting it",
                    )
                # ACCESS_COPY: writable private pages (torch needs a writable buffer), never
                # written back to the archive.
                self._mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                # Kept for read_into and file_size: the same archive, even if replaced by path.
                self._fd = os.dup(f.fileno())
                weakref.finalize(self, os.close, self._fd)
        return self._mapping

    def manifest_bytes(self) -> bytes:
        """The bytes of the archive's ``manifest.json`` member."""
        member = self.members[MANIFEST_NAME]  # present: checked by open_archive_store
        if member.size > _MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{self.location}/{MANIFEST_NAME}: {member.size} bytes is too large for a manifest",
                file=MANIFEST_NAME,
            )
        if member.size == 0:
            return b""
        return bytes(self._map()[member.offset : member.offset + member.size])

    def file_map(self, name: str) -> tuple[mmap.mmap, int, int]:
        """``(mapping of the whole archive, offset of member ``name`` in it, its size)``.

        Raises:
            IntegrityError: the archive has no such member, or it is empty.
        """
        member = self.members.get(name)
        if member is None:
            raise IntegrityError(
                f"{self.location}: weights file {name!r} listed in the manifest is not in the archive; "
                "re-create the archive with `manifest-ckpt pack`",
                file=name,
            )
        if member.size == 0:
            raise IntegrityError(f"{self.location}/{name}: file is empty (truncated)", file=name)
        return self._map(), member.offset, member.size

    def descriptor(self, name: str) -> tuple[int, int]:
        _, offset, _ = self.file_map(name)
        return self._fd, offset

    def file_size(self, name: str) -> int:
        """The member's size, or what is left of it if the archive was cut since it was indexed."""
        fd, offset = self.descriptor(name)
        size = self.members[name].size
        return min(size, max(0, os.fstat(fd).st_size - offset))


def open_archive_store(path: Path) -> ArchiveStore | None:
    """An archive store for ``path``, or None when it is not a tar archive at all.

    Raises:
        ArchiveError: the file is a tar archive but corrupt, truncated or hostile.
        CheckpointNotFoundError: a valid tar archive without ``manifest.json`` at its root.
    """
    if not is_archive(path):
        return None
    members = index_archive(path)
    if MANIFEST_NAME not in members:
        nested = sorted(name for name in members if name.endswith("/" + MANIFEST_NAME))
        hint = (
            f" It has {nested[0]!r}: archive the checkpoint's contents, not its directory "
            "(`manifest-ckpt pack CKPT OUT`)."
            if nested
            else " Create archives with `manifest-ckpt pack CKPT OUT`."
        )
        raise CheckpointNotFoundError(
            f"{path}: a tar archive without {MANIFEST_NAME} at its root, so not a manifest-ckpt archive.{hint}",
            file=str(path),
        )
    return ArchiveStore(path, str(path), members)
