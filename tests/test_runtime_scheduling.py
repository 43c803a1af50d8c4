"""The engine's prefix cache, scheduling under KV-page pressure (pre-emption by recompute), per-request
fault isolation and KV-cache sizing, on the tiny bundle (context 256, page 16, batch 8). Every check compares
greedy token ids with a run that has no cache and no pressure: a wrong fork position, a page freed while a
running sequence reads it, or a resumed sequence that recomputed the wrong tokens changes them."""

from __future__ import annotations

import queue

import numpy as np
import pytest
from runtime_support import tiny, tiny_draft  # noqa: F401  (shared session fixtures)

from mlcbuild.runtime.bundle import Bundle
from mlcbuild.runtime.engine import Engine, GenerationConfig, kv_bytes_per_token, kv_tokens_in_memory
from mlcbuild.runtime.prefix_cache import PrefixCache
from mlcbuild.runtime.sampling import SamplingParams


def ids(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 300, size=length).tolist()


SYSTEM = ids(50, 0)  # a shared "system prompt": three pages and a bit


def run(engine: Engine, prompts: list[list[int]], max_tokens: int | None = 8,
        configs: list[GenerationConfig] | None = None) -> list[list[int] | BaseException]:
    """Submit all at once (one batch); each request's greedy tokens, or the error it failed with."""
    configs = configs or [GenerationConfig(SamplingParams(temperature=0), max_tokens=max_tokens, ignore_eos=True)
                          for _ in prompts]
    outs = [queue.SimpleQueue() for _ in prompts]
    for prompt, config, out in zip(prompts, configs, outs):
        engine.submit(prompt, config, out.put)
    results: list[list[int] | BaseException] = []
    for out in outs:
        got: list[int] = []
        while True:
            o = out.get(timeout=120)
            got += [t for d in o.deltas for t in d.token_ids]
            if o.finished:
                results.append(o.error if o.error is not None else got)
                break
    return results


@pytest.fixture(scope="module")
def bundle(tiny):
    return Bundle.open(tiny.path, "cpu")


@pytest.fixture(scope="module")
def plain(bundle):
    """The reference: no prefix cache, KV room for a full context per slot."""
    engine = Engine(bundle, prefix_cache=False)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def cached(bundle):
    engine = Engine(bundle)
    yield engine
    engine.shutdown()


def test_radix_tree_matches_longest_prefix_and_drops_covered_entries():
    cache = PrefixCache()
    assert cache.insert(1, [5, 6, 7, 8]) == []
    assert cache.insert(2, [5, 6, 9]) == []
    assert cache.match([5, 6, 7, 8, 1]) == (1, 4)
    assert cache.match([5, 6, 9, 9]) == (2, 3)
    assert cache.match([5, 6, 0])[1] == 2 and cache.match([4]) == (None, 0)
    assert cache.insert(3, [5, 6, 7, 8, 10, 11]) == [1]  # 1 is a prefix of 3: 3 answers whatever 1 did
    assert cache.match([5, 6, 7, 8]) == (3, 4) and 1 not in cache
    assert cache.oldest() == 2
    cache.touch(2)
    assert cache.oldest() == 3 and cache.oldest(exclude=3) == 2
    cache.remove(3)
    assert cache.match([5, 6, 7]) == (2, 2) and len(cache) == 1


