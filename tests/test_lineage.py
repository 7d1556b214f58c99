"""Tests for lineage chains: parents found by digest in directories and archives, verified, or marked missing."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch

import manifest_ckpt as mc
from manifest_ckpt.cli import run
from manifest_ckpt.lineage import ancestry, index_checkpoints, short_digest
from manifest_ckpt.storage import tar as _tar
from manifest_ckpt.storage.archive import pack
from tests._models import TiedNet


def cli(*argv: str) -> tuple[int, str, str]:
    """Run the command line in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def model(seed: int) -> TiedNet:
    """A TiedNet whose values depend on ``seed`` (so each seed has its own digest)."""
    torch.manual_seed(seed)
    return TiedNet()


def flip_tensor_byte(path: Path) -> None:
    """Flip the last data byte of the first weights file of a checkpoint directory or archive."""
    manifest = mc.read_manifest(path)
    name = sorted(manifest.files)[0]
    if path.is_dir():
        target, offset = path / name, 0
    else:
        target, offset = path, _tar.index_archive(path)[name].offset
    data = bytearray(target.read_bytes())
    data[offset + manifest.files[name].size - 1] ^= 0x01
    target.write_bytes(data)


class Chain:
    """base -> ft (fine-tuned-from) -> q (quantized-from); base archived, ft in runs/, q outside the store."""

    def __init__(self, root: Path) -> None:
        self.store = root / "store"
        (self.store / "runs").mkdir(parents=True)
        (self.store / "archive").mkdir()
        self.base_dir = root / "base"
        self.base = mc.save(model(0), self.base_dir, record_code=False)
        self.base_tar = self.store / "archive" / "base.tar"
        pack(self.base_dir, self.base_tar)
        self.ft_dir = self.store / "runs" / "ft"
        self.ft = mc.save(model(1), self.ft_dir, parents=[(self.base_tar, "fine-tuned-from")], record_code=False)
        self.q_dir = root / "q"
        self.q = mc.save(model(2), self.q_dir, parents=[(self.ft_dir, "quantized-from")], record_code=False)


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    return Chain(tmp_path)


def test_parents_given_as_archives_are_recorded_by_digest(chain: Chain) -> None:
    """A parent given as an archive path is recorded by its checkpoint digest and the archive's base name."""
    assert chain.ft.parents == [{"digest": chain.base.digest, "relation": "fine-tuned-from", "name": "base.tar"}]


def test_chain_is_found_and_verified_in_directories_and_archives(chain: Chain) -> None:
    """lineage walks q -> ft (directory) -> base (archive), verifying each by digest; exit 0."""
    result = ancestry(chain.q_dir, search=[chain.store])
    assert result.ok and result.digest == chain.q.digest
    assert [(a.depth, a.relation, a.digest, a.status, a.location, a.child) for a in result.ancestors] == [
        (1, "quantized-from", chain.ft.digest, "verified", str(chain.ft_dir), chain.q.digest),
        (2, "fine-tuned-from", chain.base.digest, "verified", str(chain.base_tar), chain.ft.digest),
    ]
    code, out, err = cli("lineage", str(chain.q_dir), "--search", str(chain.store))
    assert code == 0 and err == ""
    assert out == (
        f"{chain.q_dir}  {short_digest(chain.q.digest)}\n"
        f"└── quantized-from {short_digest(chain.ft.digest)} (ft): verified at {chain.ft_dir}\n"
        f"    └── fine-tuned-from {short_digest(chain.base.digest)} (base.tar): verified at {chain.base_tar}\n"
        f"2 verified; searched {chain.store}\n"
    )
    code, out, _ = cli("lineage", "--json", str(chain.q_dir), "--search", str(chain.store))
    document = json.loads(out)
    assert code == 0 and document["ok"] is True and document["searched"] == [str(chain.store)]
    assert [a["status"] for a in document["ancestors"]] == ["verified", "verified"]


def test_missing_ancestor_is_marked_and_is_not_a_failure(chain: Chain) -> None:
    """With base gone, it is reported 'not found' (exit 0) and the chain stops there."""
    chain.base_tar.unlink()
    result = ancestry(chain.q_dir, search=[chain.store])
    assert result.ok
    assert [(a.digest, a.status) for a in result.ancestors] == [
        (chain.ft.digest, "verified"),
        (chain.base.digest, "not found"),
    ]
    assert result.ancestors[1].detail == "no checkpoint with this digest under the search directories"
    code, out, _ = cli("lineage", str(chain.q_dir), "--search", str(chain.store))
    assert code == 0 and "(base.tar): not found: no checkpoint with this digest" in out
    assert out.endswith(f"1 verified, 1 not found; searched {chain.store}\n")


