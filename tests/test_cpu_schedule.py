"""The CPU schedules (mlcbuild.compiler.kernels) compute what the unscheduled kernels compute.

Small shapes, each kernel built twice (as legalized, and scheduled) and run on the same random
inputs; matmuls are also checked against numpy with the quantization's own dequantization.
A few seconds in all.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm.relax.frontend import nn  # noqa: E402

from mlcbuild.compiler.kernels import apply_cpu_schedules, last_report  # noqa: E402
from mlcbuild.compiler.kernels import cpu_attention, cpu_qgemv_vnni  # noqa: E402
from mlcbuild.quantization import get_quantization  # noqa: E402
from mlcbuild.quantization.scheme import family  # noqa: E402
from mlcbuild.compiler.pipeline import fusion_passes  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
K, N = 96, 40  # 12 packed words per row (not a multiple of 16 lanes), 40 rows (not of 48)


class _Block(nn.Module):
    """linear -> + residual (epilogue), linear without epilogue, rms_norm, silu * up."""

    def __init__(self, k: int = K) -> None:
        self.proj = nn.Linear(k, N, bias=False)
        self.up = nn.Linear(k, 2 * k, bias=False)
        self.norm = nn.RMSNorm(k, -1, 1e-5, bias=False)

    def forward(self, x: nn.Tensor, res: nn.Tensor) -> Any:
        h = self.norm(x)
        gate, up = nn.op.split(self.up(h), 2, axis=-1)
        return self.proj(nn.op.silu(gate) * up) + res


def _fused_module(quant: str, shape: list[Any], k: int = K) -> tuple[Any, dict[str, Any]]:
    spec = get_quantization(quant)
    model = _Block(k)
    family(spec).quantize_model(model, spec)
    dt = spec.model_dtype
    mod, params = model.export_tvm(
        spec={
            "forward": {
                "x": nn.spec.Tensor([*shape, k], dt),
                "res": nn.spec.Tensor([*shape, N], dt),
                "$": {"param_mode": "plain", "effect_mode": "none"},
            }
        }
    )
    with TARGET:
        mod = tvm.transform.Sequential(fusion_passes())(mod)
    return mod, dict(params)


def _primfuncs(mod: Any) -> dict[str, Any]:
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _random_args(func: Any, dyn: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for p in func.params:
        shape = [int(s) if isinstance(s, tvm.tirx.IntImm) else dyn for s in p.shape]
        dtype = str(p.dtype)
        if dtype == "uint32":
            out.append(rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32))
        elif "scale" in p.name:
            out.append((rng.random(shape) * 0.1 + 0.01).astype(dtype))
        else:
            out.append(rng.standard_normal(shape).astype(dtype))
    return out


def _run(func: Any, arrays: list[np.ndarray]) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    lib.jit()["main"](*tensors)
    return tensors[-1].numpy().astype(np.float32)


def _tolerance(quant: str) -> float:
    return 1e-4 if get_quantization(quant).model_dtype == "float32" else 2e-2


# decode (static row, batch of 3: GEMV) and prefill (1 and 13 rows: GEMM incl. a partial tile)
CASES = [
    ("q4f16_1", [1, 1], 1), ("q4f32_1", [1, 1], 1), ("q0f16", [1, 1], 1), ("q0f32", [1, 1], 1),
    ("q3f16_1", [1, 1], 1),  # 10 values per word, rows padded to whole groups of 40
    ("q4f16_1", ["batch_size", 1], 3), ("q0f32", ["batch_size", 1], 3),
    ("q4f32_1", [1, "seq_len"], 13), ("q0f16", [1, "seq_len"], 13), ("q4f16_1", [1, "seq_len"], 1),
]


@pytest.mark.parametrize("quant,shape,dyn", CASES)
def test_scheduled_kernels_match_unscheduled(quant: str, shape: list[Any], dyn: int) -> None:
    mod, _ = _fused_module(quant, shape)
    before = _primfuncs(mod)
    scheduled = _primfuncs(apply_cpu_schedules(mod, TARGET))
    report = last_report()
    rng = np.random.default_rng(0)
    checked = []
    for name, func in before.items():
        if report.get(name) in (None, "none") or report[name].startswith("failed"):
            continue
        arrays = _random_args(func, dyn, rng)
        want, got = _run(func, list(arrays)), _run(scheduled[name], list(arrays))
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(quant) * scale, err_msg=f"{name} ({report[name]})")
        checked.append(report[name])
    # every matmul got a fast rule, and the other kernels were scheduled too
    assert not [n for n, r in report.items() if r.startswith("failed")], report
    matmuls = [r for n, r in report.items() if "matmul" in n]
    assert matmuls and all(r in ("gemv", "gemv-q", "gemv-q-vnni", "gemm") for r in matmuls), report
    assert len(checked) >= 4, report


# AVX-512 without VNNI: the float 4-bit GEMV; the host (VNNI where it has it): the integer one.
NO_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
HOST_RULE = "gemv-q-vnni" if cpu_qgemv_vnni.supported(TARGET) else "gemv-q"


@pytest.mark.parametrize(
    "quant,k,batch,target,rule",
    [
        ("q4f16_1", K, 1, NO_VNNI, "gemv-q"),
        ("q4f32_1", K, 1, NO_VNNI, "gemv-q"),
        ("q4f16_1", 128, 1, TARGET, HOST_RULE),  # 16 words per row: 512-bit dots
        ("q4f16_1", 64, 1, TARGET, HOST_RULE),  # 8 words per row: 256-bit dots
        ("q4f32_1", 128, 1, TARGET, HOST_RULE),  # float32 activations: 24-bit fixed point (3 byte planes)
        ("q4f32_1", 192, 3, TARGET, HOST_RULE),
        ("q4f16_1", 192, 3, TARGET, HOST_RULE),  # symbolic batch of 3 rows
        # a row's group scales made 16 groups a vector: 18 groups (16 + 2), 32 groups (16 + 16); 72 words
        # (and 24 above): 16-word dots and an 8-word tail
        ("q4f16_1", 576, 1, TARGET, HOST_RULE),
        ("q4f16_1", 1024, 3, TARGET, HOST_RULE),
    ],
)
def test_quantized_gemv_matches_numpy(quant: str, k: int, batch: int, target: Any, rule: str) -> None:
    """The fast 4-bit GEMVs (scale and zero point factored out of the inner loop; on VNNI CPUs
    integer dot products over 16-bit fixed-point activations) against numpy with the scheme's
    own dequantization, residual-add epilogue included."""
    mod, _ = _fused_module(quant, [1, 1] if batch == 1 else ["batch_size", 1], k)
    scheduled = _primfuncs(apply_cpu_schedules(mod, target))
    report = last_report()
    (name,) = [n for n, r in report.items() if "matmul" in n and "add" in n]
    assert report[name] == rule, report
    _check_gemv_numerics(scheduled[name], quant, k, batch)


def test_a_rule_that_fails_falls_back_and_is_recorded(monkeypatch) -> None:
    """A rule that applies and fails is never silent: the function falls back to the next rule (or
    stays unscheduled) and the fallback is collected with the function, the rule and the error in
    one line. A rule that does not apply (``NotMatched``) is no fallback; without a collector, a
    failing rule raises."""
    from mlcbuild.compiler.kernels import cpu_generic, cpu_matmul, matmul_analysis
    from mlcbuild.compiler.kernels.cpu_schedule import schedule_func

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected failure\nin a kernel schedule")

    def not_matched(*args: Any, **kwargs: Any) -> Any:
        raise matmul_analysis.NotMatched("does not apply")

    def reduction_that_fails(func: Any, lanes: int, keep: Any = cpu_generic.schedule_row_reduction) -> Any:
        return None if keep(func, lanes) is None else broken()  # fails where it applies

    monkeypatch.setattr(cpu_matmul, "build_gemv_q", broken)
    monkeypatch.setattr(cpu_generic, "schedule_row_reduction", reduction_that_fails)
    monkeypatch.setattr(cpu_generic, "schedule_head_invariant", not_matched)
    mod, _ = _fused_module("q4f16_1", [1, 1])
    fallbacks: list = []
    apply_cpu_schedules(mod, NO_VNNI, fallbacks=fallbacks)
    report = last_report()
    gemvs = [n for n in report if "matmul" in n]
    (norm,) = [n for n in report if "rms_norm" in n]
    assert len(gemvs) == 2 and all(report[n] == "gemv" for n in gemvs), report  # the next kernel took them
    assert report[norm] == "failed: reduction", report  # no other rule applies: left unscheduled
    assert sorted((f.function, f.rule, f.error) for f in fallbacks) == sorted(
        [(n, "gemv-q", "RuntimeError: in a kernel schedule") for n in gemvs]
        + [(norm, "reduction", "RuntimeError: in a kernel schedule")])
    with pytest.raises(RuntimeError, match="injected failure"):
        schedule_func(_primfuncs(mod)[norm], 16)


def _check_gemv_numerics(func: Any, quant: str, k: int, batch: int, tolerance: float | None = None) -> None:
    """Run ``func`` (a fused 4-bit ``linear + residual`` of ``_Block``) on random quantized
    weights and compare with numpy on the scheme's own dequantization (``tolerance``: of max|y|)."""
    from mlcbuild.quantization.group_quant import dequantize_reference, quantize_tensor

    spec = get_quantization(quant)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((N, k)).astype(np.float32)
    q_weight, q_scale = quantize_tensor(w, spec)
    x = rng.standard_normal((batch, 1, k)).astype(spec.model_dtype)
    res = rng.standard_normal((batch, 1, N)).astype(spec.model_dtype)
    arrays = []
    for p in func.params:
        key = next((key for key in ("q_weight", "q_scale") if key in p.name), None)
        if key is not None:
            arrays.append(q_weight if key == "q_weight" else q_scale)
        elif int(p.shape[-1]) == k:
            arrays.append(x)
        elif len(arrays) < len(func.params) - 1:
            arrays.append(res)
        else:
            arrays.append(np.zeros((batch, 1, N), spec.model_dtype))
    got = _run(func, arrays)
    wd = dequantize_reference(q_weight, q_scale, k, spec).astype(np.float32)
    want = x.astype(np.float32).reshape(batch, k) @ wd.T + res.astype(np.float32).reshape(batch, N)
    atol = (tolerance or _tolerance(quant)) * np.abs(want).max()
    np.testing.assert_allclose(got.reshape(batch, N), want, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "k,batch",
    [
        (1024, 1),  # 32 groups: every lane has one at every step (no guard), 4 steps unrolled
        (96, 1),  # 3 groups: lanes without a group, guarded loads
        (2048, 3),  # symbolic batch (blockIdx.y per row), 2 steps
    ],
)
def test_cuda_integer_dot_gemv_numerics_emulated(k: int, batch: int) -> None:
    """The CUDA dp4a GEMV (``cuda_qgemv_dp4a``), generated with its threads as serial loops, the
    warp-shuffle tree as the same additions and dp4a as byte products, runs here: its fixed-point
    activations, byte planes, shared-memory layout and recombination against numpy."""
    from mlcbuild.compiler.kernels import cuda_qgemv_dp4a, matmul_analysis

    mod, _ = _fused_module("q4f16_1", [1, 1] if batch == 1 else ["batch_size", 1], k)
    (func,) = [f for n, f in _primfuncs(mod).items() if "matmul" in n and "add" in n]
    info, _ = matmul_analysis.analyze(func)
    gq = matmul_analysis.match_group_quant(info)
    assert cuda_qgemv_dp4a.applies(info, gq)
    # within 1e-3 of max|y|: the float16 output's own rounding (a lost low byte plane would be ~4e-3)
    _check_gemv_numerics(cuda_qgemv_dp4a.build(info, gq, emulate=True), "q4f16_1", k, batch, tolerance=1e-3)
    # float32 activations (q4f32_1) are not taken: they asked for exactness
    mod32, _ = _fused_module("q4f32_1", [1, 1], k)
    (func32,) = [f for n, f in _primfuncs(mod32).items() if "matmul" in n and "add" in n]
    info32, _ = matmul_analysis.analyze(func32)
    assert not cuda_qgemv_dp4a.applies(info32, matmul_analysis.match_group_quant(info32))


