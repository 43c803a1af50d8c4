"""A remote artifact cache beneath the local store: what lets machines share what was built.

Layout (Bazel's remote cache, so an existing ``bazel-remote`` or WebDAV server can hold it)::

    <prefix>/cas/<sha256>    file contents, addressed by their sha256
    <prefix>/ac/<ac-id>      one RemoteRecord (JSON) per node key; ac-id = sha256(AC_PREFIX + key)

Local keys and blob names stay xxh3 (fast); anything that crosses a machine boundary is
addressed and checked by sha256. A record is written only after every blob it names is on the
remote, so a reader never finds a record whose blobs are missing.

The remote is untrusted input: a pulled record is validated (schema, its key, its paths), each
blob is streamed to a temp path inside the local store with its sha256 and size checked in the
same pass that computes the local xxh3 digest, and only when every blob of the record checked
out are they moved into ``blobs/`` and the local record written (last). The local record's
digests are those of the bytes actually received, never the remote's.

Transports (``remote_fs``: ``file://``, ``s3://``, ``gs://`` through fsspec; ``remote_http``:
the Bazel HTTP cache protocol through httpx) move bytes only; this module decides what moves.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Protocol
from urllib.parse import urlsplit

import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlcbuild.cache.digests import tree_digest
from mlcbuild.cache.store import ArtifactStore, NodeRecord, OutputFile

MODES = ("read-write", "read", "write")
SCHEMA_VERSION = 1
# What an ac-id hashes the node key with: bazel-remote takes only 64-hex action keys, and the
# prefix keeps mlcbuild's entries apart from Bazel's should one server hold both.
AC_PREFIX = b"mlcbuild.node-record.v1\0"
MAX_RECORD_BYTES = 16 << 20  # a record lists paths and digests: anything bigger is not one of ours
TRANSFER_CHUNK = 8 << 20
TRANSFER_THREADS = 8

Progress = Callable[[int, "int | None"], None]  # (bytes transferred so far, bytes to transfer)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_XXH3 = re.compile(r"[0-9a-f]{32}")


class RemoteUnavailable(Exception):
    """The remote could not be reached or answered with an error (refused, timeout, 5xx, a
    server that went away mid-transfer): the caller builds locally instead."""


class RemoteCorrupt(Exception):
    """A remote record or blob failed validation: nothing of it was published locally; the
    caller reports it and builds the node instead."""


# -- the record schema ---------------------------------------------------------------------
class RemoteOutput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int = Field(ge=0)
    mode: Literal[0o644, 0o755]
    sha256: str
    digest: str  # the writer's xxh3-128: informative only, a reader recomputes it

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, value: str) -> str:
        if not _SHA256.fullmatch(value):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {value!r}")
        return value

    @field_validator("digest")
    @classmethod
    def _xxh3_hex(cls, value: str) -> str:
        if not _XXH3.fullmatch(value):
            raise ValueError(f"digest must be 32 lowercase hex digits (xxh3-128), got {value!r}")
        return value

    @field_validator("path")
    @classmethod
    def _relative_path(cls, value: str) -> str:
        check_relative_path(value)
        return value


def check_relative_path(path: str) -> None:
    """Raise ValueError unless ``path`` is a relative POSIX path that stays inside its directory."""
    if not path:
        raise ValueError("path is empty")
    if "\0" in path or "\\" in path:
        raise ValueError(f"path {path!r} contains a NUL or backslash")
    if path.startswith("/"):
        raise ValueError(f"path {path!r} is absolute; output paths must be relative")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"path {path!r} has an empty, '.' or '..' part; output paths must stay inside their directory")


class RemoteRecord(BaseModel):
    """What the remote keeps per node key: the NodeRecord with each output's sha256."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    key: str
    label: str
    stage: str
    version: int
    params: dict[str, Any]
    inputs: dict[str, str]
    toolchain: dict[str, str]
    outputs: list[RemoteOutput]
    tree_digest: str
    duration_s: float
    created: float
    warnings: list[Any] | None = None  # carried over when NodeRecord has them

    @property
    def size(self) -> int:
        return sum(o.size for o in self.outputs)

    @model_validator(mode="after")
    def _one_file_per_path(self) -> "RemoteRecord":
        paths = [o.path for o in self.outputs]
        seen: set[str] = set()
        for path in paths:
            if path in seen:
                raise ValueError(f"output path {path!r} is listed twice")
            seen.add(path)
        for path in paths:  # "a" and "a/b" cannot both be files
            parts = path.split("/")
            for n in range(1, len(parts)):
                if "/".join(parts[:n]) in seen:
                    raise ValueError(f"output path {path!r} lies under {'/'.join(parts[:n])!r}, which is a file")
        return self

    @classmethod
    def from_node(cls, record: NodeRecord, sha256s: dict[str, str]) -> "RemoteRecord":
        """``sha256s``: xxh3 digest -> sha256 of each of the record's blobs."""
        meta = record.model_dump(mode="json", exclude={"outputs"})
        outputs = [
            RemoteOutput(path=o.path, size=o.size, mode=o.mode, sha256=sha256s[o.digest], digest=o.digest)
            for o in record.outputs
        ]
        return cls(outputs=outputs, **{k: v for k, v in meta.items() if k in cls.model_fields})

    def to_node(self, digests: dict[str, str]) -> NodeRecord:
        """The local record, with ``digests`` (sha256 -> xxh3 of the bytes received) as its blob
        names and its tree digest recomputed from them."""
        outputs = [
            OutputFile(path=o.path, digest=digests[o.sha256], size=o.size, mode=o.mode, sha256=o.sha256)
            for o in self.outputs
        ]
        meta = self.model_dump(exclude={"schema_version", "outputs", "tree_digest", "warnings"})
        if self.warnings is not None and "warnings" in NodeRecord.model_fields:
            meta["warnings"] = self.warnings
        return NodeRecord(
            outputs=outputs,
            tree_digest=tree_digest((o.path, o.digest, o.size, o.mode) for o in outputs),
            **meta,
        )


