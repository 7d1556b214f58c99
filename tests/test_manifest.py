"""Tests of ``manifest_ckpt.format.manifest``: parsing, round trips, versions and every consistency rule."""

from __future__ import annotations

import json
import tracemalloc
import warnings
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manifest_ckpt.errors import ManifestCkptError, ManifestError, UnsupportedVersionError
from manifest_ckpt.format import dtypes as _dtypes
from manifest_ckpt.format.manifest import (
    FORMAT_VERSION,
    Chunk,
    FileEntry,
    FormatVersionWarning,
    Manifest,
    ModuleEntry,
    TensorEntry,
    chunked_digest,
    compute_digest,
    compute_record_digest,
    modules_from_dict,
)

FILE = "weights-0123456789abcdef.safetensors"
OTHER = "weights-fedcba9876543210.safetensors"
WHERE = "ckpt/manifest.json"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


# -- document builders ---------------------------------------------------------------------


def tensor(dtype: str, shape: list[int], start: int, *, file: str = FILE, digest: str = D1) -> dict[str, Any]:
    """A whole-tensor entry whose byte range fits its dtype and shape exactly."""
    return {
        "dtype": dtype,
        "shape": shape,
        "digest": digest,
        "file": file,
        "byte_range": [start, start + _dtypes.nbytes(dtype, shape)],
    }


def chunk(
    offsets: list[int], shape: list[int], start: int, dtype: str = "float32", *, file: str = FILE
) -> dict[str, Any]:
    """A chunk entry with a byte range that fits its shape."""
    digest = "sha256:" + f"{start:064x}"
    return {
        "offsets": offsets,
        "shape": shape,
        "file": file,
        "byte_range": [start, start + _dtypes.nbytes(dtype, shape)],
        "digest": digest,
    }


