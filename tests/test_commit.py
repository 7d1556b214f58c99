"""Staging, locking, crash-atomic commit and cleanup of checkpoint directories (issue 11, items 4, 5, 9)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import manifest_ckpt as mc
from manifest_ckpt.storage import commit


def _staging_dirs(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith(".") and n.endswith(".tmp"))


def _abandon(stage: commit.Stage) -> None:
    """What a SIGKILL does to a writer: its lock is released, its files stay."""
    assert stage._lock is not None
    os.close(stage._lock)
    stage._lock = None
    stage._done = True


def test_a_killed_saves_staging_directory_is_removed_by_the_next_save(tmp_path: Path) -> None:
    """An abandoned staging sibling (nobody holds its lock) is removed; a live one is kept."""
    dead = commit.open_stage(tmp_path / "ck", overwrite=False)
    (dead.directory / "weights-0123456789abcdef.safetensors").write_bytes(b"partial")
    _abandon(dead)
    alive = commit.open_stage(tmp_path / "ck", overwrite=False)
    mc.save({"w": torch.zeros(2)}, tmp_path / "ck", record_code=False)
    assert _staging_dirs(tmp_path) == [alive.directory.name]
    alive.close()
    assert _staging_dirs(tmp_path) == []


def test_overwrite_removes_orphans_and_temporaries_but_not_other_files(tmp_path: Path) -> None:
    """After an overwrite the directory holds the manifest, its files, and what is not ours."""
    mc.save({"w": torch.zeros(2)}, tmp_path / "ck", record_code=False)
    for leftover in ("weights-0123456789abcdef.safetensors", ".weights.x.tmp", ".manifest.json.y.tmp"):
        (tmp_path / "ck" / leftover).write_bytes(b"partial")
    (tmp_path / "ck" / "README.txt").write_text("mine")
    manifest = mc.save({"w": torch.ones(2)}, tmp_path / "ck", record_code=False, overwrite=True)
    assert sorted(os.listdir(tmp_path / "ck")) == sorted(["README.txt", "manifest.json", *manifest.files])
    mc.verify(tmp_path / "ck")


def test_concurrent_saves_to_a_new_path_give_the_loser_a_typed_error(tmp_path: Path) -> None:
    """Two writers stage at once; the second to commit without overwrite gets CheckpointExistsError."""
    first = mc.save({"w": torch.zeros(2)}, tmp_path / "a", record_code=False)
    (name,) = first.files
    winner = commit.open_stage(tmp_path / "ck", overwrite=False)
    loser = commit.open_stage(tmp_path / "ck", overwrite=False)
    for stage in (winner, loser):
        os.link(tmp_path / "a" / name, stage.directory / name)
    winner.commit((tmp_path / "a" / "manifest.json").read_bytes(), [name])
    with pytest.raises(mc.CheckpointExistsError, match="overwrite=True"):
        loser.commit((tmp_path / "a" / "manifest.json").read_bytes(), [name])
    loser.close()
    assert _staging_dirs(tmp_path) == []
    assert sorted(os.listdir(tmp_path / "ck")) == sorted(["manifest.json", name])
    mc.verify(tmp_path / "ck")


def test_concurrent_overwrites_leave_the_last_committed_checkpoint_whole(tmp_path: Path) -> None:
    """Two overwriting writers staged at once: each commit is whole, the last one stays, no file missing."""
    mc.save({"w": torch.zeros(2)}, tmp_path / "ck", record_code=False)
    one = mc.save({"w": torch.ones(2)}, tmp_path / "one", record_code=False)
    two = mc.save({"w": torch.full((2,), 2.0)}, tmp_path / "two", record_code=False)
    stages = []
    for source, manifest in (("one", one), ("two", two)):
        stage = commit.open_stage(tmp_path / "ck", overwrite=True)
        (name,) = manifest.files
        os.link(tmp_path / source / name, stage.directory / name)
        stages.append((stage, source, name))
    for stage, source, name in stages:
        stage.commit((tmp_path / source / "manifest.json").read_bytes(), [name])
        stage.close()
        mc.verify(tmp_path / "ck")
    assert mc.read_manifest(tmp_path / "ck").digest == two.digest
    assert sorted(os.listdir(tmp_path / "ck")) == sorted(["manifest.json", *two.files])


def test_a_file_under_a_listed_name_with_another_header_is_never_replaced(tmp_path: Path) -> None:
    """Commit refuses to replace a same-named file whose header differs; the old checkpoint stays valid."""
    old = mc.save({"w": torch.zeros(2)}, tmp_path / "ck", record_code=False)
    (name,) = old.files
    other = mc.save({"w": torch.ones(3)}, tmp_path / "other", record_code=False)
    (other_name,) = other.files
    stage = commit.open_stage(tmp_path / "ck", overwrite=True)
    os.link(tmp_path / "other" / other_name, stage.directory / name)  # same name, other header
    with pytest.raises(mc.ManifestCkptError, match="another header"):
        stage.commit((tmp_path / "other" / "manifest.json").read_bytes(), [name])
    stage.close()
    mc.verify(tmp_path / "ck")
    assert mc.read_manifest(tmp_path / "ck").digest == old.digest


def test_resaving_the_same_content_over_itself_keeps_it_valid(tmp_path: Path) -> None:
    """The same tensors saved over themselves give the same file names and a checkpoint that verifies."""
    first = mc.save({"w": torch.arange(4.0)}, tmp_path / "ck", record_code=False)
    second = mc.save({"w": torch.arange(4.0)}, tmp_path / "ck", record_code=False, overwrite=True)
    assert first.files == second.files
    mc.verify(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path / "ck")) == sorted(["manifest.json", *first.files])


def test_the_lock_waits_for_its_holder_and_leaves_no_file_at_rest(tmp_path: Path) -> None:
    """lock_checkpoint takes the lock; a non-blocking second try fails; release removes the lock file."""
    (tmp_path / "ck").mkdir()
    fd = commit.lock_checkpoint(tmp_path / "ck")
    assert commit._flock(tmp_path / "ck" / commit.LOCK_NAME, blocking=False, create=False) is None
    commit.release(tmp_path / "ck", fd)
    assert os.listdir(tmp_path / "ck") == []


def test_a_new_checkpoint_appears_whole_at_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest is staged before the rename that commits a new path, so a kill never leaves weights alone."""
    seen: list[list[str]] = []
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == tmp_path / "ck":
            seen.append(sorted(os.listdir(src)))
            raise KeyboardInterrupt  # what a kill at the commit point leaves behind
        real_rename(src, dst)

    monkeypatch.setattr(commit.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        mc.save({"w": torch.arange(4.0)}, tmp_path / "ck", record_code=False)
    assert len(seen) == 1 and "manifest.json" in seen[0] and any(n.startswith("weights-") for n in seen[0])
    assert not (tmp_path / "ck").exists()
    monkeypatch.setattr(commit.os, "rename", real_rename)
    manifest = mc.save({"w": torch.arange(4.0)}, tmp_path / "ck", record_code=False)
    mc.verify(tmp_path / "ck")  # raises on any mismatch
    assert mc.read_manifest(tmp_path / "ck").digest == manifest.digest
    assert _staging_dirs(tmp_path) == []


def test_a_staging_directory_left_without_its_lock_file_is_removed_by_the_next_save(tmp_path: Path) -> None:
    """Writers remove their lock file last, so a lock-less staging sibling with files in it is abandoned."""
    dead = commit.open_stage(tmp_path / "ck", overwrite=False)
    (dead.directory / "weights-0123456789abcdef.safetensors").write_bytes(b"partial")
    _abandon(dead)
    os.unlink(dead.directory / commit.LOCK_NAME)  # killed in the middle of an old-style removal
    mc.save({"w": torch.zeros(2)}, tmp_path / "ck", record_code=False)
    assert _staging_dirs(tmp_path) == []


def test_closing_a_stage_removes_its_files_before_its_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a stage is being discarded its lock file is still there, locked, until the files are gone."""
    stage = commit.open_stage(tmp_path / "ck", overwrite=False)
    (stage.directory / "weights-0123456789abcdef.safetensors").write_bytes(b"partial")
    remaining: list[list[str]] = []
    real_release = commit.release

    def release(directory: Path, fd: int) -> None:
        remaining.append(sorted(os.listdir(directory)))
        real_release(directory, fd)

    monkeypatch.setattr(commit, "release", release)
    stage.close()
    assert remaining == [[commit.LOCK_NAME]]
    assert _staging_dirs(tmp_path) == []


def test_a_staging_directory_whose_lock_appears_after_the_check_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cleaner that looked before a live writer renamed its lock in must not delete the directory.

    Found by harness/concurrency.py: two racing saves, one removing the other's staging directory
    (``FileNotFoundError`` writing its weights).
    """
    alive = commit.open_stage(tmp_path / "ck", overwrite=False)
    real = commit._flock

    def looked_too_early(path: Path, *, blocking: bool, create: bool) -> int | None:
        if not blocking:  # the cleaner's probe: the lock files were not there yet when it looked
            raise FileNotFoundError(path)
        return real(path, blocking=blocking, create=create)

    monkeypatch.setattr(commit, "_flock", looked_too_early)
    commit.remove_abandoned_staging(tmp_path / "ck")
    monkeypatch.undo()
    assert sorted(os.listdir(alive.directory)) == [commit.LOCK_NAME]
    alive.close()
    assert _staging_dirs(tmp_path) == []


def test_abandoned_staging_directories_in_every_state_are_removed(tmp_path: Path) -> None:
    """Killed right after mkdir (empty), with its lock file not yet renamed in, or holding files."""
    (tmp_path / ".ck.0000000000000001.tmp").mkdir()
    pending = tmp_path / ".ck.0000000000000002.tmp"
    pending.mkdir()
    (pending / f"{commit.LOCK_NAME}.new").write_bytes(b"")
    dead = commit.open_stage(tmp_path / "ck", overwrite=False)
    (dead.directory / "weights-0123456789abcdef.safetensors").write_bytes(b"partial")
    _abandon(dead)
    commit.remove_abandoned_staging(tmp_path / "ck")
    assert _staging_dirs(tmp_path) == []
