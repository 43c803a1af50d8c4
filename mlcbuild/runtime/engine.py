"""The one engine under every front end: a compiled model driven step by step, with continuous batching.

Read it top-down, like gpt-fast's ``generate.py``:

* :class:`CompiledModel` wraps the library's functions and the paged KV cache (``embed``,
  ``batch_prefill``, ``batch_decode``, ``vm.builtin.kv_state_*``).
* :func:`prefill` runs one chunk of prompt tokens for one or more sequences and returns each one's
  last-position logits; :func:`decode_one_step` feeds one token to each running sequence;
  :func:`sample_next` turns a row of logits into a token (penalties, logprobs, sampling).
* Constrained requests (JSON schema, grammar, tool calls: :mod:`.structured`) carry a compiled
  grammar; each of their sequences has its own matcher. While a step's model call runs, a worker
  thread fills the token bitmask of every constrained sequence in it (the mask needs only the tokens
  accepted so far; masks that came from xgrammar's cache in microseconds last time are filled in place
  instead); the mask is applied to the logits before sampling, the sampled token advances the
  matcher, and the matcher's termination ends the sequence (``stop``).
* :class:`Engine` adds batching on top: a background thread loops *admit -> prefill a chunk ->
  decode one step*. New requests join between decode steps; a long prompt is prefilled in chunks of
  ``prefill_chunk_size`` interleaved with decode steps of the running requests; decode is batched
  across all running sequences (up to ``max_batch_size``); a sequence's KV pages are freed as soon as
  it finishes, is aborted, or its client goes away.

Front ends submit token ids with a :class:`GenerationConfig` and a callback; the engine thread calls
it with :class:`RequestOutput` deltas (text, token ids, logprobs, finish reason; usage and timing at
the end). The callback must be quick and thread-safe (a queue put).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bundle import Bundle
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, TokenHistory, apply_penalties, make_rng, sample, token_logprobs
from .speculative import DraftModel, DraftState, check_draft, prompt_lookup
from .structured import TokenMasker, new_matcher
from .tokenizer import IncrementalDecoder, StopStringMatcher, Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 8  # when neither the caller nor the bundle's chat config says more than 1
DEFAULT_KV_CACHE_TOKENS_CAP = 1 << 15  # KV capacity by default: a full context per slot, up to this
DEFAULT_MEMORY_UTILIZATION = 0.9  # of the free device memory (available RAM on CPU), as MLC LLM's default
COUNTERS = ("requests", "finished", "aborted", "failed", "prompt_tokens", "completion_tokens", "prefill_steps",
            "prefill_tokens", "decode_steps", "decode_sequences", "preemptions", "prefix_cache_lookup_tokens",
            "prefix_cache_hit_tokens", "prefix_cache_evictions", "spec_draft_tokens", "spec_accepted_tokens")
SPECULATIVE_MODES = ("off", "prompt-lookup", "draft")


# A prefill of at most this many tokens runs through batch_verify, whose matmuls read each weight once for
# all rows (prefill's GEMMs first repack the weights). Measured on SmolLM2-135M, Intel Xeon 2 vCPUs:
# q0f16 2 / 3 / 5 tokens 13.8 / 17.6 / 24.7 ms against 40.4 / 41.6 / 46.1; q4f16_1 6.3 / 9.2 / 14.3 against
# 11.0 / 11.5 / 15.2 (and 24.8 against 20.1 at 9 tokens, where computing every row's logits costs more).
FEW_ROWS_PREFILL = 4


class ContextWindowError(ValueError):
    """The prompt (plus the requested completion) does not fit the model's context window."""

    param = "messages"
    code = "context_length_exceeded"


class EngineClosedError(RuntimeError):
    """The engine was terminated."""


def kv_bytes_per_token(bundle: Bundle) -> int:
    """Bytes one token takes in the KV cache: keys and values of every layer's KV heads."""
    arch = bundle.chat_config.arch_config
    layers = arch.get("num_hidden_layers") or arch.get("n_layer") or arch.get("num_layers")
    heads = arch.get("num_attention_heads") or arch.get("n_head")
    kv_heads = arch.get("num_key_value_heads") or heads
    head_dim = arch.get("head_dim") or arch["hidden_size"] // heads
    itemsize = 4 if bundle.chat_config.model_dtype == "float32" else 2
    return 2 * int(layers) * int(kv_heads) * int(head_dim) * itemsize


