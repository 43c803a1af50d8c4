"""Tensor parallelism: how each parameter of an architecture splits across ``tensor_parallel_shards``.

Pure data and numpy (no tvm): gen_config checks a plan before anything is built, convert_weight
slices the weights with it, and compile builds each shard's model from ``local_config``.

The split is Megatron's, as MLC LLM annotates its models (``tp.ShardSingleDim``):

* column-parallel (output rows split): the fused ``qkv_proj`` (each of its q, k, v segments is split
  on its own, so shard ``r`` holds q heads ``r*H/N ..`` and the k/v heads they attend with) and the
  MLP's ``gate_up_proj`` (gate and up split on their own) / ``fc1``; their biases likewise;
* row-parallel (input columns split): ``o_proj`` / ``dense`` and ``down_proj`` / ``fc2``, whose partial
  sums are added across shards by an all-reduce in the compiled model; their biases are kept whole
  and added once, after the all-reduce;
* everything else (embeddings, LM head, norms) is replicated, as MLC LLM does for these models.

KV heads: ``K`` KV heads over ``N`` shards are split when ``N`` divides ``K``, and replicated when
``K`` divides ``N`` (fewer KV heads than shards: shard ``r`` holds KV head ``r*K/N``, the one its query
heads attend with; MLC LLM does the same). Any other shape is a :class:`ShardingError` that names
the tensor, the dimension and the shard count; nothing is padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mlcbuild.models.base import ArchConfig

if TYPE_CHECKING:
    import numpy as np

# Our parameter names (before quantization) by how they split; matched on the name's last parts.
COLUMN_PARALLEL = ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.fc1")
ROW_PARALLEL = ("self_attn.o_proj", "self_attn.dense", "mlp.down_proj", "mlp.fc2")


class ShardingError(ValueError):
    """A model shape that does not split evenly over the requested shard count."""


@dataclass(frozen=True)
class ShardSpec:
    """How one float parameter splits: along ``dim`` in ``segments`` (sizes of consecutive blocks
    split on their own, e.g. q/k/v), or ``replicate``."""

    kind: Literal["replicate", "column", "row"]
    segments: tuple[int, ...] = ()


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0]


def _check(ok: bool, tensor: str, dim: str, size: int, shards: int, hint: str = "") -> None:
    if not ok:
        raise ShardingError(
            f"tensor_parallel_shards={shards}: {tensor}: {dim} ({size}) does not divide evenly into "
            f"{shards} shards{hint}; choose a shard count that divides it"
        )


def check_plan(config: ArchConfig, shards: int, group_size: int = 0) -> None:
    """Raise :class:`ShardingError` when ``config`` cannot be split into ``shards`` (``group_size``: the
    quantization's group, which every row-parallel shard must hold whole groups of)."""
    if shards < 1:
        raise ShardingError(f"tensor_parallel_shards must be at least 1, got {shards}")
    if shards == 1:
        return
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    _check(heads % shards == 0, "self_attn.qkv_proj (query heads)", "num_attention_heads", heads, shards)
    _check(kv % shards == 0 or shards % kv == 0, "self_attn.qkv_proj (key/value heads)", "num_key_value_heads", kv,
           shards, " and is not a divisor of the shard count either (KV heads are replicated only then)")
    _check(config.intermediate_size % shards == 0, "mlp.gate_up_proj / mlp.down_proj", "intermediate_size",
           config.intermediate_size, shards)
    if group_size:
        # A row-parallel weight is quantized in groups along its input dimension: each shard's slice
        # must be whole groups, or the shards would not be slices of the one quantized tensor.
        for tensor, k in (("self_attn.o_proj", heads * config.head_dim), ("mlp.down_proj", config.intermediate_size)):
            local = k // shards
            if local % group_size:
                raise ShardingError(
                    f"tensor_parallel_shards={shards}: {tensor}: its input dimension {k} splits into {local} per "
                    f"shard, not a multiple of the quantization group size {group_size} (quantized weights shard "
                    "along group boundaries); choose fewer shards or an unquantized scheme"
                )


def local_config(config: ArchConfig, shards: int) -> ArchConfig:
    """The config one shard's model is built from: its query heads, KV heads and MLP width."""
    if shards == 1:
        return config
    check_plan(config, shards)
    kv = config.num_key_value_heads
    return config.model_copy(update={
        "num_attention_heads": config.num_attention_heads // shards,
        "num_key_value_heads": kv // shards if kv % shards == 0 else 1,
        "intermediate_size": config.intermediate_size // shards,
    })


def shard_spec(config: ArchConfig, param: str) -> ShardSpec:
    """How float parameter ``param`` (our name, e.g. ``model.layers.0.self_attn.qkv_proj.weight``) splits."""
    module = _module_of(param)
    kind = param.rsplit(".", 1)[1]
    if module.endswith("self_attn.qkv_proj"):
        d = config.head_dim
        return ShardSpec("column", (config.num_attention_heads * d, config.num_key_value_heads * d,
                                    config.num_key_value_heads * d))
    if module.endswith("mlp.gate_up_proj"):
        return ShardSpec("column", (config.intermediate_size, config.intermediate_size))
    if module.endswith("mlp.fc1"):
        return ShardSpec("column", (config.intermediate_size,))
    if any(module.endswith(name) for name in ROW_PARALLEL):
        return ShardSpec("row") if kind == "weight" else ShardSpec("replicate")
    return ShardSpec("replicate")


def shard_tensor(config: ArchConfig, param: str, array: np.ndarray, shards: int, rank: int) -> np.ndarray:
    """Shard ``rank``'s slice of float parameter ``param`` (the full mapped tensor ``array``)."""
    import numpy as np

    spec = shard_spec(config, param)
    if shards == 1 or spec.kind == "replicate":
        return array
    if spec.kind == "row":
        k = array.shape[1] // shards
        return np.ascontiguousarray(array[:, rank * k:(rank + 1) * k])
    pieces, start = [], 0
    kv_rows = config.num_key_value_heads * config.head_dim
    for index, size in enumerate(spec.segments):
        block = array[start:start + size]
        start += size
        if module_is_kv(param, index) and config.num_key_value_heads % shards:
            # fewer KV heads than shards: each shard keeps the one KV head its query heads use
            d = config.head_dim
            head = rank * config.num_key_value_heads // shards
            assert size == kv_rows
            pieces.append(block[head * d:(head + 1) * d])
        else:
            step = size // shards
            pieces.append(block[rank * step:(rank + 1) * step])
    if start != array.shape[0]:
        raise ShardingError(f"{param}: {array.shape[0]} rows, the shard plan expects {start}")
    return np.ascontiguousarray(np.concatenate(pieces, axis=0))


def module_is_kv(param: str, segment: int) -> bool:
    """Whether segment ``segment`` of ``param`` is a key or value block (qkv_proj's 2nd and 3rd)."""
    return _module_of(param).endswith("self_attn.qkv_proj") and segment > 0
