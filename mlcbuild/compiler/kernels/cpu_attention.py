"""Paged-KV-cache attention kernels for CPU, replacing TVM 0.27's ``*_cpu`` reference kernels.

TVM's CPU kernels (``relax/frontend/nn/llm/_decode_kernels.py``, ``_prefill_kernels.py``) are
scalar reference code: one libm ``exp2`` per (query, key, head), one key row re-read per query
head, and the paged prefill kernel walks every page the cache *could* hold (``max_num_pages *
page_size`` rows) for every query. Measured on a SmolLM2-135M shape (30 layers, 128-token
prompt): 240 ms of a 620 ms prefill, and ~80 us per layer per decode step at 130 tokens of
context.

The kernels below keep the exact signatures (the KV cache calls them by position) and the
semantics (log2-domain softmax with ``sm_scale * log2(e)``, ``lse = m + log2(sum)``, causal mask
``col < kv_len - qo_len + row + 1``), and compute per (sequence, query head):

    scores over the visible keys (vector dot products over head_dim; the lane sums of 16 key rows
    reduced together by shuffles, ``_row_sums``, not one horizontal sum per key),
    exp2 by a vectorizable polynomial (|rel err| < 3e-7, no libm call per element),
    output = sum p * v (vector over head_dim), then divide.

Decode runs one task per (sequence, kv head), its query heads sharing each key and value row; with
fewer tasks than ``SPLIT_BELOW`` (a batch of one: 3 kv heads on 2 threads) each sequence's pages are
split in ``DECODE_SPLITS`` ranges whose partial softmax sums are merged (flash-decoding).

They run only for RoPE modes other than inline (``rotary_mode == 1`` asserts at run time: the
inline-RoPE path needs the model's rope scaling, which the compiled module does not carry);
``replace_attention_kernels`` checks the KV cache's creation call before swapping anything.
"""

from __future__ import annotations

import math
from typing import Any

import tvm
from tvm import tirx
from tvm.script import tirx as T

from mlcbuild.compiler.kernels._tir_expr import pairwise_max, pairwise_sum
from mlcbuild.compiler.kernels._tir_math import LOG2E
from mlcbuild.compiler.kernels._tir_math import exp2_nonpositive as _exp2
from mlcbuild.compiler.kernels.kv_cache_calls import ROPE_INLINE, kv_cache_rope_modes, shape_ints



def _hsum(buf: Any, n: int) -> Any:
    """Pairwise sum of buf[0:n]."""
    return pairwise_sum([buf[i] for i in range(n)])


def _row_sums(buf: Any, lead: list[Any], row0: Any, n: int) -> Any:
    """A vector of ``n`` lanes whose lane r is ``sum(buf[*lead, row0 + r, 0:n])``: n row vectors of partial sums
    (a dot product's lanes) reduced together by two-source shuffles and adds, log2(n) levels, n - 1 shuffle
    pairs for the n rows, where a horizontal sum per row costs log2(n) shuffles and adds for each row (it
    was most of a score's cost: three quarters of the decode kernel's instructions)."""
    ramp = tirx.Ramp(tirx.const(0, "int32"), tirx.const(1, "int32"), n)
    vecs = [tirx.BufferLoad(buf, [*lead, row0 + r, ramp]) for r in range(n)]
    width = n  # each vector holds n // width rows' groups of `width` partial sums
    while len(vecs) > 1:
        half = width // 2
        lo = [k for group in range(0, n, width) for k in range(group, group + half)]
        lo += [n + k for k in lo]  # the second vector's lanes follow the first's
        hi = [k + half for k in lo]
        vecs = [tirx.Shuffle([x, y], [tirx.const(i, "int32") for i in lo])
                + tirx.Shuffle([x, y], [tirx.const(i, "int32") for i in hi]) for x, y in zip(vecs[::2], vecs[1::2])]
        width = half
    return vecs[0]


def _max_of(buf: Any, lead: list[Any], start: Any, n: int) -> Any:
    """max of buf[*lead, start:start + n], as a tree."""
    return pairwise_max([buf[(*lead, start + i)] for i in range(n)])


