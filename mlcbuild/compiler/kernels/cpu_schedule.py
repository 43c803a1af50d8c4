"""Schedules for the PrimFuncs of a Relax module on CPU (llvm targets).

TVM 0.27's llvm pipeline applies no schedule: every kernel runs as the naive loop nest that
legalization produced (a fused dequantize + matmul even materializes the whole dequantized weight
on every call). ``apply_cpu_schedules`` rewrites each unscheduled PrimFunc, after operator fusion
and before ``CallTIRRewrite``:

* matmuls (``cpu_matmul``): decode GEMV -- parallel over output rows, vector partial sums,
  4-bit dequantization in registers with the scale and zero point factored out of the inner
  loop -- and prefill GEMM -- fp32 weight panels + register-blocked micro-kernel; on CPUs with
  AVX-512 VNNI the 4-bit decode GEMV runs on integer dot products instead (``cpu_qgemv_vnni``);
* the paged-KV-cache attention kernels TVM generates for CPU are replaced by vectorized ones with
  the same signatures (``cpu_attention``), when the cache does not apply RoPE inline;
* row reductions (rms_norm, softmax), elementwise chains and the fused RoPE (``cpu_generic``),
  with ``exp``/``sigmoid`` as vectorizable arithmetic (``_tir_math``) instead of a libm call per element;
* other functions that already carry ``tirx.is_scheduled`` are left alone.

A rule that does not apply (it returns None or raises ``NotMatched``) passes the function on to the
next rule, silently. A rule that applies and fails (any other exception) is not silent: the
function falls back to the next rule, or stays unscheduled (a slower kernel), and the fallback is
logged and collected (``ScheduleFallback``: the compile stage lists them in the node record and
the bundle manifest). ``last_report()`` says which rule scheduled which function.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import tvm
from tvm import tirx

from mlcbuild.bundle_format import ScheduleFallback
from mlcbuild.compiler.kernels import cpu_attention, cpu_generic, cpu_matmul, cpu_qgemv_vnni, matmul_analysis
from mlcbuild.compiler.kernels.cpu_tuning import INTEL, CPUTuning, tuning_for
from mlcbuild.compiler.kernels._tir_math import vectorizable_transcendentals
from mlcbuild.compiler.kernels._tir_expr import as_int, is_scheduled

log = logging.getLogger(__name__)

# Decode batches up to this many rows use the GEMV kernel (weights streamed once per row chunk);
# more rows (prefill) use the GEMM kernel.
GEMV_MAX_ROWS = 8

_REPORT: dict[str, str] = {}

# (rule name, the exception) -> None: where a rule that applied and failed is reported
OnFailure = Callable[[str, BaseException], None]

# Relax functions whose sequence-shaped matmuls see a handful of rows (speculative verification: each
# sequence's last token and its draft), and the PrimFunc attribute that marks their own copies.
FEW_ROW_FUNCTIONS = ("batch_verify",)
FEW_ROWS_ATTR = "mlcbuild.few_rows"


def split_few_row_matmuls(mod: tvm.IRModule) -> tvm.IRModule:
    """Give each matmul that a :data:`FEW_ROW_FUNCTIONS` function shares with prefill a copy of its own,
    marked :data:`FEW_ROWS_ATTR`, so that it gets the multi-row GEMV (each weight read once) instead of the
    prefill GEMM (which first widens every weight column tile into a float32 panel: 3.4x a decode step
    for 2 rows of SmolLM2 q0f16). Relax's BlockBuilder deduplicates structurally equal PrimFuncs, so
    without the copy both functions call one kernel."""
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    copies: dict[str, tvm.ir.GlobalVar | None] = {}

    @relax.expr_functor.mutator
    class Retarget(relax.PyExprMutator):
        def copy_of(self, gvar: tvm.ir.GlobalVar) -> tvm.ir.GlobalVar | None:
            if gvar.name_hint not in copies:
                func = mod[gvar]
                try:
                    info, _ = matmul_analysis.analyze(func)
                except matmul_analysis.NotMatched:
                    info = None
                # Every matmul over a symbolic row count: its rows are the few verified tokens here even
                # where the shared PrimFunc names them otherwise (the lm_head is shared with batch_prefill's
                # logits, [1, batch_size]: not sequence-like, so it ran as a decode GEMV once per row).
                copies[gvar.name_hint] = self.builder_.add_func(func.with_attr(FEW_ROWS_ATTR, True),
                                                                f"{gvar.name_hint}_few_rows") \
                    if info is not None and info.dyn_m else None
            return copies[gvar.name_hint]

        def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802  (TVM's visitor name)
            call = super().visit_call_(call)
            if call.op.same_as(call_tir) and isinstance(call.args[0], tvm.ir.GlobalVar) \
                    and isinstance(mod[call.args[0]], tirx.PrimFunc):
                target = self.copy_of(call.args[0])
                if target is not None:
                    return relax.Call(call.op, [target, *call.args[1:]], call.attrs, call.ty_args)
            return call

    retarget = Retarget(mod)
    for gvar, func in list(mod.functions_items()):
        if gvar.name_hint in FEW_ROW_FUNCTIONS and isinstance(func, relax.Function):
            retarget.builder_.update_func(gvar, retarget.visit_expr(func))
    return retarget.builder_.get()


def vector_lanes(target: Any) -> int:
    """float32 lanes of the target's widest vector unit."""
    from tvm.target import codegen

    for feature, lanes in (("avx512f", 16), ("avx2", 8), ("avx", 8)):
        try:
            if codegen.target_has_features([feature], target):
                return lanes
        except Exception:  # noqa: BLE001  (non-x86 triple)
            break
    return 4


