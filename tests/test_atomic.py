"""atomic_write: the target is the old file or the new one, never a half-written one."""

import os
import stat
from pathlib import Path

import pytest

from dalle_fast.atomic import atomic_write


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
