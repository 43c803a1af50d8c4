"""The Python API, shaped like the ``openai`` client: ``MLCEngine`` and ``AsyncMLCEngine``.

    from mlcbuild import MLCEngine
    with MLCEngine("dist/smollm2-135m-instruct/q4f16_1-cpu") as engine:
        for chunk in engine.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], stream=True):
            print(chunk.choices[0].delta.content or "", end="")

Both classes validate requests with the pydantic models of :mod:`.protocol`, turn them into token ids
and a :class:`~.engine.GenerationConfig` (:class:`Frontend`), submit them to the one :class:`~.engine.Engine`,
and assemble the engine's deltas into OpenAI-shaped chunks or whole responses (:class:`ChatAssembler`,
:class:`CompletionAssembler`). The REST server uses the same pieces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from . import protocol as p
from .bundle import Bundle, BuildHook, recipe_fields
from .conversation import ChatTemplate, load_chat_template
from .engine import Engine, GenerationConfig, RequestOutput, RequestStats, SequenceDelta, TokenLogprob
from .sampling import SamplingParams
from .speculative import DraftModelError
from .structured import Constraint, ConstraintError, GrammarCompiler, request_constraint
from .tokenizer import Tokenizer
from .tools import ToolCallParser, ToolPlan, tool_syntax


class EngineError(RuntimeError):
    """Generation failed inside the engine (the cause is chained)."""


# ----------------------------------------------------------------------------------------------
# Requests -> (prompt token ids, GenerationConfig)
# ----------------------------------------------------------------------------------------------


def speculation_for(model: str | os.PathLike, bundle: Bundle, mode: str | None, tokens: int | None,
                    draft: str | os.PathLike | None, draft_quantization: str | None
                    ) -> tuple[str, int, str | os.PathLike | None, str | None]:
    """(mode, tokens, draft, draft quantization) for an engine: what the caller said, else what a recipe's
    ``speculative:`` section says (its draft is the recipe's bundle of ``draft_quantization``; that bundle
    itself runs without one), else off. A draft given without a mode means mode ``draft``."""
    section: dict[str, Any] = {}
    if mode is None and draft is None and Path(model).expanduser().is_file():
        section = recipe_fields(Path(model).expanduser()).get("speculative") or {}
        if section.get("mode") == "draft":
            if section.get("draft_quantization") == bundle.manifest.quantization:
                section = {}
            else:
                draft, draft_quantization = model, section.get("draft_quantization")
    mode = mode or ("draft" if draft is not None else section.get("mode", "off"))
    if mode == "draft" and draft is None:
        raise DraftModelError("speculative_mode 'draft' needs a draft model: a bundle or recipe (--draft), or a "
                              "recipe whose speculative section names draft_quantization")
    if mode != "draft" and draft is not None:
        raise DraftModelError(f"a draft model was given with speculative_mode {mode!r}; drafts go with mode 'draft'")
    return mode, tokens or int(section.get("tokens") or 4), draft, draft_quantization


class Frontend:
    """An opened bundle with its engine, tokenizer and chat template: what every front end shares."""

    def __init__(self, model: str | os.PathLike, device: str = "auto", *, conv_template: str | None = None,
                 max_batch_size: int | None = None, context_window_size: int | None = None,
                 prefill_chunk_size: int | None = None, kv_cache_tokens: int | None = None, verify: bool = True,
                 quantization: str | None = None, build: bool | BuildHook = True,
                 tensor_parallel_shards: int | None = None, prefix_cache: bool = True,
                 speculative_mode: str | None = None, speculative_tokens: int | None = None,
                 draft: str | os.PathLike | None = None, draft_quantization: str | None = None,
                 gpu_memory_utilization: float | None = None):
        # build: a recipe's bundle is built first when missing or stale (bundle.find_bundle), False: as is.
        # tensor_parallel_shards: a recipe's bundle for that shard count (one disco worker per shard).
        self.bundle = Bundle.open(model, device, verify=verify, quantization=quantization, build=build,
                                  tensor_parallel_shards=tensor_parallel_shards)
        mode, tokens, draft, draft_quantization = speculation_for(model, self.bundle, speculative_mode,
                                                                  speculative_tokens, draft, draft_quantization)
        draft_bundle = Bundle.open(draft, device, verify=verify, quantization=draft_quantization, build=build) \
            if draft is not None else None
        memory = {"gpu_memory_utilization": gpu_memory_utilization} if gpu_memory_utilization is not None else {}
        self.engine = Engine(self.bundle, max_batch_size=max_batch_size, context_window_size=context_window_size,
                             prefill_chunk_size=prefill_chunk_size, kv_cache_tokens=kv_cache_tokens,
                             prefix_cache=prefix_cache, speculative_mode=mode, speculative_tokens=tokens,
                             draft=draft_bundle, **memory)
        self.tokenizer: Tokenizer = self.engine.tokenizer
        self.model_name = self.bundle.name
        cc = self.bundle.chat_config
        try:
            self.template: ChatTemplate = load_chat_template(conv_template or cc.conv_template, self.bundle.path,
                                                             self.tokenizer, chat_template=cc.chat_template)
        except Exception:
            self.engine.shutdown()
            raise
        # A template's end-of-turn markers that are single tokens stop on the token (the text never shows
        # special tokens); the others are stop strings.
        self.template_stop_ids: tuple[int, ...] = tuple(
            t for t in (self.tokenizer.token_id(s) for s in self.template.stop_strings) if t is not None)
        self.template_stop_strings = tuple(s for s in self.template.stop_strings if self.tokenizer.token_id(s) is None)
        # Structured output: xgrammar is loaded on the first constrained request (or by warm_grammars).
        self.grammars = GrammarCompiler(self.tokenizer, cc.vocab_size,
                                        tuple(dict.fromkeys(self.engine.eos_token_ids + self.template_stop_ids)))
        self.tool_syntax = tool_syntax(self.template.source)

    def sampling(self, request: p.ChatCompletionRequest | p.CompletionRequest, logprobs: bool,
                 top_logprobs: int) -> SamplingParams:
        cc = self.bundle.chat_config

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return SamplingParams(
            temperature=pick(request.temperature, cc.temperature if cc.do_sample else 0.0),
            top_p=pick(request.top_p, cc.top_p),
            top_k=pick(request.top_k, cc.top_k),
            frequency_penalty=pick(request.frequency_penalty, cc.frequency_penalty),
            presence_penalty=pick(request.presence_penalty, cc.presence_penalty),
            repetition_penalty=pick(request.repetition_penalty, cc.repetition_penalty),
            logit_bias=dict(request.logit_bias or {}),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            seed=request.seed,
        )

    def generation_config(self, request: p.ChatCompletionRequest | p.CompletionRequest, chat: bool,
                          logprobs: bool, top_logprobs: int, grammar: Any = None) -> GenerationConfig:
        template_stops = self.template_stop_ids if chat and not request.ignore_eos else ()
        stop_ids = tuple(request.stop_token_ids or ()) + template_stops
        stops = tuple(request.stop_list) + (self.template_stop_strings if chat else ())
        return GenerationConfig(
            sampling=self.sampling(request, logprobs, top_logprobs),
            max_tokens=request.max_tokens,
            n=request.n,
            stop=stops,
            stop_token_ids=stop_ids,
            ignore_eos=request.ignore_eos,
            truncate_prompt_tokens=request.truncate_prompt_tokens,
            grammar=grammar,
        )

    def chat_prompt(self, request: p.ChatCompletionRequest, tools: ToolPlan | None = None) -> list[int]:
        tools = tools or ToolPlan.of(request, self.tool_syntax)
        messages, extra = tools.messages(request.messages)
        text = self.template.render(messages, add_generation_prompt=True, **extra)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prepare_chat(self, request: p.ChatCompletionRequest) -> tuple[list[int], GenerationConfig, ToolPlan]:
        """Prompt ids, generation config (with the compiled grammar of a constrained request) and the
        request's tool plan (whether and how its answer is parsed for tool calls)."""
        tools = ToolPlan.of(request, self.tool_syntax)
        constraint = tools.constraint(request_constraint(request))
        try:
            grammar = self.grammars.compile(constraint) if constraint is not None else None
        except ConstraintError as exc:
            if exc.param == "tools":  # name the tool whose parameters do not compile
                for i, tool in enumerate(request.tools or []):
                    self.grammars.compile(Constraint.json_schema(tool.function.parameters or {},
                                                                 f"tools[{i}].function.parameters"))
            raise
        config = self.generation_config(request, True, request.logprobs, request.top_logprobs or 0, grammar)
        prompt = self.chat_prompt(request, tools)
        return prompt, self.default_max_tokens(config, len(prompt)), tools

    def default_max_tokens(self, config: GenerationConfig, prompt_tokens: int) -> GenerationConfig:
        """A request that sets no max_tokens gets the bundle's default (the recipe's generation.max_tokens),
        cut to what the context window leaves after the prompt: a default is a cap, never an error."""
        default = self.bundle.chat_config.max_new_tokens
        if config.max_tokens is not None or not default:
            return config
        room = self.engine.context_window_size - prompt_tokens
        return dataclasses.replace(config, max_tokens=min(default, room)) if room > 0 else config

    def warm_grammars(self) -> None:
        """Load xgrammar and the bundle's tokenizer info now, so the first constrained request does not wait."""
        self.grammars.warm()

    def prepare_completion(self, request: p.CompletionRequest) -> tuple[list[int], GenerationConfig]:
        if request.suffix:
            raise p.UnsupportedError("suffix is not supported", param="suffix")
        if isinstance(request.prompt, str):
            prompt = self.tokenizer.encode(request.prompt, add_special_tokens=True)
        else:
            vocab = self.bundle.chat_config.vocab_size
            if any(not 0 <= t < vocab for t in request.prompt):
                raise p.RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompt = list(request.prompt)
        config = self.generation_config(request, False, request.logprobs is not None, request.logprobs or 0)
        return prompt, self.default_max_tokens(config, len(prompt))

    def close(self) -> None:
        self.engine.shutdown()


