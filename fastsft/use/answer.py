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
from fastsft.chat.templates import chat_ids
from fastsft.data import not_text, parse_messages, parse_tools
from fastsft.data.read import json_type, short
from fastsft.errors import BackendError, DataError
from fastsft.progress import bar
from fastsft.rundir import is_run_dir
from fastsft.use.load import LoadedForUse, load_for_use


def prompt_messages(value, where: str, field: str = "messages") -> list[dict]:
    """The one reader of a prompt (generate --prompt / --data, chat): a string (one user turn) or a list
    of chat messages, each {role, content} with role system/user/assistant/tool and content a string or
    OpenAI text parts (joined), checked as a training row's messages are. A DataError naming `where` and
    the `field` that holds the messages."""
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        if not value:
            raise DataError(f"{where}: `{field}` is an empty list of messages.")
        try:
            messages = parse_messages(value, field)  # content parts too (data.formats.text_of_parts)
        except DataError as e:
            raise DataError(f"{where}: {e}.") from None
    else:
        raise DataError(
            f"{where}: `{field}` must be text or a list of chat messages ({{role, content}}), got "
            f"{json_type(value)}: {short(json.dumps(value))}."
        )
    problem = not_text(messages)
    if problem:
        raise DataError(f"{where}: {problem}.")
    return messages


def _as_messages(prompt) -> list[dict]:
    return prompt_messages(prompt, "--prompt", "prompt")


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
    messages = _as_messages(prompt)
    loaded = load_for_use(model_ref, policy=policy)
    n = chat_ids(loaded.tokenizer, messages, add_generation_prompt=True, tools=tools).shape[1]
    problem = context_problem(n, max_new_tokens, context_of(loaded))
    if problem:
        raise DataError(f"--prompt: not answered: {problem}.")
    token = control_token_in(messages, control_tokens(loaded.tokenizer))
    if token:
        from rich.console import Console

        Console(stderr=True).print(
            f"warning: --prompt holds {token!r}, a control token of this model's chat template: it is read as "
            "that token, not as text (the model sees a turn boundary there).",
            style="yellow",
            markup=False,
            highlight=False,
        )
    new, _ = generate_for(
        loaded, messages, max_new_tokens=max_new_tokens, temperature=temperature, tools=tools
    )
    return loaded.tokenizer.decode(new, skip_special_tokens=True).strip()


PROMPT_KEYS = ("prompt", "messages", "instruction")


def _prompt_of_row(row, where: str):
    """The chat messages a row of `generate --data` asks about: `prompt` (text or messages), or `messages`
    up to the first assistant turn, or alpaca's `instruction` (+ `input`). A row holding more than one of
    these is refused: which one was meant cannot be told, and answering one would drop the other."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {json_type(row)}.")
    given = [k for k in PROMPT_KEYS if k in row]
    if len(given) > 1:
        raise DataError(
            f"{where}: the row has both {' and '.join(f'`{k}`' for k in given)}; give each row one of "
            "`prompt`, `messages` or `instruction`, so it is clear what is asked."
        )
    if not given:
        raise DataError(
            f"{where}: no prompt (the row's keys: {', '.join(map(str, row)) or 'none'}). Give each row `prompt` "
            "(text or chat messages), `messages` (the answer is generated after the turns before the first "
            "assistant one) or `instruction`."
        )
    key = given[0]
    if key == "instruction":
        if not isinstance(row["instruction"], str) or not isinstance(row.get("input", ""), (str, type(None))):
            raise DataError(f"{where}: `instruction` and `input` must be text.")
        value = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return prompt_messages(value, where, "instruction")
    messages = prompt_messages(row[key], where, key)
    if key == "messages":
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        messages = messages[:first]
        if not messages:
            raise DataError(
                f"{where}: `messages` starts with an assistant turn, so there is no prompt before it; give "
                "the user's turn first."
            )
    if not any(m["content"].strip() for m in messages):
        raise DataError(f"{where}: `{key}` is empty; give the text to answer.")
    return messages


def read_prompts(path) -> list[tuple[str, dict, list[dict]]]:
    """(where, row, its chat messages) of every row of a .jsonl (or .json list) file of prompts; each
    problem is a DataError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is dropped
    except FileNotFoundError:
        raise DataError(f"--data {path}: no such file.") from None
    except IsADirectoryError:
        raise DataError(f"--data {path} is a folder; give a .jsonl file of prompts.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--data {path}: cannot be read ({e}).") from None
    rows: list[tuple[str, object]] = []
    try:
        if path.suffix == ".json":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {e.lineno}: not JSON ({e.msg}).") from None
            if not isinstance(value, list):
                raise DataError(f"{path}: expected a JSON list of rows, got {json_type(value)}.")
            rows = [(f"{path} row {i}", r) for i, r in enumerate(value, start=1)]
        else:
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path} line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path} line {n}: not a JSON line ({e.msg}). Fix the line or remove it."
                    ) from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to be a file of prompts.") from None
    if not rows:
        raise DataError(
            f'--data {path} holds no rows; give one JSON object a line, e.g. {{"prompt": "..."}}.'
        )
    return [(where, r, _prompt_of_row(r, where)) for where, r in rows]


def control_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens (<|im_end|>, [INST]...): typed in a message, the chat template's
    tokenizer reads them as the control tokens themselves, not as text."""
    found = {a.content for a in getattr(tokenizer, "added_tokens_decoder", {}).values() if a.special}
    found.update(t for t in getattr(tokenizer, "all_special_tokens", []) if t)
    return sorted(found, key=len, reverse=True)


def control_token_in(messages: list[dict], specials: list[str]) -> str | None:
    """The first special token written inside a message's text, or None."""
    for m in messages:
        for t in specials:
            if t in m.get("content", ""):
                return t
    return None


