"""CPU rules for everything that is not a matmul: elementwise chains and row reductions
(rms_norm, softmax, ...). Parallel over rows only where there is enough work to pay for a
thread-pool launch (a few microseconds); vectorized over the innermost axis."""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx

from mlcbuild.compiler.kernels._tir_expr import as_int, loads_in

DATA_PAR, COMM_REDUCE = 0, 2
# Below this many elements a kernel runs on the calling thread: waking the pool costs more.
PARALLEL_MIN_ELEMENTS = 1 << 15


def _extent(sch: s_tir.Schedule, loop: Any) -> Any:
    return sch.get(loop).extent


def _is_seq_extent(e: Any) -> bool:
    """A symbolic extent that grows with the prompt (prefill) rather than the batch (decode)."""
    return as_int(e) is None and "batch" not in str(e)


def _worth_parallel(sch: s_tir.Schedule, loops: list[Any]) -> bool:
    total = 1
    for lp in loops:
        e = _extent(sch, lp)
        v = as_int(e)
        if v is None:
            if not _is_seq_extent(e):
                return False
            v = 128  # a typical prefill chunk
        total *= v
    return total >= PARALLEL_MIN_ELEMENTS


def _vectorize_inner(sch: s_tir.Schedule, block: Any, lanes: int) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    ext = as_int(_extent(sch, inner))
    if ext is None:
        return
    if ext % lanes == 0 and ext > lanes:
        _, vec = sch.split(inner, [None, lanes])
        sch.vectorize(vec)
    elif ext <= lanes and ext >= 2:
        sch.vectorize(inner)


def simple_blocks(sch: s_tir.Schedule) -> list[Any] | None:
    """The root's child blocks if every one is a plain store at affine indices (no nested blocks,
    no data-dependent writes such as the KV-cache page scatter); else None."""
    from tvm.ir import expr as ir_expr

    root = sch.get_sblock("root")
    if sch.get(root).alloc_buffers is None:
        return None
    blocks = sch.get_child_blocks(root)
    for b in blocks:
        blk = sch.get(b)
        store = blk.body
        if not isinstance(store, tirx.BufferStore) or len(blk.match_buffers) or len(blk.alloc_buffers):
            return None
        for idx in store.indices:
            if loads_in(idx) or isinstance(idx, ir_expr.TensorLoad):
                return None
    return blocks


def _is_reduction_block(sch: s_tir.Schedule, block: Any) -> bool:
    return any(int(iv.iter_type) == COMM_REDUCE for iv in sch.get(block).iter_vars)


def _all_data_par(sch: s_tir.Schedule, block: Any) -> bool:
    return all(int(iv.iter_type) == DATA_PAR for iv in sch.get(block).iter_vars)


def _inline_all(sch: s_tir.Schedule, blocks: list[Any]) -> list[Any]:
    """Inline spatial blocks as far as possible (producers into consumers, then consumers into
    producers); return the blocks left."""
    changed = True
    while changed:
        changed = False
        for b in list(blocks):
            if not _all_data_par(sch, b) or len(blocks) == 1:
                continue
            for prim in (sch.compute_inline, sch.reverse_compute_inline):
                try:
                    prim(b)
                except Exception:  # noqa: BLE001
                    continue
                blocks = [x for x in blocks if not x.same_as(b)]
                changed = True
                break
            if changed:
                break
    return blocks


def schedule_injective(func: Any, lanes: int) -> Any | None:
    sch = s_tir.Schedule(func)
    blocks = simple_blocks(sch)
    if not blocks or not all(_all_data_par(sch, b) for b in blocks):
        return None
    blocks = _inline_all(sch, blocks)
    for block in blocks:
        loops = sch.get_loops(block)
        if not loops:
            continue
        if sch.get(block).annotations.get("schedule_rule") is not None:
            continue
        parallel = _worth_parallel(sch, loops)
        inner = loops[-1]
        ext = as_int(_extent(sch, inner))
        outer = loops[:-1]
        if ext is not None and ext >= 2 * lanes and ext % lanes == 0:
            o, v = sch.split(inner, [None, lanes])
            sch.vectorize(v)
            outer = outer + [o]
        elif ext is not None and 2 <= ext <= lanes:
            sch.vectorize(inner)
        elif ext is not None:
            outer = outer + [inner]
        if parallel and outer:
            fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
            sch.parallel(fused)
    return sch.mod["main"]


def schedule_row_reduction(func: Any, lanes: int) -> Any | None:
    """[injective..] -> reductions over the inner axis -> injective, all sharing leading row
    axes (rms_norm, softmax, layer norm): one pass per row, rows in parallel when many."""
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    blocks = simple_blocks(sch)
    if blocks is None or len(blocks) < 2 or not any(_is_reduction_block(sch, b) for b in blocks):
        return None
    if _is_reduction_block(sch, blocks[-1]):
        return None
    # Inline pure elementwise producers/consumers where possible (casts, multiplies).
    for b in list(blocks[:-1]):
        if _all_data_par(sch, b):
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001
                pass
    blocks = sch.get_child_blocks(root)
    # Leading spatial axes shared by all blocks.
    lead = None
    for b in blocks:
        ivs = sch.get(b).iter_vars
        n = 0
        for iv in ivs:
            if int(iv.iter_type) != DATA_PAR:
                break
            n += 1
        if not _is_reduction_block(sch, b):
            n = len(ivs) - 1 if len(ivs) > 1 else n
        lead = n if lead is None else min(lead, n)
    if not lead:
        return None
    last = blocks[-1]
    loops = sch.get_loops(last)
    if len(loops) <= lead:
        return None
    rows = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
    parallel = _worth_parallel(sch, [rows] + list(sch.get_loops(last)[1:]))
    for b in reversed(blocks[:-1]):
        try:
            sch.compute_at(b, rows, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001
            return None
    for b in blocks:
        if _is_reduction_block(sch, b):
            continue
        _vectorize_inner(sch, b, lanes)
    if parallel:
        sch.parallel(rows)
    return sch.mod["main"]


def schedule_head_invariant(func: Any, lanes: int) -> Any | None:
    """One spatial block over (token, head, feature) whose math per (token, feature) is the
    same for every head -- the fused RoPE kernel: ``cos``/``sin``/``pow`` of position x frequency
    evaluated once per *element* (12 heads x 64 features per token: ~30 us per layer per decode
    step in libm). Moving the head loop innermost and unrolling it lets LLVM compute the
    transcendentals once per (token, feature) and reuse them for every head."""
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    if len(blocks) != 1:
        return None
    block = blocks[0]
    ivs = sch.get(block).iter_vars
    if len(ivs) != 3 or not _all_data_par(sch, block):
        return None
    loops = sch.get_loops(block)
    if len(loops) != 3:
        return None
    heads = as_int(_extent(sch, loops[1]))
    if heads is None or heads > 64:
        return None
    text = func.script()
    if not any(f"T.{fn}(" in text for fn in ("cos", "sin", "pow", "exp")):
        return None
    s, h, d = loops
    sch.reorder(s, d, h)
    sch.unroll(h)
    if _is_seq_extent(_extent(sch, s)):
        sch.parallel(s)
    return sch.mod["main"]
