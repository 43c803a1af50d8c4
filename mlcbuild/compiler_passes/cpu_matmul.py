"""Matmul-like PrimFuncs on CPU: decode GEMV and prefill GEMM, regenerated from their TE form.

A fused function after legalization looks like

    [producer blocks: dequantize / transpose / cast]  ->  one reduction C[m.., n] += x(m.., k) * w(n, k)
    ->  [epilogue blocks: residual add, bias add, cast]

``analyze`` inlines producers and epilogue chains with the schedule, then reads the reduction
block and splits its update into the activation factor x(m.., k) and the weight factor w(n, k)
(which may be a whole dequantization expression). ``build_gemv`` / ``build_gemm`` rebuild the
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

from dataclasses import dataclass, field
from typing import Any

import tvm
from tvm import s_tir, te, tirx
from tvm.ir import expr as ir_expr

from mlcbuild.compiler_passes._tir_expr import HALF, Rewriter, as_int, dtype_of, loads_in, uses_var

DATA_PAR, COMM_REDUCE = 0, 2


class NotMatched(Exception):
    """The function is not a matmul this module handles."""


@dataclass
class MatmulInfo:
    func: Any
    params: list[Any]  # original parameter buffers, in order
    out: Any  # the buffer the function writes (last param)
    red_buf: Any  # buffer the reduction writes (== out without epilogue)
    m_vars: list[Any]  # reduction block spatial vars except n
    m_extents: list[Any]
    n_var: Any
    n_extent: int
    k_var: Any
    k_extent: int
    x_expr: Any  # activation factor (uses m_vars, k_var)
    w_expr: Any  # weight factor (uses n_var, k_var)
    epi_vars: list[Any] = field(default_factory=list)
    epi_expr: Any = None  # epilogue value (reads red_buf at epi_vars), None: plain store
    dyn_m: bool = False  # some m extent is symbolic
    seq_like: bool = False  # the symbolic m extent is a sequence axis (prefill)


def _root(sch: s_tir.Schedule) -> Any:
    return sch.get_sblock("root")


def _is_reduction(block: Any) -> bool:
    return any(int(iv.iter_type) == COMM_REDUCE for iv in block.iter_vars)


def _strip_cast(e: Any) -> Any:
    while isinstance(e, tirx.Cast):
        e = e.value
    return e


def analyze(func: Any) -> tuple[MatmulInfo, s_tir.Schedule]:
    """Recognize a (fused) matmul; raise NotMatched otherwise."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(_root(sch))
    red = [b for b in blocks if _is_reduction(sch.get(b))]
    if len(red) != 1:
        raise NotMatched("needs exactly one reduction block")
    red_name = sch.get(red[0]).name_hint
    index = [sch.get(b).name_hint for b in blocks].index(red_name)
    # Inline every producer (dequantize, transpose, casts) into the reduction.
    for b in blocks[:index]:
        try:
            sch.compute_inline(b)
        except Exception as err:  # noqa: BLE001
            raise NotMatched(f"cannot inline producer {sch.get(b).name_hint}: {err}") from None
    # Collapse the epilogue chain into its last block.
    epilogue = blocks[index + 1 :]
    for b in epilogue[:-1]:
        try:
            sch.compute_inline(b)
        except Exception as err:  # noqa: BLE001
            raise NotMatched(f"cannot inline epilogue {sch.get(b).name_hint}: {err}") from None
    if len(sch.get_child_blocks(_root(sch))) > 2:
        raise NotMatched("unexpected block structure")

    block = sch.get(sch.get_sblock(red_name))
    store = block.body
    if not isinstance(store, tirx.BufferStore):
        raise NotMatched("reduction body is not a single store")
    spatial = [iv for iv in block.iter_vars if int(iv.iter_type) == DATA_PAR]
    reduce = [iv for iv in block.iter_vars if int(iv.iter_type) == COMM_REDUCE]
    if len(reduce) != 1 or len(spatial) < 2:
        raise NotMatched("needs spatial (m.., n) and one reduction axis")
    # The store must index the output exactly by the spatial vars, in order.
    if len(store.indices) != len(spatial) or not all(i.same_as(iv.var) for i, iv in zip(store.indices, spatial)):
        raise NotMatched("reduction store is not indexed by its spatial vars")
    value = store.value
    if not isinstance(value, tirx.Add):
        raise NotMatched("reduction update is not an addition")
    acc, update = value.a, value.b
    if not (isinstance(acc, ir_expr.TensorLoad) and acc.source.same_as(store.buffer)):
        acc, update = update, acc
    if not (isinstance(acc, ir_expr.TensorLoad) and acc.source.same_as(store.buffer)):
        raise NotMatched("reduction update does not read its accumulator")
    prod = _strip_cast(update) if dtype_of(update) == dtype_of(_strip_cast(update)) else update
    if not isinstance(prod, tirx.Mul):
        raise NotMatched("reduction update is not a product")
    n_iv, k_iv = spatial[-1], reduce[0]
    m_ivs = spatial[:-1]
    a, b = prod.a, prod.b

    def is_weight(e: Any) -> bool:
        return not any(uses_var(e, iv.var) for iv in m_ivs) and uses_var(e, n_iv.var)

    def is_act(e: Any) -> bool:
        return not uses_var(e, n_iv.var)

    if is_weight(b) and is_act(a):
        x_expr, w_expr = a, b
    elif is_weight(a) and is_act(b):
        x_expr, w_expr = b, a
    else:
        raise NotMatched("cannot split the product into activation x weight")
    if not uses_var(x_expr, k_iv.var) or not uses_var(w_expr, k_iv.var):
        raise NotMatched("factors do not both depend on k")
    out_dtype = str(store.buffer.dtype)
    if out_dtype not in HALF + ("float32",):
        raise NotMatched(f"accumulator dtype {out_dtype}")
    n_extent = as_int(n_iv.dom.extent)
    k_extent = as_int(k_iv.dom.extent)
    if n_extent is None or k_extent is None:
        raise NotMatched("n and k must be static")
    params = list(func.params)
    info = MatmulInfo(
        func=func,
        params=params,
        out=params[-1],
        red_buf=store.buffer,
        m_vars=[iv.var for iv in m_ivs],
        m_extents=[iv.dom.extent for iv in m_ivs],
        n_var=n_iv.var,
        n_extent=n_extent,
        k_var=k_iv.var,
        k_extent=k_extent,
        x_expr=x_expr,
        w_expr=w_expr,
    )
    rest = sch.get_child_blocks(_root(sch))
    if len(rest) == 2:
        epi = sch.get(rest[1])
        est = epi.body
        if not isinstance(est, tirx.BufferStore) or _is_reduction(epi):
            raise NotMatched("epilogue is not a single elementwise store")
        evars = [iv.var for iv in epi.iter_vars]
        if len(est.indices) != len(evars) or not all(i.same_as(v) for i, v in zip(est.indices, evars)):
            raise NotMatched("epilogue store is not indexed by its vars")
        if len(evars) != len(spatial):
            raise NotMatched("epilogue rank differs from the matmul")
        for ld in loads_in(est.value):
            if ld.source.same_as(store.buffer) and not all(i.same_as(v) for i, v in zip(ld.indices, evars)):
                raise NotMatched("epilogue reads the matmul result elsewhere than its own index")
        info.epi_vars, info.epi_expr = evars, est.value
        if not est.buffer.same_as(info.out):
            raise NotMatched("epilogue does not write the last parameter")
    elif not store.buffer.same_as(info.out):
        raise NotMatched("matmul does not write the last parameter")
    written = [b for b in params if b.same_as(info.out)]
    if len(written) != 1:
        raise NotMatched("output buffer")
    dyn = [e for e in info.m_extents if as_int(e) is None]
    info.dyn_m = bool(dyn)
    if dyn:
        # [1, seq_len, K] (prefill) vs [batch, 1, K] (decode): the sequence axis is the last m axis.
        last = info.m_extents[-1]
        info.seq_like = as_int(last) is None and "batch" not in str(last)
    return info, sch


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


