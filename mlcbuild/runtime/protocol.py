"""OpenAI-compatible request and response schemas (pydantic).

Responses carry the same fields, with the same names and nesting, as the ``openai`` package's types
(``openai.types.chat.ChatCompletion``, ``ChatCompletionChunk``, ``openai.types.Completion``, ...), so
objects from :class:`mlcbuild.MLCEngine` read like the client's and the server's JSON parses with it.

Requests accept OpenAI's fields plus a few common extensions (``top_k``, ``repetition_penalty``,
``stop_token_ids``, ``ignore_eos``, ``truncate_prompt_tokens``), as vLLM and MLC LLM do.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

CHAT_MAX_TOP_LOGPROBS = 20
COMPLETION_MAX_LOGPROBS = 5
MAX_N = 16
MAX_STOP_STRINGS = 16

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class _Strict(BaseModel):
    """Request models reject unknown fields only where OpenAI would; extras are ignored."""

    model_config = ConfigDict(extra="ignore")


# ----------------------------------------------------------------------------------------------
# Common pieces
# ----------------------------------------------------------------------------------------------


class StreamOptions(_Strict):
    include_usage: bool = False


class CompletionUsage(BaseModel):
    """``usage``; ``extra`` holds per-request timing (TTFT, prefill/decode tokens per second)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    extra: dict[str, Any] | None = None


class TopLogprob(BaseModel):
    token: str
    bytes: list[int] | None = None
    logprob: float


class ChatCompletionTokenLogprob(BaseModel):
    token: str
    bytes: list[int] | None = None
    logprob: float
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None = None
    refusal: list[ChatCompletionTokenLogprob] | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class RequestError(ValueError):
    """A request the runtime refuses (beyond schema validation): HTTP ``status``, OpenAI ``param``/``code``."""

    status = 400

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


class UnsupportedError(RequestError):
    """A well-formed request asks for something this runtime does not do (HTTP 422)."""

    status = 422

    def __init__(self, message: str, param: str | None = None, code: str = "unsupported"):
        super().__init__(message, param, code)


# ----------------------------------------------------------------------------------------------
# Sampling fields shared by both request kinds
# ----------------------------------------------------------------------------------------------


class _SamplingFields(_Strict):
    model: str | None = None
    # None: the bundle's generation defaults (from the model's generation_config.json)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        for token_id, bias in (value or {}).items():
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit bias for token {token_id} is {bias}; it must be in [-100, 100]")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ----------------------------------------------------------------------------------------------
# /v1/chat/completions
# ----------------------------------------------------------------------------------------------


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=CHAT_MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChunkChoice]
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


# ----------------------------------------------------------------------------------------------
# /v1/completions
# ----------------------------------------------------------------------------------------------


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] = Field(union_mode="left_to_right")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=COMPLETION_MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list of tokens")
        return value

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported")
        return value


class CompletionLogprobs(BaseModel):
    text_offset: list[int] | None = None
    token_logprobs: list[float | None] | None = None
    tokens: list[str] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """Both the whole answer and each streamed chunk (``object`` is ``text_completion`` for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


# ----------------------------------------------------------------------------------------------
# /v1/models
# ----------------------------------------------------------------------------------------------


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "mlcbuild"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
