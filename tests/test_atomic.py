"""atomic_write and atomic_write_all: a target is the old file or the new one, never a half-written
one, and a set of files is all old or all new."""

import os
import stat
from pathlib import Path

import pytest

from dalle_fast.atomic import atomic_write, atomic_write_all
from tests.conftest import requires_file_permissions


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "file.json"
    assert atomic_write(target, lambda tmp: Path(tmp).write_text("old")) == target
    assert target.read_text() == "old"

    def fails(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails)
    assert target.read_text() == "old"
    atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


def test_a_new_file_gets_the_umask_mode_and_a_replaced_one_keeps_its_mode(tmp_path):
    old_umask = os.umask(0o022)
    try:
        fresh = atomic_write(tmp_path / "fresh.bin", lambda tmp: Path(tmp).write_text("x"))
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's 0600
        kept = tmp_path / "kept.bin"
        kept.write_text("old")
        kept.chmod(0o640)
        atomic_write(kept, lambda tmp: Path(tmp).write_text("new"))
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)


def test_a_set_of_files_is_renamed_in_only_once_every_file_is_written(tmp_path):
    """A failure while writing any file of a set (a full disk at the last one) leaves all the old files,
    the ones to remove too, and no temporary: never a mix of old and new."""
    folder = tmp_path / "set"
    atomic_write_all({folder / "a.txt": lambda tmp: Path(tmp).write_text("old a"),
                      folder / "b.txt": lambda tmp: Path(tmp).write_text("old b")})
    (folder / "stale.txt").write_text("an earlier run's")

    def full(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write_all({folder / "a.txt": lambda tmp: Path(tmp).write_text("new a"), folder / "b.txt": full},
                         remove=[folder / "stale.txt"])
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.txt", "stale.txt"]
    assert (folder / "a.txt").read_text() == "old a" and (folder / "b.txt").read_text() == "old b"
    written = atomic_write_all({folder / "a.txt": lambda tmp: Path(tmp).write_text("new a"),
                                folder / "b.txt": lambda tmp: Path(tmp).write_text("new b")},
                               remove=[folder / "stale.txt", folder / "never.txt"])
    assert written == [folder / "a.txt", folder / "b.txt"]
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.txt"]
    assert (folder / "a.txt").read_text() == "new a" and (folder / "b.txt").read_text() == "new b"
    # a folder made for the files is not left behind, empty, by a failure
    with pytest.raises(OSError):
        atomic_write_all({tmp_path / "new" / "sub" / "a.txt": full})
    assert not (tmp_path / "new").exists()


def test_the_temporary_has_the_targets_suffix(tmp_path):
    # writers that pick the format by the name (PIL's save, np.save) write the target's format
    seen = []
    atomic_write(tmp_path / "grid.png", lambda tmp: seen.append(tmp) or Path(tmp).write_text("x"))
    assert seen[0].endswith(".png") and Path(seen[0]).parent == tmp_path and Path(seen[0]).name.startswith(".")


def test_a_link_is_written_through_and_a_folder_refused_before_anything_is_written(tmp_path):
    # a checkpoint linked to another disk became a regular file in the run folder, the link's target
    # left at the old step; a folder target failed at its rename, after the others were replaced
    disk = tmp_path / "big_disk"
    disk.mkdir()
    (disk / "checkpoint.bin").write_text("step 1")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.bin").symlink_to(disk / "checkpoint.bin")
    atomic_write(run / "checkpoint.bin", lambda tmp: Path(tmp).write_text("step 2"))
    assert (run / "checkpoint.bin").is_symlink() and (disk / "checkpoint.bin").read_text() == "step 2"
    assert sorted(p.name for p in disk.iterdir()) == ["checkpoint.bin"] and len(list(run.iterdir())) == 1
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "b.txt").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        atomic_write_all({tmp_path / "a.txt": lambda tmp: Path(tmp).write_text("new a"),
                          tmp_path / "b.txt": lambda tmp: Path(tmp).write_text("new b")})
    assert (tmp_path / "a.txt").read_text() == "old a"


@requires_file_permissions
def test_a_read_only_target_is_replaced(tmp_path):
    # the temporary got the target's 0444 first and was then reopened for writing to fsync it:
    # a resumed run with a write-protected checkpoint trained, then failed at its first save
    target = tmp_path / "checkpoint.bin"
    target.write_text("old")
    target.chmod(0o444)
    atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o444