def free_memory_bytes(bundle: Bundle) -> int | None:
    """Free memory where the KV cache will live: the GPU's (TVM's ``available_global_memory``) or, on CPU, the
    host's available RAM (``MemAvailable``); None where it cannot be told."""
    if bundle.device.kind != "cpu":
        try:
            free = bundle.device.tvm_device().available_global_memory
            return int(free) if free else None
        except Exception:  # an older TVM or a driver that does not say
            return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def kv_tokens_in_memory(bundle: Bundle, fraction: float) -> int | None:
    """KV-cache tokens that fit in ``fraction`` of the free memory once the weights are loaded (they are not
    yet, so their size on disk is taken off)."""
    free = free_memory_bytes(bundle)
    if free is None:
        return None
    weights = sum(f.stat().st_size for f in (bundle.path / "params").glob("*") if f.is_file()) \
        if bundle.device.kind != "cpu" else 0  # on CPU the shards are memory-mapped: MemAvailable counts them
    return max(int((free * fraction - weights) // kv_bytes_per_token(bundle)), 0)


# ----------------------------------------------------------------------------------------------
# The compiled model
# ----------------------------------------------------------------------------------------------


class CompiledModel:
    """The library's functions on one device, with weights bound and a paged KV cache created."""

    def __init__(self, bundle: Bundle, max_batch_size: int, kv_cache_tokens: int, prefill_chunk_size: int,
                 page_size: int):
        # TVM's thread pool assumes hyper-threads on x86 and uses half the cores by default (one
        # thread on a 2-core machine); use every core this process may run on unless told otherwise.
        os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
        import tvm
        from tvm.runtime.vm import VirtualMachine  # the runtime's VM: no compiler import
        from tvm.runtime import ShapeTuple

        self._tvm, self._shape = tvm, ShapeTuple
        self.device = bundle.device.tvm_device()
        self.vm = VirtualMachine(bundle.load_library(), self.device)
        self.metadata: dict[str, Any] = json.loads(self.vm["_metadata"]())
        self.params = bundle.load_params([p["name"] for p in self.metadata["params"]])
        self._embed, self._prefill, self._decode = (self.vm[n] for n in ("embed", "batch_prefill", "batch_decode"))
        try:  # libraries built before batch_verify existed verify through batch_prefill
            self._verify = self.vm["batch_verify"]
        except (AttributeError, KeyError, RuntimeError, ValueError):
            self._verify = None
        builtin = tvm.get_global_func
        self._begin = builtin("vm.builtin.kv_state_begin_forward")
        self._end = builtin("vm.builtin.kv_state_end_forward")
        self._add = builtin("vm.builtin.kv_state_add_sequence")
        self._remove = builtin("vm.builtin.kv_state_remove_sequence")
        self._fork = builtin("vm.builtin.kv_state_fork_sequence")
        self._popn = builtin("vm.builtin.kv_state_popn")
        self._available = builtin("vm.builtin.attention_kv_cache_get_num_available_pages")
        self._reshape = builtin("vm.builtin.reshape")
        self.page_size = page_size
        # Sliding-window models (Mistral v0.1): the cache slides before each forward call and keeps
        # window - 1 previous tokens, which is what transformers' mask lets a token attend to.
        cc = bundle.chat_config
        self.sliding_window = cc.sliding_window_size if cc.sliding_window_size and cc.sliding_window_size > 0 else 0
        self.attention_sink = max(getattr(cc, "attention_sink_size", 0) or 0, 0)
        self._enable_sliding = builtin("vm.builtin.attention_kv_cache_enable_sliding_window_for_seq")
        # Tokens of one sequence per forward call. With a window: at most window - 1, what the cache keeps,
        # so a chunk fits in one window and finds the history each of its rows needs (the compiled prefill
        # masks each row to its window: compiler/kernels/sliding_window.py); a longer chunk would also
        # outgrow the cache's slots.
        self.max_chunk_tokens = max(1, min(prefill_chunk_size, self.sliding_window - 1)) if self.sliding_window \
            else prefill_chunk_size
        self.kv_cache = self.vm["create_paged_kv_cache"](
            ShapeTuple([max_batch_size]), ShapeTuple([kv_cache_tokens]), ShapeTuple([prefill_chunk_size]),
            ShapeTuple([page_size]), ShapeTuple([1 if self.sliding_window else 0]),
        )
        self.total_pages = self.available_pages()

    # --- KV cache ------------------------------------------------------------------------------
    def available_pages(self) -> int:
        return int(self._available(self.kv_cache))

    def add_sequence(self, seq_id: int) -> None:
        self._add(self.kv_cache, seq_id)
        self._slide(seq_id)

    def fork_sequence(self, parent: int, child: int, fork_pos: int = -1) -> None:
        """``child`` shares ``parent``'s first ``fork_pos`` tokens (all of them: -1) by page reference."""
        self._fork(self.kv_cache, parent, child, fork_pos)
        self._slide(child)

    def popn(self, seq_id: int, n: int) -> None:
        """Drop the last ``n`` tokens of a sequence (rejected speculative tokens)."""
        if n:
            self._popn(self.kv_cache, seq_id, n)

    def _slide(self, seq_id: int) -> None:
        if self.sliding_window:
            self._enable_sliding(self.kv_cache, seq_id, self.sliding_window - 1, self.attention_sink)

    def remove_sequence(self, seq_id: int) -> None:
        self._remove(self.kv_cache, seq_id)

    # --- forward passes ------------------------------------------------------------------------
    def _embed_tokens(self, token_ids: list[int], shape: list[int]) -> Any:
        ids = self._tvm.runtime.tensor(np.asarray(token_ids, dtype=np.int32), self.device)
        embeddings = self._embed(ids, self.params)
        return self._reshape(embeddings, self._shape([*shape, embeddings.shape[-1]]))

    def forward_prefill(self, seq_ids: list[int], chunks: list[list[int]]) -> np.ndarray:
        """Append each sequence's chunk to the cache; logits [len(seq_ids), vocab] at each chunk's end."""
        ends = np.cumsum([len(c) for c in chunks]).astype(np.int32) - 1
        if self._verify is not None and ends[-1] + 1 <= FEW_ROWS_PREFILL:
            return self.forward_verify(seq_ids, chunks)[ends]
        return self._prefill_logits(seq_ids, chunks, ends.tolist())

    def forward_prefill_at(self, seq_id: int, token_ids: list[int], positions: list[int]) -> np.ndarray:
        """Append one sequence's chunk to the cache; logits [len(positions), vocab] at those positions of
        the chunk (perplexity scores every position, not only the last)."""
        return self._prefill_logits([seq_id], [token_ids], positions)

    def _prefill_logits(self, seq_ids: list[int], chunks: list[list[int]], positions: list[int]) -> np.ndarray:
        """Append the chunks; logits at ``positions`` of the concatenated chunks."""
        at = self._tvm.runtime.tensor(np.asarray(positions, dtype=np.int32), self.device)
        return self._forward_chunks(seq_ids, chunks, lambda embeddings: self._prefill(embeddings, at, self.kv_cache,
                                                                                      self.params))

    def forward_verify(self, seq_ids: list[int], chunks: list[list[int]]) -> np.ndarray:
        """Append each sequence's chunk (speculation: its last token and the draft); logits [total tokens,
        vocab] at every position, chunk after chunk."""
        if self._verify is None:  # a library built before batch_verify existed
            return self._prefill_logits(seq_ids, chunks, list(range(sum(len(c) for c in chunks))))
        return self._forward_chunks(seq_ids, chunks, lambda embeddings: self._verify(embeddings, self.kv_cache,
                                                                                     self.params))

    def _forward_chunks(self, seq_ids: list[int], chunks: list[list[int]], call: Callable[[Any], Any]) -> np.ndarray:
        """Embed the concatenated chunks, run ``call`` on them inside the KV cache's forward for these
        sequences and chunk lengths, and return its logits' first row as float32."""
        flat = [t for chunk in chunks for t in chunk]
        embeddings = self._embed_tokens(flat, [1, len(flat)])
        self._begin(self.kv_cache, self._shape(seq_ids), self._shape([len(c) for c in chunks]))
        try:
            logits = call(embeddings)
        finally:
            self._end(self.kv_cache)
        return logits.numpy()[0].astype(np.float32, copy=False)

    def forward_decode(self, seq_ids: list[int], token_ids: list[int]) -> np.ndarray:
        """One new token per sequence; logits [len(seq_ids), vocab]."""
        embeddings = self._embed_tokens(token_ids, [len(token_ids), 1])
        self._begin(self.kv_cache, self._shape(seq_ids), self._shape([1] * len(seq_ids)))
        try:
            logits = self._decode(embeddings, self.kv_cache, self.params)
        finally:
            self._end(self.kv_cache)
        return logits.numpy()[:, 0].astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# Requests and their sequences
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationConfig:
    """What a front end asks for, already validated (see ``protocol``)."""

    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = None  # None: up to the context window
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    truncate_prompt_tokens: int | None = None  # keep the last k prompt tokens; -1: as many as fit
    grammar: Any = None  # a compiled grammar (``structured.GrammarCompiler.compile``): output must match it
    # Test hook: this request's step raises once it has produced this many tokens (a fault confined to one
    # request must fail that request alone; its batch-mates finish).
    debug_fail_at_token: int | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SequenceDelta:
    """What one choice produced since the last output."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    arrival: float = 0.0
    prefill_start: float | None = None
    first_token: float | None = None
    finish: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Usage ``extra``: latency and speed of this request."""
        out: dict[str, Any] = {}
        if self.prefill_start is not None:
            out["queue_time_s"] = self.prefill_start - self.arrival
        if self.first_token is not None and self.prefill_start is not None:
            out["ttft_s"] = self.first_token - self.arrival
            prefill_time = max(self.first_token - self.prefill_start, 1e-9)
            out["prefill_time_s"] = prefill_time
            out["prefill_tokens_per_s"] = self.prompt_tokens / prefill_time
        if self.finish is not None and self.first_token is not None:
            decode_time = self.finish - self.first_token
            out["decode_time_s"] = decode_time
            if decode_time > 0:
                out["decode_tokens_per_s"] = self.decode_tokens / decode_time
        return {**out, **self.speculation()}

    decode_tokens: int = 0  # tokens produced by decode steps (the first one comes from prefill)
    draft_tokens: int = 0  # speculative tokens proposed for this request
    accepted_tokens: int = 0  # of which the target model agreed with

    def speculation(self) -> dict[str, Any]:
        if not self.draft_tokens:
            return {}
        return {"spec_draft_tokens": self.draft_tokens, "spec_accepted_tokens": self.accepted_tokens,
                "spec_acceptance_rate": self.accepted_tokens / self.draft_tokens}


@dataclass
class RequestOutput:
    request_id: str
    deltas: list[SequenceDelta]
    finished: bool = False
    stats: RequestStats | None = None  # set on the last output
    error: BaseException | None = None


@dataclass
class _Sequence:
    index: int
    seq_id: int
    history: TokenHistory
    rng: np.random.Generator
    decoder: IncrementalDecoder
    stopper: StopStringMatcher
    tokens: list[int] = field(default_factory=list)
    last_token: int = -1
    finish_reason: str | None = None
    pending: SequenceDelta | None = None
    matcher: Any = None  # the grammar matcher of a constrained request's sequence
    kv_len: int = 0  # tokens of this sequence in the KV cache
    draft: DraftState | None = None  # its twin in the draft model's KV cache (speculative_mode "draft")
    draft_len: int = 0  # tokens it proposes next step (0: the engine's speculative_tokens)


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    config: GenerationConfig
    callback: Callable[[RequestOutput], None]
    max_tokens: int
    reserved_pages: int
    stats: RequestStats
    prefilled: int = 0
    admitted: bool = False
    seqs: list[_Sequence] = field(default_factory=list)
    # Tokens that must be in seq 0's KV before it decodes: the prompt, or after a pre-emption the prompt and
    # every generated token but the last (recompute; the last one is fed by the next decode step).
    fill: list[int] = field(default_factory=list)
    order: int = 0  # admission order: pre-emption takes the newest
    cache_hit: int = 0  # prompt tokens forked from the prefix cache at the first admission

    @property
    def live(self) -> list[_Sequence]:
        return [s for s in self.seqs if s.finish_reason is None]


# ----------------------------------------------------------------------------------------------
# The generation steps
# ----------------------------------------------------------------------------------------------


def prefill(model: CompiledModel, work: list[tuple[_Request, list[int]]]) -> np.ndarray:
    """One prefill call: each request's next chunk of prompt (into its first sequence's KV)."""
    for request, chunk in work:
        request.seqs[0].kv_len += len(chunk)
    return model.forward_prefill([r.seqs[0].seq_id for r, _ in work], [chunk for _, chunk in work])


def decode_one_step(model: CompiledModel, seqs: list[_Sequence]) -> np.ndarray:
    """Feed every running sequence its last token; next-token logits for each."""
    for seq in seqs:
        seq.kv_len += 1
    return model.forward_decode([s.seq_id for s in seqs], [s.last_token for s in seqs])


def sample_next(seq: _Sequence, params: SamplingParams, logits: np.ndarray,
                mask: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[int, TokenLogprob | None]:
    """Penalize, mask (a constrained sequence), sample, and (if asked) report logprobs for one
    sequence's next token."""
    logits = apply_penalties(logits, params, seq.history)
    if mask is not None:
        logits = mask(logits)
    token = sample(logits, params, seq.rng)
    logprob = None
    if params.logprobs:
        value, top = token_logprobs(logits, token, params.top_logprobs)
        logprob = TokenLogprob(token, value, top)
    return token, logprob


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------


class Engine:
    """Continuous batching over one :class:`CompiledModel`; thread-safe ``submit``/``abort``/``stats``.

    ``prefix_cache``: keep finished sequences in the KV cache and fork the longest cached prefix of each
    new prompt (off for sliding-window models: TVM's PagedKVCache cannot fork a sliding sequence).
    ``kv_cache_tokens``: the KV cache's size in tokens; when not given, a full context per batch slot
    (capped), and no more than ``gpu_memory_utilization`` of the device's free memory (host RAM on CPU).
    ``speculative_mode``: ``prompt-lookup`` drafts up to ``speculative_tokens`` tokens per sequence and step
    from the n-grams of its own prompt and output (no draft model); the model verifies them in one
    prefill-like call and the rejected ones are popped off the KV cache. Every token is still drawn from
    the target's distribution with the sequence's own generator, so outputs (greedy or seeded) are those of
    plain decoding. Per engine: every unconstrained sequence speculates; constrained ones decode one token.
    Each sequence's draft length adapts, as transformers' assisted generation does: two more tokens after a
    draft accepted whole (up to ``speculative_tokens``), one fewer (down to 1) after a rejection, since a
    verified token costs more than a decoded one when it is rejected.
    ``speculative_mode="draft"`` proposes with ``draft``, a smaller bundle of the same tokenizer on the same
    device with its own KV cache (greedy drafts: :mod:`.speculative` says why outputs stay the target's),
    which prefills each prompt alongside the model (MLC LLM does the same), so drafting starts at once.
    """

    def __init__(self, bundle: Bundle, *, max_batch_size: int | None = None, context_window_size: int | None = None,
                 prefill_chunk_size: int | None = None, kv_cache_tokens: int | None = None,
                 prefix_cache: bool = True, gpu_memory_utilization: float = DEFAULT_MEMORY_UTILIZATION,
                 speculative_mode: str = "off", speculative_tokens: int = 4, draft: Bundle | None = None):
        cc = bundle.chat_config
        self.bundle = bundle
        self.tokenizer = Tokenizer(bundle.path)
        # at most what the library was compiled for (its static memory plan is sized for that batch)
        self.max_batch_size = max(1, min(max_batch_size or (cc.max_batch_size if cc.max_batch_size > 1
                                                            else DEFAULT_MAX_BATCH_SIZE), cc.max_batch_size))
        self.context_window_size = min(context_window_size or cc.context_window_size, cc.context_window_size)
        self.prefill_chunk_size = min(prefill_chunk_size or cc.prefill_chunk_size, cc.prefill_chunk_size)
        if kv_cache_tokens is None:
            kv_cache_tokens = min(self.context_window_size * self.max_batch_size,
                                  max(DEFAULT_KV_CACHE_TOKENS_CAP, self.context_window_size))
            fits = kv_tokens_in_memory(bundle, gpu_memory_utilization)
            if fits is not None:  # never below one context: a request of a full context must fit alone
                kv_cache_tokens = max(min(kv_cache_tokens, fits), self.context_window_size)
        self.kv_cache_tokens = kv_cache_tokens
        if speculative_mode not in SPECULATIVE_MODES:
            raise ValueError(f"speculative_mode must be one of {SPECULATIVE_MODES}, not {speculative_mode!r}")
        if (speculative_mode == "draft") != (draft is not None):
            raise ValueError("a draft bundle goes with speculative_mode='draft', and that mode needs one"
                             if draft is not None else "speculative_mode='draft' needs a draft bundle")
        self.speculative_mode, self.speculative_tokens = speculative_mode, max(1, speculative_tokens)
        model_class: Any = CompiledModel
        if cc.tensor_parallel_shards > 1:  # one disco worker per shard, same interface (sharded_model.py)
            from .sharded_model import ShardedModel as model_class
        self.model = model_class(bundle, self.max_batch_size, kv_cache_tokens, self.prefill_chunk_size,
                                 cc.page_size)
        self.prefill_chunk_size = self.model.max_chunk_tokens
        self.draft: DraftModel | None = None
        if draft is not None:
            check_draft(bundle, draft, self.max_batch_size, self.context_window_size)
            dcc = draft.chat_config
            # its live sequences hold what the target's do plus a draft each: never more than the target's cache
            draft_tokens = kv_cache_tokens + self.max_batch_size * (self.speculative_tokens + 2 * dcc.page_size)
            self.draft = DraftModel(CompiledModel(draft, self.max_batch_size, draft_tokens,
                                                  min(self.prefill_chunk_size, dcc.prefill_chunk_size), dcc.page_size),
                                    min(cc.vocab_size, dcc.vocab_size), draft.name)
        eos = list(cc.eos_token_id) or [t for t in [self.tokenizer.eos_token_id] if t is not None]
        self.eos_token_ids: tuple[int, ...] = tuple(eos)
        # TVM's PagedKVCache refuses to fork a sequence with a sliding window: no prefix cache for those models.
        self.prefix_cache: PrefixCache | None = PrefixCache() if prefix_cache and not self.model.sliding_window else None

        self._lock = threading.Condition()
        self._incoming: deque[_Request] = deque()
        self._aborts: set[str] = set()
        self._waiting: deque[_Request] = deque()
        self._prefilling: list[_Request] = []
        self._running: list[_Request] = []
        self._free_slots = self.max_batch_size  # sequences that may be live at once
        # KV sequence ids are never reused, so a finished sequence can stay in the prefix cache under its id
        self._seq_ids = itertools.count()
        self._order = itertools.count()
        self._ids = itertools.count()
        self._closed = False
        self._counters: Counter = Counter()
        self._batch_sizes: Counter = Counter()
        self._pages_in_use = 0  # read by stats() from other threads; updated by the engine thread
        self._pages_cached = 0
        self._masker: TokenMasker | None = None  # made on the first constrained request
        self._thread = threading.Thread(target=self._loop, name="mlcbuild-engine", daemon=True)
        self._thread.start()

    # --- front-end side (any thread) ------------------------------------------------------------
    def prepare_prompt(self, prompt: list[int], config: GenerationConfig) -> tuple[list[int], int]:
        """Check (or truncate) the prompt against the context window; return it with its max_tokens."""
        window = self.context_window_size
        if config.truncate_prompt_tokens is not None:
            keep = config.truncate_prompt_tokens
            if keep < 0:
                keep = window - (config.max_tokens or 1)
            prompt = prompt[-keep:] if 0 < keep < len(prompt) else prompt
        if not prompt:
            raise ContextWindowError("the prompt is empty")
        if len(prompt) >= window:
            raise ContextWindowError(
                f"This model's maximum context length is {window} tokens. However, your prompt has "
                f"{len(prompt)} tokens, which leaves no room for a completion. Shorten the prompt, or pass "
                "truncate_prompt_tokens to keep only its end."
            )
        if config.max_tokens is not None and len(prompt) + config.max_tokens > window:
            err = ContextWindowError(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{len(prompt) + config.max_tokens} tokens ({len(prompt)} in the prompt, {config.max_tokens} in the "
                "completion). Please reduce the length of the prompt or of the completion."
            )
            err.param = "max_tokens"
            raise err
        max_tokens = config.max_tokens if config.max_tokens is not None else window - len(prompt)
        if config.n > self.max_batch_size:
            err = ContextWindowError(f"n={config.n} exceeds the engine's max_batch_size {self.max_batch_size}")
            err.param, err.code = "n", "invalid_value"
            raise err
        return prompt, max_tokens

    def submit(self, prompt: list[int], config: GenerationConfig, callback: Callable[[RequestOutput], None],
               request_id: str | None = None) -> str:
        """Queue a request; outputs arrive through ``callback`` on the engine thread."""
        prompt, max_tokens = self.prepare_prompt(prompt, config)
        pages = config.n * -(-(len(prompt) + max_tokens) // self.model.page_size)
        if pages > self.model.total_pages:
            raise ContextWindowError(
                f"the request needs {pages} KV-cache pages, the engine has {self.model.total_pages}; "
                "lower max_tokens or n, or start the engine with more kv_cache_tokens"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        request = _Request(request_id, prompt, config, callback, max_tokens, pages,
                           RequestStats(prompt_tokens=len(prompt), arrival=time.perf_counter()), fill=prompt)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine was terminated")
            self._incoming.append(request)
            self._counters["requests"] += 1
            self._lock.notify()
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone, cancelled); its pages are freed on the engine thread."""
        with self._lock:
            self._aborts.add(request_id)
            self._lock.notify()

    def stats(self) -> dict[str, Any]:
        """Live counts: requests, tokens, decode steps and their batch sizes, KV pages, prefix cache."""
        with self._lock:
            counters = {k: self._counters[k] for k in COUNTERS}
            looked_up = counters["prefix_cache_lookup_tokens"]
            return {
                "running": len(self._running),
                "prefilling": len(self._prefilling),
                "queued": len(self._waiting) + len(self._incoming),
                "running_sequences": sum(len(r.live) for r in list(self._running)),
                "kv_pages_total": self.model.total_pages,
                "kv_pages_in_use": self._pages_in_use,
                "kv_pages_cached": self._pages_cached,
                "prefix_cache": self.prefix_cache is not None,
                "prefix_cache_entries": len(self.prefix_cache) if self.prefix_cache is not None else 0,
                "prefix_cache_hit_rate": counters["prefix_cache_hit_tokens"] / looked_up if looked_up else 0.0,
                "speculative_mode": self.speculative_mode,
                "draft_model": self.draft.name if self.draft is not None else None,
                "spec_acceptance_rate": counters["spec_accepted_tokens"] / counters["spec_draft_tokens"]
                if counters["spec_draft_tokens"] else 0.0,
                "decode_batch_sizes": dict(sorted(self._batch_sizes.items())),
                **counters,
            }

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=30)
        if self._masker is not None:
            self._masker.close()
        if not self._thread.is_alive():  # a sharded model's worker processes end now, not when it is collected
            getattr(self.model, "close", lambda: None)()

    # --- engine thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._incoming or self._aborts or self._waiting
                           or self._prefilling or self._running):
                    self._lock.wait()
                if self._closed:
                    break
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                aborts, self._aborts = self._aborts, set()
            try:
                self._apply_aborts(aborts)
                self._admit()
                self._prefill_step()
                self._decode_step()
            except Exception as exc:  # a failing model call fails the requests in flight, not the engine
                logger.exception("engine step failed")
                self._fail_all(exc)
            self._refresh_pages()
        self._fail_all(EngineClosedError("the engine was terminated"), aborted=True)

    def _apply_aborts(self, aborts: set[str]) -> None:
        if not aborts:
            return
        for request in [r for r in self._waiting if r.request_id in aborts]:
            self._waiting.remove(request)
            self._finish_request(request, "abort")
        for request in [r for r in self._prefilling + self._running if r.request_id in aborts]:
            for seq in request.live:
                self._end_sequence(request, seq, "abort")
            (self._prefilling if request in self._prefilling else self._running).remove(request)
            self._finish_request(request, "abort")

    # --- admission, pages, pre-emption --------------------------------------------------------------
    def _admit(self) -> None:
        """Start waiting requests (first come, first served) while sequence slots and the KV pages their
        prompts need now last (not their worst case: a request that outgrows the cache later pre-empts
        the newest one). Cached prefixes are forked; evicting the cache makes room."""
        while self._waiting:
            request = self._waiting[0]
            if request.config.n > self._free_slots:
                break
            parent, hit = self._lookup(request)
            if not self._evict_for(self._pages_to_admit(request, hit), keep=parent):
                # Keeping the cached prefix may be what leaves too little room (a long cached sequence that
                # shares only a short prefix): without the fork the whole prompt may fit, once it is evicted.
                # Otherwise nothing running could ever free enough for the fork, and the request would wait
                # for ever.
                if parent is None or not self._evict_for(self._pages_to_admit(request, 0)):
                    break
                parent, hit = None, 0
            self._waiting.popleft()
            if request.fill is request.prompt and not request.admitted:
                request.cache_hit = hit
                self._counters["prefix_cache_lookup_tokens"] += len(request.prompt)
                self._counters["prefix_cache_hit_tokens"] += hit
            request.admitted = True
            request.order = next(self._order)
            self._free_slots -= request.config.n
            if request.stats.prefill_start is None:
                request.stats.prefill_start = time.perf_counter()
            if not request.seqs:
                self._new_sequence(request, index=0)
            seq = request.seqs[0]
            seq.seq_id = next(self._seq_ids)
            if parent is not None:
                self.model.fork_sequence(parent, seq.seq_id, hit)
                self.prefix_cache.touch(parent)
            else:
                self.model.add_sequence(seq.seq_id)
            seq.kv_len = request.prefilled = hit
            self._prefilling.append(request)

    def _pages_to_admit(self, request: _Request, hit: int) -> int:
        """Free pages admitting ``request`` needs with ``hit`` prompt tokens forked from the cache: the rest of
        the prompt's pages (a fork copies at most one partial page), one page per extra choice, and a page for
        each running sequence's next decode step so admission does not force a pre-emption."""
        return -(-(len(request.fill) - hit) // self.model.page_size) + 1 + (request.config.n - 1) \
            + sum(len(r.live) for r in self._running)

    def _lookup(self, request: _Request) -> tuple[int | None, int]:
        """The cached sequence to fork for this request and how many of its tokens to share."""
        if self.prefix_cache is None:
            return None, 0
        parent, hit = self.prefix_cache.match(request.fill)
        # Fork strictly inside the parent (TVM cannot remove a sequence whose last block a child references,
        # which a fork at its very end would make it) and leave at least one token to prefill (its logits
        # give the first new token); a hit shorter than a page is not worth a fork.
        if parent is not None:
            hit = min(hit, len(self.prefix_cache.tokens(parent)) - 1, len(request.fill) - 1)
        return (parent, hit) if parent is not None and hit >= self.model.page_size else (None, 0)

    def _evict_for(self, pages: int, keep: int | None = None) -> bool:
        """Evict least recently used cached sequences until ``pages`` are free (never ``keep``). Pages a
        running sequence forked from an evicted one stay: TVM counts their references."""
        while self.model.available_pages() < pages:
            victim = self.prefix_cache.oldest(exclude=keep) if self.prefix_cache is not None else None
            if victim is None:
                return False
            self.prefix_cache.remove(victim)
            self.model.remove_sequence(victim)
            self._counters["prefix_cache_evictions"] += 1
        return True

    def _make_room(self, pages: int, newer_than: int, protect: set[int]) -> bool:
        """Free ``pages``: evict the cache, then pre-empt the newest admitted requests admitted after
        ``newer_than`` and not in ``protect`` (they recompute what they had later). False if not enough."""
        while not self._evict_for(pages):
            victims = [r for r in self._prefilling + self._running if r.order > newer_than and r.order not in protect]
            if not victims:
                return False
            self._preempt(max(victims, key=lambda r: r.order))
        return True

    def _preempt(self, request: _Request) -> None:
        """Take a request's pages back; it waits at the head of the queue and recomputes its KV (the prompt and
        the tokens generated so far: outputs do not change) when it is admitted again."""
        (self._prefilling if request in self._prefilling else self._running).remove(request)
        if request.config.n > 1:  # its choices diverged: recomputing them is not supported, fail it alone
            self._fail_request(request, RuntimeError("the KV cache ran out of pages for a request with n > 1"))
            return
        seq = request.seqs[0]
        self.model.remove_sequence(seq.seq_id)
        self._drop_draft(seq)
        seq.kv_len = 0
        request.fill = request.prompt + seq.tokens[:-1]
        request.prefilled = 0
        request.admitted = False
        self._free_slots += 1
        self._counters["preemptions"] += 1
        self._waiting.appendleft(request)

    def _new_sequence(self, request: _Request, index: int) -> _Sequence:
        params = request.config.sampling
        seq = _Sequence(
            index=index,
            seq_id=next(self._seq_ids),
            history=TokenHistory.of_prompt(request.prompt),
            rng=make_rng(params.seed, index),
            decoder=IncrementalDecoder(self.tokenizer),
            stopper=StopStringMatcher(list(request.config.stop)),
        )
        if request.config.grammar is not None:
            seq.matcher = new_matcher(request.config.grammar, self._stop_ids(request.config))
        request.seqs.append(seq)
        return seq

    def _stop_ids(self, config: GenerationConfig) -> tuple[int, ...]:
        return config.stop_token_ids + (() if config.ignore_eos else self.eos_token_ids)

    # --- token masks of constrained sequences ------------------------------------------------------
    def _start_masks(self, rows: list[tuple[int, _Sequence]]) -> Any:
        """Begin filling the masks of the constrained sequences among ``(row, seq)`` (returns a handle)."""
        constrained = [(row, seq.matcher) for row, seq in rows if seq.matcher is not None]
        if not constrained:
            return None
        if self._masker is None:
            self._masker = TokenMasker(self.bundle.chat_config.vocab_size, self.max_batch_size)
        return self._masker.start(constrained)

    def _mask_for(self, pending: Any, row: int, seq: _Sequence) -> Callable[[np.ndarray], np.ndarray] | None:
        """The function that applies row ``row``'s mask (after the fill started by ``_start_masks``)."""
        if seq.matcher is None:
            return None
        pending.result()
        masker = self._masker
        return lambda logits: masker.apply(logits, row)

    # --- steps ---------------------------------------------------------------------------------------
    def _prefill_step(self) -> None:
        """Prefill up to ``prefill_chunk_size`` prompt tokens, across prefilling requests in order."""
        budget, work = self.prefill_chunk_size, []
        for request in list(self._prefilling):
            if budget <= 0:
                break
            chunk = request.fill[request.prefilled : request.prefilled + budget]
            # pages for this chunk (plus a partial one); pre-empt requests newer than this one if needed
            pages = sum(-(-len(c) // self.model.page_size) + 1 for _, c in work) \
                + -(-len(chunk) // self.model.page_size) + 1
            if not self._make_room(pages, request.order, {r.order for r, _ in work}):
                break
            if request not in self._prefilling:
                continue
            work.append((request, chunk))
            budget -= len(chunk)
        work = [(r, c) for r, c in work if r in self._prefilling]  # drop any pre-empted along the way
        if not work:
            return
        # the first token of a finishing prompt is constrained too (every choice starts where seq 0 is)
        masks = self._start_masks([(row, r.seqs[0]) for row, (r, chunk) in enumerate(work)
                                   if r.prefilled + len(chunk) == len(r.fill) and not r.seqs[0].tokens])
        logits = prefill(self.model, work)
        if self.draft is not None:
            self._follow_drafts(work)
        self._refresh_pages()  # before any output: a client that saw a token sees the pages it holds
        self._counters["prefill_steps"] += 1
        self._counters["prefill_tokens"] += sum(len(c) for _, c in work)
        for row, (request, chunk) in enumerate(work):
            request.prefilled += len(chunk)
            if request.prefilled == len(request.fill):
                self._prefilling.remove(request)
                if request.seqs[0].tokens:  # resumed after a pre-emption: its next token is sampled already
                    self._running.append(request)
                    continue
                try:
                    self._start_decoding(request, logits[row], self._mask_for(masks, row, request.seqs[0]))
                except Exception as exc:  # this request's host-side work failed: it fails alone
                    self._fail_request(request, exc)

    def _start_decoding(self, request: _Request, logits: np.ndarray,
                        mask: Callable[[np.ndarray], np.ndarray] | None) -> None:
        """Prompt done: fork the other n-1 choices off its KV, sample each choice's first token."""
        for index in range(1, request.config.n):
            seq = self._new_sequence(request, index)
            self.model.fork_sequence(request.seqs[0].seq_id, seq.seq_id)
            seq.kv_len = request.seqs[0].kv_len
        request.stats.first_token = time.perf_counter()
        self._counters["prompt_tokens"] += len(request.prompt)
        if mask is not None:
            logits = mask(logits)
        for seq in request.seqs:
            self._accept(request, seq, *self._sample(request, seq, logits))
        self._emit(request)
        if request.live:
            self._running.append(request)
        else:
            self._finish_request(request)

    def _decode_step(self) -> None:
        # Each sequence may start a new page this step: evict the cache, then pre-empt the newest request
        # (prefilling or running) until that fits. The oldest always fits alone (submit checks it).
        while True:
            seqs = [(r, s) for r in self._running for s in r.live][: self.max_batch_size]
            # prompt lookup: the drafts themselves; a draft model: how many tokens each sequence may draft
            drafts = [self._draft(r, s) for r, s in seqs]
            # one verify call holds at most a prefill chunk (the cache's scratch buffers are sized for it)
            while sum(len(d) + 1 for d in drafts) > self.prefill_chunk_size:
                longest = max(drafts, key=len)
                longest.pop()
            if not seqs or self._evict_for(sum(-(-(len(d) + 1) // self.model.page_size) for d in drafts)):
                break
            oldest = min(r.order for r in self._running)
            victims = [r for r in self._prefilling + self._running if r.order != oldest]
            if not victims:
                break
            self._preempt(max(victims, key=lambda r: r.order))
        if not seqs:
            return
        if self.draft is not None and any(drafts):
            drafts = self._propose(seqs, [len(d) for d in drafts])
        if any(drafts):
            self._verify_step(seqs, drafts)
            return
        masks = self._start_masks([(row, seq) for row, (_, seq) in enumerate(seqs)])
        logits = decode_one_step(self.model, [s for _, s in seqs])
        self._refresh_pages()
        self._counters["decode_steps"] += 1
        self._counters["decode_sequences"] += len(seqs)
        self._batch_sizes[len(seqs)] += 1
        failed: dict[int, tuple[_Request, BaseException]] = {}
        for row, (request, seq) in enumerate(seqs):
            if id(request) in failed:
                continue
            try:
                request.stats.decode_tokens += 1
                mask = self._mask_for(masks, row, seq)
                self._accept(request, seq, *self._sample(request, seq, logits[row], mask))
            except Exception as exc:  # this request's host-side work failed: it fails alone
                failed[id(request)] = (request, exc)
        self._after_step(seqs, failed)

    def _after_step(self, seqs: list[tuple[_Request, _Sequence]],
                    failed: dict[int, tuple[_Request, BaseException]]) -> None:
        """Fail the requests whose step failed; emit the others' tokens; finish those with no live choice."""
        for request, exc in failed.values():
            self._running.remove(request)
            self._fail_request(request, exc)
        for request in {id(r): r for r, _ in seqs if id(r) not in failed}.values():
            try:
                self._emit(request)
            except Exception as exc:
                self._running.remove(request)
                self._fail_request(request, exc)
                continue
            if not request.live:
                self._running.remove(request)
                self._finish_request(request)

    def _draft(self, request: _Request, seq: _Sequence) -> list[int]:
        """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last n
        tokens (n = 3, then 2) in its prompt and output, at most what its limits still allow. A draft model: as
        many placeholders as it may draft (:meth:`_propose` fills them once the batch is settled)."""
        # sliding-window sequences are not rolled back (popn is not defined across a slide): no speculation
        if self.speculative_mode == "off" or seq.matcher is not None or self.model.sliding_window:
            return []
        room = min(request.max_tokens - len(seq.tokens),
                   self.context_window_size - len(request.prompt) - len(seq.tokens)) - 1
        k = min(seq.draft_len or self.speculative_tokens, room)
        if k <= 0:
            return []
        if self.draft is not None:
            return [-1] * k
        return prompt_lookup(request.prompt + seq.tokens, k)

    def _propose(self, seqs: list[tuple[_Request, _Sequence]], lengths: list[int]) -> list[list[int]]:
        """The draft model's tokens for each sequence (``lengths`` of them), while its KV cache has room (a
        sequence it has no room for decodes one token this step)."""
        assert self.draft is not None
        free = self.draft.model.available_pages()
        work: list[tuple[DraftState, list[int], int]] = []
        for (request, seq), k in zip(seqs, lengths):
            context = request.prompt + seq.tokens
            left = self._reserve_draft(seq, len(context), k, free) if k else None
            if left is None:
                k = 0
            else:
                free = left
            work.append((seq.draft, context, k))  # type: ignore[arg-type]  (None only where k == 0)
        return self.draft.propose(work)

    def _reserve_draft(self, seq: _Sequence, tokens: int, k: int, free: int) -> int | None:
        """The draft cache's pages left of ``free`` once it holds ``tokens`` of ``seq`` and ``k`` drafted ones
        (the sequence's draft state made on first use); None where they do not fit."""
        assert self.draft is not None
        need = self.draft.pages_for(seq.draft, tokens, k)
        if need > free:
            return None
        if seq.draft is None:
            seq.draft = self.draft.new_state()
        return free - need

    def _follow_drafts(self, work: list[tuple[_Request, list[int]]]) -> None:
        """The draft model prefills what the target just prefilled (the sequences that will speculate, while
        the draft's KV cache has room), so that drafting starts with the first decode step."""
        assert self.draft is not None
        if self.model.sliding_window:  # its sequences never speculate (see _draft)
            return
        free, follow = self.draft.model.available_pages(), []
        for request, _ in work:
            seq = request.seqs[0]
            if seq.matcher is not None:  # constrained: decodes one token a step, never drafts
                continue
            context = (request.prompt + seq.tokens)[:seq.kv_len]
            left = self._reserve_draft(seq, len(context), 0, free)
            if left is None:
                continue
            free = left
            follow.append((seq.draft, context))
        self.draft.follow(follow)

    def _drop_draft(self, seq: _Sequence) -> None:
        if seq.draft is not None and self.draft is not None:
            self.draft.drop(seq.draft)
            seq.draft = None

    def _discard(self, seq: _Sequence) -> None:
        """Free a failed sequence in both KV caches, whichever no longer holds it (it failed before it was
        added, or the cache is inconsistent after a failed step)."""
        for remove in (lambda: self.model.remove_sequence(seq.seq_id), lambda: self._drop_draft(seq)):
            try:
                remove()
            except Exception:
                pass

    def _verify_step(self, seqs: list[tuple[_Request, _Sequence]], drafts: list[list[int]]) -> None:
        """One call over each sequence's last token and draft; accept the draft while the token drawn from
        the target's logits at each position equals it (Leviathan et al.'s rule for a draft that is one
        token with certainty: accept with probability p(draft); on rejection the drawn token is a sample
        of p without the draft), then pop the rejected tokens off the KV cache."""
        chunks = [[seq.last_token] + draft for (_, seq), draft in zip(seqs, drafts)]
        masks = self._start_masks([(row, seq) for row, (_, seq) in enumerate(seqs)])
        logits = self.model.forward_verify([s.seq_id for _, s in seqs], chunks)
        for (_, seq), chunk in zip(seqs, chunks):
            seq.kv_len += len(chunk)
        self._refresh_pages()
        self._counters["decode_steps"] += 1
        self._counters["decode_sequences"] += len(seqs)
        self._batch_sizes[len(seqs)] += 1
        failed: dict[int, tuple[_Request, BaseException]] = {}
        offset = 0
        for row, ((request, seq), draft) in enumerate(zip(seqs, drafts)):
            first, offset = offset, offset + len(draft) + 1
            if id(request) in failed:
                continue
            try:
                mask = self._mask_for(masks, row, seq)
                accepted = 0
                for i in range(len(draft) + 1):
                    token, logprob = self._sample(request, seq, logits[first + i], mask)
                    request.stats.decode_tokens += 1
                    self._accept(request, seq, token, logprob)
                    if i == len(draft) or token != draft[i] or seq.finish_reason is not None:
                        break
                    accepted += 1
                request.stats.draft_tokens += len(draft)
                request.stats.accepted_tokens += accepted
                if draft:  # transformers' "heuristic" schedule: +2 after a fully accepted draft, else -1
                    current = seq.draft_len or self.speculative_tokens
                    seq.draft_len = min(current + 2, self.speculative_tokens) if accepted == len(draft) \
                        else max(current - 1, 1)
                self._counters["spec_draft_tokens"] += len(draft)
                self._counters["spec_accepted_tokens"] += accepted
                if seq.finish_reason is None:
                    self._rollback(request, seq)
                    if seq.draft is not None:
                        self.draft.rollback(seq.draft, request.prompt + seq.tokens)
            except Exception as exc:  # this request's host-side work failed: it fails alone
                failed[id(request)] = (request, exc)
        self._after_step(seqs, failed)

    def _rollback(self, request: _Request, seq: _Sequence) -> None:
        """Pop what the KV holds beyond the prompt and every generated token but the last (rejected drafts)."""
        excess = seq.kv_len - (len(request.prompt) + len(seq.tokens) - 1)
        if excess > 0:
            self.model.popn(seq.seq_id, excess)
            seq.kv_len -= excess

    def _sample(self, request: _Request, seq: _Sequence, logits: np.ndarray,
                mask: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[int, TokenLogprob | None]:
        fail_at = request.config.debug_fail_at_token
        if fail_at is not None and len(seq.tokens) >= fail_at:
            raise RuntimeError(f"debug_fail_at_token={fail_at}: request {request.request_id} fails here")
        return sample_next(seq, request.config.sampling, logits, mask)

    def _accept(self, request: _Request, seq: _Sequence, token: int, logprob: TokenLogprob | None) -> None:
        """Record a sampled token: stop tokens, text (held back at possible stop strings), limits."""
        seq.tokens.append(token)
        seq.last_token = token
        seq.history.add(token)
        request.stats.completion_tokens += 1
        delta = seq.pending = seq.pending or SequenceDelta(seq.index)
        delta.token_ids.append(token)
        if logprob is not None:
            delta.logprobs.append(logprob)
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            # cannot happen with the mask applied; end the choice rather than emit what breaks the grammar
            logger.error("request %s: token %d does not match its grammar", request.request_id, token)
            self._end_sequence(request, seq, "stop")
            return
        if token in self._stop_ids(request.config):
            self._end_sequence(request, seq, "stop")
            return
        delta.text += seq.stopper.feed(seq.decoder.add(token))
        if seq.stopper.stopped or (seq.matcher is not None and seq.matcher.is_terminated()):
            self._end_sequence(request, seq, "stop")
        elif len(seq.tokens) >= request.max_tokens or \
                len(request.prompt) + len(seq.tokens) >= self.context_window_size:
            self._end_sequence(request, seq, "length")

    def _end_sequence(self, request: _Request, seq: _Sequence, reason: str) -> None:
        """Finish one choice: free its KV pages now, or keep them in the prefix cache."""
        delta = seq.pending = seq.pending or SequenceDelta(seq.index)
        if reason != "abort" and not seq.stopper.stopped:
            delta.text += seq.stopper.feed(seq.decoder.flush())
            delta.text += seq.stopper.flush()
        delta.finish_reason = seq.finish_reason = reason
        self._release(request, seq, cache=reason != "abort")
        self._refresh_pages()

    def _release(self, request: _Request, seq: _Sequence, cache: bool) -> None:
        """Drop a sequence from the KV cache, or hand it to the prefix cache (what its KV holds: the prompt
        and every generated token but the last, which was never fed). Choices of n > 1 share pages with a
        fork at their very end, so they are not cached."""
        self._drop_draft(seq)
        tokens = request.prompt + seq.tokens[:-1]
        if cache and seq.kv_len > len(tokens):  # it ended inside a verified draft: drop the rest first
            self._rollback(request, seq)
        if not cache or self.prefix_cache is None or request.config.n > 1 or seq.kv_len != len(tokens) \
                or self.prefix_cache.match(tokens)[1] >= len(tokens):  # a longer cached one covers it
            self.model.remove_sequence(seq.seq_id)
            return
        for redundant in self.prefix_cache.insert(seq.seq_id, tokens):
            self.model.remove_sequence(redundant)

    def _refresh_pages(self) -> None:
        held = self.model.total_pages - self.model.available_pages()
        # pages of live sequences (an upper bound: forks share pages); the rest is held by the prefix cache
        live = sum(-(-s.kv_len // self.model.page_size) for r in self._prefilling + self._running for s in r.live)
        self._pages_in_use = min(held, live)
        self._pages_cached = held - self._pages_in_use

    def _emit(self, request: _Request) -> None:
        deltas = [s.pending for s in request.seqs if s.pending is not None]
        for seq in request.seqs:
            seq.pending = None
        if deltas:
            request.callback(RequestOutput(request.request_id, deltas))

    def _finish_request(self, request: _Request, reason: str | None = None) -> None:
        if request.admitted:
            self._free_slots += request.config.n
        request.stats.finish = time.perf_counter()
        self._counters["completion_tokens"] += request.stats.completion_tokens
        self._counters["aborted" if reason == "abort" else "finished"] += 1
        deltas = [SequenceDelta(i, finish_reason="abort") for i in range(request.config.n)] if reason else []
        request.callback(RequestOutput(request.request_id, deltas, finished=True, stats=request.stats))

    def _fail_request(self, request: _Request, exc: BaseException) -> None:
        """Fail one request (already out of the prefilling/running lists) and free its pages."""
        logger.error("request %s failed: %r", request.request_id, exc)
        for seq in request.live:
            self._discard(seq)
            seq.finish_reason = "abort"
        if request.admitted:
            self._free_slots += request.config.n
        request.stats.finish = time.perf_counter()
        self._counters["failed"] += 1
        try:
            request.callback(RequestOutput(request.request_id, [], finished=True, stats=request.stats, error=exc))
        except Exception:
            logger.exception("request %s: callback failed", request.request_id)

    def _fail_all(self, exc: BaseException, aborted: bool = False) -> None:
        """Fail every request in flight (after an error in a model call, or at shutdown) and free the cache."""
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        for request in list(self._waiting) + self._prefilling + self._running:
            for seq in request.live:
                self._discard(seq)
                seq.finish_reason = "abort"
            self._counters["aborted" if aborted else "failed"] += 1
            request.callback(RequestOutput(request.request_id, [], finished=True, stats=request.stats, error=exc))
        self._waiting.clear()
        self._prefilling.clear()
        self._running.clear()
        if self.prefix_cache is not None:  # its sequences may be inconsistent too
            for seq_id in self.prefix_cache.seq_ids():
                self.prefix_cache.remove(seq_id)
                try:
                    self.model.remove_sequence(seq_id)
                except Exception:
                    pass
        self._free_slots = self.max_batch_size
