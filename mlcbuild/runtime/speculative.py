"""Where speculative tokens come from: prompt lookup (the sequence's own n-grams) or a draft model.

The engine verifies a sequence's draft in one prefill-like call of the target model and keeps the tokens
the target itself draws (``Engine._verify_step``); this module only proposes. Both proposers are
deterministic (the draft model drafts greedily), so the target's accept rule "draw from the target's
distribution; keep going while the draw equals the draft" is Leviathan et al.'s rejection sampling for a
draft distribution that is one token with certainty: accept with probability p(draft), and on rejection
the draw is a sample of p without the draft. Every emitted token is therefore a draw from the target
with the sequence's own generator, and greedy or seeded outputs equal the non-speculative run's token for
token (a stochastic draft would accept a little more often at high temperatures, and give up that).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def prompt_lookup(tokens: list[int], k: int, max_ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens (longest n first,
    n from ``max_ngram`` down to ``min_ngram``).

    A match of one token is weak evidence (a common word or a newline recurs everywhere): its drafts are
    mostly rejected, and a rejected draft costs the verification's extra rows. Replaying the demo's greedy
    outputs through the engine's draft schedule with measured verification costs (AMD Zen 4: 2 rows 1.35x
    a decode step, 4 rows 1.9x) gives, for n >= 2 against n >= 1: summarise 0.96x vs 0.87x, copy-edit
    1.40x vs 1.29x; with Intel's cheaper verification (1.3x) 1.05 vs 1.02 and 1.71 vs 1.61."""
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, len(arr) - 1), max(min_ngram, 1) - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # each start leaves a token after it
        starts = np.nonzero((windows == arr[-n:]).all(axis=1))[0]
        if len(starts):
            follow = starts[-1] + n
            return arr[follow: follow + k].tolist()
    return []


class DraftModelError(ValueError):
    """The draft bundle cannot draft for this engine's model (tokenizer, sizes, sliding window)."""


@dataclass
class DraftState:
    """One target sequence's twin in the draft model's KV cache."""

    seq_id: int
    fed: int = 0  # tokens of the sequence's context (prompt and accepted output) in the draft's KV cache
    tail: list[int] = field(default_factory=list)  # draft tokens fed after them, not yet verified


def tokenizer_digest(bundle_dir: Any) -> str:
    """sha256 of a bundle's tokenizer.json: a draft must map token ids to the same strings as its target."""
    return hashlib.sha256((bundle_dir / "tokenizer.json").read_bytes()).hexdigest()


def check_draft(target: Any, draft: Any, max_batch_size: int, context_window_size: int) -> None:
    """Refuse a draft bundle that cannot propose tokens for ``target`` (both runtime ``Bundle``s), naming why."""
    dcc = draft.chat_config
    name = f"draft bundle {draft.path}"
    if tokenizer_digest(draft.path) != tokenizer_digest(target.path):
        raise DraftModelError(f"{name} has another tokenizer than {target.path}: its token ids would mean other "
                              "text (a draft must come from the same model family and tokenizer)")
    if dcc.tensor_parallel_shards > 1:
        raise DraftModelError(f"{name} is built for {dcc.tensor_parallel_shards} shards; a draft runs unsharded")
    if dcc.sliding_window_size and dcc.sliding_window_size > 0:
        raise DraftModelError(f"{name} has a sliding window: its KV cache cannot roll rejected tokens back")
    if dcc.max_batch_size < max_batch_size:
        raise DraftModelError(f"{name} was compiled for batches of {dcc.max_batch_size}, the engine runs "
                              f"{max_batch_size}: lower max_batch_size or rebuild the draft")
    if dcc.context_window_size < context_window_size:
        raise DraftModelError(f"{name} has a context window of {dcc.context_window_size} tokens, the engine "
                              f"{context_window_size}: lower context_window_size or rebuild the draft")
    if draft.device.kind != target.device.kind:
        raise DraftModelError(f"{name} is for {draft.device.kind}, the model for {target.device.kind}")


