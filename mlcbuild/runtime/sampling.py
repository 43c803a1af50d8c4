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


# Candidates first looked at for top-p: the nucleus of a chat model's distribution is usually a few
# tokens, and partitioning out the largest 64 of a 49k vocabulary costs a tenth of sorting it all.
NUCLEUS_CANDIDATES = 64


def _nucleus(probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The top-p nucleus: (token ids in ascending order, their probabilities), the smallest set of
    most likely tokens whose mass reaches ``top_p``, ties broken by token id as a stable full sort
    would. Looks at the largest ``NUCLEUS_CANDIDATES`` first and widens (at worst, sorts everything)
    while the nucleus might reach past them; the result is the full sort's, exactly."""
    vocab = probs.shape[-1]
    k = min(NUCLEUS_CANDIDATES, vocab)
    while True:
        if k >= vocab:
            order = np.argsort(-probs, kind="stable")
        else:
            part = np.sort(np.argpartition(-probs, k - 1)[:k])  # in id order: the stable sort breaks ties by id
            order = part[np.argsort(-probs[part], kind="stable")]
        ranked = probs[order]
        cumulative = np.cumsum(ranked)
        kept = max(1, int(np.count_nonzero((cumulative - ranked) < top_p)))
        # Exact only if the nucleus ends inside the candidates and no token outside them ties with
        # its last one (every outside token is <= the smallest candidate).
        if k >= vocab or (kept < k and ranked[kept - 1] > ranked[-1]):
            ids = np.sort(order[:kept])
            return ids, probs[ids]
        k *= 4


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick the next token from (already penalized) logits."""
    if params.greedy:
        return int(np.argmax(logits))
    x = logits.astype(np.float32, copy=False) / np.float32(params.temperature)
    x = _top_k_mask(x, params.top_k)
    probs = _softmax(x).astype(np.float64)
    ids = None
    if params.top_p < 1.0:
        ids, probs = _nucleus(probs, params.top_p)
    cdf = np.cumsum(probs)
    index = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), probs.shape[-1] - 1)
    return int(ids[index]) if ids is not None else index
