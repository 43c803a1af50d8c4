"""Where the GPU time of one batch-1 decode step of a CUDA bundle goes.

    python benchmarks/gpu_profile.py BUNDLE [--steps 20] [--trace-out trace.json]
        Kernel timeline from CUPTI (through torch.profiler, which the GPU machine has), with the
        engine running as in `mlcbuild bench` (CUDA graphs, no extra synchronization): wall time
        per step, GPU busy time (union of kernel intervals), the idle gaps between kernels, and
        every kernel's time and calls per step, grouped (GEMV, attention, norm, ...).
    python benchmarks/gpu_profile.py BUNDLE --sync
        The older view: synchronizing around every VM call, so each function's time includes
        ~10 us of sync (compare functions with each other, not with the step).

BUNDLE: a bundle from `gpu_decode.py prepare` (random weights are filled in if it has none)."""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Kernel name -> group, first match wins (TVM names kernels after the fused function).
GROUPS = (
    ("attention", ("paged_kv", "attention", "rotary", "rope", "append", "merge_state", "kv_cache")),
    ("embedding", ("take", "embedding")),
    ("gemv/matmul", ("matmul", "dequantize", "gemv", "dp4a")),
    ("norm", ("norm",)),
    ("silu*mul", ("silu", "swiglu")),
    ("sampling/copy", ("softmax", "argmax", "sample", "copy", "memcpy", "memset")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def kernel_events(trace: dict) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of every GPU activity in a chrome trace, in start order."""
    out = []
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") == "X" and ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            out.append((str(ev["name"]), float(ev["ts"]), float(ev["dur"])))
    return sorted(out, key=lambda e: e[1])


def summarize(events: list[tuple[str, float, float]], steps: int, wall_s: list[float]) -> str:
    if not events:
        return "no GPU activity recorded (CUPTI unavailable, or the kernels ran elsewhere)"
    busy, end, gaps = 0.0, None, []
    for _, start, dur in events:
        if end is None or start >= end:
            if end is not None:
                gaps.append(start - end)
            busy += dur
            end = start + dur
        elif start + dur > end:
            busy += start + dur - end
            end = start + dur
    per = collections.defaultdict(lambda: [0.0, 0])
    for name, _, dur in events:
        per[name][0] += dur
        per[name][1] += 1
    groups = collections.defaultdict(lambda: [0.0, 0])
    for name, (total, calls) in per.items():
        groups[group_of(name)][0] += total
        groups[group_of(name)][1] += calls
    gaps_arr = np.array(gaps) if gaps else np.zeros(1)
    lines = [
        f"steps {steps}: wall {np.median(wall_s) * 1e3:.3f} ms/step (median), GPU busy {busy / steps / 1e3:.3f} ms/step "
        f"({busy / 1e6 / sum(wall_s):.0%} of wall), kernels {len(events) / steps:.0f}/step",
        f"gaps between kernels: {gaps_arr.sum() / steps / 1e3:.3f} ms/step, median {np.median(gaps_arr):.1f} us, "
        f"p90 {np.percentile(gaps_arr, 90):.1f} us, >20 us: {int((gaps_arr > 20).sum()) / steps:.1f}/step",
        "",
        f"{'group':<14} {'ms/step':>8} {'calls/step':>10} {'share':>6}",
    ]
    total = sum(v[0] for v in groups.values())
    for group, (t, calls) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{group:<14} {t / steps / 1e3:>8.3f} {calls / steps:>10.1f} {t / total:>6.0%}")
    lines += ["", f"{'us/step':>9} {'calls':>6} {'us/call':>8}  kernel"]
    for name, (t, calls) in sorted(per.items(), key=lambda kv: -kv[1][0])[:30]:
        lines.append(f"{t / steps:>9.1f} {calls / steps:>6.1f} {t / calls:>8.2f}  {name[:110]}")
    return "\n".join(lines)


def _open_model(bundle: Path):
    import gpu_decode

    gpu_decode._load_runtime_cuda()
    if not (bundle / "params").exists():
        gpu_decode.fill_bundle(bundle, "cuda")
    from mlcbuild.runtime.bundle import Bundle
    from mlcbuild.runtime.engine import CompiledModel

    b = Bundle.open(bundle, "cuda")
    cc = b.chat_config
    m = CompiledModel(b, 1, 1024, cc.prefill_chunk_size, cc.page_size)
    m.add_sequence(0)
    m.forward_prefill([0], [list(range(100, 228))])
    tok = 5
    for _ in range(5):
        tok = int(m.forward_decode([0], [tok])[0].argmax())
    return m, tok


def trace(bundle: Path, steps: int, trace_out: Path | None) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    m, tok = _open_model(bundle)
    torch.cuda.init()
    wall = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            started = time.perf_counter()
            # argmax reads the logits on the host: each step ends synchronized, as in the engine.
            tok = int(m.forward_decode([0], [tok])[0].argmax())
            wall.append(time.perf_counter() - started)
        m.device.sync()
    with tempfile.TemporaryDirectory() as tmp:
        path = trace_out or Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = kernel_events(json.loads(Path(path).read_text()))
    print(summarize(events, steps, wall))


def synced(bundle: Path, steps: int) -> None:
    m, tok = _open_model(bundle)
    dev = m.device
    acc: dict[str, list[float]] = collections.defaultdict(list)
    state: dict[str, float] = {}
    wbytes: dict[str, int] = {}
    pc = time.perf_counter

    def instr(func, name, before, ret, *args):
        dev.sync()
        if before:
            state[name] = pc()
            if name not in wbytes:
                wbytes[name] = sum(int(np.prod(a.shape)) * 4 for a in args
                                   if str(getattr(a, "dtype", "")) == "uint32")
        else:
            acc[name].append(pc() - state[name])
        return 0

    m.vm.set_instrument(instr)
    wall = []
    for _ in range(steps):
        t0 = pc()
        tok = int(m.forward_decode([0], [tok])[0].argmax())
        wall.append(pc() - t0)
    rows = sorted(((sum(v) / steps, len(v) // steps, k) for k, v in acc.items()), reverse=True)
    total = sum(r[0] for r in rows)
    print(f"instrumented step {np.median(wall) * 1e3:.2f} ms; sum of synced spans {total * 1e3:.2f} ms")
    for t, c, k in rows[:22]:
        gb = wbytes.get(k, 0) * c / t / 1e9 if t and wbytes.get(k) else 0
        print(f"{t * 1e3:8.3f} ms x{c:4d} {k}  words {wbytes.get(k, 0) / 1e6:.1f} MB/call  {gb:.0f} GB/s(words)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sync", action="store_true", help="per-VM-call timing with a sync around each call")
    parser.add_argument("--trace-out", type=Path, help="also keep the chrome trace here")
    args = parser.parse_args()
    if args.sync:
        synced(args.bundle, args.steps)
    else:
        trace(args.bundle, args.steps, args.trace_out)


if __name__ == "__main__":
    main()
