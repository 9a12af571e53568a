"""Answers of a loaded model: `generate` (one prompt) and `chat` (a conversation in the terminal), through
the tokenizer's chat template, stopping on its end-of-turn token (fastsft.chat.generation), with
`--tools` definitions when given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastsft.errors import BackendError, DataError
from fastsft.use.load import LoadedForUse, load_for_use


def _as_messages(prompt) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    from fastsft.data import not_text

    problem = not_text(messages)
    if problem:
        raise DataError(f"the prompt: {problem}.")
    return messages


def generate_for(loaded: LoadedForUse, messages, **kwargs) -> tuple[list[int], bool]:
    """`fastsft.chat.generation.generate_ids` with the loaded model, its tokenizer and end-of-turn ids:
    (new token ids, stopped on an end-of-turn token)."""
    from fastsft.chat.generation import generate_ids as generate

    return generate(loaded.model, loaded.tokenizer, messages, eot=loaded.eot, **kwargs)


def read_tools(path) -> list[dict] | None:
    """Function definitions for `--tools FILE`: a JSON list (or {"tools": [...]}), checked as a data
    row's `tools` column is."""
    from fastsft.data import parse_tools

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
        f"[bold]fastsft chat[/] with {loaded.path} ({loaded.kind}). /exit quits, /reset starts over."
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
