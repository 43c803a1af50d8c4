"""Llama (Llama-2, Llama-3 incl. llama3 RoPE scaling, SmolLM2, TinyLlama).

Config from HF config.json, the Relax module, and the declarative HF weight mapping.
"""

from __future__ import annotations

from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
from tvm.target import Target

from mlcbuild.models.base import (
    ArchConfig,
    WeightMapping,
    check_hf_keys,
    concat,
    hf_rope,
    require,
    same,
)
from mlcbuild.models.base_nn import CausalLM, Embedding, FusedQKVAttention, GatedMLP, Linear, RMSNorm

HF_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
    "tie_word_embeddings", "max_position_embeddings", "attention_bias", "mlp_bias",
    "partial_rotary_factor", "rope_interleaved",
}


class LlamaConfig(ArchConfig):
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False  # q/k/v projections carry biases
    attention_out_bias: bool = False  # o_proj carries a bias (Llama: = attention_bias; Qwen2: no)
    mlp_bias: bool = False

    @classmethod
    def from_hf(cls, hf: dict[str, Any], understood: set[str] = HF_KEYS, **extra: Any) -> "LlamaConfig":
        model_type = hf.get("model_type", "llama")
        check_hf_keys(hf, understood, model_type)
        require(
            hf.get("hidden_act", "silu") == "silu",
            f"{model_type}: hidden_act {hf.get('hidden_act')!r} is not supported (only 'silu')",
        )
        require(
            float(hf.get("partial_rotary_factor", 1.0)) == 1.0,
            f"{model_type}: partial_rotary_factor != 1 is not supported",
        )
        require(not hf.get("rope_interleaved", False), f"{model_type}: rope_interleaved=true is not supported")
        heads = int(hf["num_attention_heads"])
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        require(heads % kv_heads == 0, f"{model_type}: num_attention_heads must be a multiple of num_key_value_heads")
        theta, scaling = hf_rope(hf)
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            attention_bias=bool(hf.get("attention_bias", False)),
            attention_out_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            **extra,
        )


def weight_mapping(config: LlamaConfig) -> WeightMapping:
    """Our parameter name -> HF tensors (q/k/v and gate/up are fused along the output rows)."""
    mapping: WeightMapping = {"model.embed_tokens.weight": same("model.embed_tokens.weight")}
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}"
        attn = f"{hf}.self_attn"
        mapping[f"{attn}.qkv_proj.weight"] = concat(f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight")
        if config.attention_bias:
            mapping[f"{attn}.qkv_proj.bias"] = concat(f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias")
        mapping[f"{attn}.o_proj.weight"] = same(f"{attn}.o_proj.weight")
        if config.attention_out_bias:
            mapping[f"{attn}.o_proj.bias"] = same(f"{attn}.o_proj.bias")
        mlp = f"{hf}.mlp"
        mapping[f"{mlp}.gate_up_proj.weight"] = concat(f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight")
        if config.mlp_bias:
            mapping[f"{mlp}.gate_up_proj.bias"] = concat(f"{mlp}.gate_proj.bias", f"{mlp}.up_proj.bias")
        mapping[f"{mlp}.down_proj.weight"] = same(f"{mlp}.down_proj.weight")
        if config.mlp_bias:
            mapping[f"{mlp}.down_proj.bias"] = same(f"{mlp}.down_proj.bias")
        mapping[f"{hf}.input_layernorm.weight"] = same(f"{hf}.input_layernorm.weight")
        mapping[f"{hf}.post_attention_layernorm.weight"] = same(f"{hf}.post_attention_layernorm.weight")
    mapping["model.norm.weight"] = same("model.norm.weight")
    if not config.tie_word_embeddings:
        mapping["lm_head.weight"] = same("lm_head.weight")
    return mapping


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        self.self_attn = FusedQKVAttention(config, qkv_bias=config.attention_bias, out_bias=config.attention_out_bias)
        self.mlp = GatedMLP(config, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, -1, config.rms_norm_eps, bias=False)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, -1, config.rms_norm_eps, bias=False)

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv_cache, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, -1, config.rms_norm_eps, bias=False)

    def forward(self, x: Tensor, kv_cache: PagedKVCache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv_cache, layer_id)
        return self.norm(x)


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: LlamaConfig, target: Target | None = None):
        super().__init__(config, target)
        self.model = LlamaModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, out_dtype="float32")


def build_model(config: LlamaConfig, target: Target | None = None) -> CausalLM:
    return LlamaForCausalLM(config, target)
Config = LlamaConfig
