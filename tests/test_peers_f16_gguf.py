"""benchmarks/peers.py's F16 GGUF writer: every KV field copied, tensors dequantized to F16 (norms kept F32)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

PEERS = Path(__file__).resolve().parent.parent / "benchmarks" / "peers.py"


def _peers():
    spec = importlib.util.spec_from_file_location("benchmarks_peers", PEERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_f16_gguf_matches_dequantized(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 64)).astype(np.float32)  # 8 rows of 2 Q8_0 blocks
    q8 = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    emb = rng.standard_normal((4, 32)).astype(np.float32)
    norm = (1 + 1e-3 * rng.standard_normal(64)).astype(np.float32)

    src = tmp_path / "tiny.Q8_0.gguf"
    w = gguf.GGUFWriter(src, "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("general.name", "tiny ü")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_array("tokenizer.ggml.tokens", ["a", "Ġb", "<|im_end|>"])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3])
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", emb)
    w.add_tensor("blk.0.attn_norm.weight", norm)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    dst = _peers().write_f16_gguf(src, tmp_path / "tiny.F16.gguf")

    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    skip = {"general.file_type"}
    keys_a = {k for k in a.fields if not k.startswith("GGUF.")} - skip
    keys_b = {k for k in b.fields if not k.startswith("GGUF.")} - skip
    assert keys_a == keys_b
    for k in keys_a:
        assert a.fields[k].contents() == b.fields[k].contents(), k
    assert b.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16

    by_name = {t.name: t for t in b.tensors}
    assert [t.name for t in b.tensors] == [t.name for t in a.tensors]
    for t in a.tensors:
        out = by_name[t.name]
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(out.data.shape)
        if t.name.endswith("norm.weight"):
            assert out.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(out.data, expected)
        else:
            assert out.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_array_equal(out.data, expected.astype(np.float16))
        assert list(out.shape) == list(t.shape)
    # Q8_0 dequantized is close to the original weights: the conversion went through real values
    np.testing.assert_allclose(by_name["blk.0.ffn_up.weight"].data.astype(np.float32), weight, atol=0.05)
