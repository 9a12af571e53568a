"""`fastsft serve`: an OpenAI-compatible HTTP API and a chat page for a run directory or a model.

    fastsft serve runs/tiny            # http://127.0.0.1:8000/ (chat page), http://127.0.0.1:8000/v1 (API)

Endpoints: `POST /v1/chat/completions` (server-sent events with `"stream": true`), `POST /v1/completions`,
`GET /v1/models`, and for the page `GET /` plus `GET /fastsft/info`, `/fastsft/report`, `/fastsft/loss.png`.
Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The model is loaded once by `fastsft.use.load_for_use` and answers through `fastsft.chat.generation.generate_ids`
(chat template, end-of-turn stop). For a run directory or an adapter, the base model is the same
weights with the adapter disabled (PEFT's `disable_adapter()`), served as the model id `NAME:base`.

Generation is serialized: one worker thread runs the requests in arrival order, at most `max_queue`
wait behind the one running, and a request beyond that is answered 503 at once (a stream too, before
it starts). A client that goes away cancels its generation, streamed or not. Request bodies are
limited in size; the server binds to loopback unless told otherwise; an API key makes every route but
`/` and `/health` ask for `Authorization: Bearer KEY`.

HTTP limits, so that one client cannot keep the others out: a connection has `header_timeout` seconds
to send a whole request header (uvicorn itself waits forever for one) and `body_timeout` for its body;
one remote address holds at most `client_connections` connections (the next ones are answered 503 and
closed), half of the server's bound; a loopback server answers only to loopback Host names.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import time
import uuid
from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse

from fastsft.chat.tools import parse_tool_calls
from fastsft.errors import BackendError
from fastsft.use.load import load_for_use
from fastsft.use.serve.engine import Engine, Job, Result
from fastsft.use.serve.protocol import (
    APIError,
    Params,
    ServeSettings,
    _held_back,
    cut_at_stop,
    parse_json,
    parse_messages,
    parse_params,
    parse_tools,
)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is this machine only:
    localhost, 127.0.0.0/8 or ::1."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# An oversized body up to this many times the limit is read to its end (and dropped) before the 413.
DRAIN_LIMIT_FACTOR = 8


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
        yield _sse(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [],
                "usage": _usage(result),
            }
        )
    yield _sse("[DONE]")


class _HeldStream(StreamingResponse):
    """A streamed response that holds a place in the engine's queue until it has been sent (or failed)."""

    def __init__(self, content, *, release, **kw):
        super().__init__(content, **kw)
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


