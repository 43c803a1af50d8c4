"""A local stand-in for the Hugging Face Hub, enough of it for ``huggingface_hub`` to resolve a
revision and download files: the tests point ``HF_ENDPOINT`` at it.

Served (as the Hub does):
- ``GET /api/models/{repo}[/revision/{rev}]``: ``sha`` (the commit), ``siblings`` with
  ``size``, ``blobId`` and, for LFS files, ``lfs.sha256``; ``gated``.
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag`` (git blob id),
  for LFS files ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``, ``Content-Length``, and
  ``Range: bytes=N-`` answered with 206 so an interrupted transfer can resume.
- Errors with the Hub's ``X-Error-Code``: 404 RepoNotFound / RevisionNotFound / EntryNotFound,
  401 GatedRepo without a token, 403 GatedRepo with a wrong one.

Test hooks: ``requests`` logs every request; ``cut_once[name] = n`` drops the connection after
``n`` bytes of the next GET of ``name``; ``missing_once`` answers 404 once for a file;
``replace_content`` changes a file's bytes under an existing commit (what a lock must catch).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

TOKEN = "hf_test_token_with_access"


@dataclass
class HubFile:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def blob_id(self) -> str:
        """The git blob id, which the Hub reports (and uses as ETag) for non-LFS files."""
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class HubRepo:
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]

    @property
    def file(self) -> str | None:
        return self.path.split("/resolve/", 1)[1].split("/", 1)[1] if "/resolve/" in self.path else None


class HubServer:
    """``with HubServer() as hub: hub.add_repo(...); os.environ["HF_ENDPOINT"] = hub.url``."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[Request] = []
        self.cut_once: dict[str, int] = {}
        self.missing_once: set[str] = set()
        self._lock = threading.Lock()
        self._commit_counter = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubServer":
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop answering; the port then refuses connections (a Hub that is unreachable)."""
        if self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._thread = None

    # -- repository contents --------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, lfs: tuple[str, ...] = (), gated: bool = False) -> str:
        self.repos[repo_id] = HubRepo(gated=gated)
        return self.push(repo_id, files, lfs=lfs)

    def push(self, repo_id: str, files: dict[str, bytes], *, lfs: tuple[str, ...] = (), branch: str = "main") -> str:
        """A new commit on ``branch`` with exactly ``files``; returns its hash."""
        with self._lock:
            self._commit_counter += 1
            commit = hashlib.sha1(f"{repo_id}:{self._commit_counter}".encode()).hexdigest()
            self.repos[repo_id].commits[commit] = {
                name: HubFile(content, lfs=name in lfs or name.endswith((".safetensors", ".bin")))
                for name, content in files.items()
            }
            self.repos[repo_id].refs[branch] = commit
        return commit

    def replace_content(self, repo_id: str, commit: str, name: str, content: bytes) -> None:
        """Change a file's bytes under an existing commit (the Hub never does; a lock must notice)."""
        with self._lock:
            old = self.repos[repo_id].commits[commit][name]
            self.repos[repo_id].commits[commit][name] = HubFile(content, lfs=old.lfs)

    def downloads(self, name: str | None = None) -> list[Request]:
        """The GETs of files (of ``name``) so far."""
        return [r for r in self.requests if r.method == "GET" and r.file and (name is None or r.file == name)]

    # -- lookups for the handler ----------------------------------------------------------
    def _resolve(self, repo_id: str, revision: str) -> tuple[int, str, str | None]:
        """(status, error code, commit)."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, "RepoNotFound", None
        commit = repo.refs.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            return 404, "RevisionNotFound", None
        return 200, "", commit


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = urlsplit(self.path).path
            hub.requests.append(Request(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
            if path.startswith("/api/models/"):
                self._model_info(path[len("/api/models/") :])
            elif "/resolve/" in path:
                repo_id, rest = path.lstrip("/").split("/resolve/", 1)
                revision, _, name = rest.partition("/")
                self._file(unquote(repo_id), unquote(revision), unquote(name), body)
            else:
                self._error(404, "RepoNotFound")

        def _error(self, status: int, code: str, commit: str | None = None) -> None:
            payload = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _model_info(self, rest: str) -> None:
            repo_id, _, revision = rest.partition("/revision/")
            status, code, commit = hub._resolve(unquote(repo_id), unquote(revision) or "main")
            if commit is None:
                return self._error(status, code)
            repo = hub.repos[unquote(repo_id)]
            siblings = []
            for name, f in sorted(repo.commits[commit].items()):
                entry: dict = {"rfilename": name, "size": len(f.content), "blobId": f.blob_id}
                if f.lfs:
                    entry["lfs"] = {"size": len(f.content), "sha256": f.sha256, "pointerSize": 134}
                siblings.append(entry)
            payload = json.dumps(
                {
                    "_id": repo_id,
                    "id": unquote(repo_id),
                    "modelId": unquote(repo_id),
                    "sha": commit,
                    "private": False,
                    "gated": "manual" if repo.gated else False,
                    "disabled": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "siblings": siblings,
                    "lastModified": "2024-01-01T00:00:00.000Z",
                    "createdAt": "2024-01-01T00:00:00.000Z",
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _file(self, repo_id: str, revision: str, name: str, body: bool) -> None:
            status, code, commit = hub._resolve(repo_id, revision)
            if commit is None:
                return self._error(status, code)
            repo = hub.repos[repo_id]
            if repo.gated:
                auth = self.headers.get("Authorization", "")
                if not auth:
                    return self._error(401, "GatedRepo")
                if auth != f"Bearer {TOKEN}":
                    return self._error(403, "GatedRepo")
            hub_file = repo.commits[commit].get(name)
            if hub_file is None or (body and name in hub.missing_once):
                hub.missing_once.discard(name)
                return self._error(404, "EntryNotFound", commit)
            content = hub_file.content
            start = 0
            range_header = self.headers.get("Range")
            if range_header and range_header.startswith("bytes="):
                start = int(range_header[len("bytes=") :].split("-", 1)[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hub_file.etag}"')
            if hub_file.lfs:
                self.send_header("X-Linked-Etag", f'"{hub_file.sha256}"')
                self.send_header("X-Linked-Size", str(len(content)))
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            self.send_header("Content-Length", str(len(content) - start))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if not body:
                return
            cut = hub.cut_once.pop(name, None)
            if cut is not None and cut > start:
                self.wfile.write(content[start:cut])
                self.wfile.flush()
                # Drop the connection mid-body, as a flaky network would.
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(content[start:])

    return Handler