def test_without_search_directories_nothing_is_found(chain: Chain) -> None:
    """Without --search only the recorded parents are listed, marked as not found, and nothing is walked."""
    result = ancestry(chain.q_dir)
    assert [(a.digest, a.status, a.detail) for a in result.ancestors] == [
        (chain.ft.digest, "not found", "no search directory given")
    ]
    code, out, _ = cli("lineage", str(chain.q_dir))
    assert code == 0 and out.endswith("1 not found; searched nowhere (give --search DIR)\n")


def test_root_without_parents(tmp_path: Path) -> None:
    """A checkpoint with no recorded parents has an empty chain."""
    mc.save(model(0), tmp_path / "solo")
    code, out, _ = cli("lineage", str(tmp_path / "solo"), "--search", str(tmp_path))
    assert code == 0 and "└── no parents recorded\nno ancestors;" in out


def test_corrupt_ancestor_fails_lineage_and_verify(chain: Chain) -> None:
    """A found ancestor whose bytes no longer match its digests is 'failed': lineage exits 1, verify --search too."""
    flip_tensor_byte(chain.base_tar)
    result = ancestry(chain.q_dir, search=[chain.store])
    assert not result.ok
    failed = result.ancestors[1]
    assert (failed.digest, failed.status, failed.location) == (chain.base.digest, "failed", str(chain.base_tar))
    assert failed.detail is not None and "do not match their digests" in failed.detail
    code, out, _ = cli("lineage", str(chain.q_dir), "--search", str(chain.store))
    assert code == 1 and f"(base.tar): failed at {chain.base_tar}: 1 tensors do not match their digests\n" in out

    code, out, err = cli("verify", str(chain.ft_dir), "--search", str(chain.store))
    assert code == 1 and out == ""
    assert err.startswith(f"FAILED {chain.ft_dir}\n")
    assert f"parent fine-tuned-from {short_digest(chain.base.digest)} (base.tar): failed at {chain.base_tar}" in err
    with pytest.raises(mc.IntegrityError, match="recorded parents were found but do not verify") as caught:
        mc.verify(chain.ft_dir, search=[chain.store])
    assert caught.value.file == str(chain.base_tar)
    # verify checks direct parents only; lineage walks the whole chain.
    assert cli("verify", str(chain.q_dir), "--search", str(chain.store))[0] == 0
    # Parents that are not looked for cannot fail.
    code, out, _ = cli("verify", str(chain.ft_dir))
    assert code == 0
    assert out.endswith(
        f"  parent fine-tuned-from {short_digest(chain.base.digest)} (base.tar): not found: no search directory given\n"
    )


def test_verify_reports_found_parents(chain: Chain) -> None:
    """verify --search verifies each parent found and lists it, in text and in JSON."""
    code, out, _ = cli("verify", str(chain.ft_dir), "--search", str(chain.store))
    assert code == 0
    assert out.endswith(
        f"  parent fine-tuned-from {short_digest(chain.base.digest)} (base.tar): verified at {chain.base_tar}\n"
    )
    code, out, _ = cli("verify", "--json", str(chain.ft_dir), "--search", str(chain.store))
    (parent,) = json.loads(out)["parents"]
    assert code == 0
    assert (parent["digest"], parent["status"], parent["location"]) == (
        chain.base.digest,
        "verified",
        str(chain.base_tar),
    )


def test_a_good_copy_is_used_when_another_copy_is_corrupt(chain: Chain) -> None:
    """When several copies hold a digest, the ancestor is verified at the first copy that verifies."""
    good = chain.store / "z-copy.tar"
    good.write_bytes(chain.base_tar.read_bytes())
    flip_tensor_byte(chain.base_tar)
    result = ancestry(chain.ft_dir, search=[chain.store])
    (base,) = result.ancestors
    assert (base.status, base.location) == ("verified", str(good))


def test_every_copy_corrupt_is_one_failure_naming_the_first(chain: Chain) -> None:
    """When every copy of an ancestor is corrupt, it fails at the first copy and says how many others fail."""
    flip_tensor_byte(chain.base_tar)
    (chain.store / "z-copy.tar").write_bytes(chain.base_tar.read_bytes())
    (base,) = ancestry(chain.ft_dir, search=[chain.store]).ancestors
    assert (base.status, base.location) == ("failed", str(chain.base_tar))
    assert base.detail is not None
    assert base.detail.startswith("1 tensors do not match their digests (1 other copies fail too):\n  ")


