"""Constrained decoding with xgrammar: what a request's output must match, compiled once per request,
matched per sequence, and turned into a token mask per decode step.

The pieces, in the order a constrained request meets them:

* :class:`Constraint` — what the output must match, in one of xgrammar's source languages: a JSON
  schema, an EBNF grammar (GBNF-compatible), a regular expression, or a structural tag (xgrammar's
  JSON description of text with tagged, constrained regions, used for tool calls).
  :func:`response_format_constraint` builds one from OpenAI's ``response_format`` (and the
  extensions other servers accept, see :func:`request_constraint`).
* :class:`GrammarCompiler` — one per bundle: xgrammar's tokenizer info (built from the bundle's
  ``tokenizer.json`` once, ~0.1 s for a 49k vocabulary) and a compiler with a cache; bad schemas
  and grammars come back as :class:`ConstraintError` naming the request field.
* :func:`new_matcher` — one ``GrammarMatcher`` per sequence; the engine advances it with every
  sampled token; its termination ends the sequence.
* :class:`TokenMasker` — the engine's bitmask rows: filled on a worker thread while the model
  step runs (the mask for step t+1 needs only the tokens up to step t), or right away when the last
  fill was quicker than the hand-off, then applied to each constrained row of logits (disallowed
  tokens get -inf) before sampling.

xgrammar (and the torch it imports) is loaded on the first constrained request, not before:
unconstrained serving never pays for it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .protocol import RequestError
from .tokenizer import Tokenizer

ConstraintKind = Literal["json_schema", "ebnf", "regex", "structural_tag"]
MAX_CONSTRAINT_CHARS = 256 * 1024  # a schema or grammar larger than this is refused, not compiled
# Compile time grows faster than linearly with a schema's nesting (400 nested objects: 15 s of a core);
# OpenAI allows 10 levels of objects, each two JSON levels deep ({"properties": {...}}).
MAX_SCHEMA_DEPTH = 200
# JSON inside structural tags (tool-call arguments) may hold one whitespace character between tokens:
# unbounded whitespace lets small models loop on newlines forever.
TAG_JSON_MAX_WHITESPACE = 1


class ConstraintError(RequestError):
    """A schema, grammar or tool definition that cannot be compiled (HTTP 400, naming the field)."""

    def __init__(self, message: str, param: str = "response_format", code: str = "invalid_value"):
        super().__init__(message, param, code)


@dataclass(frozen=True)
class Constraint:
    """What the output must match. ``source``: the schema or structural tag as JSON text, or the EBNF
    or regex text. ``param``: the request field it came from (named in errors)."""

    kind: ConstraintKind
    source: str
    param: str = "response_format"

    @classmethod
    def json_schema(cls, schema: Any, param: str = "response_format") -> Constraint:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema), param)

    def as_format(self) -> dict[str, Any]:
        """This constraint as a structural-tag format, to combine it with others (``or``, ``sequence``)."""
        if self.kind == "json_schema":
            return {"type": "json_schema", "json_schema": _load_json(self.source, self.param),
                    "max_whitespace_cnt": TAG_JSON_MAX_WHITESPACE}
        if self.kind == "ebnf":
            return {"type": "grammar", "grammar": self.source}
        if self.kind == "regex":
            return {"type": "regex", "pattern": self.source}
        tag = _load_json(self.source, self.param)
        if "format" not in tag:
            raise ConstraintError("a structural tag with 'structures' and 'triggers' cannot be combined with "
                                  "tool calls; use the 'format' form", self.param)
        return tag["format"]


def either(first: Constraint, second: Constraint) -> Constraint:
    """Output matching ``first`` or ``second`` (a structural tag ``or``)."""
    fmt = {"type": "or", "elements": [first.as_format(), second.as_format()]}
    return Constraint("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}), first.param)


def _load_json(text: str, param: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConstraintError(f"{param} is not valid JSON: {exc}", param) from None


# ----------------------------------------------------------------------------------------------
# Requests -> Constraint
# ----------------------------------------------------------------------------------------------

ANY_JSON_OBJECT = {"type": "object"}


def response_format_constraint(fmt: Any) -> Constraint | None:
    """OpenAI's ``response_format`` (a :class:`~.protocol.ResponseFormat`) as a constraint; None for text.

    ``json_object``: any JSON object (or the schema MLC LLM's ``schema`` field gives);
    ``json_schema``: OpenAI's ``{"json_schema": {"name", "schema", "strict"}}``; ``grammar``: EBNF;
    ``regex``; ``structural_tag``: xgrammar's ``{"format": ...}`` or the ``structures``/``triggers``
    form vLLM and SGLang accept.
    """
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint.json_schema(fmt.schema_ if fmt.schema_ is not None else ANY_JSON_OBJECT)
    if fmt.type == "json_schema":
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
        return Constraint.json_schema(ANY_JSON_OBJECT if schema is None else schema)
    if fmt.type == "grammar":
        return Constraint("ebnf", fmt.grammar)
    if fmt.type == "regex":
        return Constraint("regex", fmt.regex)
    tag = {k: v for k, v in fmt.model_dump(by_alias=True, exclude_none=True).items()
           if k in ("type", "format", "structures", "triggers")}
    return Constraint("structural_tag", json.dumps(tag))


def request_constraint(request: Any) -> Constraint | None:
    """The one constraint a chat request asks for: ``response_format``, or vLLM's ``guided_json``,
    ``guided_regex``, ``guided_grammar``, ``guided_choice`` or ``structured_outputs`` (its ``json``,
    ``json_object``, ``regex``, ``grammar``, ``choice`` or ``structural_tag``; its options are ignored)."""
    found: list[Constraint] = []
    if (c := response_format_constraint(request.response_format)) is not None:
        found.append(c)
    given = {"guided_json": ("json", request.guided_json), "guided_regex": ("regex", request.guided_regex),
             "guided_grammar": ("grammar", request.guided_grammar), "guided_choice": ("choice", request.guided_choice)}
    for key, value in (request.structured_outputs or {}).items():
        if key in ("json", "json_object", "regex", "grammar", "choice", "structural_tag"):
            given[f"structured_outputs.{key}"] = (key, value)
    for param, (kind, value) in given.items():
        if value is not None and value is not False:
            found.append(_vllm_constraint(kind, value, param))
    if len(found) > 1:
        raise ConstraintError(f"{found[0].param} and {found[1].param} both constrain the output; give one",
                              found[1].param)
    return found[0] if found else None


def _vllm_constraint(kind: str, value: Any, param: str) -> Constraint:
    if kind == "json":
        return Constraint.json_schema(value, param)
    if kind == "json_object":
        return Constraint.json_schema(ANY_JSON_OBJECT, param)
    if kind == "choice":
        return _choice(value, param)
    if kind == "structural_tag":
        return Constraint("structural_tag", value if isinstance(value, str) else json.dumps(value), param)
    if not isinstance(value, str):
        raise ConstraintError(f"{param} must be a string", param)
    return Constraint("regex" if kind == "regex" else "ebnf", value, param)


def _choice(options: Any, param: str) -> Constraint:
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise ConstraintError(f"{param} must be a non-empty list of strings", param)
    return Constraint("ebnf", "root ::= " + " | ".join(ebnf_literal(o) for o in options), param)


def ebnf_literal(text: str) -> str:
    """``text`` as an EBNF string literal (JSON's escapes are EBNF's)."""
    return json.dumps(text, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------

_XGRAMMAR_NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _clean(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = _XGRAMMAR_NOISE.sub("", lines[0] if lines else type(exc).__name__)
    return text.rstrip(".")


def load_xgrammar() -> Any:
    """Import xgrammar (it imports torch and transformers: seconds, the first time)."""
    import xgrammar

    return xgrammar


class GrammarCompiler:
    """xgrammar's tokenizer info and grammar compiler for one bundle; thread-safe, built lazily."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self._lock = threading.Lock()
        self._compiler: Any = None

    def _get(self) -> Any:
        with self._lock:
            if self._compiler is None:
                xgr = load_xgrammar()
                from transformers import PreTrainedTokenizerFast

                hf = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.inner,
                                             eos_token=self.tokenizer.eos_token)
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=list(self.stop_token_ids) or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
            return self._compiler

    def warm(self) -> None:
        """Load xgrammar and build the tokenizer info now (a server does it in the background)."""
        self._get()

    def compile(self, constraint: Constraint) -> Any:
        """The compiled grammar (cached by xgrammar); :class:`ConstraintError` for bad input."""
        if len(constraint.source) > MAX_CONSTRAINT_CHARS:
            raise ConstraintError(f"{constraint.param} is {len(constraint.source)} characters; at most "
                                  f"{MAX_CONSTRAINT_CHARS} are accepted", constraint.param)
        compiler = self._get()
        what = {"json_schema": "JSON schema", "ebnf": "grammar", "regex": "regex",
                "structural_tag": "structural tag"}[constraint.kind]
        try:
            if constraint.kind == "json_schema":
                schema = _load_json(constraint.source, constraint.param)
                if not isinstance(schema, (dict, bool)):
                    raise ConstraintError(f"the JSON schema in {constraint.param} must be an object",
                                          constraint.param)
                if (depth := json_depth(schema)) > MAX_SCHEMA_DEPTH:
                    raise ConstraintError(f"the JSON schema in {constraint.param} nests {depth} levels deep; at most "
                                          f"{MAX_SCHEMA_DEPTH} are accepted", constraint.param)
                return compiler.compile_json_schema(constraint.source, any_whitespace=False, strict_mode=True)
            if constraint.kind == "ebnf":
                return compiler.compile_grammar(constraint.source)
            if constraint.kind == "regex":
                return compiler.compile_regex(constraint.source)
            tag = _load_json(constraint.source, constraint.param)
            if isinstance(tag, dict) and "format" not in tag and "structures" in tag:
                xgr = load_xgrammar()
                items = [xgr.StructuralTagItem(begin=s["begin"], schema=s["schema"], end=s["end"])
                         for s in tag["structures"]]
                return compiler.compile_structural_tag(items, list(tag.get("triggers") or []))
            return compiler.compile_structural_tag(constraint.source)
        except ConstraintError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError/pydantic errors for bad input
            raise ConstraintError(f"invalid {what} in {constraint.param}: {_clean(exc)}", constraint.param) from None


