"""Recognizing a fused matmul PrimFunc, for any target's kernel generator.

A fused function after legalization looks like

    [producer blocks: dequantize / transpose / cast]  ->  one reduction C[m.., n] += x(m.., k) * w(n, k)
    ->  [epilogue blocks: residual add, bias add, cast]

``analyze`` inlines producers and epilogue chains with the schedule, then reads the reduction
block and splits its update into the activation factor x(m.., k) and the weight factor w(n, k)
(which may be a whole dequantization expression): ``MatmulInfo``. ``match_group_quant`` reads
a group-quantized weight factor (packed words, scales, zero point) out of w: ``GroupQuant``.
``x_value`` / ``epilogue_value`` rebuild the activation and the epilogue over a kernel's own
buffers. Used by the CPU kernels (``cpu_matmul``, ``cpu_qgemv_vnni``) and CUDA's dp4a GEMV.

The one matmul matcher: ``find_matmul_block`` recognizes the reduction block
``C[m.., n] += a * b`` on the function as written. ``analyze`` (for kernel generators that rewrite the
function) and ``cuda_schedule.match_gemv`` (for the GPU schedule, applied to the blocks in place) both
start from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tvm import s_tir, tirx
from tvm.ir import expr as ir_expr

from mlcbuild.compiler.kernels._tir_expr import HALF, Rewriter, as_int, dtype_of, loads_in, uses_var

DATA_PAR, COMM_REDUCE = 0, 2


def i64(v: Any) -> Any:
    return tirx.IntImm("int64", v) if isinstance(v, int) else v


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


@dataclass
class MatmulBlock:
    """The reduction block of a matmul PrimFunc as written (producers and epilogue still separate)."""

    sch: s_tir.Schedule
    blocks: list[Any]  # the root's child blocks
    index: int  # the reduction block's position among them
    stmt: Any  # the reduction block: C[m.., n] = C[m.., n] + a * b
    m_ivs: list[Any]
    n_iv: Any
    k_iv: Any


def find_matmul_block(func: Any) -> MatmulBlock:
    """The function's one reduction block, shaped as a matmul's; raise NotMatched otherwise."""
    try:
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(_root(sch))
    except Exception as err:  # noqa: BLE001  (not a schedulable function, e.g. already has loops bound)
        raise NotMatched(f"not schedulable: {err}") from None
    red = [i for i, b in enumerate(blocks) if _is_reduction(sch.get(b))]
    if len(red) != 1:
        raise NotMatched("needs exactly one reduction block")
    stmt = sch.get(blocks[red[0]])
    m_ivs, n_iv, k_iv = _matmul_axes(stmt)
    return MatmulBlock(sch, list(blocks), red[0], stmt, m_ivs, n_iv, k_iv)


def _matmul_axes(block: Any) -> tuple[list[Any], Any, Any]:
    """(m.. spatial axes, n axis, k axis) of a block that stores ``C[m.., n] = C[m.., n] + update``."""
    store = block.body
    if not isinstance(store, tirx.BufferStore) or len(block.writes) != 1:
        raise NotMatched("reduction body is not a single store")
    spatial = [iv for iv in block.iter_vars if int(iv.iter_type) == DATA_PAR]
    reduce = [iv for iv in block.iter_vars if int(iv.iter_type) == COMM_REDUCE]
    if len(reduce) != 1 or len(spatial) < 2:
        raise NotMatched("needs spatial (m.., n) and one reduction axis")
    # The store must index the output exactly by the spatial vars, in order.
    if len(store.indices) != len(spatial) or not all(i.same_as(iv.var) for i, iv in zip(store.indices, spatial)):
        raise NotMatched("reduction store is not indexed by its spatial vars")
    if not isinstance(store.value, tirx.Add):
        raise NotMatched("reduction update is not an addition")
    if not any(isinstance(side, ir_expr.TensorLoad) and side.source.same_as(store.buffer)
               for side in (store.value.a, store.value.b)):
        raise NotMatched("reduction update does not read its accumulator")
    return spatial[:-1], spatial[-1], reduce[0]


def analyze(func: Any) -> tuple[MatmulInfo, s_tir.Schedule]:
    """Recognize a (fused) matmul; raise NotMatched otherwise."""
    found = find_matmul_block(func)
    sch, blocks, index = found.sch, found.blocks, found.index
    red_name = found.stmt.name_hint
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

    block = sch.get(sch.get_sblock(red_name))  # with the producers inlined into its update
    m_ivs, n_iv, k_iv = _matmul_axes(block)
    store = block.body
    value = store.value
    acc, update = value.a, value.b
    if not (isinstance(acc, ir_expr.TensorLoad) and acc.source.same_as(store.buffer)):
        acc, update = update, acc
    prod = _strip_cast(update) if dtype_of(update) == dtype_of(_strip_cast(update)) else update
    if not isinstance(prod, tirx.Mul):
        raise NotMatched("reduction update is not a product")
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
        if len(evars) != len(m_ivs) + 1:
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


