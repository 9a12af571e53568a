"""Shapes of training rows: detect one, validate every row, normalise it into one of TRL's forms.

The shapes (`data.format`, or detected from the first row's columns after `data.columns` renames):
text, messages, prompt/completion (strings, or lists of messages), conversations (role/content),
sharegpt (from/value, including the function_call / observation turns of the LLaMA-Factory and
glaive variant) and alpaca (instruction, input, output). Each becomes `{"messages": [...]}`,
`{"prompt": ..., "completion": ...}` or `{"text": ...}`, with `tools` (function definitions) beside
conversational rows; tool calls take the OpenAI form with their arguments parsed.

`load_examples` reads one source and gives its normalised rows, each named by where it came from;
a bad row is a DataError naming its file and line, or (`data.on_invalid = "skip"`) skipped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from .read import ARROW_SOURCES, RowProblem, json_type, read_source, short

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# Also understood in sharegpt data: the TRL-style names, and the function-calling names of the
# LLaMA-Factory / glaive sharegpt variant (a `function_call` turn is an assistant turn whose value is
# the call as JSON; an `observation` is the tool's result).
_SHAREGPT_EXTRA = {
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
}
FORMATS = ("text", "messages", "prompt_completion", "conversations", "sharegpt", "alpaca")
MAX_SKIP_REASONS = 5


@dataclass
class Example:
    """One normalised row, and (once encoded) its tokens and loss mask."""

    where: str  # "data/x.jsonl line 4"
    row: dict  # normalised: messages | prompt+completion | text
    input_ids: list[int] = field(default_factory=list)  # untruncated
    mask: list[int] = field(default_factory=list)  # 1 = carries loss


def _rename(obj: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return obj
    out = dict(obj)
    for target, source in columns.items():
        if source in out and source != target:
            out[target] = out.pop(source)
    return out


def _messages_style(value: Any) -> str | None:
    """'from_value' or 'role_content' for a list of messages, from its first message."""
    if isinstance(value, str):
        value = _maybe_json(value)
    if isinstance(value, list) and value and isinstance(value[0], dict):
        if "from" in value[0] or "value" in value[0]:
            return "from_value"
        return "role_content"
    return None


def detect_format(obj: dict) -> str | None:
    """The shape of one (renamed) row, or None."""
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt" if _messages_style(obj["conversations"]) == "from_value" else "conversations"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


_EXPECTED = {
    "messages": "a `messages` column (a list of {role, content})",
    "conversations": "a `conversations` column (a list of {role, content})",
    "sharegpt": "a `conversations` column (a list of {from, value})",
    "prompt_completion": "`prompt` and `completion` columns",
    "alpaca": "`instruction`, `input` (optional) and `output` columns",
    "text": "a `text` column",
}


def _maybe_json(value: Any) -> Any:
    """A list of objects stored as a JSON string (CSV cells) -> the list; anything else unchanged."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
        if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed):
            return parsed
    return value


def _message_list(value: Any, field_name: str, *, sharegpt: bool) -> list[dict]:
    value = _maybe_json(value)
    if value is None:
        raise RowProblem(f"`{field_name}` is missing")
    if not isinstance(value, list):
        raise RowProblem(f"`{field_name}` must be a list of messages, got {json_type(value)}")
    if not value:
        raise RowProblem(f"`{field_name}` is an empty list")
    out = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict):
            raise RowProblem(f"`{field_name}` message {i} must be an object, got {json_type(m)}")
        if "role" in m or "content" in m:
            role, content, rkey, ckey = m.get("role"), m.get("content"), "role", "content"
            names = {r: r for r in ROLES}
            if sharegpt:
                names.update(SHAREGPT_ROLES)
            allowed = ", ".join(ROLES)
        else:
            role, content, rkey, ckey = m.get("from"), m.get("value"), "from", "value"
            names = {**SHAREGPT_ROLES, **_SHAREGPT_EXTRA}
            allowed = ", ".join(SHAREGPT_ROLES) + " (or user, assistant, tool, function_call, observation)"
        where = f"`{field_name}` message {i}"
        if role is None:
            raise RowProblem(f"{where} has no `{rkey}`")
        if not isinstance(role, str) or role not in names:
            raise RowProblem(f"{where}: unknown role {role!r}: roles are {allowed}")
        if role == "function_call":  # sharegpt: the value is the call (or a list of calls) as JSON
            calls = _parse_json(content, f"{where} (function_call): `{ckey}`")
            out.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": _tool_calls(calls, f"{where} (function_call)"),
                }
            )
            continue
        calls = m.get("tool_calls")
        if calls is not None and names[role] != "assistant":
            raise RowProblem(f"{where} ({role}) has `tool_calls`: only assistant messages call tools")
        if content is None and calls is None:
            raise RowProblem(f"{where} ({role}) has no `{ckey}`")
        if isinstance(content, list) and ckey == "content":  # OpenAI's content parts
            content = text_of_parts(content, f"{where} ({role})")
        if content is not None and not isinstance(content, str):
            raise RowProblem(
                f"{where} ({role}): `{ckey}` must be a string (or OpenAI text parts), got {json_type(content)}"
            )
        msg = {"role": names[role], "content": content or ""}
        if calls is not None:
            msg["tool_calls"] = _tool_calls(calls, where)
        for key in (
            "name",
            "tool_call_id",
        ):  # a tool result's function name and call id, kept for the template
            if names[role] == "tool" and isinstance(m.get(key), str):
                msg[key] = m[key]
        out.append(msg)
    return out


