"""`fastsft serve`: an OpenAI-compatible HTTP API and a chat page for a run directory or a model.

    fastsft serve runs/tiny            # http://127.0.0.1:8000/ (chat page), http://127.0.0.1:8000/v1 (API)

Endpoints: `POST /v1/chat/completions` (server-sent events with `"stream": true`), `POST /v1/completions`,
`GET /v1/models`, and for the page `GET /` plus `GET /fastsft/info`, `/fastsft/report`, `/fastsft/loss.png`.
Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The model is loaded once by `fastsft.use.load_for_use` and answers through `fastsft.chat.generation.generate_ids`
(chat template, end-of-turn stop). For a run directory or an adapter, the base model is the same
weights with the adapter disabled (PEFT's `disable_adapter()`), served as the model id `NAME:base`.

Generation is serialized: one worker thread runs the requests in arrival order, at most `max_queue`
wait behind the one running, and a request beyond that is answered 503 at once. Request bodies are
limited in size; the server binds to loopback unless told otherwise; an API key makes every route but
`/` and `/health` ask for `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse

from fastsft.errors import FastSFTError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_STOP = 4  # as OpenAI


# An oversized body up to this many times the limit is read to its end (and dropped) before the 413.
DRAIN_LIMIT_FACTOR = 8


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


# ----------------------------------------------------------------------------------------------
# Request parameters
# ----------------------------------------------------------------------------------------------


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
                raise APIError(400, f"{where}: content part of type {kind!r}: this model reads text only.",
                               param="messages")  # fmt: skip
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


def parse_tool_calls(text: str, tools: list[dict]) -> list[dict] | None:
    """Tool calls in an answer, as the built-in templates write them: Hermes `<tool_call>{...}</tool_call>`
    blocks (chatml, qwen2.5), or an answer that is only a JSON call `{"name", "arguments"|"parameters"}`
    or a list of them (llama3, mistral's `[TOOL_CALLS] [...]`). None when the answer holds no call to
    one of `tools`."""
    import re

    names = {t["function"]["name"] for t in tools}
    blocks = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.DOTALL)
    candidates = []
    if blocks:
        for b in blocks:
            try:
                candidates.append(json.loads(b))
            except json.JSONDecodeError:
                return None
    else:
        body = text.strip()
        if body.startswith("[TOOL_CALLS]"):
            body = body[len("[TOOL_CALLS]") :].strip()
        if not body.startswith(("{", "[")):
            return None
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        candidates = value if isinstance(value, list) else [value]
    calls = []
    for c in candidates:
        if not isinstance(c, dict) or c.get("name") not in names:
            return None
        args = c.get("arguments", c.get("parameters", {}))
        calls.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {
                    "name": c["name"],
                    "arguments": args if isinstance(args, str) else json.dumps(args),
                },
            }
        )
    return calls or None


# ----------------------------------------------------------------------------------------------
# The model: one worker thread, a bounded queue
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: Params
    base: bool = False  # the adapter disabled
    on_text: object = None  # called from the worker thread with each piece of text (streaming)
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Result:
    ids: list[int]
    ended_turn: bool  # stopped on the end-of-turn token
    prompt_tokens: int


class Engine:
    """The loaded model behind a one-thread executor: generation is serialized, and at most `max_queue`
    requests wait behind the one running (`admit` raises a 503 APIError beyond that)."""

    def __init__(self, loaded, *, max_queue: int):
        self.loaded = loaded
        self.max_queue = max_queue
        self.pending = 0  # admitted and not finished (the running one included); touched on the event loop
        self.active: set[Job] = set()  # submitted jobs, cancelled all at once when the server stops
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsft-generate")
        self.has_base = hasattr(loaded.model, "disable_adapter") and loaded.kind in ("run", "adapter")
        cfg = getattr(loaded.model, "config", None)
        self.context = getattr(cfg, "max_position_embeddings", None)

    def check_room(self):
        if self.pending > self.max_queue:
            raise APIError(
                503,
                f"The server is busy: {self.pending} requests are being answered or waiting (the queue "
                f"holds {self.max_queue}). Retry shortly.",
                type="server_error",
                code="server_overloaded",
            )

    @contextlib.contextmanager
    def admit(self):
        self.check_room()
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        from fastsft.chat.templates import chat_ids

        tok = self.loaded.tokenizer
        try:
            ids = chat_ids(tok, messages, add_generation_prompt=True, tools=tools)[0].tolist()
            if tools and ids == chat_ids(tok, messages, add_generation_prompt=True)[0].tolist():
                raise APIError(
                    400,
                    "`tools`: this model's chat template does not write tools into the prompt, so the model "
                    "would never see them. Serve a model whose template renders tools (chatml, qwen2.5, "
                    "llama3, mistral), or leave out `tools`.",
                    param="tools",
                )
        except FastSFTError as e:
            raise APIError(400, str(e), param="tools" if tools else "messages") from None
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - the template raised (raise_exception) on these messages
            raise APIError(
                400, f"the chat template cannot render these messages: {e}", param="messages"
            ) from None
        return ids

    def text_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            return list(self.loaded.tokenizer(prompt)["input_ids"])
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            vocab = len(self.loaded.tokenizer)
            if any(t < 0 or t >= vocab for t in prompt):
                raise APIError(400, f"`prompt`: token ids must be in [0, {vocab}).", param="prompt")
            return list(prompt)
        raise APIError(400, "`prompt` must be a non-empty string (or one string in a list, or token ids).",
                       param="prompt")  # fmt: skip

    def check_length(self, prompt_ids: list[int], params: Params) -> None:
        if self.context and len(prompt_ids) + params.max_tokens > self.context:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens. However, you requested "
                f"{len(prompt_ids) + params.max_tokens} tokens ({len(prompt_ids)} in the messages, "
                f"{params.max_tokens} in the completion). Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )

    def _run(self, job: Job) -> Result:
        """In the worker thread: one generation through fastsft.chat.generation.generate_ids."""
        from transformers import StoppingCriteria, TextStreamer

        from fastsft.chat.generation import generate_ids

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return job.cancel.is_set()

        streamer = None
        if job.on_text is not None:

            class _Streamer(TextStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False):
                    if text:
                        job.on_text(text)

            streamer = _Streamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        model = self.loaded.model
        off = model.disable_adapter() if job.base else contextlib.nullcontext()
        p = job.params
        with off:
            ids, ended = generate_ids(
                model,
                self.loaded.tokenizer,
                job.prompt_ids,
                eot=self.loaded.eot,
                max_new_tokens=p.max_tokens,
                temperature=p.temperature,
                top_p=p.top_p,
                seed=p.seed,
                stop=p.stop or None,
                streamer=streamer,
                stopping_criteria=[_Cancelled()],
            )
        return Result(ids, ended, len(job.prompt_ids))

    async def run(self, job: Job) -> Result:
        self.active.add(job)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self._run, job)
        finally:
            self.active.discard(job)

    def stop(self) -> None:
        """Cancel what runs and waits (each stops at its next token), so that the process can exit."""
        for job in list(self.active):
            job.cancel.set()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def decode(self, ids: list[int], *, special: bool = False) -> str:
        return self.loaded.tokenizer.decode(ids, skip_special_tokens=not special)


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------


def _usage(result: Result) -> dict:
    n = len(result.ids)
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": result.prompt_tokens + n,
    }


def _finish(result: Result, stopped_by_string: bool, params: Params) -> str:
    return (
        "stop" if result.ended_turn or stopped_by_string or len(result.ids) < params.max_tokens else "length"
    )


def _sse(obj) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n"


def _error(e: APIError):
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _chunk(rid, model, *, chat: bool, delta=None, text=None, finish=None) -> dict:
    if chat:
        choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


async def _one_chunk_stream(rid, model, text, calls, finish, result, params):
    yield _sse(_chunk(rid, model, chat=True, delta={"role": "assistant", "content": ""}))
    if calls:
        delta = {"tool_calls": [dict(c, index=i) for i, c in enumerate(calls)]}
    else:
        delta = {"content": text}
    yield _sse(_chunk(rid, model, chat=True, delta=delta))
    yield _sse(_chunk(rid, model, chat=True, finish=finish))
    if params.include_usage:
        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model, "choices": [], "usage": _usage(result)})  # fmt: skip
    yield _sse("[DONE]")


async def _http_error(request: Request, exc: HTTPException):
    status = exc.status_code
    message = {
        404: f"No route {request.url.path}.",
        405: f"{request.method} is not allowed on {request.url.path}.",
    }
    return _error(APIError(status, message.get(status, str(exc.detail)),
                          code={404: "not_found", 405: "method_not_allowed"}.get(status)))  # fmt: skip


async def _server_error(request: Request, exc: Exception):
    return _error(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


class _App:
    """The routes of one served model: the OpenAI-compatible API, the chat page and its data."""

    def __init__(self, loaded, settings: ServeSettings):
        self.loaded = loaded
        self.settings = settings
        self.engine = Engine(loaded, max_queue=settings.max_queue)
        self.name = settings.model_name or loaded.path.resolve().name
        self.base_name = f"{self.name}:base" if self.engine.has_base else None
        self.created = int(time.time())
        self.run_dir = loaded.run_dir
        self.page = (
            resources.files("fastsft.use.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
        )

    def check_auth(self, request: Request):
        if self.settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), self.settings.api_key.encode()
        ):
            raise APIError(
                401,
                "Incorrect API key provided. Send it as `Authorization: Bearer KEY` (the key given to "
                "`fastsft serve --api-key`).",
                code="invalid_api_key",
            )

    async def read_json(self, request: Request) -> dict:
        # JSON only: a form or text/plain POST is what another web site can make a browser send
        # without asking (no CORS preflight), so it is refused before anything runs.
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise APIError(
                415,
                f"Content-Type {media or '(none)'}: send the request as JSON with `Content-Type: "
                "application/json` (curl: -H 'Content-Type: application/json').",
                code="unsupported_media_type",
            )
        # An oversized body is read to its end and dropped before the 413, as nginx's lingering close
        # does: answering and closing while the client still sends makes its kernel see a reset, and a
        # client that writes the whole body before it reads (urllib, requests) then gets a broken pipe
        # instead of the 413. A body past DRAIN_LIMIT_FACTOR times the limit is cut off at once.
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        declared = int(declared) if declared.isdigit() else 0
        chunks, size = [], 0
        if declared <= DRAIN_LIMIT_FACTOR * limit:
            async for chunk in request.stream():
                size += len(chunk)
                if size > DRAIN_LIMIT_FACTOR * limit:
                    break
                if size <= limit:
                    chunks.append(chunk)
        if max(size, declared) > limit:
            raise APIError(413, f"The request body is over {limit} bytes.", code="request_too_large")
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"The request body is not valid JSON: {e}.") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.")
        return body

    def pick_model(self, body: dict) -> bool:
        """Whether the request asks for the base model (the adapter disabled)."""
        model = body.get("model")
        if model == self.name:
            return False
        if self.base_name and model == self.base_name:
            return True
        known = ", ".join(f"`{m}`" for m in (self.name, self.base_name) if m)
        raise APIError(404, f"The model `{model}` does not exist here; this server has {known}.",
                       param="model", code="model_not_found")  # fmt: skip

    def api(self, handler):
        async def endpoint(request: Request):
            try:
                self.check_auth(request)
                return await handler(request)
            except APIError as e:
                return _error(e)

        return endpoint

    async def models(self, request: Request):
        data = [{"id": self.name, "object": "model", "created": self.created, "owned_by": "fastsft"}]
        if self.base_name:
            data.append(
                {"id": self.base_name, "object": "model", "created": self.created, "owned_by": "fastsft"}
            )
        return JSONResponse({"object": "list", "data": data})

    async def complete(self, request: Request, *, chat: bool):
        body = await self.read_json(request)
        base = self.pick_model(body)
        params = parse_params(body, self.settings, chat=chat)
        tools = None
        if chat:
            tools = parse_tools(body)
            prompt_ids = self.engine.chat_prompt(parse_messages(body), tools)
        else:
            prompt_ids = self.engine.text_prompt(body.get("prompt"))
        self.engine.check_length(prompt_ids, params)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        model = body["model"]
        if params.stream and not tools:
            self.engine.check_room()  # a full queue is a 503, not an error event in a 200 stream
            return StreamingResponse(
                self.stream(rid, model, prompt_ids, params, base, chat=chat),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        with self.engine.admit():
            result = await self.engine.run(Job(prompt_ids, params, base=base))
        text, cut = cut_at_stop(self.engine.decode(result.ids), params.stop)
        text = text.strip() if chat else text
        finish = _finish(result, cut, params)
        calls = parse_tool_calls(self.engine.decode(result.ids, special=True), tools) if tools else None
        if calls:
            finish = "tool_calls"
        if params.stream:  # with tools: the whole answer, then one chunk (a call is parsed once complete)
            return StreamingResponse(
                _one_chunk_stream(rid, model, text, calls, finish, result, params),
                media_type="text/event-stream",
            )
        if chat:
            message = {"role": "assistant", "content": None if calls else text}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return JSONResponse(
            {
                "id": rid,
                "object": obj,
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": _usage(result),
            }  # fmt: skip
        )

    async def stream(self, rid, model, prompt_ids, params, base, *, chat: bool):
        """Server-sent events: the text as it is generated, with stop strings held back until they are
        known not to be one; the generation is cancelled when the client goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(
            prompt_ids, params, base=base, on_text=lambda t: loop.call_soon_threadsafe(queue.put_nowait, t)
        )
        try:
            engine_cm = self.engine.admit()
            engine_cm.__enter__()
        except APIError as e:  # the queue is full: one error event
            yield _sse(e.body())
            yield _sse("[DONE]")
            return
        try:
            if chat:
                yield _sse(_chunk(rid, model, chat=True, delta={"role": "assistant", "content": ""}))
            task = asyncio.ensure_future(self.engine.run(job))
            task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
            pending, sent_any, stopped_by_string = "", False, False
            while True:
                piece = await queue.get()
                if piece is None:
                    break
                if stopped_by_string:
                    continue
                pending += piece
                pending, stopped_by_string = cut_at_stop(pending, params.stop)
                if stopped_by_string:
                    job.cancel.set()
                    out, pending = pending, ""
                else:
                    keep = _held_back(pending, params.stop)
                    out, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
                if chat and not sent_any:
                    out = out.lstrip()
                if out:
                    sent_any = True
                    yield _sse(_chunk(rid, model, chat=chat, delta={"content": out}, text=out))
            result = task.result()
            if pending and not stopped_by_string:
                yield _sse(_chunk(rid, model, chat=chat, delta={"content": pending}, text=pending))
            finish = _finish(result, stopped_by_string, params)
            yield _sse(_chunk(rid, model, chat=chat, finish=finish))
            if params.include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": int(time.time()), "model": model, "choices": [],
                            "usage": _usage(result)})  # fmt: skip
            yield _sse("[DONE]")
        except Exception as e:  # noqa: BLE001 - told to the client in the stream, then logged
            yield _sse(
                APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body()
            )
            raise
        finally:
            job.cancel.set()  # a client that went away frees the model at the next token
            engine_cm.__exit__(None, None, None)

    async def chat_completions(self, request: Request):
        return await self.complete(request, chat=True)

    async def completions(self, request: Request):
        return await self.complete(request, chat=False)

    async def info(self, request: Request):
        report = self.run_dir is not None and (self.run_dir / "report.md").exists()
        return JSONResponse(
            {
                "model": self.name,
                "base_model": self.base_name,
                "kind": self.loaded.kind,
                "path": str(self.loaded.path),
                "report": report,
                "loss_png": self.run_dir is not None and (self.run_dir / "loss.png").exists(),
                "max_tokens_limit": self.settings.max_tokens_limit,
            }
        )

    async def report(self, request: Request):
        path = self.run_dir / "report.md" if self.run_dir is not None else None
        if path is None or not path.exists():
            raise APIError(
                404, f"{self.loaded.path} is not a run directory with a report.md.", code="not_found"
            )
        return JSONResponse({"markdown": path.read_text(encoding="utf-8")})

    async def loss_png(self, request: Request):
        path = self.run_dir / "loss.png" if self.run_dir is not None else None
        if path is None or not path.exists():
            raise APIError(404, "no loss.png: the model is not a run directory.", code="not_found")
        return FileResponse(path, media_type="image/png")

    async def index(self, request: Request):
        return HTMLResponse(self.page)

    async def health(self, request: Request):
        return JSONResponse({"status": "ok"})


