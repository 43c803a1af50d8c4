"""Transcendentals as plain float32 arithmetic, so that CPU kernels vectorize them.

LLVM lowers a vector ``exp`` to one libm call per lane (no vector math library is linked), so an
elementwise kernel with ``sigmoid`` (SiLU) or ``exp`` ran one ``expf`` call per element on one
thread: ~4% of a SmolLM2 decode step in a profile. Here ``2**n * p(r)``: ``n`` an integer put
into the exponent bits, ``p`` a short polynomial on a reduced argument; no calls, no tables.
"""

from __future__ import annotations

import math
from typing import Any

from tvm import tirx
from tvm.ir import expr as ir_expr

from mlcbuild.compiler.kernels._tir_expr import HALF, Rewriter, RewriteError, dtype_of, map_stores, nodes_in

LOG2E = math.log2(math.e)
# ln 2 split so that n * LN2_HI is exact for |n| < 2**10 (Cody-Waite reduction)
LN2_HI, LN2_LO = 0.693145751953125, 1.428606765330187e-06


def _f32(v: float) -> Any:
    return tirx.const(v, "float32")


def _pow2(n: Any) -> Any:
    """2**n for an integral float32 n in [-126, 127], from the exponent bits."""
    return tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + 127, 23))


def exp2_nonpositive(x: Any) -> Any:
    """2**x for x <= 0 (softmax of max-subtracted scores): 2**n * 2**f with n = round(x),
    |f| <= 1/2, 2**f by its degree-6 Taylor series (measured |rel err| < 3e-7); flushes below 2**-126."""
    x = tirx.max(x, _f32(-126.0))
    n = tirx.round(x)
    f = (x - n) * _f32(math.log(2.0))
    p = _f32(1.0 / 720.0)
    for c in (1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * f + _f32(c)
    return p * _pow2(n)


def exp(x: Any) -> Any:
    """e**x in float32: n = round(x log2 e), r = x - n ln 2 (|r| <= 0.347), e**r by its degree-7
    Taylor series (truncation < 5e-9 relative; measured |rel err| < 1e-7 against numpy over
    [-87, 88]). Below -87.3 it stays at the smallest normal (~1.2e-38, where expf goes subnormal
    to 0), above 88.7 it is +inf."""
    x = tirx.min(tirx.max(x, _f32(-87.33654)), _f32(88.72284))
    n = tirx.round(x * _f32(LOG2E))
    r = x - n * _f32(LN2_HI) - n * _f32(LN2_LO)
    p = _f32(1.0 / 5040.0)
    for c in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * r + _f32(c)
    # 2**n for n up to 128 (e**88.7 ~ 2**128): split in two factors within the normal range
    half = tirx.floor(n * _f32(0.5))
    return p * _pow2(half) * _pow2(n - half)


def sigmoid(x: Any) -> Any:
    return _f32(1.0) / (_f32(1.0) + exp(-x))


_REPLACEMENTS = {"tirx.exp": exp, "tirx.sigmoid": sigmoid}


def vectorizable_transcendentals(func: Any) -> Any:
    """``func`` with every ``exp``/``sigmoid`` call in its block stores replaced by the arithmetic
    above (float16 arguments are computed in float32 and rounded back); ``func`` itself when it
    has none. A store the rewriter cannot rebuild is left as it is."""

    def replaceable(e: Any) -> bool:
        return isinstance(e, ir_expr.Call) and getattr(e.op, "name", "") in _REPLACEMENTS

    def call(e: Any, args: list[Any]) -> Any | None:
        fn = _REPLACEMENTS.get(getattr(e.op, "name", ""))
        if fn is None or len(args) != 1 or dtype_of(e) not in ("float32", *HALF):
            return None
        value = fn(args[0] if dtype_of(args[0]) == "float32" else tirx.Cast("float32", args[0]))
        return value if dtype_of(e) == "float32" else tirx.Cast(dtype_of(e), value)

    rewrite = Rewriter(call=call)

    def store(_block: str, st: Any) -> Any:
        if not any(replaceable(e) for e in nodes_in(st.value)):
            return st
        try:
            return tirx.BufferStore(st.buffer, rewrite(st.value), st.indices)
        except RewriteError:
            return st

    return map_stores(func, store)
