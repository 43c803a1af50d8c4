"""Qwen2 (Qwen2 / Qwen2.5): Llama's graph with q/k/v biases (no o_proj bias), usually tied
embeddings. Reuses the Llama module; only the config reading differs."""

from __future__ import annotations

from typing import Any

from mlcbuild.models import llama
from mlcbuild.models.base import WeightMapping, require

HF_KEYS = llama.HF_KEYS | {"use_sliding_window", "sliding_window", "max_window_layers"}


class Qwen2Config(llama.LlamaConfig):
    model_type: str = "qwen2"
    attention_bias: bool = True

    @classmethod
    def from_hf(cls, hf: dict[str, Any], understood: set[str] = HF_KEYS, **extra: Any) -> "Qwen2Config":
        # Qwen2 checkpoints carry a sliding_window value that only applies when
        # use_sliding_window is true (no released Qwen2 model enables it).
        require(not hf.get("use_sliding_window", False), "qwen2: use_sliding_window=true is not supported")
        config = super().from_hf(hf, understood, **extra)
        return config.model_copy(update={"attention_bias": True, "attention_out_bias": False})  # type: ignore[return-value]


def weight_mapping(config: Qwen2Config) -> WeightMapping:
    return llama.weight_mapping(config)


build_model = llama.build_model
Config = Qwen2Config