def test_hits_and_misses_in_one_batch_equal_the_uncached_run(plain, cached):
    first = [SYSTEM + ids(10, 1)]
    batch = [SYSTEM + ids(12, 2),  # hit: the system prompt
             ids(30, 3),  # miss
             first[0] + ids(5, 4),  # hit past the system prompt
             list(first[0]),  # the same prompt again: all but its last token
             SYSTEM[:20] + ids(40, 5)]  # a hit of one page and a bit (the fork splits a page)
    want = run(plain, first) + run(plain, batch)
    before = cached.stats()
    assert run(cached, first) + run(cached, batch) == want
    stats = cached.stats()
    hits = stats["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    assert hits >= 50 + 59 + 59 + 20, stats  # forks at most one token short of what was cached
    assert 0 < stats["prefix_cache_hit_rate"] < 1 and stats["prefix_cache"] is True
    assert stats["kv_pages_in_use"] == 0 and stats["kv_pages_cached"] > 0


def test_multi_turn_chat_forks_each_turn_off_the_last(plain, cached):
    """Six turns: each prompt is the last prompt, its answer and a new message, so each turn forks the
    previous turn's sequence (a chain of forks six deep)."""
    def converse(engine: Engine) -> list[list[int]]:
        prompt, answers = SYSTEM + ids(7, 10), []
        for turn in range(6):
            answer = run(engine, [prompt])[0]
            answers.append(answer)
            prompt = prompt + answer + ids(9, 11 + turn)
        return answers

    before = cached.stats()["prefix_cache_hit_tokens"]
    assert converse(cached) == converse(plain)
    assert cached.stats()["prefix_cache_hit_tokens"] - before >= 5 * 57


def test_eviction_under_page_pressure_keeps_outputs(bundle, plain):
    """A cache of 320 tokens (20 pages): cached sequences are evicted for new ones, including the one a
    running request forked from (its shared pages stay: TVM counts references)."""
    engine = Engine(bundle, kv_cache_tokens=320)
    try:
        prompts = [SYSTEM + ids(20, 20 + i) for i in range(3)] + [ids(60, 30 + i) for i in range(3)]
        want = [run(plain, [p], max_tokens=20)[0] for p in prompts]
        got = [run(engine, [p], max_tokens=20)[0] for p in prompts]
        got += run(engine, prompts, max_tokens=20)  # all at once: evictions and pre-emptions while running
        assert got == want + want
        stats = engine.stats()
        assert stats["prefix_cache_evictions"] > 0 and stats["prefix_cache_hit_tokens"] > 0, stats
        assert stats["kv_pages_in_use"] == 0
    finally:
        engine.shutdown()


def test_a_cached_prefix_too_big_to_keep_beside_the_prompt_is_evicted_not_waited_for(bundle, plain):
    """A cache of one context (17 pages): a 150-token sequence stays cached, then a 200-token prompt shares
    only its 50-token system prompt. Forking that prefix would keep the cached sequence's 10 pages beside the
    prompt's 10 more: it never fits, and nothing running would free pages (a chat's second turn, with the
    history re-tokenized, waited for ever). The cached sequence is evicted and the prompt prefilled whole."""
    engine = Engine(bundle, kv_cache_tokens=256, max_batch_size=1)
    try:
        first, second = SYSTEM + ids(80, 70), SYSTEM + ids(150, 71)
        assert run(engine, [first], max_tokens=20) == run(plain, [first], max_tokens=20)
        assert run(engine, [second], max_tokens=8) == run(plain, [second], max_tokens=8)
        stats = engine.stats()
        assert stats["prefix_cache_evictions"] >= 1 and stats["kv_pages_in_use"] == 0, stats
    finally:
        engine.shutdown()


def test_preemption_when_pages_run_out_gives_the_unpressured_outputs(bundle, plain):
    """16 concurrent requests with max_tokens unset (up to the 256-token context) on a cache of four contexts
    (batches of 8): admitted on what their prompts need, the newest are pre-empted as the batch grows and
    recompute later; every one finishes with the tokens of the unpressured run."""
    prompts = [ids(24 + 3 * i, 40 + i) for i in range(16)]
    want = run(plain, prompts, max_tokens=None)
    engine = Engine(bundle, kv_cache_tokens=4 * 256, prefix_cache=False)
    try:
        assert run(engine, prompts, max_tokens=None) == want
        stats = engine.stats()
        assert stats["preemptions"] > 0 and stats["kv_pages_in_use"] == 0 and stats["finished"] == 16, stats
        assert max(stats["decode_batch_sizes"]) > 2  # admission did not wait for worst cases
    finally:
        engine.shutdown()


def test_a_failing_request_fails_alone(cached, plain):
    prompts = [ids(20, 50 + i) for i in range(4)]
    want = run(plain, prompts, max_tokens=12)
    greedy = SamplingParams(temperature=0)
    configs = [GenerationConfig(greedy, max_tokens=12, ignore_eos=True,
                                debug_fail_at_token=3 if i == 1 else (0 if i == 2 else None)) for i in range(4)]
    failed_before = cached.stats()["failed"]
    got = run(cached, prompts, configs=configs)
    assert isinstance(got[1], RuntimeError) and "debug_fail_at_token=3" in str(got[1])
    assert isinstance(got[2], RuntimeError)  # fails on its first token (sampled after prefill)
    assert [got[0], got[3]] == [want[0], want[3]]
    stats = cached.stats()
    assert stats["failed"] == failed_before + 2 and stats["kv_pages_in_use"] == 0 and stats["running"] == 0
    assert run(cached, prompts[1:2], max_tokens=12) == want[1:2]  # the engine goes on


def test_kv_cache_size_from_free_memory_or_explicit(bundle, plain):
    arch = bundle.chat_config.arch_config
    assert kv_bytes_per_token(bundle) == 2 * arch["num_hidden_layers"] * arch["num_key_value_heads"] * \
        (arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]) * 4  # q0f32: float32
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert abs(kv_tokens_in_memory(bundle, 0.5) - avail * 0.5 / kv_bytes_per_token(bundle)) < 0.01 * avail / \
        kv_bytes_per_token(bundle)  # MemAvailable moves a little between the two reads
    assert plain.kv_cache_tokens == 256 * 8  # plenty of RAM: a context per slot
    small = Engine(bundle, gpu_memory_utilization=1e-9)  # room for nothing: one context, what a request needs
    try:
        assert small.kv_cache_tokens == 256
        assert small.stats()["kv_pages_total"] < plain.stats()["kv_pages_total"] / 4  # TVM adds a spare page
    finally:
        small.shutdown()


