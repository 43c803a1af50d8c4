"""Relax (``tvm.relax.frontend.nn``) building blocks shared by the architectures.

Imports tvm: only the compile and convert_weight stages (inside ``run``) and tests load this.

Every model is a ``CausalLM``: a subclass supplies ``self.model`` (with ``embed_tokens`` and a
``forward(embeds, kv_cache) -> hidden``) and optionally ``self.lm_head``; this class defines the
functions the library exports (see ``mlcbuild.bundle_format``) and the paged KV cache.
"""

from __future__ import annotations

from typing import Any

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.core import wrap_nested
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from mlcbuild.models.base import ArchConfig


def accumulate_f32(y_f32: Tensor, dtype: str) -> Tensor:
    return y_f32 if dtype == "float32" else y_f32.astype(dtype)


class Linear(nn.Linear):
    """nn.Linear that accumulates in float32 and rounds once to ``out_dtype`` (default: the
    activation dtype), as torch does for half types: a float16/bfloat16 accumulator loses most
    of the sum's bits."""

    # Set on a row-parallel projection of a sharded model (``build_quantized_model``): its partial
    # sums are added across shards before the bias, which every shard holds whole.
    tp_allreduce = False

    def forward(self, x: Tensor) -> Tensor:
        y = op.matmul(x, op.permute_dims(self.weight), out_dtype="float32")
        y = allreduce_partial_sums(self, y)
        if self.bias is not None:
            y = y + self.bias.astype("float32")
        return accumulate_f32(y, self.out_dtype or x.dtype)


def allreduce_partial_sums(linear: nn.Module, y_f32: Tensor) -> Tensor:
    """The all-reduce of a row-parallel projection (identity elsewhere). It sums the float32
    accumulator, before the one rounding to the activation dtype, so that float16 shards round once
    as a single device does (MLC LLM reduces float16 partial sums; that costs a rounding per shard)."""
    if getattr(linear, "tp_allreduce", False):
        return op.ccl_allreduce(y_f32, "sum")
    return y_f32


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in float32 (as HF does) and returned in the activation dtype."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == "float32":
            return super().forward(x)
        out = op.rms_norm(x.astype("float32"), weight=self.weight.astype("float32"), axes=self.axes, epsilon=self.epsilon)
        return out.astype(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and returned in the activation dtype."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == "float32":
            return super().forward(x)
        out = op.layer_norm(
            x.astype("float32"),
            normalized_shape=self.normalized_shape,
            weight=self.weight.astype("float32"),
            bias=self.bias.astype("float32"),
            eps=self.eps,
        )
        return out.astype(x.dtype)


def take_clipped(x: Tensor, indices: Tensor, axis: int, name: str = "take") -> Tensor:
    """``op.take`` with indices clamped into range (relax ``mode="clip"``). TVM's default mode, "fast",
    reads out of bounds on a bad index and makes topi print "Fast mode segfaults when there are
    out-of-bounds indices" at every build; the clamp is a min/max on one index per gathered row."""
    return wrap_nested(relax.op.take(x._expr, indices._expr, axis, mode="clip"), name)


class Embedding(nn.Embedding):
    """Token embedding that can also serve as the (tied) output projection."""

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 1:
            return take_clipped(self.weight, x, axis=0)
        flat = take_clipped(self.weight, op.reshape(x, shape=[-1]), axis=0)
        return op.reshape(flat, shape=[*x.shape, self.weight.shape[1]])

    def lm_head_forward(self, x: Tensor) -> Tensor:
        return op.matmul(x, op.permute_dims(self.weight), out_dtype="float32")


class FusedQKVAttention(nn.Module):
    """Multi-/grouped-query attention over the paged KV cache with one fused q/k/v projection;
    the cache applies RoPE (``RopeMode.NORMAL``) and appends k/v itself."""

    def __init__(self, config: ArchConfig, qkv_bias: bool, out_bias: bool, out_name: str = "o_proj"):
        self.head_dim = config.head_dim
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.qkv_proj = Linear(
            config.hidden_size,
            (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim,
            bias=qkv_bias,
        )
        self.out_name = out_name
        # The output projection's attribute name follows HF (o_proj / dense) so that parameter
        # names read like the checkpoint's.
        setattr(self, out_name, Linear(self.num_q_heads * self.head_dim, config.hidden_size, bias=out_bias))

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x), (b, s, self.num_q_heads + 2 * self.num_kv_heads, self.head_dim))
        out = kv_cache.attention_with_fused_qkv(layer_id, qkv, self.num_q_heads, sm_scale=self.head_dim**-0.5)
        return getattr(self, self.out_name)(op.reshape(out, (b, s, self.num_q_heads * self.head_dim)))


class GatedMLP(nn.Module):
    """SwiGLU MLP with gate and up fused into one projection (one matmul instead of two)."""

    def __init__(self, config: ArchConfig, bias: bool = False):
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


def _last_token(x: Tensor) -> Tensor:
    """[b, s, h] -> [b, 1, h]: the hidden state of each sequence's last position."""

    def compute(t: te.Tensor) -> te.Tensor:
        b, s, h = t.shape
        return te.compute((b, 1, h), lambda i, _, k: t[i, s - 1, k], name="index_last_token")

    return op.tensor_expr_op(compute, "index_last_token", [x])


