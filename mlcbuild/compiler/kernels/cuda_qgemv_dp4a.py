"""4-bit batch-1 decode GEMV for CUDA on integer dot products (``dp4a``).

Why: the float GEMV of ``cuda_schedule`` (dequantize every weight, float32 FMA) issues ~6.5 SASS
instructions per 4-bit weight; on an H100 that is ~1.8 ms of issue time per Llama-3-8B decode
step, about what its GEMVs take (they read 1.2-1.9 TB/s of a ~3 TB/s memory): the kernel is
issue-bound. Here a weight word stays integer: two bit operations split its 8 nibbles into two
words of 4 bytes, and four ``dp4a`` (4 x int8 products + int32 add each) consume them, about one
instruction per weight.

The activations take the form the CPU VNNI kernel gives them (``cpu_qgemv_vnni``; same error
bound, at most ``max|x_g| / 65278`` per element): each 32-group becomes 16-bit fixed point
``x ~= d_g * x16``, split into two signed bytes ``x16 = 256 * hi + lo``, whose dot products
recombine exactly in int32::

    y[n] = sum_g  s[n, g] * d_g * ( sum_{k in g} q[n, k] * x16[k]  -  z * sum_{k in g} x16[k] )

Layout of one thread block (``warps`` warps, ``rows`` output rows per warp):

* prologue: the block's threads turn ``x`` into fixed point in shared memory, one group per
  thread at a time; per packed weight word four int32 words (hi bytes of the even and of the odd
  weights, then lo bytes), stored so that the 32 lanes of a warp read consecutive 16-byte vectors
  (no bank conflicts); plus ``d_g`` and ``z * sum x16`` per group;
* main loop: lane ``l`` of a warp takes groups ``l, l + 32, ...``; per group and row one 16-byte
  load of 4 weight words (consecutive across the warp), ``steps`` groups in flight; one shared
  16-byte load of activation words serves all ``rows`` rows;
* per row, a warp-shuffle tree sums the lanes; lane 0 applies the epilogue (cast, residual add).

``build(info, gq, emulate=True)`` writes the same kernel with the threads as serial loops, the
shuffle tree as the same additions over a buffer and ``dp4a`` as four byte products, so that it
runs on the CPU: the tests check its numerics there (this machine has no GPU).
"""

from __future__ import annotations

from typing import Any

from tvm import tirx

from mlcbuild.compiler.kernels._text_kernel import KernelExprs, parse, signature
from mlcbuild.compiler.kernels._tir_expr import as_int, loads_in
from mlcbuild.compiler.kernels.matmul_analysis import GroupQuant, MatmulInfo, NotMatched
from mlcbuild.compiler.kernels.cpu_qgemv_vnni import X16_MAX

WARP = 32
GROUP = 32  # weights per quantization group = one lane's 16-byte load of packed words
WARPS = 4  # warps per block
ROWS = 4  # output rows per warp: one shared activation load serves them all
STEPS = 4  # groups per lane whose loads are issued together
SHARED_LIMIT = 46 * 1024  # 48 KB static shared memory per block, less ~1 KB of buffer alignment (K <= ~22000)
RESERVED = {
    "T", "E", "m", "bx", "ty", "tx", "xs", "xd", "xz", "red", "amax", "zsum", "pk", "acc", "wv", "xv",
    "ihi", "ilo", "gi", "g", "j", "p", "b", "q16", "hi", "so", "su", "r", "i", "l", "inv", "main",
}


class _Exprs(KernelExprs):
    def __init__(self, info: MatmulInfo, emulate: bool):
        super().__init__(info)
        self.emulate = emulate

    def dp4a(self, a: Any, b: Any, c: Any) -> Any:
        """c + the dot product of a's and b's four signed bytes (int32 words)."""
        if not self.emulate:
            return tirx.call_pure_extern("int32", "__dp4a", a, b, c)
        total = c
        for i in range(4):
            left = tirx.const(24 - 8 * i, "int32")
            byte_a = tirx.shift_right(tirx.shift_left(a, left), tirx.const(24, "int32"))
            byte_b = tirx.shift_right(tirx.shift_left(b, left), tirx.const(24, "int32"))
            total = total + byte_a * byte_b
        return total

    def nibbles(self, word: Any, odd: int) -> Any:
        """The even (odd=0) or odd (odd=1) nibbles of a packed uint32 word, one per byte, as int32."""
        if odd:
            word = tirx.shift_right(word, tirx.const(4, "uint32"))
        return tirx.reinterpret("int32", tirx.bitwise_and(word, tirx.const(0x0F0F0F0F, "uint32")))


