"""Perplexity of a bundle on a text, computed the way llama.cpp's ``llama-perplexity`` computes it, so that
the numbers compare with llama.cpp's (and with any engine given the same tokens and chunks).

The text is tokenized once, with the tokenizer's special tokens (a BOS where the tokenizer adds one).

* Default: the tokens are cut into non-overlapping chunks of ``ctx`` (a tail shorter than ``ctx`` is
  dropped); each chunk is evaluated from an empty KV cache, its first token replaced by the BOS when the
  tokenizer adds one, and only its second half is scored: the logits at positions ``ctx/2 .. ctx-2``
  predict the tokens at ``ctx/2+1 .. ctx-1``, so every scored token has at least ``ctx/2`` tokens of
  context. llama.cpp needs at least ``2*ctx`` tokens, and so does this.
* ``stride`` (llama-perplexity ``--ppl-stride``): windows of ``ctx`` tokens starting every ``stride``
  tokens, the last ``stride`` positions of each scored; as in llama.cpp, no BOS substitution.

PPL is ``exp`` of the mean negative log-likelihood over every scored token; its ± is llama.cpp's standard
error (``ppl * sqrt(var(nll) / (n - 1))``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel


class PerplexityError(ValueError):
    """The text or the settings cannot give a perplexity (too few tokens, ctx past the context window)."""


@dataclass(frozen=True)
class Chunk:
    """``tokens[start:start+ctx]`` evaluated from an empty cache; the logits at chunk positions
    ``first .. ctx-2`` score the tokens that follow them."""

    start: int
    ctx: int
    first: int

    @property
    def positions(self) -> range:
        return range(self.first, self.ctx - 1)

    def targets(self, tokens: Sequence[int]) -> list[int]:
        return list(tokens[self.start + self.first + 1: self.start + self.ctx])


def plan_chunks(n_tokens: int, ctx: int, stride: int = 0, max_chunks: int | None = None) -> list[Chunk]:
    """The chunks llama-perplexity evaluates for ``n_tokens`` tokens (``stride`` 0: its default mode)."""
    if ctx < 4:
        raise PerplexityError(f"ctx must be at least 4 (got {ctx})")
    if stride < 0 or stride >= ctx:
        raise PerplexityError(f"stride must be between 1 and ctx - 1 = {ctx - 1} (got {stride})")
    if stride == 0:
        if n_tokens < 2 * ctx:
            raise PerplexityError(f"the text has {n_tokens} tokens; a context of {ctx} needs at least {2 * ctx} "
                                  "(a longer text, or a smaller ctx)")
        chunks = [Chunk(i * ctx, ctx, ctx // 2) for i in range(n_tokens // ctx)]
    else:
        if n_tokens <= ctx:
            raise PerplexityError(f"the text has {n_tokens} tokens; a context of {ctx} needs more than {ctx}")
        count = (n_tokens - ctx + stride - 1) // stride
        chunks = [Chunk(i * stride, ctx, ctx - stride - 1) for i in range(count)]
    return chunks[:max_chunks] if max_chunks else chunks


def token_nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood (float64) of each target under its row of logits [n, vocab]."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(x).sum(axis=1))
    return log_z - x[np.arange(len(targets)), np.asarray(targets)]


class PerplexityResult(BaseModel):
    model: str
    quantization: str
    device: str
    ctx: int
    stride: int  # 0: non-overlapping chunks, the second half of each scored
    text_tokens: int
    chunks: int
    scored_tokens: int
    ppl: float
    ppl_error: float  # llama.cpp's ±: standard error of the mean NLL, times ppl
    mean_nll: float
    seconds: float
    tokens_per_second: float  # evaluated (not only scored) tokens per second


class NllStats:
    """Running sums of the scored tokens' NLL, as llama.cpp keeps them."""

    def __init__(self) -> None:
        self.total = self.total2 = 0.0
        self.count = 0

    def add(self, nll: np.ndarray) -> None:
        self.total += float(nll.sum())
        self.total2 += float((nll * nll).sum())
        self.count += int(nll.size)

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def ppl(self) -> float:
        return math.exp(self.mean)

    @property
    def ppl_error(self) -> float:
        variance = self.total2 / self.count - self.mean ** 2
        return self.ppl * math.sqrt(variance / (self.count - 1)) if variance > 0 and self.count > 1 else 0.0


# (chunk token ids, chunk positions to score) -> logits [len(positions), vocab] at those positions
ChunkLogits = Callable[[list[int], range], np.ndarray]
# (chunks done, chunks in all, running PPL)
OnChunk = Callable[[int, int, float], None]


