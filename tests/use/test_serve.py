"""`fastsft serve` against a tiny trained run: the real `openai` client, concurrent clients, the limits,
and the chat page in headless Chromium (Debian's chromium + chromedriver, driven by Selenium).

The server is the real command (`fastsft serve RUN --port P --api-key K`) in a child process on a free
loopback port; the run is a real `fastsft run` of the tiny recipe, long enough that the fine-tuned
model ends its turns where the base model (the adapter disabled) rambles on.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from fastsft.chat.tools import parse_tool_calls
from fastsft.use.serve import cut_at_stop

from _tiny import TINY_RECIPE

pytestmark = pytest.mark.filterwarnings("ignore")

KEY = "test-key-0123456789"
PROMPT = "What colour is a banana?"
PROMPTS = [
    "What colour is a banana?",
    "Where is a wolf found?",
    "What sound does a cow make?",
    "Which colour does a grass have?",
    "Where do you find a frog?",
    "What sound does a duck make?",
    "What colour is a tomato?",
    "Where is a camel found?",
]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real `fastsft run` of the tiny recipe: 60 steps (about 25 s on 2 cores), enough for the
    fine-tuned model to answer in the data's shape and stop on the end-of-turn token."""
    from click.testing import CliRunner

    from fastsft.cli.main import main

    root = tmp_path_factory.mktemp("serve-run")
    recipe = root / "tiny.toml"
    recipe.write_text(TINY_RECIPE.replace("max_steps = 6", "max_steps = 60"), encoding="utf-8")
    out = root / "tiny"
    result = CliRunner().invoke(
        main, ["run", str(recipe), "-o", str(out), "--set", "loss.kernel=torch"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return out


def _start(run: Path, port: int, *extra: str, log: Path):
    """`fastsft serve` in a child process (run from a temporary folder: the repository root must not be
    on its sys.path, see conftest.py)."""
    cmd = [
        sys.executable,
        "-c",
        "from fastsft.cli.main import main; main()",
        "serve",
        str(run),
        "--port",
        str(port),
        *extra,
    ]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    f = open(log, "w")  # noqa: SIM115 - closed by the caller's teardown
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"fastsft serve exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url, f
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"fastsft serve did not answer in 120 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    proc, url, f = _start(trained_run, _free_port(), "--api-key", KEY, "--max-queue", "8", log=log)
    yield {
        "url": url,
        "run": trained_run,
        "model": trained_run.name,
        "base": trained_run.name + ":base",
        "log": log,
    }
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    f.close()


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _ask(client, model, prompt=PROMPT, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def _post(url, body, *, key=KEY, data: bytes | None = None):
    """A raw POST: (status, parsed JSON body)."""
    req = urllib.request.Request(
        url,
        data=data if data is not None else json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ----------------------------------------------------------------------------------------------
# The API through the openai client
# ----------------------------------------------------------------------------------------------


def test_models_lists_the_run_and_its_base(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == [server["model"], server["base"]]


def test_chat_completion_ends_its_turn_and_counts_tokens(client, server):
    r = _ask(client, server["model"], max_tokens=64)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == server["model"]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    # the fine-tuned model learnt the end-of-turn token: it stops long before the budget
    assert choice.finish_reason == "stop" and r.usage.completion_tokens < 64
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_gives_the_same_answer_in_pieces(client, server):
    whole = _ask(client, server["base"], max_tokens=40).choices[0]
    pieces, finish = [], None
    stream = _ask(client, server["base"], max_tokens=40, stream=True, stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    assert len(pieces) > 1  # streamed, not one block at the end
    assert "".join(pieces).strip() == whole.message.content
    assert finish == whole.finish_reason == "length"  # the base model never learnt to stop
    assert usage.completion_tokens == 40


def test_base_and_fine_tuned_answers_differ_where_training_changed_them(client, server):
    for prompt in PROMPTS[:3]:
        tuned = _ask(client, server["model"], prompt, max_tokens=48).choices[0]
        base = _ask(client, server["base"], prompt, max_tokens=48).choices[0]
        assert tuned.message.content != base.message.content
        # what training taught: ending the turn (the base model, random weights, runs to the limit)
        assert (tuned.finish_reason, base.finish_reason) == ("stop", "length")


def test_completions_endpoint_and_stop_strings(client, server):
    r = client.completions.create(model=server["model"], prompt="A banana", max_tokens=16)
    assert r.object == "text_completion" and r.choices[0].text
    text = r.choices[0].text
    word = next(w for w in text.split() if len(w) >= 2)
    cut = client.completions.create(model=server["model"], prompt="A banana", max_tokens=16, stop=[word])
    assert cut.choices[0].text == text[: text.index(word)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=server["model"], prompt="A banana", max_tokens=16, stop=[word], stream=True
        )
        if c.choices
    )
    assert streamed == cut.choices[0].text


def test_seed_makes_sampling_repeatable(client, server):
    def sample(seed):
        return _ask(client, server["base"], max_tokens=24, temperature=1.0, top_p=0.9, seed=seed).choices[0]

    a, b, c = sample(7), sample(7), sample(8)
    assert a.message.content == b.message.content
    assert a.message.content != c.message.content


def test_tools_reach_the_template_and_bad_tools_are_refused(client, server):
    import openai

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_colour",
                "description": "The colour of a thing",
                "parameters": {"type": "object", "properties": {"thing": {"type": "string"}}},
            },
        }
    ]
    with_tools = _ask(client, server["model"], tools=tools, max_tokens=8)
    plain = _ask(client, server["model"], max_tokens=8)
    assert (
        with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    )  # the definitions are in the prompt
    # a whole round: the call (arguments as the JSON string OpenAI clients send) and the tool's result
    round_trip = [
        {"role": "user", "content": "What colour is a banana?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_colour", "arguments": '{"thing": "banana"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "yellow"},
    ]
    r = client.chat.completions.create(model=server["model"], messages=round_trip, tools=tools, max_tokens=8)
    assert r.usage.prompt_tokens > with_tools.usage.prompt_tokens and r.choices[0].finish_reason
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, server["model"], tools=[{"type": "function", "function": {"description": "no name"}}])
    assert (
        e.value.status_code == 400 and e.value.body["param"] == "tools" and "name" in e.value.body["message"]
    )


def test_tool_calls_are_parsed_as_the_templates_write_them():
    tools = [{"type": "function", "function": {"name": "get_colour"}}]
    hermes = '<tool_call>\n{"name": "get_colour", "arguments": {"thing": "banana"}}\n</tool_call>'
    (call,) = parse_tool_calls(hermes, tools)
    assert call["function"] == {"name": "get_colour", "arguments": '{"thing": "banana"}'}
    assert (
        parse_tool_calls('{"name": "get_colour", "parameters": {"thing": "x"}}', tools)[0]["type"]
        == "function"
    )
    assert (
        len(
            parse_tool_calls(
                '[TOOL_CALLS] [{"name": "get_colour", "arguments": {}}, '
                '{"name": "get_colour", "arguments": {}}]',
                tools,
            )
        )
        == 2
    )
    assert parse_tool_calls('{"name": "other", "arguments": {}}', tools) is None
    assert parse_tool_calls("A banana is yellow.", tools) is None
    assert cut_at_stop("A banana is yellow.", ["is", "yell"]) == ("A banana ", True)


def test_errors_have_openais_shape(client, server):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        _ask(client, "gpt-4o")
    assert e.value.body["code"] == "model_not_found" and server["model"] in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, server["model"], temperature=3.5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, server["model"], max_tokens=2000)  # the tiny model holds 1024 positions
    assert e.value.body["code"] == "context_length_exceeded"
    status, body = _post(server["url"] + "/v1/chat/completions", None, data=b"{not json")
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}


