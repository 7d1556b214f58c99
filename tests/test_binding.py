"""Binding headers to the manifest: pins that pin, forgeries refused before any copy (issue 11, items 1, 6, 9)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.format.binding import Piece, content_digest, file_problems, is_written_header
from manifest_ckpt.format.manifest import MANIFEST_NAME, FileEntry, Manifest, TensorEntry, compute_digest
from manifest_ckpt.format.safetensors_header import CONTENT_KEY, parse_header
from tests._models import TiedNet, snapshot


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def forge(
    directory: Path,
    tensors: list[tuple[str, str, list[int], bytes]],
    *,
    gap: int = 0,
    trailing: bytes = b"",
    header_extra: dict[str, Any] | None = None,
    separators: tuple[str, str] = (",", ":"),
) -> Manifest:
    """A self-consistent checkpoint written by hand: header, data and manifest all agree.

    Tensors are laid out in the given order (no alignment padding), ``gap`` zero bytes
    between consecutive tensors and ``trailing`` bytes after the last one.
    """
    codes = {"uint8": "U8", "float32": "F32", "int64": "I64"}
    doc: dict[str, Any] = dict(header_extra or {})
    offset = 0
    relative = []
    for key, dtype, shape, data in tensors:
        doc[key] = {"dtype": codes[dtype], "shape": shape, "data_offsets": [offset, offset + len(data)]}
        relative.append((offset, offset + len(data)))
        offset += len(data) + gap
    pairs = [(key, _digest(data)) for key, _, _, data in tensors]
    doc["__metadata__"] = {"format": "pt", CONTENT_KEY: content_digest(pairs)}
    body = json.dumps(doc, sort_keys=True, separators=separators).encode()
    body += b" " * (-(len(body) + 8) % 8)
    head = struct.pack("<Q", len(body)) + body
    blob = (b"\0" * gap).join(data for _, _, _, data in tensors) + trailing
    directory.mkdir()
    (directory / "weights-0000000000000000.safetensors").write_bytes(head + blob)
    name = "weights-0000000000000000.safetensors"
    entries = {
        key: TensorEntry(dtype, tuple(shape), _digest(data), file=name, byte_range=(len(head) + a, len(head) + b))
        for (key, dtype, shape, data), (a, b) in zip(tensors, relative)
    }
    manifest = Manifest(
        digest=compute_digest(entries, {}, None),
        files={name: FileEntry(len(head) + len(blob), hashlib.sha256(head).hexdigest())},
        tensors=dict(sorted(entries.items())),
        aliases={},
        modules=None,
        lineage={"created_by": {"manifest_ckpt": "x", "torch": "x", "python": "x"}, "parents": []},
    )
    (directory / MANIFEST_NAME).write_bytes(manifest.to_json())
    return manifest


def rewrite_manifest(path: Path, edit: Any) -> None:
    """Edit manifest.json's document in place, as a forger would (``edit`` re-seals what it must)."""
    document = json.loads((path / MANIFEST_NAME).read_bytes())
    edit(document)
    (path / MANIFEST_NAME).write_text(json.dumps(document, sort_keys=True, indent=1))


