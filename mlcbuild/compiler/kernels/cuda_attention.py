"""Paged-KV-cache decode attention for CUDA with the whole context's loads in flight.

Why: TVM 0.27's CUDA decode kernel (``batch_decode_paged_kv``, relax/frontend/nn/llm) runs one
thread block per (sequence, kv head) that walks the context 16 rows at a time, each step a
global load into shared memory, a barrier, the scores, a second barrier. At batch 1 a
Llama-3-8B layer has 8 such blocks on a 132-SM GPU and a 256-token context takes 16 dependent
load round trips: ~25 us per layer in the session-2 profile (0.8 ms of a 4.0 ms step), most of
it waiting on memory latency.

Here a block still serves one (sequence, kv head), but its rows are spread over independent
*streams*: ``D / 8`` lanes read one row (16 bytes of head dims each), so a warp reads
``32 / (D / 8)`` rows per instruction, and each stream issues the loads of ``UNROLL`` rows
before using any. With 8 warps and D=128 that is 64 rows per round, 4 rounds for 256 tokens.
Each stream keeps its own online-softmax state (max, denominator, output) for the G query heads
that share the kv head; the score of a row is a butterfly shuffle sum over the row's lanes. At
the end the streams' states meet in shared memory and the block's threads merge them, one
output element each. Same semantics as TVM's kernel: scores ``q.k * sm_scale`` in the log2
domain, ``lse = m + log2(sum)``, float32 accumulation; RoPE applied by the cache beforehand
(inline RoPE is not supported: ``replacements`` then keeps TVM's kernel).

``build(..., emulate=True)`` writes the same kernel with the blocks, warps and streams as serial
loops and each lane-parallel phase as a loop over the lanes (the butterfly as the same
additions over a buffer), so that it runs on the CPU: the tests compare it with numpy there
(this machine has no GPU).
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import tirx

from mlcbuild.compiler.kernels._tir_math import LOG2E

WARP = 32
VEC = 8  # head dims per lane: one 16-byte load of float16
WARPS = 8  # warps per block (fewer when the streams' states would not fit in shared memory)
UNROLL = 4  # rows per stream whose loads are issued together
SHARED_STATE_LIMIT = 32 * 1024  # bytes of the streams' output states in shared memory
NAME = "batch_decode_paged_kv"

KERNEL = """
@T.prim_func(s_tir=False)
def main(Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
         page_table_values_handle: T.handle, var_length_info: T.handle, k_rope_pos_offset_handle: T.handle,
         q_rope_position_handle: T.handle, output_handle: T.handle, lse_handle: T.handle,
         rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "global_symbol": "{NAME}"}})
    B = T.int32()
    nnz_pages = T.int32()
    max_num_pages = T.int32()
    page_indptr_elem_offset = T.int32()
    page_values_elem_offset = T.int32()
    k_rope_pos_offset_elem_offset = T.int32()
    q_rope_position_elem_offset = T.int32()
    length_info_elem_offset = T.int32()
    Q = T.match_buffer(Q_handle, (B, {HQ}, {D}), "{DT}")
    # no elem_offset: each layer's pages are an array of their own (offset 0, checked at the call),
    # and a known offset is what lets the 16-byte row loads compile as vector loads
    pages = T.match_buffer(pages_handle, (max_num_pages, 2, {HKV}, {PS}, {D}), "{DT}")
    page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset)
    page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
    k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
    q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset)
    output = T.match_buffer(output_handle, (B, {HQ}, {D}), "{DT}")
    lse = T.match_buffer(lse_handle, (B, {HQ}), "float32")
    length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_info_elem_offset)
    for b in {BIND_B}:
        for hk in {BIND_H}:
            sm = T.alloc_buffer(({S}, {G}), "float32", scope="{SHARED}")
            sd = T.alloc_buffer(({S}, {G}), "float32", scope="{SHARED}")
            so = T.alloc_buffer(({S}, {G}, {D}), "float32", scope="{SHARED}")
            for w in {BIND_W}:
                for {THREAD_VAR} in {BIND_T}:
                    q = T.alloc_buffer(({LS}{G}, {VEC}), "float32", scope="local")
                    kv = T.alloc_buffer(({LS}{U}, 2, {VEC}), "{DT}", scope="local")
                    sc = T.alloc_buffer(({LS}{U}, {G}), "float32", scope="local")
                    o = T.alloc_buffer(({LS}{G}, {VEC}), "float32", scope="local")
                    m = T.alloc_buffer(({LS}{G},), "float32", scope="local")
                    den = T.alloc_buffer(({LS}{G},), "float32", scope="local")
                    mnew = T.alloc_buffer(({LS}{G},), "float32", scope="local")
                    alpha = T.alloc_buffer(({LS}{G},), "float32", scope="local")
{BFLY_ALLOC}
                    page_begin: T.int32 = page_table_indptr[b]
                    num_pages: T.int32 = page_table_indptr[b + 1] - page_begin
                    kv_len: T.int32 = T.Select(num_pages > 0, (num_pages - 1) * {PS} + length_info[b], 0)
                    stream: T.int32 = w * {RPW} + {SUB}
                    for ln in {LANES}:
                        for g in T.unroll({G}):
                            m[{L}g] = T.float32(-50000.0)
                            den[{L}g] = T.float32(1.0)
                            for e in T.unroll({VEC}):
                                o[{L}g, e] = T.float32(0)
                                q[{L}g, e] = T.Cast("float32", Q[b, hk * {G} + g, {LANE} * {VEC} + e]) * (sm_scale * T.float32({LOG2E}))
                    for rnd in range((kv_len + {ROUND} - 1) // {ROUND}):
                        for ln in {LANES}:
                            for u in T.unroll({U}):
                                if ((rnd * {U} + u) * {S} + stream) < kv_len:
                                    kv[{L}u, 0, T.ramp(0, 1, {VEC})] = pages[T.Cast("int64", page_table_values[page_begin + ((rnd * {U} + u) * {S} + stream) // {PS}]), 0, hk, ((rnd * {U} + u) * {S} + stream) % {PS}, T.ramp({LANE} * {VEC}, 1, {VEC})]
                                    kv[{L}u, 1, T.ramp(0, 1, {VEC})] = pages[T.Cast("int64", page_table_values[page_begin + ((rnd * {U} + u) * {S} + stream) // {PS}]), 1, hk, ((rnd * {U} + u) * {S} + stream) % {PS}, T.ramp({LANE} * {VEC}, 1, {VEC})]
                            for u in T.unroll({U}):
                                for g in T.unroll({G}):
                                    sc[{L}u, g] = {DOT}
{BUTTERFLY}
                        for ln in {LANES}:
                            for g in T.unroll({G}):
                                mnew[{L}g] = m[{L}g]
                                for u in T.unroll({U}):
                                    if ((rnd * {U} + u) * {S} + stream) < kv_len:
                                        mnew[{L}g] = T.max(mnew[{L}g], sc[{L}u, g])
                                alpha[{L}g] = T.exp2(m[{L}g] - mnew[{L}g])
                                m[{L}g] = mnew[{L}g]
                                den[{L}g] = den[{L}g] * alpha[{L}g]
                                for e in T.unroll({VEC}):
                                    o[{L}g, e] = o[{L}g, e] * alpha[{L}g]
                                for u in T.unroll({U}):
                                    if ((rnd * {U} + u) * {S} + stream) < kv_len:
                                        sc[{L}u, g] = T.exp2(sc[{L}u, g] - mnew[{L}g])
                                        den[{L}g] = den[{L}g] + sc[{L}u, g]
                                        for e in T.unroll({VEC}):
                                            o[{L}g, e] = o[{L}g, e] + sc[{L}u, g] * T.Cast("float32", kv[{L}u, 1, e])
                    for ln in {LANES}:
                        for g in T.unroll({G}):
                            if {LANE} == 0:
                                sm[stream, g] = m[{L}g]
                                sd[stream, g] = den[{L}g]
                            for e in T.unroll({VEC}):
                                so[stream, g, {LANE} * {VEC} + e] = o[{L}g, e]
            # merge the streams: one output element per thread
            for w in {BIND_W}:
                for tx in {BIND_TX}:
                    mx = T.alloc_buffer((1,), "float32", scope="local")
                    tot = T.alloc_buffer((1,), "float32", scope="local")
                    acc = T.alloc_buffer((1,), "float32", scope="local")
                    for j in range({MERGE_STEPS}):
                        if (j * {THREADS} + w * {WARP} + tx) < {GD}:
                            mx[0] = T.float32(-50000.0)
                            for s in range({S}):
                                mx[0] = T.max(mx[0], sm[s, (j * {THREADS} + w * {WARP} + tx) // {D}])
                            tot[0] = T.float32(0)
                            acc[0] = T.float32(0)
                            for s in range({S}):
                                tot[0] = tot[0] + sd[s, (j * {THREADS} + w * {WARP} + tx) // {D}] * T.exp2(sm[s, (j * {THREADS} + w * {WARP} + tx) // {D}] - mx[0])
                                acc[0] = acc[0] + so[s, (j * {THREADS} + w * {WARP} + tx) // {D}, (j * {THREADS} + w * {WARP} + tx) % {D}] * T.exp2(sm[s, (j * {THREADS} + w * {WARP} + tx) // {D}] - mx[0])
                            output[b, hk * {G} + (j * {THREADS} + w * {WARP} + tx) // {D}, (j * {THREADS} + w * {WARP} + tx) % {D}] = T.Cast("{DT}", acc[0] / tot[0])
                            if (j * {THREADS} + w * {WARP} + tx) % {D} == 0:
                                lse[b, hk * {G} + (j * {THREADS} + w * {WARP} + tx) // {D}] = mx[0] + T.log2(tot[0])
"""

# the row's score summed over its lanes, every lane getting the total (xor butterfly)
_BUTTERFLY_WARP = """
                        for u in T.unroll({U}):
                            for g in T.unroll({G}):
                                for i in T.unroll({LOG_LPR}):
                                    sc[u, g] = sc[u, g] + T.tvm_warp_shuffle_xor(T.uint32(4294967295), sc[u, g], T.shift_right({LPR_HALF}, i), {WARP}, {WARP})
"""

# the same additions, lane by lane (each lane adds its partner's value of the previous step)
_BUTTERFLY_EMULATED = """
                        for u in range({U}):
                            for g in range({G}):
                                for i in range({LOG_LPR}):
                                    for ln in range({LPR}):
                                        bfly[ln] = sc[ln, u, g] + sc[T.bitwise_xor(ln, T.shift_right({LPR_HALF}, i)), u, g]
                                    for ln in range({LPR}):
                                        sc[ln, u, g] = bfly[ln]
"""


def shape_fits(h_kv: int, h_q: int, d: int, dtype: str) -> bool:
    """Whether ``build`` takes this shape (head dims a multiple of 8 lanes' loads of a warp)."""
    if dtype != "float16" or h_q % h_kv or d % VEC:  # bfloat16 would work the same, untested
        return False
    lanes_per_row = d // VEC
    return lanes_per_row <= WARP and WARP % lanes_per_row == 0 and h_q // h_kv <= 8


def build(h_kv: int, h_q: int, d: int, dtype: str, page_size: int, *, emulate: bool = False) -> Any:
    """The decode kernel as a scheduled PrimFunc with TVM's ``batch_decode_paged_kv`` signature."""
    if not shape_fits(h_kv, h_q, d, dtype):
        raise ValueError(f"decode attention kernel: unsupported shape h_kv={h_kv} h_q={h_q} d={d} {dtype}")
    g = h_q // h_kv
    lpr = d // VEC  # lanes per row
    rpw = WARP // lpr  # rows (streams) per warp
    warps = WARPS
    while warps > 1 and warps * rpw * g * d * 4 > SHARED_STATE_LIMIT:
        warps //= 2
    streams = warps * rpw
    threads = warps * WARP
    fields = dict(
        NAME=NAME, HQ=h_q, HKV=h_kv, D=d, DT=dtype, PS=page_size, G=g, VEC=VEC, U=UNROLL, S=streams,
        RPW=rpw, LPR=lpr, LOG_LPR=lpr.bit_length() - 1, LPR_HALF=lpr // 2, ROUND=streams * UNROLL,
        WARP=WARP, THREADS=threads, GD=g * d, MERGE_STEPS=-(-(g * d) // threads), LOG2E=repr(LOG2E),
        DOT=_dot(emulate),
    )
    if emulate:
        fields.update(
            BIND_B="range(B)", BIND_H=f"range({h_kv})", BIND_W=f"range({warps})", THREAD_VAR="sub",
            BIND_T=f"range({rpw})", BIND_TX=f"range({WARP})", SHARED="global", LS=f"{lpr}, ", L="ln, ",
            SUB="sub", LANE="ln", LANES=f"range({lpr})",
            BFLY_ALLOC=f'                    bfly = T.alloc_buffer(({lpr},), "float32", scope="local")',
        )
        butterfly = _BUTTERFLY_EMULATED
    else:
        fields.update(
            BIND_B='T.thread_binding(B, thread="blockIdx.x")', BIND_H=f'T.thread_binding({h_kv}, thread="blockIdx.y")',
            BIND_W=f'T.thread_binding({warps}, thread="threadIdx.y")', THREAD_VAR="tx",
            BIND_T=f'T.thread_binding({WARP}, thread="threadIdx.x")', BIND_TX=f'T.thread_binding({WARP}, thread="threadIdx.x")',
            SHARED="shared", LS="", L="", SUB=f"tx // {lpr}", LANE=f"(tx % {lpr})", LANES="range(1)", BFLY_ALLOC="",
        )
        butterfly = _BUTTERFLY_WARP
    text = KERNEL.format(BUTTERFLY=butterfly.strip("\n").format(**fields), **fields)
    return tvm.script.from_source(text)


def _dot(emulate: bool) -> str:
    """This lane's part of q[g] . k[u] (its VEC head dims), as one expression."""
    lane = "ln, " if emulate else ""
    terms = [f'q[{lane}g, {e}] * T.Cast("float32", kv[{lane}u, 0, {e}])' for e in range(VEC)]
    while len(terms) > 1:  # pairwise, like the other kernels' sums
        terms = [f"({terms[i]} + {terms[i + 1]})" if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def replacements(mod: tvm.IRModule) -> dict[str, Any]:
    """name -> our kernel, for TVM's CUDA decode kernel in ``mod`` (none where the KV cache applies
    RoPE inline or the shape is not one ``build`` takes)."""
    from mlcbuild.compiler.kernels.kv_cache_calls import ROPE_INLINE, kv_cache_rope_modes, shape_ints

    modes = kv_cache_rope_modes(mod)
    if not modes or any(mode == ROPE_INLINE for mode in modes):
        return {}
    out: dict[str, Any] = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or len(func.params) != 13:
            continue
        symbol = str(func.attrs["global_symbol"]) if func.attrs and "global_symbol" in func.attrs else gvar.name_hint
        if symbol != NAME:  # not the sliding-window variant, not the CPU one
            continue
        q, pages = list(func.params)[:2]  # typed parameters: shape and dtype of their tensors
        _, h_q, d = shape_ints(q)
        _, two, h_kv, page_size, d2 = shape_ints(pages)
        if two != 2 or d != d2 or None in (h_q, h_kv, d, page_size):
            continue
        try:
            out[gvar.name_hint] = build(h_kv, h_q, d, str(q.dtype), page_size)
        except ValueError:  # a shape build does not take (shape_fits)
            continue
    return out


def ReplaceDecodeAttention() -> Any:  # noqa: N802  (a pass, named like TVM's)
    """Swap TVM's CUDA decode attention kernel for ``build``'s (see the module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="ReplaceDecodeAttention")
    def apply(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        for name, kernel in replacements(mod).items():
            mod[name] = kernel
        return mod

    return apply
