"""The remote cache against real remotes: a file:// directory, moto's S3 server, a Google Cloud
Storage emulator and a Bazel HTTP cache server, each in its own process on 127.0.0.1 (tests/remote_servers.py). Records are made
by ArtifactStore.publish from a few small files; a blob of 2 MiB gives a transfer time to cut."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from mlcbuild.cache.remote import RemoteCache, RemoteCorrupt, RemoteUnavailable, ac_id
from mlcbuild.cache.store import ArtifactStore, NodeRecord
from remote_servers import GcsServer, HttpCacheServer, MotoServer, client_command

BUCKET = "mlcbuild-remote-test"
BIG = 2 << 20
SMALL_CHUNK = 64 << 10


# -- servers (one per module) and a remote per test ---------------------------------------------
@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "server.log")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.env.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        with server:
            server.create_bucket(BUCKET)
            yield server


@pytest.fixture(scope="module")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    server = GcsServer(tmp_path_factory.mktemp("gcs") / "server.log", BUCKET)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.env.items():
            patch.setenv(name, value)
        with server:
            yield server


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpCacheServer]:
    root = tmp_path_factory.mktemp("bazel-cache")
    with HttpCacheServer(root / "data", root / "server.log") as server:
        yield server


@dataclass
class Remote:
    """One remote under a fresh prefix, with access that bypasses mlcbuild (to inspect it,
    or to plant bad entries as a hostile or broken remote would)."""

    kind: str
    url: str
    raw_get: Callable[[str], bytes | None]  # a path under the prefix: "cas/<sha256>", "ac/<id>"
    raw_put: Callable[[str, bytes], None]
    raw_list: Callable[[str], list[str]]
    raw_delete: Callable[[str], None]
    kill: Callable[[], None]  # SIGKILL the server (nothing to kill for file://)
    restart: Callable[[], None]
    throttle: Callable[[float | None], None]  # slow the server's transfers (HTTP only)

    def cache(self, mode: str = "read-write") -> RemoteCache:
        return RemoteCache.from_url(self.url, mode)


def _dir_access(root: Path) -> tuple[Callable, Callable, Callable, Callable]:
    def get(path: str) -> bytes | None:
        try:
            return (root / path).read_bytes()
        except FileNotFoundError:
            return None

    def put(path: str, data: bytes) -> None:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)

    def ls(directory: str) -> list[str]:
        return sorted(p.name for p in (root / directory).glob("*")) if (root / directory).is_dir() else []

    def delete(path: str) -> None:
        (root / path).unlink()

    return get, put, ls, delete


def _nothing(*args: object) -> None:
    pass


@pytest.fixture(params=["file", "s3", "gs", "http"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Remote:
    prefix = f"p{uuid.uuid4().hex[:8]}"
    if request.param == "file":
        root = tmp_path / "shared" / prefix
        return Remote("file", f"file://{root}", *_dir_access(root), _nothing, _nothing, _nothing)
    if request.param == "http":
        server: HttpCacheServer = request.getfixturevalue("http_server")
        request.addfinalizer(lambda: server.throttle(None))
        return Remote("http", server.url(prefix), *_dir_access(server.root / prefix), server.kill, server.start,
                      server.throttle)
    if request.param == "gs":
        return _gs_remote(request.getfixturevalue("gcs_server"), prefix)
    moto: MotoServer = request.getfixturevalue("moto_server")

    def s3_get(path: str) -> bytes | None:
        try:
            return moto.client().get_object(Bucket=BUCKET, Key=f"{prefix}/{path}")["Body"].read()
        except moto.client().exceptions.NoSuchKey:
            return None

    def s3_put(path: str, data: bytes) -> None:
        moto.client().put_object(Bucket=BUCKET, Key=f"{prefix}/{path}", Body=data)

    def s3_ls(directory: str) -> list[str]:
        listing = moto.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/{directory}/")
        return sorted(o["Key"].rsplit("/", 1)[1] for o in listing.get("Contents", []))

    def s3_delete(path: str) -> None:
        moto.client().delete_object(Bucket=BUCKET, Key=f"{prefix}/{path}")

    def s3_restart() -> None:  # in memory: a restarted moto starts empty
        moto.start()
        moto.create_bucket(BUCKET)

    return Remote("s3", f"s3://{BUCKET}/{prefix}", s3_get, s3_put, s3_ls, s3_delete, moto.kill, s3_restart, _nothing)


def _gs_remote(server: GcsServer, prefix: str) -> Remote:
    def gs_ls(directory: str) -> list[str]:
        return sorted(name.rsplit("/", 1)[1] for name in server.list(f"{prefix}/{directory}/"))

    return Remote("gs", f"gs://{BUCKET}/{prefix}", lambda rel: server.get(f"{prefix}/{rel}"),
                  lambda rel, data: server.put(f"{prefix}/{rel}", data), gs_ls,
                  lambda rel: server.delete(f"{prefix}/{rel}"), server.kill, server.start, _nothing)


# -- records -------------------------------------------------------------------------------------
META = {"label": "toy node", "stage": "toy", "version": 1, "params": {"bits": 4}, "inputs": {"src": "0" * 32},
        "toolchain": {"python": "3.11"}, "duration_s": 1.25}


def publish(store: ArtifactStore, key: str, files: dict[str, bytes], executable: tuple[str, ...] = ()) -> NodeRecord:
    work = store.new_workdir("test")
    for rel, data in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
        os.chmod(work / rel, 0o755 if rel in executable else 0o644)
    return store.publish(key, work, META)


def node_files(seed: int = 0, big: int = BIG) -> dict[str, bytes]:
    blob = hashlib.sha256(f"seed {seed}".encode()).digest()
    return {
        "weights/params.bin": (blob * (big // len(blob) + 1))[:big],
        "config.json": b'{"layers": 2}\n',
        "bin/run.sh": b"#!/bin/sh\necho hi\n",
        "copy/config.json": b'{"layers": 2}\n',  # same content as config.json: one blob
        "empty": b"",
    }


def new_key() -> str:
    return uuid.uuid4().hex


def blobs_in(store: ArtifactStore) -> list[Path]:
    return sorted(p for p in (store.root / "blobs").rglob("*") if p.is_file())


def assert_nothing_published(store: ArtifactStore, key: str) -> None:
    assert store.get_record(key) is None
    assert blobs_in(store) == []
    assert [p for p in (store.root / "tmp").rglob("*") if p.is_file()] == []


def assert_same_blobs(record: NodeRecord, a: ArtifactStore, b: ArtifactStore) -> None:
    for output in record.outputs:
        assert b.blob_path(output.digest).read_bytes() == a.blob_path(output.digest).read_bytes()
        assert os.stat(b.blob_path(output.digest)).st_mode & 0o111 == os.stat(a.blob_path(output.digest)).st_mode & 0o111


def assert_remote_consistent(remote: Remote) -> None:
    """Every record on the remote names blobs that are all there, whole; no blob is partial."""
    for name in remote.raw_list("cas"):
        if not name.startswith("."):  # a writer's temp file is never at a final name
            assert hashlib.sha256(remote.raw_get(f"cas/{name}") or b"").hexdigest() == name, f"partial blob {name}"
    for name in remote.raw_list("ac"):
        if name.startswith("."):
            continue
        record = json.loads(remote.raw_get(f"ac/{name}") or b"")
        for output in record["outputs"]:
            assert remote.raw_get(f"cas/{output['sha256']}") is not None, f"record {name} lacks {output['path']}"


@pytest.fixture
def stores(tmp_path: Path) -> tuple[ArtifactStore, ArtifactStore]:
    return ArtifactStore(tmp_path / "a"), ArtifactStore(tmp_path / "b")


# -- round trip ----------------------------------------------------------------------------------
def test_push_then_pull_gives_identical_record_and_bytes(remote: Remote, stores, tmp_path: Path) -> None:
    a, b = stores
    key = new_key()
    record = publish(a, key, node_files(), executable=("bin/run.sh",))
    cache = remote.cache()
    assert not cache.has(key)
    assert cache.pull(key, b) is None  # a miss

    sent = cache.push(record, a)
    distinct = sum({o.digest: o.size for o in record.outputs}.values())
    assert sent > distinct
    assert cache.has(key)
    assert_remote_consistent(remote)

    seen: list[tuple[int, int | None]] = []
    pulled = cache.pull(key, b, progress=lambda done, total: seen.append((done, total)))
    assert pulled == record
    assert b.get_record(key) == record
    assert_same_blobs(record, a, b)
    assert seen[-1] == (distinct, distinct)
    b.materialize(pulled, tmp_path / "out")
    assert {p.relative_to(tmp_path / "out").as_posix(): p.read_bytes()
            for p in (tmp_path / "out").rglob("*") if p.is_file()} == node_files()
    assert os.access(tmp_path / "out" / "bin/run.sh", os.X_OK)

    # Pushed again: every blob is there, only the record goes.
    again = cache.push(record, a)
    assert 0 < again < 10_000
    if remote.kind == "http":
        with pytest.raises(NotImplementedError, match="cannot list"):
            list(cache.records())
    else:
        assert [r.key for r in cache.records()] == [key]


def test_pull_reuses_local_blobs_only_after_checking_them(remote: Remote, stores) -> None:
    a, b = stores
    cache = remote.cache()
    first, second = new_key(), new_key()
    files = node_files(seed=1)
    cache.push(publish(a, first, files), a)
    cache.push(publish(a, second, {**files, "extra.txt": b"only in the second node\n"}), a)
    cache.pull(first, b)
    seen: list[tuple[int, int | None]] = []
    record = cache.pull(second, b, progress=lambda done, total: seen.append((done, total)))
    extra = len(b"only in the second node\n")
    assert record is not None and seen == [(extra, extra)]  # only extra.txt travelled

    # A record whose xxh3 claim names a blob held locally, with the sha256 of other bytes:
    # the local blob is not taken on the remote's word; the real bytes are fetched and named
    # by their own xxh3.
    third = new_key()
    other = b"not the config\n"
    raw = json.loads(remote.raw_get(f"ac/{ac_id(second)}"))
    raw["key"] = third
    entry = next(o for o in raw["outputs"] if o["path"] == "config.json")
    entry.update(sha256=hashlib.sha256(other).hexdigest(), size=len(other))
    remote.raw_put(f"cas/{entry['sha256']}", other)
    remote.raw_put(f"ac/{ac_id(third)}", json.dumps(raw).encode())
    pulled = cache.pull(third, b)
    config = next(o for o in pulled.outputs if o.path == "config.json")
    assert config.digest != entry["digest"]
    assert b.blob_path(config.digest).read_bytes() == other
    assert pulled.tree_digest != raw["tree_digest"]


# -- untrusted remote ----------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing"])
def test_corrupt_remote_blob_is_detected_and_not_published(remote: Remote, stores, damage: str) -> None:
    a, b = stores
    key = new_key()
    record = publish(a, key, node_files())
    cache = remote.cache()
    cache.push(record, a)
    weights = next(o for o in record.outputs if o.path == "weights/params.bin")
    good = remote.raw_get(f"cas/{weights.sha256}")
    if damage == "flipped byte":
        remote.raw_put(f"cas/{weights.sha256}", good[:1000] + bytes([good[1000] ^ 1]) + good[1001:])
    elif damage == "truncated":
        remote.raw_put(f"cas/{weights.sha256}", good[: len(good) // 2])
    else:
        remote.raw_delete(f"cas/{weights.sha256}")

    with pytest.raises(RemoteCorrupt, match="weights/params.bin"):
        cache.pull(key, b)
    assert_nothing_published(b, key)


BAD_RECORDS = {
    "../../x": lambda r: r["outputs"][0].update(path="../../x"),
    "/tmp/x": lambda r: r["outputs"][0].update(path="/tmp/x"),
    "a//b": lambda r: r["outputs"][0].update(path="a//b"),
    "twice": lambda r: r["outputs"].append(dict(r["outputs"][0])),
    "file and directory": lambda r: r["outputs"][1].update(path=r["outputs"][0]["path"] + "/x"),
    "mode 0o4755": lambda r: r["outputs"][0].update(mode=0o4755),
    "size -1": lambda r: r["outputs"][0].update(size=-1),
    "sha256 uppercase": lambda r: r["outputs"][0].update(sha256=r["outputs"][0]["sha256"].upper()),
    "another key": lambda r: r.update(key="f" * 32),
    "unknown field": lambda r: r.update(script="rm -rf /"),
}


def test_invalid_remote_records_are_refused(remote: Remote, stores, tmp_path: Path) -> None:
    a, b = stores
    cache = remote.cache()
    base = new_key()
    cache.push(publish(a, base, node_files(big=1000)), a)
    good = json.loads(remote.raw_get(f"ac/{ac_id(base)}"))
    for name, damage in BAD_RECORDS.items():
        key = new_key()
        raw = json.loads(json.dumps(good))
        raw["key"] = key
        damage(raw)
        remote.raw_put(f"ac/{ac_id(key)}", json.dumps(raw).encode())
        with pytest.raises(RemoteCorrupt, match="refused") as caught:
            cache.pull(key, b)
        if name.startswith(("../", "/")):
            assert name in str(caught.value)
        assert_nothing_published(b, key)
    not_json = new_key()
    remote.raw_put(f"ac/{ac_id(not_json)}", b"<html>nginx error page</html>")
    with pytest.raises(RemoteCorrupt, match="invalid"):
        cache.pull(not_json, b)
    assert [p for p in tmp_path.rglob("x") if p.is_file()] == []


# -- the remote going away -------------------------------------------------------------------------
def _kill_at_first_progress(remote: Remote, key: str, saw_record: list[bool]) -> Callable[[int, int | None], None]:
    """A progress callback that kills the server at the first chunk moved, after noting whether
    ``key``'s record was on the remote at that moment."""
    def progress(done: int, total: int | None) -> None:
        if not saw_record:
            saw_record.append(remote.raw_get(f"ac/{ac_id(key)}") is not None)
            remote.kill()

    return progress