# ----------------------------------------------------------------------------------------------
# Engine deltas -> OpenAI-shaped objects
# ----------------------------------------------------------------------------------------------


def make_usage(stats: RequestStats) -> p.CompletionUsage:
    return p.CompletionUsage(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        total_tokens=stats.prompt_tokens + stats.completion_tokens,
        extra=stats.as_dict(),
    )


class _Assembler:
    """Accumulates one request's deltas; subclasses shape chunks and the whole response."""

    def __init__(self, tokenizer: Tokenizer, model: str, n: int, include_usage: bool, id_prefix: str):
        self.tokenizer = tokenizer
        self.model = model
        self.id = p.random_id(id_prefix)
        self.created = int(time.time())
        self.n = n
        self.include_usage = include_usage
        self.texts = [""] * n
        self.finish: list[str | None] = [None] * n
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.usage: p.CompletionUsage | None = None

    def _record(self, delta: SequenceDelta) -> bool:
        """Accumulate; False for deltas a client should not see (nothing new, or an abort)."""
        if delta.finish_reason == "abort":
            return False
        self.texts[delta.index] += delta.text
        self.logprobs[delta.index] += delta.logprobs
        self.finish[delta.index] = delta.finish_reason or self.finish[delta.index]
        return bool(delta.text or delta.logprobs or delta.finish_reason)

    def feed(self, out: RequestOutput) -> list[Any]:
        chunks = [c for c in (self._chunk(d) for d in out.deltas if self._record(d)) if c is not None]
        if out.finished and out.stats is not None:
            self.usage = make_usage(out.stats)
            if self.include_usage:
                chunks.append(self._usage_chunk())
        return chunks

    def _chunk(self, delta: SequenceDelta) -> Any:
        raise NotImplementedError

    def _usage_chunk(self) -> Any:
        raise NotImplementedError

    def _token(self, lp: TokenLogprob) -> tuple[str, list[int]]:
        return self.tokenizer.token_str(lp.token_id), self.tokenizer.token_bytes(lp.token_id)


