"""What the compiled module's KV-cache creation call says, for the passes that swap its kernels
(``cpu_attention``, ``cuda_attention``)."""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax

ROPE_INLINE = 2  # RopeMode.INLINE: the attention kernels apply RoPE themselves


def kv_cache_rope_modes(mod: tvm.IRModule) -> list[int]:
    """rope_mode arguments of every paged_attention_kv_cache_create call in the module."""
    modes: list[int] = []

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and len(expr.args) > 10:
            callee = expr.args[0]
            if isinstance(callee, relax.ExternFunc) and str(callee.global_symbol) == "vm.builtin.paged_attention_kv_cache_create":
                # (extern, sizes, layer_partition, heads, kv_heads, qk_dim, v_dim, attn_kind,
                #  enable_disaggregation, rope_mode, ...)
                arg = expr.args[9]
                value = getattr(arg, "value", None)
                try:
                    modes.append(int(value))
                except (TypeError, ValueError):
                    modes.append(ROPE_INLINE)  # unknown: treat as unsupported

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return modes


def shape_ints(buf: Any) -> list[int | None]:
    out: list[int | None] = []
    for s in buf.shape:
        try:
            out.append(int(s))
        except (TypeError, ValueError):
            out.append(None)
    return out
