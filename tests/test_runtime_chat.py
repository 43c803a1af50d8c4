"""The chat CLI in a pseudo-terminal: a question, /stats, /set, multi-line input, /reset, /exit."""

from __future__ import annotations

import sys

import pytest
from runtime_support import tiny  # noqa: F401  (the shared session fixture)

from mlcbuild.runtime.chat import parse_settings

pexpect = pytest.importorskip("pexpect")


def test_parse_settings():
    assert parse_settings("temperature=0.5;max_gen_len=100;stop=end,stop") == {
        "temperature": 0.5, "max_tokens": 100, "stop": ["end", "stop"]}
    with pytest.raises(ValueError, match="known settings"):
        parse_settings("colour=blue")
    with pytest.raises(ValueError, match="not a valid value"):
        parse_settings("top_p=high")


def test_chat_cli_session(tiny):
    cli = "from mlcbuild.cli import main; main()"  # `mlcbuild chat RECIPE`, with this interpreter
    child = pexpect.spawn(sys.executable, ["-c", cli, "chat", str(tiny.recipe)], encoding="utf-8", timeout=60,
                          dimensions=(40, 200))
    try:
        child.expect("/help")
        child.expect(">>> ")
        child.sendline("What is the capital of France?")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"prefill: [0-9.]+ tok/s, decode: [0-9.]+ tok/s")
        child.expect(">>> ")
        child.sendline("/set temperature=0.5;max_gen_len=4;stop=end,stop")
        child.expect(r"temperature=0.5; max_tokens=4; stop=\['end', 'stop'\]")
        child.expect(">>> ")
        child.send("first line\x1b\rsecond line\r")  # escape+enter: a new line inside one prompt
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"completion [1-4] tokens")
        child.expect(">>> ")
        child.sendline("/set nonsense=1")
        child.expect(r"\[error\] cannot set")
        child.expect(">>> ")
        child.sendline("/reset")
        child.expect("RESET CHAT SUCCESS")
        child.expect(">>> ")
        child.sendline("/help")
        child.expect("Multi-line input")
        child.expect(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
