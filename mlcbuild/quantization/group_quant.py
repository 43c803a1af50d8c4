"""Group quantization as MLC LLM defines q4f16_1 / q4f32_1 / q3f16_1.

Scheme (per weight row, groups of ``group_size`` consecutive input features, "NK" layout):

    scale = max(|w|) over the group / max_int        stored in the model dtype
    q     = clip(round(w / scale + max_int), 0, 2 * max_int)     max_int = 2**(bits-1) - 1
    w'    = (q - max_int) * scale                    computed in the model dtype

``32 // bits`` elements are packed little-end-first into each uint32 (element j of a word sits
at bits [j*bits, (j+1)*bits)); a row whose length is not a multiple of the group size is
zero-padded to whole groups. Linear weights [out, in] are stored as q_weight [out, words] and
q_scale [out, groups]; embeddings [vocab, hidden] the same way.

The numpy half (``quantize_tensor``, ``dequantize_reference``) runs in convert_weight and the
tests; the Relax half (``quantize_model`` and the modules below) replaces nn.Linear /
nn.Embedding by modules whose forward dequantizes inside the kernel that consumes the weight.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlcbuild.quantization import QuantizationSpec
from mlcbuild.quantization.scheme import QuantizeMap, numpy_dtype


def layout(spec: QuantizationSpec, in_features: int) -> tuple[int, int, int]:
    """(elements per uint32, number of groups, number of uint32 words) for one row."""
    per_word = 32 // spec.bits
    if spec.group_size % per_word:
        raise ValueError(f"{spec.name}: group size must be a multiple of {per_word}")
    groups = -(-in_features // spec.group_size)
    return per_word, groups, groups * spec.group_size // per_word


def max_int(spec: QuantizationSpec) -> int:
    return 2 ** (spec.bits - 1) - 1


# ---- numpy ----------------------------------------------------------------------------------


# Rows are quantized independently, so a large weight is processed in blocks of rows: the float32
# temporaries then stay a few tens of MB however large the tensor (a Llama-3 embedding is 2 GB).
_BLOCK_ELEMENTS = 1 << 22


def quantize_tensor(array: np.ndarray, spec: QuantizationSpec) -> list[np.ndarray]:
    """A float [rows, k] weight -> [q_weight uint32 [rows, words], q_scale [rows, groups]]."""
    if array.ndim != 2:
        raise ValueError(f"group quantization expects a 2-D weight, got shape {array.shape}")
    rows, k = array.shape
    per_word, groups, words = layout(spec, k)
    packed = np.empty((rows, words), np.uint32)
    scale = np.empty((rows, groups), numpy_dtype(spec.model_dtype))
    step = max(1, _BLOCK_ELEMENTS // max(k, 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        packed[start:stop], scale[start:stop] = _quantize_rows(array[start:stop], spec)
    return [packed, scale]


def _quantize_rows(array: np.ndarray, spec: QuantizationSpec) -> tuple[np.ndarray, np.ndarray]:
    rows, k = array.shape
    per_word, groups, words = layout(spec, k)
    dtype = numpy_dtype(spec.model_dtype)
    mi = max_int(spec)
    # Start from the weight as the model dtype holds it (as MLC quantizes the converted model).
    w = array.astype(dtype).astype(np.float32)
    padded = np.zeros((rows, groups * spec.group_size), np.float32)
    padded[:, :k] = w
    grouped = padded.reshape(rows, groups, spec.group_size)
    scale = (np.abs(grouped).max(axis=-1) / np.float32(mi)).astype(dtype)
    scale32 = scale.astype(np.float32)[..., None]
    # An all-zero group has scale 0: store the zero point so it dequantizes to exactly 0.
    safe = np.where(scale32 == 0, np.float32(1), scale32)
    q = np.clip(np.round(grouped / safe + mi), 0, 2 * mi).astype(np.uint32)
    q = q.reshape(rows, words, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(spec.bits))[None, None, :]
    packed = np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)
    return packed, scale


def dequantize_reference(q_weight: np.ndarray, q_scale: np.ndarray, k: int, spec: QuantizationSpec) -> np.ndarray:
    """The scheme's dequantization in numpy, in the model dtype: the reference the compiled
    kernels must match bit for bit."""
    rows = q_weight.shape[0]
    per_word, groups, words = layout(spec, k)
    dtype = numpy_dtype(spec.model_dtype)
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(spec.bits))[None, None, :]
    q = (q_weight[:, :, None] >> shifts) & np.uint32((1 << spec.bits) - 1)
    q = q.reshape(rows, words * per_word)[:, :k]
    centered = (q.astype(np.float32) - max_int(spec)).astype(dtype)
    scale = np.repeat(q_scale, spec.group_size, axis=1)[:, :k]
    return (centered * scale).astype(dtype)


# ---- Relax ----------------------------------------------------------------------------------


def _dequantize_te(q_weight: Any, q_scale: Any, spec: QuantizationSpec, rows: Any, k: int, transpose: bool) -> Any:
    """TE dequantization of [rows, k] (or its transpose [k, rows], so that a matmul reads the
    weight without a separate transpose kernel)."""
    from tvm import te, tirx

    per_word = 32 // spec.bits
    mask = tirx.const((1 << spec.bits) - 1, "uint32")
    zero = tirx.const(max_int(spec), spec.model_dtype)

    def value(r: Any, c: Any) -> Any:
        word = q_weight[r, c // per_word]
        shift = ((c % per_word) * spec.bits).astype("uint32")
        q = tirx.bitwise_and(tirx.shift_right(word, shift), mask).astype(spec.model_dtype)
        return (q - zero) * q_scale[r, c // spec.group_size]

    if transpose:
        return te.compute((k, rows), lambda c, r: value(r, c), name="dequantize")
    return te.compute((rows, k), value, name="dequantize")


def _make_modules() -> tuple[type, type]:
    """The quantized nn modules (defined lazily: importing this file must not import tvm)."""
    from tvm import te, tirx
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op

    class GroupQuantLinear(nn.Module):
        def __init__(self, in_features: int, out_features: int, bias: bool, out_dtype: str | None, spec: QuantizationSpec):
            _, groups, words = layout(spec, in_features)
            self.in_features, self.out_features, self.spec = in_features, out_features, spec
            self.out_dtype = out_dtype
            self.q_weight = nn.Parameter((out_features, words), "uint32")
            self.q_scale = nn.Parameter((out_features, groups), spec.model_dtype)
            self.bias = nn.Parameter((out_features,), out_dtype or spec.model_dtype) if bias else None

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            w = op.tensor_expr_op(
                lambda qw, qs: _dequantize_te(qw, qs, self.spec, self.out_features, self.in_features, transpose=True),
                "dequantize",
                [self.q_weight, self.q_scale],
            )
            # float32 accumulation, one rounding to the activation dtype (see base_nn.Linear)
            y = op.matmul(x, w, out_dtype="float32")
            if getattr(self, "tp_allreduce", False):  # a row-parallel shard: sum across shards first
                y = op.ccl_allreduce(y, "sum")
            if self.bias is not None:
                y = y + self.bias.astype("float32")
            dtype = self.out_dtype or x.dtype
            return y if dtype == "float32" else y.astype(dtype)

        def to(self, dtype: str | None = None) -> None:  # stored dtypes are fixed by the scheme
            return None

    class GroupQuantEmbedding(nn.Module):
        def __init__(self, num: int, dim: int, spec: QuantizationSpec):
            _, groups, words = layout(spec, dim)
            self.num, self.dim, self.spec = num, dim, spec
            self.q_weight = nn.Parameter((num, words), "uint32")
            self.q_scale = nn.Parameter((num, groups), spec.model_dtype)

        def forward(self, ids: nn.Tensor) -> nn.Tensor:
            spec, dim = self.spec, self.dim
            per_word = 32 // spec.bits
            mask = tirx.const((1 << spec.bits) - 1, "uint32")
            zero = tirx.const(max_int(spec), spec.model_dtype)

            # Gather and dequantize only the rows asked for, in one kernel.
            def gather(qw: Any, qs: Any, idx: Any) -> Any:
                def value(i: Any, c: Any) -> Any:
                    r = idx[i]
                    word = qw[r, c // per_word]
                    shift = ((c % per_word) * spec.bits).astype("uint32")
                    q = tirx.bitwise_and(tirx.shift_right(word, shift), mask).astype(spec.model_dtype)
                    return (q - zero) * qs[r, c // spec.group_size]

                return te.compute((idx.shape[0], dim), value, name="dequantize_take")

            flat = ids if ids.ndim == 1 else op.reshape(ids, [-1])
            out = op.tensor_expr_op(gather, "dequantize_take", [self.q_weight, self.q_scale, flat])
            return out if ids.ndim == 1 else op.reshape(out, [*ids.shape, dim])

        def lm_head_forward(self, x: nn.Tensor) -> nn.Tensor:
            w = op.tensor_expr_op(
                lambda qw, qs: _dequantize_te(qw, qs, self.spec, self.num, self.dim, transpose=True),
                "dequantize",
                [self.q_weight, self.q_scale],
            )
            return op.matmul(x, w, out_dtype="float32")

        def to(self, dtype: str | None = None) -> None:
            return None

    return GroupQuantLinear, GroupQuantEmbedding


def quantize_model(model: Any, spec: QuantizationSpec) -> QuantizeMap:
    """Cast ``model`` to the model dtype and replace every nn.Linear / nn.Embedding by its
    group-quantized twin (in place). Returns which float weights became which stored tensors."""
    from tvm.relax.frontend import nn

    linear_cls, embedding_cls = _make_modules()
    qmap: QuantizeMap = {}
    model.to(spec.model_dtype)

    class _Replace(nn.Mutator):
        def visit_module(self, name: str, node: nn.Module) -> Any:
            if isinstance(node, nn.Linear):
                out_features, in_features = (int(s) for s in node.weight.shape)
                qmap[f"{name}.weight"] = (f"{name}.q_weight", f"{name}.q_scale")
                replacement = linear_cls(in_features, out_features, node.bias is not None, node.out_dtype, spec)
                replacement.tp_allreduce = getattr(node, "tp_allreduce", False)  # a row-parallel shard's
                return replacement
            if isinstance(node, nn.Embedding):
                num, dim = (int(s) for s in node.weight.shape)
                qmap[f"{name}.weight"] = (f"{name}.q_weight", f"{name}.q_scale")
                return embedding_cls(num, dim, spec)
            return self.visit(name, node)

    _Replace().visit("", model)
    return qmap
