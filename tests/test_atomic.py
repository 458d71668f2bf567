"""atomic_write: the target is the old file or the new one, never a half-written one."""

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