def evaluate(chunk_logits: ChunkLogits, tokens: Sequence[int], ctx: int, stride: int = 0, bos: int | None = None,
             max_chunks: int | None = None, on_chunk: OnChunk | None = None) -> tuple[NllStats, list[Chunk]]:
    """Score ``tokens`` chunk by chunk with any engine's logits: the one place that decides what is
    evaluated and what is scored (the benchmark gives transformers and llama.cpp the same chunks)."""
    chunks = plan_chunks(len(tokens), ctx, stride, max_chunks)
    stats = NllStats()
    for done, chunk in enumerate(chunks, 1):
        ids = list(tokens[chunk.start: chunk.start + ctx])
        if bos is not None and stride == 0:
            ids[0] = bos
        logits = chunk_logits(ids, chunk.positions)
        stats.add(token_nll(logits, chunk.targets(tokens)))
        if on_chunk is not None:
            on_chunk(done, len(chunks), stats.ppl)
    return stats, chunks


def bos_token(tokenizer: Any) -> int | None:
    """The token the tokenizer puts before a text when it adds special tokens (llama.cpp's add_bos), or None."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    special = tokenizer.encode("a", add_special_tokens=True)
    return special[0] if len(special) > len(plain) and special[1:] == plain[: len(special) - 1] else None


def compiled_model_logits(model: Any, prefill_chunk_size: int, max_logits: int) -> ChunkLogits:
    """Logits of a :class:`~.engine.CompiledModel` for one chunk, from an empty sequence. The library's
    ``batch_prefill`` returns at most ``max_logits`` rows per call (its memory plan bounds them by the
    max batch size): the unscored head of the chunk goes in pieces of ``prefill_chunk_size``, the scored
    part in pieces of ``max_logits`` tokens with the logits of each. The chunk's last token is never fed:
    no scored logit depends on it."""

    def chunk_logits(ids: list[int], positions: range) -> np.ndarray:
        rows = []
        model.add_sequence(0)
        try:
            begin = 0
            while begin < positions.stop:
                if begin < positions.start:
                    size = min(prefill_chunk_size, positions.start - begin)
                    model.forward_prefill_at(0, ids[begin: begin + size], [size - 1])
                else:
                    size = min(max_logits, prefill_chunk_size, positions.stop - begin)
                    rows.append(model.forward_prefill_at(0, ids[begin: begin + size], list(range(size))))
                begin += size
        finally:
            model.remove_sequence(0)
        return np.concatenate(rows)

    return chunk_logits


def perplexity(bundle_or_recipe: str | os.PathLike, text: str, ctx: int | None = None, stride: int = 0,
               device: str = "auto", quantization: str | None = None, max_chunks: int | None = None,
               build: Any = False, verify: bool = True, on_chunk: OnChunk | None = None) -> PerplexityResult:
    """Perplexity of a bundle (or a recipe's bundle; ``build`` as :meth:`.bundle.Bundle.open`) on ``text``,
    tokenized by the bundle's tokenizer. ``ctx`` defaults to 512 (llama.cpp's usual setting), or the
    context window when smaller."""
    from .bundle import Bundle
    from .tokenizer import Tokenizer

    bundle = Bundle.open(bundle_or_recipe, device, verify=verify, quantization=quantization, build=build)
    tokenizer = Tokenizer(bundle.path)
    tokens = tokenizer.encode(text, add_special_tokens=True)
    return perplexity_of_tokens(bundle, tokens, ctx, stride, bos_token(tokenizer), max_chunks, on_chunk)


def perplexity_of_tokens(bundle: Any, tokens: Sequence[int], ctx: int | None = None, stride: int = 0,
                         bos: int | None = None, max_chunks: int | None = None,
                         on_chunk: OnChunk | None = None) -> PerplexityResult:
    """Perplexity of an opened :class:`~.bundle.Bundle` on given token ids (a benchmark gives every
    engine the same ones); ``bos`` replaces each chunk's first token, as llama.cpp does."""
    from .engine import CompiledModel

    cc = bundle.chat_config
    ctx = ctx or min(512, cc.context_window_size)
    if ctx > cc.context_window_size:
        raise PerplexityError(f"ctx {ctx} is larger than the bundle's context window ({cc.context_window_size})")
    plan_chunks(len(tokens), ctx, stride, max_chunks)  # a text too short fails before the model loads
    page = cc.page_size
    model = CompiledModel(bundle, max_batch_size=1, kv_cache_tokens=-(-ctx // page) * page,
                          prefill_chunk_size=cc.prefill_chunk_size, page_size=page)
    started = time.perf_counter()
    stats, chunks = evaluate(compiled_model_logits(model, model.max_chunk_tokens, cc.max_batch_size), tokens, ctx,
                             stride, bos, max_chunks, on_chunk)
    seconds = time.perf_counter() - started
    return PerplexityResult(
        model=bundle.name, quantization=cc.quantization, device=str(bundle.device), ctx=ctx, stride=stride,
        text_tokens=len(tokens), chunks=len(chunks), scored_tokens=stats.count, ppl=stats.ppl,
        ppl_error=stats.ppl_error, mean_nll=stats.mean, seconds=seconds,
        tokens_per_second=len(chunks) * ctx / seconds if seconds > 0 else 0.0)