def chunked(dtype: str, shape: list[int], chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A chunked tensor entry whose digest is the digest of its chunks."""
    objects = tuple(
        Chunk(tuple(c["offsets"]), tuple(c["shape"]), c["file"], tuple(c["byte_range"]), c["digest"]) for c in chunks
    )
    return {"dtype": dtype, "shape": shape, "digest": chunked_digest(objects), "chunks": chunks}


def module(
    cls: str | None, parameters: Sequence[str] = (), buffers: Sequence[str] = (), non_persistent: Sequence[str] = ()
) -> dict[str, Any]:
    """A module-tree entry."""
    return {
        "class": cls,
        "version": 1,
        "parameters": list(parameters),
        "buffers": list(buffers),
        "non_persistent_buffers": list(non_persistent),
    }


def redigest(doc: dict[str, Any]) -> dict[str, Any]:
    """Set ``doc["digest"]`` to what its content gives (through the library's own function)."""
    tensors = {k: TensorEntry(t["dtype"], tuple(t["shape"]), t["digest"]) for k, t in doc["tensors"].items()}
    modules = modules_from_dict(doc["modules"])
    doc["digest"] = compute_digest(tensors, doc["aliases"], modules)
    doc["record_digest"] = compute_record_digest(doc["lineage"], doc.get("metadata"), doc.get("extensions"))
    return doc


def document(
    tensors: dict[str, Any] | None = None,
    *,
    aliases: dict[str, str] | None = None,
    modules: dict[str, Any] | None = None,
    files: dict[str, Any] | None = None,
    size: int = 1000,
) -> dict[str, Any]:
    """A valid manifest document (digest computed) unless the arguments say otherwise."""
    doc = {
        "format": "manifest-ckpt",
        "format_version": FORMAT_VERSION,
        "digest": D3,
        "files": files if files is not None else {FILE: {"size": size, "header_sha256": "a" * 64}},
        "tensors": tensors
        if tensors is not None
        else {"fc.weight": tensor("float32", [2, 3], 96), "fc.bias": tensor("float32", [2], 120)},
        "aliases": aliases or {},
        "modules": modules,
        "lineage": {"created_by": {"manifest_ckpt": "0.1.0", "torch": "2.13.0", "python": "3.11.7"}, "parents": []},
    }
    return redigest(doc)


def rich_document() -> dict[str, Any]:
    """A document using every feature: module tree, alias, chunks in two files, metadata, lineage."""
    doc = document(
        {
            "emb.weight": tensor("float32", [4, 2], 64),
            "bn.num_batches_tracked": tensor("int64", [], 96),
            "fc.weight": chunked(
                "bfloat16",
                [4, 2],
                [chunk([0, 0], [2, 2], 64, "bfloat16", file=OTHER), chunk([2, 0], [2, 2], 104, "bfloat16")],
            ),
        },
        aliases={"head.weight": "emb.weight"},
        modules={
            "": module("pkg.Net"),
            "emb": module("torch.nn.modules.sparse.Embedding", ["weight"]),
            "head": module("torch.nn.modules.linear.Linear", ["weight"]),
            "fc": module("pkg.Conv1D", ["weight"]),
            "bn": module("torch.nn.modules.batchnorm.BatchNorm1d", [], ["num_batches_tracked"], ["scratch"]),
        },
        files={FILE: {"size": 200, "header_sha256": "a" * 64}, OTHER: {"size": 80, "header_sha256": "b" * 64}},
    )
    doc["modules"]["bn"]["version"] = 2
    doc["lineage"]["user"] = {"run": 7, "lr": [0.1, 0.01], "nested": {"ok": True, "none": None}}
    doc["lineage"]["code"] = {"git_commit": "c" * 40, "git_dirty": False}
    doc["metadata"] = {"épochs": 3, "tags": ["a", "b"]}
    return redigest(doc)


def rejected(doc: Any, *, field: str) -> ManifestError:
    """Parse ``doc`` expecting a ManifestError at ``field`` whose message names the file.

    Both ways in are checked: ``from_dict`` (entries built at once) and, for a document JSON
    can hold, ``from_json`` of its text (entries read from the parsed JSON, built on demand),
    which must give the very same message.
    """
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(doc, file=WHERE)
    exc = info.value
    assert exc.field == field, str(exc)
    assert exc.file == WHERE
    assert WHERE in str(exc)
    try:
        text = json.dumps(doc, allow_nan=False).encode()
    except (TypeError, ValueError):
        return exc  # not a JSON document: only from_dict can be given it
    if json.loads(text) == doc:
        with pytest.raises(ManifestError) as again:
            Manifest.from_json(text, file=WHERE)
        assert (again.value.field, str(again.value)) == (exc.field, str(exc))
    return exc


# -- round trips ---------------------------------------------------------------------------


def test_from_dict_to_dict_round_trip_is_identity() -> None:
    """A valid document comes back unchanged from from_dict().to_dict()."""
    doc = rich_document()
    manifest = Manifest.from_dict(json.loads(json.dumps(doc)), file=WHERE)
    assert manifest.to_dict() == doc
    assert manifest.source == WHERE


def test_to_json_from_json_round_trip_and_canonical_bytes() -> None:
    """to_json gives sorted, newline-terminated bytes that parse back to an equal manifest and re-serialise identically."""
    manifest = Manifest.from_dict(rich_document())
    data = manifest.to_json()
    assert data.endswith(b"}\n")
    assert json.loads(data) == manifest.to_dict()
    again = Manifest.from_json(data)
    assert again == manifest
    assert again.to_json() == data
    # Key order of the input does not change the bytes.
    shuffled = json.dumps(dict(reversed(list(rich_document().items())))).encode()
    assert Manifest.from_json(shuffled).to_json() == data
    assert "épochs".encode() in data  # ensure_ascii=False: UTF-8 bytes, not \\u escapes


def test_to_json_is_json_dumps_of_to_dict_exactly() -> None:
    """to_json, which writes tensors and modules from their fields, gives json.dumps' canonical text byte for byte."""
    manifest = Manifest.from_dict(rich_document())
    expected = json.dumps(manifest.to_dict(), sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    assert manifest.to_json() == expected.encode()


def test_parsed_dataclasses_hold_the_document_values() -> None:
    """from_dict builds typed entries: tuples for shapes and ranges, chunks, module entries, aliases."""
    manifest = Manifest.from_dict(rich_document())
    assert manifest.tensors["emb.weight"] == TensorEntry("float32", (4, 2), D1, FILE, (64, 96), None)
    fc = manifest.tensors["fc.weight"]
    assert fc.file is None and fc.byte_range is None
    assert fc.chunks == (
        Chunk((0, 0), (2, 2), OTHER, (64, 72), "sha256:" + f"{64:064x}"),
        Chunk((2, 0), (2, 2), FILE, (104, 112), "sha256:" + f"{104:064x}"),
    )
    assert fc.pieces() == fc.chunks
    assert manifest.tensors["emb.weight"].pieces() == (Chunk((0, 0), (4, 2), FILE, (64, 96), D1),)
    assert manifest.files[OTHER] == FileEntry(80, "b" * 64)
    assert manifest.modules is not None
    assert manifest.modules["bn"] == ModuleEntry(
        "torch.nn.modules.batchnorm.BatchNorm1d", 2, (), ("num_batches_tracked",), ("scratch",)
    )
    assert manifest.keys() == ["bn.num_batches_tracked", "emb.weight", "fc.weight", "head.weight"]
    assert manifest.entry("head.weight") is manifest.tensors["emb.weight"]
    assert manifest.total_bytes == 32 + 8 + 16
    assert manifest.parents == []


def test_digest_ignores_files_offsets_lineage_and_metadata() -> None:
    """The content digest is the same for the same tensors stored at other offsets, files or with other lineage."""
    a = document()
    b = document(
        {"fc.weight": tensor("float32", [2, 3], 200, file=OTHER), "fc.bias": tensor("float32", [2], 8, file=OTHER)},
        files={OTHER: {"size": 400, "header_sha256": "f" * 64}},
    )
    b["lineage"]["user"] = "another run"
    b["metadata"] = [1, 2]
    assert Manifest.from_dict(a).digest == Manifest.from_dict(redigest(b)).digest
    c = document({"fc.weight": tensor("float32", [2, 3], 96, digest=D2), "fc.bias": tensor("float32", [2], 120)})
    assert Manifest.from_dict(c).digest != Manifest.from_dict(a).digest


# -- the top level: JSON, type, format, version ---------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"{", b"", b"\xff\xfe{}", b'{"format": "manifest-ckpt",}', b"[" * 100_000 + b"]" * 100_000],
    ids=["truncated", "empty", "not-utf8", "trailing-comma", "nested-too-deeply"],
)
def test_malformed_json_is_a_manifest_error_naming_the_file(data: bytes) -> None:
    """Bytes that are not JSON raise ManifestError (not JSONDecodeError/RecursionError) naming the file."""
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(data, file=WHERE)
    assert info.value.file == WHERE
    assert str(info.value).startswith(WHERE + ": ")


@pytest.mark.parametrize("top", [[], "manifest", 3, None, True])
def test_wrong_top_level_type_names_the_root(top: Any) -> None:
    """A document that is not a JSON object is refused at field "$" with the type found."""
    exc = rejected(top, field="$")
    assert f"found {type(top).__name__}" in str(exc)


@pytest.mark.parametrize("value", ["safetensors", None, 1])
def test_wrong_format_name_is_refused(value: Any) -> None:
    """A document whose "format" is not "manifest-ckpt" is refused at $.format."""
    doc = document()
    doc["format"] = value
    exc = rejected(doc, field="$.format")
    assert repr(value) in str(exc)


def test_missing_format_name_is_refused() -> None:
    """A document without "format" is refused at $.format."""
    doc = document()
    del doc["format"]
    rejected(doc, field="$.format")


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "1.0.0-rc1", 1, None])
def test_malformed_format_version_is_refused(version: Any) -> None:
    """A format_version that is not MAJOR.MINOR.PATCH is a ManifestError at $.format_version."""
    doc = document()
    doc["format_version"] = version
    exc = rejected(doc, field="$.format_version")
    assert not isinstance(exc, UnsupportedVersionError)


