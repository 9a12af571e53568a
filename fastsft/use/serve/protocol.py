"""The OpenAI protocol of `fastsft serve`: the server's settings, errors in OpenAI's shape, and a request
body read into checked parameters (`parse_params`, `parse_messages`, `parse_tools`); stop strings cut
from the text as it streams.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

MAX_STOP = 4  # as OpenAI


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None  # the id in /v1/models; default: the folder's name
    max_queue: int = 16  # requests waiting behind the one being answered
    max_body_bytes: int = 1_000_000
    max_tokens_limit: int = 2048  # the most `max_tokens` a request may ask for
    default_max_tokens: int = 256
    log_level: str = "info"


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Params:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, key: str, default, lo: float, hi: float, *, integer: bool = False, lo_open=False):
    value = body.get(key)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise APIError(400, f"`{key}` must be {kind}, got {json.dumps(value)[:60]}.", param=key)
    if value > hi or value < lo or (lo_open and value == lo):
        low = f"above {lo:g}" if lo_open else f"at least {lo:g}"
        raise APIError(400, f"`{key}` must be {low} and at most {hi:g}, got {value}.", param=key)
    return value


def parse_params(body: dict, settings: ServeSettings, *, chat: bool) -> Params:
    limit = settings.max_tokens_limit
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, settings.default_max_tokens, 1, limit, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise APIError(
            400, f"`stop` must be a non-empty string or a list of at most {MAX_STOP} of them.", param="stop"
        )
    n = body.get("n", 1)
    if n not in (1, None):
        raise APIError(400, f"`n` = {n}: this server gives one choice per request (n = 1).", param="n")
    if body.get("echo"):
        raise APIError(400, "`echo` is not supported by this server.", param="echo")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "`stream` must be true or false.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "`stream_options` must be an object.", param="stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "`seed` must be an integer.", param="seed")
    return Params(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 0.0, 0.0, 2.0)),  # greedy unless asked
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        seed=seed,
        stop=stop,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


def _text_of(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text ones are taken."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(
                    400,
                    f"{where}: content part of type {kind!r}: this model reads text only.",
                    param="messages",
                )
        return "".join(parts)
    raise APIError(400, f"{where}: `content` must be a string or a list of text parts.", param="messages")


def parse_messages(body: dict) -> list[dict]:
    """The request's `messages` -> what the chat template takes (fastsft.data.parse_messages)."""
    from fastsft.data import parse_messages as normalise
    from fastsft.errors import DataError

    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise APIError(
            400, "`messages` must be a non-empty list of {role, content} objects.", param="messages"
        )
    msgs = []
    for i, m in enumerate(raw, 1):
        if not isinstance(m, dict):
            raise APIError(400, f"`messages` item {i} must be an object.", param="messages")
        m = dict(m)
        if m.get("role") == "developer":  # OpenAI's newer name for the system role
            m["role"] = "system"
        if "content" in m:
            m["content"] = _text_of(m["content"], f"`messages` item {i}")
        msgs.append({k: v for k, v in m.items() if v is not None})
    try:
        return normalise(msgs, "messages")
    except DataError as e:
        raise APIError(400, str(e), param="messages") from None


def parse_tools(body: dict) -> list[dict] | None:
    from fastsft.data import parse_tools as check
    from fastsft.errors import DataError

    if body.get("tool_choice") == "none" or not body.get("tools"):
        return None
    try:
        return check(body["tools"], "tools")
    except DataError as e:
        raise APIError(400, str(e), param="tools") from None


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _held_back(text: str, stop: list[str]) -> int:
    """How many characters at the end of `text` could begin a stop string (not safe to send yet)."""
    keep = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return keep