def json_depth(value: Any) -> int:
    """How deep objects and arrays nest in ``value`` (iteratively: any depth is safe to measure)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def new_matcher(compiled: Any, stop_token_ids: tuple[int, ...]) -> Any:
    """A matcher for one sequence. Its stop tokens are the request's; with none (``ignore_eos``) it
    terminates as soon as the grammar is complete."""
    xgr = load_xgrammar()
    if stop_token_ids:
        return xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids))
    return xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)


# ----------------------------------------------------------------------------------------------
# Token masks
# ----------------------------------------------------------------------------------------------


# Handing masks to the worker thread costs ~0.1 ms (waking it, the GIL back and forth): a step whose
# masks took less than that to fill last time fills them on the engine thread instead.
INLINE_FILL_S = 1e-4


class TokenMasker:
    """Bitmask rows for the constrained sequences of a step: filled on a worker thread while the model
    runs (:meth:`start`), applied to logits rows before sampling (:meth:`apply`). Most masks come from
    xgrammar's cache in microseconds; those are filled right away, where a thread would cost more than
    it hides, until a fill takes longer (a state not cached yet, a large grammar)."""

    def __init__(self, vocab_size: int, rows: int):
        self.vocab_size = vocab_size
        self.bitmask = np.full((rows, -(-vocab_size // 32)), -1, dtype=np.int32)
        self._restricts = [False] * rows
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlcbuild-masks")
        self._last_fill_s = float("inf")  # unknown: overlap the first one

    def start(self, rows: list[tuple[int, Any]]) -> Future | None:
        """Fill row ``i`` with matcher ``m``'s next-token mask for each ``(i, m)`` (in the background
        unless the last fill was quicker than a hand-off); ``.result()`` of the answer waits for it."""
        if not rows:
            return None
        if self._last_fill_s < INLINE_FILL_S:
            done: Future = Future()
            self._fill(rows)
            done.set_result(None)
            return done
        return self._worker.submit(self._fill, rows)

    def _fill(self, rows: list[tuple[int, Any]]) -> None:
        start = time.perf_counter()
        for row, matcher in rows:
            self._restricts[row] = matcher.fill_next_token_bitmask(self.bitmask, row)
        self._last_fill_s = time.perf_counter() - start

    def apply(self, logits: np.ndarray, row: int) -> np.ndarray:
        """``logits`` with the tokens row ``row`` disallows set to -inf (in place)."""
        if self._restricts[row]:
            allowed = np.unpackbits(self.bitmask[row].view(np.uint8), count=self.vocab_size, bitorder="little")
            logits[: self.vocab_size][allowed == 0] = -np.inf
            logits[self.vocab_size:] = -np.inf
        return logits

    def close(self) -> None:
        self._worker.shutdown(wait=False)
