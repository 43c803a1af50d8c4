"""Rebuilding TIR expressions (TVM 0.27 exposes no Python expression mutator).

``Rewriter`` walks a PrimExpr and rebuilds it with variables substituted, buffer loads replaced
(e.g. by loads of TE tensors) and, on request, half-precision arithmetic promoted to float32
("cast after load": fp16/bf16 values are widened where they are read and all math runs in fp32).
"""

from __future__ import annotations

from typing import Any, Callable

import tvm
from tvm import tirx
from tvm.ir import expr as ir_expr
from tvm.ir.prim import expr as pe

HALF = ("float16", "bfloat16")

_BINARY = (
    pe.Add, pe.Sub, pe.Mul, pe.Div, pe.Mod, pe.FloorDiv, pe.FloorMod, pe.Min, pe.Max,
    pe.LShift, pe.RShift, pe.BitwiseAnd, pe.BitwiseOr, pe.BitwiseXor,
    pe.EQ, pe.NE, pe.LT, pe.LE, pe.GT, pe.GE, pe.And, pe.Or,
)


def _binary(e: Any, a: Any, b: Any) -> Any:
    """Rebuild a binary node through the operator builders (they reconcile int32/int64)."""
    builders = {
        pe.Add: lambda: a + b,
        pe.Sub: lambda: a - b,
        pe.Mul: lambda: a * b,
        pe.FloorDiv: lambda: tirx.floordiv(a, b),
        pe.FloorMod: lambda: tirx.floormod(a, b),
        pe.Min: lambda: tirx.min(a, b),
        pe.Max: lambda: tirx.max(a, b),
        pe.LShift: lambda: tirx.shift_left(a, b),
        pe.RShift: lambda: tirx.shift_right(a, b),
        pe.BitwiseAnd: lambda: tirx.bitwise_and(a, b),
        pe.BitwiseOr: lambda: tirx.bitwise_or(a, b),
        pe.BitwiseXor: lambda: tirx.bitwise_xor(a, b),
    }
    build = builders.get(type(e))
    if build is not None:
        return build()
    return type(e)(a, b)


def dtype_of(e: Any) -> str:
    return str(e.ty)


class RewriteError(ValueError):
    """An expression node the rewriter does not know."""


class Rewriter:
    """Rebuild expressions.

    var_map:  Var -> Expr substitution.
    load:     (buffer, new_indices) -> Expr, replacing every TensorLoad (default: reload the buffer).
    promote:  widen float16/bfloat16 arithmetic to float32.
    call:     (call, new_args) -> Expr or None, replacing a Call (None: rebuild it as it is).
    """

    def __init__(
        self,
        var_map: dict[Any, Any] | None = None,
        load: Callable[[Any, list[Any]], Any] | None = None,
        promote: bool = False,
        call: Callable[[Any, list[Any]], Any] | None = None,
    ):
        self.var_map = list((var_map or {}).items())
        self.load = load or (lambda buf, idx: tirx.BufferLoad(buf, idx))
        self.promote = promote
        self.call = call

    def _var(self, v: Any) -> Any:
        for key, value in self.var_map:
            if key.same_as(v):
                return value
        return v

    def _widen(self, e: Any) -> Any:
        if self.promote and dtype_of(e) in HALF:
            return tirx.Cast("float32", e)
        return e

    def __call__(self, e: Any) -> Any:  # noqa: C901  (one branch per node kind)
        if isinstance(e, (int, float)):
            return e
        if isinstance(e, ir_expr.TensorLoad):
            idx = [self(i) for i in e.indices]
            return self._widen(self.load(e.source, idx))
        if isinstance(e, ir_expr.Var):
            return self._var(e)
        if isinstance(e, pe.IntImm):
            return e
        if isinstance(e, pe.FloatImm):
            if self.promote and dtype_of(e) in HALF:
                return tirx.FloatImm("float32", float(e.value))
            return e
        if isinstance(e, pe.Cast):
            v = self(e.value)
            target = dtype_of(e)
            if self.promote and (target in HALF or target == "float32"):
                src = dtype_of(v)
                if src == "float32":
                    return v
                return tirx.Cast("float32", v)
            if dtype_of(v) == target:
                return v
            return tirx.Cast(target, v)
        if isinstance(e, _BINARY):
            return _binary(e, self(e.a), self(e.b))
        if isinstance(e, pe.Not):
            return pe.Not(self(e.a))
        if isinstance(e, pe.BitwiseNot):
            return pe.BitwiseNot(self(e.a))
        if isinstance(e, pe.Select):
            return pe.Select(self(e.condition), self(e.true_value), self(e.false_value))
        if isinstance(e, ir_expr.Call):
            args = [self(a) for a in e.args]
            replaced = self.call(e, args) if self.call is not None else None
            if replaced is not None:
                return replaced
            ret = dtype_of(e)
            if self.promote and ret in HALF:
                ret = "float32"
            return ir_expr.Call(e.op, args, ret_ty=ret)
        raise RewriteError(f"cannot rebuild {type(e).__name__}: {e}")


