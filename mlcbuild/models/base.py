"""Pieces every architecture shares: config base, declarative weight mapping, the causal-LM
wrapper that defines the exported functions, and the paged-KV-cache attention block.

Only the pure-data parts (configs, mappings) may be imported without tvm; the Relax modules
live in ``base_nn`` so that gen_config can read configs without paying for a tvm import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict


class UnsupportedConfigError(ValueError):
    """A config.json field or value the architecture does not implement (the message names it)."""


class ArchConfig(BaseModel):
    """Normalized architecture config: what gen_config writes into mlc-chat-config.json as
    ``model_config`` and what compile reads back. Every field shapes the compiled graph."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rotary_dim: int = 0  # 0: head_dim
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048  # the model's own context limit
    sliding_window: int | None = None  # model-declared attention window, None: full attention

    # HF config.json keys each architecture understands; anything else that changes the math
    # must be rejected rather than silently ignored (see ``check_hf_keys``).
    HF_IGNORED: ClassVar[frozenset[str]] = frozenset(
        {
            "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
            "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
            "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "_name_or_path",
            "output_attentions", "output_hidden_states", "return_dict", "is_decoder",
            "pretraining_tp", "tokenizer_class", "auto_map", "id2label", "label2id",
            "problem_type", "chunk_size_feed_forward", "add_cross_attention",
            "tie_encoder_decoder", "torchscript", "use_return_dict", "_attn_implementation",
            "_attn_implementation_autoset", "is_encoder_decoder", "rope_parameters",
            # SmolLM2 / exporters' extras that carry no math
            "is_llama_config", "transformers.js_config",
        }
    )

    @property
    def effective_rotary_dim(self) -> int:
        return self.rotary_dim or self.head_dim


def hf_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from an HF config; newer transformers write both into
    ``rope_parameters``. Only the default and llama3 schemes are implemented."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None:
        scaling = {k: v for k, v in dict(scaling).items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return theta, None
        if kind != "llama3":
            raise UnsupportedConfigError(
                f"rope_scaling type {kind!r} is not supported (supported: default, llama3)"
            )
        required = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in required if k not in scaling]
        if missing:
            raise UnsupportedConfigError(f"rope_scaling (llama3) lacks {', '.join(missing)}")
        scaling = {"rope_type": "llama3", **{k: scaling[k] for k in required}}
    return theta, scaling


def check_hf_keys(hf: dict[str, Any], understood: set[str], model_type: str) -> None:
    """Reject config.json keys the architecture does not know (they may change the math).
    ``rope_parameters`` is always understood: ``hf_rope`` validates it."""
    layer_types = hf.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise UnsupportedConfigError(
            f"{model_type}: layer_types other than full_attention are not supported "
            f"(got {sorted(set(layer_types))})"
        )
    unknown = sorted(k for k in hf if k not in understood and k not in ArchConfig.HF_IGNORED and k != "layer_types")
    if unknown:
        raise UnsupportedConfigError(
            f"{model_type}: config.json has fields this compiler does not implement: "
            f"{', '.join(unknown)}"
        )
    if hf.get("quantization_config"):
        raise UnsupportedConfigError(
            f"{model_type}: pre-quantized checkpoints (quantization_config) are not supported; "
            "use the float checkpoint and a quantization from the recipe"
        )


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UnsupportedConfigError(message)


# ---- declarative weight mapping -------------------------------------------------------------


@dataclass(frozen=True)
class ParamSource:
    """Where one of our parameters comes from: HF tensor names and one transform."""

    hf_names: tuple[str, ...]
    transform: Literal["identity", "concat"] = "identity"  # concat: along axis 0 (output rows)

    def apply(self, tensors: list[np.ndarray]) -> np.ndarray:
        if self.transform == "identity":
            (tensor,) = tensors
            return tensor
        return np.concatenate(tensors, axis=0)


def same(name: str) -> ParamSource:
    return ParamSource((name,))


def concat(*names: str) -> ParamSource:
    return ParamSource(tuple(names), "concat")


WeightMapping = dict[str, ParamSource]  # our (unquantized) param name -> source