def _schedule_matmul(func: Any, lanes: int, vnni: bool = False, on_failure: OnFailure | None = None,
                     tuning: CPUTuning = INTEL) -> tuple[Any, str] | None:
    try:
        info, _ = matmul_analysis.analyze(func)
    except matmul_analysis.NotMatched:
        return None
    rows = as_int(matmul_analysis._m_total(info))
    few_rows = bool(func.attrs and func.attrs.get(FEW_ROWS_ATTR))
    candidates = []
    if (info.dyn_m and info.seq_like and not few_rows) or (rows is not None and rows > GEMV_MAX_ROWS):
        candidates.append(("gemm", lambda: cpu_matmul.build_gemm(info, lanes)))
    gq = matmul_analysis.match_group_quant(info)
    if few_rows and gq is None:
        candidates.append(("gemv-few-rows", lambda: cpu_matmul.build_gemv_few_rows(
            info, lanes, block=tuning.few_rows_block, weight_rows=tuning.few_rows_weight_rows,
            prefetch_bytes=tuning.prefetch_bytes,
            x_widen_bytes=tuning.few_rows_x_widen_bytes)))
    if gq is not None:
        if vnni:
            candidates.append(("gemv-q-vnni", lambda: cpu_qgemv_vnni.build(info, gq, prefetch_bytes=tuning.prefetch_bytes)))
        candidates.append(("gemv-q", lambda: cpu_matmul.build_gemv_q(info, gq, lanes, prefetch_bytes=tuning.prefetch_bytes)))
    candidates.append(("gemv", lambda: cpu_matmul.build_gemv(info, lanes, rows=tuning.gemv_rows,
                                                             prefetch_bytes=tuning.prefetch_bytes)))
    # most specific first; a kernel that does not apply, or fails, falls back to the next one
    for name, build in candidates:
        try:
            return build(), name
        except matmul_analysis.NotMatched:
            continue
        except Exception as err:  # noqa: BLE001  (reported below; the next kernel is tried)
            _failed(on_failure, name, err)
    return None


def schedule_func(func: Any, lanes: int, vnni: bool = False, on_failure: OnFailure | None = None,
                  tuning: CPUTuning = INTEL) -> tuple[Any, str] | None:
    """The scheduled function and the rule's name, or None (no rule applies, or every one that
    did failed). A rule that applies and fails is passed to ``on_failure``; without one, it raises.
    ``tuning``: the CPU family's choices (``cpu_tuning.tuning_for(target)``)."""
    result = _schedule_matmul(func, lanes, vnni, on_failure, tuning)
    if result is not None:
        return result
    for rule, name in (
        (cpu_generic.schedule_row_reduction, "reduction"),
        (cpu_generic.schedule_injective, "injective"),
        (cpu_generic.schedule_head_invariant, "head-invariant"),
    ):
        try:
            new = rule(func, lanes)
        except matmul_analysis.NotMatched:
            continue
        except Exception as err:  # noqa: BLE001  (reported below; the next rule is tried)
            _failed(on_failure, name, err)
            continue
        if new is not None:
            return new, name
    return None