@pytest.mark.parametrize("version", ["2.0.0", "0.9.0", "10.0.0"])
def test_unknown_major_version_raises_unsupported_version_error(version: str) -> None:
    """Another major version raises UnsupportedVersionError (a ManifestError) that says to upgrade."""
    doc = document()
    doc["format_version"] = version
    exc = rejected(doc, field="$.format_version")
    assert isinstance(exc, UnsupportedVersionError)
    assert f"format version {version} is not supported" in str(exc)
    assert "upgrade manifest-ckpt" in str(exc)


def test_newer_minor_version_warns_and_still_parses() -> None:
    """A newer minor version emits FormatVersionWarning naming both versions, and the manifest is read."""
    doc = document()
    doc["format_version"] = "1.7.0"
    doc["extensions"] = {"added_in_1_7": {"anything": [1, 2]}}
    doc = redigest(doc)
    with pytest.warns(FormatVersionWarning, match=r"ckpt/manifest\.json: format version 1\.7\.0 is newer than 1\.2\.0"):
        manifest = Manifest.from_dict(doc, file=WHERE)
    assert manifest.format_version == "1.7.0"
    assert manifest.to_dict()["format_version"] == "1.7.0"


def test_newer_minor_version_warning_is_an_error_under_the_project_config() -> None:
    """pyproject turns FormatVersionWarning into an error, so an unexpected one fails the suite."""
    doc = document()
    doc["format_version"] = "1.3.0"
    with pytest.raises(FormatVersionWarning):
        Manifest.from_dict(doc)


@pytest.mark.parametrize("version", ["1.0.0", "1.0.9", "1.1.0", "1.1.3", "1.2.0", "1.2.4"])
def test_same_minor_version_does_not_warn(version: str) -> None:
    """Our own version and newer patch versions are read without any warning."""
    doc = document()
    doc["format_version"] = version
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Manifest.from_dict(doc).format_version == version


# -- schema violations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["tensors"]["fc.weight"].update(shape=[2, -3]), '$.tensors["fc.weight"].shape[1]'),
        (lambda d: d["tensors"]["fc.weight"].update(dtype="float128"), '$.tensors["fc.weight"].dtype'),
        (lambda d: d["tensors"]["fc.weight"].update(digest="md5:abc"), '$.tensors["fc.weight"].digest'),
        (lambda d: d["tensors"]["fc.weight"].update(byte_range=[1]), '$.tensors["fc.weight"].byte_range'),
        (lambda d: d["tensors"]["fc.bias"].pop("file"), '$.tensors["fc.bias"]'),
        (lambda d: d.pop("lineage"), "$"),
        (lambda d: d.update(unknown=1), "$.unknown"),
        (lambda d: d["files"][FILE].update(size=-1), f'$.files["{FILE}"].size'),
    ],
    ids=["negative-dim", "dtype", "digest", "byte-range", "no-file", "no-lineage", "unknown-field", "size"],
)
def test_schema_violation_names_the_json_path(edit: Any, field: str) -> None:
    """A document that breaks the schema raises ManifestError whose .field is the JSON path of the violation."""
    doc = document()
    edit(doc)
    exc = rejected(doc, field=field)
    assert field in str(exc)


