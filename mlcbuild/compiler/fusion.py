"""Relax-level fusions of our own, run after ``FuseOps``/``FuseTIR`` on every target.

``FuseDequantizeMatmul``: after operator fusion, a group-quantized linear layer is two kernels:
``dequantize`` (writes the float weight to memory) and the matmul reading it. Fusing them into
one TIR function lets the schedule inline the dequantization so the float weight is never
materialized: this is where quantization saves memory bandwidth.

``FuseCastsIntoNorm``: the casts around a norm become part of the norm's kernel.
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


def FuseCastsIntoNorm() -> Any:  # noqa: N802
    """Fuse ``cast`` kernels (float16 -> float32 of the activation, the norm weight, the bias)
    into the RMSNorm / LayerNorm kernel that consumes them. The models normalize in float32;
    after operator fusion each cast is a kernel of its own: two or three launches per norm, ~130
    per Llama-3-8B decode step, each a few microseconds of a GPU that otherwise waits; on CPU
    ~120 of the ~300 kernel calls of a SmolLM2 decode step."""
    import itertools

    import tvm
    from tvm import relax
    from tvm.relax.dpl.pattern import GlobalVarPattern, TuplePattern, is_op, wildcard

    def cast_of(value: Any) -> Any:
        return is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern([value]), add_constraint=False)

    def pattern(casted: tuple[bool, ...]) -> tuple[Any, dict[str, Any], Any]:
        args, annotations = [], {}
        for i, is_cast in enumerate(casted):
            arg = cast_of(wildcard()) if is_cast else wildcard()
            if is_cast:
                annotations[f"cast{i}"] = arg
            args.append(arg)
        norm = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern(args), add_constraint=False)
        annotations["norm"] = norm

        def check(ctx: relax.transform.PatternCheckContext) -> bool:
            name = ctx.annotated_expr["norm"].args[0].name_hint
            if "norm" not in name:
                return False
            casts = [ctx.annotated_expr[k].args[0].name_hint for k in annotations if k.startswith("cast")]
            return all(c == "cast" or (c.startswith("cast") and c[4:].isdigit()) for c in casts)

        return norm, annotations, check

    patterns = []
    for arity in (3, 2):  # LayerNorm (x, weight, bias), RMSNorm (x, weight)
        for casted in sorted(itertools.product((True, False), repeat=arity), key=lambda c: -sum(c)):
            if any(casted):
                patterns.append((f"norm_casts{arity}_{''.join('c' if c else '_' for c in casted)}", *pattern(casted)))
    return tvm.transform.Sequential(
        [relax.transform.FuseOpsByPattern(patterns), relax.transform.FuseTIR()], name="FuseCastsIntoNorm"
    )