class DraftModel:
    """A small model with its own paged KV cache proposing tokens for a target model's sequences.

    Each target sequence that speculates has a :class:`DraftState`. Before it drafts, the draft's cache
    catches up with the sequence's context (a new prompt at most a prefill chunk per step; afterwards the
    one or two tokens the last verification added), then drafts greedily, one batched decode call per
    position for all sequences at once. After the target verified, :meth:`rollback` pops the drafted
    tokens the target did not keep."""

    def __init__(self, model: Any, vocab_size: int, name: str):
        self.model = model  # a CompiledModel (engine.py): the same interface as the target's
        self.vocab_size = vocab_size  # ids the target knows (the draft's logits may be padded wider)
        self.name = name
        self._ids = 0

    def new_state(self) -> DraftState:
        self._ids += 1
        self.model.add_sequence(self._ids)
        return DraftState(self._ids)

    def drop(self, state: DraftState) -> None:
        self.model.remove_sequence(state.seq_id)

    def pages_for(self, state: DraftState | None, context_len: int, k: int) -> int:
        """Upper bound on the new KV pages drafting ``k`` tokens for this sequence takes."""
        fed = state.fed if state is not None else 0
        return -(-(context_len - fed + k) // self.model.page_size) + 1

    def propose(self, work: list[tuple[DraftState, list[int], int]]) -> list[list[int]]:
        """Draft ``k`` tokens for each ``(state, context, k)``: context is the sequence's prompt and every token
        generated so far (its last one not yet in any cache). A sequence still catching up drafts nothing."""
        drafts: list[list[int]] = [[] for _ in work]
        pending: dict[int, list[int]] = {}
        for i, (state, context, k) in enumerate(work):
            if k <= 0:
                continue
            assert not state.tail, "rollback() must run after each verification"
            if state.fed >= len(context):  # cannot happen after rollback(); re-feed the last token to get logits
                self.model.popn(state.seq_id, state.fed - len(context) + 1)
                state.fed = len(context) - 1
            pending[i] = context[state.fed:]
        caught_up = self._catch_up({i: (work[i][0], rest) for i, rest in pending.items()})
        last_logits = {i: row_logits for i, row_logits in caught_up.items() if row_logits is not None}
        for i, row_logits in last_logits.items():
            drafts[i].append(self._greedy(row_logits))
        while True:  # one decode call per drafted position, batched over the sequences still drafting
            more = [i for i in last_logits if len(drafts[i]) < work[i][2]]
            if not more:
                break
            logits = self.model.forward_decode([work[i][0].seq_id for i in more], [drafts[i][-1] for i in more])
            for row, i in enumerate(more):
                work[i][0].tail.append(drafts[i][-1])
                drafts[i].append(self._greedy(logits[row]))
        return drafts

    def follow(self, work: list[tuple[DraftState, list[int]]]) -> None:
        """Feed each ``(state, context)``'s tokens the draft has not seen, as the target prefills them (MLC LLM
        prefills its draft models with the target), so that the draft drafts from the first decode step on
        instead of catching a long prompt up then, a prefill chunk per step. At most one prefill chunk: the
        rest follows at the next prefill step, or at the first :meth:`propose`."""
        pending = {i: (state, context[state.fed:]) for i, (state, context) in enumerate(work)
                   if not state.tail and len(context) > state.fed}
        self._catch_up(pending)

    def _catch_up(self, pending: dict[int, tuple[DraftState, list[int]]]) -> dict[int, np.ndarray | None]:
        """Feed ``pending[i] = (state, tokens)`` in one call of at most a prefill chunk: a sequence that needs
        more (a new prompt) gets that much now and the rest on a later step, so that a long prompt does not
        stall the batch's step. The logits after each sequence fed whole (None: it got only part)."""
        budget, batch = self.model.max_chunk_tokens, []
        for i, (state, rest) in sorted(pending.items(), key=lambda item: len(item[1][1])):  # short ones first
            if budget <= 0:
                break
            batch.append((i, state, rest[:budget]))
            budget -= len(batch[-1][2])
        if not batch:
            return {}
        ids = [state.seq_id for _, state, _ in batch]
        if all(len(chunk) == 1 for _, _, chunk in batch):
            logits = self.model.forward_decode(ids, [chunk[0] for _, _, chunk in batch])
        else:
            logits = self.model.forward_prefill(ids, [chunk for _, _, chunk in batch])
        fed: dict[int, np.ndarray | None] = {}
        for row, (i, state, chunk) in enumerate(batch):
            state.fed += len(chunk)
            fed[i] = logits[row] if len(chunk) == len(pending[i][1]) else None
        return fed

    def rollback(self, state: DraftState, context: list[int]) -> None:
        """The target verified: keep the drafted tokens that are now part of ``context``, pop the rest."""
        kept = 0
        for drafted, actual in zip(state.tail, context[state.fed:]):
            if drafted != actual:
                break
            kept += 1
        self.model.popn(state.seq_id, len(state.tail) - kept)
        state.fed += kept
        state.tail = []

    def _greedy(self, logits: np.ndarray) -> int:
        return int(np.argmax(logits[: self.vocab_size]))
