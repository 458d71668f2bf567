"""Files written whole or not at all: checkpoints, tokenizers and token caches are written to a
temporary file in the target's folder, flushed to disk, then renamed over the target (an atomic
rename), so neither a crash nor a power loss mid-write leaves a half-written file where a run
expects a good one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` to write a temporary file beside `path`, then make it `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _target_mode(path))
        with open(tmp, "rb+") as f:  # the data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # and the rename itself (a folder's entries are synced through the folder)
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a platform whose folders cannot be opened: the rename is still atomic
        return path
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)
    return path


def _target_mode(path: Path) -> int:
    """The permissions the file should have: those of the file it replaces, else those of a
    newly created file (0o666 less the umask). mkstemp makes its file 0600, which would leave
    a shared checkpoint readable by its owner alone."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
