"""The OpenAI protocol of `fastsft serve`: the server's settings, errors in OpenAI's shape, and a request
body read into checked parameters (`parse_json`, `parse_params`, `parse_messages`, `parse_tools`); stop
strings cut from the text as it streams.

Everything a request can ask for is bounded here, before it reaches the model: numbers are finite and
in range, stop strings are few and short, JSON is shallow, and a parameter this server cannot honour
is refused (400) instead of silently ignored (`UNSUPPORTED`); the few that change nothing an answer
says are ignored (`IGNORED`), as the README lists.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from fastsft.data import parse_messages as normalise
from fastsft.data import parse_tools as check
from fastsft.errors import DataError

MAX_STOP = 4  # as OpenAI
MAX_STOP_CHARS = 256  # per stop string; matching costs this many characters per generated token at most
MAX_JSON_DEPTH = 32  # nesting of objects and lists in a request body (a chat request needs 6)
INT64 = 2**63  # seeds are int64, as torch.manual_seed takes them

# The request keys each endpoint reads; any other key is a 400, as OpenAI answers an unknown argument.
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n"}
CHAT_KEYS = COMMON | {"messages", "max_completion_tokens", "tools", "tool_choice"}
COMPLETION_KEYS = COMMON | {"prompt", "echo"}
# Accepted and ignored: they change nothing in the answer (bookkeeping, or what this server does anyway).
IGNORED = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
}
# Refused unless left at the value that means "off": this server cannot honour them.
UNSUPPORTED = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None  # the id in /v1/models; default: the folder's name
    max_queue: int = 64  # requests waiting behind the one being answered (`serve --max-queue`)
    max_body_bytes: int = 1_000_000
    max_tokens_limit: int = 2048  # the most `max_tokens` a request may ask for
    default_max_tokens: int = 256
    log_level: str = "info"
    header_timeout: float = (
        10.0  # seconds from a connection (or its next request's first byte) to a whole header
    )
    body_timeout: float = 30.0  # seconds to read a request body once its header is in
    keep_alive: float = 5.0  # seconds an idle connection is kept between requests
    per_client_connections: int | None = None  # open connections per remote address (None: half the limit)

    @property
    def max_connections(self) -> int:
        """The server's connection budget (transport.ConnectionBudget), beyond the request queue."""
        return 4 * self.max_queue + 32

    @property
    def client_connections(self) -> int:
        return self.per_client_connections or self.max_connections // 2


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
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"`{key}` must be a finite number, got {value}.", param=key)
    if value > hi or value < lo or (lo_open and value == lo):
        low = f"above {lo:g}" if lo_open else f"at least {lo:g}"
        shown = str(value) if len(str(value)) <= 30 else str(value)[:30] + "..."
        raise APIError(400, f"`{key}` must be {low} and at most {hi:g}, got {shown}.", param=key)
    return value


def parse_json(raw: bytes) -> dict:
    """A request body -> its JSON object; 400 for bad JSON, a body that is not an object, or nesting
    deeper than MAX_JSON_DEPTH (checked before parsing, so that no parser recursion is spent on it)."""
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise APIError(
            400,
            f"The request body nests objects and lists {depth} deep; at most {MAX_JSON_DEPTH} are accepted.",
        )
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}.") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return body


_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")  # deleted, to leave only the brackets
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def _json_depth(raw: bytes) -> int:
    """The deepest nesting of `[`/`{` in `raw`, strings skipped; linear in the body's size."""
    import re
    from itertools import accumulate

    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0
    outside = re.sub(rb'"(?:[^"\\]|\\.)*"', b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, outside)), default=0)


def check_keys(body: dict, *, chat: bool) -> None:
    """400 for a key this endpoint does not read, or an unsupported one set to something else than off."""
    known = CHAT_KEYS if chat else COMPLETION_KEYS
    for key, value in body.items():
        if key in known or key in IGNORED:
            continue
        if key in UNSUPPORTED:
            if any(value == off and type(value) is type(off) for off in UNSUPPORTED[key]):
                continue
            raise APIError(
                400,
                f"`{key}` is not supported by this server (it can only be left out).",
                param=key,
                code="unsupported_parameter",
            )
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        raise APIError(
            400,
            f"Unrecognized request argument supplied: `{key}` ({endpoint} reads {', '.join(sorted(known))}).",
            param=key,
            code="unknown_parameter",
        )


def parse_params(body: dict, settings: ServeSettings, *, chat: bool) -> Params:
    check_keys(body, chat=chat)
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
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        longest = max(len(s) for s in stop)
        raise APIError(
            400,
            f"`stop`: a stop string may have at most {MAX_STOP_CHARS} characters, got one of {longest}.",
            param="stop",
        )
    n = body.get("n", 1)
    if n not in (1, None):
        raise APIError(400, f"`n` = {n}: this server gives one choice per request (n = 1).", param="n")
    if body.get("echo"):
        raise APIError(400, "`echo` is not supported by this server.", param="echo")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "`stream` must be true or false.", param="stream")
    options = body.get("stream_options")
    options = {} if options is None else options  # `[]` or `""` is no object: refused, not read as none
    if not isinstance(options, dict):
        raise APIError(400, "`stream_options` must be an object.", param="stream_options")
    seed = _number(body, "seed", None, -INT64, INT64 - 1, integer=True)
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise APIError(
            400,
            '`tool_choice`: this server lets the model choose ("auto") or leaves tools out '
            '("none"); it cannot force a call.',
            param="tool_choice",
            code="unsupported_parameter",
        )
    return Params(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 0.0, 0.0, 2.0)),  # greedy unless asked
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        seed=seed,
        stop=stop,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


def parse_messages(body: dict) -> list[dict]:
    """The request's `messages` -> what the chat template takes (fastsft.data.parse_messages)."""
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
        msgs.append({k: v for k, v in m.items() if v is not None})
    try:
        return normalise(msgs, "messages")
    except DataError as e:
        raise APIError(400, str(e), param="messages") from None


def parse_tools(body: dict) -> list[dict] | None:
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