def _state(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return TiedNet()


def test_foreign_weights_under_a_trusted_manifest_are_refused_by_check_and_load(tmp_path: Path) -> None:
    """A trusted manifest beside other weights, with size and header_sha256 rewritten to fit, is refused."""
    trusted = mc.save(_state(0), tmp_path / "trusted")
    mc.save(_state(1), tmp_path / "other")
    (name,) = trusted.files
    (other_name,) = mc.read_manifest(tmp_path / "other").files
    (tmp_path / "trusted" / name).write_bytes((tmp_path / "other" / other_name).read_bytes())
    other_entry = mc.read_manifest(tmp_path / "other").files[other_name]

    def edit(document: dict[str, Any]) -> None:
        document["files"][name] = {"size": other_entry.size, "header_sha256": other_entry.header_sha256}

    rewrite_manifest(tmp_path / "trusted", edit)
    target = _state(2)
    before = snapshot(target)
    for attempt in (
        lambda: mc.load(target, tmp_path / "trusted", expect_digest=trusted.digest),
        lambda: mc.load(target, tmp_path / "trusted"),
        lambda: mc.check(target, tmp_path / "trusted"),
        lambda: mc.verify(tmp_path / "trusted"),
    ):
        with pytest.raises(mc.ManifestError, match="content digest") as info:
            attempt()
        assert info.value.field == f'$.files["{name}"]'
    assert all(torch.equal(before[k], v) for k, v in snapshot(target).items())


def test_forged_header_claiming_the_pinned_content_loads_nothing_under_a_pin(tmp_path: Path) -> None:
    """Weights whose header copies the trusted one but whose data differ: a pinned load hashes and refuses."""
    trusted = mc.save(_state(0), tmp_path / "trusted")
    (name,) = trusted.files
    path = tmp_path / "trusted" / name
    raw = bytearray(path.read_bytes())
    header_len = 8 + int.from_bytes(raw[:8], "little")
    raw[header_len:] = bytes(b ^ 0x55 for b in raw[header_len:])
    path.write_bytes(bytes(raw))
    target = _state(2)
    before = snapshot(target)
    with pytest.raises(mc.IntegrityError, match="do not match their digests"):
        mc.load(target, tmp_path / "trusted", expect_digest=trusted.digest)
    assert all(torch.equal(before[k], v) for k, v in snapshot(target).items())
    # The same manifest unpinned: the headers agree, so a plain load copies (it does not hash).
    mc.load(target, tmp_path / "trusted")


def test_swapped_tensor_digests_do_not_load(tmp_path: Path) -> None:
    """A manifest whose two tensor digests are swapped (and the checkpoint digest re-sealed) is refused."""
    mc.save({"a": torch.zeros(4), "b": torch.ones(4)}, tmp_path / "ck", record_code=False)

    def edit(document: dict[str, Any]) -> None:
        t = document["tensors"]
        t["a"]["digest"], t["b"]["digest"] = t["b"]["digest"], t["a"]["digest"]
        entries = {
            k: TensorEntry(v["dtype"], tuple(v["shape"]), v["digest"], file=v["file"], byte_range=tuple(v["byte_range"]))
            for k, v in t.items()
        }
        document["digest"] = compute_digest(entries, {}, None)

    rewrite_manifest(tmp_path / "ck", edit)
    mc.read_manifest(tmp_path / "ck")  # the manifest alone is consistent
    with pytest.raises(mc.ManifestError, match="content digest"):
        mc.check({"a": torch.zeros(4), "b": torch.zeros(4)}, tmp_path / "ck")
    with pytest.raises(mc.ManifestError, match="content digest"):
        mc.verify(tmp_path / "ck")


def test_misaligned_tensor_is_refused_before_any_copy(tmp_path: Path) -> None:
    """A self-consistent file whose float32 tensor over 1 MB starts at an odd byte: refused, module untouched."""
    big = torch.arange(300_000, dtype=torch.float32)
    forge(
        tmp_path / "ck",
        [("a", "uint8", [1], b"\x07"), ("b", "float32", [300_000], big.numpy().tobytes())],
    )
    target = {"a": torch.zeros(1, dtype=torch.uint8), "b": torch.zeros(300_000)}
    module = nn.Module()
    module.register_buffer("a", target["a"])
    module.register_buffer("b", target["b"])
    for attempt in (
        lambda: mc.verify(tmp_path / "ck"),
        lambda: mc.check(module, tmp_path / "ck"),
        lambda: mc.load(module, tmp_path / "ck"),
    ):
        with pytest.raises(mc.ManifestError, match="not a multiple of float32's 4-byte element size") as info:
            attempt()
        assert info.value.field == '$.tensors["b"]'
    assert int(module.a) == 0 and not module.b.any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trailing": b"\0" * 8}, "at the end of the file belong to no tensor"),
        ({"gap": 8}, "belong to no tensor"),
    ],
)
def test_bytes_no_tensor_covers_are_refused(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    """Trailing bytes, or a gap between tensors, are refused by verify (and so by load and check)."""
    forge(tmp_path / "ck", [("a", "float32", [2], bytes(8)), ("b", "float32", [2], bytes(8))], **kwargs)
    with pytest.raises(mc.ManifestError, match=message):
        mc.verify(tmp_path / "ck")


def test_header_entry_the_manifest_does_not_list_is_refused(tmp_path: Path) -> None:
    """A header listing a non-empty tensor the manifest lacks is refused, naming it."""
    manifest = forge(tmp_path / "ck", [("a", "float32", [2], bytes(8)), ("hidden", "float32", [2], bytes(8))])
    document = json.loads((tmp_path / "ck" / MANIFEST_NAME).read_bytes())
    hidden = manifest.tensors["hidden"]
    entries = {"a": manifest.tensors["a"]}
    del document["tensors"]["hidden"]
    document["digest"] = compute_digest(entries, {}, None)
    (tmp_path / "ck" / MANIFEST_NAME).write_text(json.dumps(document))
    assert hidden.byte_range is not None
    with pytest.raises(mc.ManifestError, match="header lists 'hidden' \\(8 bytes\\), which the manifest does not list"):
        mc.verify(tmp_path / "ck")


def test_overlapping_tensors_in_one_file_are_refused(tmp_path: Path) -> None:
    """Two header entries sharing bytes (manifest agreeing) are refused as an overlap."""
    manifest = forge(tmp_path / "ck", [("a", "float32", [2], bytes(8)), ("b", "float32", [2], bytes(8))])
    path = tmp_path / "ck" / "weights-0000000000000000.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    doc = json.loads(raw[8 : 8 + length])
    doc["b"]["data_offsets"] = [4, 12]
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    body += b" " * (length - len(body))
    head = struct.pack("<Q", length) + body
    path.write_bytes(head + raw[8 + length :])
    document = json.loads((tmp_path / "ck" / MANIFEST_NAME).read_bytes())
    start = manifest.tensors["a"].byte_range[0]  # type: ignore[index]
    document["tensors"]["b"]["byte_range"] = [start + 4, start + 12]
    document["files"]["weights-0000000000000000.safetensors"]["header_sha256"] = hashlib.sha256(head).hexdigest()
    (tmp_path / "ck" / MANIFEST_NAME).write_text(json.dumps(document))
    with pytest.raises(mc.ManifestError, match="overlaps the tensor before it"):
        mc.verify(tmp_path / "ck")


def test_hand_forged_but_well_formed_checkpoint_loads(tmp_path: Path) -> None:
    """The forging helper itself writes a valid checkpoint when nothing is off (the tests above are not vacuous)."""
    forge(tmp_path / "ck", [("b", "float32", [2], struct.pack("<2f", 1.5, -2.0)), ("a", "uint8", [1], b"\x07")])
    mc.verify(tmp_path / "ck")
    module = nn.Module()
    module.register_buffer("a", torch.zeros(1, dtype=torch.uint8))
    module.register_buffer("b", torch.zeros(2))
    mc.load(module, tmp_path / "ck", expect_digest=mc.read_manifest(tmp_path / "ck").digest)
    assert torch.equal(module.b, torch.tensor([1.5, -2.0])) and int(module.a) == 7


def _file_pieces(path: Path) -> dict[str, list[Piece]]:
    manifest = mc.read_manifest(path)
    pieces: dict[str, list[Piece]] = {name: [] for name in manifest.files}
    for key, t in manifest.tensors.items():
        for c in t.pieces():
            pieces[c.file].append(Piece(key, t.dtype, c.shape, c.byte_range, c.digest, f"$.tensors[{key!r}]"))
    return pieces


def test_headers_the_writer_makes_take_the_fast_path_and_pass_the_full_check(tmp_path: Path) -> None:
    """The unparsed fast path of binding accepts exactly what the full rules accept for saved files."""
    state = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "i64": torch.arange(3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "bool": torch.tensor([True, False, True]),
        "f4": torch.zeros(2, 3, dtype=torch.float4_e2m1fn_x2),
    }
    mc.save(state, tmp_path / "ck", record_code=False, max_file_size=64)
    pieces = _file_pieces(tmp_path / "ck")
    assert len(pieces) > 1
    for name, file_pieces in pieces.items():
        blob = (tmp_path / "ck" / name).read_bytes()
        header = parse_header(blob, len(blob), file=name)
        assert is_written_header(header.raw, len(blob), file_pieces)
        assert list(file_problems(header, len(blob), file_pieces, field="$")) == []
        # Any change to the header bytes, the size or the pieces leaves the fast path.
        assert not is_written_header(header.raw[:-1] + b"!", len(blob), file_pieces)
        assert not is_written_header(header.raw, len(blob) + 1, file_pieces)
        assert not is_written_header(header.raw, len(blob), file_pieces[1:])


def test_a_header_another_writer_formatted_is_checked_in_full_and_loads(tmp_path: Path) -> None:
    """Same entries, other JSON spacing: not the writer's bytes, so binding parses it, and it is valid."""
    manifest = forge(
        tmp_path / "ck",
        [("b", "float32", [2], struct.pack("<2f", 1.5, -2.0)), ("a", "uint8", [1], b"\x07")],
        separators=(", ", ": "),
    )
    name = next(iter(manifest.files))
    blob = (tmp_path / "ck" / name).read_bytes()
    header = parse_header(blob, len(blob), file=name)
    assert not is_written_header(header.raw, len(blob), _file_pieces(tmp_path / "ck")[name])
    module = nn.Module()
    module.register_buffer("a", torch.zeros(1, dtype=torch.uint8))
    module.register_buffer("b", torch.zeros(2))
    mc.load(module, tmp_path / "ck")
    assert torch.equal(module.b, torch.tensor([1.5, -2.0])) and int(module.a) == 7
