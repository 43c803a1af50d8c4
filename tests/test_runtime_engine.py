"""The engine through the Python API (MLCEngine / AsyncMLCEngine) on a tiny bundle built by the pipeline."""

from __future__ import annotations

import asyncio
import queue
import shutil
import threading

import pytest
from runtime_support import tiny  # noqa: F401  (the shared session fixture)

from mlcbuild import AsyncMLCEngine, MLCEngine
from mlcbuild.runtime.bundle import BundleError, find_bundle
from mlcbuild.runtime.engine import ContextWindowError, GenerationConfig
from mlcbuild.runtime.sampling import SamplingParams

PROMPT_IDS = [(7 * i + 3) % 300 + 3 for i in range(40)]  # 40 tokens: two prefill chunks of 32
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(tiny):
    with MLCEngine(tiny.recipe) as eng:
        yield eng


def generated_ids(engine: MLCEngine, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy token ids straight from the engine core (the API returns text)."""
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    config = GenerationConfig(SamplingParams(temperature=0), max_tokens=max_tokens, ignore_eos=True)
    engine.frontend.engine.submit(prompt, config, outputs.put)
    ids: list[int] = []
    while True:
        out = outputs.get(timeout=60)
        ids += [t for d in out.deltas for t in d.token_ids]
        if out.finished:
            return ids


def test_greedy_matches_transformers_with_chunked_prefill(tiny, engine):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny.checkpoint, dtype=torch.float32).eval()
    want = hf.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=12, do_sample=False)[0, len(PROMPT_IDS):].tolist()
    tokenizer = engine.frontend.tokenizer
    for eng in (engine, MLCEngine(tiny.path, prefill_chunk_size=7)):  # 2 chunks, then 6 chunks
        assert generated_ids(eng, PROMPT_IDS, 12) == want
        out = eng.completions.create(prompt=PROMPT_IDS, max_tokens=12, temperature=0, ignore_eos=True)
        assert out.choices[0].text == tokenizer.decode(want)
        assert out.usage.prompt_tokens == len(PROMPT_IDS) and out.usage.completion_tokens == 12
        assert out.choices[0].finish_reason == "length"
        if eng is not engine:
            eng.terminate()


def test_chat_stream_equals_whole_answer_and_usage(engine):
    whole = engine.chat.completions.create(messages=MESSAGES, max_tokens=20, seed=11)
    chunks = list(engine.chat.completions.create(messages=MESSAGES, max_tokens=20, seed=11, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])
    extra = whole.usage.extra
    assert extra["ttft_s"] > 0 and extra["prefill_tokens_per_s"] > 0 and extra["decode_tokens_per_s"] > 0
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")


def test_seed_gives_same_text_and_n_choices(engine):
    kwargs = dict(messages=MESSAGES, max_tokens=24, temperature=1.0, seed=1234, n=3, ignore_eos=True)
    a = engine.chat.completions.create(**kwargs)
    b = engine.chat.completions.create(**kwargs)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert a.usage.completion_tokens == 3 * 24 and a.usage.prompt_tokens == b.usage.prompt_tokens
    other = engine.chat.completions.create(**{**kwargs, "seed": 99, "n": 1})
    assert other.choices[0].message.content != texts[0]
    assert engine.stats()["kv_pages_in_use"] == 0


def test_stop_strings_stop_token_ids_and_max_tokens(engine):
    base = engine.completions.create(prompt=PROMPT_IDS, max_tokens=30, temperature=0, ignore_eos=True)
    text = base.choices[0].text
    stop = text[10:13]
    cut = engine.completions.create(prompt=PROMPT_IDS, max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in engine.completions.create(
        prompt=PROMPT_IDS, max_tokens=30, temperature=0, ignore_eos=True, stop=stop, stream=True) if c.choices)
    assert streamed == cut.choices[0].text  # held-back text never leaks a stop string's start
    ids = generated_ids(engine, PROMPT_IDS, 30)
    by_id = engine.completions.create(prompt=PROMPT_IDS, max_tokens=30, temperature=0, ignore_eos=True,
                                      stop_token_ids=[ids[5]])
    assert by_id.choices[0].finish_reason == "stop"
    assert by_id.usage.completion_tokens == ids.index(ids[5]) + 1  # the stop token counts, its text does not
    short = engine.completions.create(prompt=PROMPT_IDS, max_tokens=3, temperature=0, ignore_eos=True)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_logprobs(engine):
    out = engine.chat.completions.create(messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=3, seed=2,
                                         ignore_eos=True)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.logprob <= item.top_logprobs[0].logprob + 1e-6
    comp = engine.completions.create(prompt="The capital", max_tokens=4, logprobs=2, temperature=0, echo=True,
                                     ignore_eos=True)
    lp = comp.choices[0].logprobs
    assert comp.choices[0].text.startswith("The capital")
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.token_logprobs[0] == pytest.approx(max(lp.top_logprobs[0].values()))  # greedy picks the best


def test_context_window_overflow_and_truncation(engine):
    long_prompt = PROMPT_IDS * 7  # 280 tokens > 256
    with pytest.raises(ContextWindowError, match="maximum context length is 256"):
        engine.completions.create(prompt=long_prompt, max_tokens=5)
    with pytest.raises(ContextWindowError, match="you requested"):
        engine.completions.create(prompt=PROMPT_IDS, max_tokens=250)
    out = engine.completions.create(prompt=long_prompt, max_tokens=5, truncate_prompt_tokens=100, ignore_eos=True)
    assert out.usage.prompt_tokens == 100
    out = engine.completions.create(prompt=long_prompt, max_tokens=6, truncate_prompt_tokens=-1, ignore_eos=True)
    assert out.usage.prompt_tokens == 250 and out.usage.completion_tokens == 6
    # no max_tokens: generation stops at the window
    out = engine.completions.create(prompt=PROMPT_IDS * 6, ignore_eos=True, temperature=0)
    assert out.usage.total_tokens == 256 and out.choices[0].finish_reason == "length"


def test_continuous_batching_and_pages_freed(engine):
    """8 concurrent requests: decode steps carry several sequences, results equal the sequential ones."""
    kwargs = dict(prompt=PROMPT_IDS, max_tokens=40, temperature=0, ignore_eos=True)
    alone = engine.completions.create(**kwargs).choices[0].text
    before = engine.stats()
    results: dict[int, str] = {}
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = engine.completions.create(**kwargs).choices[0].text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = engine.stats()
    assert set(results.values()) == {alone}
    batches = {k: v - before["decode_batch_sizes"].get(k, 0) for k, v in after["decode_batch_sizes"].items()}
    multi = sum(v for k, v in batches.items() if k > 1)
    assert multi > 0 and max(k for k, v in batches.items() if v) > 1, batches
    assert after["decode_sequences"] - before["decode_sequences"] == 8 * 39  # first tokens come from prefill
    assert after["decode_steps"] - before["decode_steps"] < 8 * 39
    assert after["kv_pages_in_use"] == 0 and after["running"] == 0 and after["queued"] == 0


def test_closing_a_stream_aborts_and_frees_pages(engine):
    stream = engine.completions.create(prompt=PROMPT_IDS, max_tokens=150, ignore_eos=True, stream=True)
    next(stream), next(stream)
    assert engine.stats()["kv_pages_in_use"] > 0
    aborted = engine.stats()["aborted"]
    stream.close()
    for _ in range(200):
        stats = engine.stats()
        if stats["aborted"] == aborted + 1:
            break
        threading.Event().wait(0.01)
    assert stats["aborted"] == aborted + 1 and stats["kv_pages_in_use"] == 0


def test_async_engine_many_concurrent(tiny):
    async def main() -> list[str]:
        async with AsyncMLCEngine(tiny.path) as eng:
            async def one(i: int) -> str:
                stream = await eng.chat.completions.create(messages=MESSAGES, max_tokens=16, seed=i, stream=True,
                                                           ignore_eos=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream])

            texts = await asyncio.gather(*(one(i) for i in range(12)))
            whole = await eng.chat.completions.create(messages=MESSAGES, max_tokens=16, seed=3, ignore_eos=True)
            assert whole.choices[0].message.content == texts[3]
            stats = eng.stats()
            assert stats["kv_pages_in_use"] == 0 and stats["finished"] == 13
            assert max(stats["decode_batch_sizes"]) > 1
            return texts

    texts = asyncio.run(main())
    assert len(set(texts)) > 1


def test_terminate_and_context_manager(tiny):
    eng = MLCEngine(tiny.path)
    eng.terminate()
    eng.terminate()  # idempotent
    with pytest.raises(RuntimeError, match="terminated"):
        eng.completions.create(prompt="hi", max_tokens=2)


def test_bundle_resolution_and_verification(tiny, tmp_path):
    assert find_bundle(tiny.recipe, "cpu")[0] == tiny.path
    assert find_bundle(tiny.path.parent, "auto")[0] == tiny.path  # a directory of bundles
    with pytest.raises(BundleError, match="libraries for: cpu"):
        find_bundle(tiny.path, "cuda:0")
    with pytest.raises(BundleError, match="unknown device"):
        find_bundle(tiny.path, "tpu")
    broken = tmp_path / "broken"
    shutil.copytree(tiny.path, broken)
    (broken / "tokenizer_config.json").chmod(0o644)
    with open(broken / "tokenizer_config.json", "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match=r"(?s)does not verify.*tokenizer_config.json: size"):
        MLCEngine(broken)
    (broken / "lib" / "model.so").unlink()
    with pytest.raises(BundleError, match="lib/model.so: missing"):
        MLCEngine(broken)
