"""Per-CPU-family choices of the CPU schedules: what was measured fastest on each family we run on.

The decode GEMVs are memory-bound, and how a core best streams its weights differs between
families. The choice follows the target's ``mcpu`` (the host's when the device is plain ``cpu``;
it is part of the compile node's key, so each family's bundle is built and cached apart), never the
build machine, so ``cpu:znver4`` built on an Intel host gets the AMD choices.

Intel (the default; tuned on Emerald Rapids, 2 vCPUs, see ``cpu_matmul.PREFETCH_BYTES`` and
``SEQUENTIAL_ROW_BYTES``): software prefetch of the weight rows 16 KB ahead; 16/32-bit GEMV rows in
chunks of 4 per parallel iteration.

AMD Zen (``znver*``; measured on EPYC Zen 4, 2 vCPUs, every decode projection of SmolLM2-135M, weights
rotated over 128 MB of copies, variants alternating in one process, median of per-round ratios):
- the 16/32-bit GEMV one row per iteration and no software prefetch: float16 1.45-2.0x (qkv 20 ->
  29 GB/s, gate_up 14 -> 29, lm_head 24 -> 33), float32 1.2x. With 4 rows a chunk LLVM interleaves
  the 4 unrolled rows and spills their widened vectors to the stack; Zen 4's hardware prefetchers
  follow one row stream on their own, and the software prefetches of every line cost issue slots
  (one row, prefetch 4 / 16 KB ahead: 0.8-0.95x of none);
- the 4-bit VNNI GEMV without software prefetch: 1.02-1.1x;
- the few-row GEMV (a verification of 4 rows) one weight row per step, without prefetch: 1.45-1.8x (gate_up
  310 -> 182 us, lm_head 4.8 -> 3.0 ms; down, K = 1536, unchanged); 2 weight rows spill like the GEMV's 4;
  and its x kept float16 where a block of float32 x passes 16 KB (half of Zen 4's 32 KB L1d, which the
  weight stream shares): down 125 -> 86 us with blocks of 4 rows (K = 576 stays float32: 0.76-0.99x if
  half; with the blocks of 2 below, a block passes 16 KB from K = 2048 on);
- the few-row GEMV in blocks of 2 rows of x, not 4: the kernel is compute-bound on Zen 4 (the 4-row
  block's 4 FMAs per weight vector cost as much as the weights' stream), so padding a 2-row
  verification to 4 rows nearly doubled it. Whole q0f16 verification over a 736-token context (three
  bundles alternating in one process), cost as a multiple of a decode step for 2/3/4/5 rows: blocks of
  4: 1.61/1.75/1.84/3.12; of 2: 1.35/1.87/1.94/2.53; of 1: 1.45/2.44/2.88/3.45. After a rejection
  the engine drafts fewer tokens, so the 2-row verification is the common one where acceptance is low.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlcbuild.compiler.kernels.cpu_matmul import FEW_ROWS_BLOCK, FEW_ROWS_WEIGHT_ROWS, PREFETCH_BYTES


@dataclass(frozen=True)
class CPUTuning:
    family: str
    # bytes of weight rows prefetched ahead of the rows a decode GEMV reads (0: no software prefetch)
    prefetch_bytes: int
    # output rows per parallel iteration of the 16/32-bit decode GEMV
    gemv_rows: int
    # weight rows interleaved per step of the few-row GEMV (speculative verification)
    few_rows_weight_rows: int
    # the few-row GEMV's float16 x stays float16 where a block of it in float32 is larger (None: no limit)
    few_rows_x_widen_bytes: int | None = None
    # rows of x the few-row GEMV computes per pass over a weight row (a partial block is padded)
    few_rows_block: int = FEW_ROWS_BLOCK


INTEL = CPUTuning("intel", prefetch_bytes=PREFETCH_BYTES, gemv_rows=4, few_rows_weight_rows=FEW_ROWS_WEIGHT_ROWS)
AMD_ZEN = CPUTuning("amd-zen", prefetch_bytes=0, gemv_rows=1, few_rows_weight_rows=1, few_rows_x_widen_bytes=16384,
                   few_rows_block=2)


def tuning_for(target: Any) -> CPUTuning:
    """The choices for an llvm ``target``: AMD Zen for ``mcpu`` znver*, else the Intel-tuned default."""
    mcpu = str(target.attrs.get("mcpu", "") if hasattr(target, "attrs") else "")
    return AMD_ZEN if mcpu.startswith("znver") else INTEL
