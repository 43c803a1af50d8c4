"""Phi (phi-1.5, phi-2; HF ``model_type: phi``): LayerNorm with bias, biased q/k/v/dense and
fc1/fc2, gelu_new (tanh GELU), attention and MLP in parallel off one LayerNorm, partial rotary
embedding (rotary_dim = partial_rotary_factor * head_dim), biased lm_head.
"""

from __future__ import annotations

from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
from tvm.target import Target

from mlcbuild.models.base import ArchConfig, WeightMapping, check_hf_keys, concat, hf_rope, require, same
from mlcbuild.models.base_nn import CausalLM, Embedding, FusedQKVAttention, LayerNorm, Linear

HF_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "layer_norm_eps",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "partial_rotary_factor", "qk_layernorm",
    "head_dim",
}

_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": None}


class PhiConfig(ArchConfig):
    model_type: str = "phi"
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"

    @classmethod
    def from_hf(cls, hf: dict[str, Any], understood: set[str] = HF_KEYS) -> "PhiConfig":
        check_hf_keys(hf, understood, "phi")
        require(not hf.get("qk_layernorm", False), "phi: qk_layernorm=true is not supported")
        act = hf.get("hidden_act", "gelu_new")
        require(act in _GELU, f"phi: hidden_act {act!r} is not supported (supported: {', '.join(_GELU)})")
        heads = int(hf["num_attention_heads"])
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        require(heads % kv_heads == 0, "phi: num_attention_heads must be a multiple of num_key_value_heads")
        head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
        rotary_dim = int(float(hf.get("partial_rotary_factor", 0.5)) * head_dim)
        require(rotary_dim % 2 == 0 and rotary_dim > 0, f"phi: rotary dim {rotary_dim} must be even and positive")
        theta, scaling = hf_rope(hf)
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=theta,
            rope_scaling=scaling,
            rotary_dim=rotary_dim,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            hidden_act=act,
        )


def weight_mapping(config: PhiConfig) -> WeightMapping:
    mapping: WeightMapping = {"model.embed_tokens.weight": same("model.embed_tokens.weight")}
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}"
        attn = f"{hf}.self_attn"
        for kind in ("weight", "bias"):
            mapping[f"{attn}.qkv_proj.{kind}"] = concat(f"{attn}.q_proj.{kind}", f"{attn}.k_proj.{kind}", f"{attn}.v_proj.{kind}")
            mapping[f"{attn}.dense.{kind}"] = same(f"{attn}.dense.{kind}")
            mapping[f"{hf}.mlp.fc1.{kind}"] = same(f"{hf}.mlp.fc1.{kind}")
            mapping[f"{hf}.mlp.fc2.{kind}"] = same(f"{hf}.mlp.fc2.{kind}")
            mapping[f"{hf}.input_layernorm.{kind}"] = same(f"{hf}.input_layernorm.{kind}")
    for kind in ("weight", "bias"):
        mapping[f"model.final_layernorm.{kind}"] = same(f"model.final_layernorm.{kind}")
    if not config.tie_word_embeddings:
        mapping["lm_head.weight"] = same("lm_head.weight")
        mapping["lm_head.bias"] = same("lm_head.bias")
    return mapping


class PhiMLP(nn.Module):
    def __init__(self, config: PhiConfig):
        self.approximate = _GELU[config.hidden_act]
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(op.gelu(self.fc1(x), approximate=self.approximate))


class PhiDecoderLayer(nn.Module):
    def __init__(self, config: PhiConfig):
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = FusedQKVAttention(config, qkv_bias=True, out_bias=True, out_name="dense")
        self.mlp = PhiMLP(config)

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        # Parallel block: attention and MLP both read the same normalized input.
        h = self.input_layernorm(x)
        return self.self_attn(h, kv_cache, layer_id) + self.mlp(h) + x


class PhiModel(nn.Module):
    def __init__(self, config: PhiConfig):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([PhiDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.final_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, kv_cache: PagedKVCache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv_cache, layer_id)
        return self.final_layernorm(x)


class PhiForCausalLM(CausalLM):
    def __init__(self, config: PhiConfig, target: Target | None = None):
        super().__init__(config, target)
        self.model = PhiModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=True, out_dtype="float32")


def build_model(config: PhiConfig, target: Target | None = None) -> CausalLM:
    return PhiForCausalLM(config, target)


Config = PhiConfig
