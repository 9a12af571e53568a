"""`fastsft serve`: an OpenAI-compatible HTTP API and a chat page for a run directory or a model.

    fastsft serve runs/tiny            # http://127.0.0.1:8000/ (chat page), http://127.0.0.1:8000/v1 (API)

Endpoints: `POST /v1/chat/completions` (server-sent events with `"stream": true`), `POST /v1/completions`,
`GET /v1/models`, and for the page `GET /` plus `GET /fastsft/info`, `/fastsft/report`, `/fastsft/loss.png`.
Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The model is loaded once by `fastsft.use.load_for_use` and answers through `fastsft.chat.generation.generate_ids`
(chat template, end-of-turn stop). For a run directory or an adapter, the base model is the same
weights with the adapter disabled (PEFT's `disable_adapter()`), served as the model id `NAME:base`.

Generation is serialized: one worker thread runs the requests in turn between clients (remote
addresses), at most `max_queue` wait behind the one running and each address holds its share of them;
a request beyond is answered 429 (503 when the queue is full) at once, a stream too, before it starts
(engine.py). A client that goes away cancels its generation, streamed or not. Request bodies are
limited in size; the server binds to loopback unless told otherwise; an API key makes every route but
`/` and `/health` ask for `Authorization: Bearer KEY`. The page reads the run directory's report.md
and loss.png only as regular files inside it, off the event loop, size-bounded (`read_run_file`).

The HTTP limits (header deadline, the connection budget shared between addresses, loopback Host
names) are in transport.py; the wire format of the answers in wire.py.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
import time
import uuid
from importlib import resources
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from fastsft.chat.tools import parse_tool_calls
from fastsft.errors import BackendError
from fastsft.progress import phase
from fastsft.use.load import load_for_use
from fastsft.use.serve.engine import Engine, Job
from fastsft.use.serve.protocol import (
    APIError,
    ServeSettings,
    _held_back,
    cut_at_stop,
    parse_json,
    parse_messages,
    parse_params,
    parse_tools,
)
from fastsft.use.serve.transport import LoopbackHost, exposure_warning, is_loopback, make_server
from fastsft.use.serve.wire import (
    HeldStream,
    chunk,
    error_response,
    finish_reason,
    one_chunk_stream,
    sse,
    usage,
)

# An oversized body up to this many times the limit is read to its end (and dropped) before the 413.
DRAIN_LIMIT_FACTOR = 8
# What the page may read of a run directory (a report is ~10 KB, a loss curve ~50 KB; a stranger's run
# directory may hold anything under these names).
MAX_REPORT_BYTES = 4_000_000
MAX_PICTURE_BYTES = 8_000_000


def run_file_state(run_dir: Path | None, name: str) -> str | None:
    """None when `run_dir/name` may be served (a regular file inside the run directory, symlinks
    resolved), else why not. Blocking (it stats the file): called off the event loop."""
    if run_dir is None:
        return "the model is not a run directory"
    root = Path(run_dir).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        return f"{name} is a link to a file outside the run directory"
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return f"the run directory has no {name}"
    return None if stat.S_ISREG(mode) else f"{name} is not a regular file"


def read_run_file(run_dir: Path | None, name: str, limit: int) -> tuple[bytes, bool]:
    """The first `limit` bytes of `run_dir/name`, and whether there was more; a 404 APIError unless it is
    a regular file inside the run directory (a link out of it, a FIFO or a device is refused). Opened
    without following a link (O_NOFOLLOW on the resolved path) and without blocking on a FIFO
    (O_NONBLOCK), then checked on the open descriptor; blocking reads: called off the event loop."""
    why = run_file_state(run_dir, name)
    if why is None:
        path = (Path(run_dir).resolve() / name).resolve()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            why = f"{name} cannot be read: {e.strerror or e}"
        else:
            with os.fdopen(fd, "rb") as f:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    data = f.read(limit + 1)
                    return data[:limit], len(data) > limit
            why = f"{name} is not a regular file"
    raise APIError(404, f"{why}: nothing to show.", code="not_found")


async def _http_error(request: Request, exc: HTTPException):
    status = exc.status_code
    message = {
        404: f"No route {request.url.path}.",
        405: f"{request.method} is not allowed on {request.url.path}.",
    }
    return error_response(
        APIError(
            status,
            message.get(status, str(exc.detail)),
            code={404: "not_found", 405: "method_not_allowed"}.get(status),
        )
    )


async def _server_error(request: Request, exc: Exception):
    return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


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
                    async for part in request.stream():
                        size += len(part)
                        if size > DRAIN_LIMIT_FACTOR * limit:
                            break
                        if size <= limit:
                            chunks.append(part)
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
                return error_response(e)

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
        client = request.client.host if request.client else None  # the queue is shared per address
        if params.stream and not tools:
            # The place in the queue is taken now: a full queue is a 503, not an error event in a 200
            # stream; it is given back when the response ends, whether or not the stream ever started.
            release = self.engine.reserve(client)
            return HeldStream(
                self.stream(rid, model, prompt_ids, params, base, client, chat=chat),
                release=release,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        async def gone():  # the body is read: the next message is the disconnect (or the response's end)
            while (await request.receive())["type"] != "http.disconnect":
                pass

        with self.engine.admit(client):
            result = await self.engine.run(Job(prompt_ids, params, base=base, client=client), abandoned=gone)
        text, cut = cut_at_stop(self.engine.decode(result.ids), params.stop)
        text = text.strip() if chat else text
        finish = finish_reason(result, cut, params)
        calls = parse_tool_calls(self.engine.decode(result.ids, special=True), tools) if tools else None
        if calls:
            finish = "tool_calls"
        if params.stream:  # with tools: the whole answer, then one chunk (a call is parsed once complete)
            return StreamingResponse(
                one_chunk_stream(rid, model, text, calls, finish, result, params),
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
                "usage": usage(result),
            }
        )

    async def stream(self, rid, model, prompt_ids, params, base, client, *, chat: bool):
        """Server-sent events: the text as it is generated, with stop strings held back until they are
        known not to be one; the generation is cancelled when the client goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(
            prompt_ids,
            params,
            base=base,
            client=client,
            on_text=lambda t: loop.call_soon_threadsafe(queue.put_nowait, t),
        )
        try:
            if chat:
                yield sse(chunk(rid, model, chat=True, delta={"role": "assistant", "content": ""}))
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
                    yield sse(chunk(rid, model, chat=chat, delta={"content": out}, text=out))
            result = task.result()
            if pending and not stopped_by_string:
                yield sse(chunk(rid, model, chat=chat, delta={"content": pending}, text=pending))
            finish = finish_reason(result, stopped_by_string, params)
            yield sse(chunk(rid, model, chat=chat, finish=finish))
            if params.include_usage:
                yield sse(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": int(time.time()),
                        "model": model,
                        "choices": [],
                        "usage": usage(result),
                    }
                )
            yield sse("[DONE]")
        except Exception as e:  # noqa: BLE001 - told to the client in the stream, then logged
            yield sse(
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
        report, loss = await asyncio.gather(
            asyncio.to_thread(run_file_state, self.run_dir, "report.md"),
            asyncio.to_thread(run_file_state, self.run_dir, "loss.png"),
        )
        return JSONResponse(
            {
                "model": self.name,
                "base_model": self.base_name,
                "kind": self.loaded.kind,
                "path": str(self.loaded.path),
                "report": report is None,
                "loss_png": loss is None,
                "max_tokens_limit": self.settings.max_tokens_limit,
            }
        )

    async def report(self, request: Request):
        data, cut = await asyncio.to_thread(read_run_file, self.run_dir, "report.md", MAX_REPORT_BYTES)
        text = data.decode("utf-8", errors="replace")
        if cut:
            text = text.rsplit("\n", 1)[0] + (
                f"\n\n*(report.md is longer than {MAX_REPORT_BYTES // 1_000_000} MB: the rest is not shown.)*\n"
            )
        return JSONResponse({"markdown": text})

    async def loss_png(self, request: Request):
        data, cut = await asyncio.to_thread(read_run_file, self.run_dir, "loss.png", MAX_PICTURE_BYTES)
        if cut:
            raise APIError(
                404,
                f"loss.png is larger than {MAX_PICTURE_BYTES // 1_000_000} MB: not served.",
                code="not_found",
            )
        return Response(data, media_type="image/png")

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

        middleware.append(Middleware(LoopbackHost))
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
        with phase(console, f"loading {model_ref}"):
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