class _LoopbackHost:
    """ASGI middleware of a loopback server: a request whose Host header is not a loopback name (any of
    127.0.0.0/8, localhost, [::1]) with an optional numeric port is refused (400), so that a web page
    whose own name is made to resolve to 127.0.0.1 (DNS rebinding) cannot read the API as if it were the
    page. Any port: `ssh -L 9000:127.0.0.1:8000` makes the browser send `Host: localhost:9000`, and a
    loopback name can only come from a page on this machine, which could reach the port anyway."""

    def __init__(self, app):
        self.app = app

    @staticmethod
    def allowed(host: str) -> bool:
        if host.startswith("["):  # [::1]:8000
            name, _, rest = host[1:].partition("]")
            if rest and not rest.startswith(":"):
                return False
            port = rest[1:]
        else:
            name, _, port = host.partition(":")
        if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            return False
        return is_loopback(name)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self.allowed(host):
                response = _error(
                    APIError(
                        400,
                        f"Invalid host header {host!r}: this server answers to "
                        "loopback names only (127.0.0.1, localhost, [::1]).",
                        code="invalid_host",
                    )
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _http_error(request: Request, exc: HTTPException):
    status = exc.status_code
    message = {
        404: f"No route {request.url.path}.",
        405: f"{request.method} is not allowed on {request.url.path}.",
    }
    return _error(
        APIError(
            status,
            message.get(status, str(exc.detail)),
            code={404: "not_found", 405: "method_not_allowed"}.get(status),
        )
    )


async def _server_error(request: Request, exc: Exception):
    return _error(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


class _App:
    """The routes of one served model: the OpenAI-compatible API, the chat page and its data."""

    def __init__(self, loaded, settings: ServeSettings):
        self.loaded = loaded
        self.settings = settings
        self.engine = Engine(loaded, max_queue=settings.max_queue)
        self.name = settings.model_name or loaded.name
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
            try:
                async with asyncio.timeout(self.settings.body_timeout):  # a body sent byte by byte
                    async for chunk in request.stream():
                        size += len(chunk)
                        if size > DRAIN_LIMIT_FACTOR * limit:
                            break
                        if size <= limit:
                            chunks.append(chunk)
            except TimeoutError:
                raise APIError(
                    408,
                    f"The request body did not arrive within {self.settings.body_timeout:g} s.",
                    code="request_timeout",
                ) from None
        if max(size, declared) > limit:
            raise APIError(413, f"The request body is over {limit} bytes.", code="request_too_large")
        return parse_json(b"".join(chunks))

    def pick_model(self, body: dict) -> bool:
        """Whether the request asks for the base model (the adapter disabled)."""
        model = body.get("model")
        if model == self.name:
            return False
        if self.base_name and model == self.base_name:
            return True
        known = ", ".join(f"`{m}`" for m in (self.name, self.base_name) if m)
        raise APIError(
            404,
            f"The model `{model}` does not exist here; this server has {known}.",
            param="model",
            code="model_not_found",
        )

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
            # The place in the queue is taken now: a full queue is a 503, not an error event in a 200
            # stream; it is given back when the response ends, whether or not the stream ever started.
            release = self.engine.reserve()
            return _HeldStream(
                self.stream(rid, model, prompt_ids, params, base, chat=chat),
                release=release,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        async def gone():  # the body is read: the next message is the disconnect (or the response's end)
            while (await request.receive())["type"] != "http.disconnect":
                pass

        with self.engine.admit():
            result = await self.engine.run(Job(prompt_ids, params, base=base), abandoned=gone)
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
            }
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
                yield _sse(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": int(time.time()),
                        "model": model,
                        "choices": [],
                        "usage": _usage(result),
                    }
                )
            yield _sse("[DONE]")
        except Exception as e:  # noqa: BLE001 - told to the client in the stream, then logged
            yield _sse(
                APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body()
            )
            raise
        finally:
            job.cancel.set()  # a client that went away frees the model at the next token

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
    """The Starlette app serving `loaded` (a fastsft.use.LoadedForUse)."""
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
    if is_loopback(settings.host):
        from starlette.middleware import Middleware

        middleware.append(Middleware(_LoopbackHost))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.engine = a.engine
    app.state.settings = settings
    app.state.model_ids = [m for m in (a.name, a.base_name) if m]
    return app


def serve(model_ref, settings: ServeSettings, *, console=None, policy=None) -> None:
    """Load `model_ref` (run directory, adapter or model folder) and serve it until Ctrl-C. `policy`
    (backends.LoadPolicy; default: no remote code, no pickle) is what loading may do."""
    import socket

    from rich.console import Console

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
    console.print(f"fastsft serve: {loaded.ref or loaded.path} ({loaded.kind}) as {ids}", highlight=False)
    console.print(f"  chat page  {url}/\n  API        {url}/v1  (OpenAI-compatible)", highlight=False)
    warning = exposure_warning(settings)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    server = make_server(app, settings)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        app.state.engine.stop()


def exposure_warning(settings: ServeSettings) -> str | None:
    """The startup warning for a server that other machines can reach without a key (none on loopback)."""
    if is_loopback(settings.host) or settings.api_key is not None:
        return None
    return f"listening on {settings.host} without --api-key: anyone who can reach this machine can use the model."


def make_server(app, settings: ServeSettings):
    """The uvicorn server for `app`, with the HTTP limits of `settings` (see the module's docstring)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        http=_guarded_protocol(settings),
        # A connection bound beyond the request queue (plain 503 from uvicorn); the queue answers first.
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive,
    )
    return uvicorn.Server(config)


def _guarded_protocol(settings: ServeSettings):
    """uvicorn's h11 protocol with a header deadline and a bound on connections per remote address."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.utils import get_remote_addr

    busy = json.dumps(
        APIError(
            503,
            "Too many connections from your address; close some and retry.",
            type="server_error",
            code="too_many_connections",
        ).body()
    ).encode()
    refusal = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        b"connection: close\r\ncontent-length: " + str(len(busy)).encode() + b"\r\n\r\n" + busy
    )
    open_per_client: dict[str, int] = {}  # remote address -> open connections, for this server

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            peer = get_remote_addr(transport)
            self.peer = peer[0] if peer else None
            self.refused = open_per_client.get(self.peer, 0) >= settings.client_connections
            self.header_deadline = None
            if self.refused:  # never handed to uvicorn: answered and closed at once
                transport.write(refusal)
                transport.close()
                return
            open_per_client[self.peer] = open_per_client.get(self.peer, 0) + 1
            super().connection_made(transport)
            self.watch_header()

        def connection_lost(self, exc):
            if self.refused:
                return
            left = open_per_client.pop(self.peer, 1) - 1
            if left:
                open_per_client[self.peer] = left
            self.stop_watch()
            super().connection_lost(exc)

        def data_received(self, data):
            if self.refused:
                return
            super().data_received(data)
            self.watch_header()

        def awaiting_header(self) -> bool:
            return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

        def watch_header(self):
            """Arm the deadline when a request header is awaited (a new connection, or the first bytes of
            the next request on a kept-alive one); disarm it once the header is in."""
            if not self.awaiting_header():
                self.stop_watch()
            elif self.header_deadline is None and (self.cycle is None or self.conn.trailing_data[0]):
                self.header_deadline = self.loop.call_later(settings.header_timeout, self.header_late)

        def stop_watch(self):
            if self.header_deadline is not None:
                self.header_deadline.cancel()
                self.header_deadline = None

        def header_late(self):
            self.header_deadline = None
            if self.awaiting_header() and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
