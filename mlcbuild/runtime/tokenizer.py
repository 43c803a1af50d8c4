"""The bundle's tokenizer, incremental detokenization and stop strings.

* :class:`Tokenizer` wraps ``tokenizers.Tokenizer`` (``tokenizer.json``) and the special tokens named in
  ``tokenizer_config.json``.
* :class:`IncrementalDecoder` turns a growing list of token ids into text deltas. It decodes a short
  window of ids (the previous few plus the new ones) and emits only what is new, holding back output that
  ends in an incomplete UTF-8 sequence, so word-piece spaces and multi-byte characters come out right.
* :class:`StopStringMatcher` finds stop strings across delta boundaries: text that could be the start of
  a stop string is held back until it is clearly not one; on a match the text is cut before the stop.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

REPLACEMENT_CHAR = "\ufffd"


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode-to-byte map, used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


LONG_TEXT_CHARS = 1 << 14  # longer texts are encoded without holding the GIL (Tokenizer.encode)


class Tokenizer:
    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.inner = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        decoder = json.loads(self.inner.to_str()).get("decoder") or {}
        self._byte_level = decoder.get("type") == "ByteLevel" or any(
            d.get("type") == "ByteLevel" for d in decoder.get("decoders", []) if isinstance(d, dict)
        )

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.inner.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    def special_tokens(self) -> dict[str, str]:
        """The special-token strings a chat template may refer to (bos_token, eos_token, ...)."""
        names = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
        found = {name: _token_text(self.config.get(name)) for name in names}
        return {name: text for name, text in found.items() if text is not None}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:
            # tokenizers' encode holds the GIL throughout (2 s for a 1.7 MB prompt, measured: every other
            # thread, the server's event loop included, stalls); encode_batch releases it while it works.
            return self.inner.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        """How one token reads on its own (for logprobs)."""
        return self.inner.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> list[int]:
        """The raw bytes one token stands for (for logprobs' ``bytes``)."""
        piece = self.inner.id_to_token(token_id) or ""
        if self._byte_level:
            table = _byte_decoder()
            if all(ch in table for ch in piece):
                return [table[ch] for ch in piece]
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return [int(piece[3:5], 16)]
            except ValueError:
                pass
        return list(self.token_str(token_id).encode("utf-8"))


class IncrementalDecoder:
    """Detokenize a stream of ids into text deltas (the prefix/read-offset scheme used by HF TGI and vLLM)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


class StopStringMatcher:
    """Feed text deltas; get back what is safe to emit and whether a stop string was hit."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        text = self.pending + delta
        hits = [(text.find(stop), stop) for stop in self.stops]
        hits = [(pos, stop) for pos, stop in hits if pos >= 0]
        if hits:
            self.stopped = True
            self.pending = ""
            return text[: min(pos for pos, _ in hits)]
        keep = self._holdback(text)
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of generation the held-back text was not a stop string after all."""
        out, self.pending = self.pending, ""
        return "" if self.stopped else out
