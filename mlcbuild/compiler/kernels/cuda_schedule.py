"""CUDA schedules of our own for decode: dequantize + GEMV kernels that stream the weights.

What TVM's default rules did with our q4f16_1 decode (Llama-3-8B shape, measured on an H100 at
23 tok/s, ~97 GB/s of weights: 3% of HBM bandwidth): ``batch_decode`` has a symbolic batch, so
dlight's ``Matmul`` rule took every fused dequantize+matmul function and padded the batch of one
to its shared-memory tile. And our dequantize writes the float weight transposed (``[in, out]``,
read by a plain NN matmul), so dlight's ``LowBatchGEMV`` would see an outer reduction and read
the packed words uncoalesced.

``DequantGemv`` schedules those functions itself (``schedule_gemv``):

* the dequantized weight is laid out ``[out, in]`` again (an internal buffer, so this is free),
  so the reduction runs along the contiguous axis of the packed ``uint32`` words;
* ``ROWS_Y`` warps per block, ``ROWS_PER_WARP`` output rows per warp; the 32 lanes of a warp
  split the reduction, each lane a run of consecutive weights per step (4-bit at batch 1: up
  to 128 weights = four 16-byte loads per row, four quantization groups, four scales),
  dequantized in registers (``exact_int_to_float``: no int->float conversion instruction) and
  accumulated in float32 exactly as the model defines it (float32 product of the float16
  activation and the float16 dequantized weight);
* a warp-shuffle all-reduce sums the lanes; the epilogue (cast, residual add) is fused;
* a symbolic batch (``batch_decode``, short prefill chunks) is padded to a bucket held in
  registers; one function dispatches on the batch at run time (host side, as MLC LLM's
  ``LowBatchGemvSpecialize``): batch 1 -> bucket 1, <= 4 -> 4, <= 16 -> 8 (two row blocks), larger
  -> dlight's ``Matmul`` (prefill).

With ``integer_dot_batch1`` the batch-1 branch of 4-bit GEMVs is ``cuda_qgemv_dp4a``'s kernel
instead (integer dot products; off until timed on a GPU, see there); with ``decode_attention``
the KV cache's decode attention is ``cuda_attention``'s. Both are compile params (a recipe's
``kernels``), passed down explicitly.

(The float16 -> float32 casts in front of every norm are fused into it before this runs:
``compiler.fusion.FuseCastsIntoNorm``.)
``CUDASchedule(target, ...)`` is the schedule stage of the CUDA pipeline: both, then dlight's
rules for everything else. A GEMV schedule that fails on a function it matched is recorded (a
``ScheduleFallback``: logged, and listed by the compile stage in the node record and the bundle
manifest) and dlight schedules that function instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mlcbuild.bundle_format import ScheduleFallback

log = logging.getLogger(__name__)

# A note of which generation of kernels this is; the compile node's key covers this module's
# code itself (pipeline.code_digest), so forgetting to bump it rebuilds nothing stale.
CUDA_SCHEDULE_VERSION = "2"

# (largest batch, bucket) of the run-time dispatch of a symbolic batch; above the last one the
# function is a GEMM (prefill) and goes to dlight's Matmul.
BATCH_BUCKETS = ((1, 1), (4, 4), (16, 8))
WARP = 32  # lanes of a warp split the reduction axis
ROWS_Y = 4  # warps per block (threadIdx.y), one group of output rows each
ROWS_PER_WARP = 2  # output rows per warp: two independent weight streams per lane
UNROLL_STEPS = 4  # reduction steps unrolled at batch 1 (their loads in flight together)


@dataclass
class GemvMatch:
    """A fused ``C[m.., n] += x[m.., k] * W[n or k, k or n]`` (+ epilogue) function."""

    main: str  # the reduction block
    weight_producer: str | None  # the block computing W (dequantize), if inside the function
    transposed: bool  # W is indexed [k, n]
    n_extent: int
    k_extent: int
    batch_var: Any  # the symbolic extent among the m axes (None: all static)
    batch_static: int  # product of the static m extents


def CUDASchedule(target: Any, integer_dot_batch1: bool = False, decode_attention: bool = False,  # noqa: N802
                 fallbacks: list[ScheduleFallback] | None = None) -> Any:
    """Schedules every PrimFunc for a CUDA target: decode GEMVs with ``DequantGemv``, the rest with
    dlight (Matmul, GEMV, Reduction, GeneralReduction, Fallback).

    ``integer_dot_batch1``: batch-1 4-bit GEMVs on integer dot products (``cuda_qgemv_dp4a``)
    instead of the float kernel. Off until timed on a GPU: its numerics are tested here (CPU
    emulation of the same kernel text) and its sm_90 SASS has 1.6-2.0 instructions per weight
    against 7.0 for the float kernel (which is issue-bound), but no H100 has run it yet
    (``benchmarks/gpu_gemv_sweep.py --sweep dp4a`` times it and compares its outputs with the float
    kernel's, in one device call). ``decode_attention``: the KV cache's decode attention kernel
    replaced by ``cuda_attention``'s (all rows' loads in flight instead of 16 rows per dependent
    step); off until timed on a GPU, like the above. ``fallbacks`` collects the GEMV schedules
    that failed (see the module doc)."""
    import tvm

    passes = [DequantGemv(target, integer_dot_batch1, fallbacks), _default_rules()]
    if decode_attention:
        from mlcbuild.compiler.kernels.cuda_attention import ReplaceDecodeAttention

        passes.insert(0, ReplaceDecodeAttention())
    return tvm.transform.Sequential(passes, name="CUDASchedule")


def _default_rules() -> Any:
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(
        _matmul_rule(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
    )


def _matmul_rule() -> Any:
    """dlight's Matmul without its Metal simdgroup path: that path's Tensorize segfaults in TVM 0.27
    on our fused matmuls as the CUDA tensor-core one does (see ``dlight.do_not_tensorize``), so
    Metal gets the tiled shared-memory schedule every other GPU gets (dlight picks the same generic
    tiling for Metal and Vulkan)."""
    import tvm
    from tvm.s_tir import dlight as dl

    class Matmul(dl.gpu.Matmul):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:  # type: ignore[override]
            if target.kind.name == "metal":
                target = tvm.target.Target({"kind": "vulkan", "max_threads_per_block": int(target.max_num_threads),
                                            "max_shared_memory_per_block": int(target.attrs["max_shared_memory_per_block"]),
                                            "thread_warp_size": int(target.thread_warp_size)})
            return super().apply(func, target, tunable)

    return Matmul()


def DequantGemv(target: Any, integer_dot_batch1: bool = False,  # noqa: N802
                fallbacks: list[ScheduleFallback] | None = None) -> Any:
    """Schedule the matmul-like PrimFuncs ``match_gemv`` recognizes (see the module doc). A
    function it matched but failed to schedule is logged, added to ``fallbacks`` and left to
    dlight."""
    import tvm
    from tvm import tirx

    from mlcbuild.compiler.kernels._tir_expr import is_scheduled

    @tvm.transform.module_pass(opt_level=0, name="DequantGemv")
    def apply(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            try:
                scheduled = schedule_decode_function(func, target, integer_dot_batch1)
            except Exception as err:  # noqa: BLE001  (recorded; dlight schedules it instead)
                fallback = ScheduleFallback.from_error(gvar.name_hint, "dequant-gemv", err)
                # a warning unless the caller collects them (the compile stage warns about each itself)
                log.log(logging.WARNING if fallbacks is None else logging.INFO, "cuda schedule: %s", fallback.describe())
                if fallbacks is not None:
                    fallbacks.append(fallback)
                continue
            if scheduled is not None:
                mod[gvar] = scheduled
        return mod

    return apply


def schedule_decode_function(func: Any, target: Any, integer_dot_batch1: bool = False) -> Any | None:
    """The function scheduled as a GEMV (dispatching on a symbolic batch), or None when it is
    not a matmul this rule handles (or its batch is too large: left to dlight). Raises when the
    rule applies and fails. ``integer_dot_batch1``: see ``CUDASchedule``."""
    from tvm import s_tir, tirx

    match = match_gemv(func)
    if match is None:
        return None
    single_row = integer_dot_kernel(func) if integer_dot_batch1 else None
    # WGSL has no 16-bit integers to reinterpret as f16 (u16 does not exist there): plain casts.
    func = exact_int_to_float(func, int16=target.kind.name != "webgpu")
    if match.batch_var is None:
        if match.batch_static > BATCH_BUCKETS[-1][0]:
            return None
        if single_row is not None and match.batch_static == 1:
            return single_row.with_attr("tirx.is_scheduled", True)
        return schedule_gemv(func, target, match, bucket=match.batch_static)
    branches = []
    for limit, bucket in BATCH_BUCKETS:
        if bucket == 1 and single_row is not None:
            branches.append((limit, single_row))
            continue
        scheduled = schedule_gemv(func, target, match, bucket=bucket)
        if scheduled is None:
            return None
        branches.append((limit, scheduled))
    fallback = _schedule_with_default_rules(func, target)
    if fallback is None:
        return None
    body = fallback.body
    for limit, scheduled in reversed(branches):
        cond = tirx.op.tvm_thread_invariant(match.batch_var <= limit)
        body = tirx.IfThenElse(cond, scheduled.body, body)
    body = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", body))
    return (
        func.with_body(body)
        .with_attr("tirx.is_scheduled", True)
        .with_attr("tirx.HoistIfThenElseExprWithBlock", 1)
    )


def integer_dot_kernel(func: Any) -> Any | None:
    """``func`` (unscheduled, before ``exact_int_to_float``) with ``cuda_qgemv_dp4a``'s kernel as
    its body, or None where that kernel does not apply."""
    from mlcbuild.compiler.kernels import cuda_qgemv_dp4a, matmul_analysis

    try:
        info, _ = matmul_analysis.analyze(func)
        kernel = cuda_qgemv_dp4a.build(info, matmul_analysis.match_group_quant(info), bound=True)
    except matmul_analysis.NotMatched:
        return None
    return func.with_body(kernel.body)


def _schedule_with_default_rules(func: Any, target: Any) -> Any | None:
    import tvm

    from mlcbuild.compiler.kernels._tir_expr import is_scheduled

    # TVM 0.27's tensor-core path of dlight's Matmul segfaults on our fused f16 matmuls (see
    # compile._pipeline): keep its tiled shared-memory schedule without tensor cores.
    mod = tvm.IRModule({"main": func.with_attr("dlight.do_not_tensorize", True)})
    with target:
        mod = _default_rules()(mod)
    scheduled = mod["main"]
    return scheduled if is_scheduled(scheduled) else None


# ---- matching --------------------------------------------------------------------------------


def match_gemv(func: Any) -> GemvMatch | None:
    """``matmul_analysis.find_matmul_block``'s matmul ``C[m.., n] += cast(x[m.., k]) * cast(W[n, k])``
    whose W is a function parameter or computed by one spatial block (the dequantization), followed
    by elementwise blocks only: what this GEMV schedule handles."""
    from tvm import tirx

    from mlcbuild.compiler.kernels import matmul_analysis
    from mlcbuild.compiler.kernels._tir_expr import as_int

    try:
        found = matmul_analysis.find_matmul_block(func)
    except matmul_analysis.NotMatched:
        return None
    stmts = [found.sch.get(b) for b in found.blocks]
    main_i, main = found.index, found.stmt
    k, n = found.k_iv.var, found.n_iv.var
    k_extent = as_int(found.k_iv.dom.extent)
    if k_extent is None:
        return None
    body = main.body
    # The weight: a 2-D read indexed by exactly (n, k); the activation: the other read, whose
    # last index is k and whose other indices are the m axes.
    weight, transposed, x = None, False, None
    for region in main.reads:
        mins = [r.min for r in region.region]
        if region.source.same_as(body.buffer):
            continue
        if len(mins) == 2 and all(isinstance(e, tirx.Var) for e in mins) and _same_vars(mins, [n, k]):
            weight, transposed = region.source, mins[0].same_as(k)
        elif mins and isinstance(mins[-1], tirx.Var) and mins[-1].same_as(k):
            x = region.source
    operands = [r for r in main.reads if not r.source.same_as(body.buffer)]
    if weight is None or x is None or len(operands) != 2:
        return None
    producers = [i for i, s in enumerate(stmts[:main_i]) if any(w.source.same_as(weight) for w in s.writes)]
    others_before = [i for i in range(main_i) if i not in producers]
    if len(producers) > 1 or others_before:
        return None
    producer = stmts[producers[0]].name_hint if producers else None
    if producer is None and transposed:
        return None  # a parameter laid out [k, n]: the reduction is not along contiguous memory
    n_extent = None
    batch_var, batch_static = None, 1
    for iv in main.iter_vars:
        if iv.var.same_as(n):
            n_extent = as_int(iv.dom.extent)
        elif not _is_reduce(iv):
            extent = as_int(iv.dom.extent)
            if extent is not None:
                batch_static *= extent
            elif batch_var is None and isinstance(iv.dom.extent, tirx.Var):
                batch_var = iv.dom.extent
            else:
                return None
    if n_extent is None:
        return None
    return GemvMatch(main.name_hint, producer, transposed, n_extent, k_extent, batch_var, batch_static)


def _same_vars(a: list[Any], b: list[Any]) -> bool:
    return any(all(x.same_as(y) for x, y in zip(a, perm)) for perm in (b, b[::-1]))


def _is_reduce(iv: Any) -> bool:
    from tvm import tirx

    return iv.iter_type == tirx.IterVar.CommReduce


# ---- the schedule ----------------------------------------------------------------------------


def _reduction_split(k_extent: int, bucket: int) -> tuple[int, int] | None:
    """(lanes along k, consecutive weights per lane per step). At batch 1 a step is one 16-byte
    load per lane (32 4-bit weights) at consecutive addresses across the warp, with
    ``_unroll_steps`` steps in flight; measured on an H100 over the Llama-3-8B projections, this
    read 1.72 TB/s against 1.41 TB/s for 128-weight runs per lane (64-byte strides between
    lanes). With a bigger batch bucket the per-lane activation tile (bucket x run) must stay in
    registers."""
    runs = (32, 16, 8, 4, 2, 1) if bucket <= 4 else (16, 8, 4, 2, 1)
    for lanes in (WARP, 16, 8, 4, 2, 1):
        for run in runs:
            if k_extent % (lanes * run) == 0:
                return lanes, run
    return None


def _unroll_steps(bucket: int) -> int:
    """Reduction steps unrolled (their loads in flight together); fewer for wide buckets, whose
    activation tiles take the registers."""
    return UNROLL_STEPS if bucket == 1 else 2


def schedule_gemv(func: Any, target: Any, match: GemvMatch, bucket: int) -> Any | None:
    """Schedule ``func`` (matched by ``match_gemv``) for a batch padded to ``bucket`` rows; None
    when its reduction does not split over a warp. A failure of the schedule itself raises (the
    caller records it: a matched function that falls back to dlight is a slower kernel)."""
    from tvm import s_tir

    split = _reduction_split(match.k_extent, bucket)
    if split is None:
        return None
    sch = s_tir.Schedule(func)
    _schedule(sch, match, bucket, *split, max_lanes=max_vector_lanes(target))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def max_vector_lanes(target: Any) -> int:
    """The widest vector the target's shading language has: 4 (Metal's half4/float4, WGSL's vec4,
    SPIR-V without extensions); CUDA, ROCm and OpenCL take 16-byte vectors of any element (half8)."""
    return 4 if target.kind.name in ("metal", "webgpu", "vulkan") else 16


def _schedule(sch: Any, match: GemvMatch, bucket: int, lanes: int, vk: int, max_lanes: int = 16) -> None:
    from mlcbuild.compiler.kernels._tir_expr import as_int

    main = sch.get_sblock(match.main)
    producer = sch.get_sblock(match.weight_producer) if match.weight_producer else None
    if producer is not None and match.transposed:
        sch.transform_layout(producer, ("write", 0), lambda a, b: (b, a))
    n_iters = len(sch.get(main).iter_vars)
    padded = match.batch_var is not None and bucket > 1
    if padded:
        sch.pad_einsum(main, [bucket if not _is_reduce(iv) and as_int(iv.dom.extent) is None else 1
                              for iv in sch.get(main).iter_vars])
    # After padding: [x_pad], main, [C -> C_unpadded], epilogue... ; inline the epilogue chain
    # into its last block so that one block writes the output.
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    main_pos = names.index(match.main)
    x_pad = None
    if padded:
        pads = [b for b, name in zip(blocks[:main_pos], names[:main_pos]) if name != match.weight_producer]
        if len(pads) != 1:
            raise ValueError("expected one padded activation")
        x_pad = pads[0]
    epilogue = blocks[main_pos + 1 :]
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    epilogue = epilogue[-1] if epilogue else None

    # Main loop nest: [m..., n, k] -> by (batch buckets), bx (row groups), ty, rows, ko, tx, vk, bi
    loops = sch.get_loops(main)
    if len(loops) != n_iters:
        raise ValueError("unexpected loop nest")
    *m_loops, n_loop, k_loop = loops
    m = sch.fuse(*m_loops) if len(m_loops) > 1 else m_loops[0]
    by, bi = sch.split(m, [None, bucket])
    rows = ROWS_PER_WARP if match.n_extent % (ROWS_Y * ROWS_PER_WARP) == 0 else 1
    rows_y = ROWS_Y if match.n_extent % (ROWS_Y * rows) == 0 else 1
    bx, ty, tile_n = sch.split(n_loop, [None, rows_y, rows])
    steps = match.k_extent // (lanes * vk)
    unrolled = next(u for u in (_unroll_steps(bucket), 4, 2, 1) if steps % u == 0)
    ko, ku, tx, kv = sch.split(k_loop, [None, unrolled, lanes, vk])
    sch.reorder(by, bx, ty, ko, ku, tx, tile_n, kv, bi)
    rf = sch.rfactor(tx, 0)
    by, bx, ty, ko, ku, tx, tile_n, kv, bi = sch.get_loops(rf)
    sch.reorder(tx, ko, ku)
    sch.bind(by, "blockIdx.y")
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.set_scope(rf, 0, "local")
    # Unrolled steps let the compiler issue several steps' loads before their arithmetic
    # (bytes in flight per warp: what a memory-bound kernel needs).
    sch.unroll(ku)
    sch.unroll(tile_n)
    sch.unroll(kv)
    sch.unroll(bi)

    # Operands of one step into registers: the packed words (one vector load), the scales and the
    # activation tile; the weights are dequantized there and never written to memory.
    if producer is not None:
        sch.compute_at(producer, ku, preserve_unit_loops=True)
        sch.set_scope(producer, 0, "local")
        for loop in sch.get_loops(producer)[-2:]:
            sch.unroll(loop)
        for index in range(len(sch.get(producer).reads)):
            _cache_operand(sch, producer, index, ku, max_lanes)
    else:
        _cache_operand(sch, rf, _read_index(sch, rf, weight=True), ku, max_lanes)
    if x_pad is not None:
        sch.compute_at(x_pad, ku, preserve_unit_loops=True)
        sch.set_scope(x_pad, 0, "local")
        _vectorize_inner(sch, x_pad, max_lanes)
    else:
        _cache_operand(sch, rf, _read_index(sch, rf, weight=False), ku, max_lanes)
    sch.decompose_reduction(rf, ko)

    # Cross-lane sum (warp shuffles), then the epilogue, both per block of rows.
    sch.reverse_compute_at(main, bx, preserve_unit_loops=True)
    # reverse_compute_at makes one loop per block iter, in their order: [lanes (reduce), m.., n]
    lane_loop, *m_loops, n_loop = sch.get_loops(main)[2:]
    ty, tile_n = sch.split(n_loop, [rows_y, rows])
    sch.reorder(ty, tile_n, *m_loops, lane_loop)
    sch.bind(ty, "threadIdx.y")
    sch.bind(lane_loop, "threadIdx.x")
    if epilogue is not None:
        sch.set_scope(main, 0, "local")
        sch.reverse_compute_at(epilogue, bx, preserve_unit_loops=True)
        # (the batch loops stay outside: padded rows are masked by a predicate on them)
        ty, _ = sch.split(sch.get_loops(epilogue)[-1], [rows_y, rows])
        sch.bind(ty, "threadIdx.y")


def _read_index(sch: Any, block: Any, weight: bool) -> int:
    """Index among the block's reads of the weight (2-D) or the activation."""
    stmt = sch.get(block)
    out = stmt.writes[0].source
    candidates = [i for i, r in enumerate(stmt.reads) if not r.source.same_as(out)]
    for i in candidates:
        if (len(stmt.reads[i].source.shape) == 2) == weight:
            return i
    raise ValueError("operand not found")