@pytest.mark.parametrize("d", [32, 64])
def test_attention_kernels_match_tvm_reference(d: int) -> None:
    """Decode (its pages in one task per kv head, and split in two ranges merged after), ragged and paged
    prefill against TVM's reference kernels: lengths inside a page, on a page boundary and across pages
    (the scores of 16 rows are summed together, rows past the end masked), and a sequence without pages (a
    prefix-sharing fork's depth it has no pages in: 0 and lse -5e4, not 0/0)."""
    from tvm.relax.frontend.nn.llm import _decode_kernels as dk
    from tvm.relax.frontend.nn.llm import _prefill_kernels as pk

    h_kv, h_q, dtype, page = 2, 4, "float16", 16
    rng = np.random.default_rng(2)
    lens = [5, 37, 32, 0]
    npg = [(n + page - 1) // page for n in lens]
    indptr = np.concatenate([[0], np.cumsum(npg)]).astype("int32")
    values = rng.permutation(8)[: indptr[-1]].astype("int32")
    last = np.array([n - (p - 1) * page for n, p in zip(lens, npg)], "int32")
    pages = rng.standard_normal((8, 2, h_kv, page, d)).astype(dtype)

    def run(func: Any, arrays: list[Any]) -> list[np.ndarray]:
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET).jit()
        args = [tvm.runtime.tensor(a) if isinstance(a, np.ndarray) else a for a in arrays]
        lib["main"](*args)
        return [args[i].numpy().astype(np.float32) for i in range(len(args)) if isinstance(arrays[i], np.ndarray)]

    b = len(lens)
    q = rng.standard_normal((b, h_q, d)).astype(dtype)
    decode = [q, pages, indptr, values, last, np.zeros(b, "int32"), np.zeros(b, "int32"),
              np.zeros((b, h_q, d), dtype), np.zeros((b, h_q), "float32"), 0, 1.0, 1e4, 0.17]
    want = run(dk._attention_decode_cpu(h_kv, h_q, d, dtype, False, {}), decode)
    for splits in (1, 2, 3):  # 8 tasks, split in 1, 2, 3 page ranges (3: some empty)
        got = run(cpu_attention.decode_kernel(h_kv, h_q, d, dtype, page, splits=splits, split_below=64), decode)
        for w, g in zip(want[-2:], got[-2:]):
            np.testing.assert_allclose(g, w, atol=2e-3, err_msg=f"decode in {splits} page ranges")
    got = run(cpu_attention.decode_kernel(h_kv, h_q, d, dtype, page, split_below=2), decode)  # never split
    for w, g in zip(want[-2:], got[-2:]):
        np.testing.assert_allclose(g, w, atol=2e-3, err_msg="decode, no split")

    qlens = [3, 11, 20, 0]
    qo = sum(qlens)
    qi = np.concatenate([[0], np.cumsum(qlens)]).astype("int32")
    qq = rng.standard_normal((qo, h_q, d)).astype(dtype)
    kk, vv = (rng.standard_normal((qo, h_kv, d)).astype(dtype) for _ in range(2))
    kernels = {
        "ragged": [pk._attention_prefill_ragged_cpu(h_kv, h_q, d, d, dtype, {}), cpu_attention.prefill_ragged_kernel(h_kv, h_q, d, d, dtype)],
        "paged": [pk._attention_prefill_cpu(h_kv, h_q, d, dtype, False, {}), cpu_attention.prefill_paged_kernel(h_kv, h_q, d, dtype, page)],
    }
    for kind, funcs in kernels.items():
        libs = [tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=TARGET).jit()["main"] for f in funcs]
        for causal in (0, 1):
            if kind == "ragged":
                arrays = [qq, qi, kk, vv, qi, np.zeros(qo, "int32"), np.zeros(b, "int32")]
            else:
                arrays = [qq, qi, pages, indptr, values, last, np.zeros(b, "int32"), np.zeros(qo, "int32")]
            outs = []
            for lib in libs:
                out, lse = tvm.runtime.tensor(np.zeros((qo, h_q, d), dtype)), tvm.runtime.tensor(np.zeros((qo, h_q), "float32"))
                lib(*[tvm.runtime.tensor(a) for a in arrays], out, lse, causal, 0, 1.0, 1e4, 0.17)
                outs.append((out.numpy().astype(np.float32), lse.numpy()))
            for w, g in zip(outs[0], outs[1]):
                np.testing.assert_allclose(g, w, atol=2e-3, err_msg=f"{kind} causal={causal}")


