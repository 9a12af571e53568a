"""fastsft/use/serve/wire.py: `fastsft serve`'s answers in OpenAI's shape, without a server: the usage block,
the finish reason, errors with their Retry-After, and the server-sent events of a whole answer."""

import asyncio
import json

import pytest

from fastsft.use.serve.engine import Result
from fastsft.use.serve.protocol import APIError, Params
from fastsft.use.serve.wire import chunk, error_response, finish_reason, one_chunk_stream, sse, usage


def test_usage_counts_the_prompt_and_the_answer():
    assert usage(Result(ids=[5, 6, 7], ended_turn=True, prompt_tokens=11)) == {
        "prompt_tokens": 11,
        "completion_tokens": 3,
        "total_tokens": 14,
    }


def test_finish_reason_is_length_only_when_the_answer_hit_max_tokens():
    full = Result(ids=[1, 2, 3, 4], ended_turn=False, prompt_tokens=2)
    assert finish_reason(full, False, Params(max_tokens=4)) == "length"
    assert finish_reason(full, True, Params(max_tokens=4)) == "stop"  # a stop string ended it
    assert finish_reason(Result([1, 2, 3, 4], True, 2), False, Params(max_tokens=4)) == "stop"
    assert finish_reason(Result([1, 2], False, 2), False, Params(max_tokens=4)) == "stop"


@pytest.mark.parametrize("status, retry", [(400, None), (429, "1"), (503, "1")])
def test_an_error_is_openais_body_with_retry_after_when_busy(status, retry):
    r = error_response(APIError(status, "too many", type="rate_limit_error", param="x"))
    assert r.status_code == status and r.headers.get("retry-after") == retry
    assert json.loads(r.body) == {
        "error": {"message": "too many", "type": "rate_limit_error", "param": "x", "code": None}
    }


def test_chunks_of_chat_and_of_plain_completions():
    c = chunk("id1", "m", chat=True, delta={"content": "hi"}, finish="stop")
    assert (c["object"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) == (
        "chat.completion.chunk",
        {"content": "hi"},
        "stop",
    )
    t = chunk("id1", "m", chat=False, text="hi")
    assert (t["object"], t["choices"][0]["text"], t["id"], t["model"]) == (
        "text_completion",
        "hi",
        "id1",
        "m",
    )
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n' and sse("[DONE]") == "data: [DONE]\n\n"


async def _events(*args):
    return [e async for e in one_chunk_stream(*args)]


def _parse(events):
    assert events[-1] == "data: [DONE]\n\n"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


def test_a_whole_answer_streams_as_role_content_finish_and_usage():
    result = Result(ids=[1, 2], ended_turn=True, prompt_tokens=5)
    params = Params(max_tokens=8, stream=True, include_usage=True)
    got = _parse(asyncio.run(_events("r", "m", "Green.", None, "stop", result, params)))
    assert [g["choices"][0]["delta"] for g in got[:3]] == [
        {"role": "assistant", "content": ""},
        {"content": "Green."},
        {},
    ]
    assert got[2]["choices"][0]["finish_reason"] == "stop"
    assert got[3]["choices"] == [] and got[3]["usage"]["total_tokens"] == 7
    no_usage = _parse(asyncio.run(_events("r", "m", "Green.", None, "stop", result, Params(max_tokens=8))))
    assert len(no_usage) == 3


def test_tool_calls_stream_with_their_index():
    calls = [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}] * 2
    got = _parse(asyncio.run(_events("r", "m", "", calls, "tool_calls", Result([1], True, 1), Params(8))))
    assert [c["index"] for c in got[1]["choices"][0]["delta"]["tool_calls"]] == [0, 1]
    assert "content" not in got[1]["choices"][0]["delta"]
