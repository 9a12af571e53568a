"""The engine of `fastsft serve`: one worker thread answers the requests, each a generation through
fastsft.chat.generation, streamed or whole.

Fair between clients (remote addresses): the waiting requests are taken in turn, one per address
(round-robin), so that a client with one request waits for at most one generation of each other
address, not for all of another client's queue; and each address may hold only its share of the queue,
`(max_queue + 1) // addresses` (the running request counted; a 429 beyond it), the first request of an
address being always admitted: a client never waits for the queue that another one filled.

A generation ends at the end-of-turn token, at `max_tokens`, at a stop string (matched in the decoded
tail of the answer only, so a step costs the same however long the answer and the stop strings are),
or when its job is cancelled: the server stops, or the client went away (`run(job, abandoned=...)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from dataclasses import dataclass, field

from fastsft.chat.generation import generate_ids
from fastsft.chat.templates import chat_ids
from fastsft.errors import FastSFTError
from fastsft.use.serve.protocol import APIError, Params


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: Params
    base: bool = False  # the adapter disabled
    on_text: object = None  # called from the worker thread with each piece of text (streaming)
    cancel: threading.Event = field(default_factory=threading.Event)
    client: str | None = None  # the remote address: turns are taken between addresses


class Turns:
    """Jobs waiting for the worker, one queue per client, taken in turn: the next job is the oldest of
    the client served longest ago (a client that has nothing served while it waits comes first), so a
    newcomer waits for the job running, not for one more of another client's. Thread-safe; `take`
    blocks until a job or `close`."""

    def __init__(self):
        self.cond = threading.Condition()
        self.queues: dict[object, deque] = {}  # client -> its waiting jobs, in arrival order
        self.served: dict[object, int] = {}  # client -> the turn it was last served (while it waits)
        self.turn = 0
        self.closed = False

    def put(self, client, item) -> None:
        with self.cond:
            self.queues.setdefault(client, deque()).append(item)
            self.cond.notify()

    def take(self):
        """The next job (None once closed)."""
        with self.cond:
            while not self.queues and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
            client = min(self.queues, key=lambda c: self.served.get(c, -1))  # ties: the first to arrive
            queue = self.queues[client]
            item = queue.popleft()
            self.turn += 1
            if queue:
                self.served[client] = self.turn
            else:
                del self.queues[client]
                self.served.pop(client, None)
            return item

    def close(self) -> list:
        """Stop `take`; the jobs still waiting."""
        with self.cond:
            self.closed = True
            left = [item for queue in self.queues.values() for item in queue]
            self.queues.clear()
            self.cond.notify_all()
            return left


@dataclass
class Result:
    ids: list[int]
    ended_turn: bool  # stopped on the end-of-turn token
    prompt_tokens: int


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # the request stopped waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Engine:
    """The loaded model behind one worker thread: generation is serialized, taken in turn between
    clients, and at most `max_queue` requests wait behind the one running; `admit` raises a 429 APIError
    for a client past its share of the queue, a 503 when the queue is full (see the module's docstring)."""

    def __init__(self, loaded, *, max_queue: int):
        self.loaded = loaded
        self.max_queue = max_queue
        self.pending = 0  # admitted and not finished (the running one included); touched on the event loop
        self.per_client: dict[object, int] = {}  # the same, per remote address
        self.active: set[Job] = set()  # submitted jobs, cancelled all at once when the server stops
        self.turns = Turns()
        self.worker = threading.Thread(target=self._work, name="fastsft-generate", daemon=True)
        self.worker.start()
        self.has_base = hasattr(loaded.model, "disable_adapter") and loaded.kind in ("run", "adapter")
        cfg = getattr(loaded.model, "config", None)
        self.context = getattr(cfg, "max_position_embeddings", None)

    def share(self, client) -> int:
        """The requests (waiting or running) that `client` may hold now: the queue and the running place
        divided between the addresses that hold some, this one included."""
        clients = len(self.per_client) + (client not in self.per_client)
        return max(1, (self.max_queue + 1) // clients)

    def check_room(self, client=None):
        held = self.per_client.get(client, 0)
        if held and held >= self.share(client):
            raise APIError(
                429,
                f"Too many requests from your address: {held} are being answered or waiting, its share of "
                f"the queue while {len(self.per_client)} addresses are served. Retry shortly.",
                type="requests",
                code="rate_limit_exceeded",
            )
        if held and self.pending > self.max_queue:
            raise APIError(
                503,
                f"The server is busy: {self.pending} requests are being answered or waiting (the queue "
                f"holds {self.max_queue}). Retry shortly.",
                type="server_error",
                code="server_overloaded",
            )

    @contextlib.contextmanager
    def admit(self, client=None):
        release = self.reserve(client)
        try:
            yield
        finally:
            release()

    def reserve(self, client=None):
        """A place in the queue now for `client` (a 429 or 503 APIError when it has none) -> the function
        that gives it back (once, however often it is called): for a stream, whose place must be held
        before its response starts. A client's first request is always admitted: the queue can exceed
        `max_queue` by one per address at most, and addresses are bounded by the connection budget."""
        self.check_room(client)
        self.pending += 1
        self.per_client[client] = self.per_client.get(client, 0) + 1
        held = [True]

        def release():
            if held.pop() if held else False:
                self.pending -= 1
                left = self.per_client.pop(client, 1) - 1
                if left:
                    self.per_client[client] = left

        return release

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
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
        raise APIError(
            400,
            "`prompt` must be a non-empty string (or one string in a list, or token ids).",
            param="prompt",
        )

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

        if job.cancel.is_set():  # abandoned while it waited: nothing to generate
            return Result([], False, len(job.prompt_ids))
        tokenizer, start, p = self.loaded.tokenizer, len(job.prompt_ids), job.params
        # Stop strings are looked for in the decoded tail of the answer: a stop string is at most
        # MAX_STOP_CHARS characters, and a token is at least one, so the last (longest stop + 2) tokens
        # hold any stop string that the newest token completes. (transformers' own stop_strings criterion
        # precomputes over the vocabulary times each stop string's length: seconds per request.)
        window = max((len(s) for s in p.stop), default=0) + 2

        class _Ends(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if job.cancel.is_set():
                    return True
                if not p.stop:
                    return False
                new = input_ids[0, start:]
                tail = tokenizer.decode(new[-window:], skip_special_tokens=True)
                return any(s in tail for s in p.stop)

        streamer = None
        if job.on_text is not None:

            class _Streamer(TextStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False):
                    if text:
                        job.on_text(text)

            streamer = _Streamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        model = self.loaded.model
        off = model.disable_adapter() if job.base else contextlib.nullcontext()
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
                streamer=streamer,
                stopping_criteria=[_Ends()],
            )
        return Result(ids, ended, len(job.prompt_ids))

    def _work(self) -> None:
        """The worker thread: each job in turn, its result (or error) handed to the event loop that waits."""
        while (item := self.turns.take()) is not None:
            job, future, loop = item
            try:
                result = self._run(job)
            except BaseException as e:  # noqa: BLE001 - handed to the request that waits for it
                loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

    async def run(self, job: Job, *, abandoned=None) -> Result:
        """The job's result. `abandoned` (a coroutine function, e.g. one that returns when the client has
        disconnected) cancels the job when it returns first: the worker moves on at the next token."""
        self.active.add(job)
        watch = None
        if abandoned is not None:
            watch = asyncio.ensure_future(abandoned())
            watch.add_done_callback(lambda w: w.cancelled() or w.exception() or job.cancel.set())
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            self.turns.put(job.client, (job, future, loop))
            return await future
        finally:
            job.cancel.set()  # a request that stopped waiting (its task cancelled) is not generated
            self.active.discard(job)
            if watch is not None:
                watch.cancel()

    def stop(self) -> None:
        """Cancel what runs and waits (each stops at its next token), so that the process can exit."""
        for job in list(self.active):
            job.cancel.set()
        for _job, future, loop in self.turns.close():
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(future.cancel)

    def decode(self, ids: list[int], *, special: bool = False) -> str:
        return self.loaded.tokenizer.decode(ids, skip_special_tokens=not special)
