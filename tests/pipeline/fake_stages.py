"""Stages defined by the engine's tests: they exercise the pipeline without any LLM code.

Each stage appends its node label to ``$FAKE_STAGE_LOG`` when it runs, so tests can count
exactly which nodes ran, across processes. ``$FAKE_STAGE_PAUSE`` (a stage name) makes that
stage write half its output and then wait, so a test can kill it midway. ``$FAKE_STAGE_HOLD`` (a
path) makes compile nodes wait until that file exists, so a test decides when they finish.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mlcbuild.pipeline.stage import Stage, StageContext, StageParams
from mlcbuild.recipe import LoadedRecipe


def _log(ctx: StageContext, label: str) -> None:
    path = os.environ.get("FAKE_STAGE_LOG")
    if path:
        with open(path, "a") as handle:
            handle.write(label + "\n")


def _maybe_pause(name: str, ctx: StageContext) -> None:
    if os.environ.get("FAKE_STAGE_PAUSE") == name:
        with open(ctx.out / "partial.bin", "wb") as handle:
            handle.write(b"x" * 4096)
            handle.flush()
            Path(os.environ["FAKE_STAGE_PAUSED_FLAG"]).write_text("paused")
            time.sleep(600)


class DownloadParams(StageParams):
    source: str


class FakeDownload(Stage):
    """Copies the source directory, dropping trailing whitespace of each line: so a change that
    only touches whitespace re-runs this node but produces identical bytes (early cutoff)."""

    name = "download"
    version = 1
    Params = DownloadParams

    @classmethod
    def params_for(cls, loaded: LoadedRecipe, axes: dict) -> DownloadParams:
        return DownloadParams(source=str((loaded.directory / loaded.recipe.source).resolve()))

    def source_paths(self, params: DownloadParams) -> list[Path]:
        return [Path(params.source)]

    def key_params(self, params: DownloadParams) -> dict:
        # As the real download stage: the source's content enters the key, not where the
        # checkout lies, so two working copies share keys (and a remote cache).
        return {"source": Path(params.source).name}

    def run(self, ctx: StageContext) -> None:
        _log(ctx, "download")
        for file in sorted(Path(ctx.params.source).iterdir()):
            text = "\n".join(line.rstrip() for line in file.read_text().splitlines())
            (ctx.out / file.name).write_text(text + "\n")


class GenConfigParams(StageParams):
    quantization: str
    context_window_size: int | None


class FakeGenConfig(Stage):
    name = "gen_config"
    version = 1
    Params = GenConfigParams

    @classmethod
    def params_for(cls, loaded: LoadedRecipe, axes: dict) -> GenConfigParams:
        return GenConfigParams(quantization=axes["quantization"],
                               context_window_size=loaded.recipe.overrides.context_window_size)

    def run(self, ctx: StageContext) -> None:
        _log(ctx, f"gen_config[{ctx.params.quantization}]")
        files = sorted(p.name for p in ctx.inputs["source"].iterdir())
        (ctx.out / "config.txt").write_text(
            f"q={ctx.params.quantization} cw={ctx.params.context_window_size} files={files}\n")


class QuantParams(StageParams):
    quantization: str


class FakeConvert(Stage):
    name = "convert_weight"
    version = 1
    Params = QuantParams

    @classmethod
    def params_for(cls, loaded: LoadedRecipe, axes: dict) -> QuantParams:
        return QuantParams(quantization=axes["quantization"])

    def run(self, ctx: StageContext) -> None:
        _log(ctx, f"convert_weight[{ctx.params.quantization}]")
        blob = b"".join(p.read_bytes() for p in sorted(ctx.inputs["source"].iterdir()))
        (ctx.out / "weights").mkdir()
        (ctx.out / "weights" / "w.bin").write_bytes(blob * 3 + ctx.params.quantization.encode())


class CompileParams(StageParams):
    quantization: str
    device: str


class FakeCompile(Stage):
    name = "compile"
    version = int(os.environ.get("FAKE_COMPILE_VERSION", "1"))
    Params = CompileParams

    @classmethod
    def params_for(cls, loaded: LoadedRecipe, axes: dict) -> CompileParams:
        return CompileParams(quantization=axes["quantization"], device=axes["device"])

    def toolchain(self, params: CompileParams) -> dict[str, str]:
        return {"fakecc": os.environ.get("FAKE_CC_VERSION", "1.0")}

    def run(self, ctx: StageContext) -> None:
        _log(ctx, f"compile[{ctx.params.quantization},{ctx.params.device}]")
        if os.environ.get("FAKE_COMPILE_FAIL") == ctx.params.device:
            raise RuntimeError(f"compiler exploded for {ctx.params.device}")
        _maybe_pause("compile", ctx)
        hold = os.environ.get("FAKE_STAGE_HOLD")
        deadline = time.time() + 60
        while hold and not os.path.exists(hold) and time.time() < deadline:
            time.sleep(0.02)
        delay = float(os.environ.get("FAKE_STAGE_DELAY", "0"))
        time.sleep(delay)
        config = (ctx.inputs["config"] / "config.txt").read_text()
        (ctx.out / "lib.so").write_text(f"library for {ctx.params.device} from {config}")
        os.chmod(ctx.out / "lib.so", 0o755)


class FakePackage(Stage):
    name = "package"
    version = 1
    Params = CompileParams
    records_lineage = True

    @classmethod
    def params_for(cls, loaded: LoadedRecipe, axes: dict) -> CompileParams:
        return CompileParams(quantization=axes["quantization"], device=axes["device"])

    def run(self, ctx: StageContext) -> None:
        _log(ctx, f"package[{ctx.params.quantization},{ctx.params.device}]")
        for name, directory in sorted(ctx.inputs.items()):
            for file in sorted(directory.rglob("*")):
                if file.is_file():
                    target = ctx.out / file.relative_to(directory)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(file.read_bytes())
        (ctx.out / "lineage.txt").write_text("\n".join(f"{k} {v}" for k, v in sorted(ctx.lineage.items())))


STAGES = [FakeDownload, FakeGenConfig, FakeConvert, FakeCompile, FakePackage]