class CausalLM(nn.Module):
    """The exported surface every architecture shares.

    ``target`` is needed at export because the paged KV cache's attention kernels are generated
    per target (TIR kernels for llvm / cuda).
    """

    config: ArchConfig

    def __init__(self, config: ArchConfig, target: Target | None = None):
        self.config = config
        self.target = target
        self.dtype = "float32"

    # --- overridable pieces -----------------------------------------------------------------
    def rope_scaling(self) -> dict[str, Any]:
        return dict(self.config.rope_scaling or {})

    def to(self, dtype: str | None = None) -> None:
        super().to(dtype=dtype)
        if dtype is not None:
            self.dtype = dtype

    def get_logits(self, hidden: Tensor) -> Tensor:
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.lm_head_forward(hidden)
        else:
            logits = self.lm_head(hidden)
        if logits.dtype != "float32":
            logits = logits.astype("float32")
        return logits

    # --- exported functions -----------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def prefill(self, embeddings: Tensor, kv_cache: PagedKVCache) -> Tensor:
        return self.get_logits(_last_token(self.model(embeddings, kv_cache)))

    def decode(self, embeddings: Tensor, kv_cache: PagedKVCache) -> Tensor:
        return self.get_logits(self.model(embeddings, kv_cache))

    def batch_prefill(self, embeddings: Tensor, logit_positions: Tensor, kv_cache: PagedKVCache) -> Tensor:
        hidden = take_clipped(self.model(embeddings, kv_cache), logit_positions, axis=1)
        return self.get_logits(hidden)

    def batch_decode(self, embeddings: Tensor, kv_cache: PagedKVCache) -> Tensor:
        return self.get_logits(self.model(embeddings, kv_cache))

    def batch_verify(self, embeddings: Tensor, kv_cache: PagedKVCache) -> Tensor:
        """Speculative decoding's verification: a few tokens of each sequence (its last one and its draft),
        logits at every position. A function of its own (as MLC LLM's ``batch_verify``) so that its
        matmuls, a handful of rows, are scheduled as multi-row GEMVs that read each weight once, not as
        prefill GEMMs that first repack the weights (3.4x a decode step for 2 rows of SmolLM2 q0f16)."""
        return self.get_logits(self.model(embeddings, kv_cache))

    def create_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        if self.target is None:
            raise ValueError("CausalLM needs a target to export create_paged_kv_cache")
        cfg = self.config
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, cfg.num_hidden_layers]),  # no pipeline stages
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            qk_head_dim=cfg.head_dim,
            v_head_dim=cfg.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=cfg.rope_theta,
            rope_scaling=self.rope_scaling(),
            rope_ext_factors=relax.prim_value(0),  # "none": only longrope uses factors
            rotary_dim=cfg.effective_rotary_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
            # the window the sliding-window prefill kernel masks each query row to (kernels/sliding_window.py)
            **({"layer_sliding_window_size": cfg.sliding_window} if cfg.sliding_window else {}),
        )

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        hidden, dtype = self.config.hidden_size, self.dtype
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        spec = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {
                "embeddings": nn.spec.Tensor([1, "seq_len", hidden], dtype),
                "kv_cache": kv,
                "$": packed,
            },
            "decode": {
                "embeddings": nn.spec.Tensor([1, 1, hidden], dtype),
                "kv_cache": kv,
                "$": packed,
            },
            "batch_prefill": {
                "embeddings": nn.spec.Tensor([1, "seq_len", hidden], dtype),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "kv_cache": kv,
                "$": packed,
            },
            "batch_decode": {
                "embeddings": nn.spec.Tensor(["batch_size", 1, hidden], dtype),
                "kv_cache": kv,
                "$": packed,
            },
            "batch_verify": {
                "embeddings": nn.spec.Tensor([1, "verify_len", hidden], dtype),
                "kv_cache": kv,
                "$": packed,
            },
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)


def build_quantized_model(config: ArchConfig, quantization: str, target: Target | None = None,
                          tensor_parallel_shards: int = 1) -> tuple[CausalLM, dict[str, tuple[str, ...]]]:
    """The architecture's module (one shard's, when ``tensor_parallel_shards`` > 1: see
    ``models.sharding``), cast to the scheme's dtype with its linear layers and embeddings replaced
    by the scheme's modules. Returns (model, float weight -> stored names)."""
    from mlcbuild.models import get_architecture
    from mlcbuild.models.sharding import ROW_PARALLEL, check_plan, local_config
    from mlcbuild.quantization import get_quantization
    from mlcbuild.quantization.scheme import family

    spec = get_quantization(quantization)
    shards = tensor_parallel_shards
    check_plan(config, shards, spec.group_size if spec.kind == "group" else 0)
    model = get_architecture(config.model_type).build_model(local_config(config, shards), target)
    if shards > 1:
        model.tensor_parallel_shards = shards

        class _MarkRowParallel(nn.Mutator):
            def visit_module(self, name: str, node: nn.Module) -> Any:
                if isinstance(node, nn.Linear) and any(name.endswith(row) for row in ROW_PARALLEL):
                    node.tp_allreduce = True
                    return node
                return self.visit(name, node)

        _MarkRowParallel().visit("", model)
    qmap = family(spec).quantize_model(model, spec)
    return model, qmap