def ac_id(key: str) -> str:
    """Where a node key's record lives: bazel-remote requires 64-hex action-cache keys."""
    return hashlib.sha256(AC_PREFIX + key.encode()).hexdigest()


# -- transports ----------------------------------------------------------------------------
class Transport(Protocol):
    """Moves bytes to and from ``<prefix>/<path>``; raises RemoteUnavailable on transport
    failure and FileNotFoundError when a read finds nothing at ``path``."""

    url: str
    can_list: bool

    def exists(self, path: str) -> bool: ...

    def read_bytes(self, path: str, limit: int) -> bytes:
        """The whole object; ValueError if it is larger than ``limit`` bytes."""
        ...

    def read_chunks(self, path: str, chunk_size: int) -> Iterator[bytes]: ...

    def write_file(self, path: str, local: Path, size: int, sent: Callable[[int], None]) -> None:
        """Upload ``local``; never leaves a partial object readable at ``path``."""
        ...

    def write_bytes(self, path: str, data: bytes) -> None: ...

    def list_names(self, directory: str) -> list[str]: ...


def _transport_for(url: str) -> Transport:
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("file", "s3", "gs"):
        from mlcbuild.cache.remote_fs import FsspecTransport

        return FsspecTransport(url)
    if scheme in ("http", "https"):
        from mlcbuild.cache.remote_http import HttpTransport

        return HttpTransport(url)
    raise ValueError(
        f"remote cache URL {url!r}: unsupported scheme {scheme or '(none)'!r}; "
        "expected file:///path, s3://bucket/prefix, gs://bucket/prefix or http(s)://host/prefix"
    )


# -- the cache -----------------------------------------------------------------------------
class _Aborted(Exception):
    """A transfer stopped because another one of the same pull or push failed."""


@dataclass
class _Counter:
    """Bytes moved by all transfer threads of one pull or push, reported to ``progress``."""

    total: int | None
    progress: Progress | None
    done: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.abort = threading.Event()  # set when one transfer failed: the others stop early

    def add(self, n: int) -> None:
        if self.abort.is_set():
            raise _Aborted
        with self._lock:
            self.done += n
            if self.progress is not None:
                self.progress(self.done, self.total)


