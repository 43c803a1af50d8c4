"""Remote cache transport over fsspec: ``file://`` (a shared volume), ``s3://`` (any
S3-compatible store, through s3fs) and ``gs://`` (through gcsfs, when installed).

S3 credentials and endpoint come from the standard AWS environment and config files
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``~/.aws/...``); ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` point it at MinIO, R2, Ceph or a test server. Nothing is stored by us.

Writes never leave a partial object at its final name: an S3 or GCS object appears whole when
its PUT (or multipart upload) completes; on a file system it is written to a temp name in the
same directory and renamed.
"""

from __future__ import annotations

import functools
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import fsspec
from fsspec.callbacks import Callback

from mlcbuild.cache.remote import RemoteUnavailable

# Per request: a dead endpoint is reported within seconds, a slow one is given time.
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
ATTEMPTS = 3


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What the fsspec back ends raise when the remote cannot be reached or refuses us."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from gcsfs.retry import HttpError as GcsHttpError  # what gcsfs raises for a 4xx/5xx answer

        errors.append(GcsHttpError)
    except ImportError:
        pass
    try:
        from aiohttp import ClientError as AiohttpError

        errors.append(AiohttpError)
    except ImportError:
        pass
    return tuple(errors)


class _Sent(Callback):
    """fsspec's transfer callback, forwarded as byte counts."""

    def __init__(self, sent: Callable[[int], None]) -> None:
        super().__init__()
        self._sent = sent

    def relative_update(self, inc: int = 1) -> None:
        self.value += inc
        self._sent(inc)

    def absolute_update(self, value: int) -> None:  # gcsfs reports the bytes done so far, not the step
        step, self.value = value - self.value, value
        if step > 0:
            self._sent(step)


