"""The manifest document as frozen dataclasses (no torch import).

``Manifest.from_dict`` validates a parsed ``manifest.json`` against the published JSON Schema
and then checks what a schema cannot express (byte ranges that fit their dtype and shape,
aliases that point at stored tensors, the recorded digest). ``Manifest.to_json`` writes the
canonical bytes: the same manifest always serialises to the same bytes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import operator
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from manifest_ckpt.errors import ManifestError, UnsupportedVersionError
from manifest_ckpt.format import canonical
from manifest_ckpt.format import dtypes as _dtypes
from manifest_ckpt.format import jsonio as _jsonio
from manifest_ckpt.format import values as _values
from manifest_ckpt.gc_pause import gc_paused

FORMAT_NAME: Final = "manifest-ckpt"
FORMAT_VERSION: Final = "1.2.0"
"""The newest format version this release reads and writes."""
BASE_FORMAT_VERSION: Final = "1.0.0"
"""Written when a manifest uses nothing added since 1.0 (weights checkpoints stay as they were)."""
STATE_FORMAT_VERSION: Final = "1.1.0"
"""Written for a training state (``extensions.state``) that records no module extra state."""
# Extensions that are content, not record: the digest covers them (docs/format.md §4).
CONTENT_EXTENSIONS: Final = ("state", "extra_state")
EXTRA_STATE_NAME: Final = "_extra_state"
"""The last segment of a module's extra-state key (torch's ``_EXTRA_STATE_KEY_SUFFIX``)."""
MANIFEST_NAME: Final = "manifest.json"
# ASCII digits only ("²" is a digit to str.isdigit but not to int()); nine digits is plenty.
_VERSION: Final = re.compile(r"[0-9]{1,9}\.[0-9]{1,9}\.[0-9]{1,9}")


class FormatVersionWarning(UserWarning):
    """The manifest was written by a newer minor version of the format."""


def _path(*parts: str | int) -> str:
    """A JSON path such as ``$.tensors["fc.weight"].shape`` for error messages."""
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else ("." + part if part.isidentifier() else f"[{json.dumps(part)}]")
    return out


@dataclass(frozen=True)
class FileEntry:
    """One weights file: its size and the sha256 of its safetensors header."""

    size: int
    header_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "header_sha256": self.header_sha256}


@dataclass(frozen=True)
class Chunk:
    """A rectangular piece of a tensor stored contiguously in one file.

    ``offsets`` is the chunk's position in the global tensor; ``byte_range`` is absolute
    within ``file`` (from the start of the file, not of the safetensors data section).
    """

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    file: str
    byte_range: tuple[int, int]
    digest: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "offsets": list(self.offsets),
            "shape": list(self.shape),
            "file": self.file,
            "byte_range": list(self.byte_range),
            "digest": self.digest,
        }


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: whole in one file (``file``/``byte_range``) or split in ``chunks``."""

    dtype: str
    shape: tuple[int, ...]
    digest: str
    file: str | None = None
    byte_range: tuple[int, int] | None = None
    chunks: tuple[Chunk, ...] | None = None

    @property
    def nbytes(self) -> int:
        return _dtypes.nbytes(self.dtype, self.shape)

    def pieces(self) -> tuple[Chunk, ...]:
        """The tensor as chunks; a whole tensor is one chunk at offset zero."""
        if self.chunks is not None:
            return self.chunks
        assert self.file is not None and self.byte_range is not None
        return (Chunk((0,) * len(self.shape), self.shape, self.file, self.byte_range, self.digest),)

    def fields(self) -> tuple[tuple[str, Any], ...]:
        """``to_dict()``'s items in sorted order, values as they are (for ``canonical.table``)."""
        if self.chunks is not None:
            chunks = [c.to_dict() for c in self.chunks]
            return (("chunks", chunks), ("digest", self.digest), ("dtype", self.dtype), ("shape", self.shape))
        byte_range = self.byte_range or ()
        return (("byte_range", byte_range), ("digest", self.digest), ("dtype", self.dtype), ("file", self.file), ("shape", self.shape))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape), "digest": self.digest}
        if self.chunks is not None:
            out["chunks"] = [c.to_dict() for c in self.chunks]
        else:
            out["file"] = self.file
            out["byte_range"] = list(self.byte_range or ())
        return out


@dataclass(frozen=True)
class ModuleEntry:
    """One submodule: its class, ``_version`` and the names of the tensors it owns directly."""

    cls: str | None
    version: int | None
    parameters: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()
    non_persistent_buffers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": self.cls,
            "version": self.version,
            "parameters": list(self.parameters),
            "buffers": list(self.buffers),
            "non_persistent_buffers": list(self.non_persistent_buffers),
        }

    def fields(self) -> tuple[tuple[str, Any], ...]:
        """``to_dict()``'s items in sorted order, values as they are (for ``canonical.table``)."""
        return (
            ("buffers", self.buffers),
            ("class", self.cls),
            ("non_persistent_buffers", self.non_persistent_buffers),
            ("parameters", self.parameters),
            ("version", self.version),
        )

    def persistent_names(self) -> tuple[str, ...]:
        """Names whose tensors appear in the state dict."""
        return self.parameters + self.buffers