class ChatAssembler(_Assembler):
    """Chat chunks and the whole answer; with tools, each choice's text goes through a
    :class:`~.tools.ToolCallParser` (content before the calls, then ``tool_calls``)."""

    def __init__(self, tokenizer: Tokenizer, model: str, request: p.ChatCompletionRequest,
                 tools: ToolPlan | None = None):
        super().__init__(tokenizer, model, request.n, request.include_usage, "chatcmpl")
        self.role_sent = [False] * request.n
        self.parsers = [ToolCallParser(tools.syntax) for _ in range(request.n)] if tools and tools.active else None

    def _finish_reason(self, index: int, reason: str | None) -> str | None:
        if reason == "stop" and self.parsers is not None and self.parsers[index].calls:
            return "tool_calls"
        return reason

    def _logprobs(self, items: list[TokenLogprob]) -> p.ChoiceLogprobs | None:
        if not items:
            return None
        content = []
        for lp in items:
            token, raw = self._token(lp)
            top = [p.TopLogprob(token=t, bytes=b, logprob=v)
                   for t, b, v in ((*self._token(TokenLogprob(i, v, [])), v) for i, v in lp.top)]
            content.append(p.ChatCompletionTokenLogprob(token=token, bytes=raw, logprob=lp.logprob, top_logprobs=top))
        return p.ChoiceLogprobs(content=content)

    def _chunk(self, delta: SequenceDelta) -> p.ChatCompletionChunk | None:
        text, calls = delta.text, None
        if self.parsers is not None:
            parser = self.parsers[delta.index]
            text, calls = parser.feed(delta.text)
            if delta.finish_reason is not None:
                more_text, more_calls = parser.finish()
                text, calls = text + more_text, calls + more_calls
            calls = calls or None
            if not (text or calls or delta.logprobs or delta.finish_reason) and self.role_sent[delta.index]:
                return None  # held back: it may start a tool call
        role = None if self.role_sent[delta.index] else "assistant"
        self.role_sent[delta.index] = True
        choice = p.ChatCompletionChunkChoice(
            index=delta.index,
            delta=p.ChoiceDelta(role=role, content=text if text or (role and not calls) else None, tool_calls=calls),
            finish_reason=self._finish_reason(delta.index, delta.finish_reason),
            logprobs=self._logprobs(delta.logprobs),
        )
        return p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def _usage_chunk(self) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage)

    def _message(self, index: int) -> p.ChatCompletionMessage:
        if self.parsers is None:
            return p.ChatCompletionMessage(content=self.texts[index])
        content, calls = self.parsers[index].result()
        return p.ChatCompletionMessage(content=content, tool_calls=calls)

    def result(self) -> p.ChatCompletion:
        choices = [
            p.ChatCompletionChoice(
                index=i,
                message=self._message(i),
                finish_reason=self._finish_reason(i, self.finish[i] or "stop"),
                logprobs=self._logprobs(self.logprobs[i]) if self.logprobs[i] else None,
            )
            for i in range(self.n)
        ]
        return p.ChatCompletion(id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage)


