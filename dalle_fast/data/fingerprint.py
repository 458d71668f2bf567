"""What a dataset on disk is made of: a digest of its files' names, sizes and modification times.

A token cache records it, so that a dataset changed in place (images added, a caption fixed, a
glob that now matches more shards) is not taken for the one the cache was built from. It stats
the files and reads none, which is cheap beside encoding them; like make, it misses a file
rewritten with the same size within the file system's timestamp resolution, and it tells a
copied dataset (new modification times) from its original.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Optional, Union

PathLike = Union[str, os.PathLike]


def files_fingerprint(paths: Iterable[PathLike], root: Optional[PathLike] = None) -> str:
    """'N files, sha256 ...' over each path (relative to `root` when given), its size and its
    modification time in nanoseconds, in the order given."""
    digest = hashlib.sha256()
    count = 0
    for path in paths:
        stat = os.stat(path)
        name = os.path.relpath(path, root) if root is not None else os.fspath(path)
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        count += 1
    return f"{count} files, sha256 {digest.hexdigest()}"
