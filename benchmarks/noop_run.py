"""No-op rerun cost against input size.

For sources of 1 GB and 2 GB: the time of the first run, of a no-op second run (in process and
through the CLI), and of one xxh3 pass over the inputs, printed as ratios. The no-op run must
not grow with the input size: the stat cache recognises unchanged files without reading them.

    python benchmarks/noop_run.py [--sizes-gb 1 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ["MLCBUILD_STAGE_PLUGINS"] = "noop_stages"
sys.path.insert(0, str(HERE))

from mlcbuild.cache.store import ArtifactStore  # noqa: E402
from mlcbuild.pipeline.executor import Executor, RunOptions  # noqa: E402
from mlcbuild.cache.digests import file_digest  # noqa: E402
from mlcbuild.recipe import load_recipe  # noqa: E402
from mlcbuild.stages import build_graph, get_stage  # noqa: E402


def make_source(directory: Path, total_bytes: int, shard: int = 256 << 20) -> None:
    directory.mkdir(parents=True)
    block = os.urandom(1 << 20)
    written, index = 0, 0
    while written < total_bytes:
        size = min(shard, total_bytes - written)
        with open(directory / f"model-{index:05d}.safetensors", "wb") as handle:
            for _ in range(size >> 20):
                handle.write(block)
        written += size
        index += 1
    # Old enough that the stat cache trusts its digests (see cache.digests.RACY_SECONDS).
    past = time.time() - 60
    for file in directory.iterdir():
        os.utime(file, (past, past))


def run_once(recipe: Path, cache: Path) -> float:
    loaded = load_recipe(recipe)
    started = time.perf_counter()
    executor = Executor(ArtifactStore(cache), build_graph(loaded), get_stage,
                        RunOptions(output_dir=loaded.output_dir))
    result = executor.run()
    assert result.ok
    return time.perf_counter() - started


def measure(root: Path, gigabytes: float) -> dict[str, float]:
    src = root / "src"
    make_source(src, int(gigabytes * (1 << 30)))
    recipe = root / "bench.yaml"
    recipe.write_text("name: bench\nsource: src\nquantization: [q0f16, q4f16_1]\ndevices: [cpu, cuda:sm_90]\n")
    cache = root / "cache"
    first = run_once(recipe, cache)
    noop = min(run_once(recipe, cache) for _ in range(5))
    env = {**os.environ, "MLCBUILD_CACHE_DIR": str(cache), "PYTHONPATH": str(HERE)}
    cli = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mlcbuild.cli", "run", str(recipe), "--json"], env=env,
                       check=True, capture_output=True)
        cli.append(time.perf_counter() - started)
    started = time.perf_counter()
    for file in sorted(src.iterdir()):
        file_digest(file)
    hash_pass = time.perf_counter() - started
    return {"first": first, "noop": noop, "noop_cli": min(cli), "hash": hash_pass}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the inputs (default: a temp dir)")
    args = parser.parse_args()
    rows = []
    for size in args.sizes_gb:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            rows.append((size, measure(Path(tmp), size)))
    print(f"{'input':>8} {'first run':>10} {'no-op run':>10} {'no-op CLI':>10} {'xxh3 pass':>10} "
          f"{'first/noop':>11} {'hash/noop':>10}")
    for size, m in rows:
        print(f"{size:>6.1f}GB {m['first']:>9.3f}s {m['noop']:>9.4f}s {m['noop_cli']:>9.3f}s {m['hash']:>9.3f}s "
              f"{m['first'] / m['noop']:>10.0f}x {m['hash'] / m['noop']:>9.0f}x")
    if len(rows) > 1:
        print(f"no-op growth from {rows[0][0]:.0f} GB to {rows[-1][0]:.0f} GB: "
              f"{rows[-1][1]['noop'] / rows[0][1]['noop']:.2f}x (input grew {rows[-1][0] / rows[0][0]:.1f}x)")


if __name__ == "__main__":
    main()