def test_vectorizable_exp_and_sigmoid_match_numpy() -> None:
    """``_tir_math.exp``/``sigmoid`` (what SiLU and other elementwise kernels get instead of a libm
    call per element) against numpy in float64, over expf's whole range and at its edges."""
    from tvm import te

    from mlcbuild.compiler.kernels import _tir_math

    x = te.placeholder((4096,), "float32", name="x")
    e = te.compute((4096,), lambda i: _tir_math.exp(x[i]), name="e")
    s = te.compute((4096,), lambda i: _tir_math.sigmoid(x[i]), name="s")
    e2 = te.compute((4096,), lambda i: _tir_math.exp2_nonpositive(-tvm.tirx.abs(x[i])), name="e2")
    func = te.create_prim_func([x, e, s, e2])
    values = np.concatenate([np.linspace(-87, 88, 4000), [-1e3, -87.4, 88.8, 0.0, 1e-8, -1e-8, 30.0, -30.0], np.zeros(88)])
    arrays = [values.astype("float32")] + [np.zeros(4096, "float32")] * 3
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET).jit()
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*tensors)
    got_e, got_s, got_e2 = (t.numpy().astype(np.float64) for t in tensors[1:])
    xs = arrays[0].astype(np.float64)
    want = np.exp(xs)
    normal = (want > 1.2e-38) & (want < 3.4e38)
    assert np.max(np.abs(got_e[normal] - want[normal]) / want[normal]) < 2e-7
    assert got_e[4002] == np.inf and got_e[4000] < 1.2e-38 and got_e[4003] == 1.0
    np.testing.assert_allclose(got_s, 1.0 / (1.0 + np.exp(-xs)), rtol=0, atol=2e-7)
    want2 = np.exp2(-np.abs(xs))
    normal2 = want2 > 1.2e-38
    assert np.max(np.abs(got_e2[normal2] - want2[normal2]) / want2[normal2]) < 3e-7


