"""Sliding-window attention exact past the window in prefill, on every device (CPU and CUDA).

TVM's paged KV cache, for a sequence with a sliding window, keeps the last ``keep`` tokens (the runtime
enables the window with ``keep = window - 1``) and computes a prefill chunk's attention in two parts
merged by their log-sum-exp: the chunk over itself (the ragged kernel, causal) and the chunk over the
cached history (the paged kernel's ``*_sliding_window`` variant). The runtime calls the second with
``causal=0``, so every query row of the chunk sees the whole history: row ``r`` attends to
``window - 1 + r + 1`` tokens where transformers' mask allows ``window``, and a prompt longer than the
window went wrong from the second chunk on (only one-token steps, decode, were exact).

The variant already holds the window's mask (``_causal_or_sliding_cross_mask`` in TVM's kernel code: row
``r`` sees the last ``window - 1 - r`` history tokens) but applies it only when ``causal > 0``. In that
kernel the history is always the tokens before the chunk, so the flag has no other use: this pass binds it
to 1 (the parameter stays, unused, so the runtime's call is unchanged), with the window compiled in
(``base_nn`` passes it as ``layer_sliding_window_size``). The runtime never puts more than ``window - 1``
tokens of a sequence in one chunk (``CompiledModel.max_chunk_tokens``): the cache then always holds the
history every row needs, and the chunk's self-attention needs no window.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import tirx

# The paged prefill kernels of TVM's KV cache that the runtime uses for sliding-window sequences.
SLIDING_PREFILL_SYMBOLS = ("batch_prefill_paged_kv_cpu_sliding_window", "batch_prefill_paged_kv_sliding_window")
CAUSAL_PARAM = 10  # (q, q_indptr, pages, page_indptr, page_values, length_info, k_rope, q_rope, out, lse, causal, ...)


def windowed(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its ``causal`` argument bound to 1 (the window's mask on) and kept in the signature."""
    params = list(func.params)
    causal = params[CAUSAL_PARAM]
    if causal.name != "causal" or len(params) != 15:
        raise ValueError(f"not TVM's paged prefill signature: {[p.name for p in params]}")
    bound = func.specialize({causal: tirx.IntImm("int32", 1)})
    rest = list(bound.params)
    return tirx.PrimFunc([*rest[:CAUSAL_PARAM], tirx.Var("causal_ignored", "int32"), *rest[CAUSAL_PARAM:]], bound.body,
                         bound.ret_type, bound.attrs)


def _symbol(gvar: Any, func: tirx.PrimFunc) -> str:
    attrs = func.attrs
    return str(attrs["global_symbol"]) if attrs is not None and "global_symbol" in attrs else gvar.name_hint


def WindowedHistoryPrefill() -> Any:  # noqa: N802  (a pass, named like TVM's)
    """Swap the sliding-window paged prefill kernels of a module for :func:`windowed` ones."""

    @tvm.transform.module_pass(opt_level=0, name="WindowedHistoryPrefill")
    def apply(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc) and _symbol(gvar, func) in SLIDING_PREFILL_SYMBOLS:
                mod[gvar] = windowed(func)
        return mod

    return apply
