"""A small Bazel HTTP cache server, as bazel-remote serves it, for the remote cache tests.

    python tests/bazel_http_cache.py ROOT [PORT]     (prints "listening on PORT" when ready)

``GET``/``HEAD``/``PUT`` ``[/prefix...]/cas/<sha256>`` and ``[/prefix...]/ac/<64 hex>``, stored
under ``ROOT/prefix.../{cas,ac}/``. A PUT is written to a temp file and renamed, and a CAS upload
whose sha256 differs from its name is refused with 400 (as bazel-remote does); a miss is 404.

Test hook: while the file ``ROOT/.throttle`` exists, every 64 KiB chunk read or sent waits the
number of seconds it holds, so that a test can kill the server in the middle of a transfer.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHUNK = 1 << 16
NAME = re.compile(r"[0-9a-f]{64}")
SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def make_handler(root: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _delay(self) -> float:
            try:
                return float((root / ".throttle").read_text() or 0)
            except (FileNotFoundError, ValueError):
                return 0.0

        def _target(self) -> tuple[Path, str, str] | None:
            parts = [p for p in self.path.split("?", 1)[0].split("/") if p]
            if len(parts) < 2 or parts[-2] not in ("cas", "ac") or not NAME.fullmatch(parts[-1]):
                return None
            if not all(SEGMENT.fullmatch(p) for p in parts[:-2]):
                return None
            return root.joinpath(*parts), parts[-2], parts[-1]

        def _reply(self, status: int, body: bytes = b"") -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            target = self._target()
            if target is None:
                return self._reply(400, b"expected /cas/<sha256> or /ac/<64 hex>\n")
            try:
                handle = open(target[0], "rb")
            except FileNotFoundError:
                return self._reply(404)
            with handle:
                size = os.fstat(handle.fileno()).st_size
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                if self.command == "HEAD":
                    return
                while chunk := handle.read(CHUNK):
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    if delay := self._delay():
                        time.sleep(delay)

        def do_PUT(self) -> None:
            target = self._target()
            if target is None:
                return self._reply(400, b"expected /cas/<sha256> or /ac/<64 hex>\n")
            path, kind, name = target
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                return self._reply(411, b"Content-Length required\n")
            remaining = int(length)
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.parent / f".{name}.{uuid.uuid4().hex}.tmp"
            digest = hashlib.sha256()
            try:
                with open(temp, "wb") as handle:
                    while remaining:
                        chunk = self.rfile.read(min(CHUNK, remaining))
                        if not chunk:
                            raise ConnectionError("client went away mid-upload")
                        remaining -= len(chunk)
                        digest.update(chunk)
                        handle.write(chunk)
                        if delay := self._delay():
                            time.sleep(delay)
                if kind == "cas" and digest.hexdigest() != name:
                    temp.unlink()
                    return self._reply(400, f"sha256 of the upload is {digest.hexdigest()}, not {name}\n".encode())
                os.replace(temp, path)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            self._reply(200)

    return Handler


def main() -> None:
    root = Path(sys.argv[1])
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    root.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(root))
    server.daemon_threads = True
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