def nodes_in(e: Any) -> list[Any]:
    """Every node of an expression, pre-order (a load before its indices)."""
    out: list[Any] = []

    def visit(x: Any) -> None:
        out.append(x)
        if isinstance(x, ir_expr.TensorLoad):
            children = list(x.indices)
        elif isinstance(x, pe.Cast):
            children = [x.value]
        elif isinstance(x, _BINARY):
            children = [x.a, x.b]
        elif isinstance(x, (pe.Not, pe.BitwiseNot)):
            children = [x.a]
        elif isinstance(x, pe.Select):
            children = [x.condition, x.true_value, x.false_value]
        elif isinstance(x, ir_expr.Call):
            children = list(x.args)
        else:
            children = []
        for child in children:
            visit(child)

    visit(e)
    return out


def loads_in(e: Any) -> list[Any]:
    """All TensorLoad nodes of an expression (pre-order)."""
    return [x for x in nodes_in(e) if isinstance(x, ir_expr.TensorLoad)]


def vars_in(e: Any) -> list[Any]:
    """All Vars of an expression (with repeats)."""
    return [x for x in nodes_in(e) if isinstance(x, ir_expr.Var)]


def as_int(e: Any) -> int | None:
    """The value of a constant (an IntImm or a Python int), None for anything symbolic."""
    try:
        return int(e)
    except (TypeError, ValueError):
        return None


def is_scheduled(func: Any) -> bool:
    """Whether a PrimFunc says it is scheduled already (``tirx.is_scheduled``)."""
    attrs = func.attrs
    return attrs is not None and "tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"])


def pairwise_sum(terms: list[Any]) -> Any:
    """terms[0] + terms[1] + ... as a balanced tree (depth log2(n), not an n-long dependency chain)."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def pairwise_max(terms: list[Any]) -> Any:
    """max(terms[0], terms[1], ...) as a balanced tree, like :func:`pairwise_sum`."""
    while len(terms) > 1:
        terms = [tirx.max(terms[i], terms[i + 1]) if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def map_stores(func: Any, fn: Callable[[str, Any], Any]) -> Any:
    """``func`` with the store of every block whose body is one ``BufferStore`` replaced by
    ``fn(block_name, store)`` (return the store itself to keep it); ``func`` when none changed."""
    return map_body(func, store=fn)


def map_body(func: Any, store: Callable[[str, Any], Any] | None = None,
             loop: Callable[[Any], Any] | None = None) -> Any:
    """``func`` with its statements rebuilt where the callbacks change them: ``store(block_name,
    store)`` for the store of every block whose body is one ``BufferStore``; ``loop(for_stmt)``
    for every loop, returning a statement to put in its place (not descended into) or None to
    go on inside it. ``func`` itself when nothing changed."""
    from tvm import s_tir

    def rebuild(stmt: Any) -> Any:
        if isinstance(stmt, s_tir.SBlockRealize):
            block = rebuild(stmt.block)
            return stmt if block.same_as(stmt.block) else s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, block)
        if isinstance(stmt, s_tir.SBlock):
            body = rebuild(stmt.body)
            if isinstance(body, tirx.BufferStore) and store is not None:
                body = store(stmt.name_hint, body)
            if body.same_as(stmt.body):
                return stmt
            return s_tir.SBlock(stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint, body, stmt.init,
                                stmt.alloc_buffers, stmt.match_buffers, stmt.annotations)
        if isinstance(stmt, tirx.SeqStmt):
            seq = [rebuild(s) for s in stmt.seq]
            return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
        if isinstance(stmt, tirx.For):
            replaced = loop(stmt) if loop is not None else None
            if replaced is not None:
                return replaced
            body = rebuild(stmt.body)
            if body.same_as(stmt.body):
                return stmt
            return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                            stmt.annotations, stmt.step)
        return stmt

    body = rebuild(func.body)
    return func if body.same_as(func.body) else func.with_body(body)


def uses_var(e: Any, v: Any) -> bool:
    return any(x.same_as(v) for x in vars_in(e))


__all__ = ["HALF", "Rewriter", "RewriteError", "as_int", "dtype_of", "is_scheduled", "loads_in", "map_body", "map_stores", "nodes_in",
           "pairwise_sum", "uses_var", "vars_in", "tvm"]
