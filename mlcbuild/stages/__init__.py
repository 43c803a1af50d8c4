"""The LLM build: which stages exist, and how a recipe expands into a DAG of them.

Each stage is one file in this package defining a ``Stage`` subclass decorated with
``@register_stage``. ``params_for(recipe, axes)`` on each stage class turns a recipe and one
combination of axis values into that node's validated params.

Plugin modules named in ``$MLCBUILD_STAGE_PLUGINS`` (comma separated, importable) may replace
stages: each lists its classes in a module-level ``STAGES``. The engine's own tests use this to
run the pipeline with stages they define themselves.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from mlcbuild import bundle_format
from mlcbuild.devices import parse_device
from mlcbuild.pipeline.graph import Graph, Node, StageTemplate, expand
from mlcbuild.pipeline.stage import Stage
from mlcbuild.recipe import LoadedRecipe

STAGE_MODULES = ("download", "gen_config", "convert_weight", "compile", "package", "web_runtime")

LLM_TEMPLATE: tuple[StageTemplate, ...] = (
    StageTemplate("download"),
    StageTemplate("gen_config", axes=("quantization",), inputs={"source": "download"}),
    StageTemplate(
        "convert_weight",
        axes=("quantization",),
        inputs={"source": "download", "config": "gen_config"},
    ),
    StageTemplate("compile", axes=("quantization", "device"), inputs={"config": "gen_config"}),
    StageTemplate(
        "package",
        axes=("quantization", "device"),
        inputs={"source": "download", "config": "gen_config", "weights": "convert_weight", "library": "compile"},
        materialize=lambda axes: bundle_dirname(axes["quantization"], axes["device"],
                                                int(axes.get("tensor_parallel_shards") or 1)),
    ),
)

# The shard-count axis joins every stage from gen_config on when a recipe asks for more than one
# shard: one gen_config and convert_weight per (quantization, shards), one compile and package per
# (quantization, shards, device). Recipes without it keep the template above (and their labels).
SHARDED_TEMPLATE: tuple[StageTemplate, ...] = tuple(
    step if not step.axes else StageTemplate(
        step.stage, axes=(step.axes[0], "tensor_parallel_shards", *step.axes[1:]), inputs=step.inputs,
        materialize=step.materialize)
    for step in LLM_TEMPLATE
)

def key_params_sharded(params: Any) -> dict[str, Any]:
    """``Stage.key_params`` of a stage with a ``tensor_parallel_shards`` param: left out of the key when
    1, so that single-shard nodes keep the keys they had before sharding existed (their cache stays valid)."""
    data = params.model_dump(mode="json")
    if data.get("tensor_parallel_shards") == 1:
        del data["tensor_parallel_shards"]
    return data


def bundle_dirname(quantization: str, device: str, tensor_parallel_shards: int = 1) -> str:
    """The bundle directory of one (quantization, device[, shards]) inside the recipe's output dir."""
    return bundle_format.bundle_dirname(quantization, parse_device(device).name, tensor_parallel_shards)


_REGISTRY: dict[str, type[Stage]] = {}
_OVERRIDES: dict[str, type[Stage]] = {}
_plugins_loaded = False


def register_stage(cls: type[Stage]) -> type[Stage]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for plugin in filter(None, os.environ.get("MLCBUILD_STAGE_PLUGINS", "").split(",")):
        module = importlib.import_module(plugin.strip())
        for cls in getattr(module, "STAGES", ()):
            _OVERRIDES[cls.name] = cls


def stage_class(name: str) -> type[Stage]:
    """The class of stage ``name``: a plugin's replacement, or the built-in one (imported on
    first use, so that planning a cached build never imports the compiler)."""
    _load_plugins()
    if name in _OVERRIDES:
        return _OVERRIDES[name]
    if name not in _REGISTRY and name in STAGE_MODULES:
        importlib.import_module(f"mlcbuild.stages.{name}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no stage named {name!r}; known: {', '.join(STAGE_MODULES)}") from None


def get_stage(name: str) -> Stage:
    return stage_class(name)()


def build_graph(loaded: LoadedRecipe) -> Graph:
    """Expand a recipe into its DAG: one download; per quantization one gen_config and one
    convert_weight; per (quantization, device) one compile and one package; and, when a device is
    webgpu, one web_runtime that its compiles link with."""
    recipe = loaded.recipe
    axes = {"quantization": list(recipe.quantization), "device": list(recipe.devices)}
    shards = recipe.overrides.shard_counts()
    template = LLM_TEMPLATE
    if shards != [1]:
        axes["tensor_parallel_shards"] = [str(n) for n in shards]
        template = SHARDED_TEMPLATE

    def make_params(stage: str, values: dict[str, str]) -> Any:
        return stage_class(stage).params_for(loaded, dict(values))  # type: ignore[attr-defined]

    graph = expand(template, axes, make_params, namespace=str(loaded.path))
    graph = _with_web_runtime(graph, make_params, str(loaded.path))
    # Outputs land in this recipe's output dir whatever the run's other recipes are.
    for node in graph.nodes:
        node.materialize = [str(loaded.output_dir / sub) for sub in node.materialize]
    return graph


def _with_web_runtime(graph: Graph, make_params: Any, namespace: str) -> Graph:
    """``graph`` with one ``web_runtime`` node as an input of every webgpu compile (none when there
    is no webgpu device: other recipes' graphs and keys are unchanged)."""
    webgpu = {id(n) for n in graph.nodes if n.stage == "compile" and parse_device(n.params.device).kind == "webgpu"}
    if not webgpu:
        return graph
    rebuilt = Graph()
    runtime = rebuilt.add(Node("web_runtime", make_params("web_runtime", {}), {}, "web_runtime", {},
                               namespace=namespace))
    for node in graph.nodes:  # in order: inputs stay before their users
        if id(node) in webgpu:
            node.inputs["web_runtime"] = runtime
        rebuilt.add(node)
    return rebuilt
