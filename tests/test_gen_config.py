"""gen_config: config normalization, overrides, tokenizer files and generation defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlcbuild.bundle_format import CHAT_CONFIG_FILE, ChatConfig
from mlcbuild.pipeline.stage import StageError
from mlcbuild.stages.gen_config import GenConfigParams, make_chat_config

LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 1,
    "eos_token_id": 2, "tie_word_embeddings": False,
}


def _checkpoint(tmp_path: Path, config: dict, **files: str) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (tmp_path / name.replace("__", ".")).write_text(text)
    return tmp_path


def test_minimal_checkpoint_without_tokenizer(tmp_path):
    chat = make_chat_config(_checkpoint(tmp_path, LLAMA), GenConfigParams(quantization="q4f16_1"))
    assert chat.model_type == "llama" and chat.model_dtype == "float16"
    assert chat.context_window_size == 4096 and chat.prefill_chunk_size == 2048
    assert chat.arch_config["rope_theta"] == 500000.0 and chat.arch_config["head_dim"] == 16
    assert chat.eos_token_id == [2] and chat.bos_token_id == 1 and chat.tokenizer_files == []
    assert chat.chat_template is None and chat.sliding_window_size == -1


def test_overrides_tokenizer_files_and_generation_defaults(tmp_path):
    tokenizer_config = {"chat_template": "{{ messages[0]['content'] }}", "eos_token": "</s>"}
    generation = {"eos_token_id": [2, 7], "temperature": 0.6, "top_p": 0.9, "do_sample": True}
    source = _checkpoint(
        tmp_path, LLAMA, tokenizer__json="{}", tokenizer_config__json=json.dumps(tokenizer_config),
        generation_config__json=json.dumps(generation),
    )
    params = GenConfigParams(quantization="q0f32", context_window_size=1024, prefill_chunk_size=4096, max_batch_size=3, conv_template="llama-3")
    chat = make_chat_config(source, params)
    assert chat.context_window_size == 1024 and chat.prefill_chunk_size == 1024  # chunk <= window
    assert chat.max_batch_size == 3 and chat.conv_template == "llama-3"
    assert chat.chat_template == tokenizer_config["chat_template"]
    assert chat.eos_token_id == [2, 7] and chat.temperature == 0.6 and chat.top_p == 0.9
    assert chat.tokenizer_files == ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    # Round trip through the JSON the runtime reads (model_config is the JSON key).
    text = chat.model_dump_json(by_alias=True)
    assert "model_config" in json.loads(text) and ChatConfig.model_validate_json(text) == chat


def test_stage_copies_tokenizer_files(tmp_path):
    from compiler_harness import run_stage

    from mlcbuild.stages.gen_config import GenConfig

    (tmp_path / "src").mkdir()
    source = _checkpoint(tmp_path / "src", LLAMA, chat_template__jinja="T", tokenizer__model="x")
    out = run_stage(GenConfig(), GenConfigParams(quantization="q0f16"), {"source": source}, tmp_path / "out")
    chat = ChatConfig.model_validate_json((out / CHAT_CONFIG_FILE).read_text())
    assert chat.chat_template == "T"
    assert sorted(p.name for p in out.iterdir()) == sorted([CHAT_CONFIG_FILE, "chat_template.jinja", "tokenizer.model"])


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"some_new_feature": 3}, "some_new_feature"),
        ({"quantization_config": {"bits": 4}}, "quantization_config"),
    ],
)
def test_unsupported_configs_fail_with_the_field_named(tmp_path, change, message):
    with pytest.raises(StageError, match=message):
        make_chat_config(_checkpoint(tmp_path, {**LLAMA, **change}), GenConfigParams(quantization="q0f32"))


def test_llama3_rope_scaling_is_kept(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    chat = make_chat_config(_checkpoint(tmp_path, {**LLAMA, "rope_scaling": scaling}), GenConfigParams(quantization="q0f32"))
    assert chat.arch_config["rope_scaling"] == scaling


def test_mistral_window_caps_prefill_chunk(tmp_path):
    config = {**LLAMA, "model_type": "mistral", "sliding_window": 512}
    chat = make_chat_config(_checkpoint(tmp_path, config), GenConfigParams(quantization="q0f16"))
    assert chat.sliding_window_size == 512 and chat.prefill_chunk_size == 512