class CompletionAssembler(_Assembler):
    def __init__(self, tokenizer: Tokenizer, model: str, request: p.CompletionRequest, prompt: list[int]):
        super().__init__(tokenizer, model, request.n, request.include_usage, "cmpl")
        self.echo = ""
        if request.echo:
            self.echo = request.prompt if isinstance(request.prompt, str) else tokenizer.decode(prompt)
        self.echo_sent = [False] * request.n
        self.offsets = [len(self.echo)] * request.n

    def _logprobs(self, index: int, items: list[TokenLogprob]) -> p.CompletionLogprobs | None:
        if not items:
            return None
        tokens, offsets, tops = [], [], []
        for lp in items:
            token = self._token(lp)[0]
            tokens.append(token)
            offsets.append(self.offsets[index])
            self.offsets[index] += len(token)
            tops.append({self.tokenizer.token_str(i): v for i, v in lp.top})
        return p.CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in items], top_logprobs=tops,
                                    text_offset=offsets)

    def _chunk(self, delta: SequenceDelta) -> p.Completion:
        prefix = "" if self.echo_sent[delta.index] else self.echo
        self.echo_sent[delta.index] = True
        choice = p.CompletionChoice(index=delta.index, text=prefix + delta.text, finish_reason=delta.finish_reason,
                                    logprobs=self._logprobs(delta.index, delta.logprobs))
        return p.Completion(id=self.id, created=self.created, model=self.model, choices=[choice])

    def _usage_chunk(self) -> p.Completion:
        return p.Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage)

    def result(self) -> p.Completion:
        self.offsets = [len(self.echo)] * self.n
        choices = [
            p.CompletionChoice(index=i, text=self.echo + self.texts[i], finish_reason=self.finish[i] or "stop",
                               logprobs=self._logprobs(i, self.logprobs[i]))
            for i in range(self.n)
        ]
        return p.Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage)


