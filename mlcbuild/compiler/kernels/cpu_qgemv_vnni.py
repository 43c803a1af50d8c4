"""4-bit decode GEMV on integer dot products (AVX-512 VNNI ``vpdpbusd``).

The float kernel (``cpu_matmul.build_gemv_q``) turns every 4-bit weight into a float32 before
its FMA: shift, mask, convert, multiply-add per weight and lane. On this kind of machine that is
compute-bound at ~13 G weights/s per core, well under what memory can feed. Here the weights
stay integers: one ``vpdpbusd`` multiplies 64 unsigned weight bytes by 64 signed activation bytes
and adds groups of four into 16 int32 lanes, so a 512-bit load of 128 packed weights costs
three bit operations and two dot instructions per activation byte plane.

Activations are not rounded to int8 (what llama.cpp does); each 32-wide group of ``x`` becomes a
fixed-point number ``x ~= d_g * xq`` split into signed byte planes whose dot products recombine
exactly in int32 (``PLANES``): for float16 activations 16 bits, ``xq = 256 * hi + lo``
(|xq| <= 32639), whose rounding (at most ``max|x_g| / 65278`` per element) stays below the float16
rounding (2**-11 of each value) the activations already carry; for float32 activations
(``q4f32_1``) 24 bits in three planes (at most ``max|x_g| / 16711390`` per element, the size of a
float32 rounding of the group's largest value; measured on one GEMV: within 4e-7 of max|y| of the
float kernel's). With the group's integer zero point ``z``::

    y[n] = sum_g  s[n, g] * d_g * ( sum_{k in g} q[n, k] * xq[k]  -  z * sum_{k in g} xq[k] )

Bytes of the packed words line up with the dot instruction: byte ``b`` of word ``w`` holds
nibbles ``2b`` (low half) and ``2b + 1`` (high half), i.e. weights ``8w + 2b`` and
``8w + 2b + 1``; the activation bytes are laid out per call to match: for the dot over the words
``w0 .. w0 + vl``, bytes ``8 w0 ..`` hold the even weights' (then lane, then byte), then the odd
weights'.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx

from mlcbuild.compiler.kernels._text_kernel import KernelExprs, parse, signature
from mlcbuild.compiler.kernels._tir_expr import as_int, loads_in, pairwise_max, pairwise_sum
from mlcbuild.compiler.kernels.cpu_matmul import PREFETCH_BYTES, _divisor, line_starts, rows_ahead
from mlcbuild.compiler.kernels.matmul_analysis import GroupQuant, MatmulInfo, NotMatched

# Byte planes of the fixed-point activations per activation dtype: 16 bits for float16 (11-bit
# significand), 24 bits for float32 (24-bit significand).
PLANES = {"float16": 2, "float32": 3}
# |round(x / d)| bound for P planes: split from the low byte, lo = xq - 256 * floor((xq + 128) / 256)
# is in [-128, 127] at every step and the top plane stays an int8 up to 127 * (1 + 256 + ...).
# 24 bits keep a margin: x * (X_MAX / amax) is a float32 product, which near 2**23 can round up
# by one unit (and the top byte would wrap to -128). With 3 planes the recombination peaks at
# 8 * 15 * 128 * 65536 ~ 1.0e9 < 2**31 per int32 lane.
X_MAX = {2: 127 * 257, 3: 127 * (1 + 256 + 65536) - 16}  # 32639, 8355695
X16_MAX = X_MAX[2]
# names the kernel text uses itself
RESERVED = {
    "T", "E", "amax", "zw", "dg", "sd", "go", "gv", "xb", "xs", "xq", "pl", "hm", "acc", "m", "g", "c", "kv", "ko",
    "h", "w", "no", "ni", "wo", "main",
}


def supported(target: Any) -> bool:
    """Whether the llvm target has VNNI on 512- and 256-bit vectors (AVX-512 VNNI + VL)."""
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features(["avx512vnni", "avx512vl", "avx512bw"], target))
    except Exception:  # noqa: BLE001  (non-x86 triple)
        return False


class _Exprs(KernelExprs):
    """The kernel text's parse-time helpers: the shared ones, plus the vector dot step."""

    def __init__(self, info: MatmulInfo, vl: int, gw: int, planes: int):
        super().__init__(info)
        self.vl, self.gw, self.planes = vl, gw, planes

    def dot(self, W: Any, sd: Any, xb: Any, zw: Any, n: Any, ni: Any, m: Any, w0: Any, vl: int) -> Any:
        """float32 x vl partial sums of row n over the vl words from w0 on: (s * d) * (q . xq - z sum xq), with
        the row's products s * d per group already in float32 (``sd[ni]``, made once per row)."""
        gw = self.gw
        i32, i8 = f"int32x{vl}", f"int8x{4 * vl}"
        lanes = tirx.Ramp(w0, 1, vl)
        words = tirx.reinterpret(i32, tirx.BufferLoad(W, [n, lanes]))
        mask = tirx.Broadcast(tirx.const(0x0F0F0F0F, "int32"), vl)
        nibbles = (
            tirx.reinterpret(i8, tirx.bitwise_and(words, mask)),
            tirx.reinterpret(i8, tirx.bitwise_and(tirx.shift_right(words, tirx.Broadcast(tirx.const(4, "int32"), vl)), mask)),
        )
        intrin = "llvm.x86.avx512.vpdpbusd." + {16: "512", 8: "256"}[vl]

        def dots(h: int) -> Any:
            acc = tirx.Broadcast(tirx.const(0, "int32"), vl)
            for p in (0, 1):
                x = tirx.BufferLoad(xb, [m, h, tirx.Ramp(w0 * 8 + p * 4 * vl, 1, 4 * vl)])
                acc = tirx.call_llvm_pure_intrin(i32, intrin, acc, nibbles[p], x)
            return acc

        total = dots(0)  # planes from the most significant byte: Horner in int32 (no overflow, see X_MAX)
        for h in range(1, self.planes):
            total = total * tirx.Broadcast(tirx.const(256, "int32"), vl) + dots(h)
        total = total - tirx.BufferLoad(zw, [m, lanes])
        per_word = vl // gw
        scales = tirx.BufferLoad(sd, [ni, tirx.Ramp(tirx.floordiv(w0, gw), 1, per_word)])
        scale = tirx.Shuffle([scales] * gw, [tirx.const(i // gw, "int32") for i in range(vl)])
        return tirx.Cast(f"float32x{vl}", total) * scale

    def hmax(self, buf: Any) -> Any:
        """max over a 16-element float32 buffer."""
        return pairwise_max([buf[i] for i in range(16)])

    def deinterleave(self, pl: Any, m: Any, h: Any, w0: Any, vl: int, p: int) -> Any:
        """Plane h's bytes of the even (p=0) or odd (p=1) weights of the vl words from w0 on, as the
        dot instruction pairs them with the nibbles: byte j of the vector is k = 2j + p."""
        n = 4 * vl
        pairs = tirx.reinterpret(f"int16x{n}", tirx.BufferLoad(pl, [m, h, tirx.Ramp(w0 * 8, 1, 2 * n)]))
        if p:
            pairs = tirx.shift_right(pairs, tirx.Broadcast(tirx.const(8, "int16"), n))
        return tirx.Cast(f"int8x{n}", pairs)  # the low byte of each pair

    def hsum(self, acc: Any, row: Any) -> Any:
        """The sum of a row's vl float32 partial sums."""
        return pairwise_sum([acc[row, i] for i in range(self.vl)])


KERNEL = """
@T.prim_func(s_tir=False)
def main({handles}):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
{symbols}
{buffers}
    amax = T.alloc_buffer(({M}, {NG}), "float32")
    zw = T.alloc_buffer(({M}, {KW}), "int32")
    dg = T.alloc_buffer(({M}, {NG}), "float32")
    xb = T.alloc_buffer(({M}, {P}, {KW8}), "int8")
    xs = T.alloc_buffer(({M}, {K}), "float32")
    xq = T.alloc_buffer(({M}, {K}), "int32")
    pl = T.alloc_buffer(({M}, {P}, {K}), "int8")
    hm = T.alloc_buffer((16,), "float32")
    # activations -> per-group fixed point, split into signed byte planes laid out for the dots;
    # 16 lanes at a time (this runs on one thread, before the parallel loop)
    for m in range({M}):
        for ko in range({K16}):
            for kv in T.vectorized(16):
                xs[m, ko * 16 + kv] = E.x(m, ko * 16 + kv, {names})
        for g in range({NG}):
            for kv in T.vectorized(16):
                hm[kv] = T.abs(xs[m, g * {G} + kv])
            for c in range(1, {G16}):
                for kv in T.vectorized(16):
                    hm[kv] = T.max(hm[kv], T.abs(xs[m, g * {G} + c * 16 + kv]))
            amax[m, g] = E.hmax(hm)
            dg[m, g] = amax[m, g] * T.float32({DSCALE})
            for c in range({G16}):
                # (no let-bindings inside vectorized loops: TVM 0.27's vectorizer gets them wrong)
                for kv in T.vectorized(16):
                    xq[m, g * {G} + c * 16 + kv] = T.Cast("int32", T.nearbyint(xs[m, g * {G} + c * 16 + kv] * T.Select(amax[m, g] > T.float32(0), T.float32({XMAX}) / amax[m, g], T.float32(0))))
                for kv in T.vectorized(16):
{SPLIT}
        for w in range({KW}):
            zw[m, w] = ({ZSUM}) * {ZERO}
        for h in range({P}):
            for wo in range({WO}):
{X_MAIN}
{X_TAIL}
    for no in T.parallel({NO}):
        acc = T.alloc_buffer(({R}, {VL}), "float32")
        sd = T.alloc_buffer(({R}, {NG}), "float32")
{PREFETCH}
        for m in range({M}):
            for ni in T.unroll({R}):
                acc[ni, T.ramp(0, 1, {VL})] = T.broadcast(T.float32(0), {VL})
                # the row's weight scale times the activations' per group, once per row: each vector
                # step then takes its lanes' factors with one shuffle (measured on Zen 4, q4f16_1 decode
                # projections: 1.02-1.17x of widening and multiplying the scales in every step)
{ROW_SCALES}
            for wo in range({WO}):
{DOT_MAIN}
{DOT_TAIL}
            for ni in T.unroll({R}):
                {OUT}[{OUT_IDX}no * {R} + ni] = E.out(m, no * {R} + ni, E.hsum(acc, ni), {names})
"""


def _prefetch_lines(weight: str, scale: str, gq: GroupQuant, rows: int, n: int, prefetch_bytes: int) -> str:
    """Kernel text: software prefetches of the packed words and the scales of the row
    ``prefetch_bytes`` ahead of each row the loop is about to read, one per 64-byte line (why and
    how far: ``cpu_matmul.PREFETCH_BYTES``, the same rule as ``prefetch_rows_ahead``); none for 0."""
    if prefetch_bytes == 0:
        return ""
    ahead = rows_ahead(gq.weight, prefetch_bytes)
    lines = []
    for ni in range(rows):
        row = f"T.min(no * {rows} + {ni + ahead}, {n - 1})"
        columns = [(weight, w) for w in line_starts(gq.weight)] + [(scale, g) for g in line_starts(gq.scale)]
        for buf, column in columns:
            lines.append(f'        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch", '
                         f"T.address_of({buf}[{row}, {column}]), 0, 3, 1))")
    return "\n".join(lines)


def _row_scales(scale: str, rows: int, groups: int) -> str:
    """Kernel text: ``sd[ni, g] = s[row, g] * dg[m, g]`` for the row ``no * rows + ni``, 16 groups a vector
    and the rest in one shorter one (no guard inside a vectorized loop)."""
    pad = " " * 16
    value = f'T.Cast("float32", {scale}[no * {rows} + ni, {{g}}]) * dg[m, {{g}}]'
    lines = []
    if groups >= 16:
        lines += [f"{pad}for go in range({groups // 16}):", f"{pad}    for gv in T.vectorized(16):",
                  f"{pad}        sd[ni, go * 16 + gv] = " + value.format(g="go * 16 + gv")]
    if groups % 16:
        start = groups - groups % 16
        lines += [f"{pad}for gv in T.vectorized({groups % 16}):",
                  f"{pad}    sd[ni, {start} + gv] = " + value.format(g=f"{start} + gv")]
    return "\n".join(lines)


def _x_layout(w0: str, vl: int, pad: int) -> str:
    """Kernel text: the activation bytes of the vl words from word ``w0`` on (an expression), laid out
    for one vl-word dot: the even weights' bytes, then the odd weights'."""
    return "\n".join(f"{' ' * pad}xb[m, h, T.ramp({w0} * 8 + {p * 4 * vl}, 1, {4 * vl})] = "
                     f"E.deinterleave(pl, m, h, {w0}, {vl}, {p})" for p in (0, 1))


def _dot_step(weight: str, rows: int, w0: str, vl: int, pad: int) -> str:
    """Kernel text: each row's vl-word dot from word ``w0`` on (an expression), added into the first vl
    lanes of its partial sums."""
    return (f"{' ' * pad}for ni in T.unroll({rows}):\n{' ' * pad}    acc[ni, T.ramp(0, 1, {vl})] = "
            f"acc[ni, T.ramp(0, 1, {vl})] + E.dot({weight}, sd, xb, zw, no * {rows} + ni, ni, m, {w0}, {vl})")


def _split_planes(planes: int, group: int) -> str:
    """Kernel text: the fixed-point values ``xq`` into signed byte planes, most significant first,
    in k order (``E.deinterleave`` lays them out for the dots). r_0 = xq, r_i+1 = (r_i + 128) >> 8;
    plane planes-1-i holds r_i - 256 * r_i+1 and plane 0 the last r."""
    at = f"m, g * {group} + c * 16 + kv"
    r = [f"xq[{at}]"]
    for _ in range(1, planes):
        r.append(f"T.shift_right({r[-1]} + 128, 8)")
    pad = " " * 20
    lines = [f'{pad}pl[m, {planes - 1 - i}, g * {group} + c * 16 + kv] = T.Cast("int8", {r[i]} - {r[i + 1]} * 256)'
             for i in range(planes - 1)]
    lines.append(f'{pad}pl[m, 0, g * {group} + c * 16 + kv] = T.Cast("int8", {r[-1]})')
    return "\n".join(lines)


def build(info: MatmulInfo, gq: GroupQuant, rows: int = 1, prefetch_bytes: int = PREFETCH_BYTES) -> Any:
    """The GEMV as an (already scheduled) PrimFunc with the fused function's signature.

    ``rows``: output rows per iteration of the parallel loop, their words interleaved. One row at
    a time streams the weights in address order, which the prefetcher follows best (measured,
    2 threads, weights L3-resident as in a SmolLM2 decode: lm_head 17-18 -> 21-22 GB/s, gate_up
    15-17 -> 17-17.5 GB/s; from DRAM 12.5 -> 12.3 and 10.3-11.6 -> 12.2-13.4 GB/s)."""
    K, N = info.k_extent, info.n_extent
    kw = as_int(gq.weight.shape[1]) or 0
    if gq.bits != 4 or gq.per_word != 8 or kw * 8 != K or gq.group % 16 or K % gq.group:
        raise NotMatched("not an unpadded 4-bit, 8-per-word layout")
    if float(gq.zero) != int(gq.zero):
        raise NotMatched("non-integer zero point")
    x_dtypes = {str(load.source.dtype) for load in loads_in(info.x_expr)}
    if len(x_dtypes) != 1 or next(iter(x_dtypes)) not in PLANES:
        raise NotMatched(f"activations of dtype {x_dtypes}")
    planes = PLANES[next(iter(x_dtypes))]
    # 16-word (512-bit) dots, and one 8-word dot for the rest of a row of 16 n + 8 words (K = 576: 4 + 1
    # instead of 9 8-word dots; whole q4f16_1 decode step on Zen 4 1.04-1.06x; 512-bit dots are two
    # 256-bit halves there, but a row costs fewer instructions)
    vl = 16 if kw >= 16 else 8
    tail = kw % vl
    gw = gq.group // 8  # words per group
    if tail % 8 or vl % gw or (tail and tail % gw):
        raise NotMatched("groups do not tile the vector")
    rows = _divisor(N, [rows, 2, 1])
    sig = signature(info, gq, RESERVED)
    prefetch = _prefetch_lines(sig.weight, sig.scale, gq, rows, N, prefetch_bytes)
    text = KERNEL.format(
        handles=sig.handles, symbols=sig.symbols, buffers=sig.buffers, W=sig.weight, S=sig.scale,
        M=sig.m_extent, NG=K // gq.group, KW=kw, KW8=8 * kw, WO=kw // vl, VL=vl, G=gq.group, GW=gw,
        # the row's vl-word dots in a loop, then (rows of 16 n + 8 words) one 8-word dot on the rest
        X_MAIN=_x_layout(f"wo * {vl}", vl, 16), DOT_MAIN=_dot_step(sig.weight, rows, f"wo * {vl}", vl, 16),
        X_TAIL=_x_layout(str(kw - tail), tail, 12) if tail else "",
        DOT_TAIL=_dot_step(sig.weight, rows, str(kw - tail), tail, 12) if tail else "",
        R=rows, NO=N // rows,
        ZERO=int(gq.zero), XMAX=float(X_MAX[planes]), DSCALE=repr(1.0 / X_MAX[planes]), names=sig.names,
        P=planes, SPLIT=_split_planes(planes, gq.group), K=K, K16=K // 16, G16=gq.group // 16,
        ZSUM=" + ".join(f"xq[m, w * 8 + {i}]" for i in range(8)),
        OUT=sig.out, OUT_IDX=sig.out_index, PREFETCH=prefetch, ROW_SCALES=_row_scales(sig.scale, rows, K // gq.group),
    )
    return parse(text, _Exprs(info, vl, gw, planes), sig)
