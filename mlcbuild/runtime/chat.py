"""``mlcbuild chat BUNDLE_OR_RECIPE``: an interactive chat in the terminal, streaming answers.

Line editing and history come from GNU readline; Escape then Enter inserts a new line (multi-line
input), as in MLC LLM's chat. Where readline is missing (or stdin is not a terminal) a line that ends
with a backslash continues on the next line.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .api import MLCEngine
from .engine import ContextWindowError
from .protocol import RequestError

HELP = """You can use the following special commands:
  /help               print the special commands
  /exit               quit the cli
  /stats              print out stats of last request (token/sec)
  /metrics            print out the engine's counters (batching, KV-cache pages, tokens)
  /reset              restart a fresh chat
  /set [overrides]    override settings in the generation config. For example,
                      `/set temperature=0.5;top_p=0.8;seed=23;max_gen_len=100;stop=str1,str2`
                      Note: Separate stop words in the `stop` option with commas (,).
                      Structured output: `/set json=1` answers in JSON (`json=0`: text again);
                      `/set json_schema=FILE` follows the JSON schema in FILE; `/set grammar=FILE`
                      follows the EBNF grammar in FILE.
  Multi-line input: Use escape+enter to start a new line (or end a line with \\).
"""

def _json_mode(text: str) -> dict[str, Any] | None:
    if text not in ("0", "1"):
        raise ValueError(text)
    return {"type": "json_object"} if text == "1" else None


def _read(path: str) -> str:
    try:
        return Path(path).expanduser().read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


def _json_schema_file(path: str) -> dict[str, Any]:
    try:
        schema = json.loads(_read(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    return {"type": "json_schema", "json_schema": {"name": Path(path).stem or "schema", "schema": schema}}


def _grammar_file(path: str) -> dict[str, Any]:
    return {"type": "grammar", "grammar": _read(path)}


# /set keys -> (request field, parser); max_gen_len is MLC LLM's older name for max_tokens
SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "frequency_penalty": ("frequency_penalty", float),
    "presence_penalty": ("presence_penalty", float),
    "repetition_penalty": ("repetition_penalty", float),
    "max_tokens": ("max_tokens", int),
    "max_gen_len": ("max_tokens", int),
    "seed": ("seed", int),
    "stop": ("stop", lambda text: [s for s in text.split(",") if s]),
    "json": ("response_format", _json_mode),
    "json_schema": ("response_format", _json_schema_file),
    "grammar": ("response_format", _grammar_file),
}


def parse_settings(text: str) -> dict[str, Any]:
    """``temperature=0.5;max_gen_len=100;stop=end,stop`` -> request fields; ValueError names a bad item."""
    result: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in SETTINGS:
            raise ValueError(f"cannot set {item!r}; known settings: {', '.join(SETTINGS)}")
        field, parse = SETTINGS[key]
        try:
            result[field] = parse(value.strip())
        except ValueError as exc:
            reason = f" ({exc})" if str(exc) != value.strip() and field == "response_format" else ""
            raise ValueError(f"{key}: {value.strip()!r} is not a valid value{reason}") from None
    return result


class ChatSession:
    """The conversation state and the commands; reads nothing itself (see :func:`chat`)."""

    def __init__(self, engine: MLCEngine, out: TextIO = sys.stdout):
        self.engine = engine
        self.out = out
        self.history: list[dict[str, str]] = []
        self.settings: dict[str, Any] = {}
        self.last_usage: Any = None

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def generate(self, prompt: str) -> None:
        """Stream the answer to ``prompt``; drop the oldest turns if the history outgrows the context."""
        self.history.append({"role": "user", "content": prompt})
        while True:
            try:
                stream = self.engine.chat.completions.create(
                    messages=self.history, stream=True, stream_options={"include_usage": True}, **self.settings
                )
                break
            except RequestError as exc:  # e.g. a grammar set with /set that does not compile
                self.history.pop()
                self.say(f"[error] {exc}")
                return
            except ContextWindowError as exc:
                if len(self.history) <= 1:
                    self.history.pop()
                    self.say(f"[error] {exc}")
                    return
                self.history = self.history[2:]  # forget the oldest exchange and try again
        answer, truncated = "", False
        for chunk in stream:
            if chunk.usage is not None:
                self.last_usage = chunk.usage
            for choice in chunk.choices:
                answer += choice.delta.content or ""
                self.say(choice.delta.content or "", end="")
                truncated |= choice.finish_reason == "length"
        self.say(" [output truncated: max_gen_len or context length reached]" if truncated else "")
        self.history.append({"role": "assistant", "content": answer})

    def stats_text(self) -> str:
        if self.last_usage is None or not self.last_usage.extra:
            return "N/A (no request yet)"
        extra = self.last_usage.extra

        def rate(key: str) -> str:
            return f"{extra[key]:.1f}" if key in extra else "N/A"

        return (f"prefill: {rate('prefill_tokens_per_s')} tok/s, decode: {rate('decode_tokens_per_s')} tok/s "
                f"(prompt {self.last_usage.prompt_tokens} tokens, completion {self.last_usage.completion_tokens} "
                f"tokens, time to first token {extra.get('ttft_s', 0.0) * 1000:.0f} ms)")

    def handle(self, line: str) -> bool:
        """Run one input (a command or a prompt); False means exit."""
        command, _, arg = line.strip().partition(" ")
        if command == "/exit":
            return False
        if command == "/help":
            self.say(HELP)
        elif command == "/stats":
            self.say(self.stats_text())
        elif command == "/metrics":
            for key, value in self.engine.stats().items():
                self.say(f"{key}: {value}")
        elif command == "/reset":
            self.history = []
            self.say("RESET CHAT SUCCESS")
        elif command == "/set":
            try:
                self.settings.update(parse_settings(arg))
            except ValueError as exc:
                self.say(f"[error] {exc}")
            else:
                self.say("settings: " + "; ".join(f"{k}={v}" for k, v in self.settings.items()))
        elif command.startswith("/"):
            self.say(f"unknown command {command}; /help lists the commands")
        elif line.strip():
            self.generate(line)
        return True


def _line_reader(prompt: str) -> Callable[[], str]:
    """A function reading one (possibly multi-line) input; EOFError at the end."""
    try:
        import readline
    except ImportError:
        readline = None
    if readline is not None and sys.stdin.isatty():
        for key in (r"\e\r", r"\e\n"):  # escape+enter inserts a literal newline
            readline.parse_and_bind(f'"{key}": "\\C-v\\C-j"')

    def read() -> str:
        lines = [input(prompt)]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input("... "))
        return "\n".join(lines)

    return read


# Keys of ``--overrides`` that configure the engine rather than generation, as in MLC LLM's
# ``mlc_llm chat --overrides "context_window_size=1024;tensor_parallel_shards=2"``.
ENGINE_OVERRIDES = ("tensor_parallel_shards", "context_window_size", "prefill_chunk_size")


def engine_overrides(text: str) -> tuple[str, dict[str, int]]:
    """Split ``--overrides``: (the generation settings, as /set takes them; the engine options)."""
    keep, engine = [], {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = (x.strip() for x in item.partition("="))
        if sep and key in ENGINE_OVERRIDES:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--overrides: {key} must be a positive integer, got {value!r}")
            engine[key] = int(value)
        else:
            keep.append(item)
    return ";".join(keep), engine


def chat(bundle_or_recipe: str | os.PathLike, device: str = "auto", overrides: str | None = None,
         **engine_options: Any) -> None:
    """Interactive chat with a bundle (or the bundle a recipe names) until /exit or end of input.

    ``overrides`` takes the ``/set`` syntax (``temperature=0.5;max_gen_len=100``) as initial settings;
    ``engine_options`` go to :class:`~.api.MLCEngine` (conv_template, context_window_size, verify, ...).
    """
    overrides, from_overrides = engine_overrides(overrides or "")
    for name, value in from_overrides.items():
        if engine_options.setdefault(name, value) != value:
            raise ValueError(f"--overrides {name}={value} contradicts {name}={engine_options[name]}")
    engine = MLCEngine(bundle_or_recipe, device, **{"max_batch_size": 1, **engine_options})
    try:
        session = ChatSession(engine)
        if overrides:
            session.settings.update(parse_settings(overrides))
        session.say(f"Chatting with {engine.model} on {engine.frontend.bundle.device}.")
        session.say(HELP)
        read = _line_reader(">>> ")
        while True:
            try:
                line = read()
            except (EOFError, KeyboardInterrupt):
                session.say()
                break
            try:
                if not session.handle(line):
                    break
            except KeyboardInterrupt:  # Ctrl-C stops the answer (closing the stream aborts it), not the chat
                session.say(" [interrupted]")
    finally:
        engine.terminate()
