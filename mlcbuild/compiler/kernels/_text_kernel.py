"""Kernels written as TVMScript text around a fused matmul's own signature.

Some kernels are easier to state than to reach with schedule primitives (integer dot products,
byte-packed activations: TVM 0.27's ``blockize``/``tensorize`` fail on the int64 loop nests our
functions have). Such a kernel is a text template; this module fills in what comes from the
fused function it replaces: its parameter buffers (same names, shapes, dtypes, order), its
symbolic dimensions, and parse-time helpers (``E``) that rebuild the function's activation
expression and epilogue over the kernel's own buffers. Used by ``cpu_qgemv_vnni`` and
``cuda_qgemv_dp4a``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tvm import tirx

from mlcbuild.compiler.kernels._tir_expr import as_int
from mlcbuild.compiler.kernels.matmul_analysis import GroupQuant, MatmulInfo, NotMatched, _unravel, epilogue_value, x_value


class KernelExprs:
    """Parse-time helpers the kernel text calls as ``E.x``, ``E.out_index`` and ``E.out``."""

    def __init__(self, info: MatmulInfo):
        self.info = info

    def _loader(self, bufs: tuple[Any, ...]) -> Any:
        params = self.info.params

        def load(buf: Any, idx: list[Any]) -> Any:
            for orig, new in zip(params, bufs):
                if orig.same_as(buf):
                    return tirx.BufferLoad(new, idx)
            raise NotMatched(f"load of a non-parameter buffer {buf}")

        return load

    def x(self, m: Any, k: Any, *bufs: Any) -> Any:
        """The activation at flat row m, column k, in float32."""
        return x_value(self.info, self._loader(bufs), m, k)

    def out_index(self, m: Any, axis: int) -> Any:
        return _unravel(self.info, m)[axis]

    def out(self, m: Any, n: Any, value: Any, *bufs: Any) -> Any:
        """epilogue(value) for output row m, column n, in the output's dtype."""
        return epilogue_value(self.info, self._loader(bufs), value, [*_unravel(self.info, m), n])


@dataclass
class Signature:
    """Text pieces of the kernel's signature (format fields of a template)."""

    handles: str  # "h_a: T.handle, ..."
    symbols: str  # one "s0 = T.int64()" line per symbolic dimension
    buffers: str  # one match_buffer line per parameter
    names: str  # the parameter buffers' names, comma-separated (for the E helpers)
    m_extent: str  # the flat row count
    weight: str  # the packed-weight buffer
    scale: str  # the scale buffer
    out: str  # the output buffer
    out_index: str  # "E.out_index(m, 0), ..." (the output's leading indices of row m)
    bindings: dict[str, Any]  # for a kernel bound to the function's own buffers: name -> object


def signature(info: MatmulInfo, gq: GroupQuant, reserved: set[str], bound: bool = False) -> Signature:
    """The signature of ``info.func`` as template text; parameter names keep the weights' names,
    renamed where they would clash with ``reserved`` (the template's own names).

    ``bound``: the kernel declares no parameters and its names are ``info.func``'s own buffers
    and shape variables (``Signature.bindings``), so that its body can replace the function's
    body or a branch of it."""
    sym: dict[str, Any] = {}
    names: list[str] = []
    for i, buf in enumerate(info.params):
        name = re.sub(r"\W", "_", str(buf.name)) or f"arg{i}"
        if not name[0].isalpha() or name in names or name in reserved:
            name = f"arg{i}_{name}"
        names.append(name)
    decls = []
    for name, buf in zip(names, info.params):
        dims = ", ".join(_dim(d, sym) for d in buf.shape)
        decls.append(f'    {name} = T.match_buffer(h_{name}, ({dims},), "{buf.dtype}")')
    m_text = " * ".join(_dim(e, sym) for e in info.m_extents) or "T.int64(1)"
    return Signature(
        handles="" if bound else ", ".join(f"h_{n}: T.handle" for n in names),
        symbols="" if bound else "\n".join(f"    {k} = T.int64()" for k in sym),
        buffers="" if bound else "\n".join(decls),
        names=", ".join(names),
        m_extent=m_text,
        weight=names[[p.same_as(gq.weight) for p in info.params].index(True)],
        scale=names[[p.same_as(gq.scale) for p in info.params].index(True)],
        out=names[-1],
        out_index="".join(f"E.out_index(m, {i}), " for i in range(len(info.m_extents))),
        bindings={**dict(zip(names, info.params)), **sym} if bound else {},
    )


def _dim(e: Any, sym: dict[str, Any]) -> str:
    v = as_int(e)
    if v is not None:
        return f"T.int64({v})"
    name = f"s{len(sym)}"
    for key, var in sym.items():
        if var.same_as(e):
            return key
    if not isinstance(e, tirx.Var):
        raise NotMatched(f"shape expression {e} is not a variable")
    sym[name] = e
    return name


def parse(text: str, exprs: KernelExprs, sig: Signature) -> Any:
    """The PrimFunc of a filled-in template (``E`` is ``exprs``); for a bound signature, a
    function without parameters whose body uses the original function's buffers."""
    import tvm
    from tvm.script import tirx as T

    return tvm.script.from_source(
        text, extra_vars={"E": exprs, "T": T, **sig.bindings}, check_well_formed=not sig.bindings
    )