class _TensorTable(Mapping[str, "TensorEntry"]):
    """The tensors of a manifest read from JSON: its validated entries, each built into a
    :class:`TensorEntry` when first looked up.

    A mixture-of-experts manifest has 100,000 tensors; reading one builds no entry, and
    check, load and the digest read the JSON entries directly (:func:`json_entries`). As it
    is built, the table checks every whole tensor's byte range against ``files`` (the
    common case, in one tight loop) and rewrites the entries that hold integral floats with
    Python ints, so the JSON entries read like ``TensorEntry.to_dict()``. ``irregular`` lists
    the keys the manifest's full rules must still look at: chunked tensors and any whose
    range did not check out. ``digest_rows`` holds the content digest's rows, gathered in
    the same pass, until the manifest's consistency pass has used them (then None).
    """

    __slots__ = ("_built", "_entries", "checked_sizes", "digest_rows", "irregular")

    def __init__(self, entries: dict[str, dict[str, Any]], files: Mapping[str, FileEntry]) -> None:
        self._entries = entries
        self._built: dict[str, TensorEntry] = {}
        self.checked_sizes = {name: f.size for name, f in files.items()}
        self.irregular, rows = _irregular(entries, self.checked_sizes)
        for key in self.irregular:  # integral floats (8.0) become ints, as in TensorEntry
            entry = entries[key] = _tensor_from_dict(entries[key]).to_dict()
            rows[key] = (entry["dtype"], entry["shape"], entry["digest"])
        self.digest_rows: dict[str, Any] | None = rows

    def __getitem__(self, key: str) -> TensorEntry:
        entry = self._built.get(key)
        if entry is None:
            entry = self._built[key] = _tensor_from_dict(self._entries[key])
        return entry

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} tensors)"


class _ModuleTable(Mapping[str, "ModuleEntry"]):
    """The module tree of a manifest read from JSON: entries built when first looked up.

    Versions written as integral floats become ints as the table is built, so the JSON
    entries read like ``ModuleEntry.to_dict()`` (:func:`json_modules`).
    """

    __slots__ = ("_built", "_entries")

    def __init__(self, entries: dict[str, dict[str, Any]]) -> None:
        for entry in entries.values():
            if type(entry["version"]) is float:
                entry["version"] = int(entry["version"])
        self._entries = entries
        self._built: dict[str, ModuleEntry] = {}

    def __getitem__(self, path: str) -> ModuleEntry:
        entry = self._built.get(path)
        if entry is None:
            entry = self._built[path] = _module_from_dict(self._entries[path])
        return entry

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} modules)"


def json_entries(tensors: Mapping[str, TensorEntry]) -> Mapping[str, Mapping[str, Any]] | None:
    """The JSON entries behind a manifest's tensors, when it was read from JSON, else None.

    Each is what ``TensorEntry.to_dict()`` gives (shapes and byte ranges as lists of ints):
    hot paths read these instead of building 100,000 entries. Read-only by contract.
    """
    return tensors._entries if isinstance(tensors, _TensorTable) else None


def json_modules(modules: Mapping[str, ModuleEntry] | None) -> Mapping[str, Mapping[str, Any]] | None:
    """The JSON entries behind a manifest's module tree (as ``ModuleEntry.to_dict()``), or None."""
    return modules._entries if isinstance(modules, _ModuleTable) else None


def declared_keys(modules: Mapping[str, ModuleEntry]) -> set[str]:
    """Every state-dict key the module tree declares (parameters and persistent buffers)."""
    entries = json_modules(modules)
    if entries is None:
        return {f"{path}.{name}" if path else name for path, m in modules.items() for name in m.persistent_names()}
    # One comprehension over every module (half the time of a loop that updates a set per module).
    declared = {f"{path}.{name}" for path, m in entries.items() if path for names in (m["parameters"], m["buffers"]) for name in names}
    root = entries.get("")
    if root is not None:
        declared.update(root["parameters"], root["buffers"])
    return declared


def _irregular(
    entries: Mapping[str, Mapping[str, Any]], sizes: Mapping[str, int]
) -> tuple[list[str], dict[str, Any]]:
    """The keys of entries that are not a whole tensor of Python ints whose byte range fits its
    dtype, shape and file: chunked tensors, integral floats, and every rule broken. Also each
    entry's ``(dtype, shape, digest)``, the content digest's rows, gathered in the same pass."""
    keys = list(entries)
    values = list(entries.values())
    try:
        columns = [list(map(operator.itemgetter(name), values)) for name in ("dtype", "shape", "digest")]
        rows = dict(zip(keys, zip(*columns)))
        if _all_regular(values, columns[0], columns[1], sizes):
            return [], rows
    except (KeyError, TypeError):  # a field missing (a chunked tensor), a file not listed
        rows = {key: (t["dtype"], t["shape"], t["digest"]) for key, t in entries.items()}
    return _irregular_keys(entries, sizes), rows


