"""Tool calling: the request's tools into the prompt, a grammar for the calls, and calls parsed out of
the answer (whole, or streamed as ``delta.tool_calls``).

A call is written in one of two syntaxes, chosen by the bundle's chat template (:func:`tool_syntax`):

* ``hermes`` — the template renders ``tools`` itself and its models mark each call as
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (Hermes, Qwen 2.5/3, SmolLM3 and
  others). Chosen when the template's source contains ``<tool_call>``.
* ``json`` — every other template (it has no tool format: SmolLM2, ChatML, Llama 2, ...). The tools are
  described in a system message added here, and a call is an answer of the form
  ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``. Earlier calls are shown to the model in that
  form, and tool results as a user message (``NAME returned: RESULT``, then a request to answer).

Generation is constrained by a grammar built from the tools' parameter schemas: with ``tool_choice``
``required`` or a named function the answer must be calls; with ``auto`` the text is free until the
model starts a call (the syntax's marker), and from there the call must complete and parse.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from . import protocol as p
from .structured import Constraint, ConstraintError, either

ANY_ARGUMENTS = {"type": "object"}


@dataclass(frozen=True)
class ToolSyntax:
    name: Literal["hermes", "json"]
    marker: str  # where the calls start in the answer


HERMES = ToolSyntax("hermes", "<tool_call>")
JSON_CALLS = ToolSyntax("json", '{"tool_calls"')
HERMES_BEGIN, HERMES_END = "<tool_call>\n", "\n</tool_call>"
JSON_BEGIN, JSON_END = '{"tool_calls": ', "}"


def tool_syntax(template_source: str) -> ToolSyntax:
    return HERMES if "<tool_call>" in template_source else JSON_CALLS


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ----------------------------------------------------------------------------------------------
# What a request's tools ask for
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolPlan:
    """A request's tools, the choice among them, and the syntax the bundle's template calls them in."""

    syntax: ToolSyntax
    tools: tuple[p.ChatCompletionTool, ...]
    choice: str  # "none" | "auto" | "required" | the name of the forced function
    parallel: bool = True

    @classmethod
    def of(cls, request: p.ChatCompletionRequest, syntax: ToolSyntax) -> ToolPlan:
        tools = tuple(request.tools or ())
        choice = request.tool_choice if request.tool_choice is not None else ("auto" if tools else "none")
        if isinstance(choice, dict):
            choice = choice["function"]["name"]
        return cls(syntax, tools, choice if tools else "none", request.parallel_tool_calls)

    @property
    def active(self) -> bool:
        """Whether the answer may hold calls (and so is parsed for them)."""
        return self.choice != "none"

    @property
    def offered(self) -> tuple[p.ChatCompletionTool, ...]:
        if self.choice in ("none", "auto", "required"):
            return self.tools if self.active else ()
        return tuple(t for t in self.tools if t.function.name == self.choice)

    # --- the prompt -----------------------------------------------------------------------------
    def messages(self, messages: list[p.ChatMessage]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The messages as the template should see them, and extra template variables (``tools``)."""
        if self.syntax is HERMES:
            extra = {"tools": [t.model_dump(exclude_none=True) for t in self.tools]} if self.active else {}
            return [_hermes_message(m) for m in messages], extra
        out = _json_messages(messages)
        if self.active:
            text = self._json_instructions()
            if out and out[0]["role"] in ("system", "developer"):
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}".lstrip()}
            else:
                out.insert(0, {"role": "system", "content": text})
        return out, {}

    def _json_instructions(self) -> str:
        described = "\n".join(json.dumps({k: v for k, v in t.function.model_dump().items()
                                          if k in ("name", "description", "parameters") and v is not None})
                              for t in self.offered)
        form = '{"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}]}'
        if self.choice == "auto":
            how = f"To call functions, answer with nothing but JSON of this form: {form}. Otherwise answer normally."
        else:
            how = f"Answer by calling functions, with nothing but JSON of this form: {form}"
        return f"You can call these functions (their parameters are JSON schemas):\n{described}\n{how}"

    # --- the grammar ----------------------------------------------------------------------------
    def constraint(self, response: Constraint | None) -> Constraint | None:
        """What the answer must match, given the response format's own constraint (if any)."""
        if not self.active:
            return response
        if self.choice != "auto":
            if response is not None:
                raise ConstraintError(f"{response.param} cannot be combined with tool_choice {self.choice!r}: "
                                      "the answer must be a tool call", response.param)
            return self._calls_constraint()
        if response is not None:
            return either(response, self._calls_constraint())
        return self._auto_constraint()

    def _call_schema(self) -> dict[str, Any]:
        calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                   "arguments": t.function.parameters or ANY_ARGUMENTS},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for t in self.offered]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}

    def _calls_array(self) -> dict[str, Any]:
        schema = {"type": "array", "items": self._call_schema(), "minItems": 1}
        return schema if self.parallel else {**schema, "maxItems": 1}

    def _calls_constraint(self) -> Constraint:
        """Nothing but one or more calls."""
        if self.syntax is JSON_CALLS:
            return Constraint.json_schema({"type": "object", "properties": {"tool_calls": self._calls_array()},
                                           "required": ["tool_calls"], "additionalProperties": False}, "tools")
        fmt = {"type": "tags_with_separator", "tags": [self._hermes_tag()], "separator": "\n",
               "at_least_one": True, "stop_after_first": not self.parallel}
        return _structural_tag(fmt)

    def _auto_constraint(self) -> Constraint:
        """Free text, until the marker starts calls that must parse."""
        if self.syntax is JSON_CALLS:
            tag = {"type": "tag", "begin": JSON_BEGIN, "end": JSON_END,
                   "content": {"type": "json_schema", "json_schema": self._calls_array(), "max_whitespace_cnt": 1}}
            fmt = {"type": "triggered_tags", "triggers": [JSON_CALLS.marker], "tags": [tag], "stop_after_first": True}
        else:
            fmt = {"type": "triggered_tags", "triggers": [HERMES.marker], "tags": [self._hermes_tag()],
                   "stop_after_first": not self.parallel}
        return _structural_tag(fmt)

    def _hermes_tag(self) -> dict[str, Any]:
        return {"type": "tag", "begin": HERMES_BEGIN, "end": HERMES_END,
                "content": {"type": "json_schema", "json_schema": self._call_schema(), "max_whitespace_cnt": 1}}


