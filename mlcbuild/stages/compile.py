"""compile: mlc-chat-config.json + (quantization, device) -> lib/model.so.

The stage only: its params, key facts, resources, and a call to ``mlcbuild.compiler.build``
(the Relax module, the pass pipeline and the kernels live in ``mlcbuild.compiler``).

Devices: ``cpu`` (llvm for this host's CPU, whose name enters the node key), ``cpu:<mcpu>``
(a named x86-64 level or CPU), ``cuda:sm_XX`` (CUDA via nvcc; no GPU needed to build).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlcbuild.bundle_format import CHAT_CONFIG_FILE, LIBRARY_FILE, SCHEDULE_REPORT_FILE, ScheduleFallback
from mlcbuild.devices import parse_device, target_dict
from mlcbuild.pipeline.stage import Resources, Stage, StageContext, StageError, StageParams
from mlcbuild.recipe import Kernels, LoadedRecipe
from mlcbuild.stages import register_stage
from mlcbuild.toolchain import nvcc_files, nvcc_version, tvm_version

# What a compile node asks a cluster for (see Compile.resources): about twice the peak RSS that
# benchmarks/distributed.py measures (0.9 GiB with nvcc, alike for a 2-layer model and
# SmolLM2-135M's 30: layers share their kernels).
COMPILE_MEMORY = 3 << 29  # 1.5 GiB
NVCC_MEMORY = 1 << 29


class CompileParams(StageParams):
    quantization: str
    device: str
    kernels: Kernels = Kernels()  # the recipe's kernel switches, those of other devices left at default


@register_stage
class Compile(Stage):
    name = "compile"
    version = 5  # 2: CUDA kernels prebuilt with nvcc (fatbin), no tensor-core tensorization; 3: CPU schedules;
    # 4: casts fused into the norms on every target; CUDA graphs for decode; 5: reshape chains
    # folded into views (no copy kernels around attention)
    Params = CompileParams
    thread_safe = False  # TVM keeps process-global builder state

    @classmethod
    def params_for(cls, loaded: LoadedRecipe, axes: dict[str, str]) -> CompileParams:
        device = parse_device(axes["device"])
        # A switch enters only the keys of the devices it concerns: flipping a CUDA kernel on
        # rebuilds no CPU library.
        kernels = loaded.recipe.kernels if device.kind == "cuda" else Kernels()
        return CompileParams(quantization=axes["quantization"], device=device.name, kernels=kernels)

    def toolchain(self, params: CompileParams) -> dict[str, str]:
        # (our kernel schedules are code of this stage: the key covers them, see Stage.code_modules)
        facts = {"tvm": tvm_version(), "target": json.dumps(target_dict(parse_device(params.device)), sort_keys=True)}
        if parse_device(params.device).kind == "cuda":
            facts["nvcc"] = nvcc_version()
        return facts

    def watch_paths(self, params: CompileParams) -> list[Path]:
        return nvcc_files(params.device)

    def resources(self, params: CompileParams) -> Resources:
        # One core (TVM lowers on one thread); memory: TVM's module of every kernel, plus nvcc
        # beside it for CUDA; a CUDA compile needs a worker with nvcc, declared as the custom
        # resource "nvcc".
        if parse_device(params.device).kind == "cuda":
            return Resources(cpus=1, memory_bytes=COMPILE_MEMORY + NVCC_MEMORY, custom={"nvcc": 1})
        return Resources(cpus=1, memory_bytes=COMPILE_MEMORY)

    def run(self, ctx: StageContext) -> None:
        chat = json.loads((ctx.inputs["config"] / CHAT_CONFIG_FILE).read_text(encoding="utf-8"))
        if chat["quantization"] != ctx.params.quantization:
            raise StageError(f"config was generated for {chat['quantization']}, not {ctx.params.quantization}")
        device = parse_device(ctx.params.device)
        out = ctx.out / LIBRARY_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        fallbacks: list[ScheduleFallback] = []
        from mlcbuild.compiler.build import build_library  # imports tvm: only when a node builds

        build_library(chat, device, out, ctx.params.kernels, fallbacks)
        # Never silent: a kernel that fell back to a slower schedule is a warning of this node
        # (kept in its record) and listed in the bundle's manifest by the package stage.
        report = [f.model_dump() for f in fallbacks]
        (ctx.out / SCHEDULE_REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        for fallback in fallbacks:
            ctx.warn(fallback.describe())
        ctx.log(f"compile: {chat['model_type']} {chat['quantization']} for {device.name} in {time.perf_counter() - start:.1f} s")
