"""Lineage chains: find a checkpoint's ancestors by digest, verify each one found, mark the rest.

A manifest records its parents as ``{digest, relation, name}`` (``save(..., parents=...)``).
Parents are found by *digest*, never by name: every checkpoint directory and archive under
the search directories is indexed by the digest in its manifest. A parent found that way is
then verified in full (schema, file binding, every tensor digest), which proves that the
bytes found are the content the child recorded. A parent that is not found is reported as
such, which is not a failure; a parent found whose bytes do not verify is one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from manifest_ckpt.errors import CheckpointNotFoundError, IntegrityError, ManifestCkptError
from manifest_ckpt.format.manifest import MANIFEST_NAME, Manifest
from manifest_ckpt.storage.archive_store import open_archive_store
from manifest_ckpt.storage.store import is_url, open_store, read_manifest, read_store_manifest
from manifest_ckpt.storage.tar import is_archive

PathLike = str | os.PathLike[str]
Status = Literal["verified", "found", "failed", "not found"]

__all__ = ["Ancestor", "Ancestry", "CheckpointIndex", "ancestry", "check_parents", "index_checkpoints", "short_digest"]

# Directories below a search root that are walked; deep enough for runs/<name>/<step>/ layouts,
# shallow enough that a search root such as $HOME does not mean a walk of the whole disk.
MAX_SEARCH_DEPTH = 6


def short_digest(digest: str) -> str:
    """``sha256:`` and the first 16 hex digits, for tables (JSON output keeps the full digest)."""
    return digest[:23]


@dataclass(frozen=True)
class CheckpointIndex:
    """Every checkpoint found under some search directories.

    Attributes:
        by_digest: checkpoint digest -> locations holding it (directories and archives), sorted.
        unreadable: location -> why it looked like a checkpoint but could not be read.
    """

    by_digest: Mapping[str, tuple[str, ...]]
    unreadable: Mapping[str, str] = field(default_factory=dict)


def index_checkpoints(
    search: Iterable[PathLike], *, storage_options: Mapping[str, Any] | None = None
) -> CheckpointIndex:
    """Index the checkpoints under ``search`` by digest (manifests only; no weights are read).

    A directory holding ``manifest.json`` is a checkpoint and is not descended into; any
    other regular file that is a tar archive is opened as an archive. Hidden entries
    (``.name``, where interrupted saves leave their staging directories) are skipped, and
    symbolic links to directories are not followed, so the walk cannot loop. A URL is
    searched by listing the ``manifest.json`` objects under it (archives there are not opened).

    Raises:
        CheckpointNotFoundError: a search path does not exist.
    """
    found: dict[str, set[str]] = {}
    unreadable: dict[str, str] = {}

    def add(location: Path | str, archive: bool) -> None:
        try:
            if archive:
                store = open_archive_store(Path(location))
                if store is None:
                    return
                digest = read_store_manifest(store).digest
            else:
                digest = read_manifest(location, storage_options=storage_options).digest
        except (ManifestCkptError, OSError) as exc:
            unreadable[str(location)] = str(exc).splitlines()[0]
            return
        found.setdefault(digest, set()).add(str(location))

    def walk(directory: Path, depth: int) -> None:
        if (directory / MANIFEST_NAME).is_file():
            add(directory, archive=False)
            return
        if depth > MAX_SEARCH_DEPTH:
            return
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            unreadable[str(directory)] = str(exc)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                walk(path, depth + 1)
            elif entry.is_dir():  # a link to a directory: only a checkpoint itself is taken
                if (path / MANIFEST_NAME).is_file():
                    add(path, archive=False)
            elif entry.is_file() and is_archive(path):
                add(path, archive=True)

    for root in search:
        if is_url(root):
            from manifest_ckpt.storage.remote import find_manifests

            for location in find_manifests(str(root), storage_options):
                add(location, archive=False)
            continue
        path = Path(root)
        if path.is_dir():
            walk(path, 0)
        elif path.is_file():
            add(path, archive=is_archive(path))
        else:
            raise CheckpointNotFoundError(f"{path}: search directory not found", file=str(path))
    return CheckpointIndex({d: tuple(sorted(locs)) for d, locs in sorted(found.items())}, unreadable)


@dataclass(frozen=True)
class Ancestor:
    """One recorded parent of a checkpoint in the chain, and what was found for it.

    Attributes:
        digest: the parent's checkpoint digest, as recorded by the child.
        relation: how the child derives from it (``fine-tuned-from``, ``converted-from``...).
        name: the label the child recorded (a base name), if any.
        child: the digest of the checkpoint that records this parent.
        depth: 1 for a parent, 2 for a grandparent, and so on.
        status: ``verified`` (found and every digest checked), ``found`` (found, not
            verified because verification was off), ``failed`` (found, but it does not
            verify) or ``not found``.
        location: where it was found (the one that verified, if several hold it).
        detail: why it failed, or why it was not found.
        repeated: it was already listed higher in the chain (merges share ancestors);
            its own parents are not listed again.
    """

    digest: str
    relation: str
    name: str | None
    child: str
    depth: int
    status: Status
    location: str | None = None
    detail: str | None = None
    repeated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "relation": self.relation,
            "name": self.name,
            "child": self.child,
            "depth": self.depth,
            "status": self.status,
            "location": self.location,
            "detail": self.detail,
            "repeated": self.repeated,
        }

    def line(self) -> str:
        """One human line: relation, digest, label, status and where."""
        label = f" ({self.name})" if self.name else ""
        where = f" at {self.location}" if self.location else ""
        # Verification errors list every bad tensor on further lines; the first line says enough here.
        tail = f": {self.detail.splitlines()[0].rstrip(':')}" if self.detail else ""
        again = ", listed above" if self.repeated else ""
        return f"{self.relation} {short_digest(self.digest)}{label}: {self.status}{where}{again}{tail}"


@dataclass(frozen=True)
class Ancestry:
    """A checkpoint and every ancestor reachable through recorded parents, depth first."""

    location: str
    digest: str
    ancestors: tuple[Ancestor, ...]
    searched: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """No ancestor that was found failed verification (missing ones are not failures)."""
        return all(a.status != "failed" for a in self.ancestors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.location,
            "digest": self.digest,
            "ok": self.ok,
            "searched": list(self.searched),
            "ancestors": [a.to_dict() for a in self.ancestors],
        }

    def __str__(self) -> str:
        lines = [f"{self.location}  {short_digest(self.digest)}"]
        if not self.ancestors:
            lines.append("└── no parents recorded")
        open_levels: list[bool] = []  # per depth: does a later sibling follow?
        for i, a in enumerate(self.ancestors):
            later_sibling = any(b.depth == a.depth for b in _until_shallower(self.ancestors[i + 1 :], a.depth))
            del open_levels[a.depth - 1 :]
            prefix = "".join("│   " if more else "    " for more in open_levels)
            lines.append(prefix + ("├── " if later_sibling else "└── ") + a.line())
            open_levels.append(later_sibling)
        counts = {s: sum(a.status == s for a in self.ancestors if not a.repeated) for s in _STATUSES}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        where = ", ".join(self.searched) if self.searched else "nowhere (give --search DIR)"
        lines.append(f"{summary or 'no ancestors'}; searched {where}")
        return "\n".join(lines)


_STATUSES: tuple[Status, ...] = ("verified", "found", "failed", "not found")


def _until_shallower(rest: tuple[Ancestor, ...], depth: int) -> list[Ancestor]:
    """The ancestors that follow, up to the first one above ``depth`` in the tree."""
    out = []
    for a in rest:
        if a.depth < depth:
            break
        out.append(a)
    return out


class _Resolver:
    """Finds parents in an index and verifies each digest at most once."""

    def __init__(
        self,
        index: CheckpointIndex | None,
        *,
        verify: bool,
        progress: bool,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.index = index
        self.storage_options = storage_options
        self.verify = verify
        self.progress = progress
        self._cache: dict[str, tuple[Status, str | None, str | None, Manifest | None]] = {}

    def resolve(self, digest: str) -> tuple[Status, str | None, str | None, Manifest | None]:
        """``(status, location, detail, manifest of what was found)`` for a parent digest."""
        if digest not in self._cache:
            self._cache[digest] = self._resolve(digest)
        return self._cache[digest]

    def _resolve(self, digest: str) -> tuple[Status, str | None, str | None, Manifest | None]:
        if self.index is None:
            return "not found", None, "no search directory given", None
        locations = self.index.by_digest.get(digest, ())
        if not locations:
            unreadable = len(self.index.unreadable)
            note = f" ({unreadable} unreadable checkpoints were skipped)" if unreadable else ""
            return "not found", None, f"no checkpoint with this digest under the search directories{note}", None
        if not self.verify:
            return "found", locations[0], None, read_manifest(locations[0], storage_options=self.storage_options)
        from manifest_ckpt.reader import verify_report  # imports torch

        failures = []
        for location in locations:
            try:
                verify_report(location, progress=self.progress, storage_options=self.storage_options)
            except (ManifestCkptError, OSError) as exc:
                # The message starts with the location, which the status line already shows.
                failures.append((location, str(exc).removeprefix(f"{location}: ")))
                continue
            return "verified", location, None, read_manifest(location, storage_options=self.storage_options)
        location, why = failures[0]
        more = f" ({len(failures) - 1} other copies fail too)" if len(failures) > 1 else ""
        try:
            manifest: Manifest | None = read_manifest(location, storage_options=self.storage_options)
        except (ManifestCkptError, OSError):
            manifest = None
        first, _, rest = why.partition("\n")
        return "failed", location, first.rstrip(":") + more + (":\n" + rest if rest else ""), manifest


def _walk(manifest: Manifest, resolver: _Resolver, *, max_depth: int | None) -> list[Ancestor]:
    """Every ancestor of ``manifest``, depth first, each digest expanded once."""
    out: list[Ancestor] = []
    expanded: set[str] = {manifest.digest}

    def visit(child: Manifest, depth: int) -> None:
        for parent in child.parents:
            digest = str(parent["digest"])
            repeated = digest in expanded
            status, location, detail, found = resolver.resolve(digest)
            out.append(
                Ancestor(
                    digest=digest,
                    relation=str(parent["relation"]),
                    name=parent.get("name"),
                    child=child.digest,
                    depth=depth,
                    status=status,
                    location=location,
                    detail=detail,
                    repeated=repeated,
                )
            )
            if repeated or found is None or (max_depth is not None and depth >= max_depth):
                continue
            expanded.add(digest)
            visit(found, depth + 1)

    visit(manifest, 1)
    return out


def ancestry(
    path: PathLike,
    *,
    search: Iterable[PathLike] = (),
    verify: bool = True,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Ancestry:
    """Walk a checkpoint's recorded parents, grandparents and so on, finding each by digest.

    Args:
        path: a checkpoint directory, ``manifest.json`` or archive.
        search: directories (walked recursively) and archive files where ancestors may be.
        verify: verify every ancestor found in full (all tensor digests), so a found
            ancestor is proven to be the content its child recorded.
        progress: show verification progress on stderr when it is a terminal.
        storage_options: fsspec options for URLs in ``path`` and ``search``.

    Returns:
        The chain; ``.ok`` is False when an ancestor was found but does not verify.

    Raises:
        CheckpointNotFoundError: ``path`` or a search directory does not exist.
        ManifestError: the checkpoint's own manifest is invalid.
    """
    store = open_store(path, storage_options=storage_options)
    manifest = read_store_manifest(store)
    roots = [os.fspath(s) for s in search]
    index = index_checkpoints(roots, storage_options=storage_options) if roots else None
    resolver = _Resolver(index, verify=verify, progress=progress, storage_options=storage_options)
    return Ancestry(store.location, manifest.digest, tuple(_walk(manifest, resolver, max_depth=None)), tuple(roots))


def check_parents(
    manifest: Manifest,
    location: str,
    search: Iterable[PathLike],
    *,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Find and verify a checkpoint's direct parents (for ``verify``).

    Returns:
        ``{"parents": [Ancestor.to_dict()...], "parents_text": [one line per parent]}``.

    Raises:
        IntegrityError: a parent was found by digest but does not verify.
        CheckpointNotFoundError: a search directory does not exist.
    """
    roots = [os.fspath(s) for s in search]
    index = index_checkpoints(roots, storage_options=storage_options) if roots else None
    resolver = _Resolver(index, verify=True, progress=progress, storage_options=storage_options)
    parents = _walk(manifest, resolver, max_depth=1)
    failed = [a for a in parents if a.status == "failed"]
    if failed:
        listing = "\n".join(f"  parent {a.line()}" for a in failed)
        raise IntegrityError(
            f"{location}: {len(failed)} recorded parents were found but do not verify:\n{listing}\n"
            "The copies found are corrupt or were altered; restore them from a good copy.",
            file=failed[0].location,
        )
    return {"parents": [a.to_dict() for a in parents], "parents_text": [f"parent {a.line()}" for a in parents]}