@pytest.mark.parametrize("quant", ["q0f16", "q0f32"])
def test_gemv_prefetches_the_rows_ahead(quant: str) -> None:
    """The 16/32-bit decode GEMV issues a prefetch of every 64-byte line of the weight rows
    ``PREFETCH_BYTES`` ahead of each chunk of rows it reads (clamped to the last row); the
    numerics are the other tests' (a prefetch changes no value)."""
    import re

    from mlcbuild.compiler.kernels import cpu_matmul, matmul_analysis

    mod, _ = _fused_module(quant, [1, 1])
    info, _ = matmul_analysis.analyze(_primfuncs(mod)["NT_matmul"])
    text = cpu_matmul.build_gemv(info, 16).script()
    row_bytes = K * (2 if quant == "q0f16" else 4)
    ahead = cpu_matmul.PREFETCH_BYTES // row_bytes
    first = re.findall(r"llvm\.prefetch\", T\.address_of\((\w+)\[T\.min\(n_0 \* T\.int64\((\d+)\) \+ T\.int64\((\d+)\)", text)
    assert first, text
    weights = {name for name, _, _ in first}
    assert weights == {"up_weight"}
    rows = int(first[0][1])
    assert sorted({int(a) for _, _, a in first}) == list(range(ahead, ahead + rows))
    assert len(first) == rows * -(-row_bytes // 64)  # every line of every row once


def test_cpu_family_picks_the_gemv_tuning() -> None:
    """The tuning follows the target's mcpu (never the build host): znver* gets AMD Zen's choices (one
    row per iteration, no software prefetch), every other x86 CPU the Intel-tuned default."""
    from mlcbuild.compiler.kernels.cpu_tuning import AMD_ZEN, INTEL, tuning_for

    def target(mcpu: str) -> Any:
        return tvm.target.Target({"kind": "llvm", "mcpu": mcpu})

    assert tuning_for(target("znver4")) == AMD_ZEN and tuning_for(target("znver3")) == AMD_ZEN
    for mcpu in ("sapphirerapids", "skylake-avx512", "x86-64-v3"):
        assert tuning_for(target(mcpu)) == INTEL, mcpu
    assert AMD_ZEN.prefetch_bytes == 0 and AMD_ZEN.gemv_rows == 1 and INTEL.prefetch_bytes > 0


@pytest.mark.parametrize("family_name", ["intel", "amd-zen"])
@pytest.mark.parametrize("quant", ["q0f16", "q0f32", "q4f16_1"])
def test_each_cpu_familys_gemv_computes_the_same(quant: str, family_name: str) -> None:
    """Both families' decode GEMVs, built on this host whatever it is, compute what the unscheduled kernel
    computes; Intel's prefetches the rows ahead, AMD Zen's has no prefetch and (16/32-bit weights) runs one
    output row per parallel iteration."""
    from mlcbuild.compiler.kernels.cpu_schedule import schedule_func, vector_lanes
    from mlcbuild.compiler.kernels.cpu_tuning import AMD_ZEN, INTEL

    tuning = {"intel": INTEL, "amd-zen": AMD_ZEN}[family_name]
    mod, _ = _fused_module(quant, [1, 1], k=128)
    funcs = _primfuncs(mod)
    name = next(n for n in funcs if "matmul" in n and "add" in n)
    new, rule = schedule_func(funcs[name], vector_lanes(TARGET), cpu_qgemv_vnni.supported(TARGET), tuning=tuning)
    assert rule.startswith("gemv"), rule
    text = new.script()
    assert ("llvm.prefetch" in text) == (tuning is INTEL), text
    if rule == "gemv":
        assert f"T.parallel(T.int64({N // tuning.gemv_rows}))" in text, text
    arrays = _random_args(funcs[name], 1, np.random.default_rng(2))
    want, got = _run(funcs[name], list(arrays)), _run(new, list(arrays))
    np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(quant) * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("quant", ["q0f16", "q0f32"])
def test_few_row_gemv_keeps_half_x_past_its_limit(quant: str) -> None:
    """AMD Zen's few-row GEMV: where a block of float32 x would pass ``x_widen_bytes``, a float16 x is staged
    as float16 and widened at each use (float32 x is what it is); the results are the unscheduled kernel's
    at 1, 2 and 5 rows; the Zen tuning keeps a K = 576 block float32."""
    from mlcbuild.compiler.kernels import cpu_matmul, matmul_analysis
    from mlcbuild.compiler.kernels.cpu_tuning import AMD_ZEN

    assert AMD_ZEN.few_rows_block * 576 * 4 <= AMD_ZEN.few_rows_x_widen_bytes
    mod, _ = _fused_module(quant, [1, "seq_len"])
    funcs = _primfuncs(mod)
    name = next(n for n in funcs if "matmul" in n and "add" in n)
    info, _ = matmul_analysis.analyze(funcs[name])
    new = cpu_matmul.build_gemv_few_rows(info, 16, weight_rows=1, prefetch_bytes=0, x_widen_bytes=4 * K * 4 - 1)
    staged = [line for line in new.script().splitlines() if "xw = T." in line and "alloc_buffer" in line]
    assert staged and ('"float16"' in staged[0]) == (quant == "q0f16"), staged
    rng = np.random.default_rng(4)
    for rows in (1, 2, 5):
        arrays = _random_args(funcs[name], rows, rng)
        want, got = _run(funcs[name], list(arrays)), _run(new, list(arrays))
        np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(quant) * max(1.0, float(np.abs(want).max())),
                                   err_msg=f"{rows} rows")


