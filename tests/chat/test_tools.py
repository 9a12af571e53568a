"""fastsft.chat.tools: tool calls in an answer read back into OpenAI's `tool_calls`, in each format the
built-in templates teach (Hermes blocks, a bare JSON call, Mistral's `[TOOL_CALLS]` list)."""

import json

import pytest

from fastsft.chat.tools import parse_tool_calls

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def calls(text):
    got = parse_tool_calls(text, TOOLS)
    return (
        None
        if got is None
        else [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got]
    )


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}',  # llama3 writes `parameters`
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
    ],
)
def test_each_format_reads_back_as_one_call(text):
    assert calls(text) == [("get_weather", {"city": "Oslo"})]


def test_several_blocks_are_several_calls_with_their_own_ids():
    text = "".join(
        f'<tool_call>{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}</tool_call>'
        for c in ("A", "B")
    )
    got = parse_tool_calls(text, TOOLS)
    assert [json.loads(c["function"]["arguments"]) for c in got] == [{"city": "A"}, {"city": "B"}]
    assert got[0]["type"] == "function" and got[0]["id"] != got[1]["id"]


@pytest.mark.parametrize(
    "text",
    [
        "It is sunny in Oslo.",  # prose
        '{"name": "send_mail", "arguments": {}}',  # not one of the tools
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"name": "get_weather"}</tool_call><tool_call>{"name": "nope"}</tool_call>',
        "[]",
    ],
)
def test_no_call_to_a_known_tool_is_none(text):
    assert parse_tool_calls(text, TOOLS) is None
