"""Write a file complete or not at all: a unique temporary file beside it, then a rename.

The temporary name comes from ``mkstemp`` (not the pid): two threads of one process writing the
same path (parallel compile nodes memoizing one host fact) must not share a temporary file, or
one's rename takes the other's away (CI saw exactly that: FileNotFoundError on ``os.replace``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
