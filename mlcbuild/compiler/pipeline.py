"""The Relax pass pipeline from a model's Relax module to VM code: bounds, fusion, the device's kernel
schedules (``compiler.kernels``), memory planning, lowering."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mlcbuild.bundle_format import ScheduleFallback
from mlcbuild.recipe import Kernels


def relax_pipeline(target: Any, metadata: dict[str, Any], bounds: dict[str, int], kernels: Kernels = Kernels(),
                   fallbacks: list[ScheduleFallback] | None = None) -> Any:
    """The pipeline for ``target``: llvm targets get the CPU kernels, GPU targets CUDA's schedules
    (``compiler.kernels.cuda_schedule``) with dlight for the rest."""
    import tvm
    from tvm import relax

    if target.kind.name == "llvm":
        from mlcbuild.compiler.kernels import CPUSchedule

        # TVM's default llvm lowering applies no schedule (and dlight's cpu rules made codegen
        # ~10x slower without speeding decode up): our rules do GEMV/GEMM/attention by hand.
        sliding = (metadata.get("sliding_window_size") or -1) > 0
        schedule = CPUSchedule(target, replace_attention=not sliding, fallbacks=fallbacks)
        after_memory_plan = []
    else:
        from mlcbuild.compiler.kernels.cuda_schedule import CUDASchedule

        # Every GPU kind gets these schedules (TVM lowers their warp reductions for the target's
        # warp size: 64 on CDNA, 32 on CUDA/RDNA/Apple, none on WebGPU/OpenCL); the kernel switches
        # and CUDA graphs are CUDA's alone.
        is_cuda = target.kind.name == "cuda"
        if not is_cuda:
            kernels = Kernels()
        # Decode GEMVs (dequantize fused, batch-dispatched) by our rule, the rest by dlight.
        # TVM 0.27's tensor-core path of dlight's Matmul rule segfaults inside
        # s_tir::Tensorize on our fused f16 matmuls (any hidden size >= 128, sm_80 and sm_90);
        # the attribute keeps the rule's tiled shared-memory schedule without tensorizing.
        schedule = tvm.transform.Sequential([
            _annotate("dlight.do_not_tensorize", True, prim_funcs=True),
            CUDASchedule(target, integer_dot_batch1=kernels.cuda_integer_dot_batch1,
                         decode_attention=kernels.cuda_decode_attention, fallbacks=fallbacks),
        ])
        # A small model's decode step is launch-bound (~10 kernels per layer, ~8 us each from the
        # host; SmolLM2 batch 1 on an H100: 379 -> 638 tok/s): the static stretches between two
        # KV-cache attention calls become CUDA graphs, captured once per batch size (as MLC LLM
        # does) and replayed on later steps.
        after_memory_plan = [
            _annotate("relax.rewrite_cuda_graph.capture_symbolic_vars", ["batch_size"], names=("decode", "batch_decode")),
            relax.transform.RewriteCUDAGraph(),
        ] if is_cuda else []
    # A sliding-window model's prefill: each query row sees exactly its window (kernels/sliding_window.py).
    windowed = []
    if (metadata.get("sliding_window_size") or -1) > 0:
        from mlcbuild.compiler.kernels.sliding_window import WindowedHistoryPrefill

        windowed = [WindowedHistoryPrefill()]
    return tvm.transform.Sequential(
        [*windowed, _upper_bounds(bounds), *fusion_passes(), schedule,
         *lowering_passes(metadata, after_memory_plan=after_memory_plan)],
        name="MlcbuildPipeline",
    )


def fusion_passes(transpose_fusion: bool = True) -> list[Any]:
    """Relax passes before scheduling: legalize, fuse, and our fusions (dequantize into matmul,
    casts into norms). ``transpose_fusion``: NT matmuls read the weight as stored (without it
    every 16/32-bit matmul first copies its weight into a transpose, every call)."""
    from tvm import relax

    from mlcbuild.compiler.fusion import FuseCastsIntoNorm, FuseDequantizeMatmul

    return [
        # A reshape of a reshape (the model's head split, then the KV cache's flattening of batch
        # and sequence, and back after attention) would be fused into one TIR copy kernel that
        # RewriteDataflowReshape cannot see as a view: 2 copy kernels per layer and step.
        relax.transform.RemoveRedundantReshape(),
        *([relax.transform.FuseTransposeMatmul()] if transpose_fusion else []),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        FuseDequantizeMatmul(),
        FuseCastsIntoNorm(),
        relax.transform.DeadCodeElimination(),
    ]


def lowering_passes(metadata: dict[str, Any] | None = None, after_memory_plan: Sequence[Any] = (),
                    kill_after_last_use: bool = True) -> list[Any]:
    """Relax passes after scheduling, down to VM code (``_metadata()`` added when given)."""
    from tvm import relax

    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        *after_memory_plan,
        *([_AttachMetadata(metadata)] if metadata is not None else []),
        relax.transform.LowerAllocTensor(),
        *([relax.transform.KillAfterLastUse()] if kill_after_last_use else []),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def _annotate(key: str, value: Any, prim_funcs: bool = False, names: Sequence[str] | None = None) -> Any:
    """A module pass setting attribute ``key`` on the Relax functions (``prim_funcs``: the
    PrimFuncs) of a module, or only on those named in ``names``."""
    import tvm
    from tvm import relax, tirx

    kind = tirx.PrimFunc if prim_funcs else relax.Function

    @tvm.transform.module_pass(opt_level=0, name=f"Annotate({key})")
    def annotate(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, kind) and (names is None or gvar.name_hint in names):
                mod[gvar] = func.with_attr(key, value)
        return mod

    return annotate


def _upper_bounds(bounds: dict[str, int]) -> Any:
    """Upper bounds of the symbolic sizes let static memory planning preallocate activations."""
    return _annotate("tir_var_upper_bound", bounds, names=("prefill", "decode", "batch_prefill", "batch_decode", "batch_verify", "embed"))


def _AttachMetadata(metadata: dict[str, Any]) -> Any:  # noqa: N802  (a pass, named like TVM's)
    """Adds ``_metadata() -> str`` (JSON) to the module."""
    import tvm
    from tvm import relax

    text = json.dumps(metadata, sort_keys=True)

    @tvm.transform.module_pass(opt_level=0, name="AttachMetadata")
    def attach(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        bb = relax.BlockBuilder()
        with bb.function("_metadata", params=[]):
            bb.emit_func_output(tvm.ir.StringImm(text))
        mod["_metadata"] = bb.finalize()["_metadata"].with_attr("global_symbol", "_metadata")
        return mod

    return attach
