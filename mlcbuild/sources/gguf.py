"""GGUF sources: dequantize a llama.cpp GGUF file into a Hugging Face-format checkpoint.

The output is what every later stage expects of any source: ``config.json``,
``generation_config.json``, ``tokenizer.json`` + ``tokenizer_config.json`` (with the chat
template the GGUF carries) and safetensors shards with Hugging Face tensor names. Quantized
tensors are dequantized with ``gguf.quants`` and stored as float16 (float32 and float16 tensors
keep their type), so the checkpoint holds exactly the values llama.cpp would compute with, and
``mlcbuild-source.json`` records that they came from a quantized file.

Architectures: ``llama`` (Llama 2/3, Mistral 7B, SmolLM2, TinyLlama: llama.cpp converts them all
to ``llama``), ``qwen2`` and ``phi2``. llama.cpp permutes the rows of q and k for ``llama`` (its
rope pairs adjacent elements, Hugging Face's pairs the two halves of a head); that permutation is
undone here, as the Hugging Face layout is what the model code expects.

Weights are written one tensor at a time (peak memory: the largest tensor, not the model).
The output bytes depend only on the file and on the gguf, numpy and tokenizers versions (the
download stage's toolchain): a change here that changes them must bump ``Download.version``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlcbuild.bundle_format import SOURCE_INFO_FILE
from mlcbuild.sources import SourceError

SHARD_BYTES = 2 << 30  # split the converted weights into safetensors files of about this size


# -- tensor names --------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """How one GGUF architecture maps onto a Hugging Face one."""

    hf_class: str
    model_type: str
    globals: dict[str, str]  # GGUF tensor name -> HF name
    layer: dict[str, str]  # suffix after "blk.N." -> suffix after "model.layers.N."
    permute_qk: bool = False  # undo llama.cpp's q/k row permutation


_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LLAMA_GLOBALS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PHI_LAYER = {
    f"{gguf}.{kind}": f"{hf}.{kind}"
    for gguf, hf in (
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_qkv", "self_attn.qkv"),  # older phi-2 GGUFs fuse q/k/v; split below
        ("attn_output", "self_attn.dense"),
        ("ffn_up", "mlp.fc1"),
        ("ffn_down", "mlp.fc2"),
    )
    for kind in ("weight", "bias")
}

ARCHS: dict[str, Arch] = {
    "llama": Arch("LlamaForCausalLM", "llama", _LLAMA_GLOBALS, _LLAMA_LAYER, permute_qk=True),
    "qwen2": Arch(
        "Qwen2ForCausalLM",
        "qwen2",
        _LLAMA_GLOBALS,
        {**_LLAMA_LAYER, **{f"attn_{x}.bias": f"self_attn.{x}_proj.bias" for x in "qkv"}},
    ),
    "phi2": Arch(
        "PhiForCausalLM",
        "phi",
        {
            "token_embd.weight": "model.embed_tokens.weight",
            "output_norm.weight": "model.final_layernorm.weight",
            "output_norm.bias": "model.final_layernorm.bias",
            "output.weight": "lm_head.weight",
            "output.bias": "lm_head.bias",
        },
        _PHI_LAYER,
    ),
}
SUPPORTED = "llama (also Mistral, SmolLM2, TinyLlama), qwen2, phi2"
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


class _Meta:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise SourceError(f"the GGUF file has no {key!r}; it is incomplete or not a language model")
        return value


# -- the conversion ------------------------------------------------------------------------
def convert(
    path: Path,
    out: Path,
    *,
    log: Callable[[str], None] = lambda msg: None,
    progress: Callable[[int, int | None], None] = lambda done, total: None,
    shard_bytes: int = SHARD_BYTES,
) -> dict[str, Any]:
    """Write the Hugging Face checkpoint of the GGUF file ``path`` into ``out``; return what
    ``mlcbuild-source.json`` records (also written)."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = _Meta(reader)
    arch_name = meta.require("general.architecture")
    arch = ARCHS.get(arch_name)
    if arch is None:
        raise SourceError(
            f"{path.name}: GGUF architecture {arch_name!r} is not supported (supported: {SUPPORTED}); "
            "use the model's Hugging Face checkpoint (HF://org/repo) as the source instead"
        )
    tensors = {t.name: t for t in reader.tensors}
    config = _config(arch_name, arch, meta, tensors)
    jobs = _weight_jobs(arch_name, arch, config, tensors)
    file_type = _file_type(meta, reader.tensors)
    log(f"dequantizing {len(reader.tensors)} tensors of {path.name} ({arch_name}, {file_type})")
    _write_safetensors(jobs, out, shard_bytes, progress)

    tokenizer_json, tokenizer_config, generation = _tokenizer(meta, config)
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "config.json", {**config, **{k: v for k, v in generation.items() if k.endswith("_id")}})
    _write_json(out / "generation_config.json", generation)
    info = {
        "format": "gguf",
        "file": path.name,
        "file_type": file_type,
        "architecture": arch_name,
        "model_name": meta.get("general.name"),
        "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())),
        "dequantized_to": "float16",
    }
    _write_json(out / SOURCE_INFO_FILE, info)
    return info


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _file_type(meta: _Meta, tensors: list[Any]) -> str:
    """ "Q4_1" for a mostly-Q4_1 file: what the user would call the file's quantization."""
    import gguf

    value = meta.get("general.file_type")
    if value is not None:
        try:
            name = gguf.LlamaFileType(value).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    weights = Counter(t.tensor_type.name for t in tensors if len(t.shape) > 1)
    return weights.most_common(1)[0][0] if weights else "unknown"