# ----------------------------------------------------------------------------------------------
# Running a request: sync and async consumption of the engine's callback stream
# ----------------------------------------------------------------------------------------------


def _check(out: RequestOutput) -> RequestOutput:
    if out.error is not None:
        raise EngineError(f"generation failed: {out.error}") from out.error
    return out


def _iterate(engine: Engine, prompt: list[int], config: GenerationConfig, assembler: _Assembler) -> Iterator[Any]:
    """Submit now (so bad requests fail at create()), stream later; closing the iterator aborts."""
    outputs: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
    request_id = engine.submit(prompt, config, outputs.put)

    def stream() -> Iterator[Any]:
        finished = False
        try:
            while not finished:
                out = _check(outputs.get())
                finished = out.finished
                yield from assembler.feed(out)
        finally:
            if not finished:
                engine.abort(request_id)

    return stream()


def _aiterate(engine: Engine, prompt: list[int], config: GenerationConfig,
              assembler: _Assembler) -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

    def deliver(out: RequestOutput) -> None:
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, out)
        except RuntimeError:  # the event loop is gone; nobody is listening any more
            engine.abort(out.request_id)

    request_id = engine.submit(prompt, config, deliver)

    async def stream() -> AsyncIterator[Any]:
        finished = False
        try:
            while not finished:
                out = _check(await outputs.get())
                finished = out.finished
                for chunk in assembler.feed(out):
                    yield chunk
        finally:
            if not finished:
                engine.abort(request_id)

    return stream()


def _chat_job(front: Frontend, kwargs: dict[str, Any]) -> tuple[p.ChatCompletionRequest, list[int], GenerationConfig,
                                                                 _Assembler]:
    request = kwargs.pop("_request", None) or p.ChatCompletionRequest.model_validate(kwargs)
    prompt, config, tools = front.prepare_chat(request)
    return request, prompt, config, ChatAssembler(front.tokenizer, front.model_name, request, tools)


def _completion_job(front: Frontend, kwargs: dict[str, Any]) -> tuple[p.CompletionRequest, list[int],
                                                                       GenerationConfig, _Assembler]:
    request = kwargs.pop("_request", None) or p.CompletionRequest.model_validate(kwargs)
    prompt, config = front.prepare_completion(request)
    return request, prompt, config, CompletionAssembler(front.tokenizer, front.model_name, request, prompt)


class _SyncCreate:
    def __init__(self, front: Frontend, job: Callable[..., Any]):
        self._front, self._job = front, job

    def create(self, **kwargs: Any) -> Any:
        """Same arguments as the openai client's ``create``; ``stream=True`` returns an iterator of chunks."""
        request, prompt, config, assembler = self._job(self._front, kwargs)
        chunks = _iterate(self._front.engine, prompt, config, assembler)
        if request.stream:
            return chunks
        for _ in chunks:
            pass
        return assembler.result()


class _AsyncCreate:
    def __init__(self, front: Frontend, job: Callable[..., Any]):
        self._front, self._job = front, job

    async def create(self, **kwargs: Any) -> Any:
        """``await`` it; with ``stream=True`` the result is an async iterator of chunks."""
        # Off the event loop: compiling a grammar (and loading xgrammar the first time) takes a while.
        request, prompt, config, assembler = await asyncio.to_thread(self._job, self._front, kwargs)
        chunks = _aiterate(self._front.engine, prompt, config, assembler)
        if request.stream:
            return chunks
        async for _ in chunks:
            pass
        return assembler.result()


