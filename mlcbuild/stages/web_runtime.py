"""web_runtime: TVM's web runtime (tvmjs), built with emcc, that every webgpu library links with.

It depends only on the installed TVM, emcc and the headers mlcbuild vendors for it, never on a
model, so one node serves every webgpu compile of every recipe in a run (and, through the cache and
a remote cache, of every later run and machine): a minute of emcc paid once, where a private
directory beside the cache was built again on each machine.
"""

from __future__ import annotations

from pathlib import Path

from mlcbuild.devices import build_problems, parse_device, tool_files
from mlcbuild.pipeline.stage import Resources, Stage, StageContext, StageError, StageParams
from mlcbuild.recipe import LoadedRecipe
from mlcbuild.stages import register_stage


class WebRuntimeParams(StageParams):
    pass


@register_stage
class WebRuntime(Stage):
    name = "web_runtime"
    version = 1
    Params = WebRuntimeParams

    @classmethod
    def params_for(cls, loaded: LoadedRecipe, axes: dict[str, str]) -> WebRuntimeParams:
        return WebRuntimeParams()

    @classmethod
    def preflight(cls, params: WebRuntimeParams) -> list[str]:
        return build_problems(parse_device("webgpu"))

    def toolchain(self, params: WebRuntimeParams) -> dict[str, str]:
        from mlcbuild.compiler.web import runtime_facts

        if problems := build_problems(parse_device("webgpu")):
            raise StageError("; ".join(problems))
        return runtime_facts()

    def resources(self, params: WebRuntimeParams) -> Resources:
        return Resources(cpus=1, memory_bytes=1 << 30, custom={"emcc": 1})

    def watch_paths(self, params: WebRuntimeParams) -> list[Path]:
        return tool_files(parse_device("webgpu"))

    def run(self, ctx: StageContext) -> None:
        from mlcbuild.compiler.web import build_tvmjs_runtime

        build_tvmjs_runtime(ctx.out)
        ctx.log("web_runtime: TVM's web runtime built with emcc")
