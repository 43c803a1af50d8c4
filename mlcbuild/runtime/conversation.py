"""Chat messages to prompt text.

By default the bundle's own Hugging Face chat template (``chat_template`` in tokenizer_config.json, or
``chat_template.jinja``) is rendered the way ``transformers`` renders it: a sandboxed jinja2 environment
with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that keeps
non-ASCII text, ``raise_exception`` and ``strftime_now``, and the tokenizer's special tokens as variables.

The named templates (``llama-3``, ``llama-2``, ``phi-2``, ``chatml``, ``mistral``) are written in the same
jinja form, so there is one rendering path; each also names the stop strings its format ends turns with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import Tokenizer


class TemplateError(ValueError):
    """A chat template refused the messages (e.g. roles that do not alternate)."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` as transformers' AssistantTracker: renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


_SYSTEM_FIRST = "{% set sys = messages[0].content if messages and messages[0].role == 'system' else none %}" \
    "{% set msgs = messages[1:] if sys is not none else messages %}"

NAMED_TEMPLATES: dict[str, dict[str, Any]] = {
    "llama-3": {
        "source": (
            "{{ bos_token }}{% for m in messages %}"
            "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + (m.content | trim) + '<|eot_id|>' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
            "{% endif %}"
        ),
        "stop": ["<|eot_id|>", "<|end_of_text|>"],
        "tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    },
    "llama-2": {
        "source": _SYSTEM_FIRST + (
            "{% for m in msgs %}"
            "{% if m.role == 'user' %}"
            "{% set text = ('<<SYS>>\n' + sys + '\n<</SYS>>\n\n' + m.content) if (loop.first and sys) else m.content %}"
            "{{ bos_token + '[INST] ' + (text | trim) + ' [/INST]' }}"
            "{% else %}{{ ' ' + (m.content | trim) + ' ' + eos_token }}{% endif %}"
            "{% endfor %}"
        ),
        "stop": ["</s>"],
        "tokens": {"bos_token": "<s>", "eos_token": "</s>"},
    },
    "mistral": {
        "source": _SYSTEM_FIRST + (
            "{{ bos_token }}{% for m in msgs %}"
            "{% if m.role == 'user' %}"
            "{% set text = (sys + '\n\n' + m.content) if (loop.first and sys) else m.content %}"
            "{{ '[INST] ' + text + ' [/INST]' }}"
            "{% else %}{{ m.content + eos_token }}{% endif %}"
            "{% endfor %}"
        ),
        "stop": ["</s>"],
        "tokens": {"bos_token": "<s>", "eos_token": "</s>"},
    },
    "chatml": {
        "source": (
            "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        ),
        "stop": ["<|im_end|>"],
        "tokens": {"eos_token": "<|im_end|>"},
    },
    "phi-2": {
        "source": _SYSTEM_FIRST + (
            "{% if sys %}{{ sys + '\n' }}{% endif %}"
            "{% for m in msgs %}"
            "{{ ('Instruct: ' if m.role == 'user' else 'Output: ') + m.content + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ 'Output:' }}{% endif %}"
        ),
        "stop": ["<|endoftext|>", "\nInstruct:"],
        "tokens": {"eos_token": "<|endoftext|>"},
    },
}


def _message_dict(message: Any) -> dict[str, Any]:
    """A message as templates expect it: a dict with a string ``content`` (text parts joined)."""
    if hasattr(message, "model_dump"):
        message = message.model_dump(exclude_none=True)
    message = dict(message)
    content = message.get("content")
    if isinstance(content, list):
        message["content"] = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    elif content is None:
        message["content"] = ""
    if message.get("role") == "developer":
        message["role"] = "system"
    return message


@dataclass
class ChatTemplate:
    """A compiled template plus what it needs to render and to stop."""

    name: str
    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)
    stop_strings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._template = compile_template(self.source)

    def render(self, messages: list[Any], add_generation_prompt: bool = True, **extra: Any) -> str:
        variables = {"bos_token": "", "eos_token": "", **self.special_tokens, **extra}
        try:
            return self._template.render(
                messages=[_message_dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template {self.name!r} failed: {exc}") from exc


def hf_chat_template(directory: str | Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The chat template a Hugging Face tokenizer ships, if any ("default" of a named list)."""
    jinja_file = Path(directory) / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = by_name.get("default") or next(iter(by_name.values()), None)
    return template if isinstance(template, str) else None


def load_chat_template(name: str, directory: str | Path, tokenizer: Tokenizer,
                       chat_template: str | None = None) -> ChatTemplate:
    """``auto``: ``chat_template`` (the bundle's chat config) or the tokenizer's own template, chatml if
    there is none; otherwise the named template."""
    special = tokenizer.special_tokens()
    if name != "auto" and name not in NAMED_TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: auto, {', '.join(NAMED_TEMPLATES)}")
    if name == "auto":
        source = chat_template or hf_chat_template(directory, tokenizer.config)
        if source is not None:
            stops = [special["eos_token"]] if "eos_token" in special else []
            return ChatTemplate("auto", source, special, stops)
        name = "chatml"
    spec = NAMED_TEMPLATES[name]
    tokens = {**spec["tokens"], **special}
    return ChatTemplate(name, spec["source"], tokens, list(spec["stop"]))
