"""package: assemble one bundle per (quantization, device) with its manifest.

The bundle holds the chat config and tokenizer files, the weight shards and their index, the
compiled library, and ``manifest.json`` naming the recipe (its fields, and the sha256 of the recipe
and lock files), the key of every node that made the bundle, every file's size, xxh3 and sha256
(one read gives both), and the tool versions. Nothing in it depends on the time
or the machine beyond what the node key already covers, so two clean builds of one recipe with
one toolchain give byte-identical bundles.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import tarfile
from importlib import metadata
from pathlib import Path

from mlcbuild import __version__
from mlcbuild.atomicfile import write_atomic
from mlcbuild.bundle_format import (CHAT_CONFIG_FILE, MANIFEST_FILE, SCHEDULE_REPORT_FILE, SOURCE_INFO_FILE, ChatConfig,
                                   Manifest, ManifestFile, RecipeFile, ScheduleFallback)
from mlcbuild.devices import library_info, parse_device, tool_files, toolchain_facts
from mlcbuild.cache.digests import file_digests, iter_files
from mlcbuild.pipeline.stage import Stage, StageContext, StageError, StageParams
from mlcbuild.recipe import LoadedRecipe
from mlcbuild.stages import register_stage
from mlcbuild.sources import HF_SCHEME
from mlcbuild.sources.lock import lock_path
from mlcbuild.toolchain import host_cpu

# Files of the inputs that are bookkeeping of the build, not part of a bundle.
_NOT_BUNDLED = {SOURCE_INFO_FILE, SCHEDULE_REPORT_FILE}


class PackageParams(StageParams):
    name: str
    quantization: str
    device: str
    recipe: dict  # the recipe fields that shaped this bundle (recorded in the manifest)
    # The recipe file and (Hub sources) its lock, by name and sha256: provenance materials.
    recipe_files: tuple[RecipeFile, ...] = ()
    # The recipe's sampling defaults (recipe.Generation, unset fields left out), written into the
    # bundle's chat config here rather than by gen_config: changing them re-runs this stage only,
    # never the weight conversion or the compile that read gen_config's output.
    generation: dict = {}


@register_stage
class Package(Stage):
    name = "package"
    version = 1
    Params = PackageParams
    records_lineage = True

    @classmethod
    def params_for(cls, loaded: LoadedRecipe, axes: dict[str, str]) -> PackageParams:
        r = loaded.recipe
        generation = r.generation.model_dump(exclude_none=True)
        return PackageParams(
            name=r.name,
            quantization=axes["quantization"],
            device=axes["device"],
            recipe={
                "name": r.name,
                "source": r.source,
                "revision": r.revision,
                "conv_template": r.conv_template,
                "quantization": axes["quantization"],
                "device": axes["device"],
                "overrides": r.overrides.model_dump(exclude_none=True),
                **({"generation": generation} if generation else {}),
                # the shard count of this bundle (its library is one shard's model; see models/sharding.py)
                **({"tensor_parallel_shards": int(axes["tensor_parallel_shards"])}
                   if int(axes.get("tensor_parallel_shards") or 1) > 1 else {}),
            },
            recipe_files=_recipe_files(loaded),
            generation=generation,
        )

    def toolchain(self, params: PackageParams) -> dict[str, str]:
        tools = {
            "mlcbuild": __version__,
            "python": platform.python_version(),
            "tvm": metadata.version("apache-tvm"),
        }
        device = parse_device(params.device)
        if device.kind == "cpu" and device.arch is None:
            tools["host_cpu"] = host_cpu()  # "cpu" compiles for this host's CPU: the provenance names it
        # the versions of the device's tools (nvcc, the cross compiler, emcc, ...): the manifest names them
        tools.update({name: value for name, value in toolchain_facts(device).items() if name not in ("tvm", "target")})
        return tools

    def watch_paths(self, params: PackageParams) -> list[Path]:
        return tool_files(parse_device(params.device))

    def run(self, ctx: StageContext) -> None:
        placed: dict[str, str] = {}
        for input_name in ("config", "weights", "library"):
            root = ctx.inputs[input_name]
            for file in iter_files(root):
                rel = file.relative_to(root).as_posix()
                if rel in _NOT_BUNDLED:
                    continue
                if rel in placed:
                    raise StageError(f"package: {rel} comes from both {placed[rel]} and {input_name}")
                placed[rel] = input_name
                target = ctx.out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(file, target)  # inputs are immutable blobs: linking costs nothing
        if ctx.params.generation:
            _apply_generation(ctx.out / CHAT_CONFIG_FILE, ctx.params.generation)
        source_info = ctx.inputs["source"] / SOURCE_INFO_FILE
        source = json.loads(source_info.read_text()) if source_info.exists() else {}
        report = ctx.inputs["library"] / SCHEDULE_REPORT_FILE
        fallbacks = [ScheduleFallback.model_validate(f) for f in json.loads(report.read_text())] if report.exists() else []
        files = []
        for rel in sorted(placed):
            digest, sha256 = file_digests(ctx.out / rel)
            files.append(ManifestFile(path=rel, digest=digest, size=(ctx.out / rel).stat().st_size, sha256=sha256))
        manifest = Manifest(
            name=ctx.params.name,
            quantization=ctx.params.quantization,
            device=ctx.params.device,
            recipe=ctx.params.recipe,
            node_keys=dict(sorted(ctx.lineage.items())),
            tools=dict(sorted(ctx.toolchain.items())),
            source=source,
            recipe_files=list(ctx.params.recipe_files),
            schedule_fallbacks=fallbacks,
            library=library_info(parse_device(ctx.params.device), ctx.toolchain.get("tvm") or metadata.version("apache-tvm")),
            files=files,
        )
        (ctx.out / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        ctx.log(f"bundle of {len(files)} files, {sum(f.size for f in files) / 1e6:.1f} MB")


def _apply_generation(chat_config: Path, generation: dict) -> None:
    """Rewrite the bundle's chat config with the recipe's sampling defaults. The file is a hard
    link to gen_config's cached output: it is replaced (a new file renamed over it), never written
    through."""
    chat = ChatConfig.model_validate_json(chat_config.read_bytes())
    update = {name: generation[name] for name in ("temperature", "top_p", "top_k", "repetition_penalty")
              if name in generation}
    if "temperature" in generation:
        update["do_sample"] = generation["temperature"] > 0  # the recipe's choice wins over the checkpoint's
    if "max_tokens" in generation:
        update["max_new_tokens"] = generation["max_tokens"]
    chat = ChatConfig.model_validate({**chat.model_dump(by_alias=True), **update})
    write_atomic(chat_config, chat.model_dump_json(by_alias=True, indent=2) + "\n")


def _recipe_files(loaded: LoadedRecipe) -> tuple[RecipeFile, ...]:
    """The recipe file and, for a Hub source, its lock (written by the download stage's params,
    which the graph makes first), each with its sha256."""
    import hashlib

    paths = [loaded.path]
    lock = lock_path(loaded.path)
    if loaded.recipe.source[: len(HF_SCHEME)].upper() == HF_SCHEME and lock.exists():
        paths.append(lock)
    return tuple(RecipeFile(name=p.name, sha256=hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths)


def write_bundle_tar(bundle: Path, dest: Path) -> Path:
    """A reproducible .tar.gz of a bundle: sorted entries, fixed mtime, uid/gid 0, no user names,
    normalized modes, and a gzip header without a timestamp."""
    bundle = Path(bundle)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            top = bundle.name
            for file in iter_files(bundle):
                rel = file.relative_to(bundle).as_posix()
                info = tarfile.TarInfo(f"{top}/{rel}")
                info.size = file.stat().st_size
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o755 if os.access(file, os.X_OK) else 0o644
                with open(file, "rb") as handle:
                    tar.addfile(info, handle)
    os.replace(tmp, dest)
    return dest
