"""Remote cache transport speaking the Bazel HTTP cache protocol (``GET/HEAD/PUT
<prefix>/cas/<sha256>`` and ``<prefix>/ac/<key>``), through httpx: ``bazel-remote`` (run it with
``--disable_http_ac_validation``: our action records are JSON, not ActionResult protobufs),
nginx with WebDAV PUT, or any server that stores what it is given.

Connection errors and 5xx answers are retried a bounded number of times, then reported as
RemoteUnavailable. A transfer cut mid-body is not retried here: the caller's sink has the first
half. The server makes a PUT atomic (bazel-remote and nginx write to a temp file and rename).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import httpx

from mlcbuild.cache.remote import RemoteUnavailable

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
ATTEMPTS = 3
BACKOFF_S = 0.25  # doubled after each failed attempt
UPLOAD_CHUNK = 1 << 20


class HttpTransport:
    can_list = False  # the protocol has no listing

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"remote cache URL {url!r}: expected http(s)://host[:port][/prefix]")
        if parts.query or parts.fragment:
            raise ValueError(f"remote cache URL {url!r}: no query or fragment expected")
        self.url = url
        self.base = url.rstrip("/")
        self.client = httpx.Client(
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            follow_redirects=False,
            headers={"User-Agent": "mlcbuild"},
        )

    def _send(self, method: str, path: str, *, stream: bool = False,
              body: Callable[[], Iterator[bytes]] | None = None, size: int | None = None) -> httpx.Response:
        """One request, retried on connection errors and 5xx; the response of the last attempt."""
        headers = {"Content-Length": str(size)} if size is not None else {}
        failure = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            request = self.client.build_request(method, f"{self.base}/{path}", headers=headers,
                                                content=body() if body is not None else None)
            try:
                response = self.client.send(request, stream=stream)
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code >= 500:
                failure = f"HTTP {response.status_code}"
                response.close()
                continue
            return response
        raise RemoteUnavailable(f"{self.url}: {method} {path}: {failure} (after {ATTEMPTS} attempts)")

    def _unexpected(self, method: str, path: str, response: httpx.Response) -> RemoteUnavailable:
        response.close()
        return RemoteUnavailable(f"{self.url}: {method} {path}: unexpected HTTP {response.status_code}")

    # -- reading ---------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        response = self._send("HEAD", path)
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise self._unexpected("HEAD", path, response)

    def read_bytes(self, path: str, limit: int) -> bytes:
        data = bytearray()
        for chunk in self.read_chunks(path, 1 << 16):
            data += chunk
            if len(data) > limit:
                raise ValueError(f"{path} is larger than {limit} bytes")
        return bytes(data)

    def read_chunks(self, path: str, chunk_size: int) -> Iterator[bytes]:
        response = self._send("GET", path, stream=True)
        try:
            if response.status_code == 404:
                raise FileNotFoundError(f"{self.base}/{path}")
            if response.status_code != 200:
                raise self._unexpected("GET", path, response)
            try:
                yield from response.iter_bytes(chunk_size)
            except httpx.TransportError as exc:  # the server went away mid-body
                raise RemoteUnavailable(f"{self.url}: GET {path}: {type(exc).__name__}: {exc}") from exc
        finally:
            response.close()

    def list_names(self, directory: str) -> list[str]:
        raise NotImplementedError(f"{self.url}: the Bazel HTTP cache protocol cannot list {directory}/")

    # -- writing ---------------------------------------------------------------------------
    def write_file(self, path: str, local: Path, size: int, sent: Callable[[int], None]) -> None:
        def body() -> Iterator[bytes]:
            with open(local, "rb") as handle:
                while chunk := handle.read(UPLOAD_CHUNK):
                    yield chunk
                    sent(len(chunk))

        self._put(path, body, size)

    def write_bytes(self, path: str, data: bytes) -> None:
        self._put(path, lambda: iter([data]), len(data))

    def _put(self, path: str, body: Callable[[], Iterator[bytes]], size: int) -> None:
        response = self._send("PUT", path, body=body, size=size)
        response.close()
        if not 200 <= response.status_code < 300:
            raise RemoteUnavailable(f"{self.url}: PUT {path}: refused with HTTP {response.status_code}")
