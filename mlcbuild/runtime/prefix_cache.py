"""Prefix cache: finished sequences stay in the paged KV cache so that a new request whose prompt starts
with their tokens forks them instead of prefilling that prefix again (MLC LLM's ``prefix_cache_mode``,
vLLM's automatic prefix caching, SGLang's RadixAttention).

The cache is a radix tree over token ids: each cached sequence is a leaf path; a lookup walks the tree
along the prompt and returns the deepest cached sequence under the matched node, and how many tokens
it shares with the prompt. The engine forks that sequence (``kv_state_fork_sequence`` at that position;
the shared pages are reference-counted by TVM's PagedKVCache, so evicting a cached sequence later never
frees a page a running request still reads) and prefills only the rest.

Eviction is least-recently-used over whole cached sequences: a hit refreshes its sequence.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class _Node:
    children: dict[int, _Edge] = field(default_factory=dict)
    seqs: set[int] = field(default_factory=set)  # cached sequences whose tokens pass through this node


@dataclass
class _Edge:
    tokens: list[int]
    node: _Node


class PrefixCache:
    """Token-id radix tree over the sequences kept in the KV cache, with LRU order."""

    def __init__(self) -> None:
        self._root = _Node()
        self._lru: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # seq_id -> its tokens in the KV

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._lru

    def seq_ids(self) -> list[int]:
        """Cached sequences, least recently used first."""
        return list(self._lru)

    def tokens(self, seq_id: int) -> tuple[int, ...]:
        return self._lru[seq_id]

    def match(self, tokens: list[int]) -> tuple[int | None, int]:
        """The cached sequence sharing the longest prefix with ``tokens``, and that prefix's length."""
        node, depth, best = self._root, 0, (None, 0)
        while True:
            if node.seqs and depth:
                best = (next(iter(node.seqs)), depth)
            if depth >= len(tokens):
                break
            edge = node.children.get(tokens[depth])
            if edge is None:
                break
            common = _common_prefix(edge.tokens, tokens, depth)
            if common < len(edge.tokens):  # ends inside the edge: every sequence below shares depth + common
                if common and edge.node.seqs:
                    best = (next(iter(edge.node.seqs)), depth + common)
                break
            node, depth = edge.node, depth + common
        return best

    def touch(self, seq_id: int) -> None:
        self._lru.move_to_end(seq_id)

    def insert(self, seq_id: int, tokens: list[int]) -> list[int]:
        """Cache ``seq_id`` holding ``tokens``; returns the cached sequences it makes redundant (a strict
        prefix of it: every lookup they would answer, it answers as well), already dropped from the tree."""
        redundant = [s for s, t in self._lru.items() if len(t) <= len(tokens) and tuple(tokens[:len(t)]) == t]
        for s in redundant:
            self.remove(s)
        key = tuple(tokens)
        self._lru[seq_id] = key
        node, depth = self._root, 0
        node.seqs.add(seq_id)
        while depth < len(key):
            edge = node.children.get(key[depth])
            if edge is None:
                leaf = _Node(seqs={seq_id})
                node.children[key[depth]] = _Edge(list(key[depth:]), leaf)
                break
            common = _common_prefix(edge.tokens, list(key), depth)
            if common < len(edge.tokens):  # split the edge at the divergence
                middle = _Node(seqs=set(edge.node.seqs))
                middle.children[edge.tokens[common]] = _Edge(edge.tokens[common:], edge.node)
                edge.tokens, edge.node = edge.tokens[:common], middle
            edge.node.seqs.add(seq_id)
            node, depth = edge.node, depth + common
        return redundant

    def oldest(self, exclude: int | None = None) -> int | None:
        return next((s for s in self._lru if s != exclude), None)

    def remove(self, seq_id: int) -> None:
        key = self._lru.pop(seq_id)
        node, depth = self._root, 0
        node.seqs.discard(seq_id)
        while depth < len(key):
            edge = node.children[key[depth]]
            edge.node.seqs.discard(seq_id)
            if not edge.node.seqs:  # nothing cached below any more
                del node.children[key[depth]]
                return
            node, depth = edge.node, depth + len(edge.tokens)


def _common_prefix(edge: list[int], tokens: list[int], start: int) -> int:
    n = min(len(edge), len(tokens) - start)
    i = 0
    while i < n and edge[i] == tokens[start + i]:
        i += 1
    return i
