"""Stage times of a recipe: every node cold (empty cache), then no-op reruns.

    python benchmarks/pipeline.py [recipes/smollm2-135m-instruct.yaml] [-j 2]

The cold build runs through the console script's entry (``python -m mlcbuild run --json``), as a
user runs it. Prints each node's build time and its share of the cold run, then the no-op
rerun's time as a ratio of the cold run: the first rerun after the build and later ones through
the console script (answered from the run journal the build wrote), the full key check through
the CLI proper (``python -m mlcbuild.cli``, which never reads a journal), and the full check in
this process (no interpreter start, no imports).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlcbuild.cache.store import ArtifactStore
from mlcbuild.pipeline.executor import Executor, RunOptions
from mlcbuild.recipe import load_recipe
from mlcbuild.stages import build_graph, get_stage

ROOT = Path(__file__).resolve().parent.parent


def cli_run(module: str, recipe: Path, cache: Path, jobs: int) -> tuple[float, list[dict]]:
    """(wall seconds, events) of ``python -m MODULE run RECIPE --json``."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, "run", str(recipe), "--json", "-j", str(jobs),
                           "--cache-dir", str(cache)], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"mlcbuild run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def in_process_noop(recipe: Path, cache: Path, jobs: int) -> float:
    loaded = load_recipe(recipe)
    started = time.perf_counter()
    result = Executor(ArtifactStore(cache), build_graph(loaded), get_stage,
                      RunOptions(jobs=jobs, output_dir=loaded.output_dir)).run()
    elapsed = time.perf_counter() - started
    assert result.ok and result.count("cached") == len(result.states)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path, nargs="?", default=ROOT / "recipes" / "smollm2-135m-instruct.yaml")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cold, events = cli_run("mlcbuild", args.recipe, cache, args.jobs)
        durations = {e["node"]: e["duration_s"] for e in events if e["event"] == "node_done"}
        first = cli_run("mlcbuild", args.recipe, cache, args.jobs)
        journaled = [first] + [cli_run("mlcbuild", args.recipe, cache, args.jobs) for _ in range(4)]
        full = [cli_run("mlcbuild.cli", args.recipe, cache, args.jobs) for _ in range(5)]
        in_process = min(in_process_noop(args.recipe, cache, args.jobs) for _ in range(3))
    from_journal = [e[-1].get("journal", False) for _, e in journaled]
    print(f"{'node':<36} {'cold':>9} {'share':>7}")
    for node, seconds in sorted(durations.items(), key=lambda kv: -kv[1]):
        print(f"{node:<36} {seconds:>8.2f}s {seconds / cold:>6.0%}")
    print(f"{'cold run (CLI wall, -j ' + str(args.jobs) + ')':<36} {cold:>8.2f}s")

    def row(name: str, seconds: float, extra: str = "") -> None:
        print(f"{name:<36} {seconds:>8.3f}s  1/{cold / seconds:,.0f} of cold{extra}")

    row("first no-op rerun (console script)", first[0], "  (run journal)" if from_journal[0] else "  (full check)")
    times = [t for t, _ in journaled]
    row("no-op rerun (console script)", statistics.median(times),
        f"  median of {len(times)}, min {min(times):.3f}s; {sum(from_journal)} of {len(times)} from the run journal")
    times = [t for t, _ in full]
    row("no-op rerun, every key checked (CLI)", statistics.median(times), f"  median of {len(times)}, min {min(times):.3f}s")
    row("no-op rerun, every key (in process)", in_process)


if __name__ == "__main__":
    main()