def test_vnni_gemv_prefetches_the_rows_ahead() -> None:
    """The same for the 4-bit VNNI kernel: packed words and scales of the row ahead."""
    from mlcbuild.compiler.kernels import cpu_matmul, matmul_analysis

    mod, _ = _fused_module("q4f16_1", [1, 1], k=128)
    func = next(f for name, f in _primfuncs(mod).items() if "matmul" in name)
    info, _ = matmul_analysis.analyze(func)
    text = cpu_qgemv_vnni.build(info, matmul_analysis.match_group_quant(info)).script()
    ahead = cpu_matmul.PREFETCH_BYTES // (128 // 2)  # 64 bytes of packed words per row
    words = [line for line in text.splitlines() if "llvm.prefetch" in line and "weight" in line and "scale" not in line]
    scales = [line for line in text.splitlines() if "llvm.prefetch" in line and "scale" in line]
    assert len(words) == 1 and len(scales) == 1, text  # one 64-byte line of each per row
    assert f"T.int64({ahead})" in words[0] or f" + {ahead}" in words[0], words[0]


def test_float_4bit_gemv_prefetches_words_and_scales() -> None:
    """The float 4-bit GEMV (CPUs without VNNI, q3f16_1) prefetches the packed words and the
    scales of the rows ahead, for every row of a chunk."""
    import re

    from mlcbuild.compiler.kernels import cpu_matmul, matmul_analysis

    mod, _ = _fused_module("q4f16_1", [1, 1], k=128)
    func = next(f for name, f in _primfuncs(mod).items() if "matmul" in name)
    info, _ = matmul_analysis.analyze(func)
    text = cpu_matmul.build_gemv_q(info, matmul_analysis.match_group_quant(info), 16).script()
    hits = re.findall(r"llvm\.prefetch\", T\.address_of\((\w+)\[T\.min\(n_0 \* T\.int64\(4\) \+ T\.int64\((\d+)\)", text)
    ahead = cpu_matmul.PREFETCH_BYTES // 64  # 16 packed words = 64 bytes per row
    assert sorted(hits) == sorted((name, str(ahead + r)) for r in range(4) for name in ("proj_q_scale", "proj_q_weight")), hits