def _all_regular(
    values: list[Mapping[str, Any]], dtypes: list[str], shapes: list[list[Any]], sizes: Mapping[str, int]
) -> bool:
    """Whether every entry is a whole tensor of Python ints whose byte range fits (column-wise,
    in C: 100,000 entries in a few tens of milliseconds instead of a Python loop)."""
    if any(map((5).__ne__, map(len, values))):  # dtype, shape, digest, file, byte_range: whole
        return False
    ranges = list(map(operator.itemgetter("byte_range"), values))
    starts = list(map(operator.itemgetter(0), ranges))
    ends = list(map(operator.itemgetter(1), ranges))
    itemsize = {name: size for name, (_, size) in _dtypes.DTYPES.items()}
    counts = list(map(operator.sub, ends, starts))
    needed = list(map(operator.mul, map(itemsize.__getitem__, dtypes), map(math.prod, shapes)))
    # == holds between 8 and 8.0: the types prove every operand was an int (the schema's
    # "integer" admits integral floats, which must become ints first). Counts equal to a
    # byte count (>= 0) put each start at or before its end; starts are >= 0 by the schema.
    if counts != needed or {*map(type, counts), *map(type, needed)} != {int}:
        return False
    file_sizes = map(sizes.__getitem__, map(operator.itemgetter("file"), values))
    return all(map(operator.le, ends, file_sizes))


def _irregular_keys(entries: Mapping[str, Mapping[str, Any]], sizes: Mapping[str, int]) -> list[str]:
    """:func:`_irregular`'s keys, entry by entry: where the column-wise check found an exception."""
    itemsize = {name: size for name, (_, size) in _dtypes.DTYPES.items()}
    prod = math.prod
    irregular = []
    for key, t in entries.items():
        if len(t) != 5:
            irregular.append(key)
            continue
        start, end = t["byte_range"]
        size = sizes.get(t["file"])
        count = end - start
        n = itemsize[t["dtype"]] * prod(t["shape"])
        # type() is int only when every operand was: an integral float (8.0) makes it float.
        if size is None or count != n or not start <= end <= size or type(count) is not int or type(n) is not int:
            irregular.append(key)
    return irregular


def required_version(extensions: Any) -> str:
    """The format version a manifest with these ``extensions`` must declare (the oldest that has them)."""
    if isinstance(extensions, Mapping) and "extra_state" in extensions:
        return FORMAT_VERSION
    if isinstance(extensions, Mapping) and "state" in extensions:
        return STATE_FORMAT_VERSION
    return BASE_FORMAT_VERSION