def _m_total(info: MatmulInfo) -> Any:
    total = i64(1)
    for e in info.m_extents:
        total = total * e
    return total


def _unravel(info: MatmulInfo, m: Any) -> list[Any]:
    """Flat row index -> the original m indices (axes of extent 1 get index 0)."""
    exts = info.m_extents
    live = [i for i, e in enumerate(exts) if as_int(e) != 1]
    idx: list[Any] = [i64(0)] * len(exts)
    rest = m
    for pos, i in enumerate(live):
        inner = i64(1)
        for j in live[pos + 1 :]:
            inner = inner * exts[j]
        if pos == len(live) - 1:
            idx[i] = rest
        else:
            idx[i] = tirx.floordiv(rest, inner)
            rest = tirx.floormod(rest, inner)
    return idx


def _ravel(info: MatmulInfo, idx: list[Any]) -> Any:
    m = i64(0)
    for i, e in zip(idx, info.m_extents):
        if as_int(e) == 1:
            continue
        m = m * e + i
    return m


def x_value(info: MatmulInfo, load: Any, m: Any, k: Any) -> Any:
    """The activation factor at flat row ``m`` and ``k``, in float32, reading through ``load``
    (``(buffer, indices) -> expr``: the kernel's own buffers for the function's parameters)."""
    vm = dict(zip(info.m_vars, _unravel(info, m)))
    vm[info.k_var] = k
    v = Rewriter(vm, load, promote=True)(info.x_expr)
    return v if dtype_of(v) == "float32" else tirx.Cast("float32", v)


