"""CUDA kernels checked without a GPU. The decode attention kernel (cuda_attention): its
numerics on the CPU (the same kernel text with the threads as loops, ``emulate=True``) against a
numpy reference (code generation for sm_90 with nvcc: tests/test_compile_cuda.py). Both it and
the dp4a GEMV (cuda_qgemv_dp4a), emulated, inside a tiny llama compiled for the CPU against the
standard CPU build of the same model."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")


def _reference(q, pages, indptr, values, last_len, sm_scale):
    """Softmax attention of each query head over its sequence's rows, and the log2-domain lse."""
    batch, heads, _ = q.shape
    group = heads // pages.shape[2]
    page_size = pages.shape[3]
    out = np.zeros(q.shape, np.float32)
    lse = np.zeros((batch, heads), np.float32)
    for b in range(batch):
        seq_pages = values[indptr[b]:indptr[b + 1]]
        n = (len(seq_pages) - 1) * page_size + last_len[b]
        k = np.concatenate([pages[p, 0] for p in seq_pages], axis=1)[:, :n].astype(np.float32)
        v = np.concatenate([pages[p, 1] for p in seq_pages], axis=1)[:, :n].astype(np.float32)
        for h in range(heads):
            s = k[h // group] @ q[b, h].astype(np.float32) * sm_scale * np.log2(np.e)
            p = np.exp2(s - s.max())
            out[b, h] = p @ v[h // group] / p.sum()
            lse[b, h] = s.max() + np.log2(p.sum())
    return out, lse


@pytest.mark.parametrize(
    "h_kv,h_q,d,lengths",
    [
        (8, 32, 128, [129, 5]),  # Llama-3-8B's heads: 2 streams per warp, 8 warps, a partial last round
        (2, 8, 64, [1, 17, 300]),  # 4 streams per warp; one row, a page and a bit, five rounds
        (1, 1, 32, [40]),  # no grouping, 8 streams per warp
        (2, 4, 16, [7, 33]),  # the tiny test models' heads: 16 streams per warp, 2-lane butterfly
    ],
)
def test_decode_attention_matches_numpy(h_kv, h_q, d, lengths):
    import tvm

    from mlcbuild.compiler.kernels import cuda_attention

    page_size = 16
    rng = np.random.default_rng(0)
    pages_per_seq = [-(-n // page_size) for n in lengths]
    total = sum(pages_per_seq) + 3
    indptr = np.concatenate([[0], np.cumsum(pages_per_seq)]).astype(np.int32)
    values = rng.permutation(total)[: sum(pages_per_seq)].astype(np.int32)  # pages scattered
    last_len = np.array([n - (p - 1) * page_size for n, p in zip(lengths, pages_per_seq)], np.int32)
    q = rng.standard_normal((len(lengths), h_q, d)).astype(np.float16)
    pages = (rng.standard_normal((total, 2, h_kv, page_size, d)) * 2).astype(np.float16)

    kernel = cuda_attention.build(h_kv, h_q, d, "float16", page_size, emulate=True)
    lib = tvm.compile(tvm.IRModule({"main": kernel}), target=tvm.target.Target({"kind": "llvm"}))
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(q.shape, np.float16), dev)
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32), dev)
    zeros = np.zeros(len(lengths), np.int32)  # RoPE offsets: unused (the cache applied RoPE)
    args = [tvm.runtime.tensor(a, dev) for a in (q, pages, indptr, values, last_len, zeros, zeros)]
    lib["main"](*args, out, lse, 0, 1.0, 10000.0, d**-0.5)

    want_out, want_lse = _reference(q, pages, indptr, values, last_len, d**-0.5)
    # float16 output: within one unit of its last place (plus float32 summation order)
    np.testing.assert_allclose(out.numpy().astype(np.float32), want_out, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=0, atol=1e-4)


def test_shapes_it_declines():
    from mlcbuild.compiler.kernels import cuda_attention

    assert cuda_attention.shape_fits(8, 32, 128, "float16")
    assert not cuda_attention.shape_fits(8, 32, 96 + 4, "float16")  # head dims not in 16-byte loads
    assert not cuda_attention.shape_fits(8, 32, 512, "float16")  # a row wider than a warp's loads
    assert not cuda_attention.shape_fits(8, 32, 128, "float32")
    with pytest.raises(ValueError, match="unsupported shape"):
        cuda_attention.build(3, 8, 128, "float16", 16)


def _compare_with_cpu_build(built_model, tmp_path, monkeypatch, patch) -> None:
    """Compile the tiny llama q4f16_1 for the CPU again with ``patch(monkeypatch)`` applied and
    check its logits against the standard CPU build: 12 greedy steps of one sequence (tokens
    identical, logits within 1e-3 of their largest), then 3 batch steps of two sequences of 5
    and 21 tokens."""
    from compiler_harness import CompiledModel, run_stage

    from mlcbuild.stages.compile import Compile, CompileParams

    reference = built_model("llama", "q4f16_1")
    patch(monkeypatch)
    library = run_stage(Compile(), CompileParams(quantization="q4f16_1", device="cpu"),
                        {"config": reference["config"]}, tmp_path / "library")
    want, got = CompiledModel(reference), CompiledModel({**reference, "library": library})

    ids = np.array([5, 17, 99, 3, 250, 42, 7, 1, 64, 128, 11], dtype=np.int32)
    _, want_tokens, want_steps = want.generate(ids, steps=12)
    _, got_tokens, got_steps = got.generate(ids, steps=12)
    assert got_tokens == want_tokens
    scale = np.abs(np.array(want_steps)).max()
    np.testing.assert_allclose(np.array(got_steps), np.array(want_steps), rtol=0, atol=1e-3 * scale)

    results = []
    for model in (want, got):
        kv = model.new_cache()
        for seq, prompt in enumerate((ids[:5], np.tile(ids, 2)[:21])):
            model._builtin["kv_state_add_sequence"](kv, seq)
            model.prefill_all(kv, seq, prompt)
        results.append([model.decode(kv, [0, 1], [3, 4]) for _ in range(3)])
    np.testing.assert_allclose(np.array(results[1]), np.array(results[0]), rtol=0, atol=1e-3 * np.abs(np.array(results[0])).max())


def test_decode_attention_in_a_compiled_model(built_model, tmp_path, monkeypatch):
    """The kernel in the KV cache's real calling convention: the tiny llama compiled for the CPU
    with its decode attention swapped for the emulated CUDA kernel."""
    from mlcbuild.compiler.kernels import cpu_attention, cuda_attention
    from mlcbuild.compiler.kernels.kv_cache_calls import shape_ints

    keep = cpu_attention.replacements

    def with_cuda_decode(mod):
        out = keep(mod)
        for gvar, func in mod.functions_items():
            if gvar.name_hint == "batch_decode_paged_kv_cpu":
                q, pages = list(func.params)[:2]
                _, h_q, d = shape_ints(q)
                _, _, h_kv, page_size, _ = shape_ints(pages)
                out[gvar.name_hint] = cuda_attention.build(h_kv, h_q, d, str(q.dtype), page_size, emulate=True)
        assert "batch_decode_paged_kv_cpu" in out
        return out

    _compare_with_cpu_build(built_model, tmp_path, monkeypatch,
                            lambda mp: mp.setattr(cpu_attention, "replacements", with_cuda_decode))


def test_integer_dot_gemv_in_a_compiled_model(built_model, tmp_path, monkeypatch):
    """The same for the dp4a GEMV (``cuda_qgemv_dp4a``, emulated): every decode GEMV it takes
    (fused epilogues: residual adds, casts) of the tiny llama, at batch 1 and 2."""
    from mlcbuild.compiler.kernels import cpu_matmul, cpu_qgemv_vnni, cuda_qgemv_dp4a, matmul_analysis

    taken = []
    keep_vnni, keep_float = cpu_qgemv_vnni.build, cpu_matmul.build_gemv_q

    def dp4a_first(keep):
        def build(info, gq, *args, **kwargs):
            try:
                kernel = cuda_qgemv_dp4a.build(info, gq, emulate=True)
            except matmul_analysis.NotMatched:
                return keep(info, gq, *args, **kwargs)
            taken.append(info.n_extent)
            return kernel
        return build

    def patch(mp):
        mp.setattr(cpu_qgemv_vnni, "build", dp4a_first(keep_vnni))
        mp.setattr(cpu_matmul, "build_gemv_q", dp4a_first(keep_float))

    _compare_with_cpu_build(built_model, tmp_path, monkeypatch, patch)
    assert len(taken) >= 4, taken  # qkv, o, gate_up, down (decode and batch_decode), lm_head
