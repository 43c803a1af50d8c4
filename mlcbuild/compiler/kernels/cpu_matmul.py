"""Matmul-like PrimFuncs on CPU: decode GEMV and prefill GEMM, regenerated from their TE form.

``matmul_analysis.analyze`` splits a fused matmul into the activation factor x(m.., k), the
weight factor w(n, k) (which may be a whole dequantization expression) and the epilogue.
``build_gemv`` / ``build_gemm`` rebuild the
function with TE around those expressions -- accumulating in float32, fp16 widened after load --
and schedule it with TensorIR primitives:

* GEMV (decode, few rows):  parallel over chunks of output rows; per row a vector of
  ``lanes`` float32 partial sums over consecutive k (so the packed 4-bit words are read
  contiguously and dequantized in registers), several rows interleaved so that each x vector
  is loaded once for all of them; a horizontal sum at the end.
* GEMM (prefill):  parallel over column tiles of the output; each tile first dequantizes /
  widens its [K, NB] slice of the weight into an fp32 panel (L2-resident), then a register-
  blocked micro-kernel (MB rows x NB columns of accumulators) streams k with broadcast x.

The function keeps its signature (same parameters, same order, same output dtype), so the Relax
side is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tvm
from tvm import s_tir, te, tirx
from tvm.ir import expr as ir_expr
from tvm.ir.prim import expr as pe

from mlcbuild.compiler.kernels._tir_expr import Rewriter, as_int, dtype_of, loads_in, map_body
from mlcbuild.compiler.kernels.matmul_analysis import (
    GroupQuant,
    MatmulInfo,
    NotMatched,
    _m_total,
    _ravel,
    epilogue_value,
    i64,
    x_value,
)


# ---- TE reconstruction --------------------------------------------------------------------------


@dataclass
class _TE:
    placeholders: dict[int, Any]  # index of param -> te placeholder
    by_buffer: list[tuple[Any, Any]]  # (buffer, placeholder)

    def load(self, buf: Any, idx: list[Any]) -> Any:
        for b, ph in self.by_buffer:
            if b.same_as(buf):
                return ph(*idx)
        raise NotMatched(f"load of a non-parameter buffer {buf}")


def _placeholders(info: MatmulInfo) -> _TE:
    phs: dict[int, Any] = {}
    pairs = []
    for i, p in enumerate(info.params[:-1]):
        ph = te.placeholder(list(p.shape), dtype=str(p.dtype), name=p.name)
        phs[i] = ph
        pairs.append((p, ph))
    return _TE(phs, pairs)


def _x_fn(info: MatmulInfo, tes: _TE) -> Any:
    return lambda m, k: x_value(info, tes.load, m, k)


def _w_fn(info: MatmulInfo, tes: _TE) -> Any:
    def fn(n: Any, k: Any) -> Any:
        v = Rewriter({info.n_var: n, info.k_var: k}, tes.load, promote=True)(info.w_expr)
        return v if dtype_of(v) == "float32" else tirx.Cast("float32", v)

    return fn


def _out_compute(info: MatmulInfo, tes: _TE, result: Any) -> Any:
    """The output tensor: epilogue(result) with result(m_flat, n) in float32."""

    def fcompute(*idx: Any) -> Any:
        return epilogue_value(info, tes.load, result(_ravel(info, list(idx[:-1])), idx[-1]), list(idx))

    return te.compute(list(info.out.shape), fcompute, name="out")


def _finish(info: MatmulInfo, tes: _TE, out: Any) -> Any:
    args = [tes.placeholders[i] for i in range(len(info.params) - 1)] + [out]
    func = te.create_prim_func(args)
    attrs = {"tirx.noalias": True}
    return func.with_attrs(attrs) if hasattr(func, "with_attrs") else func.with_attr("tirx.noalias", True)


def _divisor(n: int, choices: list[int]) -> int:
    for c in choices:
        if n % c == 0:
            return c
    return 1


# Software prefetch distance of a GEMV's weight stream (bytes ahead of the rows being read). A
# thread's rows are contiguous, but a decode GEMV of SmolLM2 reads only 0.1-0.5 MB per thread:
# too short for the hardware prefetcher to ramp up. Measured on the demo's decode (one process,
# bundles alternating, 16 rounds of 64 steps): q4f16_1 (VNNI kernel) 7.15 ms/step without, 6.29 /
# 6.21 / 6.02 with 4, 8 and 16 KB ahead, 7.89 -> 6.01 for the final build; q0f16 16.44 -> 14.68;
# q4f16_1 for cpu:x86-64-v3 (float 4-bit kernel) 9.72 -> 7.96. (Intel Xeon; AMD Zen 4 streams faster
# without: ``cpu_tuning``.)
PREFETCH_BYTES = 16384


# ---- GEMV ---------------------------------------------------------------------------------------


def build_gemv(info: MatmulInfo, lanes: int, rows: int = 4, prefetch_bytes: int = PREFETCH_BYTES) -> Any:
    """``rows``: output rows per parallel iteration; ``prefetch_bytes``: how far ahead the weight rows are
    prefetched (0: not at all). Per CPU family: ``cpu_tuning``."""
    tes = _placeholders(info)
    X, W = _x_fn(info, tes), _w_fn(info, tes)
    K, N = info.k_extent, info.n_extent
    vl = lanes if K % lanes == 0 else _divisor(K, [8, 4, 2])
    M = _m_total(info)
    ko = te.reduce_axis((i64(0), i64(K // vl)), name="ko")
    rf = te.compute(
        (M, i64(N), i64(vl)),
        lambda m, n, l: te.sum(X(m, ko * vl + l) * W(n, ko * vl + l), axis=ko),
        name="rf",
    )
    lr = te.reduce_axis((i64(0), i64(vl)), name="l")
    y = te.compute((M, i64(N)), lambda m, n: te.sum(rf(m, n, lr), axis=lr), name="y")
    out = _out_compute(info, tes, lambda m, n: y(m, n))
    func = _finish(info, tes, out)
    row_bytes = K * max((tvm.DataType(str(load.source.dtype)).bits // 8 for load in loads_in(info.w_expr)), default=4)
    rows = _divisor(N, [rows, 4, 2, 1])
    return _prefetch_plain_weight(schedule_gemv(func, N, rows, sequential_rows=row_bytes < SEQUENTIAL_ROW_BYTES),
                                  info, rows, prefetch_bytes)


def _prefetch_plain_weight(func: Any, info: MatmulInfo, rows: int, prefetch_bytes: int = PREFETCH_BYTES) -> Any:
    """A scheduled GEMV with its weight stream prefetched (``prefetch_rows_ahead``) where the weight
    factor is one plain [N, K] buffer (16/32-bit, read as stored); ``func`` itself otherwise."""
    weights = [load for load in loads_in(info.w_expr)
               if [as_int(d) for d in load.source.shape] == [info.n_extent, info.k_extent]]
    return prefetch_rows_ahead(func, rows, weights[0].source.name, prefetch_bytes=prefetch_bytes) \
        if len(weights) == 1 else func




def prefetch_rows_ahead(func: Any, rows: int, weight: str, *row_aligned: str, prefetch_bytes: int = PREFETCH_BYTES) -> Any:
    """``func`` (a scheduled GEMV: a parallel loop over chunks of ``rows`` rows of the [N, K]
    buffer named ``weight``) with a prefetch of every 64-byte line of the rows ``prefetch_bytes``
    of ``weight`` ahead at the top of each chunk, and of the same rows of
    the ``row_aligned`` buffers ([N, ...]: the scales of packed weights); ``func`` itself where it has
    no such loop or buffer, or ``prefetch_bytes`` is 0."""
    if prefetch_bytes == 0:
        return func
    names = (weight, *row_aligned)
    found: dict[str, Any] = {}

    def find(_name: str, store: Any) -> Any:
        for ld in loads_in(store.value):
            if ld.source.name in names:
                found.setdefault(ld.source.name, ld.source)
        return store

    map_body(func, store=find)  # (TVM 0.27's PrimFunc has no buffer_map to look them up in)
    if weight not in found:
        return func
    buffers = [found[name] for name in names if name in found]
    n = as_int(buffers[0].shape[0])
    ahead = rows_ahead(buffers[0], prefetch_bytes)

    def prefetches(loop: Any) -> list[Any]:
        no, dtype = loop.loop_var, dtype_of(loop.min)
        calls = []
        for r in range(rows):
            row = tirx.min(no * tirx.IntImm(dtype, rows) + tirx.IntImm(dtype, ahead + r), tirx.IntImm(dtype, n - 1))
            for buf in buffers:
                for col in line_starts(buf):
                    address = tirx.address_of(tirx.BufferLoad(buf, [row, tirx.IntImm(dtype, col)]))
                    calls.append(tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch", address, 0, 3, 1)))
        return calls

    def add(stmt: Any) -> Any:
        if stmt.kind != tirx.ForKind.PARALLEL:
            return None
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, tirx.SeqStmt([*prefetches(stmt), stmt.body]),
                        stmt.thread_binding, stmt.annotations, stmt.step)

    return map_body(func, loop=add)


def rows_ahead(weight: Any, prefetch_bytes: int = PREFETCH_BYTES) -> int:
    """How many rows of the [N, ...] buffer ``weight`` are ``prefetch_bytes`` (at least one)."""
    return max(1, prefetch_bytes // ((as_int(weight.shape[1]) or 1) * tvm.DataType(str(weight.dtype)).bits // 8))


def line_starts(buf: Any) -> range:
    """Column indices of a row of the [N, ...] buffer ``buf`` that start its 64-byte lines."""
    return range(0, as_int(buf.shape[1]) or 0, 64 * 8 // tvm.DataType(str(buf.dtype)).bits)


# Rows shorter than this are read one after another (one accumulator chain per row) instead of
# interleaved: four interleaved 1-2 KB streams restart the hardware prefetcher at every row group.
# Measured with weights far larger than the L3 (2 threads): float16 rows of 576 (1152 B) 14-17 ->
# 22-23 GB/s, float32 rows of 576 (2304 B) 23-26 -> 27-29 GB/s; rows of 1536 (3-6 KB) are faster
# interleaved (float16 17.6-18.7 vs 14.4-15.7 GB/s).
SEQUENTIAL_ROW_BYTES = 3072


def schedule_gemv(func: Any, n: int, rows: int, sequential_rows: bool = False) -> Any:
    """``rows``: rows per parallel chunk, a divisor of ``n`` (the prefetch pass walks the same chunks)."""
    sch = s_tir.Schedule(func)
    rf, y, out = sch.get_sblock("rf"), sch.get_sblock("y"), sch.get_sblock("out")
    m, nn, l, ko = sch.get_loops(rf)
    no, ni = sch.split(nn, [None, rows])
    if sequential_rows:
        sch.reorder(no, m, ni, ko, l)
    else:
        sch.reorder(no, m, ko, ni, l)
    sch.parallel(no)
    sch.reverse_compute_at(y, m)
    # out is indexed by the original (m.., n) axes: move it next to y.
    sch.reverse_compute_at(out, m)
    sch.vectorize(l)
    if rows > 1:
        sch.unroll(ni)
    init = sch.decompose_reduction(rf, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    yl = sch.get_loops(y)
    sch.unroll(yl[-1])
    return sch.mod["main"]


# ---- GEMV over a few rows (speculative verification) ---------------------------------------------

# Rows of x computed together by the few-row GEMV (each weight vector loaded and widened once for all
# of them): a verification of 1-3 drafted tokens (2-4 rows) is one pass over the weights, 4-7 drafted
# tokens two. Measured on the demo's q0f16 projections (Intel Xeon, 2 threads, summed over the
# model, one process): decode 12.5-13.1 ms; 2/3/4/5 rows 16.2/16.3/16.6/25.2 ms (the decode GEMV
# looping over the rows: 18.7/23.8/28.9/34.0); blocks of 5 or 6 cost 17-18 ms at every row count up
# to theirs, blocks of 8 24 ms.
FEW_ROWS_BLOCK = 4
# Weight rows interleaved per step: 2 x FEW_ROWS_BLOCK accumulators (4 weight rows spill registers).
FEW_ROWS_WEIGHT_ROWS = 2


def _lane_index(bits: tuple[Any, ...]) -> Any:
    """A lane's index from its binary digits, most significant first."""
    index = i64(0)
    for bit in bits:
        index = index * i64(2) + bit
    return index