def test_an_oversized_body_gets_its_413_not_a_broken_pipe(server):
    """urllib writes the whole body before it reads: had the server answered and closed after the
    headers, the client would see a reset (a broken pipe) once the socket buffers fill, not the 413.
    6 MB is past those buffers on loopback; it is sent with a Content-Length and chunked."""
    url = server["url"] + "/v1/chat/completions"
    status, body = _post(url, None, data=b"x" * 6_000_000)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = _post(url, None, data=iter([b"x" * 1_000_000] * 6))  # no length: chunked
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_what_another_web_site_could_send_is_refused(server):
    """A loopback server without a key must not be usable from other sites in the user's browser: a
    text/plain POST (no CORS preflight) is refused, and so is a Host that is not a loopback name."""
    body = json.dumps({"model": server["model"], "messages": [{"role": "user", "content": PROMPT}]}).encode()
    req = urllib.request.Request(
        server["url"] + "/v1/chat/completions",
        data=body,
        method="POST",
        headers={"Content-Type": "text/plain", "Authorization": f"Bearer {KEY}"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 415 and json.loads(e.value.read())["error"]["code"] == "unsupported_media_type"
    req = urllib.request.Request(server["url"] + "/v1/models", headers={"Host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400


def test_bearer_token_is_required(server):
    import openai
    from openai import OpenAI

    for key in ("wrong", ""):
        bad = OpenAI(base_url=server["url"] + "/v1", api_key=key or "none", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.body["code"] == "invalid_api_key"
    status, body = _post(server["url"] + "/v1/chat/completions", {"model": server["model"]}, key=None)
    assert status == 401 and body["error"]["type"] == "invalid_request_error"
    with urllib.request.urlopen(server["url"] + "/", timeout=10) as r:  # the page itself holds no data
        assert b"fastsft chat" in r.read()


def test_concurrent_clients_are_all_answered_correctly(client, server):
    """8 clients at once (streaming and not) get the same greedy answers as one at a time: none dropped,
    none mixed up with another's."""
    from openai import OpenAI

    expected = {
        p: _ask(client, server["model"], p, max_tokens=32).choices[0].message.content for p in PROMPTS
    }
    results, errors = {}, []
    barrier = threading.Barrier(len(PROMPTS))

    def worker(i, prompt):
        c = OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            barrier.wait(timeout=30)
            if i % 2:
                text = "".join(
                    ch.choices[0].delta.content or ""
                    for ch in _ask(c, server["model"], prompt, max_tokens=32, stream=True)
                    if ch.choices
                ).strip()
            else:
                text = _ask(c, server["model"], prompt, max_tokens=32).choices[0].message.content
            results[prompt] = text
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(f"{prompt}: {type(e).__name__}: {e}")

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert results == expected
    assert time.time() - t0 < 180


def test_a_client_that_goes_away_frees_the_model(client, server):
    """A stream closed after its first piece stops the generation at the next token: the next request
    does not wait for the 1000 tokens nobody reads."""
    import httpx

    body = {
        "model": server["base"],
        "max_tokens": 1000,
        "stream": True,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", server["url"] + "/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break
    t = time.time()
    r = _ask(client, server["model"], max_tokens=16)
    assert r.choices[0].message.content and time.time() - t < 10


def test_a_full_queue_is_answered_429_at_once_and_the_rest_still_answered(server):
    """16 requests at once from one address against 1 running + 8 waiting: the extra ones get a 429 in
    OpenAI's shape (the address holds its share of the queue: all of it while no other client waits)
    right away, with Retry-After; every admitted one is answered in full."""
    n = 16
    barrier = threading.Barrier(n)
    out = []

    def worker():
        barrier.wait(timeout=30)
        body = {"model": server["base"], "max_tokens": 40, "messages": [{"role": "user", "content": PROMPT}]}
        t = time.time()
        status, reply = _post(server["url"] + "/v1/chat/completions", body)
        out.append((status, reply, time.time() - t))

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(out) == n
    ok = [r for s, r, _ in out if s == 200]
    busy = [(r, dt) for s, r, dt in out if s == 429]
    assert len(ok) + len(busy) == n
    assert 1 <= len(busy) <= n - 9 + 1 and len(ok) >= 8
    assert all(r["usage"]["completion_tokens"] == 40 for r in ok)
    assert all(r["error"]["code"] == "rate_limit_exceeded" for r, _ in busy)
    assert min(dt for _, dt in busy) < 5  # refused at once, not after waiting


# ----------------------------------------------------------------------------------------------
# The chat page in headless Chromium
# ----------------------------------------------------------------------------------------------


def _browser(profile: Path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed and could not be (tests/install-test-extras.sh "
            "installs them with apt-get as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))


@pytest.mark.slow  # headless Chromium
def test_chat_page_streams_answers_and_compares_with_the_base(server, client, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected_tuned = _ask(client, server["model"], max_tokens=128).choices[0].message.content
    expected_base = _ask(client, server["base"], max_tokens=128).choices[0].message.content
    driver = _browser(tmp_path / "profile")
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(server["url"] + "/")
        # the server wants a key: the page asks for it
        wait.until(lambda d: d.find_element(By.ID, "auth").is_displayed())
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "key-save").click()
        wait.until(lambda d: server["model"] in d.find_element(By.ID, "model").text)
        assert driver.find_element(By.ID, "compare").is_selected()
        # count the updates of the answers' text: streamed answers arrive in several steps
        driver.execute_script(
            "window.updates = 0; new MutationObserver(() => window.updates++)"
            ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});"
        )
        driver.find_element(By.ID, "prompt").send_keys(PROMPT)
        driver.find_element(By.ID, "send").click()
        wait.until(
            lambda d: (
                d.find_elements(By.CSS_SELECTOR, ".msg.base .text")
                and not d.find_elements(By.CSS_SELECTOR, ".msg.pending")
                and d.find_element(By.ID, "send").is_enabled()
            )
        )
        text = "return document.querySelector(arguments[0]).textContent"  # as sent, not as laid out
        tuned, base = (
            driver.execute_script(text, ".msg.ft .text"),
            driver.execute_script(text, ".msg.base .text"),
        )
        assert tuned.strip() == expected_tuned.strip()
        assert base.strip() == expected_base.strip()
        assert driver.execute_script("return window.updates") > 5
        assert not driver.find_elements(By.CSS_SELECTOR, ".note.err")
        driver.save_screenshot(str(tmp_path / "chat.png"))

        # the run's report: its table of answers and the loss curve (fetched with the key)
        driver.find_element(By.ID, "tab-report").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#report table"))
        wait.until(
            lambda d: d.execute_script(
                "const i = document.querySelector('#report img'); return i && i.complete && i.naturalWidth > 100"
            )
        )
        assert "Answers before and after" in driver.find_element(By.ID, "report").text
        driver.save_screenshot(str(tmp_path / "report.png"))
        if os.environ.get("FASTSFT_SCREENSHOTS"):
            for name in ("chat.png", "report.png"):
                shutil.copy(tmp_path / name, Path(os.environ["FASTSFT_SCREENSHOTS"]) / name)
    finally:
        driver.quit()


def test_a_merged_export_is_served_alone(trained_run, tmp_path):
    """A merged export has no adapter to disable: one model id, no report, the same greedy answer as
    the run's fine-tuned model (in process, through Starlette's test client)."""
    from starlette.testclient import TestClient

    from fastsft.export import export_run
    from fastsft.use import generate, load_for_use
    from fastsft.use.serve import ServeSettings, create_app

    merged = export_run(trained_run, fmt="merged", to=tmp_path / "merged", dtype="fp32")
    app = create_app(load_for_use(merged), ServeSettings(model_name="merged"))
    with TestClient(app, base_url="http://127.0.0.1") as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["merged"]
        info = http.get("/fastsft/info").json()
        assert info["base_model"] is None and info["report"] is False and info["kind"] == "model"
        r = http.post(
            "/v1/chat/completions",
            json={"model": "merged", "messages": [{"role": "user", "content": PROMPT}]},
        )
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == generate(trained_run, PROMPT)
        r = http.post(
            "/v1/chat/completions",
            json={"model": "merged:base", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert http.get("/fastsft/report").status_code == 404


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def test_serve_command_errors_are_one_paragraph(tmp_path):
    from click.testing import CliRunner

    from fastsft.cli.main import main

    r = CliRunner().invoke(main, ["serve", str(tmp_path / "missing"), "--port", "0"])
    assert r.exit_code == 2 and "no such folder" in r.output and "Traceback" not in r.output
    with socket.socket() as s:  # a port in use is told before the model loads
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = CliRunner().invoke(main, ["serve", str(tmp_path), "--port", str(s.getsockname()[1])])
    assert r.exit_code == 2 and "cannot listen" in r.output and "--port" in r.output
    assert "Example:" in CliRunner().invoke(main, ["serve", "--help"]).output


def test_a_model_that_fails_to_load_leaves_the_port_free(tmp_path):
    from fastsft.errors import FastSFTError
    from fastsft.use.serve import ServeSettings, serve

    def sockets():
        links = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:  # the fd listdir itself held
                pass
        return sum(link.startswith("socket:") for link in links)

    before = sockets()
    with pytest.raises(FastSFTError) as failed:
        serve(tmp_path / "no-such-run", ServeSettings(host="127.0.0.1", port=_free_port()))
    assert "no such folder" in str(failed.value)
    assert sockets() == before  # the traceback still holds serve()'s frame: only close() frees its socket
