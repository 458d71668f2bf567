"""Files written whole or not at all: checkpoints, tokenizers and token caches are written to a
temporary file in the target's folder, flushed to disk, then renamed over the target (an atomic
rename), so neither a crash nor a power loss mid-write leaves a half-written file where a run
expects a good one. A set of files that belong together (a model folder, generate's images) is
written the same way, every file before any rename, so that a failure while writing (a full disk)
leaves the old set whole."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporaries of `path` that atomic writes left when a kill (SIGKILL, a lost node)
    stopped them before they could clean up, and return them. Only for a file no other process is
    writing now: a training run's checkpoint in its own folder."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp{glob.escape(path.suffix)}"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def unmade_on_failure(folders: Iterable[str | Path]) -> Iterator[None]:
    """Inside, work that may make `folders` (and their parents); when it fails (an exception, Ctrl-C),
    those of them that did not exist on entry and are still empty are removed, deepest first."""
    made = {p for folder in folders for p in (Path(folder), *Path(folder).parents) if not p.exists()}
    try:
        yield
    except BaseException:
        for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()
            except OSError:  # not empty (something else wrote there), or gone
                pass
        raise


def set_aside(path: str | Path) -> Path:
    """Rename `path` to NAME.previous.SUFFIX beside it (replacing one set aside before); returns the new path."""
    path = Path(path)
    previous = path.with_name(f"{path.stem}.previous{path.suffix}")
    os.replace(path, previous)
    return previous


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` to write a temporary file beside `path`, then make it `path`."""
    return atomic_write_all({path: write})[0]


def copy_file(source: str | Path, path: str | Path) -> Path:
    """Copy `source`'s bytes to `path` atomically."""
    return atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


def atomic_write_all(files: dict[str | Path, Callable[[str], None]], remove: Iterable[str | Path] = ()) -> list[Path]:
    """Write each file of `files` as atomic_write does (`write(tmp)` writes a temporary beside it,
    named with the target's suffix, so that writers that go by the name write the right format),
    and only once all are written rename them over their targets, then delete the files in `remove`.
    A failure while writing leaves every target (and `remove`) as it was and no temporary behind,
    nor a folder made for the files; a target that is a folder is refused before anything is
    written (its rename would fail midway, after others were made). A target that is a symbolic
    link is written where the link points, and stays a link. Returns the targets."""
    files = {Path(path): write for path, write in files.items()}
    for path in files:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder, not a file that can be written")
    real = {path: Path(os.path.realpath(path)) for path in files}  # a link's target, not the link
    tmps: dict[Path, str] = {}
    with unmade_on_failure(path.parent for path in files):
        try:
            for path, write in files.items():
                target = real[path]
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmps[path] = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}",
                                                  dir=target.parent)
                os.close(fd)
                write(tmps[path])
                fsync_file(tmps[path])  # the data on disk before the rename makes it visible
                # after the fsync: a read-only target's mode (0444) would make the temporary unwritable
                os.chmod(tmps[path], _target_mode(target))
            for path, tmp in tmps.items():
                os.replace(tmp, real[path])
        except BaseException:
            for tmp in tmps.values():
                Path(tmp).unlink(missing_ok=True)
            raise
    for path in remove:
        if Path(path) not in files:
            Path(path).unlink(missing_ok=True)
    for folder in {path.parent for path in real.values()} | {Path(path).parent for path in remove}:
        _sync_folder(folder)
    return list(files)


def fsync_file(path: str | Path) -> None:
    """Make a file's data durable (opened read-only: a read-only file is synced too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Make a folder's renames durable (a folder's entries are synced through the folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform whose folders cannot be opened: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
