"""The wire format of `fastsft serve`'s answers, in OpenAI's shape: errors as JSON responses, the usage
block and finish reason of a completion, and server-sent events (a chunk, the stream of a whole answer
sent as one chunk, a streamed response that holds its place in the engine's queue until it is sent).
"""

from __future__ import annotations

import json
import time

from starlette.responses import JSONResponse, StreamingResponse

from fastsft.use.serve.engine import Result
from fastsft.use.serve.protocol import APIError, Params


def usage(result: Result) -> dict:
    n = len(result.ids)
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": result.prompt_tokens + n,
    }


def finish_reason(result: Result, stopped_by_string: bool, params: Params) -> str:
    return (
        "stop" if result.ended_turn or stopped_by_string or len(result.ids) < params.max_tokens else "length"
    )


def sse(obj) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n"


def error_response(e: APIError):
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def chunk(rid, model, *, chat: bool, delta=None, text=None, finish=None) -> dict:
    if chat:
        choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


async def one_chunk_stream(rid, model, text, calls, finish, result, params):
    yield sse(chunk(rid, model, chat=True, delta={"role": "assistant", "content": ""}))
    if calls:
        delta = {"tool_calls": [dict(c, index=i) for i, c in enumerate(calls)]}
    else:
        delta = {"content": text}
    yield sse(chunk(rid, model, chat=True, delta=delta))
    yield sse(chunk(rid, model, chat=True, finish=finish))
    if params.include_usage:
        yield sse(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [],
                "usage": usage(result),
            }
        )
    yield sse("[DONE]")


class HeldStream(StreamingResponse):
    """A streamed response that holds a place in the engine's queue until it has been sent (or failed)."""

    def __init__(self, content, *, release, **kw):
        super().__init__(content, **kw)
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
