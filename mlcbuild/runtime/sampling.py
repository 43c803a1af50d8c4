"""Turning one row of logits into the next token (numpy, on the host).

The steps, in order, each a small function:

1. :func:`apply_penalties` — repetition penalty (HF/CTRL style, over prompt and output tokens), then
   OpenAI's frequency and presence penalties (over output tokens only), then ``logit_bias``.
2. :func:`token_logprobs` — log-softmax of the penalized logits, *before* temperature/top-k/top-p, as
   OpenAI reports them; only computed when the request asks for logprobs.
3. :func:`sample` — greedy when ``temperature == 0``; otherwise temperature, top-k, top-p, and one draw
   from the request's own :class:`numpy.random.Generator` (so a seed gives the same tokens every time).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

GREEDY_TEMPERATURE = 1e-5
LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # <= 0: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(
            self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0 or self.logit_bias
        )


def make_rng(seed: int | None, index: int = 0) -> np.random.Generator:
    """The generator for choice ``index`` of a request: seeded ones are reproducible, distinct per choice."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, index])


@dataclass
class TokenHistory:
    """What penalties look at: the prompt's distinct tokens and counts of the generated ones."""

    prompt: frozenset[int]
    output: Counter = field(default_factory=Counter)

    @classmethod
    def of_prompt(cls, prompt_ids: list[int]) -> TokenHistory:
        return cls(prompt=frozenset(prompt_ids))

    def add(self, token: int) -> None:
        self.output[token] += 1


def apply_penalties(logits: np.ndarray, params: SamplingParams, history: TokenHistory) -> np.ndarray:
    """Return penalized logits (a new array when anything changes; ``logits`` itself otherwise)."""
    if not params.penalized:
        return logits
    logits = np.array(logits, dtype=np.float32, copy=True)
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = np.fromiter(history.prompt | history.output.keys(), dtype=np.int64)
        seen = seen[(seen >= 0) & (seen < vocab)]
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and history.output:
        ids = np.fromiter(history.output.keys(), dtype=np.int64)
        counts = np.fromiter(history.output.values(), dtype=np.float32)
        keep = (ids >= 0) & (ids < vocab)
        logits[ids[keep]] -= counts[keep] * params.frequency_penalty + params.presence_penalty
    for token, bias in params.logit_bias.items():
        if 0 <= token < vocab:
            logits[token] += bias
    return logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float32, copy=False) - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's logprob and the ``top`` most likely (token, logprob) pairs, best first. Tokens a
    grammar rules out (logit -inf) report ``LOGPROB_FLOOR``, as vLLM does: JSON has no -Infinity."""
    logp = np.maximum(log_softmax(logits), LOGPROB_FLOOR)
    best: list[tuple[int, float]] = []
    if top > 0:
        top = min(top, logp.shape[-1])
        idx = np.argpartition(-logp, top - 1)[:top]
        idx = idx[np.argsort(-logp[idx], kind="stable")]
        best = [(int(i), float(logp[i])) for i in idx]
    return float(logp[token]), best


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def _top_k_mask(x: np.ndarray, k: int) -> np.ndarray:
    if 0 < k < x.shape[-1]:
        kth = np.partition(x, -k)[-k]
        x = np.where(x < kth, -np.inf, x)
    return x


def _top_p_filter(probs: np.ndarray, top_p: float) -> np.ndarray:
    if top_p >= 1.0:
        return probs
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    cumulative = np.cumsum(sorted_probs)
    keep = (cumulative - sorted_probs) < top_p  # the smallest prefix whose mass reaches top_p
    keep[0] = True
    filtered = np.zeros_like(probs)
    filtered[order[keep]] = sorted_probs[keep]
    return filtered / filtered.sum()


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick the next token from (already penalized) logits."""
    if params.greedy:
        return int(np.argmax(logits))
    x = logits.astype(np.float32, copy=False) / np.float32(params.temperature)
    x = _top_k_mask(x, params.top_k)
    probs = _top_p_filter(_softmax(x).astype(np.float64), params.top_p)
    cdf = np.cumsum(probs)
    token = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(token, probs.shape[-1] - 1)
