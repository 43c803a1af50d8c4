"""Tensor parallelism on CPU: decode tok/s of one model at 1 and 2 shards, and what a shard's weight load
costs pre-sharded (what convert_weight writes) against slicing the whole checkpoint at load (a shard map).

    python benchmarks/tensor_parallel.py [--layers 12] [--quant q0f32] [--steps 64]

A random llama (hidden 512, 8 heads, 4 KV heads, MLP 1536, vocab 8192) is built by the real stages for
each shard count. Decode: batch 1 through the runtime's model classes (CompiledModel, ShardedModel: one
disco worker per shard, CPU all-reduce over Unix sockets), median step time after warm-up. On a machine
with fewer cores than shards x threads there is nothing to gain: the shards split the same cores and add
two all-reduces per layer. Numbers to compare within one run; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-checkpoint and bundle helpers the tests use

SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4,
             head_dim=64, max_position_embeddings=1024)


def decode_rate(bundle: Path, steps: int) -> tuple[float, float]:
    """(decode tok/s at batch 1, seconds to start the model)."""
    from test_tensor_parallel import open_model

    start = time.perf_counter()
    model = open_model(bundle)
    started = time.perf_counter() - start
    try:
        model.add_sequence(0)
        logits = model.forward_prefill([0], [[1, 2, 3, 4, 5, 6, 7, 8]])
        token = int(np.argmax(logits[0]))
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            token = int(np.argmax(model.forward_decode([0], [token])[0]))
            times.append(time.perf_counter() - t)
        return 1.0 / float(np.median(times[steps // 4:])), started
    finally:
        getattr(model, "close", lambda: None)()


def load_cost(single: Path, sharded: Path, shards: int) -> dict[str, float]:
    """Rank 1's weights: read from its pre-sharded files, or read whole from the single-shard bundle and
    sliced with the shard plan (what a shard map applied at load would do). Seconds and MiB read."""
    from mlcbuild.models import config_from_normalized
    from mlcbuild.models.sharding import shard_tensor

    def read(bundle: Path, rank: int | None) -> dict[str, np.ndarray]:
        index = json.loads((bundle / "params" / "tensor-cache.json").read_text())
        out = {}
        for rec in index["tensors"]:
            if rank is not None and rec.get("rank") != rank:
                continue
            raw = np.fromfile(bundle / "params" / rec["shard"], dtype=np.uint8, count=rec["nbytes"], offset=rec["offset"])
            out[rec["name"]] = raw.view(rec["dtype"]).reshape(rec["shape"])
        return out

    t = time.perf_counter()
    pre = read(sharded, 1)
    pre_s = time.perf_counter() - t
    chat = json.loads((single / "mlc-chat-config.json").read_text())
    config = config_from_normalized(chat["model_config"])
    t = time.perf_counter()
    whole = read(single, None)
    sliced = {name: shard_tensor(config, name, array, shards, 1) for name, array in whole.items()}
    map_s = time.perf_counter() - t
    assert all(np.array_equal(sliced[n], pre[n]) for n in pre), "the shard map and the pre-sharded files differ"
    mib = 1 / 2**20
    return {"presharded_s": pre_s, "presharded_mib": sum(a.nbytes for a in pre.values()) * mib,
            "shard_map_s": map_s, "shard_map_mib_read": sum(a.nbytes for a in whole.values()) * mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--quant", default="q0f32")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    from compiler_harness import make_checkpoint
    from test_tensor_parallel import build_bundle

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint("llama", Path(tmp) / "ckpt", **{**SHAPE, "num_hidden_layers": args.layers})
        bundles = {}
        for shards in args.shards:
            t = time.perf_counter()
            bundles[shards] = build_bundle(checkpoint, Path(tmp) / f"tp{shards}", args.quant, shards)
            print(f"built {shards} shard(s) in {time.perf_counter() - t:.1f} s", flush=True)
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
        print(f"{cpu}, {len(os.sched_getaffinity(0))} cores; {args.layers} layers, {args.quant}")
        base = None
        for shards, bundle in bundles.items():
            rate, started = decode_rate(bundle, args.steps)
            base = base or rate
            print(f"shards={shards}: decode {rate:8.1f} tok/s (x{rate / base:.2f}), start {started:.2f} s")
        if args.quant.startswith("q0") and 1 in bundles and len(bundles) > 1:
            shards = max(bundles)
            cost = load_cost(bundles[1], bundles[shards], shards)
            print(f"rank 1 of {shards} weights: pre-sharded {cost['presharded_s'] * 1e3:.1f} ms, "
                  f"{cost['presharded_mib']:.1f} MiB read; shard map at load {cost['shard_map_s'] * 1e3:.1f} ms, "
                  f"{cost['shard_map_mib_read']:.1f} MiB read")
        print(f"max RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