@pytest.mark.parametrize("name", ["../escape.safetensors", "/abs.safetensors", "a/../b", "./w.safetensors"])
def test_file_names_that_escape_the_directory_violate_the_schema(name: str) -> None:
    """Weights file names with '..', '.', or a leading '/' are refused by the schema, naming the file entry."""
    doc = document(
        {"fc.bias": tensor("float32", [2], 8, file=name)},
        files={name: {"size": 100, "header_sha256": "a" * 64}},
    )
    exc = rejected(doc, field=f"$.files[{json.dumps(name)}]")
    assert name in str(exc)


# -- consistency rules the schema cannot express --------------------------------------------


def inconsistent(doc: dict[str, Any], *, field: str, message: str) -> ManifestError:
    """Parse ``redigest(doc)``: exactly one inconsistency, at ``field``, with ``message``."""
    exc = rejected(redigest(doc), field=field)
    assert f"  {field}: {message}\n" in str(exc)
    assert str(exc).count("\n  $") == 1, str(exc)
    assert "re-save the checkpoint" in str(exc)
    return exc


def test_byte_range_length_must_match_dtype_and_shape() -> None:
    """A byte range of 8 bytes for float32[3] is refused at its byte_range with both sizes."""
    doc = document({"w": {**tensor("float32", [3], 96), "byte_range": [96, 104]}})
    inconsistent(doc, field="$.tensors.w.byte_range", message="spans 8 bytes, float32[3] needs 12")


def test_byte_range_end_before_start_is_refused() -> None:
    """A reversed byte range is refused (negative span), never read backwards."""
    doc = document({"w": {**tensor("float32", [0], 96), "byte_range": [96, 90]}})
    exc = rejected(redigest(doc), field="$.tensors.w.byte_range")
    assert "spans -6 bytes, float32[0] needs 0" in str(exc)
    assert "[96, 90) lies outside" in str(exc)


def test_tensor_in_a_file_not_listed_is_refused() -> None:
    """A tensor naming a weights file absent from $.files is refused at its .file."""
    doc = document({"w": tensor("float32", [3], 96, file=OTHER)})
    inconsistent(doc, field="$.tensors.w.file", message=f"names {OTHER!r}, which is not listed in $.files")


def test_byte_range_outside_the_file_is_refused() -> None:
    """A byte range ending past the file's recorded size is refused with the range and the size."""
    doc = document({"w": tensor("float32", [3], 96)}, size=100)
    inconsistent(doc, field="$.tensors.w.byte_range", message=f"[96, 108) lies outside {FILE!r} of 100 bytes")


def test_alias_to_a_key_that_is_not_stored_is_refused() -> None:
    """An alias whose target is not a stored tensor is refused at the alias, naming the target."""
    doc = document({"w": tensor("float32", [3], 96)}, aliases={"v": "missing.key"})
    inconsistent(doc, field="$.aliases.v", message="points at 'missing.key', which is not a stored tensor")


def test_alias_to_another_alias_is_refused() -> None:
    """Aliases point at stored tensors directly: a chain of aliases is refused at its second link."""
    doc = document({"w": tensor("float32", [3], 96)}, aliases={"v": "w", "u": "v"})
    inconsistent(doc, field="$.aliases.u", message="points at 'v', which is not a stored tensor")


def test_alias_that_is_also_stored_is_refused() -> None:
    """A key both stored and listed as an alias is refused at the alias."""
    doc = document({"w": tensor("float32", [3], 96), "v": tensor("float32", [3], 108)}, aliases={"v": "w"})
    inconsistent(doc, field="$.aliases.v", message="is also a stored tensor; an alias must not be stored twice")


def test_module_tree_declaring_a_key_that_is_not_stored_is_refused() -> None:
    """A module parameter with no stored tensor or alias behind it is refused at $.modules, naming the key."""
    doc = document(
        {"fc.weight": tensor("float32", [2, 3], 96)},
        modules={"": module("pkg.Net"), "fc": module("torch.nn.modules.linear.Linear", ["weight", "bias"])},
    )
    inconsistent(doc, field="$.modules", message="declares 'fc.bias', which is neither stored nor an alias")