def _structural_tag(fmt: dict[str, Any]) -> Constraint:
    return Constraint("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}), "tools")


def _arguments_value(text: str) -> Any:
    """A call's arguments as templates expect them: parsed JSON where it parses."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


def _hermes_message(message: p.ChatMessage) -> dict[str, Any]:
    out = message.model_dump(exclude_none=True)
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _arguments_value(c.function.arguments)}}
            for c in message.tool_calls]
    return out


TOOL_RESULTS_FOLLOW_UP = "Use this to answer my question in a sentence."


def _json_messages(messages: list[p.ChatMessage]) -> list[dict[str, Any]]:
    """Earlier calls as the JSON answers that make them; the results of consecutive calls as one user
    message that asks for the answer (without it, small models copy the call they see again)."""
    names = {c.id: c.function.name for m in messages for c in (m.tool_calls or [])}
    out: list[dict[str, Any]] = []
    results: list[str] = []
    for message in messages:
        if message.role == "tool":
            results.append(f"{names.get(message.tool_call_id or '', 'The function')} returned: {message.text()}")
            continue
        if results:
            out.append({"role": "user", "content": "\n".join(results) + "\n" + TOOL_RESULTS_FOLLOW_UP})
            results = []
        entry = message.model_dump(exclude_none=True, exclude={"tool_calls", "tool_call_id"})
        entry["content"] = message.text()
        if message.tool_calls:
            calls = [{"name": c.function.name, "arguments": _arguments_value(c.function.arguments)}
                     for c in message.tool_calls]
            entry["content"] = (entry["content"] + "\n" if entry["content"] else "") + \
                json.dumps({"tool_calls": calls}, ensure_ascii=False)
        out.append(entry)
    if results:
        out.append({"role": "user", "content": "\n".join(results) + "\n" + TOOL_RESULTS_FOLLOW_UP})
    return out


# ----------------------------------------------------------------------------------------------
# Parsing calls out of an answer, as it streams
# ----------------------------------------------------------------------------------------------


@dataclass
class _CallScan:
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None  # None: not complete yet
    end: int | None = None  # after the call object's closing brace


@dataclass
class _CallState:
    id: str
    name: str | None = None
    arguments: str = ""  # sent so far


_WS = " \t\r\n"


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """``text[i]`` is a quote: the index after the closing quote, None if the string is unfinished."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j + 1
        j += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """The index after the JSON value starting at ``text[i]``, None if it is unfinished."""
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] in "{[":
        depth, j = 0, i
        while j < len(text):
            ch = text[j]
            if ch == '"':
                end = _string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}]" + _WS:
        j += 1
    return j if j < len(text) else None


def _scan_call(text: str, i: int) -> _CallScan:
    """The call object at ``text[i] == '{'``, as far as it goes: its name, where its arguments are."""
    scan, j = _CallScan(), i + 1
    while True:
        j = _skip_ws(text, j)
        if j >= len(text):
            return scan
        if text[j] == "}":
            scan.end = j + 1
            return scan
        if text[j] == ",":
            j += 1
            continue
        if text[j] != '"':
            return scan
        key_end = _string_end(text, j)
        if key_end is None:
            return scan
        key = json.loads(text[j:key_end])
        j = _skip_ws(text, key_end)
        if j >= len(text) or text[j] != ":":
            return scan
        j = _skip_ws(text, j + 1)
        if j >= len(text):
            return scan
        end = _value_end(text, j)
        if key in ("arguments", "parameters"):
            scan.args_start, scan.args_end = j, end
        elif key == "name" and end is not None:
            value = json.loads(text[j:end]) if text[j] == '"' else None
            scan.name = value if isinstance(value, str) else None
        if end is None:
            return scan
        j = end