def compute_digest(
    tensors: Mapping[str, TensorEntry],
    aliases: Mapping[str, str],
    modules: Mapping[str, ModuleEntry] | None,
    extensions: Any = None,
) -> str:
    """The checkpoint's content identity: tensor digests, shapes, dtypes, aliases, module tree.

    File names, byte offsets, lineage and metadata are left out on purpose, so the same
    weights split differently across files, or re-saved later, keep their identity. The
    content extensions (the application-state tree of a training state) are covered: two
    training states that differ only in a step count are different checkpoints.
    """
    table = tensors if isinstance(tensors, _TensorTable) else None
    module_entries = json_modules(modules)
    # Tensors, aliases and modules hold strings, ints and None only: canonical.compact writes
    # them (the same bytes as json.dumps, several times faster). Extensions may hold floats:
    # json.dumps writes those, and the parts are joined in sorted key order, as json would.
    parts: dict[str, bytes] = {
        "format": json.dumps(f"{FORMAT_NAME}/1").encode(),
        "tensors": canonical.compact(
            {k: [t.dtype, list(t.shape), t.digest] for k, t in tensors.items()}
            if table is None
            else table.digest_rows
            if table.digest_rows is not None
            else {k: [t["dtype"], t["shape"], t["digest"]] for k, t in table._entries.items()}
        ),
        "aliases": canonical.compact(dict(aliases)),
        "modules": canonical.compact(
            None
            if modules is None
            else module_entries
            if module_entries is not None
            else {p: m.to_dict() for p, m in modules.items()}
        ),
    }
    if isinstance(extensions, Mapping):
        for name in CONTENT_EXTENSIONS:
            if name in extensions:
                text = json.dumps(_plain(extensions[name]), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
                parts[name] = text.encode()
    # The hash of b"{" + b",".join(b'"name":' + part for each name in order) + b"}", fed piece by
    # piece: the tensors' part of a 100,000-tensor manifest is 15 MB, not worth copying again.
    h = hashlib.sha256()
    for i, name in enumerate(sorted(parts)):
        h.update(b'%s"%s":' % (b"," if i else b"{", name.encode()))
        h.update(parts[name])
    h.update(b"}")
    return "sha256:" + h.hexdigest()


def compute_record_digest(lineage: Mapping[str, Any], metadata: Any, extensions: Any) -> str:
    """The ``record_digest`` of a manifest: canonical JSON of lineage, metadata and extensions."""
    blob = json.dumps(
        {"lineage": _plain(lineage), "metadata": _plain(metadata), "extensions": _plain(extensions)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def chunked_digest(chunks: tuple[Chunk, ...]) -> str:
    """The digest of a chunked tensor: over each chunk's position, shape and digest."""
    blob = json.dumps(
        [[list(c.offsets), list(c.shape), c.digest] for c in sorted(chunks, key=lambda c: c.offsets)],
        separators=(",", ":"),
    ).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. Build one with :meth:`from_dict`, or let ``save`` write it."""

    digest: str
    files: Mapping[str, FileEntry]
    tensors: Mapping[str, TensorEntry]
    aliases: Mapping[str, str]
    modules: Mapping[str, ModuleEntry] | None
    lineage: Mapping[str, Any]
    metadata: Any = None
    format_version: str = FORMAT_VERSION
    extensions: Any = None
    # Where it was read from, for messages; not part of the document.
    source: str | None = field(default=None, compare=False)

    # -- reading -------------------------------------------------------------------------
    @classmethod
    def from_json(cls, data: bytes, *, file: str | None = None) -> Manifest:
        """Parse and validate ``manifest.json`` bytes.

        Raises:
            ManifestError: the bytes are not JSON, or the document is invalid.
            UnsupportedVersionError: the format's major version is not 1.
        """
        with gc_paused():  # parsing and building 100,000 entries allocates no cycles
            fast = _jsonio.decode_fast(data)
            if fast is not None:
                document, key_bound = fast
                # The quick way holds only for a schema-valid document without a repeated key;
                # anything else is parsed again strictly, so errors come as they always did.
                if _schema_valid(document) and _count_manifest_keys(document) == key_bound:
                    return cls._from_valid(document, file=file)
            document = _jsonio.loads(
                data,
                where=file or "manifest",
                what="a manifest-ckpt manifest (the file is damaged or is not one; re-save the checkpoint "
                "or restore the file)",
                error=lambda message: ManifestError(message, file=file),
            )
            return cls.from_dict(document, file=file)

    @classmethod
    def from_dict(cls, document: Any, *, file: str | None = None) -> Manifest:
        """Validate a parsed manifest document and build the dataclasses.

        Raises:
            ManifestError: schema violation or internal inconsistency; ``.field`` names the path.
            UnsupportedVersionError: the format's major version is not 1.
        """
        where = file or "manifest"
        _check_version(document, where, file)
        _check_free_form(document, where, file)
        from manifest_ckpt.format.schema import validate

        validate(document, file=file)
        return cls._build(document, file=file)

    @classmethod
    def _from_valid(cls, document: dict[str, Any], *, file: str | None) -> Manifest:
        """:meth:`from_dict` of a document already known to follow the schema."""
        where = file or "manifest"
        _check_version(document, where, file)
        _check_free_form(document, where, file)
        return cls._build(document, file=file, owned=True)

    @classmethod
    def _build(cls, document: dict[str, Any], *, file: str | None, owned: bool = False) -> Manifest:
        """The manifest of a schema-valid document, after the rules the schema cannot express.

        ``owned``: the document was parsed here and nobody else holds it, so its tensor and
        module entries can back the manifest as they are (built into entries when looked up).
        """
        where = file or "manifest"
        files = {name: FileEntry(int(f["size"]), f["header_sha256"]) for name, f in document["files"].items()}
        tensors: Mapping[str, TensorEntry]
        modules: Mapping[str, ModuleEntry] | None
        if owned:
            tensors = _TensorTable(document["tensors"], files)
            modules = None if document["modules"] is None else _ModuleTable(document["modules"])
        else:
            tensors = MappingProxyType({key: _tensor_from_dict(t) for key, t in document["tensors"].items()})
            built = modules_from_dict(document["modules"])
            modules = None if built is None else MappingProxyType(built)
        manifest = cls(
            digest=document["digest"],
            files=MappingProxyType(files),
            tensors=tensors,
            aliases=MappingProxyType(dict(document["aliases"])),
            modules=modules,
            lineage=document["lineage"],
            metadata=document.get("metadata"),
            format_version=document["format_version"],
            extensions=document.get("extensions"),
            source=file,
        )
        problems = list(manifest.iter_consistency_problems())
        if isinstance(tensors, _TensorTable):
            tensors.digest_rows = None  # used by the digest above; not kept with the manifest
        if document["record_digest"] != manifest.record_digest:
            problems.append(
                ("$.record_digest", f"is {document['record_digest']}, lineage and metadata give {manifest.record_digest}")
            )
        if problems:
            field_path, _ = problems[0]
            listing = "\n".join(f"  {p}: {msg}" for p, msg in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise ManifestError(
                f"{where}: the manifest is inconsistent:\n{listing}{more}\n"
                "It was edited by hand or damaged; re-save the checkpoint from its source.",
                file=file,
                field=field_path,
            )
        return manifest

    def iter_consistency_problems(self) -> Iterator[tuple[str, str]]:
        """Yield ``(json_path, message)`` for every rule the schema cannot express."""
        files = self.files
        tensors = self.tensors
        # A table read from JSON has checked its whole tensors' byte ranges as it was built,
        # against these very file sizes: only the others need the full rules here.
        if isinstance(tensors, _TensorTable) and tensors.checked_sizes == {n: f.size for n, f in files.items()}:
            keys: Iterable[str] = tensors.irregular
        else:
            keys = tensors
        for key in keys:
            t = tensors[key]
            if t.chunks is None:
                assert t.file is not None and t.byte_range is not None
                # The rules of _check_range, inline for the common valid case (no generator
                # per tensor: this loop runs 100,000 times for a mixture-of-experts manifest).
                start, end = t.byte_range
                entry = files.get(t.file)
                if entry is not None and start <= end <= entry.size and end - start == _dtypes.nbytes(t.dtype, t.shape):
                    continue
                yield from _check_range(files, ("tensors", key), t.file, t.byte_range, t.dtype, t.shape)
                continue
            if t.digest != chunked_digest(t.chunks):
                yield _path("tensors", key, "digest"), "does not match the digest of its chunks"
            covered = 0
            well_formed: list[tuple[int, Chunk]] = []
            first_in_file: dict[str, int] = {}
            for i, c in enumerate(t.chunks):
                at = _path("tensors", key, "chunks", i)
                parts = ("tensors", key, "chunks", i)
                # The reader finds a chunk under the tensor's own key in its file's header.
                j = first_in_file.setdefault(c.file, i)
                if j != i:
                    yield at + ".file", f"names {c.file!r} like chunk {j}; a file holds at most one chunk of a tensor"
                if len(c.offsets) != len(t.shape) or len(c.shape) != len(t.shape):
                    yield at, f"has rank {len(c.shape)}, the tensor has rank {len(t.shape)}"
                    continue
                if any(o + s > d for o, s, d in zip(c.offsets, c.shape, t.shape)):
                    yield at, f"offsets {list(c.offsets)} + shape {list(c.shape)} exceed the tensor shape {list(t.shape)}"
                covered += _dtypes.nbytes(t.dtype, c.shape)
                well_formed.append((i, c))
                yield from _check_range(self.files, parts, c.file, c.byte_range, t.dtype, c.shape)
            if covered != t.nbytes:
                yield _path("tensors", key, "chunks"), f"cover {covered} bytes, the tensor has {t.nbytes}"
            # Equal byte counts are not enough: two overlapping chunks would leave a hole that
            # load never fills, so the chunks must also be disjoint (then they tile the tensor).
            overlap = _overlapping_chunks(well_formed)
            if overlap is not None:
                i, j = overlap
                yield _path("tensors", key, "chunks", j), f"overlaps chunk {i}; chunks must tile the tensor exactly"
        for alias, target in self.aliases.items():
            if alias in self.tensors:
                yield _path("aliases", alias), "is also a stored tensor; an alias must not be stored twice"
            if target not in self.tensors:
                yield _path("aliases", alias), f"points at {target!r}, which is not a stored tensor"
        if self.modules is not None:
            declared = declared_keys(self.modules)
            stored = set(self.tensors) | set(self.aliases)
            for key in sorted(declared - stored):
                yield _path("modules"), f"declares {key!r}, which is neither stored nor an alias"
            for key in sorted(stored - declared - self.extra_state_refs()):
                yield _path("tensors", key), "is stored but no module in the tree declares it"
        yield from self._extra_state_problems()
        yield from self._state_problems()
        expected = compute_digest(self.tensors, self.aliases, self.modules, self.extensions)
        if self.digest != expected:
            yield "$.digest", f"is {self.digest}, the content gives {expected}"

    def _state_problems(self) -> Iterator[tuple[str, str]]:
        """The rules of a training state's entry tree (docs/format.md §8)."""
        state = self.state
        if state is None:
            return
        at = "$.extensions.state"
        if self.modules is not None:
            yield "$.modules", "must be null in a training state (each module entry carries its own tree)"
        if self.format_version.split(".")[:2] == BASE_FORMAT_VERSION.split(".")[:2]:
            yield "$.format_version", f"is {self.format_version}; a training state needs {STATE_FORMAT_VERSION} or later"
        yield from ((at + p, msg) for p, msg in _values.duplicate_names(state))
        stored = set(self.tensors) | set(self.aliases)
        seen: dict[str, str] = {}
        for tag, key, where in _values.iter_refs(state):
            if key not in stored:
                yield at + where, f"references {key!r}, which is neither a stored tensor nor an alias"
                continue
            if key in seen:
                yield at + where, f"references {key!r}, already referenced at {at}{seen[key]}; store a shared value once"
            seen.setdefault(key, where)
            if tag != "tensor":
                entry = self.entry(key)
                if entry.dtype != "uint8" or len(entry.shape) != 1:
                    yield _path("tensors", key), f"holds {tag} and must be uint8[n], found {_dtypes.describe(entry.dtype, entry.shape)}"
        for key in sorted(stored - set(seen) - self.extra_state_refs()):
            yield _path("tensors", key) if key in self.tensors else _path("aliases", key), (
                "is stored but no entry of the application state references it"
            )
        # Module extra state of a training state belongs to a module entry, by its key.
        owners = {body["prefix"] for _, tag, body in _values.iter_entries(state) if tag == "module"}
        for key in self.extra_state:
            if not any(key.startswith(prefix) for prefix in owners):
                yield f'$.extensions.extra_state["{key}"]', "is under no module entry of the application state"

    @property
    def extra_state(self) -> Mapping[str, Any]:
        """Module extra state by key (``$.extensions.extra_state``): ``{key: value node}``, maybe empty."""
        if isinstance(self.extensions, Mapping):
            extra = self.extensions.get("extra_state")
            if isinstance(extra, Mapping):
                return extra
        return {}

    def extra_state_refs(self) -> set[str]:
        """The stored tensors that hold (parts of) module extra state, not state-dict tensors."""
        return {key for node in self.extra_state.values() for _, key, _ in _values.iter_refs(node)}

    def _extra_state_problems(self) -> Iterator[tuple[str, str]]:
        """The rules of ``$.extensions.extra_state`` (docs/format.md §9)."""
        if isinstance(self.extensions, Mapping) and "extra_state" in self.extensions:
            if not isinstance(self.extensions["extra_state"], Mapping):
                yield "$.extensions.extra_state", "must be an object of extra-state keys"
                return
            if [int(p) for p in self.format_version.split(".")[:2]] < [int(p) for p in FORMAT_VERSION.split(".")[:2]]:
                yield "$.format_version", f"is {self.format_version}; module extra state needs {FORMAT_VERSION} or later"
        seen: dict[str, str] = {}
        for key, node in self.extra_state.items():
            at = f'$.extensions.extra_state["{key}"]'
            if key.rpartition(".")[2] != EXTRA_STATE_NAME:
                yield at, f"is not an extra-state key (its last segment must be {EXTRA_STATE_NAME!r})"
            if key in self.aliases:
                yield at, "is also an alias; extra state is stored once"
            yield from ((at + p, msg) for p, msg in _values.duplicate_names(node))
            for _, ref, where in _values.iter_refs(node):
                if ref not in self.tensors:
                    yield at + where, f"references {ref!r}, which is not a stored tensor"
                elif ref in seen:
                    yield at + where, f"references {ref!r}, already referenced by {seen[ref]!r}"
                seen.setdefault(ref, key)

    @property
    def state(self) -> Mapping[str, Any] | None:
        """The application-state tree of a training state (``$.extensions.state``), else None."""
        if isinstance(self.extensions, Mapping):
            state = self.extensions.get("state")
            if isinstance(state, Mapping):
                return state
        return None

    # -- writing -------------------------------------------------------------------------
    def to_dict(self, *, entries: bool = True) -> dict[str, Any]:
        """The JSON document, as it is written to ``manifest.json``.

        Args:
            entries: build the ``tensors`` and ``modules`` mappings (``to_json`` writes them
                from the entries' fields instead, and leaves them ``None`` here).
        """
        out: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "digest": self.digest,
            "record_digest": self.record_digest,
            "files": {name: f.to_dict() for name, f in self.files.items()},
            "tensors": {key: t.to_dict() for key, t in self.tensors.items()} if entries else None,
            "aliases": dict(self.aliases),
            "modules": None if self.modules is None or not entries else {p: m.to_dict() for p, m in self.modules.items()},
            "lineage": _plain(self.lineage),
        }
        if self.metadata is not None:
            out["metadata"] = _plain(self.metadata)
        if self.extensions is not None:
            out["extensions"] = _plain(self.extensions)
        return out

    @property
    def record_digest(self) -> str:
        """Digest of what ``digest`` leaves out (lineage, metadata, extensions).

        Not an identity: it lets ``verify`` notice a changed byte in those fields.
        """
        return compute_record_digest(self.lineage, self.metadata, self.extensions)

    def to_json(self) -> bytes:
        """Canonical bytes: sorted keys, fixed separators, trailing newline."""
        # canonical.dumps is json.dumps(..., sort_keys=True, indent=1, ensure_ascii=False), faster;
        # the tensors and modules are written from their fields (no dict per entry).
        # 100,000 entries' text allocates no cycles: collections would traverse the heap for nothing.
        with gc_paused():
            document = self.to_dict(entries=False)
            document["tensors"] = canonical.table(((k, t.fields()) for k, t in self.tensors.items()), 1)
            if self.modules is not None:
                document["modules"] = canonical.table(((p, m.fields()) for p, m in self.modules.items()), 1)
            return (canonical.dumps(document) + "\n").encode()

    # -- queries -------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every state-dict key, stored or alias, sorted."""
        if not self.aliases:  # a manifest read lists its tensors sorted: checked, not sorted again
            keys = list(self.tensors)
            return keys if all(map(operator.lt, keys, keys[1:])) else sorted(keys)
        return sorted([*self.tensors, *self.aliases])

    def entry(self, key: str) -> TensorEntry:
        """The stored entry for ``key``, following an alias."""
        return self.tensors[self.aliases.get(key, key)]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def parents(self) -> list[Mapping[str, Any]]:
        return list(self.lineage.get("parents", []))


def _schema_valid(document: Any) -> bool:
    from manifest_ckpt.format.schema import is_valid

    return is_valid(document)


def _count_manifest_keys(document: dict[str, Any]) -> int:
    """The object keys of a schema-valid manifest document, counted by its known shape.

    The schema fixes where objects can be: file, tensor, chunk and module entries hold no
    object but a tensor's chunks; only lineage, metadata and extensions are free-form.
    """
    count = len(document) + len(document["files"]) + len(document["tensors"]) + len(document["aliases"])
    count += sum(map(len, document["files"].values()))
    tensors = document["tensors"].values()
    count += sum(map(len, tensors))
    count += sum(sum(map(len, t["chunks"])) for t in tensors if "chunks" in t)
    modules = document["modules"]
    if modules is not None:
        count += len(modules) + sum(map(len, modules.values()))
    for name in ("lineage", "metadata", "extensions"):
        count += _jsonio.count_keys(document.get(name))
    return count


def modules_from_dict(modules: Mapping[str, Any] | None) -> dict[str, ModuleEntry] | None:
    """The module tree from its JSON form (``None`` stays ``None``: saved from a state dict)."""
    if modules is None:
        return None
    return {path: _module_from_dict(m) for path, m in modules.items()}


def _module_from_dict(m: Mapping[str, Any]) -> ModuleEntry:
    return module_entry(
        m["class"],
        None if m["version"] is None else int(m["version"]),
        tuple(m["parameters"]),
        tuple(m["buffers"]),
        tuple(m["non_persistent_buffers"]),
    )


def module_entry(
    cls: str | None,
    version: int | None,
    parameters: tuple[str, ...],
    buffers: tuple[str, ...],
    non_persistent_buffers: tuple[str, ...],
) -> ModuleEntry:
    """``ModuleEntry(...)`` without the frozen dataclass's ``__init__`` (see :func:`_whole_tensor`):
    a mixture-of-experts module tree has 50,000 entries."""
    entry: ModuleEntry = _new_object(ModuleEntry)
    entry.__dict__.update(
        cls=cls, version=version, parameters=parameters, buffers=buffers, non_persistent_buffers=non_persistent_buffers
    )
    return entry


def _plain(value: Any) -> Any:
    """Turn read-only mappings back into dicts for JSON."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _ints(values: Any) -> tuple[int, ...]:
    """Schema-valid JSON integers as Python ints.

    JSON Schema counts integral floats such as ``8.0`` as integers; they must not reach
    slicing or tensor shapes as floats (and they digest as the ints they stand for).
    """
    out = tuple(values)
    # Fast path: almost always plain ints already (type() also excludes bool, which the schema refused).
    if all(type(v) is int for v in out):
        return out
    return tuple(int(v) for v in out)


def _range(values: Any) -> tuple[int, int]:
    start, end = values
    if type(start) is int and type(end) is int:  # the usual case, without _ints' generator
        return start, end
    start, end = _ints(values)
    return start, end


_new_object = object.__new__


def _whole_tensor(dtype: str, shape: tuple[int, ...], digest: str, file: str, byte_range: tuple[int, int]) -> TensorEntry:
    """``TensorEntry(dtype, shape, digest, file, byte_range)`` without the frozen dataclass's
    ``__init__``, which sets each field through ``object.__setattr__``: twice as fast, and a
    manifest of a mixture-of-experts model has 100,000 entries (a test compares both)."""
    entry: TensorEntry = _new_object(TensorEntry)
    entry.__dict__.update(dtype=dtype, shape=shape, digest=digest, file=file, byte_range=byte_range, chunks=None)
    return entry


def _tensor_from_dict(t: Mapping[str, Any]) -> TensorEntry:
    chunks = t.get("chunks")
    if chunks is None and "byte_range" in t and "file" in t:
        return _whole_tensor(t["dtype"], _ints(t["shape"]), t["digest"], t["file"], _range(t["byte_range"]))
    return TensorEntry(
        dtype=t["dtype"],
        shape=_ints(t["shape"]),
        digest=t["digest"],
        file=t.get("file"),
        byte_range=_range(t["byte_range"]) if "byte_range" in t else None,
        chunks=None
        if chunks is None
        else tuple(
            Chunk(_ints(c["offsets"]), _ints(c["shape"]), c["file"], _range(c["byte_range"]), c["digest"]) for c in chunks
        ),
    )


def _overlapping_chunks(chunks: list[tuple[int, Chunk]]) -> tuple[int, int] | None:
    """The indices of two chunks that share an element (the first chunk, in order, to overlap
    an earlier one, and that one), or None.

    The cut points of all chunks along each dimension split the tensor into cells, and every
    chunk is a union of whole cells, so two chunks overlap exactly when they claim one cell.
    For the usual splits (along one dimension, or a grid) there are about as many cells as
    chunks: one pass, linear in the chunks. Irregular splits with far more cells than chunks
    use a sweep along the dimension the chunks are split most along instead.
    """
    boxes = [ic for ic in chunks if all(ic[1].shape)]  # empty chunks hold no element
    if len(boxes) < 2:
        return None
    rank = len(boxes[0][1].shape)
    if rank == 0:
        return boxes[0][0], boxes[1][0]  # two chunks of a scalar both hold its one element
    cuts = [sorted({c.offsets[k] for _, c in boxes} | {c.offsets[k] + c.shape[k] for _, c in boxes}) for k in range(rank)]
    cells = math.prod(len(cut) - 1 for cut in cuts)
    if cells <= 4 * len(boxes) + 1024:
        return _overlap_by_cells(boxes, cuts)
    return _overlap_by_sweep(boxes, rank)


def _overlap_by_cells(boxes: list[tuple[int, Chunk]], cuts: list[list[int]]) -> tuple[int, int] | None:
    """The cell owner table of :func:`_overlapping_chunks` (cells few enough to list)."""
    index = [{cut: n for n, cut in enumerate(axis)} for axis in cuts]
    strides = [math.prod(len(cut) - 1 for cut in cuts[k + 1 :]) for k in range(len(cuts))]
    owner: dict[int, int] = {}
    for i, c in sorted(boxes):
        spans = [
            range(index[k][o] * strides[k], index[k][o + s] * strides[k], strides[k])
            for k, (o, s) in enumerate(zip(c.offsets, c.shape))
        ]
        for cell in itertools.product(*spans):
            j = owner.setdefault(sum(cell), i)
            if j != i:
                return min(i, j), max(i, j)
    return None


def _overlap_by_sweep(boxes: list[tuple[int, Chunk]], rank: int) -> tuple[int, int] | None:
    """Sorted by offset along the most split dimension, a chunk can only overlap those that
    start before it ends there."""
    d = max(range(rank), key=lambda k: len({c.offsets[k] for _, c in boxes}))
    boxes = sorted(boxes, key=lambda ic: ic[1].offsets[d])
    for n, (i, a) in enumerate(boxes):
        end = a.offsets[d] + a.shape[d]
        for m in range(n + 1, len(boxes)):
            j, b = boxes[m]
            if b.offsets[d] >= end:
                break
            if all(bo < ao + asz and ao < bo + bsz for ao, asz, bo, bsz in zip(a.offsets, a.shape, b.offsets, b.shape)):
                return min(i, j), max(i, j)
    return None


def _check_range(
    files: Mapping[str, FileEntry],
    at: tuple[str | int, ...],
    file: str,
    byte_range: tuple[int, int],
    dtype: str,
    shape: tuple[int, ...],
) -> Iterator[tuple[str, str]]:
    """Problems of one byte range; ``at`` is the JSON path's parts, formatted only for a problem."""
    start, end = byte_range
    want = _dtypes.nbytes(dtype, shape)
    if end - start != want:
        yield _path(*at, "byte_range"), f"spans {end - start} bytes, {_dtypes.describe(dtype, shape)} needs {want}"
    entry = files.get(file)
    if entry is None:
        yield _path(*at, "file"), f"names {file!r}, which is not listed in $.files"
    elif end > entry.size or start > end:
        yield _path(*at, "byte_range"), f"[{start}, {end}) lies outside {file!r} of {entry.size} bytes"


def _check_free_form(document: Mapping[str, Any], where: str, file: str | None) -> None:
    """Bound the depth of the free-form fields before anything walks them recursively.

    Raises:
        ManifestError: lineage, metadata or extensions nested deeper than ``jsonio.MAX_DEPTH``.
    """
    for name in ("lineage", "metadata", "extensions"):
        problem = _jsonio.check_value(document.get(name), f"$.{name}")
        if problem is not None:
            raise ManifestError(
                f"{where}: {problem}; manifests keep free-form records shallower than that. The file is damaged "
                "or hand-made; re-save the checkpoint with plainer lineage/metadata.",
                file=file,
                field=f"$.{name}",
            )


def _check_version(document: Any, where: str, file: str | None) -> None:
    if not isinstance(document, dict):
        raise ManifestError(
            f"{where}: expected a JSON object at the top level, found {type(document).__name__}",
            file=file,
            field="$",
        )
    if document.get("format") != FORMAT_NAME:
        raise ManifestError(
            f"{where}: $.format is {document.get('format')!r}, expected {FORMAT_NAME!r}; "
            "this is not a manifest-ckpt manifest",
            file=file,
            field="$.format",
        )
    version = document.get("format_version")
    if not (isinstance(version, str) and _VERSION.fullmatch(version)):
        raise ManifestError(
            f"{where}: $.format_version is {version!r}, expected a version such as {FORMAT_VERSION!r}",
            file=file,
            field="$.format_version",
        )
    ours = [int(p) for p in FORMAT_VERSION.split(".")]
    major, minor = (int(p) for p in version.split(".")[:2])
    if major != ours[0]:
        raise UnsupportedVersionError(
            f"{where}: format version {version} is not supported (this is manifest-ckpt format "
            f"{FORMAT_VERSION}); upgrade manifest-ckpt to read it",
            file=file,
            field="$.format_version",
        )
    if minor > ours[1]:
        warnings.warn(
            f"{where}: format version {version} is newer than {FORMAT_VERSION}; fields added since are ignored",
            FormatVersionWarning,
            stacklevel=4,
        )
