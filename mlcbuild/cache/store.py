"""Content-addressed artifact store.

Layout under the cache root (``$MLCBUILD_CACHE_DIR``, default: the platform user cache dir)::

    blobs/ab/<digest>        file contents, stored once by xxh3-128 digest, read-only
    records/ab/<key>.json    one NodeRecord per node key: outputs by digest, and how they were made
    index/<identity>.json    the last build of each structural node (what ``plan`` compares to)
    locks/<key>.lock         per-key file locks: two processes needing one node build it once
    pins/<session>.json      keys a running build holds (flock-ed while alive); gc spares them
    tmp/                     private work dirs of running nodes; published by atomic rename
    journal/<digest>.json    run journals: what a no-op rerun checks by stat (pipeline.journal)
    statcache.sqlite         digests of source files by (path, size, mtime_ns, inode)

A crash at any moment leaves either nothing or a complete entry: outputs are renamed into
``blobs/`` only once complete, and the record, which is what makes an entry visible, is
renamed into place last.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict

from mlcbuild.cache.location import default_cache_dir
from mlcbuild.atomicfile import write_atomic
from mlcbuild.cache.digests import StatCache, file_digest, file_digests, iter_files, tree_digest


class CorruptBlob(Exception):
    def __init__(self, digest: str, reason: str) -> None:
        super().__init__(f"blob {digest} is corrupt ({reason}); dropped, it will be rebuilt")
        self.digest = digest
        self.reason = reason

    def __reduce__(self) -> tuple:  # pickled across processes (a builder process, a Ray task)
        return (type(self), (self.digest, self.reason))


class OutputFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    digest: str  # xxh3-128: how the local store names the blob
    size: int
    mode: int
    sha256: str | None = None  # what a remote cache addresses and checks it by (None: recorded before it was kept)


class NodeRecord(BaseModel):
    """What a node produced (outputs by digest) and how (stage, params, toolchain, inputs)."""

    key: str
    label: str
    stage: str
    version: int
    params: dict[str, Any]
    inputs: dict[str, str]  # input name -> tree digest of that input's outputs
    toolchain: dict[str, str]
    outputs: list[OutputFile]
    tree_digest: str
    duration_s: float
    created: float
    warnings: list[str] = []  # what the stage warned about while building (StageContext.warn)

    @property
    def size(self) -> int:
        return sum(o.size for o in self.outputs)


class ArtifactStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_cache_dir()
        for sub in ("blobs", "records", "index", "locks", "pins", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.stat_cache = StatCache(self.root / "statcache.sqlite")

    # -- paths -----------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / digest[:2] / digest

    def record_path(self, key: str) -> Path:
        return self.root / "records" / key[:2] / f"{key}.json"

    # -- records ---------------------------------------------------------------------------
    def get_record(self, key: str) -> NodeRecord | None:
        try:
            data = self.record_path(key).read_bytes()
        except FileNotFoundError:
            return None
        return NodeRecord.model_validate_json(data)

    def touch(self, key: str) -> None:
        """Mark a record as used now (gc evicts least recently used first)."""
        try:
            os.utime(self.record_path(key))
        except FileNotFoundError:
            pass

    def records(self) -> Iterator[NodeRecord]:
        for path in sorted((self.root / "records").glob("*/*.json")):
            try:
                yield NodeRecord.model_validate_json(path.read_bytes())
            except (OSError, ValueError):
                continue

    def drop_record(self, key: str) -> None:
        self.record_path(key).unlink(missing_ok=True)

    # -- the last build of a structural node (for plan's "why") ------------------------------
    def read_index(self, identity: str) -> dict | None:
        try:
            return json.loads((self.root / "index" / f"{identity}.json").read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def write_index(self, identity: str, entry: dict) -> None:
        write_atomic(self.root / "index" / f"{identity}.json", json.dumps(entry, sort_keys=True).encode())

    # -- building --------------------------------------------------------------------------
    @contextmanager
    def lock(self, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the per-key lock. When another build holds it, ``on_wait`` is called once before
        waiting for it (the caller can say so: that build is making the node right now)."""
        lock = FileLock(str(self.root / "locks" / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def new_workdir(self, label: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)
        return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}.{safe}.", dir=self.root / "tmp"))

    def publish(self, key: str, out_dir: Path, meta: dict[str, Any]) -> NodeRecord:
        """Move the files of ``out_dir`` into the blob store and write the node's record."""
        outputs = []
        for file in iter_files(out_dir):
            if file.is_symlink():
                raise ValueError(f"stage output {file.relative_to(out_dir)} is a symlink; outputs must be files")
            digest, sha256 = file_digests(file)
            size = file.stat().st_size
            mode = 0o755 if os.access(file, os.X_OK) and file.stat().st_mode & 0o111 else 0o644
            self.import_blob(file, digest, mode)
            outputs.append(OutputFile(path=file.relative_to(out_dir).as_posix(), digest=digest, size=size, mode=mode,
                                      sha256=sha256))
        record = NodeRecord(
            key=key,
            outputs=outputs,
            tree_digest=tree_digest((o.path, o.digest, o.size, o.mode) for o in outputs),
            created=time.time(),
            **meta,
        )
        self.write_record(record)
        return record

    def import_blob(self, file: Path, digest: str, mode: int) -> Path:
        """Move ``file`` (on this store's filesystem, e.g. under ``tmp/``) into ``blobs/`` as the
        blob ``digest``, which the caller has computed from its content: publish and a verified
        remote pull both come here. A blob already present is kept (same content) and ``file``
        dropped."""
        blob = self.blob_path(digest)
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(file, 0o555 if mode == 0o755 else 0o444)
            os.replace(file, blob)  # same filesystem: atomic, never a partial blob
        else:
            os.utime(blob)  # recently used: gc's grace period covers blobs being published
            if file != blob:
                file.unlink(missing_ok=True)
        return blob

    def write_record(self, record: NodeRecord) -> None:
        """Write ``record``, which makes its entry visible: after all its blobs are in place."""
        write_atomic(self.record_path(record.key), record.model_dump_json(indent=1).encode())

    # -- reading back ----------------------------------------------------------------------
    def check_blob(self, output: OutputFile) -> Path:
        """Return the blob of ``output`` after checking its size and digest; a bad blob is
        dropped and reported with CorruptBlob."""
        blob = self.blob_path(output.digest)
        try:
            size = blob.stat().st_size
        except FileNotFoundError:
            raise CorruptBlob(output.digest, "missing") from None
        reason = None
        if size != output.size:
            reason = f"size {size}, expected {output.size}"
        elif file_digest(blob) != output.digest:
            reason = "content does not match its digest"
        if reason:
            blob.unlink(missing_ok=True)
            raise CorruptBlob(output.digest, reason)
        return blob

    def blob_sha256(self, output: OutputFile) -> str:
        """The sha256 of ``output``'s blob, from the same read that checks its size and xxh3
        digest (a bad blob is dropped and reported with CorruptBlob, as check_blob does)."""
        blob = self.blob_path(output.digest)
        try:
            size = blob.stat().st_size
        except FileNotFoundError:
            raise CorruptBlob(output.digest, "missing") from None
        digest, sha256 = file_digests(blob) if size == output.size else ("", "")
        if digest != output.digest:
            blob.unlink(missing_ok=True)
            reason = f"size {size}, expected {output.size}" if size != output.size else "content does not match its digest"
            raise CorruptBlob(output.digest, reason)
        if output.sha256 is not None and sha256 != output.sha256:
            raise CorruptBlob(output.digest, f"sha256 {sha256} differs from its record's {output.sha256}")
        return sha256

    def materialize(self, record: NodeRecord, dest: Path, verify: bool = True) -> None:
        """Lay ``record``'s outputs out under ``dest`` (hard links where possible)."""
        for output in record.outputs:
            blob = self.check_blob(output) if verify else self.blob_path(output.digest)
            target = dest / output.path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(blob, target)
            except OSError:  # another filesystem, or links not allowed: copy
                shutil.copyfile(blob, target)
                os.chmod(target, output.mode)

    def is_materialized(self, record: NodeRecord, dest: Path) -> bool:
        """True when ``dest`` holds exactly ``record``'s outputs as links to their blobs."""
        try:
            expected = {o.path for o in record.outputs}
            present = {p.relative_to(dest).as_posix() for p in iter_files(dest)}
            if expected != present:
                return False
            for output in record.outputs:
                if (dest / output.path).stat().st_ino != self.blob_path(output.digest).stat().st_ino:
                    return False
        except FileNotFoundError:
            return False
        return True

    # -- sessions that hold keys (gc spares them) ---------------------------------------------
    @contextmanager
    def session(self) -> Iterator["Session"]:
        session = Session(self.root / "pins" / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
        try:
            yield session
        finally:
            session.close()

    def live_pins(self) -> set[str]:
        keys: set[str] = set()
        for pin in (self.root / "pins").glob("*.json"):
            try:
                with open(pin, "rb") as handle:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:  # its build is alive
                        keys.update(json.loads(handle.read() or b"[]"))
                        continue
                    pin.unlink(missing_ok=True)  # its process died: stale
            except (FileNotFoundError, ValueError):
                continue
        return keys

    # -- maintenance -----------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Check every blob against its digest and every record against its blobs."""
        problems = []
        for blob in sorted((self.root / "blobs").glob("*/*")):
            if file_digest(blob) != blob.name:
                problems.append(f"blob {blob.name}: content does not match its digest (dropped)")
                blob.unlink(missing_ok=True)
        for record in self.records():
            missing = [o.path for o in record.outputs if not self.blob_path(o.digest).exists()]
            if missing:
                problems.append(
                    f"record {record.key} ({record.label}): missing blobs for {', '.join(missing)} (record dropped)"
                )
                self.drop_record(record.key)
        return problems

    def usage(self) -> tuple[int, int, int]:
        """(records, blobs, bytes in blobs)."""
        blobs = list((self.root / "blobs").glob("*/*"))
        records = len(list((self.root / "records").glob("*/*.json")))
        return records, len(blobs), sum(b.stat().st_size for b in blobs)

    def remove(self, key_prefix: str) -> list[str]:
        removed = []
        for path in (self.root / "records").glob(f"{key_prefix[:2]}/{key_prefix}*.json"):
            path.unlink(missing_ok=True)
            removed.append(path.stem)
        return removed

    def gc(
        self,
        max_size: int | None = None,
        older_than: float | None = None,
        grace_s: float = 3600.0,
        now: float | None = None,
    ) -> tuple[list[str], int]:
        """Evict records (least recently used first) until the blobs fit ``max_size`` bytes,
        and every record unused for ``older_than`` seconds; then delete unreferenced blobs.
        Keys pinned by a running build are never evicted, and blobs touched within
        ``grace_s`` are kept (a running build may be about to reference them).
        Returns (evicted keys, bytes freed)."""
        now = time.time() if now is None else now
        pinned = self.live_pins()
        entries = []
        for path in (self.root / "records").glob("*/*.json"):
            try:
                record = NodeRecord.model_validate_json(path.read_bytes())
                entries.append((path.stat().st_mtime, record))
            except (OSError, ValueError):
                continue
        entries.sort(key=lambda e: e[0])
        evicted: list[str] = []
        kept: list[NodeRecord] = []
        for used, record in entries:
            if record.key not in pinned and older_than is not None and now - used > older_than:
                evicted.append(record.key)
            else:
                kept.append(record)
        if max_size is not None:
            total = sum(o.size for r in kept for o in {o.digest: o for o in r.outputs}.values())
            for record in list(kept):
                if total <= max_size:
                    break
                if record.key in pinned:
                    continue
                kept.remove(record)
                evicted.append(record.key)
                total -= record.size
        for key in evicted:
            self.drop_record(key)
        referenced = {o.digest for r in kept for o in r.outputs}
        freed = 0
        for blob in (self.root / "blobs").glob("*/*"):
            st = blob.stat()
            if blob.name not in referenced and now - st.st_mtime > grace_s:
                blob.unlink(missing_ok=True)
                freed += st.st_size
        # Run journals (pipeline.journal) only speed up no-op reruns, and one is written per
        # environment a recipe ran in: drop them all; the next successful run writes its own.
        for stale in (self.root / "journal").glob("*.json"):
            stale.unlink(missing_ok=True)
        for work in (self.root / "tmp").iterdir():
            owner = work.name.split(".", 1)[0]
            if owner.isdigit() and not _pid_alive(int(owner)):
                shutil.rmtree(work, ignore_errors=True)
        return evicted, freed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Session:
    """The keys one running build holds, in a pin file it keeps flock-ed while alive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: set[str] = set()
        self._handle = open(path, "wb+")
        fcntl.flock(self._handle, fcntl.LOCK_EX)

    def hold(self, key: str) -> None:
        if key not in self.keys:
            self.keys.add(key)
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.write(json.dumps(sorted(self.keys)).encode())
            self._handle.flush()

    def close(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self._handle.close()