def epilogue_value(info: MatmulInfo, load: Any, value: Any, idx: list[Any]) -> Any:
    """What the function stores at output index ``idx`` (m.., n) given the reduction's ``value``
    there: the epilogue (cast, residual add, ...) applied, in the output's dtype."""
    v = value
    if info.epi_expr is not None:
        red = info.red_buf

        def epi_load(buf: Any, bidx: list[Any]) -> Any:
            return value if buf.same_as(red) else load(buf, bidx)

        v = Rewriter(dict(zip(info.epi_vars, idx)), epi_load, promote=True)(info.epi_expr)
    dtype = str(info.out.dtype)
    return v if dtype_of(v) == dtype else tirx.Cast(dtype, v)


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


def i64(v: Any) -> Any:
    return tirx.IntImm("int64", v) if isinstance(v, int) else v


def _divisor(n: int, choices: list[int]) -> int:
    for c in choices:
        if n % c == 0:
            return c
    return 1


# ---- GEMV ---------------------------------------------------------------------------------------


def build_gemv(info: MatmulInfo, lanes: int, rows: int = 4) -> Any:
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
    return schedule_gemv(func, N, rows, sequential_rows=row_bytes < SEQUENTIAL_ROW_BYTES)


# Rows shorter than this are read one after another (one accumulator chain per row) instead of
# interleaved: four interleaved 1-2 KB streams restart the hardware prefetcher at every row group.
# Measured with weights far larger than the L3 (2 threads): float16 rows of 576 (1152 B) 14-17 ->
# 22-23 GB/s, float32 rows of 576 (2304 B) 23-26 -> 27-29 GB/s; rows of 1536 (3-6 KB) are faster
# interleaved (float16 17.6-18.7 vs 14.4-15.7 GB/s).
SEQUENTIAL_ROW_BYTES = 3072


def schedule_gemv(func: Any, n: int, rows: int, sequential_rows: bool = False) -> Any:
    sch = s_tir.Schedule(func)
    rows = _divisor(n, [rows, 4, 2, 1])
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


@dataclass
class GroupQuant:
    weight: Any  # uint32 buffer [N, words]
    scale: Any  # float buffer [N, groups]
    per_word: int
    bits: int
    group: int
    zero: float


def _match_imm(e: Any) -> float | None:
    e = _strip_cast(e)
    if isinstance(e, (tirx.IntImm, tirx.FloatImm)):
        return float(e.value)
    return None


def match_group_quant(info: MatmulInfo) -> GroupQuant | None:
    """w(n, k) == (cast((W[n, k // P] >> (k % P * bits)) & mask) - zero) * S[n, k // G] ?"""
    e = info.w_expr
    while isinstance(e, tirx.Cast):
        e = e.value
    if not isinstance(e, tirx.Mul):
        return None
    for deq, sload in ((e.a, e.b), (e.b, e.a)):
        sload = _strip_cast(sload)
        if not isinstance(sload, ir_expr.TensorLoad) or not isinstance(_strip_cast(deq), tirx.Sub):
            continue
        sub = _strip_cast(deq)
        zero = _match_imm(sub.b)
        band = _strip_cast(sub.a)
        if zero is None or not isinstance(band, tirx.BitwiseAnd):
            continue
        mask = _match_imm(band.b)
        shr = band.a
        if mask is None or not isinstance(shr, tirx.RShift):
            continue
        wload = shr.a
        if not isinstance(wload, ir_expr.TensorLoad) or str(wload.source.dtype) != "uint32":
            continue
        bits = int(mask + 1).bit_length() - 1
        if (1 << bits) - 1 != int(mask):
            continue
        k, n = info.k_var, info.n_var
        # indices: W[n, k // P], S[n, k // G]; shift amount (k % P) * bits
        if len(wload.indices) != 2 or len(sload.indices) != 2:
            continue
        if not (wload.indices[0].same_as(n) and sload.indices[0].same_as(n)):
            continue
        wi, si = wload.indices[1], sload.indices[1]
        if not (isinstance(wi, tirx.FloorDiv) and wi.a.same_as(k) and isinstance(si, tirx.FloorDiv) and si.a.same_as(k)):
            continue
        per_word, group = as_int(wi.b), as_int(si.b)
        sh = _strip_cast(shr.b)
        if not (isinstance(sh, tirx.Mul) and isinstance(sh.a, tirx.FloorMod) and sh.a.a.same_as(k)):
            continue
        if as_int(sh.a.b) != per_word or as_int(sh.b) != bits:
            continue
        if per_word is None or group is None or per_word * bits > 32 or group % per_word:
            continue
        return GroupQuant(wload.source, sload.source, per_word, bits, group, zero)
    return None


def build_gemv_q(info: MatmulInfo, gq: GroupQuant, lanes: int, rows: int = 4) -> Any:
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
    return schedule_gemv_q(func, N, rows)


def schedule_gemv_q(func: Any, n: int, rows: int) -> Any:
    sch = s_tir.Schedule(func)
    rows = _divisor(n, [rows, 4, 2, 1])
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
