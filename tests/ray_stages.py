"""Plugin stages for tests/test_ray.py (``MLCBUILD_STAGE_PLUGINS=ray_stages``): the engine's fake
stages, with a compile that asks for the custom resource "nvcc" for CUDA devices, as the real one
does, and fails deterministically for two devices: with a StageError (``cuda:sm_52``) and with
another exception (``cuda:sm_53``); ``cpu:x86-64-v4`` asks for a resource no test node has. A CUDA
compile preloads ``ray_preload`` (which logs where a warm-up imported it)."""

from __future__ import annotations

from fake_stages import STAGES as FAKE_STAGES
from fake_stages import CompileParams, FakeCompile, _log

from mlcbuild.pipeline.stage import Resources, StageContext, StageError


class RayCompile(FakeCompile):
    def resources(self, params: CompileParams) -> Resources:
        if params.device == "cpu:x86-64-v4":  # a resource no node of the test's cluster has
            return Resources(custom={"avx512_host": 1})
        return Resources(custom={"nvcc": 1}) if params.device.startswith("cuda") else Resources()

    def preload_modules(self, params: CompileParams) -> list[str]:
        return ["ray_preload"] if params.device.startswith("cuda") else []

    def run(self, ctx: StageContext) -> None:
        if ctx.params.device == "cuda:sm_52":
            _log(ctx, f"compile[{ctx.params.quantization},{ctx.params.device}]")
            raise StageError("sm_52: this toolchain has no kernels for Maxwell GPUs; build for sm_60 or newer")
        if ctx.params.device == "cuda:sm_53":
            _log(ctx, f"compile[{ctx.params.quantization},{ctx.params.device}]")
            raise ValueError("no kernel table for sm_53")
        super().run(ctx)


STAGES = [cls for cls in FAKE_STAGES if cls.name != "compile"] + [RayCompile]
