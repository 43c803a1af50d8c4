"""compile: mlc-chat-config.json + (quantization, device) -> lib/model.so.

The stage only: its params, key facts, resources, and a call to ``mlcbuild.compiler.build``
(the Relax module, the pass pipeline and the kernels live in ``mlcbuild.compiler``).

Devices are ``mlcbuild.devices``' registry: its entry for the node's device gives the target, the
toolchain facts of the key, the tools the node needs and the library file it writes.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

from mlcbuild.bundle_format import CHAT_CONFIG_FILE, SCHEDULE_REPORT_FILE, ScheduleFallback
from mlcbuild.devices import build_problems, parse_device, tool_files, toolchain_facts
from mlcbuild.pipeline.stage import Resources, Stage, StageContext, StageError, StageParams
from mlcbuild.recipe import Kernels, LoadedRecipe
from mlcbuild.stages import key_params_sharded, register_stage

# What a compile node asks a cluster for (see Compile.resources): about twice the peak RSS that
# benchmarks/distributed.py measures (0.9 GiB with nvcc, alike for a 2-layer model and
# SmolLM2-135M's 30: layers share their kernels).
COMPILE_MEMORY = 3 << 29  # 1.5 GiB
NVCC_MEMORY = 1 << 29


class CompileParams(StageParams):
    quantization: str
    device: str
    kernels: Kernels = Kernels()  # the recipe's kernel switches, those of other devices left at default
    tensor_parallel_shards: int = 1  # one shard's model, with the all-reduces between shards (models/sharding.py)


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
        return CompileParams(quantization=axes["quantization"], device=device.name, kernels=kernels,
                             tensor_parallel_shards=int(axes.get("tensor_parallel_shards") or 1))

    def key_params(self, params: CompileParams) -> dict:
        return key_params_sharded(params)

    @classmethod
    def preflight(cls, params: CompileParams) -> list[str]:
        """What this machine lacks to build the node (checked by plan/run before any work)."""
        return build_problems(parse_device(params.device))

    def toolchain(self, params: CompileParams) -> dict[str, str]:
        # (our kernel schedules are code of this stage: the key covers them, see Stage.code_modules)
        device = parse_device(params.device)
        problems = build_problems(device)
        if problems:  # the key would name tools that are not there: nothing to build or look up
            raise StageError("; ".join(problems))
        return toolchain_facts(device)

    def preload_modules(self, params: CompileParams) -> list[str]:
        # TVM (through the model definitions: seconds to import) and the compiler's own modules
        return ["mlcbuild.models.base_nn", "mlcbuild.compiler.build"]

    def watch_paths(self, params: CompileParams) -> list[Path]:
        return tool_files(parse_device(params.device))

    def resources(self, params: CompileParams) -> Resources:
        # One core (TVM lowers on one thread); memory: TVM's module of every kernel, plus nvcc
        # beside it for CUDA; a compile needs a worker with its device's tools, each declared as
        # a custom resource named after the tool ("nvcc", "aarch64-linux-gnu-gcc", ...).
        device = parse_device(params.device)
        custom = {tool.command: 1 for tool in device.spec.tools if tool.resource}
        memory = COMPILE_MEMORY + (NVCC_MEMORY if device.kind == "cuda" else 0)
        return Resources(cpus=1, memory_bytes=memory, custom=custom) if custom else Resources(cpus=1, memory_bytes=memory)

    def run(self, ctx: StageContext) -> None:
        chat = json.loads((ctx.inputs["config"] / CHAT_CONFIG_FILE).read_text(encoding="utf-8"))
        if chat["quantization"] != ctx.params.quantization:
            raise StageError(f"config was generated for {chat['quantization']}, not {ctx.params.quantization}")
        if chat.get("tensor_parallel_shards", 1) != ctx.params.tensor_parallel_shards:
            raise StageError(f"config was generated for {chat.get('tensor_parallel_shards', 1)} shard(s), "
                             f"not {ctx.params.tensor_parallel_shards}")
        device = parse_device(ctx.params.device)
        out = ctx.out / device.spec.library.file
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        fallbacks: list[ScheduleFallback] = []
        from mlcbuild.compiler.build import build_library  # imports tvm: only when a node builds

        linking = nullcontext()
        if "web_runtime" in ctx.inputs:  # the webgpu library links with the run's web_runtime node
            from mlcbuild.compiler.web import use_runtime

            linking = use_runtime(ctx.inputs["web_runtime"])
        with linking:
            build_library(chat, device, out, ctx.params.kernels, fallbacks)
        # Never silent: a kernel that fell back to a slower schedule is a warning of this node
        # (kept in its record) and listed in the bundle's manifest by the package stage.
        report = [f.model_dump() for f in fallbacks]
        (ctx.out / SCHEDULE_REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        for fallback in fallbacks:
            ctx.warn(fallback.describe())
        ctx.log(f"compile: {chat['model_type']} {chat['quantization']} for {device.name} in {time.perf_counter() - start:.1f} s")
