"""OpenAI-compatible request and response schemas (pydantic).

Responses carry the same fields, with the same names and nesting, as the ``openai`` package's types
(``openai.types.chat.ChatCompletion``, ``ChatCompletionChunk``, ``openai.types.Completion``, ...), so
objects from :class:`mlcbuild.MLCEngine` read like the client's and the server's JSON parses with it.

Requests accept OpenAI's fields plus a few common extensions (``top_k``, ``repetition_penalty``,
``stop_token_ids``, ``ignore_eos``, ``truncate_prompt_tokens``), as vLLM and MLC LLM do.
"""

from __future__ import annotations

import json
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


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ChatCompletionMessageToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ChatCompletionMessageToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _check_tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments constraint
    strict: bool | None = None


class ChatCompletionTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class JSONSchemaSpec(_Strict):
    """``response_format.json_schema`` as OpenAI spells it."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``text``, ``json_object`` and ``json_schema``; ``grammar`` (EBNF, GBNF-compatible),
    ``regex`` and ``structural_tag`` (xgrammar's ``format``, or vLLM/SGLang's ``structures`` and
    ``triggers``) as MLC LLM, vLLM and SGLang extend it. ``json_object`` also takes MLC LLM's ``schema``."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema", "grammar", "regex", "structural_tag"]
    json_schema: JSONSchemaSpec | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    grammar: str | None = None
    regex: str | None = None
    format: dict[str, Any] | None = None
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None

    @field_validator("schema_", mode="before")
    @classmethod
    def _schema_text(cls, value: Any) -> Any:
        if isinstance(value, str):  # MLC LLM sends the schema as JSON text
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"schema is not valid JSON: {exc}") from None
        return value

    @model_validator(mode="after")
    def _check_fields(self) -> ResponseFormat:
        needs = {"json_schema": "json_schema", "grammar": "grammar", "regex": "regex"}
        field = needs.get(self.type)
        if field is not None and getattr(self, field) is None:
            raise ValueError(f"response_format of type {self.type!r} needs a {field!r} field")
        if self.type == "structural_tag" and self.format is None and self.structures is None:
            raise ValueError("response_format of type 'structural_tag' needs 'format' (xgrammar) or "
                             "'structures' and 'triggers'")
        return self


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=CHAT_MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ChatCompletionTool] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    # vLLM's ways to say the same (extra_body): one constraint per request
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None
    structured_outputs: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, value: list[ChatCompletionTool] | None) -> list[ChatCompletionTool] | None:
        seen: set[str] = set()
        for tool in value or []:
            if tool.function.name in seen:
                raise ValueError(f"tool names must be unique; {tool.function.name!r} is defined more than once")
            seen.add(tool.function.name)
        return value

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return value
        if "tools" not in info.data:  # the tools failed validation: that error is the one to report
            return value
        names = [t.function.name for t in info.data.get("tools") or []]
        if value in ("none", "auto", "required"):
            if value == "required" and not names:
                raise ValueError("tool_choice 'required' needs at least one tool in tools")
            return value
        name = value.get("function", {}).get("name") if isinstance(value, dict) and \
            value.get("type") == "function" and isinstance(value.get("function"), dict) else None
        if not isinstance(name, str):
            raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': NAME}}")
        if name not in names:
            known = ", ".join(repr(n) for n in names) or "none"
            raise ValueError(f"tool_choice names the function {name!r}, which is not in tools (tools: {known})")
        return value

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
    tool_calls: list[ChatCompletionMessageToolCall] | None = None


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


class ChoiceDeltaToolCallFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ChoiceDeltaToolCall(BaseModel):
    """A piece of a streamed tool call: the first names it (id, name), the next ones add arguments text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChoiceDeltaToolCallFunction | None = None


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None


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