def _run_killed_client(command: list[str]) -> str:
    """Run a remote cache client and SIGKILL it once it reports its first transferred chunk."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("progress"):
            process.kill()
            break
    process.wait(timeout=30)
    output = "".join(lines) + process.stderr.read()
    assert process.returncode == -9, output  # killed mid-transfer, not finished
    return output


def test_killed_mid_push_leaves_no_record_without_its_blobs(remote: Remote, stores) -> None:
    a, b = stores
    key = new_key()
    record = publish(a, key, node_files(seed=2))
    if remote.kind == "file":  # no server to kill: the pushing process dies instead
        _run_killed_client(client_command("push", remote.url, a.root, key, delay=5))
    else:
        remote.throttle(0.01)
        saw_record: list[bool] = []
        started = time.monotonic()
        with pytest.raises(RemoteUnavailable):
            remote.cache().push(record, a, progress=_kill_at_first_progress(remote, key, saw_record))
        assert saw_record == [False]  # blobs were going up, the record was not there yet
        assert time.monotonic() - started < 30
        remote.restart()
        remote.throttle(None)
    cache = remote.cache()
    assert not cache.has(key)
    assert_remote_consistent(remote)
    # Rerun: the push completes and another machine gets the same node.
    cache.push(record, a)
    assert cache.pull(key, b) == record
    assert_same_blobs(record, a, b)


def test_killed_mid_pull_leaves_nothing_half_written_locally(remote: Remote, stores) -> None:
    a, b = stores
    key = new_key()
    record = publish(a, key, node_files(seed=3))
    cache = remote.cache()
    cache.push(record, a)
    if remote.kind == "file":  # no server to kill: the pulling process dies instead
        _run_killed_client(client_command("pull", remote.url, b.root, key, chunk_size=SMALL_CHUNK, delay=5))
        assert b.get_record(key) is None and blobs_in(b) == []
        b.gc()  # its private temp dir belonged to a dead process
        assert_nothing_published(b, key)
    else:
        remote.throttle(0.01)
        puller = remote.cache()
        puller.chunk_size = SMALL_CHUNK
        with pytest.raises(RemoteUnavailable):
            puller.pull(key, b, progress=_kill_at_first_progress(remote, key, []))
        assert_nothing_published(b, key)
        remote.restart()
        remote.throttle(None)
        if remote.kind in ("s3", "gs"):  # the in-memory server forgot everything: push again
            cache.push(record, a)
    assert cache.pull(key, b) == record
    assert_same_blobs(record, a, b)


def test_remote_refusing_connections_is_unavailable(tmp_path: Path) -> None:
    from remote_servers import free_port

    cache = RemoteCache.from_url(f"http://127.0.0.1:{free_port()}/cache")
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(RemoteUnavailable, match="after 3 attempts"):
        cache.pull(new_key(), store)
    with pytest.raises(RemoteUnavailable):
        cache.push(publish(store, new_key(), {"a": b"a"}), store)


# -- two writers -----------------------------------------------------------------------------------
def test_two_processes_pushing_one_key_leave_one_consistent_record(remote: Remote, tmp_path: Path) -> None:
    key = new_key()
    writers = [ArtifactStore(tmp_path / name) for name in ("a", "b")]
    # Same key, different bytes (a non-reproducible build): whichever record wins, its blobs
    # must be the ones on the remote.
    records = [publish(store, key, node_files(seed=10 + n)) for n, store in enumerate(writers)]
    go = tmp_path / "go"
    processes = []
    for n, store in enumerate(writers):
        ready = tmp_path / f"ready{n}"
        command = client_command("push", remote.url, store.root, key, delay=0.3, ready=ready, go=go)
        processes.append((ready, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    deadline = time.monotonic() + 60
    while not all(ready.exists() for ready, _ in processes):
        assert time.monotonic() < deadline and all(p.poll() is None for _, p in processes)
        time.sleep(0.02)
    go.touch()
    spans = []
    for _, process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, out + err
        lines = dict(line.split(" ", 1) for line in out.splitlines() if not line.startswith("progress"))
        spans.append((float(lines["start"]), float(lines["done"].split()[0])))
    (s0, e0), (s1, e1) = spans
    assert s0 < e1 and s1 < e0, f"the pushes did not overlap: {spans}"

    assert_remote_consistent(remote)
    reader = ArtifactStore(tmp_path / "reader")
    pulled = remote.cache().pull(key, reader)
    winner = next(n for n, r in enumerate(records) if r.outputs == pulled.outputs)
    assert_same_blobs(pulled, writers[winner], reader)


# -- URLs and modes --------------------------------------------------------------------------------
@pytest.mark.parametrize("url, expected", [
    ("ftp://host/cache", "unsupported scheme 'ftp'"),
    ("/mnt/cache", "unsupported scheme"),
    ("file://relative/dir", "file:///absolute/path"),
    ("s3:///prefix", "s3://bucket"),
    ("http:///cache", "http\\(s\\)://host"),
])
def test_bad_urls_are_named(url: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected) as caught:
        RemoteCache.from_url(url)
    assert url in str(caught.value)


def test_gs_without_gcsfs_says_so() -> None:
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="gcsfs"):
            RemoteCache.from_url("gs://bucket/cache")
    else:
        assert RemoteCache.from_url("gs://bucket/cache").can_read


def test_modes(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'remote'}"
    with pytest.raises(ValueError, match="'rw'.*read-write, read, write"):
        RemoteCache.from_url(url, "rw")
    store = ArtifactStore(tmp_path / "store")
    record = publish(store, new_key(), {"a": b"a"})
    reader, writer = RemoteCache.from_url(url, "read"), RemoteCache.from_url(url, "write")
    assert (reader.can_read, reader.can_write, writer.can_read, writer.can_write) == (True, False, False, True)
    with pytest.raises(PermissionError, match="read-only"):
        reader.push(record, store)
    writer.push(record, store)
    with pytest.raises(PermissionError, match="write-only"):
        writer.pull(record.key, store)
    assert reader.pull(record.key, ArtifactStore(tmp_path / "other")) == record
