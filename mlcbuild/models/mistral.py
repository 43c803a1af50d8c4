"""Mistral: Llama's graph plus an attention sliding window (Mistral-7B v0.1: 4096).

The window is applied by the paged KV cache at run time: the runtime creates the cache with
support_sliding_window=1 and enables the window per sequence (see bundle_format / the note);
gen_config records the window as sliding_window_size.
"""

from __future__ import annotations

from typing import Any

from mlcbuild.models import llama
from mlcbuild.models.base import WeightMapping

HF_KEYS = llama.HF_KEYS | {"sliding_window"}


class MistralConfig(llama.LlamaConfig):
    model_type: str = "mistral"

    @classmethod
    def from_hf(cls, hf: dict[str, Any], understood: set[str] = HF_KEYS, **extra: Any) -> "MistralConfig":
        window = hf.get("sliding_window")
        return super().from_hf(hf, understood, sliding_window=int(window) if window else None, **extra)  # type: ignore[return-value]


def weight_mapping(config: MistralConfig) -> WeightMapping:
    return llama.weight_mapping(config)


build_model = llama.build_model
Config = MistralConfig