KERNEL = """
@T.prim_func(s_tir=False)
def main({handles}):
    T.func_attr({{"tirx.noalias": True}})
{symbols}
{buffers}
    for m in {BIND_M}:
        for bx in {BIND_BX}:
            xs = T.alloc_buffer(({XS},), "int32", scope="{SHARED}")
            xd = T.alloc_buffer(({NGP},), "float32", scope="{SHARED}")
            xz = T.alloc_buffer(({NGP},), "int32", scope="{SHARED}")
{RED_ALLOC}
            # prologue: x -> 16-bit fixed point per group, byte planes laid out for the dot loop
            for ty in {BIND_TY}:
                for tx in {BIND_TX}:
                    amax = T.alloc_buffer((1,), "float32", scope="local")
                    zsum = T.alloc_buffer((1,), "int32", scope="local")
                    pk = T.alloc_buffer((2,), "int32", scope="local")
                    for gi in range({GI}):
                        g: T.int64 = gi * {THREADS} + ty * {WARP} + tx
                        if g < {NG}:
                            amax[0] = T.float32(0)
                            for i in T.unroll({GROUP}):
                                amax[0] = T.max(amax[0], T.abs(E.x(m, g * {GROUP} + i, {names})))
                            inv: T.float32 = T.Select(amax[0] > T.float32(0), T.float32({X16MAX}) / amax[0], T.float32(0))
                            zsum[0] = 0
                            for j in T.unroll({GW}):
                                for p in T.unroll(2):
                                    pk[0] = 0
                                    pk[1] = 0
                                    for b in T.unroll(4):
                                        q16: T.int32 = T.Cast("int32", T.nearbyint(E.x(m, g * {GROUP} + j * 8 + b * 2 + p, {names}) * inv))
                                        hi: T.int32 = T.shift_right(q16 + 128, 8)
                                        zsum[0] = zsum[0] + q16
                                        pk[0] = T.bitwise_or(pk[0], T.shift_left(T.bitwise_and(hi, 255), b * 8))
                                        pk[1] = T.bitwise_or(pk[1], T.shift_left(T.bitwise_and(q16 - hi * 256, 255), b * 8))
                                    xs[((g // {WARP} * {GW} + j) * {WARP} + g % {WARP}) * 4 + p] = pk[0]
                                    xs[((g // {WARP} * {GW} + j) * {WARP} + g % {WARP}) * 4 + 2 + p] = pk[1]
                            xd[g] = amax[0] * T.float32({DSCALE})
                            xz[g] = zsum[0] * {ZERO}
            # main loop: lanes over groups, rows per warp
            for ty in {BIND_TY}:
                for tx in {BIND_TX}:
                    acc = T.alloc_buffer(({ROWS},), "float32", scope="local")
                    wv = T.alloc_buffer(({STEPS}, {ROWS}, {GW}), "uint32", scope="local")
                    xv = T.alloc_buffer((4,), "int32", scope="local")
                    ihi = T.alloc_buffer(({ROWS},), "int32", scope="local")
                    ilo = T.alloc_buffer(({ROWS},), "int32", scope="local")
                    for r in T.unroll({ROWS}):
                        acc[r] = T.float32(0)
                    for so in range({SO}):
                        for su in T.unroll({STEPS}):
                            for r in T.unroll({ROWS}):
                                if {FULL} or (so * {STEPS} + su) * {WARP} + tx < {NG}:
                                    wv[su, r, T.ramp(0, 1, {GW})] = {W}[bx * {RB} + ty * {ROWS} + r, T.ramp(((so * {STEPS} + su) * {WARP} + tx) * {GW}, 1, {GW})]
                        for su in T.unroll({STEPS}):
                            g: T.int64 = (so * {STEPS} + su) * {WARP} + tx
                            if {FULL} or g < {NG}:
                                for r in T.unroll({ROWS}):
                                    ihi[r] = 0
                                    ilo[r] = 0
                                for j in T.unroll({GW}):
                                    xv[T.ramp(0, 1, 4)] = xs[T.ramp((((so * {STEPS} + su) * {GW} + j) * {WARP} + tx) * 4, 1, 4)]
                                    for r in T.unroll({ROWS}):
                                        ihi[r] = E.dp4a(E.nibbles(wv[su, r, j], 0), xv[0], ihi[r])
                                        ihi[r] = E.dp4a(E.nibbles(wv[su, r, j], 1), xv[1], ihi[r])
                                        ilo[r] = E.dp4a(E.nibbles(wv[su, r, j], 0), xv[2], ilo[r])
                                        ilo[r] = E.dp4a(E.nibbles(wv[su, r, j], 1), xv[3], ilo[r])
                                for r in T.unroll({ROWS}):
                                    acc[r] = acc[r] + T.Cast("float32", ihi[r] * 256 + ilo[r] - xz[g]) * (xd[g] * T.Cast("float32", {S}[bx * {RB} + ty * {ROWS} + r, g]))
{REDUCE}
"""

# lanes' partial sums -> lane 0 (shuffle tree), then the epilogue; inside the main thread loops
_REDUCE_WARP = """
                    for r in T.unroll({ROWS}):
                        for i in T.unroll(5):
                            acc[r] = acc[r] + T.tvm_warp_shuffle_down(T.uint32(4294967295), acc[r], T.shift_right(16, i), {WARP}, {WARP})
                    if tx == 0:
                        for r in T.unroll({ROWS}):
                            {OUT}[{OUT_IDX}bx * {RB} + ty * {ROWS} + r] = E.out(m, bx * {RB} + ty * {ROWS} + r, acc[r], {names})
"""