def _add_halves(partial: Any, depth: int, shape: tuple[Any, ...]) -> Any:
    """``partial`` [rows, n, 2 x depth] with its first lane digit summed away: one level of a tree."""
    half = te.reduce_axis((i64(0), i64(2)), name=f"half{depth}")
    return te.compute(shape, lambda m, n, *bits: te.sum(partial(m, n, half, *bits), axis=half), name=f"sum{depth - 1}")


def build_gemv_few_rows(info: MatmulInfo, lanes: int, block: int = FEW_ROWS_BLOCK,
                        weight_rows: int = FEW_ROWS_WEIGHT_ROWS, prefetch_bytes: int = PREFETCH_BYTES,
                        x_widen_bytes: int | None = None) -> Any:
    """A GEMV for a handful of rows (a dynamic count, typically 2-5: a speculative verification) of a
    float weight: per step, one weight vector is loaded and widened once and multiplied into
    ``block`` rows of x, so the weights stream once per ``block`` rows instead of once per row.

    The rows are padded up to a multiple of ``block`` by repeating the last one (its results are not
    stored), so the block's inner loop has no bounds test; x is widened to float32 once up front (a
    few KB), not per weight row. A row's ``lanes`` partial sums are added as a tree (log2(lanes)
    vector adds): LLVM keeps the order of an unrolled float reduction, and the 16 dependent scalar
    adds of a plain horizontal sum per row and block row cost more than the dot product itself once
    the weight is reused (compute, not memory, bounds a few-row GEMV on a small core count).

    ``x_widen_bytes``: where a block's float32 x would be larger (None: no limit) and x is a plain float16
    load, x is staged as float16 and widened at each use instead, so that it stays in L1 beside the
    streaming weights (a verification's down projection, K = 1536: 24 KB of float32 x; ``cpu_tuning``)."""
    tes = _placeholders(info)
    X, W = _x_fn(info, tes), _w_fn(info, tes)
    K, N = info.k_extent, info.n_extent
    vl = lanes if K % lanes == 0 else _divisor(K, [8, 4, 2])
    if vl < 2:
        raise NotMatched(f"few-row GEMV: K={K} has no vector-length divisor")
    depth = vl.bit_length() - 1
    M = _m_total(info)
    padded = tirx.floordiv(M + i64(block - 1), i64(block)) * i64(block)
    # half x: the float16 values themselves (exact), widened where they are used
    half_x = x_widen_bytes is not None and block * K * 4 > x_widen_bytes and _is_half_load(info.x_expr)
    xw = te.compute((padded, i64(K)), lambda m, k: X(tirx.min(m, M - i64(1)), k).astype("float16" if half_x else "float32"),
                    name="xw")
    ko = te.reduce_axis((i64(0), i64(K // vl)), name="ko")
    rf = te.compute((padded, i64(N)) + (i64(2),) * depth,
                    lambda m, n, *bits: te.sum(xw(m, ko * vl + _lane_index(bits)).astype("float32") * W(n, ko * vl + _lane_index(bits)),
                                               axis=ko), name="rf")
    partial, levels = rf, []
    for d in range(depth, 0, -1):
        partial = _add_halves(partial, d, (padded, i64(N)) + (i64(2),) * (d - 1))
        levels.append(partial.op.name)
    y = te.compute((M, i64(N)), lambda m, n: partial(m, n), name="y")
    out = _out_compute(info, tes, lambda m, n: y(m, n))
    func = _finish(info, tes, out)

    weight_rows = _divisor(N, [weight_rows, 1])
    sch = s_tir.Schedule(func)
    loops = sch.get_loops(sch.get_sblock("rf"))
    rows, cols, lane_loops, k = loops[0], loops[1], loops[2:-1], loops[-1]
    lane = sch.fuse(*lane_loops) if len(lane_loops) > 1 else lane_loops[0]
    mo, mi = sch.split(rows, [None, block])
    no, ni = sch.split(cols, [None, weight_rows])
    sch.reorder(no, mo, k, ni, mi, lane)
    sch.parallel(no)
    xl = sch.get_loops(sch.get_sblock("xw"))
    sch.vectorize(sch.split(xl[-1], [None, vl])[-1])
    for name in levels:  # each level right after the block's dot products, vectorized over its lanes
        level = sch.get_sblock(name)
        sch.reverse_compute_at(level, mo)
        ll = sch.get_loops(level)
        spatial = len(sch.get(level).iter_vars) - 3  # its lane digits (less the one summed)
        sch.unroll(ll[-1])
        if spatial:
            sch.reorder(ll[-1], *ll[-1 - spatial:-1])
            sch.vectorize(sch.fuse(*ll[-1 - spatial:-1]) if spatial > 1 else ll[-2])
    sch.reverse_compute_at(sch.get_sblock("y"), mo)
    sch.reverse_compute_at(sch.get_sblock("out"), mo)
    sch.vectorize(lane)
    sch.unroll(mi)
    if weight_rows > 1:
        sch.unroll(ni)
    init = sch.decompose_reduction(sch.get_sblock("rf"), k)
    sch.vectorize(sch.get_loops(init)[-1])
    return _prefetch_plain_weight(sch.mod["main"], info, weight_rows, prefetch_bytes)


def _is_half_load(x: Any) -> bool:
    """Whether ``x`` is a float16 load, or one widened: its values are float16 values, exactly."""
    if isinstance(x, pe.Cast):
        x = x.value
    return isinstance(x, ir_expr.TensorLoad) and dtype_of(x) == "float16"


# ---- GEMM ---------------------------------------------------------------------------------------


# The register tile (MB rows x NB columns of fp32 accumulators) must stay under TVM's 1 KiB
# stack-allocation limit: a larger tile becomes a heap workspace that LLVM cannot promote to
# registers (measured: 4x64 ran at 40% of the speed of 4x48).
def _gemm_tile(n: int, lanes: int) -> tuple[int, int]:
    for mb, vecs in ((4, 3), (6, 2), (8, 1)):
        nb = vecs * lanes
        if n % nb == 0 and mb * nb * 4 < 1024:
            return mb, nb
    nb = _divisor(n, [lanes, 8, 4, 2])
    return 4, nb


def build_gemm(info: MatmulInfo, lanes: int, mb: int | None = None, nb: int | None = None) -> Any:
    tes = _placeholders(info)
    X, W = _x_fn(info, tes), _w_fn(info, tes)
    K, N = info.k_extent, info.n_extent
    M = _m_total(info)
    dmb, dnb = _gemm_tile(N, lanes)
    mb, nb = mb or dmb, nb or dnb
    mo_ext = tirx.floordiv(M + (mb - 1), mb)
    # x packed per row tile: xp[mo, k, mi] (zero rows past M), so the micro-kernel broadcasts
    # contiguous values and needs no bounds checks.
    xp = te.compute(
        (mo_ext, i64(K), i64(mb)),
        lambda mo, k, mi: tirx.if_then_else(mo * mb + mi < M, X(mo * mb + mi, k), tirx.const(0, "float32")),
        name="xp",
    )
    wt = te.compute((i64(K), i64(N)), lambda k, n: W(n, k), name="wt")
    kk = te.reduce_axis((i64(0), i64(K)), name="k")
    acc = te.compute(
        (mo_ext * mb, i64(N)),
        lambda m, n: te.sum(xp(tirx.floordiv(m, mb), kk, tirx.floormod(m, mb)) * wt(kk, n), axis=kk),
        name="acc",
    )
    out = _out_compute(info, tes, lambda m, n: acc(m, n))
    func = _finish(info, tes, out)
    return schedule_gemm(func, N, lanes, nb, mb)


def schedule_gemm(func: Any, n: int, lanes: int, nb: int, mb: int) -> Any:
    sch = s_tir.Schedule(func)
    xp, wt, acc, out = (sch.get_sblock(x) for x in ("xp", "wt", "acc", "out"))
    m, nn, k = sch.get_loops(acc)
    mo, mi = sch.split(m, [None, mb])
    vl = lanes if nb % lanes == 0 else nb
    no, nj, nv = sch.split(nn, [None, nb // vl, vl])
    sch.reorder(no, mo, k, mi, nj, nv)
    sch.parallel(no)
    sch.compute_at(wt, no)
    sch.reverse_compute_at(out, mo)
    sch.vectorize(nv)
    sch.unroll(nj)
    sch.unroll(mi)
    init = sch.decompose_reduction(acc, k)
    il = sch.get_loops(init)
    sch.vectorize(il[-1])
    # pack the weight panel [K, nb]: n inner (vectorized). A packed word holds consecutive k, so
    # k is split by 8 with the 8 unrolled inside: the loads of one word serve 8 rows of the panel.
    wl = sch.get_loops(wt)
    wk, wn = wl[-2], wl[-1]
    k_ext = as_int(sch.get(wk).extent)
    wno, wv = sch.split(wn, [None, vl])
    if k_ext is not None and k_ext % 8 == 0:
        wko, wki = sch.split(wk, [None, 8])
        sch.reorder(wko, wno, wki, wv)
        sch.unroll(wki)
        # Stage the packed words / scales of one (k-word, n-vector) in a small stack buffer: in
        # a multi-function library LLVM gets no noalias for the parameters, and without the
        # copy it reloads the word for each of the 8 values because the panel stores might
        # alias it (measured: packing 4x slower in the library than in a one-function module).
        for i in range(len(sch.get(wt).reads)):
            try:
                cache = sch.cache_read(wt, i, "global")
                sch.compute_at(cache, wno)
            except Exception:  # noqa: BLE001
                continue
    sch.vectorize(wv)
    # x panel: parallel over row tiles
    xl = sch.get_loops(xp)
    sch.parallel(xl[0])
    ol = sch.get_loops(out)
    _, ov = sch.split(ol[-1], [None, vl])
    sch.vectorize(ov)
    return sch.mod["main"]


# ---- group-quantized GEMV: dequantize in registers, scale and zero point factored out -----------


def build_gemv_q(info: MatmulInfo, gq: GroupQuant, lanes: int, rows: int = 4, prefetch_bytes: int = PREFETCH_BYTES) -> Any:
    K, N = info.k_extent, info.n_extent
    P = gq.per_word
    # Rows are stored zero-padded to whole groups (q3f16_1: 576 -> 600 elements in 60 words):
    # run over every stored word and give the padding x = 0.
    kw = as_int(gq.weight.shape[1]) or 0
    if kw * P < K or as_int(gq.weight.shape[0]) != N:
        raise NotMatched("weight layout does not cover K")
    gw = gq.group // P  # words per group
    # Each lane holds one packed word; a vector's per-lane scales come from vl / gw groups,
    # which LLVM assembles lane by lane: more than two groups per vector costs more than the
    # wider vector gains (measured: 16 lanes over 4 groups ran at half the speed of 8 lanes).
    widest = max(4, min(lanes, 2 * gw))
    vl = _divisor(kw, [widest, widest // 2, 4])
    if vl < 4:
        raise NotMatched("too few words per row for the vector layout")
    tes = _placeholders(info)
    X0 = _x_fn(info, tes)

    def X(m: Any, k: Any) -> Any:
        if kw * P == K:
            return X0(m, k)
        return tirx.if_then_else(k < K, X0(m, tirx.min(k, K - 1)), tirx.const(0, "float32"))

    M = _m_total(info)
    Wt = tes.load
    mask = tirx.const((1 << gq.bits) - 1, "uint32")
    j = te.reduce_axis((i64(0), i64(P)), name="j")
    xz = te.compute(
        (M, i64(kw)),
        lambda m, w: te.sum(X(m, w * P + j) * tirx.const(gq.zero, "float32"), axis=j),
        name="xz",
    )
    xp = te.compute(
        (M, i64(kw // vl), i64(P), i64(vl)),
        lambda m, wo, jj, l: X(m, (wo * vl + l) * P + jj),
        name="xp",
    )
    j2 = te.reduce_axis((i64(0), i64(P)), name="j2")

    # (A 16-entry table lookup with vpermi2ps instead of "& 15" + int->float measured 10% slower
    # on this Emerald Rapids: the permute is port-5 only and destroys a table register.)
    def q(n: Any, w: Any, jj: Any) -> Any:
        word = Wt(gq.weight, [n, w])
        shift = (jj * gq.bits).astype("uint32")
        return tirx.Cast("float32", tirx.bitwise_and(tirx.shift_right(word, shift), mask))

    t = te.compute(
        (M, i64(N), i64(kw // vl), i64(vl)),
        lambda m, n, wo, l: te.sum(q(n, wo * vl + l, j2) * xp(m, wo, j2, l), axis=j2),
        name="t",
    )
    wo_ax = te.reduce_axis((i64(0), i64(kw // vl)), name="wo")

    def scale(n: Any, w: Any) -> Any:
        s = Wt(gq.scale, [n, tirx.floordiv(w, gw)])
        return s if str(gq.scale.dtype) == "float32" else tirx.Cast("float32", s)

    rf = te.compute(
        (M, i64(N), i64(vl)),
        lambda m, n, l: te.sum(
            scale(n, wo_ax * vl + l) * (t(m, n, wo_ax, l) - xz(m, wo_ax * vl + l)), axis=wo_ax
        ),
        name="rf",
    )
    lr = te.reduce_axis((i64(0), i64(vl)), name="l")
    y = te.compute((M, i64(N)), lambda m, n: te.sum(rf(m, n, lr), axis=lr), name="y")
    out = _out_compute(info, tes, lambda m, n: y(m, n))
    func = _finish(info, tes, out)
    rows = _divisor(N, [rows, 4, 2, 1])
    return prefetch_rows_ahead(schedule_gemv_q(func, N, rows), rows, gq.weight.name, gq.scale.name,
                               prefetch_bytes=prefetch_bytes)


def schedule_gemv_q(func: Any, n: int, rows: int) -> Any:
    """``rows``: rows per parallel chunk, a divisor of ``n`` (the prefetch pass walks the same chunks)."""
    sch = s_tir.Schedule(func)
    xz, xp, t, rf, y, out = (sch.get_sblock(x) for x in ("xz", "xp", "t", "rf", "y", "out"))
    m, nn, l, wo = sch.get_loops(rf)
    no, ni = sch.split(nn, [None, rows])
    sch.reorder(no, m, wo, ni, l)
    sch.parallel(no)
    sch.reverse_compute_at(y, m)
    sch.reverse_compute_at(out, m)
    sch.compute_at(t, ni)
    tl = sch.get_loops(t)
    # t loops under ni: (l, j2) -> j2 outer (unrolled), l inner (vector)
    sch.reorder(tl[-1], tl[-2])
    tl = sch.get_loops(t)
    sch.vectorize(tl[-1])
    sch.unroll(tl[-2])
    sch.decompose_reduction(t, tl[-2])
    sch.vectorize(l)
    if rows > 1:
        sch.unroll(ni)
    init = sch.decompose_reduction(rf, wo)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(sch.get_loops(y)[-1])
    xl = sch.get_loops(xp)
    sch.vectorize(xl[-1])
    return sch.mod["main"]