# --- speculative decoding (prompt lookup) ------------------------------------------------------------

def test_prompt_lookup_drafts_what_followed_the_latest_longest_ngram():
    from mlcbuild.runtime.engine import prompt_lookup

    assert prompt_lookup([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3], 2) == [5, 6]  # latest "2 3", not the first
    assert prompt_lookup([7, 1, 2, 3, 8, 1, 2, 3, 4, 0, 2, 3], 3) == [4, 0, 2]  # "2 3" then the rest
    assert prompt_lookup([5, 6, 7], 4) == [] and prompt_lookup([5, 6, 5, 6], 4) == [5, 6]
    # one recurring token is not a match unless asked for
    assert prompt_lookup([5, 6, 5], 4) == [] and prompt_lookup([5, 6, 5], 4, min_ngram=1) == [6, 5]


def test_rollback_at_every_number_of_accepted_tokens(bundle):
    """Verify a draft whose first m tokens are right (m = 0..k), pop the rest: the next step's logits equal a
    plain run's, so the KV cache kept exactly the accepted tokens."""
    from mlcbuild.runtime.engine import CompiledModel

    k, prompt = 4, ids(30, 60)
    model = CompiledModel(bundle, max_batch_size=2, kv_cache_tokens=512, prefill_chunk_size=32, page_size=16)
    model.add_sequence(0)  # the plain reference, token by token
    last = int(model.forward_prefill([0], [prompt])[0].argmax())
    greedy, ref_logits = [last], []
    for _ in range(k + 2):
        ref_logits.append(model.forward_decode([0], [greedy[-1]])[0])
        greedy.append(int(ref_logits[-1].argmax()))
    for m in range(k + 1):
        seq = 10 + m
        model.add_sequence(seq)
        model.forward_prefill([seq], [prompt])
        draft = greedy[1:1 + m] + [(t + 1) % 300 + 3 for t in greedy[1 + m:1 + k]]  # wrong after m
        logits = model.forward_verify([seq], [[greedy[0]] + draft])
        assert [int(x) for x in logits.argmax(axis=1)[:m + 1]] == greedy[1:m + 2]
        model.popn(seq, k - m)  # keep the last token and the m accepted drafts
        after = model.forward_decode([seq], [greedy[m + 1]])[0]
        np.testing.assert_allclose(after, ref_logits[m + 1], rtol=1e-4, atol=1e-4)
        model.remove_sequence(seq)
    model.remove_sequence(0)
    assert model.available_pages() == model.total_pages