@pytest.mark.parametrize("prefill_rows", ["seq_len", "batch_size"])
@pytest.mark.parametrize("quant", ["q4f16_1", "q0f16"])
def test_verify_matmuls_get_their_own_multi_row_gemv(quant: str, prefill_rows: str) -> None:
    """batch_verify and batch_prefill compute the same matmuls, which Relax shares as one PrimFunc: the
    schedule gives batch_verify its own copies (few rows: each weight read once, as GEMV; float weights
    get the blocked few-row GEMV) and leaves prefill its GEMM; the copies compute what the unscheduled
    kernel does at 1, 2, 4 and 5 rows (5: a second block of rows, padded). ``batch_size``: the shared
    PrimFunc names its rows as the model's logits at each sequence's last position do (the lm_head, which
    batch_verify ran as a decode GEMV once per row): prefill gets a GEMV, verify still its few-row copy."""
    from tvm import relax

    from mlcbuild.compiler.kernels.cpu_schedule import FEW_ROWS_ATTR

    class TwoEntries(_Block):  # the model's two functions over one graph
        def batch_prefill(self, x: nn.Tensor, res: nn.Tensor) -> Any:
            return self.forward(x, res)

        def batch_verify(self, x: nn.Tensor, res: nn.Tensor) -> Any:
            return self.forward(x, res)

    spec = get_quantization(quant)
    model = TwoEntries()
    family(spec).quantize_model(model, spec)
    one = {"x": nn.spec.Tensor([1, "seq_len", K], spec.model_dtype), "res": nn.spec.Tensor([1, "seq_len", N], spec.model_dtype),
           "$": {"param_mode": "plain", "effect_mode": "none"}}
    first = {**one, "x": nn.spec.Tensor([1, prefill_rows, K], spec.model_dtype),
             "res": nn.spec.Tensor([1, prefill_rows, N], spec.model_dtype)}
    mod, _ = model.export_tvm(spec={"batch_prefill": first, "batch_verify": dict(one)})
    with TARGET:
        mod = tvm.transform.Sequential(fusion_passes())(mod)
    before = _primfuncs(mod)
    scheduled = apply_cpu_schedules(mod, TARGET)
    report = last_report()

    def matmuls(function: str) -> list[str]:
        text = scheduled[function].script()
        return sorted({name for name in _primfuncs(scheduled) if "matmul" in name and f"{name}," in text})

    prefill, verify = matmuls("batch_prefill"), matmuls("batch_verify")
    assert prefill and len(verify) == len(prefill) and not set(prefill) & set(verify), (prefill, verify)
    assert all(report[n] == "gemm" if prefill_rows == "seq_len" else report[n].startswith("gemv") for n in prefill), report
    assert all(report[n].startswith("gemv") and n.endswith("_few_rows") for n in verify), report
    if spec.kind == "none":  # float weights: the blocked few-row kernel
        assert {report[n] for n in verify} == {"gemv-few-rows"}, report
    funcs = _primfuncs(scheduled)
    assert all(funcs[n].attrs[FEW_ROWS_ATTR] for n in verify)
    rng = np.random.default_rng(3)
    for name in verify:
        original = before[name.removesuffix("_few_rows")]
        for rows in (1, 2, 4, 5):
            arrays = _random_args(original, rows, rng)
            want, got = _run(original, list(arrays)), _run(funcs[name], list(arrays))
            np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(quant) * max(1.0, float(np.abs(want).max())),
                                       err_msg=f"{name} at {rows} rows")
    assert isinstance(scheduled["batch_verify"], relax.Function)