def _config(arch_name: str, arch: Arch, meta: _Meta, tensors: dict[str, Any]) -> dict[str, Any]:
    """config.json of the Hugging Face model that this GGUF file was converted from."""
    p = arch_name + "."
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise SourceError("the GGUF file has no token_embd.weight; it is not a supported language model")
    hidden = int(meta.require(p + "embedding_length"))
    heads = int(meta.require(p + "attention.head_count"))
    kv_heads = int(meta.get(p + "attention.head_count_kv", heads))
    head_dim = int(meta.get(p + "attention.key_length", hidden // heads))
    config: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "vocab_size": int(embed.shape[1]),  # GGUF shapes are reversed: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(p + "feed_forward_length")),
        "num_hidden_layers": int(meta.require(p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "rope_theta": _f32(meta.get(p + "rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float16",
    }
    if arch_name == "phi2":
        rotary = int(meta.get(p + "rope.dimension_count", head_dim))
        config.update(
            hidden_act="gelu_new",
            layer_norm_eps=_f32(meta.get(p + "attention.layer_norm_epsilon", 1e-5)),
            partial_rotary_factor=rotary / head_dim,
            qk_layernorm=False,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        )
        return config
    config.update(
        hidden_act="silu",
        rms_norm_eps=_f32(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
    )
    if head_dim != hidden // heads:
        config["head_dim"] = head_dim
    if arch_name == "llama":
        config.update(attention_bias=False, mlp_bias=False, rope_scaling=_rope_scaling(meta, p, head_dim, tensors))
    else:  # qwen2
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=config["num_hidden_layers"])
    return config


def _f32(value: float) -> float:
    """A float32 from the file as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(f"{float(value):.7g}")


def _rope_scaling(meta: _Meta, p: str, head_dim: int, tensors: dict[str, Any]) -> dict[str, Any] | None:
    kind = meta.get(p + "rope.scaling.type")
    factor = meta.get(p + "rope.scaling.factor")
    if kind in ("linear", "yarn") and factor:
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        original = meta.get(p + "rope.scaling.original_context_length")
        if kind == "yarn" and original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if "rope_freqs.weight" in tensors:
        return _llama3_scaling(tensors["rope_freqs.weight"], head_dim, float(meta.get(p + "rope.freq_base", 1e4)))
    return None


def _llama3_scaling(rope_freqs: Any, head_dim: int, base: float) -> dict[str, Any]:
    """Llama 3.1+ GGUFs carry llama3 rope scaling as per-frequency factors (``rope_freqs``), not
    its parameters. Every Llama 3.x release uses low/high frequency factors 1 and 4 and an
    original context of 8192 with factor 8 (3.1) or 32 (3.2): find which one reproduces the
    file's factors."""
    import gguf

    actual = gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type).reshape(-1)
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    for factor in (8.0, 32.0, 16.0, 4.0):
        low, high, original = 1.0, 4.0, 8192
        smooth = (original / wavelen - low) / (high - low)
        expected = np.where(
            wavelen < original / high,
            1.0,
            np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
        )
        if expected.shape == actual.shape and np.allclose(expected, actual, rtol=1e-3):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
    raise SourceError("the GGUF file's rope_freqs match no known llama3 rope scaling; use the Hugging Face checkpoint")


# -- weights -------------------------------------------------------------------------------
@dataclass
class _Job:
    """One output tensor: its name, shape, safetensors dtype, and how to compute it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "F32" | "F16" | "BF16"
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.dtype == "F32" else 2)


def _weight_jobs(arch_name: str, arch: Arch, config: dict[str, Any], tensors: dict[str, Any]) -> list[_Job]:
    jobs: list[_Job] = []
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight":
            continue  # represented by config.json's rope_scaling
        if name in arch.globals:
            hf_name = arch.globals[name]
        elif (m := _BLOCK.match(name)) and m.group(2) in arch.layer:
            hf_name = f"model.layers.{m.group(1)}.{arch.layer[m.group(2)]}"
        else:
            raise SourceError(
                f"the GGUF file has a tensor {name!r} that a {arch_name} model does not have; "
                "this variant is not supported, use the Hugging Face checkpoint"
            )
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        dtype = {"F32": "F32", "BF16": "BF16"}.get(tensor.tensor_type.name, "F16")
        permute = None
        if arch.permute_qk and hf_name.endswith("q_proj.weight"):
            permute = config["num_attention_heads"]
        elif arch.permute_qk and hf_name.endswith("k_proj.weight"):
            permute = config["num_key_value_heads"]
        if hf_name.endswith(".qkv.weight") or hf_name.endswith(".qkv.bias"):
            jobs.extend(_split_qkv(hf_name, tensor, shape, dtype, config))
            continue
        jobs.append(_Job(hf_name, shape, dtype, _producer(tensor, shape, dtype, permute)))
    return sorted(jobs, key=lambda job: _natural(job.name))


def _natural(name: str) -> list[Any]:
    """Sort key that puts layer 10 after layer 9 (the order of the safetensors shards)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _dequantize(tensor: Any, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    import gguf

    kind = tensor.tensor_type.name
    if kind == "BF16":
        # Keep bfloat16 bit-exact: numpy has no bfloat16, so carry the raw 16-bit words.
        return np.ascontiguousarray(tensor.data).view(np.uint16).reshape(shape)
    if kind in ("F32", "F16"):
        values = np.asarray(tensor.data)
    else:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return values.reshape(shape).astype(np.float32 if dtype == "F32" else np.float16, copy=False)


def _producer(tensor: Any, shape: tuple[int, ...], dtype: str, permute_heads: int | None) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        values = _dequantize(tensor, shape, dtype)
        return _unpermute(values, permute_heads) if permute_heads else values

    return produce


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` in convert_hf_to_gguf.py, which reorders each head's
    rows from (half, dim/2) to (dim/2, half) so rope can rotate adjacent pairs."""
    half = weight.shape[0] // heads // 2
    return np.ascontiguousarray(weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


def _split_qkv(hf_name: str, tensor: Any, shape: tuple[int, ...], dtype: str, config: dict[str, Any]) -> list[_Job]:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    if shape[0] != q + 2 * kv:
        raise SourceError(f"fused qkv tensor of shape {shape} does not match the heads in the GGUF metadata")
    prefix, kind = hf_name.rsplit(".qkv.", 1)
    jobs = []
    for proj, start, rows in (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)):
        part_shape = (rows, *shape[1:])

        def produce(start: int = start, rows: int = rows) -> np.ndarray:
            return np.ascontiguousarray(_dequantize(tensor, shape, dtype)[start : start + rows])

        jobs.append(_Job(f"{prefix}.{proj}.{kind}", part_shape, dtype, produce))
    return jobs


def _write_safetensors(
    jobs: list[_Job], out: Path, shard_bytes: int, progress: Callable[[int, int | None], None]
) -> None:
    """Stream ``jobs`` into safetensors files: the header is known from shapes and dtypes alone,
    so each tensor is computed, written and dropped in turn."""
    shards: list[list[_Job]] = [[]]
    size = 0
    for job in jobs:
        if shards[-1] and size + job.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    total = sum(job.nbytes for job in jobs)
    done = 0
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file_name, shard in zip(names, shards, strict=True):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for job in shard:
            header[job.name] = {
                "dtype": job.dtype,
                "shape": list(job.shape),
                "data_offsets": [offset, offset + job.nbytes],
            }
            offset += job.nbytes
            weight_map[job.name] = file_name
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data must start 8-byte aligned
        with open(out / file_name, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            for job in shard:
                values = job.produce()
                if values.shape != job.shape or values.nbytes != job.nbytes:
                    raise AssertionError(
                        f"{job.name}: produced {values.shape}/{values.dtype}, planned {job.shape}/{job.dtype}"
                    )
                handle.write(np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False).tobytes())
                done += job.nbytes
                progress(done, total)
    if len(shards) > 1:
        _write_json(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )


# -- tokenizer -----------------------------------------------------------------------------
# Control (3) and user-defined (4) tokens become added tokens; normal (1), unknown (2),
# unused (5) and byte (6) tokens are the model's vocabulary.
_CONTROL, _USER_DEFINED = 3, 4
# The pre-tokenizer regexes of the Hugging Face tokenizers that llama.cpp's `tokenizer.ggml.pre`
# names stand for (llama.cpp's own copies are rewritten for its regex engine).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")


def _tokenizer(meta: _Meta, config: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """tokenizer.json (serialized), tokenizer_config.json and generation_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = meta.require("tokenizer.ggml.model")
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    ids = {
        name: meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "unknown", "padding", "eot", "eom")
    }
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        pre = meta.get("tokenizer.ggml.pre", "default")
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre == "llama-bpe"))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _DIGITS_THEN_GPT2:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        elif pre in ("llama-bpe", "llama3", "qwen2"):
            from tokenizers import Regex

            split = _LLAMA3_SPLIT if pre != "qwen2" else _QWEN2_SPLIT
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
            if pre == "qwen2":
                tokenizer.normalizer = normalizers.NFC()
        else:  # gpt-2, phi-2 and the like: GPT-2's own regex
            tokenizer.pre_tokenizer = byte_level
        tokenizer.decoder = decoders.ByteLevel()
        post_default: Any = processors.ByteLevel(trim_offsets=False)
    elif kind == "llama":  # SentencePiece BPE (Llama 2, Mistral, TinyLlama)
        scores: list[float] = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = tokens[ids["unknown"]] if ids["unknown"] is not None else None
        tokenizer = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=_sentencepiece_merges(tokens, scores, types),
                unk_token=unk,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        steps = [normalizers.Prepend("▁")] if prefix else []
        tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if prefix else [])
        )
        post_default = None
    else:
        raise SourceError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")

    tokenizer.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED]
    )
    bos = tokens[ids["bos"]] if ids["bos"] is not None else None
    eos = tokens[ids["eos"]] if ids["eos"] is not None else None
    special = [(t, vocab[t]) for t in (bos, eos) if t is not None]
    if add_bos or add_eos:
        single = " ".join(
            ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
        )
        pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    elif post_default is not None:
        tokenizer.post_processor = post_default

    def name(key: str) -> str | None:
        return tokens[ids[key]] if ids[key] is not None and ids[key] < len(tokens) else None

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": name("bos"),
        "eos_token": name("eos"),
        "unk_token": name("unknown"),
        "pad_token": name("padding"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "added_tokens_decoder": {
            str(i): {
                "content": tokens[i],
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": t == _CONTROL,
            }
            for i, t in enumerate(types)
            if t in (_CONTROL, _USER_DEFINED)
        },
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    tokenizer_config = {k: v for k, v in tokenizer_config.items() if v is not None}

    eos_ids = [i for i in dict.fromkeys((ids["eos"], ids["eot"], ids["eom"])) if i is not None]
    generation: dict[str, Any] = {
        "bos_token_id": ids["bos"],
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
    }
    if ids["padding"] is not None:
        generation["pad_token_id"] = ids["padding"]
    for gguf_key, hf_key in (("temp", "temperature"), ("top_k", "top_k"), ("top_p", "top_p")):
        value = meta.get(f"general.sampling.{gguf_key}")
        if value is not None:
            generation[hf_key] = value
            generation["do_sample"] = True
    generation = {k: v for k, v in generation.items() if v is not None and v != []}
    return tokenizer.to_str(), tokenizer_config, generation


def _sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges for a SentencePiece vocabulary, which stores piece scores instead: every split
    of a piece into two pieces is a merge, ranked by the merged piece's score (the order in
    which SentencePiece's BPE applies them), as tokenizers' SentencePieceExtractor does."""
    vocab = {token: i for i, token in enumerate(tokens)}
    found: list[tuple[float, int, int, str, str]] = []
    for piece, piece_id in vocab.items():
        if types[piece_id] != 1 or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((-scores[piece_id], vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]