def test_stored_key_that_no_module_declares_is_refused() -> None:
    """With a module tree, a stored tensor that no module owns is refused at that tensor."""
    doc = document(
        {"fc.weight": tensor("float32", [2, 3], 96), "stray": tensor("float32", [2], 120)},
        modules={"": module("pkg.Net"), "fc": module("torch.nn.modules.linear.Linear", ["weight"])},
    )
    inconsistent(doc, field="$.tensors.stray", message="is stored but no module in the tree declares it")


def test_non_persistent_buffers_are_not_expected_in_the_tensors() -> None:
    """A module's non-persistent buffer needs no stored tensor, and an alias satisfies a declaration."""
    doc = document(
        {"emb.weight": tensor("float32", [2, 3], 96)},
        aliases={"head.weight": "emb.weight"},
        modules={
            "": module("pkg.Net", [], [], ["mask"]),
            "emb": module("torch.nn.modules.sparse.Embedding", ["weight"]),
            "head": module("torch.nn.modules.linear.Linear", ["weight"]),
        },
    )
    manifest = Manifest.from_dict(doc)
    assert list(manifest.iter_consistency_problems()) == []


def test_recorded_digest_must_match_the_content() -> None:
    """A manifest whose $.digest is not what its content gives is refused at $.digest with both values."""
    doc = document()
    right = doc["digest"]
    doc["digest"] = D2
    exc = rejected(doc, field="$.digest")
    assert f"  $.digest: is {D2}, the content gives {right}\n" in str(exc)


def test_every_problem_is_listed_and_field_is_the_first() -> None:
    """All inconsistencies are reported at once (up to ten, then a count); .field is the first one."""
    tensors = {f"t{i:02d}": {**tensor("float32", [3], 96), "byte_range": [0, 1]} for i in range(12)}
    doc = document(tensors, aliases={"a": "nowhere"})
    exc = rejected(doc, field="$.tensors.t00.byte_range")
    text = str(exc)
    assert "$.tensors.t09.byte_range: spans 1 bytes" in text
    assert "$.tensors.t10" not in text
    assert "... and 3 more" in text  # t10, t11 and the alias


def test_iter_consistency_problems_yields_every_problem_in_order() -> None:
    """iter_consistency_problems yields (path, message) for each broken rule, tensors first, digest last."""
    manifest = Manifest(
        digest=D1,
        files={FILE: FileEntry(100, "a" * 64)},
        tensors={
            "x.w": TensorEntry("int8", (4,), D2, FILE, (0, 3)),
            "x.v": TensorEntry("int8", (4,), D2, OTHER, (0, 4)),
        },
        aliases={"x.u": "x.z"},
        modules={"x": ModuleEntry("pkg.X", 1, ("w", "q"))},
        lineage={},
    )
    expected_digest = compute_digest(manifest.tensors, manifest.aliases, manifest.modules)
    assert list(manifest.iter_consistency_problems()) == [
        ('$.tensors["x.w"].byte_range', "spans 3 bytes, int8[4] needs 4"),
        ('$.tensors["x.v"].file', f"names {OTHER!r}, which is not listed in $.files"),
        ('$.aliases["x.u"]', "points at 'x.z', which is not a stored tensor"),
        ("$.modules", "declares 'x.q', which is neither stored nor an alias"),
        ('$.tensors["x.u"]', "is stored but no module in the tree declares it"),
        ('$.tensors["x.v"]', "is stored but no module in the tree declares it"),
        ("$.digest", f"is {D1}, the content gives {expected_digest}"),
    ]


# -- chunks ------------------------------------------------------------------------------------


def two_files(size: int = 400) -> dict[str, Any]:
    return {FILE: {"size": size, "header_sha256": "a" * 64}, OTHER: {"size": size, "header_sha256": "b" * 64}}


def test_valid_chunks_in_two_files_are_accepted() -> None:
    """A tensor split along dimension 1 into two chunks in two files is consistent."""
    t = chunked("float32", [2, 4], [chunk([0, 0], [2, 2], 64), chunk([0, 2], [2, 2], 64, file=OTHER)])
    manifest = Manifest.from_dict(document({"w": t}, files=two_files()))
    assert manifest.tensors["w"].nbytes == 32
    assert [c.offsets for c in manifest.tensors["w"].pieces()] == [(0, 0), (0, 2)]


def test_chunked_tensor_digest_must_be_the_digest_of_its_chunks() -> None:
    """A chunked tensor whose digest is not chunked_digest(chunks) is refused at its digest."""
    t = chunked("float32", [4], [chunk([0], [2], 64), chunk([2], [2], 64, file=OTHER)])
    t["digest"] = D1
    inconsistent(
        document({"w": t}, files=two_files()),
        field="$.tensors.w.digest",
        message="does not match the digest of its chunks",
    )


def test_chunk_rank_must_match_the_tensor() -> None:
    """A chunk of rank 1 in a rank-2 tensor is refused at that chunk."""
    t = chunked("float32", [2, 2], [chunk([0], [4], 64)])
    exc = rejected(redigest(document({"w": t})), field="$.tensors.w.chunks[0]")
    assert "$.tensors.w.chunks[0]: has rank 1, the tensor has rank 2" in str(exc)


