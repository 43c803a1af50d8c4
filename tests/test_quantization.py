"""Group quantization (q4f16_1, q4f32_1, q3f16_1): the numpy scheme, the compiled
dequantization (bit-exact against the numpy reference), and convert_weight's output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlcbuild.bundle_format import TENSOR_CACHE_FILE, TensorCacheIndex
from mlcbuild.quantization import QUANTIZATIONS, get_quantization
from mlcbuild.quantization.group_quant import dequantize_reference, layout, max_int, quantize_tensor
from mlcbuild.quantization.scheme import numpy_dtype

GROUP = [name for name, spec in QUANTIZATIONS.items() if spec.kind == "group"]


def test_layouts_are_mlcs():
    assert layout(get_quantization("q4f16_1"), 64) == (8, 2, 8)  # 8 nibbles per word, group 32
    assert layout(get_quantization("q3f16_1"), 64) == (10, 2, 8)  # 10 3-bit values, group 40, padded
    assert max_int(get_quantization("q4f16_1")) == 7 and max_int(get_quantization("q3f16_1")) == 3


def test_packing_order_is_little_end_first():
    spec = get_quantization("q4f32_1")
    # One group of 32 whose quantized values are known: q in 0..14 (2 * max_int), scale 0.5.
    q = np.arange(32) % 15
    w = ((q.astype(np.float32) - 7) * np.float32(0.5))[None, :]
    packed, scale = quantize_tensor(w, spec)
    assert packed.dtype == np.uint32 and packed.shape == (1, 4)
    expected = [sum(int(v) << (4 * j) for j, v in enumerate(q[i * 8 : (i + 1) * 8])) for i in range(4)]
    assert packed[0].tolist() == expected
    assert scale.dtype == np.float32 and scale.tolist() == [[0.5]]


@pytest.mark.parametrize("name", GROUP)
def test_quantize_dequantize_error_bounded_by_half_a_step(name):
    spec = get_quantization(name)
    rng = np.random.RandomState(1)
    w = rng.randn(24, 100).astype(np.float32)  # 100 is not a multiple of 32 or 40: padding
    w[3, :] = 0  # all-zero groups dequantize to exact zeros
    packed, scale = quantize_tensor(w, spec)
    _, groups, words = layout(spec, 100)
    assert packed.shape == (24, words) and scale.shape == (24, groups)
    assert scale.dtype == numpy_dtype(spec.model_dtype)
    deq = dequantize_reference(packed, scale, 100, spec)
    assert deq.shape == w.shape and deq.dtype == numpy_dtype(spec.model_dtype)
    assert (deq[3] == 0).all()
    step = np.repeat(scale.astype(np.float32), spec.group_size, axis=1)[:, :100]
    # half a quantization step, plus the model dtype's rounding of weight and product
    slack = 2e-3 if spec.model_dtype == "float16" else 1e-6
    assert (np.abs(deq.astype(np.float32) - w) <= step / 2 + slack * np.abs(w) + 1e-6).all()


@pytest.mark.parametrize("name", GROUP)
def test_compiled_dequantization_is_bit_exact(name):
    """The TE dequantization compiled by TVM equals the numpy reference bit for bit."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    from mlcbuild.quantization.group_quant import _dequantize_te

    spec = get_quantization(name)
    rows, k = 48, 100
    packed, scale = quantize_tensor(np.random.RandomState(2).randn(rows, k).astype(np.float32), spec)
    bb = relax.BlockBuilder()
    qw = relax.Var("qw", relax.TensorType(packed.shape, "uint32"))
    qs = relax.Var("qs", relax.TensorType(scale.shape, spec.model_dtype))
    with bb.function("main", [qw, qs]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit_te(lambda a, b: _dequantize_te(a, b, spec, rows, k, transpose=False), qw, qs))
        bb.emit_func_output(out)
    target = tvm.target.Target({"kind": "llvm"})
    vm = relax.VirtualMachine(tvm.compile(bb.finalize(), target=target), tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(packed), tvm.runtime.tensor(scale)).numpy()
    ref = dequantize_reference(packed, scale, k, spec)
    assert ours.dtype == ref.dtype
    assert ours.tobytes() == ref.tobytes()


@pytest.mark.parametrize("name", ["q4f16_1", "q3f16_1"])
def test_library_embedding_dequantizes_stored_weights_exactly(name, built_model):
    """Through the whole pipeline: the compiled ``embed`` (fused gather+dequantize) returns the
    numpy dequantization of the bytes convert_weight stored."""
    tvm = pytest.importorskip("tvm")
    from compiler_harness import CompiledModel

    model = CompiledModel(built_model("llama", name))
    names = [t["name"] for t in json.loads((built_model("llama", name)["weights"] / TENSOR_CACHE_FILE).read_text())["tensors"]]
    qw = model.params[names.index("model.embed_tokens.q_weight")].numpy()
    qs = model.params[names.index("model.embed_tokens.q_scale")].numpy()
    ids = np.arange(qw.shape[0], dtype="int32")
    ours = model.vm["embed"](tvm.runtime.tensor(ids), model.params).numpy()
    ref = dequantize_reference(qw, qs, ours.shape[1], get_quantization(name))
    assert ours.tobytes() == ref.tobytes()


def test_convert_weight_is_deterministic_and_indexed(tiny_checkpoint, tmp_path):
    import xxhash

    from mlcbuild.stages.convert_weight import convert
    from mlcbuild.stages.gen_config import GenConfigParams, make_chat_config

    checkpoint = tiny_checkpoint("qwen2")
    chat = make_chat_config(checkpoint, GenConfigParams(quantization="q4f16_1"))
    model_config = chat.model_dump(by_alias=True)["model_config"]
    # A small shard limit forces several shards.
    first = convert(checkpoint, model_config, "q4f16_1", tmp_path / "a", shard_bytes=20_000)
    second = convert(checkpoint, model_config, "q4f16_1", tmp_path / "b", shard_bytes=20_000)
    assert first == second and len(first.shards) > 1
    for shard in first.shards:
        assert (tmp_path / "a/params" / shard).read_bytes() == (tmp_path / "b/params" / shard).read_bytes()
    index = TensorCacheIndex.model_validate_json((tmp_path / "a" / TENSOR_CACHE_FILE).read_text())
    for record in index.tensors:
        data = (tmp_path / "a/params" / record.shard).read_bytes()[record.offset : record.offset + record.nbytes]
        assert xxhash.xxh3_128_hexdigest(data) == record.digest
        assert record.format == "raw"
    assert {t.dtype for t in index.tensors} == {"uint32", "float16"}


def test_bf16_checkpoint_reads_exactly(tmp_path):
    """bfloat16 safetensors (numpy cannot read them) widen exactly to float32."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from mlcbuild.stages.convert_weight import SafetensorsSource

    t = torch.randn(5, 7).to(torch.bfloat16)
    save_file({"w": t, "h": torch.randn(3).half()}, str(tmp_path / "model.safetensors"))
    source = SafetensorsSource(tmp_path)
    np.testing.assert_array_equal(source.get("w"), t.float().numpy())
    assert source.get("h").dtype == np.float16
