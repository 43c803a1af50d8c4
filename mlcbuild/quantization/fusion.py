"""Relax pass fusing a weight's dequantization into the matmul that consumes it.

After operator fusion, a group-quantized linear layer is two kernels: ``dequantize`` (writes
the float weight to memory) and the matmul reading it. Fusing them into one TIR function lets
the schedule (dlight GEMV/Matmul) inline the dequantization so the float weight is never
materialized: this is where quantization saves memory bandwidth.
"""

from __future__ import annotations

from typing import Any


def FuseDequantizeMatmul() -> Any:  # noqa: N802  (reads like the TVM passes it sits between)
    import tvm
    from tvm import relax
    from tvm.relax.dpl.pattern import GlobalVarPattern, TuplePattern, is_op, wildcard

    def pattern(extra_matmul_args: int) -> tuple[Any, dict[str, Any], Any]:
        weight_args = [wildcard(), wildcard()]  # q_weight, q_scale
        dequant = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern(weight_args), add_constraint=False)
        x = wildcard()
        matmul = is_op("relax.call_tir")(
            GlobalVarPattern(),
            TuplePattern([x, dequant] + [wildcard() for _ in range(extra_matmul_args)]),
            add_constraint=False,
        )

        def check(ctx: relax.transform.PatternCheckContext) -> bool:
            d = ctx.annotated_expr["dequant"].args[0].name_hint
            m = ctx.annotated_expr["matmul"].args[0].name_hint
            return d.startswith(("dequantize", "fused_dequantize")) and ("matmul" in m)

        return matmul, {"dequant": dequant, "matmul": matmul, "x": x}, check

    # A matmul may carry fused epilogue inputs (bias, residual, ...): try 0..3 of them.
    passes = [relax.transform.FuseOpsByPattern([("dequantize_matmul", *pattern(n))]) for n in range(4)]
    return tvm.transform.Sequential(passes + [relax.transform.FuseTIR()], name="FuseDequantizeMatmul")