class _Namespace:
    def __init__(self, **members: Any):
        self.__dict__.update(members)


class EngineConfig(BaseModel):
    """Engine options as MLC LLM's ``EngineConfig`` groups them: ``MLCEngine(model,
    engine_config=EngineConfig(tensor_parallel_shards=2))``. Unset fields keep the bundle's values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel_shards: PositiveInt | None = None  # the recipe's bundle for this shard count
    max_batch_size: PositiveInt | None = None
    context_window_size: PositiveInt | None = None
    prefill_chunk_size: PositiveInt | None = None
    kv_cache_tokens: PositiveInt | None = None
    prefix_cache: bool | None = None  # MLC LLM's prefix_cache_mode "radix" (True) / "disable" (False)
    speculative_mode: Literal["off", "prompt-lookup", "draft"] | None = None  # None: the recipe's, else off
    speculative_tokens: PositiveInt | None = None  # tokens proposed per step (MLC LLM's spec_draft_length)
    draft: str | None = None  # the draft model: a bundle directory or a recipe (MLC LLM's additional_models)
    draft_quantization: str | None = None  # with a recipe draft: which of its quantizations
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)


class _EngineBase:
    def __init__(self, model: str | os.PathLike, device: str = "auto", *, engine_config: EngineConfig | None = None,
                 **options: Any):
        """``model``: a bundle directory, a directory of bundles, or a recipe (built first when its bundle is
        missing or stale, unless build=False). ``options``: conv_template, max_batch_size, context_window_size,
        prefill_chunk_size, kv_cache_tokens, tensor_parallel_shards, verify, quantization, build (see
        :class:`Frontend`); ``engine_config`` sets the engine's among them, as in MLC LLM."""
        for name, value in (engine_config.model_dump(exclude_none=True) if engine_config else {}).items():
            if options.setdefault(name, value) != value:
                raise ValueError(f"{name}={options[name]} contradicts engine_config.{name}={value}")
        self.frontend = Frontend(model, device, **options)
        self._terminated = False

    @property
    def model(self) -> str:
        return self.frontend.model_name

    def stats(self) -> dict[str, Any]:
        """Engine counters: running/queued requests, decode steps and batch sizes, KV pages in use, tokens."""
        return self.frontend.engine.stats()

    def health(self) -> str | None:
        """None while the engine runs; else why it does not (terminated, or its thread died)."""
        if self._terminated:
            return "the engine was terminated"
        # The engine's loop catches what fails in a step; a thread that is gone died of something else,
        # and nothing would ever answer a request submitted to it.
        if not self.frontend.engine._thread.is_alive():
            return "the engine thread died"
        # a model that cannot run any more (a tensor-parallel worker died): every request would fail
        return getattr(self.frontend.engine.model, "failed", None)

    def terminate(self) -> None:
        """Stop the engine thread; requests in flight end with an error."""
        if not self._terminated:
            self._terminated = True
            self.frontend.close()


class MLCEngine(_EngineBase):
    """Synchronous engine with the openai client's shape: ``engine.chat.completions.create(...)``."""

    def __init__(self, model: str | os.PathLike, device: str = "auto", **options: Any):
        super().__init__(model, device, **options)
        self.chat = _Namespace(completions=_SyncCreate(self.frontend, _chat_job))
        self.completions = _SyncCreate(self.frontend, _completion_job)

    def __enter__(self) -> MLCEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()


class AsyncMLCEngine(_EngineBase):
    """Asyncio twin of :class:`MLCEngine`; any number of concurrent requests share the batch."""

    def __init__(self, model: str | os.PathLike, device: str = "auto", **options: Any):
        super().__init__(model, device, **options)
        self.chat = _Namespace(completions=_AsyncCreate(self.frontend, _chat_job))
        self.completions = _AsyncCreate(self.frontend, _completion_job)

    async def __aenter__(self) -> AsyncMLCEngine:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.terminate()

    def __enter__(self) -> AsyncMLCEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()