def _lanes(d: int) -> int:
    for lanes in (16, 8, 4, 2):
        if d % lanes == 0:
            return lanes
    return 1


# Decode tasks per (sequence, kv head) when there are few: the pages are split in this many ranges, each a
# task, merged afterwards (flash-decoding's split-K), so that a batch of one with 3 kv heads keeps 2 threads
# busy; from SPLIT_BELOW tasks on, there is enough parallelism without it.
DECODE_SPLITS = 2
SPLIT_BELOW = 8


def decode_kernel(h_kv: int, h_q: int, d: int, dtype: str, page_size: int, splits: int = DECODE_SPLITS,
                  split_below: int = SPLIT_BELOW) -> Any:
    """batch_decode_paged_kv_cpu (no sliding window)."""
    G = h_q // h_kv
    VL = _lanes(math.gcd(d, page_size))  # score lanes; also the rows whose sums are reduced together
    NJ = d // VL
    NS = splits
    scale_log2 = LOG2E

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "batch_decode_paged_kv_cpu", "tirx.noalias": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        Q = T.match_buffer(Q_handle, (B, h_q, d), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(output_handle, (B, h_q, d), dtype)
        lse = T.match_buffer(lse_handle, (B, h_q), "float32")
        length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_info_elem_offset)

        assert rotary_mode != 1, "mlcbuild CPU attention: inline RoPE is not supported"
        with T.sblock("root"):
            ns: T.let[T.int32] = T.if_then_else(B * h_kv < split_below, NS, 1)
            # the split tasks' unnormalized outputs, running maxima and sums
            part_o = T.sblock_alloc_buffer((B * h_kv * NS, G, d), "float32")
            part_m = T.sblock_alloc_buffer((B * h_kv * NS, G), "float32")
            part_d = T.sblock_alloc_buffer((B * h_kv * NS, G), "float32")
            # One task per (sequence, kv head[, page range]): its G query heads share every key/value row load.
            for task in T.parallel(B * h_kv * ns):
                with T.sblock("attn"):
                    T.reads(Q[0:B, 0:h_q, 0:d], pages[0:max_num_pages, 0:2, 0:h_kv, 0:page_size, 0:d], page_table_indptr[0 : B + 1], page_table_values[0:nnz_pages], length_info[0:B])
                    T.writes(output[0:B, 0:h_q, 0:d], lse[0:B, 0:h_q], part_o[0 : B * h_kv * NS, 0:G, 0:d], part_m[0 : B * h_kv * NS, 0:G], part_d[0 : B * h_kv * NS, 0:G])
                    S = T.sblock_alloc_buffer((G, page_size), "float32")
                    A = T.sblock_alloc_buffer((G, page_size, VL), "float32")
                    O = T.sblock_alloc_buffer((G, d), "float32")
                    Qf = T.sblock_alloc_buffer((G, d), "float32")
                    Rf = T.sblock_alloc_buffer((d,), "float32")
                    pacc = T.sblock_alloc_buffer((page_size,), "float32")
                    m = T.sblock_alloc_buffer((G,), "float32")
                    den = T.sblock_alloc_buffer((G,), "float32")
                    m_new = T.sblock_alloc_buffer((G,), "float32")
                    alpha = T.sblock_alloc_buffer((G,), "float32")
                    bk: T.let[T.int32] = task // ns
                    b: T.let[T.int32] = bk // h_kv
                    hk: T.let[T.int32] = bk % h_kv
                    page_begin: T.let[T.int32] = page_table_indptr[b]
                    num_pages: T.let[T.int32] = page_table_indptr[b + 1] - page_begin
                    per_task: T.let[T.int32] = (num_pages + ns - 1) // ns
                    p0: T.let[T.int32] = T.min(task % ns * per_task, num_pages)
                    p1: T.let[T.int32] = T.min(p0 + per_task, num_pages)
                    for g in T.unroll(G):
                        m[g] = T.float32(-5e4)
                        den[g] = T.float32(0)  # (an empty page range adds nothing to the merge)
                        for i in T.vectorized(d):
                            O[g, i] = T.float32(0)
                            Qf[g, i] = T.Cast("float32", Q[b, hk * G + g, i]) * (sm_scale * scale_log2)
                    for p in T.serial(p1 - p0):
                        page_no: T.let[T.int32] = page_table_values[page_begin + p0 + p]
                        rows: T.let[T.int32] = T.if_then_else(p0 + p == num_pages - 1, length_info[b], page_size)
                        # each key row widened once for the G query heads. Rows past the end repeat the last
                        # one, so that every group of VL rows is summed at once: their scores repeat its
                        # score, which leaves the max as it is, and the exp2 pass masks them (a stale row of
                        # the page could hold anything, NaN included)
                        for r in T.serial(page_size):
                            for i in T.vectorized(d):
                                Rf[i] = T.Cast("float32", pages[page_no, 0, hk, T.min(r, rows - 1), i])
                            for g in T.unroll(G):
                                for l in T.vectorized(VL):
                                    A[g, r, l] = Qf[g, l] * Rf[l]
                                for j in T.unroll(1, NJ):
                                    for l in T.vectorized(VL):
                                        A[g, r, l] = A[g, r, l] + Qf[g, j * VL + l] * Rf[j * VL + l]
                        for g in T.unroll(G):
                            for ro in T.unroll(page_size // VL):
                                S[g, T.ramp(ro * VL, 1, VL)] = _row_sums(A, [g], ro * VL, VL)
                            m_new[g] = T.max(m[g], _max_of(S, [g], 0, page_size))
                            alpha[g] = _exp2(m[g] - m_new[g])
                            m[g] = m_new[g]
                            # the page's rows at once: exp2 vectorized, rows past the end masked to 0
                            for r in T.vectorized(page_size):
                                S[g, r] = T.if_then_else(r < rows, _exp2(S[g, r] - m_new[g]), T.float32(0))
                                pacc[r] = S[g, r]
                            den[g] = den[g] * alpha[g] + _hsum(pacc, page_size)
                            for i in T.vectorized(d):
                                O[g, i] = O[g, i] * alpha[g]
                        for r in T.serial(rows):
                            for i in T.vectorized(d):
                                Rf[i] = T.Cast("float32", pages[page_no, 1, hk, r, i])
                            for g in T.unroll(G):
                                for i in T.vectorized(d):
                                    O[g, i] = O[g, i] + S[g, r] * Rf[i]
                    if ns == 1:  # a sequence without pages here (a fork's depth): 0 and -5e4, as TVM's
                        for g in T.unroll(G):
                            for i in T.vectorized(d):
                                output[b, hk * G + g, i] = T.Cast(dtype, T.if_then_else(den[g] > T.float32(0), O[g, i] / den[g], T.float32(0)))
                            lse[b, hk * G + g] = T.if_then_else(den[g] > T.float32(0), m[g] + T.log2(den[g]), T.float32(-5e4))
                    else:
                        for g in T.unroll(G):
                            for i in T.vectorized(d):
                                part_o[task, g, i] = O[g, i]
                            part_m[task, g] = m[g]
                            part_d[task, g] = den[g]
            if ns > 1:  # merge each (sequence, kv head)'s page ranges (few: ns > 1 only below split_below)
                for bk in T.serial(B * h_kv):
                    with T.sblock("merge"):
                        T.reads(part_o[0 : B * h_kv * NS, 0:G, 0:d], part_m[0 : B * h_kv * NS, 0:G], part_d[0 : B * h_kv * NS, 0:G])
                        T.writes(output[0:B, 0:h_q, 0:d], lse[0:B, 0:h_q])
                        w = T.sblock_alloc_buffer((NS,), "float32")
                        mx = T.sblock_alloc_buffer((1,), "float32")
                        total = T.sblock_alloc_buffer((1,), "float32")
                        Om = T.sblock_alloc_buffer((d,), "float32")
                        for g in T.serial(G):
                            mx[0] = part_m[bk * NS, g]
                            for t in T.unroll(1, NS):
                                mx[0] = T.max(mx[0], part_m[bk * NS + t, g])
                            total[0] = T.float32(0)
                            for t in T.unroll(NS):
                                w[t] = _exp2(part_m[bk * NS + t, g] - mx[0])
                                total[0] = total[0] + w[t] * part_d[bk * NS + t, g]
                            for i in T.vectorized(d):
                                Om[i] = part_o[bk * NS, g, i] * w[0]
                            for t in T.unroll(1, NS):
                                for i in T.vectorized(d):
                                    Om[i] = Om[i] + part_o[bk * NS + t, g, i] * w[t]
                            for i in T.vectorized(d):
                                output[bk // h_kv, bk % h_kv * G + g, i] = T.Cast(dtype, T.if_then_else(total[0] > T.float32(0), Om[i] / total[0], T.float32(0)))
                            lse[bk // h_kv, bk % h_kv * G + g] = T.if_then_else(total[0] > T.float32(0), mx[0] + T.log2(total[0]), T.float32(-5e4))

    return batch_decode_paged_kv


def prefill_ragged_kernel(h_kv: int, h_q: int, d_qk: int, d_v: int, dtype: str) -> Any:
    """batch_prefill_ragged_kv: attention of a chunk of queries over the same chunk's keys."""
    G = h_q // h_kv
    VL = _lanes(d_qk)
    NJ = d_qk // VL

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        var_kv_indptr: T.handle,
        var_q_rope_position: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()

        q = T.match_buffer(var_q, (qo_len, h_q, d_qk), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d_qk), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d_v), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        output = T.match_buffer(var_output, (qo_len, h_q, d_v), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")

        assert rotary_mode != 1, "mlcbuild CPU attention: inline RoPE is not supported"
        for bh in T.parallel(batch_size * h_q):
            with T.sblock("attn"):
                T.reads(q[0:qo_len, 0:h_q, 0:d_qk], k[0:kv_len, 0:h_kv, 0:d_qk], v[0:kv_len, 0:h_kv, 0:d_v], q_indptr[0 : batch_size + 1], kv_indptr[0 : batch_size + 1])
                T.writes(output[0:qo_len, 0:h_q, 0:d_v], lse[0:qo_len, 0:h_q])
                S = T.sblock_alloc_buffer((kv_len + 16,), "float32")
                acc16 = T.sblock_alloc_buffer((16,), "float32")
                O = T.sblock_alloc_buffer((d_v,), "float32")
                Qf = T.sblock_alloc_buffer((d_qk,), "float32")
                A = T.sblock_alloc_buffer((VL, VL), "float32")
                st = T.sblock_alloc_buffer((2,), "float32")  # max, sum
                b: T.let[T.int32] = bh // h_q
                h: T.let[T.int32] = bh % h_q
                hk: T.let[T.int32] = h // G
                q0: T.let[T.int32] = q_indptr[b]
                k0: T.let[T.int32] = kv_indptr[b]
                nq: T.let[T.int32] = q_indptr[b + 1] - q0
                nk: T.let[T.int32] = kv_indptr[b + 1] - k0
                for qi in T.serial(nq):
                    visible: T.let[T.int32] = T.if_then_else(causal > 0, T.min(T.max(nk - nq + qi + 1, 0), nk), nk)
                    for i in T.vectorized(d_qk):
                        Qf[i] = T.Cast("float32", q[q0 + qi, h, i]) * (sm_scale * LOG2E)
                    st[0] = T.float32(-5e4)
                    # VL key rows at a time, their sums reduced together; rows past the visible ones repeat
                    # the last (never read past the sequence; a repeated score leaves the max as it is) and
                    # the exp2 pass masks them
                    for ro in T.serial((visible + VL - 1) // VL):
                        for r in T.serial(VL):
                            key: T.let[T.int32] = k0 + T.min(ro * VL + r, visible - 1)
                            for l in T.vectorized(VL):
                                A[r, l] = Qf[l] * T.Cast("float32", k[key, hk, l])
                            for j in T.unroll(1, NJ):
                                for l in T.vectorized(VL):
                                    A[r, l] = A[r, l] + Qf[j * VL + l] * T.Cast("float32", k[key, hk, j * VL + l])
                        S[T.ramp(ro * VL, 1, VL)] = _row_sums(A, [], 0, VL)
                        st[0] = T.max(st[0], _max_of(S, [], ro * VL, VL))
                    for l in T.vectorized(16):
                        acc16[l] = T.float32(0)
                    for ro in T.serial((visible + 15) // 16):
                        for l in T.vectorized(16):
                            S[ro * 16 + l] = T.if_then_else(ro * 16 + l < visible, _exp2(S[ro * 16 + l] - st[0]), T.float32(0))
                            acc16[l] = acc16[l] + S[ro * 16 + l]
                    st[1] = _hsum(acc16, 16)
                    for i in T.vectorized(d_v):
                        O[i] = T.float32(0)
                    for r in T.serial(visible):
                        for i in T.vectorized(d_v):
                            O[i] = O[i] + S[r] * T.Cast("float32", v[k0 + r, hk, i])
                    if visible > 0:
                        for i in T.vectorized(d_v):
                            output[q0 + qi, h, i] = T.Cast(dtype, O[i] / st[1])
                        lse[q0 + qi, h] = st[0] + T.log2(st[1])
                    else:
                        for i in T.vectorized(d_v):
                            output[q0 + qi, h, i] = T.Cast(dtype, T.float32(0))
                        lse[q0 + qi, h] = T.float32(-5e4)

    return batch_prefill_ragged_kv


def prefill_paged_kernel(h_kv: int, h_q: int, d: int, dtype: str, page_size: int) -> Any:
    """batch_prefill_paged_kv_cpu (no sliding window): queries over the sequence's cached pages."""
    G = h_q // h_kv
    VL = _lanes(math.gcd(d, page_size))
    NJ = d // VL

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_pages: T.handle,
        var_page_indptr: T.handle,
        var_page_values: T.handle,
        var_length_info: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"global_symbol": "batch_prefill_paged_kv_cpu", "tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_elem_offset)

        assert rotary_mode != 1, "mlcbuild CPU attention: inline RoPE is not supported"
        for bh in T.parallel(batch_size * h_q):
            with T.sblock("attn"):
                T.reads(q[0:total_len, 0:h_q, 0:d], pages[0:max_num_pages, 0:2, 0:h_kv, 0:page_size, 0:d], q_indptr[0 : batch_size + 1], page_indptr[0 : batch_size + 1], page_values[0:nnz_pages], length_info[0:batch_size])
                T.writes(output[0:total_len, 0:h_q, 0:d], lse[0:total_len, 0:h_q])
                S = T.sblock_alloc_buffer((max_num_pages * page_size + 16,), "float32")
                acc16 = T.sblock_alloc_buffer((16,), "float32")
                O = T.sblock_alloc_buffer((d,), "float32")
                Qf = T.sblock_alloc_buffer((d,), "float32")
                A = T.sblock_alloc_buffer((VL, VL), "float32")
                st = T.sblock_alloc_buffer((2,), "float32")
                b: T.let[T.int32] = bh // h_q
                h: T.let[T.int32] = bh % h_q
                hk: T.let[T.int32] = h // G
                q0: T.let[T.int32] = q_indptr[b]
                nq: T.let[T.int32] = q_indptr[b + 1] - q0
                pb: T.let[T.int32] = page_indptr[b]
                npg: T.let[T.int32] = page_indptr[b + 1] - pb
                nk: T.let[T.int32] = T.if_then_else(npg > 0, (npg - 1) * page_size + length_info[b], 0)
                for qi in T.serial(nq):
                    visible: T.let[T.int32] = T.if_then_else(causal > 0, T.min(T.max(nk - nq + qi + 1, 0), nk), nk)
                    for i in T.vectorized(d):
                        Qf[i] = T.Cast("float32", q[q0 + qi, h, i]) * (sm_scale * LOG2E)
                    st[0] = T.float32(-5e4)
                    # as in the ragged kernel: VL rows at a time (a group never crosses a page: VL | page_size)
                    for ro in T.serial((visible + VL - 1) // VL):
                        for r in T.serial(VL):
                            key: T.let[T.int32] = T.min(ro * VL + r, visible - 1)
                            key_page: T.let[T.int32] = page_values[pb + key // page_size]
                            for l in T.vectorized(VL):
                                A[r, l] = Qf[l] * T.Cast("float32", pages[key_page, 0, hk, key % page_size, l])
                            for j in T.unroll(1, NJ):
                                for l in T.vectorized(VL):
                                    A[r, l] = A[r, l] + Qf[j * VL + l] * T.Cast("float32", pages[key_page, 0, hk, key % page_size, j * VL + l])
                        S[T.ramp(ro * VL, 1, VL)] = _row_sums(A, [], 0, VL)
                        st[0] = T.max(st[0], _max_of(S, [], ro * VL, VL))
                    for l in T.vectorized(16):
                        acc16[l] = T.float32(0)
                    for ro in T.serial((visible + 15) // 16):
                        for l in T.vectorized(16):
                            S[ro * 16 + l] = T.if_then_else(ro * 16 + l < visible, _exp2(S[ro * 16 + l] - st[0]), T.float32(0))
                            acc16[l] = acc16[l] + S[ro * 16 + l]
                    st[1] = _hsum(acc16, 16)
                    for i in T.vectorized(d):
                        O[i] = T.float32(0)
                    for r in T.serial(visible):
                        for i in T.vectorized(d):
                            O[i] = O[i] + S[r] * T.Cast("float32", pages[page_values[pb + r // page_size], 1, hk, r % page_size, i])
                    if visible > 0:
                        for i in T.vectorized(d):
                            output[q0 + qi, h, i] = T.Cast(dtype, O[i] / st[1])
                        lse[q0 + qi, h] = st[0] + T.log2(st[1])
                    else:
                        for i in T.vectorized(d):
                            output[q0 + qi, h, i] = T.Cast(dtype, T.float32(0))
                        lse[q0 + qi, h] = T.float32(-5e4)

    return batch_prefill_paged_kv_cpu


# ---- replacing the kernels in a module -------------------------------------------------------------


def replacements(mod: tvm.IRModule) -> dict[str, Any]:
    """name -> replacement PrimFunc for the CPU attention kernels we know in ``mod``."""
    modes = kv_cache_rope_modes(mod)
    if not modes or any(m == ROPE_INLINE for m in modes):
        return {}
    out: dict[str, Any] = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gvar.name_hint
        params = list(func.params)
        try:
            if name == "batch_decode_paged_kv_cpu" and len(params) == 13:
                q, pages = params[0], params[1]
                _, h_q, d = shape_ints(q)
                _, two, h_kv, page_size, d2 = shape_ints(pages)
                if two == 2 and d == d2 and h_q % h_kv == 0 and len(params[4].shape) == 1:
                    out[name] = decode_kernel(h_kv, h_q, d, str(q.dtype), page_size)
            elif name == "batch_prefill_ragged_kv" and len(params) == 14:
                q, k, v = params[0], params[2], params[3]
                _, h_q, d_qk = shape_ints(q)
                _, h_kv, d_k = shape_ints(k)
                _, _, d_v = shape_ints(v)
                if d_qk == d_k and h_q % h_kv == 0:
                    out[name] = prefill_ragged_kernel(h_kv, h_q, d_qk, d_v, str(q.dtype))
            elif name == "batch_prefill_paged_kv_cpu" and len(params) == 15:
                q, pages = params[0], params[2]
                _, h_q, d = shape_ints(q)
                _, two, h_kv, page_size, d2 = shape_ints(pages)
                if two == 2 and d == d2 and h_q % h_kv == 0 and len(params[5].shape) == 1:
                    out[name] = prefill_paged_kernel(h_kv, h_q, d, str(q.dtype), page_size)
        except (TypeError, ValueError):
            continue
    return out
