"""Real remote cache servers for tests, each in its own process on 127.0.0.1, which a test can
kill (SIGKILL) and start again on the same port:

- ``MotoServer``: moto's standalone S3-compatible server (in memory: a killed one forgets all);
  ``env`` holds the AWS variables that point s3fs/boto3 at it.
- ``GcsServer``: gcp-storage-emulator, Google Cloud Storage's JSON API (in memory, as moto);
  ``env`` holds ``STORAGE_EMULATOR_HOST``, which points gcsfs at it.
- ``HttpCacheServer``: ``bazel_http_cache.py`` (the Bazel HTTP cache protocol), storing under a
  directory that outlives the process; ``throttle(seconds)`` slows every 64 KiB it moves.

Run as a script, it is a remote cache client in a separate process (what a test kills, or runs
twice at once)::

    python tests/remote_servers.py push|pull URL STORE KEY [--chunk-size N] [--delay S]
                                   [--ready PATH --go PATH]

It prints ``start <time>``, ``progress <done> <total>`` after each chunk (then sleeps ``--delay``),
and ``done <time> <bytes>``; exit status 3 on RemoteUnavailable, 4 on RemoteCorrupt. With
``--ready``/``--go`` it creates the first file once set up and waits for the second to start.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
REPO = HERE.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with status {process.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not listen within {timeout} s")


class ServerProcess:
    """A server process on a fixed port of 127.0.0.1: ``start()``, ``kill()``, ``start()`` again."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        assert self.process is None, "already running"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _wait_listening(self.port, self.process)

    def kill(self) -> None:
        """SIGKILL: the server goes away as a crashed machine does, mid-transfer or not."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class MotoServer(ServerProcess):
    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment that s3fs and boto3 read (credentials moto accepts)."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        env = self.env
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)


class GcsServer(ServerProcess):
    """gcp-storage-emulator: Google Cloud Storage's JSON API in memory (a killed one forgets all;
    its bucket is made again at each start). ``env`` points gcsfs at it."""

    def __init__(self, log: Path, bucket: str) -> None:
        super().__init__(log)
        self.bucket = bucket

    def command(self) -> list[str]:
        # A request per thread, as GCS serves them: the emulator's single-threaded HTTPServer would
        # keep a test's own request waiting behind an upload whose client is blocked in the test's
        # progress callback.
        launch = ("import http.server, sys; http.server.HTTPServer = http.server.ThreadingHTTPServer; "
                  "from gcp_storage_emulator.__main__ import main; sys.argv[0] = 'gcp-storage-emulator'; main()")
        return [sys.executable, "-c", launch, "start", "-H", "127.0.0.1", "--port", str(self.port),
                "--default-bucket", self.bucket, "--in-memory", "--quiet"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    # Raw access over the JSON API with httpx (not gcsfs: a test reads the bucket from inside
    # mlcbuild's progress callbacks, which gcsfs calls on its event loop).
    def _object_url(self, name: str) -> str:
        from urllib.parse import quote

        return f"{self.endpoint}/storage/v1/b/{self.bucket}/o/{quote(name, safe='')}"

    def get(self, name: str) -> bytes | None:
        import httpx

        response = httpx.get(self._object_url(name), params={"alt": "media"}, timeout=30)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.content

    def put(self, name: str, data: bytes) -> None:
        import httpx

        httpx.post(f"{self.endpoint}/upload/storage/v1/b/{self.bucket}/o", params={"uploadType": "media", "name": name},
                   content=data, headers={"Content-Type": "application/octet-stream"}, timeout=30).raise_for_status()

    def list(self, prefix: str) -> list[str]:
        import httpx

        response = httpx.get(f"{self.endpoint}/storage/v1/b/{self.bucket}/o", params={"prefix": prefix}, timeout=30)
        response.raise_for_status()
        return [item["name"] for item in response.json().get("items", [])]

    def delete(self, name: str) -> None:
        import httpx

        httpx.delete(self._object_url(name), timeout=30).raise_for_status()


class HttpCacheServer(ServerProcess):
    def __init__(self, root: Path, log: Path) -> None:
        super().__init__(log)
        self.root = root

    def command(self) -> list[str]:
        return [sys.executable, str(HERE / "bazel_http_cache.py"), str(self.root), str(self.port)]

    def url(self, prefix: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{prefix}".rstrip("/")

    def throttle(self, seconds_per_64k: float | None) -> None:
        flag = self.root / ".throttle"
        if seconds_per_64k:
            flag.write_text(str(seconds_per_64k))
        else:
            flag.unlink(missing_ok=True)


# -- a remote cache client in its own process -------------------------------------------------
def client_command(mode: str, url: str, store: Path, key: str, *, chunk_size: int | None = None,
                   delay: float = 0.0, ready: Path | None = None, go: Path | None = None) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), mode, url, str(store), key, "--delay", str(delay)]
    if chunk_size:
        command += ["--chunk-size", str(chunk_size)]
    if ready is not None and go is not None:
        command += ["--ready", str(ready), "--go", str(go)]
    return command


def _client_main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["push", "pull"])
    parser.add_argument("url")
    parser.add_argument("store", type=Path)
    parser.add_argument("key")
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--go", type=Path)
    args = parser.parse_args()

    from mlcbuild.cache.remote import RemoteCache, RemoteCorrupt, RemoteUnavailable
    from mlcbuild.cache.store import ArtifactStore

    store = ArtifactStore(args.store)
    cache = RemoteCache.from_url(args.url)
    if args.chunk_size:
        cache.chunk_size = args.chunk_size

    def progress(done: int, total: int | None) -> None:
        print(f"progress {done} {total}", flush=True)
        time.sleep(args.delay)

    if args.ready:
        args.ready.touch()
        while not args.go.exists():
            time.sleep(0.01)
    print(f"start {time.time()}", flush=True)
    try:
        if args.mode == "push":
            record = store.get_record(args.key)
            assert record is not None, f"no local record {args.key}"
            result = cache.push(record, store, progress=progress)
        else:
            pulled = cache.pull(args.key, store, progress=progress)
            result = pulled.size if pulled is not None else -1
    except RemoteUnavailable as exc:
        print(f"unavailable {exc}", flush=True)
        return 3
    except RemoteCorrupt as exc:
        print(f"corrupt {exc}", flush=True)
        return 4
    print(f"done {time.time()} {result}", flush=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(_client_main())