def _failed(on_failure: OnFailure | None, rule: str, err: BaseException) -> None:
    if on_failure is None:
        raise err
    on_failure(rule, err)


def _touches_bfloat16(func: Any) -> bool:
    return "bfloat16" in func.script(show_meta=False)


def _carry_attrs(new: Any, old: Any) -> Any:
    attrs = {}
    if old.attrs is not None:
        for key in old.attrs.keys():
            attrs[str(key)] = old.attrs[key]
    attrs["tirx.is_scheduled"] = True
    attrs["tirx.noalias"] = True
    return new.with_attrs(attrs)


def apply_cpu_schedules(mod: tvm.IRModule, target: tvm.target.Target, replace_attention: bool = True,
                        fallbacks: list[ScheduleFallback] | None = None) -> tvm.IRModule:
    """Schedule every unscheduled PrimFunc of ``mod`` for the llvm ``target`` and return the new
    module (``mod`` itself is not modified). Non-llvm targets and already scheduled functions
    pass through unchanged. ``replace_attention=False`` keeps TVM's attention kernels: a
    sliding-window KV cache applies RoPE inline, which our attention kernels do not support.
    Every rule that applied and failed is logged and added to ``fallbacks``."""
    _REPORT.clear()
    if target.kind.name != "llvm":
        return mod
    mod = split_few_row_matmuls(mod.clone())
    lanes = vector_lanes(target)
    vnni = cpu_qgemv_vnni.supported(target)
    tuning = tuning_for(target)
    updates = {}
    start = time.perf_counter()

    def fell_back(function: str, rule: str, err: BaseException) -> None:
        fallback = ScheduleFallback.from_error(function, rule, err)
        # a warning unless the caller collects them (the compile stage warns about each itself)
        log.log(logging.WARNING if fallbacks is None else logging.INFO, "cpu schedule: %s", fallback.describe())
        if fallbacks is not None:
            fallbacks.append(fallback)

    try:
        attention = cpu_attention.replacements(mod) if replace_attention else {}
    except Exception as err:  # noqa: BLE001  (TVM's attention kernels stay: recorded)
        fell_back("attention kernels", "attention", err)
        attention = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gvar.name_hint
        if _touches_bfloat16(func):
            # LLVM's vectorized bf16 <-> uint16 storage breaks our rules' codegen (dtype
            # mismatch on BufferStore); these functions keep TVM's default lowering.
            _REPORT[name] = "none (bfloat16)"
            continue
        if name in attention:
            updates[gvar] = _carry_attrs(attention[name], func)
            _REPORT[name] = "attention"
            continue
        if is_scheduled(func):
            continue
        failed: list[str] = []

        def on_failure(rule: str, err: BaseException, name: str = name) -> None:
            failed.append(rule)
            fell_back(name, rule, err)

        try:
            result = schedule_func(vectorizable_transcendentals(func), lanes, vnni, on_failure, tuning)
        except Exception as err:  # noqa: BLE001  (a rule bug must not break the build: recorded)
            on_failure("schedule", err)
            result = None
        if result is None:
            _REPORT[name] = f"failed: {', '.join(failed)}" if failed else "none"
            continue
        new, rule = result
        updates[gvar] = _carry_attrs(new, func)
        _REPORT[name] = rule
    for gvar, func in updates.items():
        mod[gvar] = func
    log.info("cpu schedules (%s): %d functions in %.1f s", tuning.family, len(updates), time.perf_counter() - start)
    return mod


def last_report() -> dict[str, str]:
    """PrimFunc name -> the rule that scheduled it in the last ``apply_cpu_schedules`` call."""
    return dict(_REPORT)


@tvm.transform.module_pass(opt_level=0, name="MlcbuildCPUSchedule")
class CPUSchedule:
    """``apply_cpu_schedules`` as a module pass (target: the argument, else Target.current())."""

    def __init__(self, target: Any = None, replace_attention: bool = True,
                 fallbacks: list[ScheduleFallback] | None = None):
        self.target = target
        self.replace_attention = replace_attention
        self.fallbacks = fallbacks

    def transform_module(self, mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=False)
        return apply_cpu_schedules(mod, target, replace_attention=self.replace_attention, fallbacks=self.fallbacks)
