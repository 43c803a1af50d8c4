"""Runtime pieces that need no model: tokenizer wrapper, incremental detokenization, stop strings,
chat templates (against transformers' own rendering), sampling and the OpenAI-shaped schemas."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mlcbuild.runtime import protocol
from mlcbuild.runtime.conversation import NAMED_TEMPLATES, TemplateError, load_chat_template
from mlcbuild.runtime.sampling import SamplingParams, TokenHistory, apply_penalties, make_rng, sample, token_logprobs
from mlcbuild.runtime.tokenizer import IncrementalDecoder, StopStringMatcher, Tokenizer

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML_HF = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE with few merges, so that CJK characters span several tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world, the capital of France is Paris."] * 20, trainer)
    directory = tmp_path_factory.mktemp("tok")
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": CHATML_HF}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return Tokenizer(tokenizer_dir)


def test_tokenizer_special_tokens_and_bytes(tokenizer):
    assert tokenizer.eos_token == "</s>" and tokenizer.eos_token_id == 1
    assert tokenizer.special_tokens()["bos_token"] == "<s>"
    ids = tokenizer.encode("héllo 你")
    assert b"".join(bytes(tokenizer.token_bytes(i)) for i in ids).decode() == "héllo 你"


@pytest.mark.parametrize("text", ["hello world", "héllo 你好, wörld!", "Paris. 🎉 done"])
def test_incremental_decoder_matches_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    dec = IncrementalDecoder(tokenizer)
    deltas = [dec.add(i) for i in ids]
    assert "".join(deltas) + dec.flush() == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_holdback_across_deltas():
    m = StopStringMatcher(["END", "stop here"])
    out = [m.feed(d) for d in ["hello E", "N", "x st", "op h", "ere and more"]]
    assert out == ["hello ", "", "ENx ", "", ""]
    assert m.stopped and m.flush() == ""
    m = StopStringMatcher(["END"])
    assert m.feed("abcEN") == "abc" and m.flush() == "EN" and not m.stopped
    assert StopStringMatcher([]).feed("EN") == "EN"
    m = StopStringMatcher(["b", "abc"])
    assert m.feed("xxab") == "xxa" and m.stopped


def _hf_render(tokenizer_dir, messages, template=None):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    hf.bos_token, hf.eos_token = "<s>", "</s>"
    return hf.apply_chat_template(messages, chat_template=template or CHATML_HF, tokenize=False,
                                  add_generation_prompt=True)


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "Spain?"}]},
]
LLAMA3_HF = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_auto_template_renders_like_transformers(tokenizer_dir, tokenizer):
    template = load_chat_template("auto", tokenizer_dir, tokenizer)
    flat = [{**m, "content": m["content"] if isinstance(m["content"], str) else "And Spain?"} for m in MESSAGES]
    assert template.render(MESSAGES) == _hf_render(tokenizer_dir, flat)
    assert template.stop_strings == ["</s>"]


def test_named_templates(tokenizer_dir, tokenizer):
    flat = [{**m, "content": m["content"] if isinstance(m["content"], str) else "And Spain?"} for m in MESSAGES]
    llama3 = load_chat_template("llama-3", tokenizer_dir, tokenizer)
    assert llama3.render(flat).replace("<s>", "<|begin_of_text|>", 1) == _hf_render(
        tokenizer_dir, flat, LLAMA3_HF
    ).replace("<s>", "<|begin_of_text|>", 1)
    chatml = load_chat_template("chatml", tokenizer_dir, tokenizer).render(flat)
    assert chatml == _hf_render(tokenizer_dir, flat)
    llama2 = load_chat_template("llama-2", tokenizer_dir, tokenizer).render(flat)
    assert llama2 == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nCapital of France? [/INST] Paris. </s><s>[INST] And Spain? [/INST]"
    mistral = load_chat_template("mistral", tokenizer_dir, tokenizer).render(flat)
    assert mistral == "<s>[INST] Be brief.\n\nCapital of France? [/INST]Paris.</s>[INST] And Spain? [/INST]"
    phi2 = load_chat_template("phi-2", tokenizer_dir, tokenizer).render(flat)
    assert phi2 == "Be brief.\nInstruct: Capital of France?\nOutput: Paris.\nInstruct: And Spain?\nOutput:"
    assert set(NAMED_TEMPLATES) == {"llama-3", "llama-2", "phi-2", "chatml", "mistral"}
    with pytest.raises(ValueError, match="unknown conversation template"):
        load_chat_template("nope", tokenizer_dir, tokenizer)


def test_template_errors_are_template_errors(tokenizer_dir, tokenizer):
    template = load_chat_template("auto", tokenizer_dir, tokenizer)
    template.__init__("strict", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        template.render(MESSAGES)


def test_greedy_and_penalties():
    logits = np.array([1.0, 3.0, 2.0, 0.5], dtype=np.float32)
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, greedy, make_rng(0)) == 1
    history = TokenHistory.of_prompt([2])
    history.output.update(Counter({1: 2}))
    p = SamplingParams(frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=2.0, logit_bias={3: 10.0})
    out = apply_penalties(logits, p, history)
    np.testing.assert_allclose(out, [1.0, 3.0 / 2 - 2.5, 1.0, 10.5])
    assert logits[1] == 3.0  # input untouched
    assert apply_penalties(logits, SamplingParams(), history) is logits


def test_top_k_top_p_and_seed():
    rng_logits = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    top2 = set(np.argsort(-rng_logits)[:2].tolist())
    p = SamplingParams(temperature=1.5, top_k=2)
    assert {sample(rng_logits, p, make_rng(s)) for s in range(50)} <= top2
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    p = SamplingParams(temperature=1.0, top_p=0.7)
    assert {sample(logits, p, make_rng(s)) for s in range(200)} == {0, 1}
    p = SamplingParams(temperature=1.0)
    draws = [sample(logits, p, make_rng(None)) for _ in range(4000)]
    assert abs(draws.count(0) / 4000 - 0.5) < 0.05
    seq = lambda seed, i: [sample(rng_logits, p, r) for r in [make_rng(seed, i)] for _ in range(20)]  # noqa: E731
    assert seq(7, 0) == seq(7, 0) and seq(7, 0) != seq(7, 1) and seq(7, 0) != seq(8, 0)


def _nucleus_by_full_sort(probs: np.ndarray, top_p: float) -> list[int]:
    """The definition: a stable sort of the whole vocabulary, the smallest prefix reaching top_p."""
    order = np.argsort(-probs, kind="stable")
    ranked = probs[order]
    keep = (np.cumsum(ranked) - ranked) < top_p
    keep[0] = True
    return sorted(order[keep].tolist())


@pytest.mark.parametrize("case", ["peaked", "flat", "ties", "masked"])
def test_nucleus_equals_the_full_sort(case):
    """top-p looks at 64 candidates first and widens: the same set as sorting all 49152 tokens,
    including flat distributions (the nucleus reaches past the candidates) and ties at its edge."""
    from mlcbuild.runtime.sampling import NUCLEUS_CANDIDATES, _nucleus, _softmax

    rng = np.random.default_rng(3)
    widened = 0
    for trial in range(40):
        logits = rng.normal(size=49152).astype(np.float32)
        if case == "peaked":
            logits *= 6
        elif case == "ties":  # few distinct values: ties straddle every cut
            logits = np.round(logits * 2) / 2
        elif case == "masked":  # a grammar's mask: most tokens -inf
            logits[rng.random(49152) < 0.97] = -np.inf
        probs = _softmax(logits / np.float32(0.7)).astype(np.float64)
        top_p = float(rng.uniform(0.5, 0.99))
        ids, kept = _nucleus(probs, top_p)
        expected = _nucleus_by_full_sort(probs, top_p)
        assert ids.tolist() == expected, (case, trial)
        np.testing.assert_array_equal(kept, probs[ids])
        widened += len(expected) >= NUCLEUS_CANDIDATES
    if case in ("flat", "ties"):
        assert widened, "no trial exercised the widening"


def test_top_p_draws_follow_the_renormalized_nucleus():
    probs = np.array([0.3, 0.05, 0.25, 0.2, 0.1, 0.1], dtype=np.float64)
    logits = np.log(probs).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_p=0.7)  # nucleus {0, 2, 3}: 0.3 + 0.25 + 0.2
    rng = make_rng(11)
    draws = np.bincount([sample(logits, p, rng) for _ in range(6000)], minlength=6)
    assert draws[[1, 4, 5]].sum() == 0
    expected = probs[[0, 2, 3]] / probs[[0, 2, 3]].sum() * 6000
    chi2 = float((((draws[[0, 2, 3]] - expected) ** 2) / expected).sum())
    assert chi2 < 13.8, (draws, chi2)  # p = 0.001 for 2 degrees of freedom


def test_token_logprobs():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    lp, top = token_logprobs(logits, 1, 2)
    assert lp == pytest.approx(np.log(0.3), abs=1e-5)
    assert [t for t, _ in top] == [0, 1] and top[0][1] == pytest.approx(np.log(0.5), abs=1e-5)


def test_request_validation():
    ok = protocol.ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=5)
    assert ok.max_tokens == 5 and ok.stop_list == []
    with pytest.raises(ValueError, match="temperature"):
        protocol.ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=3)
    with pytest.raises(ValueError, match="messages"):
        protocol.ChatCompletionRequest(messages=[])
    with pytest.raises(ValueError, match="logit bias"):
        protocol.CompletionRequest(prompt="x", logit_bias={"5": 200})
    assert protocol.CompletionRequest(prompt=[1, 2]).prompt == [1, 2]
    assert protocol.CompletionRequest(prompt="x", stop="a").stop_list == ["a"]


def test_responses_parse_as_openai_types():
    openai_types = pytest.importorskip("openai.types")
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    usage = protocol.CompletionUsage(prompt_tokens=3, completion_tokens=2, total_tokens=5, extra={"ttft_s": 0.1})
    lp = protocol.ChoiceLogprobs(content=[protocol.ChatCompletionTokenLogprob(
        token="a", bytes=[97], logprob=-0.1, top_logprobs=[protocol.TopLogprob(token="a", bytes=[97], logprob=-0.1)])])
    ours = protocol.ChatCompletion(id="x", model="m", usage=usage, choices=[protocol.ChatCompletionChoice(
        index=0, message=protocol.ChatCompletionMessage(content="hi"), finish_reason="stop", logprobs=lp)])
    theirs = ChatCompletion.model_validate(ours.model_dump())
    assert theirs.choices[0].message.content == "hi" and theirs.usage.total_tokens == 5
    assert theirs.choices[0].logprobs.content[0].top_logprobs[0].logprob == -0.1
    chunk = protocol.ChatCompletionChunk(id="x", model="m", choices=[protocol.ChatCompletionChunkChoice(
        index=0, delta=protocol.ChoiceDelta(role="assistant", content="h"))])
    assert ChatCompletionChunk.model_validate(chunk.model_dump()).choices[0].delta.content == "h"
    comp = protocol.Completion(id="c", model="m", choices=[protocol.CompletionChoice(
        index=0, text="t", finish_reason="length", logprobs=protocol.CompletionLogprobs(
            tokens=["t"], token_logprobs=[-1.0], top_logprobs=[{"t": -1.0}], text_offset=[0]))])
    assert openai_types.Completion.model_validate(comp.model_dump()).choices[0].text == "t"