def _scan_calls(syntax: ToolSyntax, text: str, start: int) -> list[_CallScan]:
    """The calls from ``start`` (where the marker is) on, the last one possibly unfinished."""
    calls: list[_CallScan] = []
    i = start
    if syntax is JSON_CALLS:
        i = _skip_ws(text, i + len(syntax.marker))
        if not text.startswith(":", i):
            return calls
        i = _skip_ws(text, i + 1)
        if not text.startswith("[", i):
            return calls
        i += 1
        while True:
            i = _skip_ws(text, i)
            if not text.startswith("{", i):
                return calls
            call = _scan_call(text, i)
            calls.append(call)
            if call.end is None:
                return calls
            i = _skip_ws(text, call.end)
            if not text.startswith(",", i):
                return calls
            i += 1
    while text.startswith(syntax.marker, i):
        i = _skip_ws(text, i + len(syntax.marker))
        if not text.startswith("{", i):
            return calls
        call = _scan_call(text, i)
        calls.append(call)
        if call.end is None:
            return calls
        i = _skip_ws(text, call.end)
        if not text.startswith("</tool_call>", i):
            return calls
        i = _skip_ws(text, i + len("</tool_call>"))
    return calls


def _held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that could start ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


@dataclass
class ToolCallParser:
    """One choice's answer, fed as text deltas: content before the calls, then the calls as
    :class:`~.protocol.ChoiceDeltaToolCall` pieces (name first, then the arguments text as it grows)."""

    syntax: ToolSyntax
    text: str = ""
    content: str = ""  # released so far
    calls: list[_CallState] = field(default_factory=list)
    _released: int = 0  # chars of text released as content
    _marker_at: int | None = None

    def feed(self, delta: str) -> tuple[str, list[p.ChoiceDeltaToolCall]]:
        self.text += delta
        if self._marker_at is None:
            found = self.text.find(self.syntax.marker, self._released)
            if found < 0:
                return self._release(len(self.text) - _held_back(self.text, self.syntax.marker)), []
            self._marker_at = found
            return self._release(found), self._call_deltas(final=False)
        return "", self._call_deltas(final=False)

    def finish(self) -> tuple[str, list[p.ChoiceDeltaToolCall]]:
        """The end of the answer: what was held back, and the calls' last pieces."""
        if self._marker_at is None:
            return self._release(len(self.text)), []
        deltas = self._call_deltas(final=True)
        if not self.calls:  # a marker, but no call came of it: it was text after all
            self._marker_at = None
            return self._release(len(self.text)), deltas
        return "", deltas

    def _release(self, end: int) -> str:
        out = self.text[self._released:end] if end > self._released else ""
        self._released = max(self._released, end)
        self.content += out
        return out

    def _call_deltas(self, final: bool) -> list[p.ChoiceDeltaToolCall]:
        deltas: list[p.ChoiceDeltaToolCall] = []
        for index, scan in enumerate(_scan_calls(self.syntax, self.text, self._marker_at)):
            if scan.name is None:
                break
            if index == len(self.calls):
                self.calls.append(_CallState(new_call_id(), scan.name))
                deltas.append(p.ChoiceDeltaToolCall(index=index, id=self.calls[index].id, type="function",
                                                    function=p.ChoiceDeltaToolCallFunction(name=scan.name,
                                                                                           arguments="")))
            state = self.calls[index]
            if scan.args_start is not None:  # an unfinished value runs to the end of the text so far
                end = scan.args_end if scan.args_end is not None else len(self.text)
                new = self.text[scan.args_start + len(state.arguments):end]
            else:
                new = "{}" if final and not state.arguments else ""  # a call without arguments
            if new:
                state.arguments += new
                deltas.append(p.ChoiceDeltaToolCall(index=index,
                                                    function=p.ChoiceDeltaToolCallFunction(arguments=new)))
        return deltas

    def result(self) -> tuple[str | None, list[p.ChatCompletionMessageToolCall] | None]:
        """The message's content and tool_calls (after :meth:`finish`)."""
        if not self.calls:
            return self.content, None
        calls = [p.ChatCompletionMessageToolCall(id=c.id, function=p.ToolCallFunction(name=c.name or "",
                                                                                       arguments=c.arguments))
                 for c in self.calls]
        return self.content.strip() or None, calls