def create_app(loaded, settings: ServeSettings):
    """The Starlette app serving `loaded` (a fastsft.use.Loaded)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    a = _App(loaded, settings)
    routes = [
        Route("/", a.index),
        Route("/health", a.health),
        Route("/v1/models", a.api(a.models)),
        Route("/v1/chat/completions", a.api(a.chat_completions), methods=["POST"]),
        Route("/v1/completions", a.api(a.completions), methods=["POST"]),
        Route("/fastsft/info", a.api(a.info)),
        Route("/fastsft/report", a.api(a.report)),
        Route("/fastsft/loss.png", a.api(a.loss_png)),
    ]
    middleware = []
    if settings.host in LOOPBACK:
        # A loopback server answers only to loopback names: a web page whose own name is made to resolve
        # to 127.0.0.1 (DNS rebinding) is refused instead of reading the API as if it were the page.
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        middleware.append(
            Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "::1", "[::1]"])
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.engine = a.engine
    app.state.model_ids = [m for m in (a.name, a.base_name) if m]
    return app


def serve(model_ref, settings: ServeSettings, *, console=None, policy=None) -> None:
    """Load `model_ref` (run directory, adapter or model folder) and serve it until Ctrl-C. `policy`
    (backends.LoadPolicy; default: no remote code, no pickle) is what loading may do."""
    import socket

    import uvicorn
    from rich.console import Console

    from fastsft.errors import BackendError
    from fastsft.use.load import load_for_use

    console = console or Console(stderr=True)
    # Bind before loading, so that a port in use is told at once, not after the model has loaded.
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as e:
        sock.close()
        raise BackendError(
            f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}. Pick another --port "
            "(or stop what holds this one)."
        ) from None
    port = sock.getsockname()[1]
    try:
        loaded = load_for_use(model_ref, policy=policy)
        app = create_app(loaded, settings)
    except BaseException:
        sock.close()  # a model that fails to load leaves the port free
        raise
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{host}:{port}"
    ids = ", ".join(app.state.model_ids)
    console.print(f"fastsft serve: {loaded.path} ({loaded.kind}) as {ids}", highlight=False)
    console.print(f"  chat page  {url}/\n  API        {url}/v1  (OpenAI-compatible)", highlight=False)
    if settings.host not in LOOPBACK:
        if settings.api_key is None:
            console.print(
                f"[yellow]warning:[/] listening on {settings.host} without --api-key: anyone who can reach "
                "this machine can use the model.",
                highlight=False,
            )
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        # A connection bound beyond the request queue (plain 503 from uvicorn); the queue answers first.
        limit_concurrency=4 * settings.max_queue + 32,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        app.state.engine.stop()


__all__ = ["serve", "create_app", "ServeSettings", "APIError", "parse_tool_calls", "cut_at_stop"]
