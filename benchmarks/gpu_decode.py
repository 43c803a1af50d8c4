"""Decode speed of CUDA bundles against the HBM-bandwidth bound, for models too big to ship.

Two steps, because the GPU machine has no compiler toolchain for us and takes only small uploads:

    python benchmarks/gpu_decode.py prepare DIR [--device cuda:sm_90] [--integer-dot]
        here: gen_config + compile (nvcc) of a SmolLM2-135M-shaped and a Llama-3-8B-shaped model
        at q4f16_1 for cuda:sm_XX; DIR/<shape>/ holds mlc-chat-config.json and lib/.
        --integer-dot: batch-1 GEMVs on dp4a (the compile param kernels.cuda_integer_dot_batch1;
        prepare a second DIR with it and run both in one GPU session to compare).
        --decode-attention: the KV cache's decode attention kernel from cuda_attention
        (kernels.cuda_decode_attention), likewise.
    python benchmarks/gpu_decode.py run DIR [--batches 1 16]
        on the GPU: fills each bundle with random weights of the library's parameter shapes
        (speed does not depend on the values), a word-level tokenizer of the model's vocabulary
        and a manifest, runs `mlcbuild bench` at each batch size, measures the device-to-device
        copy bandwidth, and prints decode tok/s beside the bound (bandwidth / bytes of weights one
        decode step reads).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                         hidden_act="silu", bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"),
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                      rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                      hidden_act="silu", bos_token_id=128000, eos_token_id=128009, torch_dtype="bfloat16"),
}
QUANTIZATION = "q4f16_1"


def prepare(root: Path, device: str, shapes: list[str], integer_dot: bool = False,
            decode_attention: bool = False) -> None:
    from mlcbuild.pipeline.stage import StageContext
    from mlcbuild.recipe import Kernels
    from mlcbuild.stages.compile import Compile, CompileParams
    from mlcbuild.stages.gen_config import GenConfig, GenConfigParams

    kernels = Kernels(cuda_integer_dot_batch1=integer_dot, cuda_decode_attention=decode_attention)
    for shape in shapes:
        config = SHAPES[shape]
        bundle = root / shape
        bundle.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "src"
            source.mkdir()
            (source / "config.json").write_text(json.dumps(config))
            for stage, params, inputs in (
                (GenConfig(), GenConfigParams(quantization=QUANTIZATION, context_window_size=2048,
                                              prefill_chunk_size=512, max_batch_size=16), {"source": source}),
                (Compile(), CompileParams(quantization=QUANTIZATION, device=device, kernels=kernels), {"config": bundle}),
            ):
                work = Path(tmp) / stage.name
                work.mkdir()
                started = time.perf_counter()
                stage.run(StageContext(params=params, inputs=inputs, out=bundle, work=work,
                                       toolchain={}, key="gpu-bench", log=print))
                print(f"{shape}: {stage.name} {time.perf_counter() - started:.1f}s", flush=True)


def _load_runtime_cuda() -> None:
    """With a runtime-only tvm (TVM_USE_RUNTIME_LIB=1), the CUDA plugin must be loaded by hand."""
    import ctypes

    import tvm

    plugin = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if plugin.exists():
        ctypes.CDLL(str(plugin), ctypes.RTLD_GLOBAL)


def fill_bundle(bundle: Path, device: str) -> int:
    """Random weights, a tokenizer and a manifest for a bundle holding a config and a library;
    returns the bytes of weights one decode step reads."""
    import tvm
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tvm.runtime.vm import VirtualMachine

    from mlcbuild import bundle_format as bf
    from mlcbuild.runtime.bundle import _use_prebuilt_cuda_kernels

    if device == "cuda":
        _use_prebuilt_cuda_kernels(bundle)
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    vm = VirtualMachine(tvm.runtime.load_module(str(bundle / bf.LIBRARY_FILE)), dev)
    metadata = json.loads(vm["_metadata"]())
    chat = bf.ChatConfig.model_validate_json((bundle / bf.CHAT_CONFIG_FILE).read_bytes())
    per_step = sum(
        int(np.prod(p["shape"])) * (2 if p["dtype"] == "bfloat16" else np.dtype(p["dtype"]).itemsize)
        for p in metadata["params"]
        # An untied input embedding is read one row per token, not whole.
        if not ("embed_tokens" in p["name"] and not chat.arch_config.get("tie_word_embeddings", False))
    )
    shards, records = _random_weights(metadata["params"], bundle / "params")
    index = bf.TensorCacheIndex(quantization=chat.quantization, model_type=chat.model_type,
                                shards=shards, tensors=records)
    (bundle / bf.TENSOR_CACHE_FILE).write_text(index.model_dump_json(indent=1))
    vocab = {f"t{i}": i for i in range(chat.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(bundle / "tokenizer.json"))
    files = []
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != bf.MANIFEST_FILE):
        from mlcbuild.cache.digests import file_digests

        digest, sha256 = file_digests(path)
        files.append(bf.ManifestFile(path=path.relative_to(bundle).as_posix(), size=path.stat().st_size,
                                     digest=digest, sha256=sha256))
    manifest = bf.Manifest(name=bundle.name, quantization=chat.quantization, device=_bundle_device(bundle, device),
                           recipe={}, node_keys={}, tools={}, source={"format": "random"}, files=files)
    (bundle / bf.MANIFEST_FILE).write_text(manifest.model_dump_json(indent=1))
    return per_step


def _random_weights(params: list[dict], directory: Path) -> tuple[list[str], list]:
    """Shards of random values for ``params`` in ``directory``. Made once per parameter list and
    hard-linked into later bundles of the same model (variants of one library: 4.5 GB each for
    Llama-3-8B, a minute of the GPU machine's time per variant otherwise)."""
    import hashlib
    import os
    import shutil

    from mlcbuild.bundle_format import TensorRecord
    from mlcbuild.stages.convert_weight import ShardWriter

    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "mlcbuild-gpu-weights" / key
    if not (cache / "records.json").exists():
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        rng = np.random.default_rng(0)
        writer = ShardWriter(cache, 1 << 30)
        for param in params:
            shape, dtype = param["shape"], param["dtype"]
            if dtype == "uint32":
                array = rng.integers(0, 1 << 32, size=shape, dtype=np.uint32)
            else:
                array = (rng.standard_normal(size=shape, dtype=np.float32) * 0.02).astype(dtype)
            writer.add(param["name"], array)
        writer.close()
        records = [r.model_dump() for r in writer.records]
        (cache / "records.json").write_text(json.dumps({"shards": writer.shards, "records": records}))
    saved = json.loads((cache / "records.json").read_text())
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for shard in saved["shards"]:
        try:
            os.link(cache / shard, directory / shard)
        except OSError:  # another file system
            shutil.copyfile(cache / shard, directory / shard)
    return saved["shards"], [TensorRecord.model_validate(r) for r in saved["records"]]


def _bundle_device(bundle: Path, device: str) -> str:
    from mlcbuild import bundle_format as bf

    if device == "cpu":
        return "cpu"
    return "cuda:" + bf.CudaKernels.model_validate_json((bundle / bf.CUDA_KERNELS_FILE).read_bytes()).arch


def copy_bandwidth(device: str) -> float:
    """Device memory bandwidth in bytes/s: a 2 GiB device-to-device copy, read + write counted."""
    if device == "cpu":
        from cpu_kernels import dram_bandwidth  # this directory

        return dram_bandwidth(repeat=5) * 1e9
    import torch

    src = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        started = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() / best


def run(root: Path, batches: list[int], device: str, shapes: list[str]) -> None:
    if device == "cuda":
        _load_runtime_cuda()
    bandwidth = copy_bandwidth(device)
    print(f"device copy bandwidth: {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows = []
    for shape in shapes:
        bundle = root / shape
        started = time.perf_counter()
        per_step = fill_bundle(bundle, device)
        print(f"{shape}: random weights in {time.perf_counter() - started:.0f}s, {per_step / 1e9:.2f} GB read per step",
              flush=True)
        for batch in batches:
            done = subprocess.run([sys.executable, "-m", "mlcbuild.cli", "bench", str(bundle), "--device", device,
                                   "--batch", str(batch), "--prompt-len", "128", "--gen-len", "128", "--json"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout[-3000:], done.stderr[-3000:], flush=True)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((shape, batch, result, per_step))
            print(json.dumps(result), flush=True)
    bound_note = "bound = bandwidth / weight bytes per step (per sequence-step at batch 1)"
    print(f"\n{'model':<14} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'bound tok/s':>12} {'of bound':>9}")
    for shape, batch, result, per_step in rows:
        decode = result["decode_tok_s"]["median"]
        bound = bandwidth / per_step  # steps/s the weights alone allow; each step yields `batch` tokens
        print(f"{shape:<14} {batch:>5} {result['prefill_tok_s']['median']:>14.0f} {decode:>13.1f} "
              f"{bound * batch:>12.1f} {decode / (bound * batch):>8.0%}")
    print(bound_note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("root", type=Path)
    p.add_argument("--device", default="cuda:sm_90", help="cuda:sm_XX, or cpu for a dry run here")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--integer-dot", action="store_true", help="batch-1 4-bit GEMVs on dp4a (cuda_qgemv_dp4a)")
    p.add_argument("--decode-attention", action="store_true", help="our decode attention kernel (cuda_attention)")
    r = sub.add_parser("run")
    r.add_argument("root", type=Path)
    r.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    r.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    r.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.root, args.device, args.shapes, args.integer_dot, args.decode_attention)
    else:
        run(args.root, args.batches, args.device, args.shapes)


if __name__ == "__main__":
    main()
