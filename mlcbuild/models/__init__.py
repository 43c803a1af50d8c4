"""Architectures, by HF ``model_type``.

The registry is pure data (module names) so that listing architectures imports no tvm; each
architecture module (which imports tvm) exposes the same four names:

    Config          pydantic config class; ``Config.from_hf(config_json_dict)`` and
                    ``Config.model_validate(normalized_dict)``
    weight_mapping  (config) -> {our param name: ParamSource(hf names, transform)}
    build_model     (config, target) -> CausalLM (a tvm.relax.frontend.nn.Module)
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from mlcbuild.models.base import ArchConfig, UnsupportedConfigError

ARCHITECTURES: dict[str, str] = {
    "llama": "mlcbuild.models.llama",
    "mistral": "mlcbuild.models.mistral",
    "qwen2": "mlcbuild.models.qwen2",
    "phi": "mlcbuild.models.phi",
}


def get_architecture(model_type: str) -> ModuleType:
    try:
        module = ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedConfigError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        ) from None
    return importlib.import_module(module)


def config_from_hf(hf_config: dict[str, Any]) -> ArchConfig:
    """Validate an HF config.json dict into the architecture's normalized config."""
    model_type = hf_config.get("model_type")
    if not model_type:
        raise UnsupportedConfigError("config.json has no model_type")
    return get_architecture(model_type).Config.from_hf(hf_config)


def config_from_normalized(model_config: dict[str, Any]) -> ArchConfig:
    """Rebuild the config gen_config wrote into mlc-chat-config.json (``model_config``)."""
    return get_architecture(model_config["model_type"]).Config.model_validate(model_config)


__all__ = [
    "ARCHITECTURES",
    "ArchConfig",
    "UnsupportedConfigError",
    "config_from_hf",
    "config_from_normalized",
    "get_architecture",
]