def test_chunk_outside_the_tensor_is_refused() -> None:
    """A chunk whose offsets plus shape exceed the tensor shape is refused at that chunk."""
    t = chunked("float32", [4], [chunk([0], [2], 64), chunk([3], [2], 64, file=OTHER)])
    exc = rejected(redigest(document({"w": t}, files=two_files())), field="$.tensors.w.chunks[1]")
    assert "offsets [3] + shape [2] exceed the tensor shape [4]" in str(exc)


def test_chunks_must_cover_the_whole_tensor() -> None:
    """Chunks covering 8 of 16 bytes are refused at $.tensors.w.chunks with both counts."""
    t = chunked("float32", [4], [chunk([0], [2], 64)])
    inconsistent(document({"w": t}), field="$.tensors.w.chunks", message="cover 8 bytes, the tensor has 16")


def test_overlapping_chunks_with_the_right_total_size_are_refused() -> None:
    """Two chunks at the same place cover the right byte count but leave a hole, so they are refused (regression)."""
    t = chunked("float32", [4], [chunk([0], [2], 64), chunk([0], [2], 64, file=OTHER)])
    inconsistent(
        document({"w": t}, files=two_files()),
        field="$.tensors.w.chunks[1]",
        message="overlaps chunk 0; chunks must tile the tensor exactly",
    )


def test_partially_overlapping_2d_chunks_are_refused() -> None:
    """Chunks that overlap in a corner (2-D) are refused even though their sizes add up."""
    third = OTHER.replace("fed", "aaa")
    files = {**two_files(), third: {"size": 400, "header_sha256": "c" * 64}}
    # A 3x3 tensor: a 2x2 at (0,0), a 2x2 at (1,1) overlapping it, and a 1x1 elsewhere: 4+4+1 = 9 elements.
    t = chunked(
        "float32",
        [3, 3],
        [chunk([0, 0], [2, 2], 64), chunk([1, 1], [2, 2], 64, file=OTHER), chunk([2, 0], [1, 1], 64, file=third)],
    )
    inconsistent(
        document({"w": t}, files=files),
        field="$.tensors.w.chunks[1]",
        message="overlaps chunk 0; chunks must tile the tensor exactly",
    )


def test_two_chunks_of_one_tensor_in_the_same_file_are_refused() -> None:
    """A file holds at most one chunk of a tensor (its header key is the tensor's key), so a second one is refused."""
    t = chunked("float32", [4], [chunk([0], [2], 64), chunk([2], [2], 72)])
    inconsistent(
        document({"w": t}),
        field="$.tensors.w.chunks[1].file",
        message=f"names {FILE!r} like chunk 0; a file holds at most one chunk of a tensor",
    )


def test_chunk_byte_range_and_file_are_checked_like_a_tensor() -> None:
    """A chunk's byte range must fit its own shape and lie inside a listed file."""
    bad_range = chunked(
        "float32", [4], [{**chunk([0], [2], 64), "byte_range": [64, 70]}, chunk([2], [2], 64, file=OTHER)]
    )
    inconsistent(
        document({"w": bad_range}, files=two_files()),
        field="$.tensors.w.chunks[0].byte_range",
        message="spans 6 bytes, float32[2] needs 8",
    )
    unlisted = chunked("float32", [4], [chunk([0], [2], 64), chunk([2], [2], 64, file=OTHER)])
    inconsistent(
        document({"w": unlisted}),
        field="$.tensors.w.chunks[1].file",
        message=f"names {OTHER!r}, which is not listed in $.files",
    )


def test_empty_and_scalar_chunks() -> None:
    """Zero-size chunks never overlap; two chunks of a scalar do (each holds its one element)."""
    empty = chunked("float32", [0, 4], [chunk([0, 0], [0, 2], 64), chunk([0, 0], [0, 4], 64, file=OTHER)])
    assert Manifest.from_dict(document({"w": empty}, files=two_files())).tensors["w"].nbytes == 0
    scalar = chunked("float32", [], [chunk([], [], 64)])
    assert Manifest.from_dict(document({"s": scalar})).tensors["s"].nbytes == 4
    twice = chunked("float32", [], [chunk([], [], 64), chunk([], [], 64, file=OTHER)])
    exc = rejected(redigest(document({"s": twice}, files=two_files())), field="$.tensors.s.chunks")
    assert "cover 8 bytes, the tensor has 4" in str(exc)
    assert "$.tensors.s.chunks[1]: overlaps chunk 0" in str(exc)


def test_many_chunks_are_checked_quickly() -> None:
    """Thousands of chunks along one dimension pass the overlap rule without a quadratic blow-up."""
    n = 4000
    chunks = tuple(Chunk((0, i), (3, 1), f"f{i}", (0, 12), D1) for i in range(n))
    manifest = Manifest(
        digest=D1,
        files={f"f{i}": FileEntry(12, "a" * 64) for i in range(n)},
        tensors={"w": TensorEntry("float32", (3, n), chunked_digest(chunks), chunks=chunks)},
        aliases={},
        modules=None,
        lineage={},
    )
    problems = list(manifest.iter_consistency_problems())
    assert [p for p, _ in problems] == ["$.digest"]


