"""Answers of a loaded model: `generate` (one prompt), `generate_file` (a file of prompts, in batches) and
`chat` (a conversation in the terminal), through
the tokenizer's chat template, stopping on its end-of-turn token (fastsft.chat.generation), with
`--tools` definitions when given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastsft import files
from fastsft.chat.generation import answer_batch, generate_ids
from fastsft.data import not_text, parse_tools
from fastsft.errors import BackendError, DataError
from fastsft.progress import bar
from fastsft.use.load import LoadedForUse, load_for_use


def _as_messages(prompt) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    problem = not_text(messages)
    if problem:
        raise DataError(f"the prompt: {problem}.")
    return messages


def generate_for(loaded: LoadedForUse, messages, **kwargs) -> tuple[list[int], bool]:
    """`fastsft.chat.generation.generate_ids` with the loaded model, its tokenizer and end-of-turn ids:
    (new token ids, stopped on an end-of-turn token)."""
    return generate_ids(loaded.model, loaded.tokenizer, messages, eot=loaded.eot, **kwargs)


def read_tools(path) -> list[dict] | None:
    """Function definitions for `--tools FILE`: a JSON list (or {"tools": [...]}), checked as a data
    row's `tools` column is."""
    if path is None:
        return None
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"--tools {path}: no such file.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--tools {path}: not a JSON file ({e}).") from None
    if isinstance(value, dict) and "tools" in value:
        value = value["tools"]
    tools = parse_tools(value, f"--tools {path}")
    if not tools:
        raise DataError(f"--tools {path}: the list of tools is empty.")
    return tools


def generate(
    model_ref, prompt, max_new_tokens: int = 128, temperature: float = 0.0, tools=None, *, policy=None
) -> str:
    """The model's answer to `prompt` (a string, or a list of chat messages) through the chat template,
    with `tools` (function definitions) when given."""
    if max_new_tokens < 1:
        raise BackendError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    if temperature < 0:
        raise BackendError(f"--temperature must be 0 (greedy) or more, got {temperature}.")
    loaded = load_for_use(model_ref, policy=policy)
    new, _ = generate_for(
        loaded, _as_messages(prompt), max_new_tokens=max_new_tokens, temperature=temperature, tools=tools
    )
    return loaded.tokenizer.decode(new, skip_special_tokens=True).strip()


def _prompt_of_row(row, where: str):
    """The chat messages a row of `generate --data` asks about: `prompt` (a string or messages), or
    `messages` / `conversations` up to the first assistant turn, or alpaca's `instruction` (+ `input`)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}.")
    value = row.get("prompt")
    if value is None and isinstance(row.get("messages"), list):
        value = []
        for m in row["messages"]:
            if isinstance(m, dict) and m.get("role") == "assistant":
                break
            value.append(m)
    if value is None and isinstance(row.get("instruction"), str):
        value = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    if not value:
        raise DataError(
            f"{where}: no prompt. Give each row `prompt` (text or chat messages), `messages` (the answer is "
            "generated after the turns before the first assistant one) or `instruction`."
        )
    try:
        return _as_messages(value)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def read_prompts(path) -> list[tuple[dict, list[dict]]]:
    """(row, its chat messages) of every row of a .jsonl (or .json list) file of prompts."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"--data {path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--data {path}: cannot be read ({e}).") from None
    rows: list[tuple[str, object]] = []
    if path.suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON ({e}).") from None
        if not isinstance(value, list):
            raise DataError(f"{path}: expected a JSON list of rows.")
        rows = [(f"{path}: row {i}", r) for i, r in enumerate(value)]
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{n}: not a JSON line ({e.msg}). Fix the line or remove it."
                ) from None
    if not rows:
        raise DataError(f"{path}: no rows.")
    return [(r, _prompt_of_row(r, where)) for where, r in rows]


def generate_file(
    model_ref, data_file, out, *, max_new_tokens: int = 128, batch_size: int = 8, console=None, policy=None
) -> Path:
    """Greedy answers to every prompt of `data_file` (see `read_prompts`), `batch_size` at a time (left
    padding), written to `out` as JSON lines: each input row with `answer` and `stopped` (it ended its
    turn within `max_new_tokens`) added."""
    from rich.console import Console

    if max_new_tokens < 1:
        raise BackendError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    console = console or Console(stderr=True)
    rows = read_prompts(data_file)  # a bad row fails before the model loads
    loaded = load_for_use(model_ref, policy=policy)
    with bar(console, len(rows), "answering") as advance:
        got = answer_batch(
            loaded.model,
            loaded.tokenizer,
            [m for _, m in rows],
            eot=loaded.eot,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            on_batch=advance,
        )
    out = Path(out)
    if out.parent != Path(""):
        files.make_dir(out.parent)
    lines = [
        json.dumps({**row, "answer": a.text, "stopped": a.stopped}, ensure_ascii=False)
        for (row, _), a in zip(rows, got, strict=True)
    ]
    files.write_text(out, "\n".join(lines) + "\n")
    console.print(f"{len(lines)} answers written to {out}", highlight=False)
    return out


def chat(
    model_ref,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    system: str | None = None,
    tools=None,
    input=None,
    console=None,
    policy=None,
) -> list[dict]:
    """Talk to the model: each line read is a user turn, the conversation is kept. `/exit` (or end of
    input) quits, `/reset` starts over. Returns the conversation."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    stream = input or sys.stdin
    loaded = load_for_use(model_ref, policy=policy)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    console.print(
        f"[bold]fastsft chat[/] with {loaded.ref or loaded.path} ({loaded.kind}). /exit quits, /reset starts over."
    )
    while True:
        console.print("[bold cyan]you>[/] ", end="")
        line = stream.readline()
        if not line:
            console.print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            console.print("[dim](conversation cleared)[/]")
            continue
        try:
            _as_messages(text)
        except DataError as e:
            console.print(f"[yellow]{escape(str(e))}[/]")
            continue
        messages.append({"role": "user", "content": text})
        new, stopped = generate_for(
            loaded, messages, max_new_tokens=max_new_tokens, temperature=temperature, tools=tools
        )
        answer = loaded.tokenizer.decode(new, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
        console.print("[bold green]model>[/] " + escape(answer), highlight=False)
        if not stopped:
            console.print(
                f"[yellow](the answer hit the {max_new_tokens}-token limit without ending its turn)[/]"
            )
    return messages
