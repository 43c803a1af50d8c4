"""Stages for benchmarks/noop_run.py: a download that links a multi-GB source into the cache and
light downstream stages, so the benchmark measures the engine, not a compiler."""

from __future__ import annotations

import os
from pathlib import Path

from mlcbuild.pipeline.stage import Stage, StageContext, StageParams
from mlcbuild.recipe import LoadedRecipe


class SourceParams(StageParams):
    source: str


class LinkDownload(Stage):
    name = "download"
    version = 1
    Params = SourceParams

    @classmethod
    def params_for(cls, loaded: LoadedRecipe, axes: dict) -> SourceParams:
        return SourceParams(source=str((loaded.directory / loaded.recipe.source).resolve()))

    def source_paths(self, params: SourceParams) -> list[Path]:
        return [Path(params.source)]

    def run(self, ctx: StageContext) -> None:
        for file in sorted(Path(ctx.params.source).iterdir()):
            os.link(file, ctx.out / file.name)


class AxisParams(StageParams):
    axes: dict[str, str]


def _small(stage_name: str) -> type[Stage]:
    class Small(Stage):
        name = stage_name
        version = 1
        Params = AxisParams

        @classmethod
        def params_for(cls, loaded: LoadedRecipe, axes: dict) -> AxisParams:
            return AxisParams(axes=axes)

        def run(self, ctx: StageContext) -> None:
            names = sorted(p.name for d in ctx.inputs.values() for p in d.iterdir())
            (ctx.out / f"{stage_name}.txt").write_text(f"{ctx.params.axes} {names}\n")

    Small.__name__ = f"Small_{stage_name}"
    return Small


STAGES = [LinkDownload] + [_small(n) for n in ("gen_config", "convert_weight", "compile", "package")]
