"""Digests shared by the artifact store and the build engine (which sits above it): canonical
encoding, xxh3-128 keys, file and tree digests, sha256 for what crosses machines, and the stat cache.

Keys and digests are xxh3-128 hex strings. A value is encoded canonically (JSON with sorted
keys, no whitespace, UTF-8) so that equal values always give equal keys, whatever the order
in which they were built.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import xxhash

if TYPE_CHECKING:
    import sqlite3

CHUNK = 8 << 20
# A file modified less than this long before it was digested may be modified again within the
# same mtime tick without its stat changing (git's "racy clean" problem): such digests are not
# remembered.
RACY_SECONDS = 2.0


def canonical_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_digest(value: Any) -> str:
    return xxhash.xxh3_128_hexdigest(canonical_bytes(value))


def file_digest(path: str | Path) -> str:
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def file_digests(path: str | Path) -> tuple[str, str]:
    """(xxh3-128, sha256) of a file in one read: the fast local digest and the cryptographic one
    that anything crossing a machine boundary is checked with."""
    import hashlib

    fast, strong = xxhash.xxh3_128(), hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            fast.update(chunk)
            strong.update(chunk)
    return fast.hexdigest(), strong.hexdigest()


def tree_digest(entries: Iterable[tuple[str, str, int, int]]) -> str:
    """Digest of a set of files given as (relative path, digest, size, mode)."""
    return canonical_digest(sorted([list(e) for e in entries]))


def iter_files(root: Path) -> list[Path]:
    """Regular files under ``root`` (or ``root`` itself), sorted, following no symlinked dirs."""
    if root.is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            found.append(Path(dirpath) / name)
    return found


class StatCache:
    """Remembers file digests by (path, size, mtime_ns, inode) in a small SQLite database, so an
    unchanged source is recognised by one ``stat`` per file instead of a read of its bytes."""

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db_path = db_path
        self._local = threading.local()
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, "
                "mtime_ns INTEGER, inode INTEGER, digest TEXT)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS derived (kind TEXT, digest TEXT, value TEXT, PRIMARY KEY (kind, digest))")
        self.hashed_bytes = 0  # bytes actually read since creation (for tests and benchmarks)

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            import sqlite3  # here, not at the top: the no-op fast path imports this module

            db = sqlite3.connect(self._db_path, timeout=60, isolation_level=None)
            # Switching a new database to WAL takes an exclusive lock that SQLite's busy timeout
            # does not wait for: two processes opening a fresh cache at once must retry.
            for attempt in range(200):
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    if attempt == 199:
                        raise
                    time.sleep(0.05)
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def digest(self, path: Path) -> tuple[str, int, int]:
        """(digest, size, mode) of a file, reading it only when its stat changed."""
        st = path.stat()
        key = str(path.resolve())
        db = self._connect()
        row = db.execute(
            "SELECT digest FROM digests WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
            (key, st.st_size, st.st_mtime_ns, st.st_ino),
        ).fetchone()
        mode = stat.S_IMODE(st.st_mode) & 0o111 and 0o755 or 0o644
        if row:
            return row[0], st.st_size, mode
        digest = file_digest(path)
        self.hashed_bytes += st.st_size
        if time.time() - st.st_mtime_ns / 1e9 > RACY_SECONDS:
            db.execute(
                "INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)",
                (key, st.st_size, st.st_mtime_ns, st.st_ino, digest),
            )
        return digest, st.st_size, mode

    def derived(self, kind: str, digest: str) -> str | None:
        """A fact of kind ``kind`` computed from the content whose digest is ``digest`` (e.g. a
        Python file's import list), as remembered by ``remember``; None when it is not."""
        row = self._connect().execute("SELECT value FROM derived WHERE kind=? AND digest=?", (kind, digest)).fetchone()
        return row[0] if row else None

    def remember(self, kind: str, digest: str, value: str) -> None:
        """Remember a fact computed from content (by its digest, so it holds wherever the content is)."""
        self._connect().execute("INSERT OR REPLACE INTO derived VALUES (?, ?, ?)", (kind, digest, value))

    def tree(self, root: Path) -> list[tuple[str, str, int, int]]:
        """(relative path, digest, size, mode) for every file under ``root``."""
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"source not found: {root}")
        base = root.parent if root.is_file() else root
        return [
            (file.relative_to(base).as_posix(), *self.digest(file)) for file in iter_files(root)
        ]