@pytest.fixture(scope="module")
def speculative(bundle):
    engine = Engine(bundle, speculative_mode="prompt-lookup", speculative_tokens=4, prefix_cache=False)
    yield engine
    engine.shutdown()


def test_speculation_gives_the_plain_outputs_greedy_and_seeded(plain, speculative):
    loop = ids(12, 70)
    prompts = [loop * 4, ids(40, 71), loop * 2 + ids(5, 72), ids(8, 73) * 5]  # repetitive and not
    want = run(plain, prompts, max_tokens=40)
    assert run(speculative, prompts, max_tokens=40) == want
    seeded = [GenerationConfig(SamplingParams(temperature=0.8, top_p=0.9, seed=i), max_tokens=30, ignore_eos=True)
              for i in range(4)]
    assert run(speculative, prompts, configs=seeded) == run(plain, prompts, configs=seeded)
    stats = speculative.stats()
    assert stats["spec_draft_tokens"] > 0 and 0 < stats["spec_acceptance_rate"] <= 1, stats
    assert stats["decode_steps"] < stats["completion_tokens"] - 8  # fewer steps than tokens: drafts accepted
    assert stats["kv_pages_in_use"] == 0


def test_abort_mid_speculation_frees_every_page(speculative):
    out: queue.SimpleQueue = queue.SimpleQueue()
    config = GenerationConfig(SamplingParams(temperature=0), max_tokens=180, ignore_eos=True)
    request = speculative.submit(ids(10, 80) * 6, config, out.put)
    got = 0
    while got < 20:
        o = out.get(timeout=60)
        got += sum(len(d.token_ids) for d in o.deltas)
        extra = o.stats.as_dict() if o.finished else None
        assert not o.finished, extra
    speculative.abort(request)
    while not (o := out.get(timeout=60)).finished:
        pass
    assert o.deltas[0].finish_reason == "abort" and o.stats.draft_tokens > 0
    assert speculative.stats()["kv_pages_in_use"] == 0
    assert speculative.model.available_pages() == speculative.model.total_pages  # nothing cached either


# --- speculative decoding (draft model) ------------------------------------------------------------

@pytest.fixture(scope="module")
def draft_bundle(tiny_draft):
    return Bundle.open(tiny_draft.path, "cpu")


@pytest.fixture(scope="module")
def drafted(bundle, draft_bundle):
    """The tiny q0f32 model with its q4f32_1 build drafting 3 tokens a step."""
    engine = Engine(bundle, speculative_mode="draft", speculative_tokens=3, draft=draft_bundle, prefix_cache=False)
    yield engine
    engine.shutdown()


