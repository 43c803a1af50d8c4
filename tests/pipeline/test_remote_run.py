"""`mlcbuild run --remote-cache` with the engine's own stages against a real Bazel HTTP cache server
process: the server killed mid-pull and mid-push leaves a run that finishes by building locally
(one warning), nothing half-written, and reruns that are consistent; a corrupted remote blob is
reported and rebuilt, never used."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from remote_servers import HttpCacheServer  # noqa: E402

NODES = 13  # the toy recipe: 1 download, 2 x (gen_config, convert_weight), 2 x 2 x (compile, package)


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "http-cache"
    root.mkdir()
    with HttpCacheServer(root, tmp_path / "http.log") as server:
        yield server


def outputs(ws) -> dict[str, bytes]:
    dist = ws.root / "dist"
    return {p.relative_to(dist).as_posix(): p.read_bytes() for p in sorted(dist.rglob("*")) if p.is_file()
            and not p.name.endswith(".lock")}


def second_copy(ws, name: str):
    """Working copy B: the same recipe and source at another path, its own empty cache."""
    other = ws.root / name
    other.mkdir()
    shutil.copytree(ws.root / "src", other / "src")
    shutil.copy(ws.recipe, other / "toy.yaml")
    return type(ws)(other, {**ws.env, "MLCBUILD_CACHE_DIR": str(other / "cache"),
                            "FAKE_STAGE_LOG": str(other / "ran.log")})


def run_until_event(ws, url: str, event: str, on_event) -> list[dict]:
    """Run the recipe, call ``on_event()`` once the first ``event`` is printed, return all events."""
    proc = ws.popen("run", "toy.yaml", "--json", "-j", "1", "--remote-cache", url)
    found, fired = [], False
    assert proc.stdout is not None
    for line in proc.stdout:
        found.append(json.loads(line))
        if not fired and found[-1]["event"] == event:
            on_event()
            fired = True
    proc.wait(timeout=120)
    assert fired, found
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    return found


def kinds(events: list[dict], kind: str) -> list[str]:
    return [e["node"] for e in events if e["event"] == kind]


def test_server_killed_mid_pull_then_local_build_and_consistent_rerun(ws, server):
    url = server.url("ci")
    first = ws.run_json("--remote-cache", url)
    assert first[-1]["built"] == len(kinds(first, "node_pushed")) == NODES
    expected = outputs(ws)

    copy = second_copy(ws, "b")
    server.throttle(2.0)  # every transfer waits: the kill lands inside the first pull
    found = run_until_event(copy, url, "node_pulling", server.kill)
    assert len([e for e in found if e["event"] == "remote_unavailable"]) == 1
    assert found[-1]["ok"] and found[-1]["pulled"] == 0 and found[-1]["built"] == NODES
    assert outputs(copy) == expected
    assert not list((copy.root / "cache" / "tmp").iterdir())  # no half-pulled blob left behind

    server.throttle(None)
    server.start()
    again = copy.run_json("--remote-cache", url)
    assert again[-1]["cached"] == NODES and again[-1]["built"] == again[-1]["pulled"] == 0


def test_server_killed_mid_push_leaves_a_remote_that_pulls_consistently(ws, server):
    url = server.url("ci")
    server.throttle(2.0)
    found = run_until_event(ws, url, "node_pushing", server.kill)
    assert len([e for e in found if e["event"] == "remote_unavailable"]) == 1
    assert found[-1]["ok"] and found[-1]["built"] == NODES
    assert len(kinds(found, "node_pushed")) == 0
    expected = outputs(ws)

    server.throttle(None)
    server.start()
    copy = second_copy(ws, "b")
    pulled = copy.run_json("--remote-cache", url)  # the remote has nothing complete: B builds all
    assert pulled[-1]["ok"] and pulled[-1]["pulled"] == 0 and pulled[-1]["built"] == NODES
    assert outputs(copy) == expected
    third = second_copy(ws, "c")  # and what B pushed is complete: C pulls everything
    taken = third.run_json("--remote-cache", url)
    assert taken[-1]["pulled"] == NODES and taken[-1]["built"] == 0
    assert outputs(third) == expected


def test_corrupted_remote_blob_is_reported_and_rebuilt(ws, server):
    url = server.url("ci")
    ws.run_json("--remote-cache", url)
    expected = outputs(ws)
    blobs = sorted((server.root / "ci" / "cas").iterdir())
    assert blobs
    for blob in blobs:  # flip a byte of every blob the server holds
        data = bytearray(blob.read_bytes())
        data[0] ^= 0xFF
        blob.write_bytes(bytes(data))
    copy = second_copy(ws, "b")
    found = copy.run_json("--remote-cache", url, "--remote-cache-mode", "read")
    assert found[-1]["ok"] and found[-1]["pulled"] == 0 and found[-1]["built"] == NODES
    corrupt = [e for e in found if e["event"] == "remote_corrupt"]
    assert corrupt and all("sha256" in e["message"] or "size" in e["message"] for e in corrupt), corrupt
    assert outputs(copy) == expected  # built here, from the real inputs
