"""The recipe: a YAML file naming one model source and the axes to fan out over.

Loading reports every problem as ``FILE:LINE: FIELD.PATH: what is wrong; what was expected``
so that a user can jump straight to the offending line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      StrictBool, ValidationError, ValidationInfo, field_validator, model_validator)

from mlcbuild.devices import parse_device
from mlcbuild.quantization import get_quantization


class RecipeError(Exception):
    """A recipe could not be loaded; the message names file, line and field."""


class Overrides(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    context_window_size: PositiveInt | None = None
    prefill_chunk_size: PositiveInt | None = None
    sliding_window_size: PositiveInt | None = None
    # One shard count, or several to fan out over (``[1, 2]``: a bundle per count and device, one
    # weight conversion per (quantization, count)).
    tensor_parallel_shards: PositiveInt | Annotated[list[PositiveInt], Field(min_length=1)] | None = None
    max_batch_size: PositiveInt | None = None

    @field_validator("tensor_parallel_shards")
    @classmethod
    def _distinct_shard_counts(cls, value: Any) -> Any:
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError(f"a shard count is listed twice: {value}")
        return value

    def shard_counts(self) -> list[int]:
        """The shard counts to build for ([1] unless the recipe says otherwise)."""
        value = self.tensor_parallel_shards
        return [1] if value is None else ([value] if isinstance(value, int) else list(value))


class Kernels(BaseModel):
    """Which of our kernels a compile uses where there is a choice (they enter the compile nodes'
    keys, for the devices they concern). Off by default until timed on the GPUs they target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cuda_integer_dot_batch1: StrictBool = False  # batch-1 4-bit GEMVs on dp4a (cuda_qgemv_dp4a)
    cuda_decode_attention: StrictBool = False  # the KV cache's decode attention from cuda_attention


class Generation(BaseModel):
    """Sampling defaults written into the bundle's chat config: every front end (chat, serve, the
    Python API) uses them unless a request sets its own. Unset fields keep the checkpoint's
    generation_config.json values (or the neutral ones: temperature 1, top_p 1, no top_k)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: Annotated[NonNegativeFloat, Field(le=2.0)] | None = None  # 0: greedy
    top_p: Annotated[PositiveFloat, Field(le=1.0)] | None = None
    top_k: NonNegativeInt | None = None  # 0: off
    repetition_penalty: PositiveFloat | None = None
    max_tokens: PositiveInt | None = None  # tokens generated per answer unless a request says otherwise


class Speculative(BaseModel):
    """Speculative decoding for the front ends given this recipe (chat, serve, the Python API), unless they
    are told otherwise: ``draft`` proposes with this recipe's bundle of ``draft_quantization`` (for every
    other quantization's bundle on the same device), ``prompt-lookup`` with n-grams of the prompt and output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["draft", "prompt-lookup"]
    draft_quantization: str | None = None  # one of the recipe's quantizations; required with mode draft
    tokens: PositiveInt = 4  # proposed per step (MLC LLM's spec_draft_length)

    @model_validator(mode="after")
    def _draft_named(self) -> "Speculative":
        if (self.mode == "draft") != (self.draft_quantization is not None):
            raise ValueError("draft_quantization: required with mode draft (the recipe's quantization that "
                             "drafts), and only with it")
        return self


Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    source: Annotated[str, Field(min_length=1)]
    revision: Annotated[str, Field(min_length=1)] = "main"
    conv_template: Annotated[str, Field(min_length=1)] = "auto"
    quantization: Annotated[list[str], Field(min_length=1)]
    devices: Annotated[list[str], Field(min_length=1)] = ["cpu"]
    overrides: Overrides = Overrides()
    kernels: Kernels = Kernels()
    generation: Generation = Generation()
    speculative: Speculative | None = None
    output: str | None = None  # default: dist/<name>, relative to the recipe file

    @field_validator("quantization", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("quantization")
    @classmethod
    def _known_quantization(cls, value: list[str]) -> list[str]:
        return _validate_items(value, get_quantization)

    @field_validator("speculative")
    @classmethod
    def _draft_is_built(cls, value: Speculative | None, info: ValidationInfo) -> Speculative | None:
        quants = info.data.get("quantization") or []
        if value is not None and value.draft_quantization is not None and value.draft_quantization not in quants:
            raise ValueError(f"draft_quantization {value.draft_quantization!r} is not one of the recipe's "
                             f"quantizations {quants} (list it there so that the recipe builds the draft)")
        return value

    @field_validator("devices", mode="before")
    @classmethod
    def _one_or_many_devices(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("devices")
    @classmethod
    def _known_devices(cls, value: list[str]) -> list[str]:
        return [parse_device(d).name for d in _validate_items(value, parse_device)]


def _validate_items(values: list[str], check: Any) -> list[str]:
    """Check each item and raise with the item's index so the error points at its line."""
    seen: set[str] = set()
    for index, item in enumerate(values):
        try:
            check(item)
        except ValueError as exc:
            raise ValueError(f"[{index}] {exc}") from None
        if item in seen:
            raise ValueError(f"[{index}] {item!r} is listed twice")
        seen.add(item)
    return values


class LoadedRecipe(BaseModel):
    """A validated recipe plus where it came from (paths in it are relative to its file)."""

    model_config = ConfigDict(frozen=True)

    recipe: Recipe
    path: Path

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def output_dir(self) -> Path:
        return (self.directory / (self.recipe.output or f"dist/{self.recipe.name}")).resolve()


def _line_index(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map each field path (keys and list indices) to the 1-based line where it starts."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[path + (key,)] = key_node.start_mark.line + 1
            _line_index(value_node, path + (key,), out)
            out[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _line_index(item, path + (index,), out)
    return out


def _format_loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "(top level)"


def _describe(error: dict) -> tuple[tuple, str]:
    """Turn one pydantic error into (field path, message); indices hidden in our messages move
    into the path so the line lookup finds the list item."""
    loc = tuple(error["loc"])
    msg: str = error["msg"]
    kind = error["type"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if msg.startswith("[") and "] " in msg:
        index_text, msg = msg[1:].split("] ", 1)
        if index_text.isdigit():
            loc = loc + (int(index_text),)
    if kind == "extra_forbidden":
        parent = loc[:-1]
        known = _known_fields(parent)
        msg = f"unknown field; known fields: {', '.join(known)}" if known else "unknown field"
    elif kind == "missing":
        msg = "required field is missing"
    elif "input" in error and kind not in ("value_error",) and not isinstance(error["input"], (dict, list)):
        msg = f"{msg} (got {error['input']!r})"
    return loc, msg


def _known_fields(parent: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in parent:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def parse_recipe(text: str, path: Path) -> Recipe:
    display = str(path)
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise RecipeError(f"{display}:{line}: invalid YAML: {exc.problem or exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{display}:1: (top level): expected a mapping of recipe fields")
    lines = _line_index(root) if root is not None else {}
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        messages = []
        for error in exc.errors():
            loc, msg = _describe(error)
            line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), 1)
            messages.append(f"{display}:{line}: {_format_loc(loc)}: {msg}")
        raise RecipeError("\n".join(messages)) from None


def load_recipe(path: str | Path) -> LoadedRecipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc.strerror}") from None
    return LoadedRecipe(recipe=parse_recipe(text, path), path=path.resolve())