def _cache_operand(sch: Any, block: Any, index: int, at: Any, max_lanes: int) -> None:
    cached = sch.cache_read(block, index, "local")
    sch.compute_at(cached, at, preserve_unit_loops=True)
    _vectorize_inner(sch, cached, max_lanes)


def _vectorize_inner(sch: Any, block: Any, max_lanes: int) -> None:
    """Vectorize the innermost copy loop in vectors of up to 16 bytes and ``max_lanes`` elements
    (unroll it otherwise)."""
    from tvm import tirx

    loop = sch.get_loops(block)[-1]
    extent = sch.get(loop).extent
    bits = _dtype_bits(str(sch.get(block).writes[0].source.dtype))
    if isinstance(extent, tirx.IntImm):
        lanes = int(extent)
        limit = max(1, min(128 // bits, max_lanes))
        while lanes > limit and lanes % 2 == 0:
            lanes //= 2
        if 1 < lanes <= limit and lanes & (lanes - 1) == 0:
            if lanes != int(extent):
                _, loop = sch.split(loop, [None, lanes])
            sch.vectorize(loop)
            return
        sch.unroll(loop)


def _dtype_bits(dtype: str) -> int:
    digits = "".join(ch for ch in dtype if ch.isdigit())
    return int(digits) if digits else 32


# ---- exact integer -> float conversion of the quantized values ---------------------------------

# float(q) for a small unsigned integer q, without a conversion instruction (I2F runs at a quarter
# of the FP32 rate and is the bottleneck of a 4-bit GEMV): the bits of MAGIC[dtype] | q read as a
# float are exactly MAGIC_VALUE + q, so float(q) - c == (MAGIC | q as float) - (MAGIC_VALUE + c).
_MAGIC = {"float16": (0x6400, 1024.0, "uint16", 1 << 10), "float32": (0x4B000000, 8388608.0, "uint32", 1 << 23)}


def exact_int_to_float(func: Any, int16: bool = True) -> Any:
    """Rewrite ``cast(float, q & mask) - c`` in the dequantize blocks of ``func`` (a legalized,
    unscheduled PrimFunc) into the bit-trick form above; the values are bit-identical. ``int16``:
    the target has 16-bit integers (the f16 form goes through one); without, f16 casts stay."""
    from tvm import tirx

    from mlcbuild.compiler.kernels._tir_expr import map_stores

    def rewrite(block: str, store: Any) -> Any:
        value = _magic_dequantize(store.value, int16) if block.startswith("dequantize") else None
        return store if value is None else tirx.BufferStore(store.buffer, value, store.indices)

    return map_stores(func, rewrite)


def _magic_dequantize(value: Any, int16: bool = True) -> Any | None:
    """(cast(F, q & mask) - c) * scale  ->  (reinterpret(F, MAGIC | (q & mask)) - (MAGIC_VALUE + c)) * scale"""
    from tvm import tirx
    from tvm.ir.prim import expr as pe

    scale = None
    if isinstance(value, pe.Mul):
        value, scale = value.a, value.b
    if not (isinstance(value, pe.Sub) and isinstance(value.a, pe.Cast) and isinstance(value.b, pe.FloatImm)):
        return None
    dtype = str(value.a.ty)
    bits = value.a.value
    if dtype not in _MAGIC or str(bits.ty) != "uint32" or not isinstance(bits, pe.BitwiseAnd):
        return None
    if not (isinstance(bits.b, pe.IntImm) and 0 <= int(bits.b.value) < _MAGIC[dtype][3]):
        return None
    offset = float(value.b.value)
    if offset != int(offset) or not 0 <= offset < _MAGIC[dtype][3]:
        return None
    magic, magic_value, storage, _ = _MAGIC[dtype]
    if storage == "uint16" and not int16:
        return None
    word = tirx.bitwise_or(bits, tirx.const(magic, "uint32"))
    as_float = tirx.reinterpret(dtype, word if storage == "uint32" else word.astype(storage))
    out = as_float - tirx.const(magic_value + offset, dtype)
    return out if scale is None else out * scale
