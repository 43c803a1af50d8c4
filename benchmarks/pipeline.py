"""Stage times of a recipe: every node cold (empty cache), then a no-op rerun.

    python benchmarks/pipeline.py [recipes/smollm2-135m-instruct.yaml] [-j 2]

Prints each node's build time, the share of the cold run it took, and the no-op rerun's time
as a ratio of the cold run: in this process, and through the CLI both with every key checked
(the first reruns after a build) and answered from the run journal (once the outputs are older
than the racy window).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlcbuild.cache.store import ArtifactStore
from mlcbuild.pipeline.executor import Executor, RunOptions
from mlcbuild.pipeline.hashing import RACY_SECONDS
from mlcbuild.recipe import load_recipe
from mlcbuild.stages import build_graph, get_stage

ROOT = Path(__file__).resolve().parent.parent


def timed_run(recipe: Path, cache: Path, jobs: int) -> tuple[float, dict[str, float], dict[str, str]]:
    loaded = load_recipe(recipe)
    durations: dict[str, float] = {}
    statuses: dict[str, str] = {}

    def on_event(event: dict) -> None:
        if event["event"] == "node_done":
            durations[event["node"]] = event["duration_s"]
        if event["event"] in ("node_done", "node_cached", "node_failed"):
            statuses[event["node"]] = event["event"]
        if event["event"] == "node_failed":
            print(f"{event['node']} failed: {event['error']}", file=sys.stderr)

    started = time.perf_counter()
    result = Executor(ArtifactStore(cache), build_graph(loaded), get_stage,
                      RunOptions(jobs=jobs, output_dir=Path(tempfile.mkdtemp()) / "out"), on_event).run()
    elapsed = time.perf_counter() - started
    if not result.ok:
        raise SystemExit("the build failed")
    return elapsed, durations, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path, nargs="?", default=ROOT / "recipes" / "smollm2-135m-instruct.yaml")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cold, durations, _ = timed_run(args.recipe, cache, args.jobs)
        noop = min(timed_run(args.recipe, cache, args.jobs)[0] for _ in range(3))

        def cli_noop() -> tuple[float, bool]:
            """One no-op rerun through the console script's entry: (seconds, from the journal)."""
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "mlcbuild", "run", str(args.recipe), "--json",
                                   "--cache-dir", str(cache)], check=True, capture_output=True, text=True)
            return time.perf_counter() - started, '"journal": true' in proc.stdout

        full_check = [cli_noop() for _ in range(3)]
        # The journal is written once the outputs are older than the racy window (RACY_SECONDS).
        time.sleep(RACY_SECONDS + 0.5)
        full_check.append(cli_noop())
        journaled = [cli_noop() for _ in range(5)]
        assert not any(j for _, j in full_check[:-1]) and all(j for _, j in journaled), (full_check, journaled)
        cli = [t for t, _ in full_check]
        fast = [t for t, _ in journaled]
    print(f"{'node':<36} {'cold':>9} {'share':>7}")
    for node, seconds in sorted(durations.items(), key=lambda kv: -kv[1]):
        print(f"{node:<36} {seconds:>8.2f}s {seconds / cold:>6.0%}")
    print(f"{'cold run (wall, -j ' + str(args.jobs) + ')':<36} {cold:>8.2f}s")
    print(f"{'no-op rerun (in process)':<36} {noop:>8.3f}s  1/{cold / noop:,.0f} of cold")
    print(f"{'no-op rerun (CLI, every key checked)':<36} {statistics.median(cli):>8.3f}s  1/{cold / statistics.median(cli):,.0f} of cold  (median of {len(cli)})")
    print(f"{'no-op rerun (CLI, run journal)':<36} {statistics.median(fast):>8.3f}s  1/{cold / statistics.median(fast):,.0f} of cold  (median of {len(fast)}; min {min(fast):.3f}s)")


if __name__ == "__main__":
    main()
