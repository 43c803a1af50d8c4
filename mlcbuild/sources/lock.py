"""The lock file: ``<recipe>.lock`` beside the recipe pins a Hub source to one commit and to the
exact bytes of every file the pipeline takes from it.

The first run resolves the recipe's revision and writes the lock; later runs read it and never
touch the network to decide what to build, and never move to a newer commit until
``update_lock`` (``mlcbuild lock --update``) is asked to. Each file carries the digest the Hub
itself publishes, so a download is verified without trusting the transport:

- ``sha256:<hex>`` for files stored with Git LFS (all weights), as the Hub's LFS metadata gives;
- ``gitsha1:<hex>`` for small files kept in git (config, tokenizer): the git blob id,
  ``sha1(b"blob <size>\\0" + content)``, which is what the Hub reports for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

LOCK_VERSION = 1

Digest = Annotated[str, Field(pattern=r"^(sha256:[0-9a-f]{64}|gitsha1:[0-9a-f]{40})$")]


class LockedFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    size: Annotated[int, Field(ge=0)]
    digest: Digest


class SourceLock(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = LOCK_VERSION
    source: str  # "HF://org/repo", as the recipe names it (without "@revision")
    revision: str  # what the recipe asked for ("main", a tag, a commit)
    commit: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]
    files: tuple[LockedFile, ...]

    def matches(self, source: str, revision: str) -> bool:
        """Whether this lock answers what the recipe asks for now (same repo and revision)."""
        return self.source.lower() == source.lower() and self.revision == revision


def lock_path(recipe_path: Path) -> Path:
    """``recipes/phi-2.yaml`` -> ``recipes/phi-2.lock``."""
    return recipe_path.with_suffix(".lock")


class LockError(Exception):
    """The lock file exists but cannot be used; the message says what to do."""


def read_lock(path: Path) -> SourceLock | None:
    """The lock at ``path``, or None when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return SourceLock.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise LockError(
            f"{path}: not a valid lock file ({where}: {first['msg']}); delete it or run "
            f"`mlcbuild lock --update` on the recipe"
        ) from None


def write_lock(path: Path, lock: SourceLock) -> None:
    """Write atomically: a reader (or a concurrent build) sees the old lock or the new one,
    never a torn file. The temp name ends in ``.lock.tmp`` so .gitignore hides a leftover."""
    text = json.dumps(lock.model_dump(mode="json"), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".lock.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DigestWriter:
    """Computes a lock digest of bytes as they stream past (while copying a file)."""

    def __init__(self, digest: str, size: int) -> None:
        self.algorithm, _, self.expected = digest.partition(":")
        if self.algorithm == "sha256":
            self._hash = hashlib.sha256()
        elif self.algorithm == "gitsha1":
            self._hash = hashlib.sha1()
            self._hash.update(b"blob %d\0" % size)
        else:
            raise ValueError(f"unknown digest algorithm in {digest!r}")

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)

    @property
    def actual(self) -> str:
        return f"{self.algorithm}:{self._hash.hexdigest()}"


def copy_verified(src: BinaryIO, dst: BinaryIO, locked: LockedFile, chunk: int = 8 << 20) -> str:
    """Copy ``src`` to ``dst`` and return the digest of what was copied (one pass over the bytes)."""
    digest = DigestWriter(locked.digest, locked.size)
    while block := src.read(chunk):
        digest.update(block)
        dst.write(block)
    return digest.actual


def file_lock_digest(path: Path, like: str) -> str:
    """The digest of ``path`` in the same algorithm as the lock digest ``like``."""
    digest = DigestWriter(like, path.stat().st_size)
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.actual