class RemoteCache:
    def __init__(self, transport: Transport, mode: str = "read-write") -> None:
        if mode not in MODES:
            raise ValueError(f"remote cache mode {mode!r}: expected one of {', '.join(MODES)}")
        self.url = transport.url
        self.mode = mode
        self.transport = transport
        self.chunk_size = TRANSFER_CHUNK
        self.threads = TRANSFER_THREADS

    @classmethod
    def from_url(cls, url: str, mode: str = "read-write") -> "RemoteCache":
        if mode not in MODES:
            raise ValueError(f"remote cache mode {mode!r} (for {url}): expected one of {', '.join(MODES)}")
        return cls(_transport_for(url), mode)

    def __repr__(self) -> str:
        return f"RemoteCache({self.url!r}, mode={self.mode!r})"

    @property
    def can_read(self) -> bool:
        return self.mode in ("read-write", "read")

    @property
    def can_write(self) -> bool:
        return self.mode in ("read-write", "write")

    # -- reading ---------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return self.transport.exists(f"ac/{ac_id(key)}")

    def get(self, key: str) -> RemoteRecord | None:
        """The validated remote record of ``key``, or None on a miss."""
        try:
            data = self.transport.read_bytes(f"ac/{ac_id(key)}", MAX_RECORD_BYTES)
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise RemoteCorrupt(f"remote record of {key} at {self.url}: {exc}") from None
        return _parse_record(data, key, self.url)

    def records(self) -> Iterator[RemoteRecord]:
        """Every valid record on the remote (invalid ones are skipped)."""
        if not self.transport.can_list:
            raise NotImplementedError(
                f"remote cache {self.url}: the Bazel HTTP cache protocol cannot list its entries; "
                "list a file:// or s3:// remote instead"
            )
        for name in sorted(self.transport.list_names("ac")):
            if not _SHA256.fullmatch(name):
                continue  # a writer's temp file
            try:
                data = self.transport.read_bytes(f"ac/{name}", MAX_RECORD_BYTES)
                record = RemoteRecord.model_validate_json(data)
            except (FileNotFoundError, ValueError):
                continue
            if ac_id(record.key) == name:
                yield record

    def pull(self, key: str, store: ArtifactStore, progress: Progress | None = None) -> NodeRecord | None:
        """Bring ``key``'s record and blobs into ``store``; None on a remote miss."""
        if not self.can_read:
            raise PermissionError(f"remote cache {self.url} is write-only (mode {self.mode!r})")
        remote = self.get(key)
        if remote is None:
            return None
        wanted = {o.sha256: o for o in remote.outputs}  # one transfer per distinct content
        digests: dict[str, str] = {}
        workdir = store.new_workdir(f"pull.{key[:16]}")
        try:
            to_fetch = []
            for sha256, output in wanted.items():
                local = _verified_local_blob(store, output)
                if local is not None:
                    digests[sha256] = local
                else:
                    to_fetch.append(output)
            counter = _Counter(sum(o.size for o in to_fetch), progress)
            received = self._parallel(
                lambda output: self._fetch(output, workdir / output.sha256, counter), to_fetch, counter
            )
            for output, digest in zip(to_fetch, received):
                store.import_blob(workdir / output.sha256, digest, output.mode)
                digests[output.sha256] = digest
            record = remote.to_node(digests)
            store.write_record(record)  # last: the entry is visible only now
            return record
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _fetch(self, output: RemoteOutput, temp: Path, counter: _Counter) -> str:
        """Stream one blob to ``temp``, checking size and sha256; returns its xxh3 digest."""
        sha256, fast = hashlib.sha256(), xxhash.xxh3_128()
        size = 0
        chunks = self.transport.read_chunks(f"cas/{output.sha256}", self.chunk_size)
        try:
            with open(temp, "wb") as handle:
                for chunk in chunks:
                    size += len(chunk)
                    if size > output.size:
                        break  # a remote sending more than the record says is not read to its end
                    sha256.update(chunk)
                    fast.update(chunk)
                    handle.write(chunk)
                    counter.add(len(chunk))
        except FileNotFoundError:
            temp.unlink(missing_ok=True)
            raise RemoteCorrupt(
                f"remote blob {output.sha256} of {output.path} is missing at {self.url}, though a record names it"
            ) from None
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        finally:
            chunks.close()  # ends the transfer now (connection, file handle), not when collected
        problem = None
        if size != output.size:
            problem = f"{'more than' if size > output.size else 'only'} {size} bytes, its record says {output.size}"
        elif sha256.hexdigest() != output.sha256:
            problem = f"its content's sha256 is {sha256.hexdigest()}"
        if problem:
            temp.unlink(missing_ok=True)
            raise RemoteCorrupt(f"remote blob of {output.path} (sha256 {output.sha256}) at {self.url}: {problem}; discarded")
        return fast.hexdigest()

    # -- writing ---------------------------------------------------------------------------
    def push(self, record: NodeRecord, store: ArtifactStore, progress: Progress | None = None) -> int:
        """Upload the blobs of ``record`` the remote lacks, then the record; returns the bytes
        uploaded (blobs and record)."""
        if not self.can_write:
            raise PermissionError(f"remote cache {self.url} is read-only (mode {self.mode!r})")
        blobs = {o.digest: o for o in record.outputs}
        sha256s = {d: o.sha256 or store.blob_sha256(o) for d, o in blobs.items()}
        present = self._parallel(lambda digest: self.transport.exists(f"cas/{sha256s[digest]}"), list(blobs))
        missing = [blobs[d] for d, there in zip(blobs, present) if not there]
        counter = _Counter(sum(o.size for o in missing), progress)

        def upload(output: OutputFile) -> None:
            if output.sha256 is not None:  # not checked above: a corrupt local blob must not spread
                store.blob_sha256(output)
            self.transport.write_file(f"cas/{sha256s[output.digest]}", store.blob_path(output.digest),
                                      output.size, counter.add)

        self._parallel(upload, missing, counter)
        data = RemoteRecord.from_node(record, sha256s).model_dump_json(indent=1).encode()
        self.transport.write_bytes(f"ac/{ac_id(record.key)}", data)  # last: after all its blobs
        return counter.done + len(data)

    # -- helpers ---------------------------------------------------------------------------
    def _parallel(self, work: Callable[[Any], Any], items: list, counter: _Counter | None = None) -> list:
        """``work`` over ``items`` in threads. The first error cancels what has not started, stops
        the running transfers of ``counter`` at their next chunk, and is raised once every thread
        has finished (so none writes after we return)."""
        if len(items) <= 1:
            return [work(item) for item in items]
        with ThreadPoolExecutor(min(self.threads, len(items)), thread_name_prefix="remote-cache") as pool:
            futures: list[Future] = [pool.submit(work, item) for item in items]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in futures if f in done and f.exception() is not None]
            if errors:
                if counter is not None:
                    counter.abort.set()
                for future in futures:
                    future.cancel()
                wait(futures)
                raise next((e for e in errors if not isinstance(e, _Aborted)), errors[0])  # type: ignore[misc]
            return [f.result() for f in futures]


def _parse_record(data: bytes, key: str, url: str) -> RemoteRecord:
    try:
        record = RemoteRecord.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'record'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise RemoteCorrupt(f"remote record of {key} at {url} is invalid ({problems}); refused") from None
    if record.key != key:
        raise RemoteCorrupt(f"remote record at {url} filed under {key} names key {record.key}; refused")
    return record


def _verified_local_blob(store: ArtifactStore, output: RemoteOutput) -> str | None:
    """The xxh3 digest of a local blob with ``output``'s content, found by the digest the remote
    claims and checked against its sha256 and size (read locally, never trusted); else None."""
    from mlcbuild.cache.digests import file_digests

    blob = store.blob_path(output.digest)
    try:
        if blob.stat().st_size != output.size:
            return None
        digest, sha256 = file_digests(blob)
    except FileNotFoundError:
        return None
    return digest if digest == output.digest and sha256 == output.sha256 else None