def test_draft_model_gives_the_plain_outputs_greedy_and_seeded(plain, drafted):
    prompts = [ids(40, 90), ids(12, 91) * 3, ids(100, 92), ids(7, 93)]  # the 100-token one drafts in 4 chunks
    want = run(plain, prompts, max_tokens=40)
    assert run(drafted, prompts, max_tokens=40) == want
    greedy = drafted.stats()
    seeded = [GenerationConfig(SamplingParams(temperature=0.8, top_p=0.9, seed=i), max_tokens=30, ignore_eos=True)
              for i in range(4)]
    assert run(drafted, prompts, configs=seeded) == run(plain, prompts, configs=seeded)
    stats = drafted.stats()
    # the q4 draft agrees with the q0 model often, not always: both branches of the accept rule ran
    assert 0.2 < greedy["spec_acceptance_rate"] < 1, greedy
    assert stats["spec_accepted_tokens"] < stats["spec_draft_tokens"], stats
    assert stats["decode_steps"] < stats["completion_tokens"] - 8 and stats["draft_model"] == "tiny"
    assert stats["kv_pages_in_use"] == 0
    assert drafted.draft.model.available_pages() == drafted.draft.model.total_pages  # every draft sequence freed


def test_draft_rollback_at_every_number_of_accepted_tokens(draft_bundle):
    """Draft k tokens, let the target keep the first m of them (m = 0..k) and add its own token: after
    rollback() the draft's KV cache holds exactly the new context (its logits for the next token equal those
    of a sequence that was fed that context from scratch)."""
    from mlcbuild.runtime.engine import CompiledModel
    from mlcbuild.runtime.speculative import DraftModel

    k, context = 4, ids(24, 94)  # + up to 3 kept: within a prefill chunk (32)
    draft = DraftModel(CompiledModel(draft_bundle, max_batch_size=2, kv_cache_tokens=1024, prefill_chunk_size=32,
                                     page_size=16), vocab_size=320, name="tiny")
    for m in range(k + 1):
        state = draft.new_state()
        proposed = draft.propose([(state, context, k)])[0]
        assert len(proposed) == k and state.tail == proposed[:-1] and state.fed == len(context)
        verified = context + proposed[:m] + [(proposed[m] + 1) % 320 if m < k else 7]  # the target's own token
        draft.rollback(state, verified)
        assert state.fed == len(context) + min(m, k - 1) and state.tail == []
        fresh = draft.new_state()  # fed the kept tokens from scratch
        draft.model.forward_prefill([fresh.seq_id], [verified[:state.fed]])
        logits = draft.model.forward_decode([state.seq_id, fresh.seq_id], [verified[state.fed]] * 2)
        np.testing.assert_allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4)
        # and drafting on from there continues the verified context
        state.fed += 1
        fresh.fed = state.fed
        assert draft.propose([(state, verified, 2)]) == draft.propose([(fresh, verified, 2)])
        draft.drop(state)
        draft.drop(fresh)
    assert draft.model.available_pages() == draft.model.total_pages


def test_abort_mid_draft_speculation_frees_every_page_of_both_models(drafted):
    out: queue.SimpleQueue = queue.SimpleQueue()
    config = GenerationConfig(SamplingParams(temperature=0), max_tokens=180, ignore_eos=True)
    request = drafted.submit(ids(60, 95), config, out.put)
    got = 0
    while got < 20:
        o = out.get(timeout=60)
        got += sum(len(d.token_ids) for d in o.deltas)
        assert not o.finished
    drafted.abort(request)
    while not (o := out.get(timeout=60)).finished:
        pass
    assert o.deltas[0].finish_reason == "abort" and o.stats.draft_tokens > 0
    assert drafted.stats()["kv_pages_in_use"] == 0
    assert drafted.model.available_pages() == drafted.model.total_pages
    assert drafted.draft.model.available_pages() == drafted.draft.model.total_pages