# the same additions in the same order, with the lanes run one after another
_REDUCE_EMULATED = """
                    for r in range({ROWS}):
                        red[ty, r, tx] = acc[r]
            for ty in range({WARPS}):
                for r in range({ROWS}):
                    for i in range(5):
                        for l in range(T.shift_right(16, i)):
                            red[ty, r, l] = red[ty, r, l] + red[ty, r, l + T.shift_right(16, i)]
                    {OUT}[{OUT_IDX}bx * {RB} + ty * {ROWS} + r] = E.out(m, bx * {RB} + ty * {ROWS} + r, red[ty, r, 0], {names})
"""


def applies(info: MatmulInfo, gq: GroupQuant | None) -> bool:
    """Whether ``build`` takes this matmul: 4-bit words of 8, groups of 32, float16 activations,
    an integer zero point."""
    try:
        _check(info, gq)
    except NotMatched:
        return False
    return True


def _check(info: MatmulInfo, gq: GroupQuant | None) -> None:
    if gq is None:
        raise NotMatched("not a group-quantized weight")
    kw = as_int(gq.weight.shape[1]) or 0
    if gq.bits != 4 or gq.per_word != 8 or gq.group != GROUP or kw * 8 != info.k_extent:
        raise NotMatched("not an unpadded 4-bit layout of 8 per word in groups of 32")
    if float(gq.zero) != int(gq.zero):
        raise NotMatched("non-integer zero point")
    if {str(load.source.dtype) for load in loads_in(info.x_expr)} != {"float16"}:
        raise NotMatched("activations are not float16")  # float32 ones (q4f32_1) asked for exactness
    if _shared_bytes(info.k_extent) > SHARED_LIMIT:
        raise NotMatched(f"K={info.k_extent}: the fixed-point activations would not fit in shared memory")


def _shared_bytes(k: int) -> int:
    """Shared memory of one block: 4 int32 words per packed weight word, d and z per group."""
    groups = -(-(k // GROUP) // WARP) * WARP
    return groups * (GROUP // 8) * 4 * 4 + groups * 8


def build(info: MatmulInfo, gq: GroupQuant | None, *, emulate: bool = False, bound: bool = False) -> Any:
    """The GEMV as an (already scheduled) PrimFunc with the fused function's signature (``bound``:
    without parameters, its body on ``info.func``'s own buffers, see ``_text_kernel.signature``).
    Every row of the batch (blockIdx.y) reads all weights, so it is meant for a batch of one.
    ``WARPS``, ``ROWS`` and ``STEPS`` are upper limits (each falls back to a divisor of the shape)."""
    _check(info, gq)
    K, N = info.k_extent, info.n_extent
    rows = next(r for r in (ROWS, 4, 2, 1) if N % r == 0 and r <= ROWS)
    warps = next(w for w in (WARPS, 4, 2, 1) if N % (w * rows) == 0 and w <= WARPS)
    ng = K // GROUP
    lane_steps = -(-ng // WARP)
    steps = next(s for s in (STEPS, 4, 2, 1) if lane_steps % s == 0 and s <= STEPS)
    gw = GROUP // 8
    threads = warps * WARP
    sig = signature(info, gq, RESERVED, bound=bound)
    fields = dict(
        handles=sig.handles, symbols=sig.symbols, buffers=sig.buffers, names=sig.names,
        W=sig.weight, S=sig.scale, OUT=sig.out, OUT_IDX=sig.out_index,
        NG=ng, NGP=lane_steps * WARP, XS=lane_steps * WARP * gw * 4, GI=-(-ng // threads), GROUP=GROUP, GW=gw,
        FULL=ng % WARP == 0,  # every lane has a group at every step: no guard (loads hoist across steps)
        WARP=WARP, WARPS=warps, THREADS=threads, ROWS=rows, RB=warps * rows, STEPS=steps, SO=lane_steps // steps,
        ZERO=int(gq.zero), X16MAX=float(X16_MAX), DSCALE=repr(1.0 / X16_MAX),
    )
    if emulate:
        fields.update(
            BIND_M=f"range({sig.m_extent})", BIND_BX=f"range({N // (warps * rows)})",
            BIND_TY=f"range({warps})", BIND_TX=f"range({WARP})", SHARED="global",
            RED_ALLOC=f'            red = T.alloc_buffer(({warps}, {rows}, {WARP}), "float32")',
        )
        reduce = _REDUCE_EMULATED
    else:
        fields.update(
            BIND_M=f'T.thread_binding({sig.m_extent}, thread="blockIdx.y")',
            BIND_BX=f'T.thread_binding({N // (warps * rows)}, thread="blockIdx.x")',
            BIND_TY=f'T.thread_binding({warps}, thread="threadIdx.y")',
            BIND_TX=f'T.thread_binding({WARP}, thread="threadIdx.x")', SHARED="shared", RED_ALLOC="",
        )
        reduce = _REDUCE_WARP
    text = KERNEL.format(REDUCE=reduce.strip("\n").format(**fields), **fields)
    return parse(text, _Exprs(info, emulate), sig)
