"""Per-kernel GPU time of a batch-1 decode step of a CUDA bundle (synchronizing around every VM
call, so each kernel's time includes ~10 us of sync; compare kernels with each other).

    python benchmarks/gpu_profile.py BUNDLE      # a bundle from `gpu_decode.py prepare` (random
                                                 # weights are filled in if it has none)
Prints each function's time per step, calls per step and GB/s of its packed 4-bit words."""
import collections, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_decode
gpu_decode._load_runtime_cuda()
bundle = Path(sys.argv[1])
if not (bundle / "params").exists():
    gpu_decode.fill_bundle(bundle, "cuda")
from mlcbuild.runtime.bundle import Bundle
from mlcbuild.runtime.engine import CompiledModel
b = Bundle.open(bundle, "cuda")
cc = b.chat_config
m = CompiledModel(b, 1, 1024, cc.prefill_chunk_size, cc.page_size)
dev = m.device
m.add_sequence(0)
m.forward_prefill([0], [list(range(100, 228))])
tok = 5
for _ in range(5):
    tok = int(m.forward_decode([0], [tok])[0].argmax())
acc = collections.defaultdict(list); state = {}; wbytes = {}
pc = time.perf_counter
def instr(func, name, before, ret, *args):
    dev.sync()
    if before:
        state[name] = pc()
        if name not in wbytes:
            n = 0
            for a in args:
                try:
                    if str(a.dtype) == "uint32":
                        n += int(np.prod(a.shape)) * 4
                except Exception:
                    pass
            wbytes[name] = n
    else: acc[name].append(pc() - state[name])
    return 0
m.vm.set_instrument(instr)
steps = 5
wall = []
for _ in range(steps):
    t0 = pc(); tok = int(m.forward_decode([0], [tok])[0].argmax()); wall.append(pc() - t0)
rows = sorted(((sum(v) / steps, len(v) // steps, k) for k, v in acc.items()), reverse=True)
total = sum(r[0] for r in rows)
print(f"instrumented step {np.median(wall)*1e3:.2f} ms; sum of synced spans {total*1e3:.2f} ms")
for t, c, k in rows[:22]:
    gb = wbytes.get(k, 0) * c / t / 1e9 if t and wbytes.get(k) else 0
    print(f"{t*1e3:8.3f} ms x{c:4d} {k}  words {wbytes.get(k, 0)/1e6:.1f} MB/call  {gb:.0f} GB/s(words)")
