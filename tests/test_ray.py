"""`mlcbuild run --executor ray` on a real Ray cluster started here: a head node (2 CPUs, no
toolchain resource) whose workers see the driver's cache directory, and a second node that alone
has the custom resource "nvcc" and its own cache directory, so what it builds travels through a
file:// remote cache. A tiny model fanned out to 2 quantizations x (cpu, cuda:sm_90): the CUDA
compiles land on the nvcc node, a worker SIGKILLed mid-compile is retried and the run succeeds,
and the bundles are byte-identical to a local build. With the engine's fake stages: a stage error
fails once with its message; a node no worker can take, a worker that cannot exchange artifacts
with the driver, and a worker whose toolchain differs from the key's each fail with what to do."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

pytest.importorskip("ray")

HERE = Path(__file__).parent
FAN_OUT = """\
name: fan
source: src
quantization: [q4f16_1, q0f16]
devices: [cpu, cuda:sm_90]
overrides:
  context_window_size: 128
  prefill_chunk_size: 32
"""
TASK_TITLE = "ray::mlcbuild.build:"  # mlcbuild.pipeline.ray_backend.TASK_NAME_PREFIX
WORKERS_FAKECC = "2.0"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "MLCBUILD_", "RAY_"))}
    env.update(extra)
    return env


def events_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@dataclass
class Cluster:
    address: str
    nvcc_node: str  # Ray node id of the worker node with the "nvcc" resource
    nvcc_cache: Path  # that node's own cache directory
    ran_log: Path  # where the fake stages on the workers write what they ran
    driver_env: dict[str, str]  # what a driver needs to connect (the cluster's auth token)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    from ray_cluster import LocalRayCluster

    root = tmp_path_factory.mktemp("cluster")
    # The workers' default cache dir (host facts, a worker that sees no driver's cache) stays in here.
    # FAKE_CC_VERSION: the fake compile's toolchain fact on the workers (a driver must agree).
    ray = LocalRayCluster(clean_env(FAKE_STAGE_LOG=str(root / "ran.log"), XDG_CACHE_HOME=str(root / "xdg"),
                                    FAKE_CC_VERSION=WORKERS_FAKECC))
    try:
        address = ray.start_head(num_cpus=2)
        ray.add_worker(num_cpus=1, resources={"nvcc": 1}, env={"MLCBUILD_CACHE_DIR": str(root / "nvcc-cache")})
        nodes = ray.nodes(expect=2)
        nvcc_node = next(n["NodeID"] for n in nodes if n["Resources"].get("nvcc"))
        yield Cluster(address, nvcc_node, root / "nvcc-cache", root / "ran.log", ray.driver_env)
    finally:
        ray.stop()


def mlcbuild(args: list[str], cwd: Path, cache: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlcbuild.cli", *args], cwd=cwd,
                            env=clean_env(MLCBUILD_CACHE_DIR=str(cache), XDG_CACHE_HOME=str(cache.parent / "xdg"),
                                          **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- the real stages: a tiny model's fan-out ---------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from compiler_harness import make_checkpoint

    return make_checkpoint("llama", tmp_path_factory.mktemp("checkpoint") / "src")


def workspace(root: Path, checkpoint: Path) -> Path:
    shutil.copytree(checkpoint, root / "src")
    (root / "fan.yaml").write_text(FAN_OUT)
    return root


@pytest.fixture(scope="module")
def local_build(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    root = workspace(tmp_path_factory.mktemp("local"), checkpoint)
    proc = mlcbuild(["run", "fan.yaml", "--json"], root, root / "cache")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return root / "dist" / "fan"


class WorkerKiller(threading.Thread):
    """SIGKILLs, once, the Ray worker process building the first CUDA compile, a few seconds into it."""

    def __init__(self, after_s: float = 3.0) -> None:
        super().__init__(daemon=True)
        self.after_s = after_s
        self.killed: tuple[str, int] | None = None  # (process title, pid)
        self.done = threading.Event()

    def run(self) -> None:
        seen: dict[int, float] = {}
        while not self.done.is_set() and self.killed is None:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                title = (proc.info["cmdline"] or [""])[0]
                if title.startswith(TASK_TITLE + "compile[") and "cuda" in title:
                    first = seen.setdefault(proc.info["pid"], time.monotonic())
                    if time.monotonic() - first >= self.after_s:
                        proc.send_signal(signal.SIGKILL)
                        self.killed = (title, proc.info["pid"])
                        break
            time.sleep(0.1)


@pytest.fixture(scope="module")
def ray_build(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, cluster: Cluster):
    root = workspace(tmp_path_factory.mktemp("onray"), checkpoint)
    remote = root / "remote"
    killer = WorkerKiller()
    started = time.perf_counter()
    proc = mlcbuild(["run", "fan.yaml", "--json", "--executor", "ray", "--ray-address", cluster.address,
                     "--remote-cache", remote.as_uri(), "-j", "4"], root, root / "cache", cluster.driver_env)
    killer.start()
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        killer.done.set()
        killer.join()
    events = events_of(out)
    return {"root": root, "events": events, "stderr": err, "returncode": proc.returncode, "killed": killer.killed,
            "remote": remote, "wall_s": time.perf_counter() - started}


def done_events(build: dict) -> dict[str, dict]:
    return {e["node"]: e for e in build["events"] if e["event"] == "node_done"}


def test_the_run_succeeds_after_a_worker_was_killed_mid_compile(ray_build):
    assert ray_build["returncode"] == 0, json.dumps(ray_build["events"][-20:], indent=1) + ray_build["stderr"][-3000:]
    assert ray_build["killed"] is not None, "no CUDA compile was seen running on a Ray worker"
    title, pid = ray_build["killed"]
    label = title.removeprefix(TASK_TITLE)
    done = done_events(ray_build)[label]
    assert f"pid {pid}," not in done["worker"]  # Ray ran the task again in another worker process
    run_done = ray_build["events"][-1]
    assert run_done["event"] == "run_done" and run_done["ok"] and run_done["built"] == 13 and run_done["failed"] == 0


def test_cuda_compiles_run_on_the_worker_with_nvcc(ray_build, cluster):
    done = done_events(ray_build)
    assert len(done) == 13
    for label in ("compile[q4f16_1,cuda:sm_90]", "compile[q0f16,cuda:sm_90]"):
        assert f"ray node {cluster.nvcc_node[:12]}" in done[label]["worker"], done[label]
    # The stage's log line reached the driver as an event of its node.
    logs = [e for e in ray_build["events"] if e["event"] == "log" and e["node"] == "compile[q0f16,cuda:sm_90]"]
    assert any("compile: llama q0f16 for cuda:sm_90" in e["message"] for e in logs)


def test_artifacts_of_the_nvcc_worker_travel_through_the_remote_cache(ray_build, cluster):
    from mlcbuild.cache.remote import RemoteCache
    from mlcbuild.cache.store import ArtifactStore

    done = done_events(ray_build)
    remote = RemoteCache.from_url(ray_build["remote"].as_uri(), "read")
    worker_store = ArtifactStore(cluster.nvcc_cache)
    for label in ("compile[q4f16_1,cuda:sm_90]", "compile[q0f16,cuda:sm_90]"):
        key = done[label]["key"]
        assert worker_store.get_record(key) is not None  # built in the worker's own cache...
        assert remote.has(key)  # ...pushed from there
        pushed = [e for e in ray_build["events"] if e["event"] == "node_pushed" and e["node"] == label]
        assert pushed and pushed[0]["worker"] == done[label]["worker"]


def test_bundles_are_byte_identical_to_a_local_build(ray_build, local_build):
    on_ray = ray_build["root"] / "dist" / "fan"
    names = sorted(p.name for p in local_build.iterdir() if p.is_dir())
    assert names == ["q0f16-cpu", "q0f16-cuda-sm_90", "q4f16_1-cpu", "q4f16_1-cuda-sm_90"]
    assert sorted(p.name for p in on_ray.iterdir() if p.is_dir()) == names
    for name in names:
        ours, theirs = tree(on_ray / name), tree(local_build / name)
        assert sorted(ours) == sorted(theirs), name
        assert [path for path in ours if ours[path] != theirs[path]] == [], name


# -- the engine's fake stages: failures --------------------------------------------------------------
FAKE_RECIPE = """\
name: toy
source: src
quantization: [q0f16]
devices: {devices}
"""


def fake_run(cluster: Cluster, root: Path, devices: str, *extra: str,
             fakecc: str = WORKERS_FAKECC) -> tuple[int, list[dict], str]:
    (root / "src").mkdir(parents=True)
    (root / "src" / "a.txt").write_text("alpha\n")
    (root / "toy.yaml").write_text(FAKE_RECIPE.format(devices=devices))
    cluster.ran_log.unlink(missing_ok=True)
    path = os.pathsep.join([str(HERE), str(HERE / "pipeline")])
    proc = mlcbuild(["run", "toy.yaml", "--json", "--executor", "ray", "--ray-address", cluster.address, *extra],
                    root, root / "cache", env={"MLCBUILD_STAGE_PLUGINS": "ray_stages", "PYTHONPATH": path,
                                               "FAKE_CC_VERSION": fakecc, **cluster.driver_env})
    out, err = proc.communicate(timeout=300)
    return proc.returncode, events_of(out), err


def test_a_failing_stage_fails_once_with_its_own_message(cluster, tmp_path):
    code, events, err = fake_run(cluster, tmp_path, "[cuda:sm_52, cuda:sm_53, cpu:x86-64-v4]", "-k",
                                 "--remote-cache", (tmp_path / "remote").as_uri())
    assert code == 1, err[-3000:]
    failed = {e["node"]: e["error"] for e in events if e["event"] == "node_failed"}
    assert failed["compile[q0f16,cuda:sm_52]"] == "sm_52: this toolchain has no kernels for Maxwell GPUs; build for sm_60 or newer"
    assert failed["compile[q0f16,cuda:sm_53]"].startswith("ValueError: no kernel table for sm_53\n")
    # cpu:x86-64-v4 asks for a resource no node has: it fails at once, saying so, never runs.
    assert "no node of the Ray cluster has" in failed["compile[q0f16,cpu:x86-64-v4]"]
    assert "--resources='{\"avx512_host\": 1}'" in failed["compile[q0f16,cpu:x86-64-v4]"]
    ran = sorted(cluster.ran_log.read_text().split())
    assert ran.count("compile[q0f16,cuda:sm_52]") == 1 and ran.count("compile[q0f16,cuda:sm_53]") == 1
    assert "compile[q0f16,cpu:x86-64-v4]" not in ran
    assert ran.count("download") == 1 and ran.count("gen_config[q0f16]") == 1


def test_a_worker_that_does_not_see_the_drivers_cache_needs_a_remote_cache(cluster, tmp_path):
    code, events, err = fake_run(cluster, tmp_path, "[cpu, cuda:sm_80]", "-k")
    assert code == 1, err[-3000:]
    failed = {e["node"]: e["error"] for e in events if e["event"] == "node_failed"}
    assert "does not see the driver's cache directory" in failed["compile[q0f16,cuda:sm_80]"]
    # Ray may place other nodes on that worker too: they fail the same way, never another.
    assert all("pass --remote-cache URL" in error for error in failed.values()), failed


def test_a_worker_with_another_toolchain_than_the_key_says_refuses_the_node(cluster, tmp_path):
    code, events, err = fake_run(cluster, tmp_path, "[cuda:sm_80]", "--remote-cache", (tmp_path / "remote").as_uri(),
                                 fakecc="1.0")
    assert code == 1, err[-3000:]
    failed = {e["node"]: e["error"] for e in events if e["event"] == "node_failed"}
    error = failed["compile[q0f16,cuda:sm_80]"]
    assert "has other toolchain facts than the node's key was computed with" in error
    assert "fakecc: driver '1.0', worker '2.0'" in error
    assert "compile[q0f16,cuda:sm_80]" not in cluster.ran_log.read_text().split()


def test_worker_processes_are_readied_for_the_nodes_to_come_on_the_machines_that_will_build_them(cluster, tmp_path):
    # RayBackend.warm, at the run's first build: warm-up tasks import what each stage preloads
    # (Stage.preload_modules; the fake CUDA compile's is tests/ray_preload.py, which logs where it
    # was imported) on the machines that can take the stage's nodes: the CUDA compile's on the
    # nvcc node, placed by a sliver of its custom resource, while the run goes on without them
    code, events, err = fake_run(cluster, tmp_path, "[cpu, cuda:sm_80]", "--remote-cache", (tmp_path / "remote").as_uri())
    assert code == 0, err[-3000:]
    deadline = time.monotonic() + 60  # the run does not wait for them
    while time.monotonic() < deadline and "preloaded:nvcc-node" not in cluster.ran_log.read_text():
        time.sleep(0.2)
    preloaded = [line for line in cluster.ran_log.read_text().split() if line.startswith("preloaded:")]
    assert any(line.startswith("preloaded:nvcc-node:") for line in preloaded), preloaded
    assert len(preloaded) <= 4  # up to 2 processes per placement class, not one per node