def test_recipe_speculative_section_and_bad_drafts(tiny, tiny_draft, bundle, draft_bundle, tmp_path):
    """A recipe's speculative section gives its other quantizations the draft; the draft itself runs plain;
    a draft of another tokenizer or a smaller context window is refused, naming the draft."""
    import dataclasses
    import shutil

    from mlcbuild.runtime.api import speculation_for
    from mlcbuild.runtime.speculative import DraftModelError, check_draft

    target = Bundle.open(tiny_draft.recipe, "cpu", quantization="q0f32")
    assert speculation_for(tiny_draft.recipe, target, None, None, None, None) == \
        ("draft", 3, tiny_draft.recipe, "q4f32_1")
    assert speculation_for(tiny_draft.recipe, draft_bundle, None, None, None, None) == ("off", 4, None, None)
    assert speculation_for(tiny_draft.recipe, target, "off", None, None, None)[0] == "off"  # the caller decides
    assert speculation_for(tiny.recipe, bundle, None, None, None, None) == ("off", 4, None, None)
    other = tmp_path / "other"
    shutil.copytree(draft_bundle.path, other)
    tokenizer = (other / "tokenizer.json").read_text().replace('"Paris"', '"Parys"', 1)
    (other / "tokenizer.json").write_text(tokenizer + " ")
    with pytest.raises(DraftModelError, match="another tokenizer"):
        check_draft(bundle, dataclasses.replace(draft_bundle, path=other), 8, 256)
    with pytest.raises(DraftModelError, match="context window of 256 tokens, the engine 512"):
        check_draft(bundle, draft_bundle, 8, 512)
    with pytest.raises(ValueError, match="needs a draft bundle"):
        Engine(bundle, speculative_mode="draft")


def test_draft_catches_up_a_long_prompt_a_chunk_per_step(draft_bundle):
    """A new sequence's prompt enters the draft's cache a prefill chunk per step (no drafts until it is in),
    so that one long prompt does not stall a batch's step; short catch-ups of the others go first."""
    from mlcbuild.runtime.engine import CompiledModel
    from mlcbuild.runtime.speculative import DraftModel

    draft = DraftModel(CompiledModel(draft_bundle, max_batch_size=2, kv_cache_tokens=1024, prefill_chunk_size=32,
                                     page_size=16), vocab_size=320, name="tiny")
    context = ids(70, 96)
    state = draft.new_state()
    assert draft.propose([(state, context, 2)]) == [[]] and state.fed == 32
    assert draft.propose([(state, context, 2)]) == [[]] and state.fed == 64
    drafted = draft.propose([(state, context, 2)])[0]
    assert state.fed == 70 and len(drafted) == 2
    # what a sequence fed the same tokens directly drafts greedily
    draft.model.add_sequence(999)
    for start in range(0, 70, 32):
        logits = draft.model.forward_prefill([999], [context[start:start + 32]])[0]
    first = int(logits[:320].argmax())
    second = int(draft.model.forward_decode([999], [first])[0][:320].argmax())
    assert drafted == [first, second]
    # a short catch-up goes first; the long one gets what is left of the chunk
    long, short = draft.new_state(), draft.new_state()
    got = draft.propose([(long, context, 2), (short, context[:5], 2)])
    assert got[0] == [] and len(got[1]) == 2 and long.fed == 27 and short.fed == 5


def test_draft_prefills_with_the_model_and_drafts_from_the_first_decode_step(plain, drafted):
    """A 70-token prompt prefills in three chunks of 32; the draft follows each chunk, so the first decode step
    already drafts (caught up only then, it would feed the prompt a chunk per decode step and, with 4 tokens
    to generate, never draft). Greedy tokens stay the plain run's."""
    prompt = ids(70, 94)
    out: queue.SimpleQueue = queue.SimpleQueue()
    drafted.submit(prompt, GenerationConfig(SamplingParams(temperature=0), max_tokens=4, ignore_eos=True), out.put)
    tokens: list[int] = []
    while not (o := out.get(timeout=60)).finished:
        tokens += [t for d in o.deltas for t in d.token_ids]
    tokens += [t for d in o.deltas for t in d.token_ids]
    assert o.error is None and o.stats.draft_tokens > 0, o.stats
    assert tokens == run(plain, [prompt], max_tokens=4)[0]
    assert drafted.draft.model.available_pages() == drafted.draft.model.total_pages