# -- hostile sizes -------------------------------------------------------------------------


def test_huge_shape_is_refused_without_allocating() -> None:
    """A float32[2**40, 2**40] entry with a 16-byte range is refused by arithmetic alone, in little memory."""
    Manifest.from_dict(document())  # compile the schema outside the measurement
    doc = document({"w": {**tensor("float32", [3], 96), "shape": [2**40, 2**40], "byte_range": [96, 112]}})
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError) as info:
            Manifest.from_dict(doc, file=WHERE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000
    assert info.value.field == "$.tensors.w.byte_range"
    assert f"spans 16 bytes, float32[{2**40}, {2**40}] needs {4 * 2**80}" in str(info.value)


def test_huge_chunk_shape_is_refused_without_allocating() -> None:
    """A chunk claiming 2**50 x 2**50 elements is refused by arithmetic alone."""
    t = chunked("uint8", [2**50, 2**50], [chunk([0, 0], [2**50, 2**50], 64, "uint8")])
    t["chunks"][0]["byte_range"] = [64, 80]
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError) as info:
            Manifest.from_dict(redigest(document({"w": t})), file=WHERE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000
    assert info.value.field == "$.tensors.w.chunks[0].byte_range"


def test_dimension_beyond_json_safe_integers_violates_the_schema() -> None:
    """A dimension above 2**53 - 1 is a schema violation at that dimension."""
    doc = document({"w": {**tensor("float32", [3], 96), "shape": [2**60]}})
    rejected(doc, field="$.tensors.w.shape[0]")


# -- the error family ------------------------------------------------------------------------


def test_every_manifest_error_is_in_the_family() -> None:
    """ManifestError and UnsupportedVersionError are ManifestCkptError and ValueError subclasses."""
    assert issubclass(ManifestError, ManifestCkptError)
    assert issubclass(ManifestError, ValueError)
    assert issubclass(UnsupportedVersionError, ManifestError)
    assert issubclass(FormatVersionWarning, UserWarning)


def test_changed_lineage_byte_is_caught_by_the_record_digest() -> None:
    """Lineage is outside the content digest, but an edit there no longer passes unnoticed."""
    doc = document()
    doc["lineage"]["user"] = {"lr": 0.1}
    doc = redigest(doc)
    Manifest.from_dict(doc)
    doc["lineage"]["user"] = {"lr": 0.2}
    exc = rejected(doc, field="$.record_digest")
    assert "lineage and metadata give" in str(exc)


def test_extensions_round_trip() -> None:
    """Fields reserved for later minor versions survive read -> to_dict unchanged."""
    doc = document()
    doc["extensions"] = {"future": {"x": [1, 2]}}
    doc = redigest(doc)
    assert Manifest.from_dict(doc).to_dict()["extensions"] == {"future": {"x": [1, 2]}}


_boxes = st.lists(
    st.tuples(st.tuples(st.integers(0, 6), st.integers(0, 6)), st.tuples(st.integers(0, 4), st.integers(1, 4))),
    min_size=0,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(boxes=_boxes)
def test_cell_table_and_sweep_find_the_same_overlaps(boxes: list[tuple[tuple[int, int], tuple[int, int]]]) -> None:
    """Both overlap finders agree on whether chunks overlap, and any pair reported really shares an element."""
    from manifest_ckpt.format.manifest import Chunk, _overlap_by_cells, _overlap_by_sweep

    chunks = [(i, Chunk(o, s, f"f{i}", (0, 1), "d")) for i, (o, s) in enumerate(boxes) if all(s)]
    if len(chunks) < 2:
        return
    cuts = [sorted({c.offsets[k] for _, c in chunks} | {c.offsets[k] + c.shape[k] for _, c in chunks}) for k in range(2)]
    by_cells, by_sweep = _overlap_by_cells(chunks, cuts), _overlap_by_sweep(chunks, 2)
    assert (by_cells is None) == (by_sweep is None)
    for pair in (by_cells, by_sweep):
        if pair is not None:
            a, b = (dict(chunks)[n] for n in pair)
            assert all(ao < bo + bs and bo < ao + asz for ao, asz, bo, bs in zip(a.offsets, a.shape, b.offsets, b.shape))


def test_a_grid_of_a_quarter_million_chunks_is_checked_for_overlap_in_linear_time() -> None:
    """A 500 x 500 grid tiles exactly (no overlap found) and one moved chunk is found overlapping its neighbour."""
    from manifest_ckpt.format.manifest import Chunk, _overlapping_chunks

    n = 500
    chunks = [(i * n + j, Chunk((2 * i, 2 * j), (2, 2), "f", (0, 16), "d")) for i in range(n) for j in range(n)]
    assert _overlapping_chunks(chunks) is None
    chunks[7] = (7, Chunk((0, 13), (2, 2), "f", (0, 16), "d"))  # moved onto chunk 6's columns
    assert _overlapping_chunks(chunks) == (6, 7)


def test_entries_read_from_json_equal_constructed_ones_and_stay_frozen() -> None:
    """The fast path that builds whole-tensor entries gives what the dataclass constructor gives."""
    import dataclasses

    from manifest_ckpt.format.manifest import _tensor_from_dict

    fast = _tensor_from_dict({"dtype": "float32", "shape": [4, 4], "digest": "sha256:" + "1" * 64, "file": "w",
                              "byte_range": [8, 72]})  # fmt: skip
    slow = TensorEntry("float32", (4, 4), "sha256:" + "1" * 64, file="w", byte_range=(8, 72))
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    assert dataclasses.asdict(fast) == dataclasses.asdict(slow)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.dtype = "int8"  # type: ignore[misc]


# -- manifests read from JSON: entries built on demand -------------------------------------


def test_from_json_gives_the_entries_from_dict_builds() -> None:
    """Read from JSON, every tensor and module entry (chunks, aliases, integral floats as ints) equals the built one."""
    doc = rich_document()
    doc["tensors"]["emb.weight"]["shape"] = [4.0, 2]  # JSON Schema integers may be written as 8.0
    doc["tensors"]["bn.num_batches_tracked"]["byte_range"] = [96.0, 104]
    doc["modules"]["bn"]["version"] = 2.0
    text = json.dumps(doc).encode()
    eager, lazy = Manifest.from_dict(json.loads(text)), Manifest.from_json(text)
    assert dict(lazy.tensors) == dict(eager.tensors)
    assert lazy.modules is not None and eager.modules is not None
    assert dict(lazy.modules) == dict(eager.modules)
    assert lazy == eager and lazy.to_json() == eager.to_json()
    assert lazy.tensors["emb.weight"].shape == (4, 2) and type(lazy.tensors["emb.weight"].shape[0]) is int
    assert lazy.modules["bn"].version == 2 and type(lazy.modules["bn"].version) is int
    assert lazy.entry("head.weight") is lazy.tensors["emb.weight"]  # built once, then the same object
    assert list(lazy.tensors) == list(eager.tensors) and len(lazy.tensors) == 3
    assert "fc.weight" in lazy.tensors and "nope" not in lazy.tensors
    with pytest.raises(KeyError):
        lazy.tensors["nope"]


def test_consistency_of_a_replaced_manifest_checks_every_tensor_again() -> None:
    """The ranges a manifest read from JSON checked hold for its files: with other file sizes, all are checked."""
    import dataclasses

    manifest = Manifest.from_json(json.dumps(document()).encode())
    assert list(manifest.iter_consistency_problems()) == []
    shrunk = dataclasses.replace(manifest, files={FILE: FileEntry(125, "a" * 64)})
    assert list(shrunk.iter_consistency_problems()) == [
        ('$.tensors["fc.bias"].byte_range', f"[120, 128) lies outside {FILE!r} of 125 bytes")
    ]


@pytest.mark.parametrize(
    ("change", "irregular"),
    [
        (lambda t: None, []),
        (lambda t: t["b"].update(byte_range=[t["b"]["byte_range"][0], t["b"]["byte_range"][1] + 4]), ["b"]),
        (lambda t: t["b"].update(byte_range=[20, 8]), ["b"]),  # start after end
        (lambda t: t["c"].update(shape=[2.0, 2]), ["c"]),  # an integral float: read as an int later
        (lambda t: t["a"].update(byte_range=[0.0, 24]), ["a"]),
        (lambda t: t["c"].update(file=OTHER), ["c"]),  # a file the manifest does not list
        (lambda t: t["c"].update(byte_range=[120, 136]), ["c"]),  # past the end of its file
        (lambda t: t.update(d=chunked("float32", [2], [chunk([0], [2], 128)])), ["d"]),
        (lambda t: t["a"].update(byte_range=[2**70, 2**70 + 24]), ["a"]),  # an int past 64 bits
    ],
)
def test_the_column_wise_range_check_agrees_with_the_per_entry_rules(change: Any, irregular: list[str]) -> None:
    """Whatever the columns miss, the entry-by-entry rules find (the fast path proves only the regular case)."""
    from manifest_ckpt.format.manifest import _irregular, _irregular_keys

    tensors = {"a": tensor("float32", [2, 3], 0), "b": tensor("int8", [8], 24), "c": tensor("float64", [2, 2], 32)}
    change(tensors)
    sizes = {FILE: 128}
    keys, rows = _irregular(tensors, sizes)
    assert keys == _irregular_keys(tensors, sizes) == irregular
    assert rows == {k: (t["dtype"], t["shape"], t["digest"]) for k, t in tensors.items()}
