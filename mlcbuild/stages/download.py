"""The download stage: turn the recipe's source into a Hugging Face-format checkpoint directory.

Output: ``config.json``, ``generation_config.json``, the tokenizer files, ``*.safetensors``
(+ index) and ``mlcbuild-source.json`` (where the weights came from; the bundle's manifest
records it). Sources (see ``mlcbuild.sources``):

- ``HF://org/repo[@rev]``: the node key is the locked commit plus every file's name, size and
  digest, all carried in the params, so a rebuild neither downloads nor hashes anything;
- a local directory: the params name the files taken from it, and the engine digests their
  content through its stat cache (``source_paths``);
- a ``.gguf`` file (or ``pkg://`` file): digested the same way, dequantized in ``run``.

``params_for`` and ``toolchain`` run on every no-op build, so they read a small lock file and
stat a few paths; ``huggingface_hub``, ``gguf``, ``tokenizers`` and ``torch`` load in ``run``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from importlib import metadata
from pathlib import Path
from typing import Literal

from mlcbuild.bundle_format import SOURCE_INFO_FILE
from mlcbuild.pipeline.stage import Stage, StageContext, StageError, StageParams
from mlcbuild.recipe import LoadedRecipe, RecipeError
from mlcbuild.sources import (
    HubSource,
    LocalSource,
    SourceError,
    has_weights,
    parse_source,
    select_files,
)
from mlcbuild.sources.lock import LockedFile, LockError, SourceLock, lock_path, read_lock, write_lock
from mlcbuild.stages import register_stage


@register_stage
class Download(Stage):
    name = "download"
    version = 1

    class Params(StageParams):
        kind: Literal["hf", "directory", "gguf"]
        # "HF://org/repo", or the absolute path of a directory / .gguf file, or a pkg:// URI
        # (kept as written so that two environments with the package installed share builds).
        source: str
        commit: str | None = None  # hf: the locked commit
        files: tuple[LockedFile, ...] = ()  # hf: the locked files
        names: tuple[str, ...] = ()  # directory: the files taken from it

    @classmethod
    def params_for(cls, loaded: LoadedRecipe, axes: dict) -> "Download.Params":
        source = _parse(loaded)
        if isinstance(source, HubSource):
            lock = locked_source(loaded)
            return cls.Params(kind="hf", source=lock.source, commit=lock.commit, files=lock.files)
        where = source.uri or str(source.path)
        if source.kind == "gguf":
            return cls.Params(kind="gguf", source=where)
        names = select_files(os.listdir(source.path))
        if "config.json" not in names or not has_weights(names):
            raise RecipeError(
                _at(
                    loaded,
                    "source",
                    f"{source.path} holds no config.json and *.safetensors or pytorch_model*.bin; "
                    "name a Hugging Face-format checkpoint directory",
                )
            )
        return cls.Params(kind="directory", source=where, names=tuple(names))

    def source_paths(self, params: "Download.Params") -> list[Path]:
        if params.kind == "hf":
            return []
        path = _local_path(params)
        if params.kind == "gguf":
            return [path]
        return [path / name for name in params.names]

    def watch_paths(self, params: "Download.Params") -> list[Path]:
        # params_for picks a local checkout's files by listing its directory
        return [_local_path(params)] if params.kind == "directory" else []

    def key_params(self, params: "Download.Params") -> dict:
        # A local source's content enters the key through source_paths; where the checkout
        # lies does not, so two clones of a repository build the same keys.
        return {**params.model_dump(mode="json"), "source": _portable(params)}

    def toolchain(self, params: "Download.Params") -> dict[str, str]:
        # Only tools that shape the output bytes: a verified Hub download is the same bytes
        # whatever huggingface_hub version fetched it.
        if params.kind == "gguf":
            return {pkg: _version(pkg) for pkg in ("gguf", "numpy", "tokenizers")}
        names = [f.name for f in params.files] if params.kind == "hf" else list(params.names)
        if any(n.endswith(".bin") for n in names):
            return {pkg: _version(pkg) for pkg in ("torch", "safetensors")}
        return {}

    def run(self, ctx: StageContext) -> None:
        params: Download.Params = ctx.params
        try:
            if params.kind == "hf":
                info = _run_hub(ctx, params)
            elif params.kind == "directory":
                info = _run_directory(ctx, params)
            else:
                info = _run_gguf(ctx, params)
        except SourceError as exc:
            raise StageError(str(exc)) from None
        (ctx.out / SOURCE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _portable(params: "Download.Params") -> str:
    """The source as recorded in keys and outputs: Hub and pkg:// names as they are, a local
    path by its file or directory name only (its content is what identifies it)."""
    if params.kind == "hf" or params.source.startswith("pkg://"):
        return params.source
    return Path(params.source).name


# -- lock handling (also used by `mlcbuild lock`) -------------------------------------------
def locked_source(loaded: LoadedRecipe) -> SourceLock:
    """The lock of a recipe whose source is on the Hub: read from ``<recipe>.lock``, or resolved
    through the Hub and written there when there is none yet (or when the recipe now names
    another repository or revision than the lock). Never moves an existing lock forward."""
    source = _parse(loaded)
    if not isinstance(source, HubSource):
        raise RecipeError(
            _at(loaded, "source", f"{loaded.recipe.source} is not a Hub source; only HF:// sources are locked")
        )
    path = lock_path(loaded.path)
    try:
        lock = read_lock(path)
    except LockError as exc:
        raise RecipeError(str(exc)) from None
    if lock is not None and lock.matches(source.uri, source.revision):
        return lock
    return _resolve_and_write(loaded, source, path)


def update_lock(loaded: LoadedRecipe) -> Path:
    """Resolve the recipe's revision anew (the Hub's newest commit for a branch) and rewrite
    ``<recipe>.lock``; return its path. The one way a lock moves to a newer commit."""
    source = _parse(loaded)
    if not isinstance(source, HubSource):
        raise RecipeError(
            _at(loaded, "source", f"{loaded.recipe.source} is a local {source.kind}; only HF:// sources have a lock")
        )
    path = lock_path(loaded.path)
    _resolve_and_write(loaded, source, path)
    return path


def _resolve_and_write(loaded: LoadedRecipe, source: HubSource, path: Path) -> SourceLock:
    from mlcbuild.sources import hf_hub

    try:
        lock = hf_hub.resolve(source)
    except SourceError as exc:
        raise RecipeError(_at(loaded, "source", str(exc))) from None
    write_lock(path, lock)
    return lock


# -- running -------------------------------------------------------------------------------
def _run_hub(ctx: StageContext, params: "Download.Params") -> dict:
    from mlcbuild.sources import hf_hub

    assert params.commit is not None
    lock = SourceLock(source=params.source, revision=params.commit, commit=params.commit, files=params.files)
    hf_hub.fetch(lock, ctx.out, lock_name="the recipe's lock file", log=ctx.log, progress=ctx.progress)
    converted = _convert_bin(ctx.out, ctx.log)
    return {"format": "huggingface", "source": params.source, "commit": params.commit, **converted}


def _run_directory(ctx: StageContext, params: "Download.Params") -> dict:
    root = _local_path(params)
    total = sum((root / n).stat().st_size for n in params.names)
    done = 0
    for name in params.names:
        # A copy, not a link: the user may edit their checkpoint in place, which must not
        # reach into the artifact cache.
        shutil.copyfile(root / name, ctx.out / name)
        done += (ctx.out / name).stat().st_size
        ctx.progress(done, total)
    converted = _convert_bin(ctx.out, ctx.log)
    return {"format": "huggingface", "source": _portable(params), **converted}


def _run_gguf(ctx: StageContext, params: "Download.Params") -> dict:
    from mlcbuild.sources import gguf

    info = gguf.convert(_local_path(params), ctx.out, log=ctx.log, progress=ctx.progress)
    return {**info, "source": _portable(params)}


def _convert_bin(out: Path, log) -> dict:
    """Rewrite ``pytorch_model*.bin`` as safetensors (shard for shard, index renamed), so later
    stages read one format. Needs torch; without it the .bin files stay as they are."""
    bins = sorted(out.glob("pytorch_model*.bin"))
    if not bins:
        return {}
    try:
        import torch
        from safetensors.torch import save_file
    except ImportError:
        log("torch is not installed: keeping the pytorch_model*.bin weights as they are")
        return {"weights": "pytorch-bin"}
    renamed = {b.name: re.sub(r"^pytorch_model", "model", b.name)[: -len(".bin")] + ".safetensors" for b in bins}
    for binary in bins:
        log(f"converting {binary.name} to {renamed[binary.name]}")
        state = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
        # clone(): tied weights share storage in a .bin, which safetensors refuses.
        save_file(
            {k: v.detach().contiguous().clone() for k, v in state.items()},
            out / renamed[binary.name],
            metadata={"format": "pt"},
        )
        del state
        binary.unlink()
    index = out / "pytorch_model.bin.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: renamed.get(v, v) for k, v in data["weight_map"].items()}
        (out / "model.safetensors.index.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        index.unlink()
    return {"weights": "converted from pytorch-bin"}


# -- helpers -------------------------------------------------------------------------------
def _parse(loaded: LoadedRecipe) -> HubSource | LocalSource:
    try:
        return parse_source(loaded.recipe.source, loaded.recipe.revision, loaded.directory)
    except SourceError as exc:
        raise RecipeError(_at(loaded, "source", str(exc))) from None


def _local_path(params: "Download.Params") -> Path:
    if params.source.startswith("pkg://"):
        try:
            source = parse_source(params.source, "main", Path("/"))
        except SourceError as exc:
            raise StageError(str(exc)) from None
        return source.path  # type: ignore[union-attr]
    return Path(params.source)


def _at(loaded: LoadedRecipe, field: str, message: str) -> str:
    """``FILE:LINE: field: message``, the form of every recipe error."""
    line = 1
    try:
        for number, text in enumerate(loaded.path.read_text(encoding="utf-8").splitlines(), 1):
            if re.match(rf"^{field}\s*:", text):
                line = number
                break
    except OSError:
        pass
    return f"{loaded.path}:{line}: {field}: {message}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"