def test_no_verify_finds_without_hashing(chain: Chain) -> None:
    """--no-verify reports ancestors as 'found', so a corrupt copy goes unnoticed (and the exit is 0)."""
    flip_tensor_byte(chain.base_tar)
    result = ancestry(chain.q_dir, search=[chain.store], verify=False)
    assert [a.status for a in result.ancestors] == ["found", "found"] and result.ok
    assert cli("lineage", "--no-verify", str(chain.q_dir), "--search", str(chain.store))[0] == 0


def test_shared_ancestors_of_a_merge_are_listed_once(tmp_path: Path) -> None:
    """A merge of two fine-tunes of one base lists the base under both, expanding and verifying it once."""
    base = mc.save(model(0), tmp_path / "base")
    left = mc.save(model(1), tmp_path / "left", parents=[(tmp_path / "base", "fine-tuned-from")])
    right = mc.save(model(2), tmp_path / "right", parents=[(tmp_path / "base", "fine-tuned-from")])
    (tmp_path / "out").mkdir()
    parents = [(tmp_path / "left", "merged-from"), (tmp_path / "right", "merged-from")]
    mc.save(model(3), tmp_path / "out" / "merged", parents=parents)
    result = ancestry(tmp_path / "out" / "merged", search=[tmp_path])
    assert [(a.depth, a.digest, a.repeated) for a in result.ancestors] == [
        (1, left.digest, False),
        (2, base.digest, False),
        (1, right.digest, False),
        (2, base.digest, True),
    ]
    text = str(result)
    assert "├── merged-from" in text and "│   └── fine-tuned-from" in text
    assert "verified at " + str(tmp_path / "base") + ", listed above" in text
    assert text.endswith(f"3 verified; searched {tmp_path}")


# --------------------------------------------------------------------------- index


def test_index_finds_directories_and_archives_and_skips_the_rest(chain: Chain) -> None:
    """The index holds checkpoint dirs and archives by digest; hidden dirs, nested and non-tar files are skipped."""
    store = chain.store
    (store / ".staging").mkdir()
    mc.save(model(5), store / ".staging" / "hidden")
    mc.save(model(6), chain.ft_dir / "nested")  # inside a checkpoint: not descended into
    (store / "notes.txt").write_text("hello")
    (store / "broken").mkdir()
    (store / "broken" / "manifest.json").write_text("{")
    os.symlink(store, store / "runs" / "loop")  # a link back up must not loop
    index = index_checkpoints([store])
    assert dict(index.by_digest) == {
        chain.base.digest: (str(chain.base_tar),),
        chain.ft.digest: (str(chain.ft_dir),),
    }
    assert list(index.unreadable) == [str(store / "broken")]
    assert "not valid JSON" in index.unreadable[str(store / "broken")]


def test_unreadable_candidates_are_mentioned_when_a_parent_is_missing(chain: Chain) -> None:
    """A parent not found while some checkpoints could not be read says how many were skipped."""
    chain.base_tar.write_bytes(b"not an archive at all" * 100)
    (chain.store / "broken").mkdir()
    (chain.store / "broken" / "manifest.json").write_text("[]")
    (base,) = ancestry(chain.ft_dir, search=[chain.store]).ancestors
    assert base.status == "not found"
    assert (
        base.detail
        == "no checkpoint with this digest under the search directories (1 unreadable checkpoints were skipped)"
    )


def test_search_may_name_an_archive_file(chain: Chain) -> None:
    """--search accepts an archive file as well as a directory."""
    (base,) = ancestry(chain.ft_dir, search=[chain.base_tar]).ancestors
    assert (base.status, base.location) == ("verified", str(chain.base_tar))


def test_missing_search_directory_is_exit_2(chain: Chain) -> None:
    """A --search path that does not exist is bad input: exit 2 naming it."""
    missing = chain.store / "nope"
    with pytest.raises(mc.CheckpointNotFoundError, match="search directory not found"):
        ancestry(chain.q_dir, search=[missing])
    code, _, err = cli("lineage", str(chain.q_dir), "--search", str(missing))
    assert code == 2 and str(missing) in err
    assert cli("verify", str(chain.ft_dir), "--search", str(missing))[0] == 2