def context_of(loaded: LoadedForUse) -> int | None:
    """The model's context length (max_position_embeddings), or None when its config does not say."""
    n = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def context_problem(n_prompt: int, max_new_tokens: int, context: int | None) -> str | None:
    """Why a prompt of `n_prompt` tokens cannot be answered with `max_new_tokens` (the rule and words of
    `fastsft serve`'s context_length_exceeded), or None."""
    if context is None or n_prompt + max_new_tokens <= context:
        return None
    return (
        f"this model's maximum context length is {context} tokens, but the prompt holds {n_prompt} tokens and "
        f"--max-new-tokens asks for {max_new_tokens} more ({n_prompt + max_new_tokens}); shorten the prompt "
        "or lower --max-new-tokens"
    )


def generate_file(
    model_ref,
    data_file,
    out,
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    overwrite: bool = False,
    console=None,
    policy=None,
) -> Path:
    """Greedy answers to every prompt of `data_file` (see `read_prompts`), `batch_size` at a time (left
    padding), written to `out` as JSON lines: each input row with `answer` and `stopped` (it ended its
    turn within `max_new_tokens`) added. A row beyond the model's context is not generated: it gets
    `answer: null` and `error` {"code": "context_length_exceeded", "message"}, as `fastsft serve` answers.
    `out` is never one of the inputs nor a file of the model's folder, and replaces a file only with
    `overwrite` (fastsft.files.check_output)."""
    from rich.console import Console
    from rich.markup import escape

    if max_new_tokens < 1:
        raise BackendError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    console = console or Console(stderr=True)
    folders = read_folders(model_ref, out)
    files.check_output(out, option="-o", overwrite=overwrite, inputs=[data_file], folders=folders)
    rows = read_prompts(data_file)  # a bad row fails before the model loads
    with bar(console, None, f"loading {model_ref}"):
        loaded = load_for_use(model_ref, policy=policy)
    files.check_output(
        out, option="-o", overwrite=overwrite, inputs=[data_file], folders=read_folders(loaded)
    )
    specials, context = control_tokens(loaded.tokenizer), context_of(loaded)
    marked = [(where, t) for where, _, m in rows if (t := control_token_in(m, specials))]
    if marked:
        where, token = marked[0]
        console.print(
            f"[yellow]warning: {escape(where)} holds {escape(repr(token))}, a control token of this model's "
            f"chat template ({len(marked)} row(s) in all). The template's tokenizer reads it as that token, not "
            "as text, so the model sees a turn boundary there; remove it from the text if it was not meant.[/]",
            highlight=False,
        )
    ids = [chat_ids(loaded.tokenizer, m, add_generation_prompt=True)[0].tolist() for _, _, m in rows]
    errors = {i: p for i, x in enumerate(ids) if (p := context_problem(len(x), max_new_tokens, context))}
    for i, p in list(errors.items())[:3]:
        console.print(f"[yellow]{escape(rows[i][0])}: not answered: {escape(p)}.[/]", highlight=False)
    todo = [i for i in range(len(rows)) if i not in errors]
    with bar(console, len(todo), "answering") as advance:
        got = answer_batch(
            loaded.model,
            loaded.tokenizer,
            [ids[i] for i in todo],
            eot=loaded.eot,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            on_batch=advance,
        )
    answers = dict(zip(todo, got, strict=True))
    lines = []
    for i, (_, row, _) in enumerate(rows):
        if i in errors:
            extra = {"answer": None, "stopped": False}
            extra["error"] = {"code": "context_length_exceeded", "message": errors[i]}
        else:
            extra = {"answer": answers[i].text, "stopped": answers[i].stopped}
        lines.append(json.dumps({**row, **extra}, ensure_ascii=False))
    files.write_output(out, "\n".join(lines) + "\n", option="-o", overwrite=overwrite)
    refused = (
        f" ({len(errors)} not answered: beyond the model's context, marked with `error`)" if errors else ""
    )
    console.print(f"{len(lines)} rows written to {out}{refused}", highlight=False)
    return out


def read_folders(model_ref, out=None) -> list[Path]:
    """The folders a command reads for `model_ref` (a path, or a LoadedForUse): the model's folder, the run
    directory holding it, and the output's folder when it is a run: their files are never replaced."""
    if isinstance(model_ref, LoadedForUse):
        found = [model_ref.path, model_ref.run_dir]
    else:
        found = [Path(model_ref)] if Path(model_ref).is_dir() else []
    for p in list(found):
        if p is not None and is_run_dir(Path(p).parent):
            found.append(Path(p).parent)
    if out is not None and is_run_dir(Path(out).parent):
        found.append(Path(out).parent)
    return [p for p in found if p is not None]


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
    specials, warned = control_tokens(loaded.tokenizer), set()
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
            prompt_messages(text, "your message", "content")
        except DataError as e:
            console.print(f"[yellow]{escape(str(e))}[/]")
            continue
        token = control_token_in([{"content": text}], specials)
        if token and token not in warned:
            warned.add(token)
            console.print(
                f"[yellow]{escape(repr(token))} is a control token of this model's chat template: it is read "
                "as that token, not as text (the model sees a turn boundary there).[/]"
            )
        n = chat_ids(
            loaded.tokenizer,
            [*messages, {"role": "user", "content": text}],
            add_generation_prompt=True,
            tools=tools,
        ).shape[1]
        problem = context_problem(n, max_new_tokens, context_of(loaded))
        if problem:
            console.print(f"[yellow]not answered: {escape(problem)} (/reset starts over).[/]")
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