class FsspecTransport:
    can_list = True

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if parts.query or parts.fragment:
            raise ValueError(f"remote cache URL {url!r}: no query or fragment expected")
        if scheme == "file":
            if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
                raise ValueError(f"remote cache URL {url!r}: expected file:///absolute/path")
            self.root = parts.path.rstrip("/") or "/"
            self.fs: Any = fsspec.filesystem("file", skip_instance_cache=True)
        elif scheme == "s3":
            if not parts.netloc:
                raise ValueError(f"remote cache URL {url!r}: expected s3://bucket[/prefix]")
            self.root = (parts.netloc + parts.path).rstrip("/")
            self.fs = _s3_filesystem()
        elif scheme == "gs":
            if not parts.netloc:
                raise ValueError(f"remote cache URL {url!r}: expected gs://bucket[/prefix]")
            try:
                self.fs = _gcs_filesystem()
            except ImportError:
                raise ValueError(f"remote cache URL {url!r}: gs:// needs the gcsfs package (pip install gcsfs)") from None
            self.root = (parts.netloc + parts.path).rstrip("/")
        else:
            raise ValueError(f"remote cache URL {url!r}: not a file://, s3:// or gs:// URL")
        self.local = scheme == "file"
        self._errors = _transport_errors()

    def _path(self, path: str) -> str:
        return f"{self.root}/{path}"

    def _unavailable(self, what: str, exc: BaseException) -> RemoteUnavailable:
        return RemoteUnavailable(f"{self.url}: {what}: {type(exc).__name__}: {exc}")

    # -- reading ---------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        try:
            return bool(self.fs.exists(self._path(path)))
        except self._errors as exc:
            raise self._unavailable(f"checking {path}", exc) from exc

    def read_bytes(self, path: str, limit: int) -> bytes:
        try:
            with self.fs.open(self._path(path), "rb", cache_type="none") as handle:
                data = handle.read(limit + 1)
        except FileNotFoundError:
            raise
        except self._errors as exc:
            raise self._unavailable(f"reading {path}", exc) from exc
        if len(data) > limit:
            raise ValueError(f"{path} is larger than {limit} bytes")
        return data

    def read_chunks(self, path: str, chunk_size: int) -> Iterator[bytes]:
        try:
            # No read-ahead cache: each read is one ranged GET of chunk_size bytes, streamed.
            with self.fs.open(self._path(path), "rb", block_size=chunk_size, cache_type="none") as handle:
                while chunk := handle.read(chunk_size):
                    yield chunk
        except FileNotFoundError:
            raise
        except self._errors as exc:
            raise self._unavailable(f"reading {path}", exc) from exc

    def list_names(self, directory: str) -> list[str]:
        try:
            entries = self.fs.ls(self._path(directory), detail=False)
        except FileNotFoundError:
            return []
        except self._errors as exc:
            raise self._unavailable(f"listing {directory}", exc) from exc
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]

    # -- writing ---------------------------------------------------------------------------
    def write_file(self, path: str, local: Path, size: int, sent: Callable[[int], None]) -> None:
        target = self._path(path)
        try:
            if self.local:
                with open(local, "rb") as source:
                    self._write_local(target, iter(lambda: source.read(1 << 20), b""), sent)
            else:
                # Parts in flight per file: RemoteCache already moves several files at once.
                self.fs.put_file(str(local), target, callback=_Sent(sent), max_concurrency=2)
        except self._errors as exc:  # FileNotFoundError here: a missing bucket
            raise self._unavailable(f"writing {path}", exc) from exc

    def write_bytes(self, path: str, data: bytes) -> None:
        target = self._path(path)
        try:
            if self.local:
                self._write_local(target, iter([data]), lambda n: None)
            else:
                self.fs.pipe_file(target, data)
        except self._errors as exc:
            raise self._unavailable(f"writing {path}", exc) from exc

    def _write_local(self, target: str, chunks: Iterator[bytes], sent: Callable[[int], None]) -> None:
        """Write to a temp name beside ``target``, then rename: readers see all or nothing."""
        directory, name = target.rsplit("/", 1)
        os.makedirs(directory, exist_ok=True)
        temp = f"{directory}/.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(temp, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                    sent(len(chunk))
                handle.flush()
                os.fsync(handle.fileno())  # a shared volume: durable before it is visible
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def _s3_filesystem() -> Any:
    try:
        import s3fs
    except ImportError:
        raise ValueError("s3:// remote caches need s3fs: pip install 'mlcbuild[distributed]'") from None
    client_kwargs = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    fs = s3fs.S3FileSystem(
        skip_instance_cache=True,
        use_listings_cache=False,  # other machines write to it: never answer from a stale listing
        client_kwargs=client_kwargs,
        config_kwargs={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "retries": {"max_attempts": ATTEMPTS, "mode": "standard"},
        },
    )
    fs.retries = ATTEMPTS  # s3fs's own retry loop around botocore's
    return fs


def _gcs_filesystem() -> Any:
    """gcsfs with the settings the S3 one has: no listings cache (other machines write to the
    bucket), and ``ATTEMPTS`` tries per request. Credentials as gcsfs finds them (application
    default, then anonymous); ``STORAGE_EMULATOR_HOST`` points it at an emulator."""
    return _gcs_class()(skip_instance_cache=True, use_listings_cache=False)


@functools.cache
def _gcs_class() -> type:
    """gcsfs's core class (not fsspec's "gs" default, its hierarchical-namespace subclass, which
    first probes each bucket's type through another API) with its request methods retried
    ``ATTEMPTS`` times: gcsfs makes 6 attempts over ~30 s of back-off, a count fixed when its class
    is defined, so a dead endpoint would hold a build for half a minute per request."""
    from gcsfs.core import GCSFileSystem
    from gcsfs.retry import retry_request

    class BoundedRetriesGCSFileSystem(GCSFileSystem):
        pass

    for name in ("_request", "_get_file_request", "_get_file_concurrent"):
        inner = getattr(getattr(GCSFileSystem, name, None), "__wrapped__", None)  # under gcsfs's retry
        if inner is not None:
            setattr(BoundedRetriesGCSFileSystem, name, retry_request(retries=ATTEMPTS)(inner))
    return BoundedRetriesGCSFileSystem