def _parse_json(value: Any, what: str) -> Any:
    """`value`, parsed when it is a JSON string (tools and tool calls often come serialised)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RowProblem(f"{what} is not valid JSON ({e}): {short(value)!r}") from None
    except RecursionError:
        raise RowProblem(f"{what} is nested too deeply") from None


def _tool_calls(value: Any, where: str) -> list[dict]:
    """An assistant message's tool calls -> [{"type": "function", "function": {"name", "arguments": {...}}}].

    Takes the OpenAI form ({"type": "function", "function": {...}}) or the flat one ({"name", "arguments"});
    arguments given as a JSON string are parsed, as the chat templates that render them (Llama 3.1's,
    Qwen 2.5's) expect an object."""
    value = _parse_json(value, f"{where}: `tool_calls`")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowProblem(f"{where}: `tool_calls` must be a non-empty list of calls, got {json_type(value)}")
    out = []
    for j, call in enumerate(value, start=1):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise RowProblem(
                f"{where}: tool call {j} must be an object with a function name, got {json_type(call)}"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RowProblem(f"{where}: tool call {j} has no function `name`")
        args = _parse_json(
            fn.get("arguments", fn.get("parameters", {})), f"{where}: tool call {j} ({name}) `arguments`"
        )
        if not isinstance(args, dict):
            raise RowProblem(
                f"{where}: tool call {j} ({name}): `arguments` must be an object, got {json_type(args)}"
            )
        entry = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _tools(value: Any) -> list[dict] | None:
    """A row's `tools` column (function definitions, a list or its JSON) -> the list the chat template
    takes, each as {"type": "function", "function": {...}}; None when absent or empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    value = _parse_json(value, "`tools`")
    if not isinstance(value, list):
        raise RowProblem(f"`tools` must be a list of function definitions, got {json_type(value)}")
    out = []
    for j, tool in enumerate(value, start=1):
        if not isinstance(tool, dict):
            raise RowProblem(f"`tools` item {j} must be an object, got {json_type(tool)}")
        if tool.get("type", "function") != "function":
            raise RowProblem(
                f"`tools` item {j}: type {tool.get('type')!r}; only function tools can be rendered"
            )
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise RowProblem(f"`tools` item {j} has no function `name`")
        out.append({"type": "function", "function": fn})
    return out or None


def parse_tools(value: Any, where: str) -> list[dict] | None:
    """`_tools` for callers outside a data file (`fastsft generate --tools`): a DataError naming `where`."""
    try:
        return _tools(value)
    except RowProblem as e:
        raise DataError(
            f'{where}: {e}. Expected a list like [{{"type": "function", "function": {{"name": ..., '
            '"description": ..., "parameters": {...}}}]'
        ) from None


def text_of_parts(parts: list, where: str) -> str:
    """OpenAI's content parts ([{"type": "text", "text": "hi"}, ...]) -> their text, joined by newlines as
    OpenAI-compatible servers (vLLM) join them; a part of another type (an image, audio) is refused by name.
    The one reader of parts: training rows, `eval --data`, generate / chat prompts and serve's requests."""
    texts = []
    for i, part in enumerate(parts, start=1):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"of type {kind!r}" if isinstance(kind, str) else f"{json_type(part)} without a `type`"
            raise RowProblem(
                f"{where}: content part {i} is {what}; fastsft's models read text only. Give `content` as a "
                'string or as text parts ({"type": "text", "text": "..."})'
            )
        texts.append(part["text"])
    return "\n".join(texts)


def parse_messages(value: Any, where: str) -> list[dict]:
    """Chat messages from outside a data file (a `fastsft serve` request), normalised as a data row's
    are (tool calls to the template's form, arguments parsed); a DataError naming `where`."""
    try:
        return _message_list(value, where, sharegpt=False)
    except RowProblem as e:
        raise DataError(str(e)) from None


def _check_answers(messages: list[dict], field_name: str) -> None:
    answers = [(i, m) for i, m in enumerate(messages, start=1) if m["role"] == "assistant"]
    if not answers:
        raise RowProblem(f"`{field_name}` has no assistant turn: nothing to learn from")
    for i, m in answers:
        if not m["content"].strip() and not m.get("tool_calls"):
            raise RowProblem(f"`{field_name}` message {i}: empty assistant answer")


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def undo_arrow_union(obj: dict) -> dict:
    """A raw row from Parquet or `datasets`, with the nulls Arrow added to tools and tool calls removed.

    Arrow stores a column of objects as one struct type, with every key any row has and null where a
    row lacks it: one row's `{"city": "Oslo"}` comes back as `{"city": "Oslo", "zone": None}` because
    another row's call takes a zone. Rendered, that would read `"zone": null`. The nulls inside `tools`
    and `tool_calls` are dropped (an argument set to null on purpose goes with them; JSON files keep it).
    """
    out = dict(obj)
    if isinstance(out.get("tools"), list):
        out["tools"] = _drop_nulls(out["tools"])
    for col in ("messages", "conversations", "prompt", "completion"):
        msgs = out.get(col)
        if isinstance(msgs, list):
            out[col] = [
                {**m, "tool_calls": _drop_nulls(m["tool_calls"])}
                if isinstance(m, dict) and m.get("tool_calls")
                else m
                for m in msgs
            ]
    return out


def tool_names(row: dict) -> list[str]:
    """The function names a conversational row defines or calls (each must show in the rendered text)."""
    names = [t["function"]["name"] for t in row.get("tools") or []]
    for m in [*row.get("messages", []), *(row.get("prompt") or []), *(row.get("completion") or [])]:
        if isinstance(m, dict):
            names += [c["function"]["name"] for c in m.get("tool_calls") or []]
    return names


def _string_field(obj: dict, name: str, *, required: bool = True, nonempty: bool = True) -> str:
    value = obj.get(name)
    if value is None:
        if required:
            raise RowProblem(f"missing field `{name}`")
        return ""
    if not isinstance(value, str):
        raise RowProblem(f"`{name}` must be a string, got {json_type(value)}")
    if nonempty and not value.strip():
        raise RowProblem(f"`{name}` is empty")
    return value


def normalize(obj: dict, fmt: str) -> dict:
    """One renamed row in shape `fmt` -> TRL's form. Raises RowProblem."""
    tools = _tools(obj.get("tools"))
    if fmt in ("messages", "conversations", "sharegpt"):
        col = "messages" if fmt == "messages" else "conversations"
        if col not in obj:
            raise RowProblem(f"missing field `{col}`")
        messages = _message_list(obj[col], col, sharegpt=fmt == "sharegpt")
        _check_answers(messages, col)
        return {"messages": messages, **({"tools": tools} if tools else {})}
    if tools and not (fmt == "prompt_completion" and isinstance(_maybe_json(obj.get("prompt")), list)):
        raise RowProblem(
            "`tools` is given but the row is not a conversation: tools are rendered by the chat template, "
            "which only conversational data goes through. Drop the column or give the row as messages"
        )
    if fmt == "alpaca":
        instruction = _string_field(obj, "instruction")
        extra = _string_field(obj, "input", required=False, nonempty=False)
        output = _string_field(obj, "output")
        system = _string_field(obj, "system", required=False, nonempty=False)
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": output},
        ]
        return {"messages": messages}
    if fmt == "prompt_completion":
        for name in ("prompt", "completion"):
            if name not in obj or obj[name] is None:
                raise RowProblem(f"missing field `{name}`")
        prompt, completion = _maybe_json(obj["prompt"]), _maybe_json(obj["completion"])
        if isinstance(prompt, list) or isinstance(completion, list):
            if not (isinstance(prompt, list) and isinstance(completion, list)):
                raise RowProblem(
                    "`prompt` and `completion` must both be strings or both be lists of messages, got "
                    f"{json_type(prompt)} and {json_type(completion)}"
                )
            p = _message_list(prompt, "prompt", sharegpt=False)
            c = _message_list(completion, "completion", sharegpt=False)
            _check_answers(c, "completion")
            return {"prompt": p, "completion": c, **({"tools": tools} if tools else {})}
        if not isinstance(prompt, str):
            raise RowProblem(f"`prompt` must be a string or a list of messages, got {json_type(prompt)}")
        if not isinstance(completion, str):
            raise RowProblem(
                f"`completion` must be a string or a list of messages, got {json_type(completion)}"
            )
        if not completion.strip():
            raise RowProblem("`completion` is empty")
        return {"prompt": prompt, "completion": completion}
    if fmt == "text":
        return {"text": _string_field(obj, "text")}
    raise ValueError(fmt)  # pragma: no cover


def kind(row: dict) -> str:
    """'messages', 'prompt_completion_chat', 'prompt_completion_text' or 'text'."""
    if "messages" in row:
        return "messages"
    if "prompt" in row:
        return "prompt_completion_chat" if isinstance(row["prompt"], list) else "prompt_completion_text"
    return "text"


def load_examples(value: str, spec, *, key: str, fmt: str | None) -> tuple[list[Example], dict, str]:
    """Read, rename, detect, validate and normalise one source of the DataSpec `spec`. Returns (examples,
    skip info, format): the info {"name", "rows", "skipped", "skip_reasons"} counts the rows skipped under
    on_invalid = "skip"."""
    d = spec.data
    raw_rows, source_kind = read_source(value, spec, key=key)
    if not raw_rows:
        raise DataError(f"data.{key} = {value!r}: no rows")
    columns = dict(d.columns or {})
    first = _first_readable(value, raw_rows, columns)
    fmt = fmt or _format_of(value, first, d.format, columns)
    examples: list[Example] = []
    problems: list[str] = []
    kinds: str | None = None
    for where, obj in raw_rows:
        try:
            if isinstance(obj, RowProblem):
                raise obj
            obj = _rename(obj, columns)
            if source_kind in ARROW_SOURCES:
                obj = undo_arrow_union(obj)
            row = normalize(obj, fmt)
            kinds = kinds or kind(row)
            if kind(row) != kinds:
                raise RowProblem(
                    f"this row is {KIND_NAMES[kind(row)]} but the rows before it are {KIND_NAMES[kinds]}"
                )
        except RowProblem as e:
            message = f"{where}: {e}"
            if d.on_invalid == "error":
                raise DataError(message + skip_hint()) from None
            problems.append(message)
            continue
        examples.append(Example(where, row))
    info = {
        "name": value,
        "rows": len(raw_rows),
        "skipped": len(problems),
        "skip_reasons": problems[:MAX_SKIP_REASONS],
    }
    check_skips(value, info)
    return examples, info, fmt


def _first_readable(value: str, raw_rows: list, columns: dict[str, str]) -> dict:
    """The first row that could be read (its columns decide the shape); `data.columns` checked against it."""
    first = next((r for _, r in raw_rows if isinstance(r, dict)), None)
    if first is None:  # not one row could be read: its problem says more than "no columns"
        where, problem = raw_rows[0]
        raise DataError(
            f"{where}: {problem}"
            + (f" (and every other row of {value} is unreadable too)" if len(raw_rows) > 1 else "")
        )
    missing = [f"{t} = {s!r}" for t, s in columns.items() if s not in first and t not in first]
    if missing:
        raise DataError(
            f"data.columns: {', '.join(missing)}, but {value} has no such column "
            f"(its columns: {', '.join(map(str, first)) or 'none'})"
        )
    return first


def _format_of(value: str, first: dict, setting: str, columns: dict[str, str]) -> str:
    """`data.format`, or the shape detected from the first row's (renamed) columns."""
    if setting != "auto":
        return setting
    fmt = detect_format(_rename(first, columns))
    if fmt is None:
        cols = ", ".join(map(str, first)) or "none"
        expected = "; ".join(f"{k}: {v}" for k, v in _EXPECTED.items())
        raise DataError(
            f"{value}: cannot tell the data's shape from its columns ({cols}). Expected one of: {expected}. "
            'Set data.format, or rename columns with data.columns, e.g. { messages = "dialog" }'
        )
    return fmt


KIND_NAMES = {
    "messages": "a conversation",
    "prompt_completion_chat": "a prompt/completion of messages",
    "prompt_completion_text": "a prompt/completion of strings",
    "text": "plain text",
}


def skip_hint() -> str:
    return ' (set data.on_invalid = "skip" to skip bad rows and count them)'


def check_skips(value: str, info: dict) -> None:
    total, skipped = info["rows"], info["skipped"]
    if skipped and skipped * 2 > total:
        shown = "\n".join(f"  - {p}" for p in info["skip_reasons"])
        raise DataError(
            f"{value}: {skipped} of {total} rows are invalid, more than half: the format or the columns are "
            f"probably wrong rather than a few rows. First problems:\n{shown}"
        )
