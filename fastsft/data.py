"""Training data: read, validate, normalise, tokenize-check and describe it.

`prepare_data(recipe, tokenizer)` turns `[data]` into what `SFTTrainer` takes:

1. Read `train` (and `eval`): .jsonl (line by line, so errors name the line), .json (a list of
   objects), .parquet, .csv, a `save_to_disk` folder, or a hub data set name.
2. Rename columns (`columns`), detect the shape (or take `format`), validate every row and normalise
   it into one of TRL's forms: `{"messages": [...]}`, `{"prompt": ..., "completion": ...}` or
   `{"text": ...}`. A bad row names its file, line and problem; `on_invalid = "skip"` skips and counts.
3. Set up the tokenizer: the chat template (`chat_template` overrides the tokenizer's), a pad token
   that is not the end-of-turn token.
4. Tokenize every example exactly as TRL will (same calls, same masks) to count tokens, truncation
   and trained tokens, to refuse examples left with no trained token, and to check that the
   end-of-turn token after every answer carries loss.
5. Hand over: when TRL can do the masking itself (assistant masks from `{% generation %}` markers, or
   no assistant-only masking) the normalised rows go to TRL with `sft_kwargs`; when assistant-only
   loss is asked for and the template has no markers, the rows are tokenized here (assistant spans
   found by rendering the conversation turn by turn) and handed over pre-tokenized
   (`input_ids` + `assistant_masks`), cached under `$FASTSFT_CACHE/data/<fingerprint>`.

`preview(recipe, tokenizer)` shows the first examples with the tokens that carry loss highlighted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat_templates import end_of_turn_token, has_generation_markers, load_template
from .errors import DataError

# Bump when the way data is prepared changes, so that stale caches are never reused.
DATA_VERSION = "2"

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# Also understood in sharegpt data: the TRL-style names, and the function-calling names of the
# LLaMA-Factory / glaive sharegpt variant (a `function_call` turn is an assistant turn whose value is
# the call as JSON; an `observation` is the tool's result).
_SHAREGPT_EXTRA = {"user": "user", "assistant": "assistant", "tool": "tool", "function_call": "assistant",
                   "observation": "tool"}  # fmt: skip
FORMATS = ("text", "messages", "prompt_completion", "conversations", "sharegpt", "alpaca")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
MAX_SKIP_REASONS = 5
EOT_CHECK_EXAMPLES = 8  # examples whose every answer must end with a trained end-of-turn token


@dataclass
class PreparedData:
    """What `train.run` hands to SFTTrainer (`train`, `eval`, `sft_kwargs`) and to run.json."""

    train: Any  # datasets.Dataset
    eval: Any | None
    sft_kwargs: dict
    stats: dict
    fingerprint: str


@dataclass
class _Example:
    where: str  # "data/x.jsonl line 4"
    row: dict  # normalised: messages | prompt+completion | text
    input_ids: list[int] = field(default_factory=list)  # untruncated
    mask: list[int] = field(default_factory=list)  # 1 = carries loss


class _RowProblem(Exception):
    """One row that cannot be used; becomes a DataError (or a skip) naming the row."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _is_local(value: str, resolved: Path) -> bool:
    if resolved.exists():
        return True
    return value.endswith(LOCAL_SUFFIXES) or value.startswith((".", "/", "~")) or "\\" in value


def _read_source(value: str, recipe, *, key: str) -> tuple[list[tuple[str, Any]], str]:
    """`data.train/eval` -> ([(where, raw row or _RowProblem)], kind)."""
    d = recipe.data
    path = recipe.resolve_path(value)
    if not _is_local(value, path):
        return _read_hub(value, d.subset, d.split), "hub"
    if not path.exists():
        raise DataError(f"data.{key} = {value!r}: file not found: {path}")
    if path.is_dir():
        return _read_disk(value, path, d.split), "disk"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(value, path), "jsonl"
    if suffix == ".json":
        return _read_json(value, path), "json"
    if suffix == ".parquet":
        return _read_parquet(value, path), "parquet"
    if suffix == ".csv":
        return _read_csv(value, path), "csv"
    raise DataError(
        f"data.{key} = {value!r}: unknown file type {suffix or '(none)'!r}; use .jsonl, .json, .parquet, "
        ".csv, a folder written by datasets' save_to_disk, or a hub data set name"
    )


def _read_jsonl(name: str, path: Path) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{name} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append((where, _RowProblem(f"not UTF-8 text (byte {e.start} of the line)")))
                continue
            if not line.strip():
                continue
            if len(raw) > MAX_ROW_BYTES:
                rows.append((where, _RowProblem(_too_big(len(raw)))))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((where, _RowProblem(f"not valid JSON: {e.msg} (column {e.colno})")))
                continue
            except RecursionError:
                rows.append((where, _RowProblem("nested too deeply to be a data row (JSON arrays/objects in each other)")))
                continue
            if not isinstance(obj, dict):
                rows.append((where, _RowProblem(f"expected a JSON object, got {_json_type(obj)}")))
                continue
            problem = _not_text(obj)
            rows.append((where, _RowProblem(problem) if problem else obj))
    return rows


def _read_json(name: str, path: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{name} line {e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{name}: nested too deeply to be a data file (JSON arrays/objects in each other)") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of objects, got {_json_type(data)} (for one object a line, use .jsonl)")
    rows: list[tuple[str, Any]] = []
    for i, obj in enumerate(data, start=1):
        where = f"{name} row {i}"
        if not isinstance(obj, dict):
            rows.append((where, _RowProblem(f"expected a JSON object, got {_json_type(obj)}")))
        else:
            problem = _not_text(obj)
            rows.append((where, _RowProblem(problem) if problem else obj))
    return rows


# One row larger than this is refused (its line named): tokenizing it would take gigabytes of memory
# (a 50 MB row took 3.5 GB), and max_length keeps only its start anyway.
MAX_ROW_BYTES = 8 * 2**20


def _too_big(n: int) -> str:
    return (
        f"{n / 2**20:.1f} MB in one row, over the {MAX_ROW_BYTES // 2**20} MB a row may hold; training keeps only "
        "its first data.max_length tokens anyway. Split it or shorten it"
    )


def _not_text(obj, depth: int = 0) -> str | None:
    """Why `obj` (a parsed row) holds something that is not text: a lone surrogate such as "\\ud800" (a
    half of a UTF-16 pair, which no tokenizer can encode), or None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            return (
                f"a lone surrogate ({obj[e.start]!r} at character {e.start + 1} of {_short(obj)!r}) is not text; "
                "write the character itself or its full UTF-16 pair (\\ud83d\\ude00)"
            )
        return None
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, list):
        items = obj
    else:
        return None
    for v in items:
        problem = _not_text(v, depth + 1)
        if problem:
            return problem
    return None


def _read_parquet(name: str, path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several kinds
        raise DataError(f"{name}: cannot read as Parquet: {e}") from None
    return [(f"{name} row {i}", obj) for i, obj in enumerate(table.to_pylist(), start=1)]


def _read_csv(name: str, path: Path) -> list[tuple[str, Any]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = []
            for obj in reader:
                # reader.line_num is the line the row ends on (a quoted field may span lines)
                rows.append((f"{name} line {reader.line_num}", dict(obj)))
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{name}: cannot read as CSV: {e}") from None
    return rows


def _read_disk(name: str, path: Path, split: str) -> list[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(
            f"{name}: a folder, but not one written by datasets' save_to_disk ({type(e).__name__}: {e})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split {split!r}; its splits are {', '.join(ds)} (set data.split)")
        ds = ds[split]
    return [(f"{name} row {i}", obj) for i, obj in enumerate(ds.to_list(), start=1)]


def _read_hub(name: str, subset: str | None, split: str) -> list[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        raise DataError(
            f"data.{name!r} is not a local file or folder, and loading it as a hub data set failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). A hub data set needs network "
            "access; otherwise give a local path (.jsonl, .json, .parquet, .csv or a save_to_disk folder)."
        ) from None
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - split is always given
        ds = ds[split]
    return [(f"{name} row {i}", obj) for i, obj in enumerate(ds.to_list(), start=1)]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# ----------------------------------------------------------------------------------------------
# Shapes: detection, validation, normalisation
# ----------------------------------------------------------------------------------------------


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
        raise _RowProblem(f"`{field_name}` is missing")
    if not isinstance(value, list):
        raise _RowProblem(f"`{field_name}` must be a list of messages, got {_json_type(value)}")
    if not value:
        raise _RowProblem(f"`{field_name}` is an empty list")
    out = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict):
            raise _RowProblem(f"`{field_name}` message {i} must be an object, got {_json_type(m)}")
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
            raise _RowProblem(f"{where} has no `{rkey}`")
        if not isinstance(role, str) or role not in names:
            raise _RowProblem(f"{where}: unknown role {role!r}: roles are {allowed}")
        if role == "function_call":  # sharegpt: the value is the call (or a list of calls) as JSON
            calls = _parse_json(content, f"{where} (function_call): `{ckey}`")
            out.append({"role": "assistant", "content": "",
                        "tool_calls": _tool_calls(calls, f"{where} (function_call)")})  # fmt: skip
            continue
        calls = m.get("tool_calls")
        if calls is not None and names[role] != "assistant":
            raise _RowProblem(f"{where} ({role}) has `tool_calls`: only assistant messages call tools")
        if content is None and calls is None:
            raise _RowProblem(f"{where} ({role}) has no `{ckey}`")
        if content is not None and not isinstance(content, str):
            raise _RowProblem(f"{where} ({role}): `{ckey}` must be a string, got {_json_type(content)}")
        msg = {"role": names[role], "content": content or ""}
        if calls is not None:
            msg["tool_calls"] = _tool_calls(calls, where)
        for key in ("name", "tool_call_id"):  # a tool result's function name and call id, kept for the template
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
        raise _RowProblem(f"{what} is not valid JSON ({e}): {_short(value)!r}") from None
    except RecursionError:
        raise _RowProblem(f"{what} is nested too deeply") from None


def _tool_calls(value: Any, where: str) -> list[dict]:
    """An assistant message's tool calls -> [{"type": "function", "function": {"name", "arguments": {...}}}].

    Takes the OpenAI form ({"type": "function", "function": {...}}) or the flat one ({"name", "arguments"});
    arguments given as a JSON string are parsed, as the chat templates that render them (Llama 3.1's,
    Qwen 2.5's) expect an object."""
    value = _parse_json(value, f"{where}: `tool_calls`")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _RowProblem(f"{where}: `tool_calls` must be a non-empty list of calls, got {_json_type(value)}")
    out = []
    for j, call in enumerate(value, start=1):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise _RowProblem(f"{where}: tool call {j} must be an object with a function name, got {_json_type(call)}")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _RowProblem(f"{where}: tool call {j} has no function `name`")
        args = _parse_json(fn.get("arguments", fn.get("parameters", {})), f"{where}: tool call {j} ({name}) `arguments`")
        if not isinstance(args, dict):
            raise _RowProblem(f"{where}: tool call {j} ({name}): `arguments` must be an object, got {_json_type(args)}")
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
        raise _RowProblem(f"`tools` must be a list of function definitions, got {_json_type(value)}")
    out = []
    for j, tool in enumerate(value, start=1):
        if not isinstance(tool, dict):
            raise _RowProblem(f"`tools` item {j} must be an object, got {_json_type(tool)}")
        if tool.get("type", "function") != "function":
            raise _RowProblem(f"`tools` item {j}: type {tool.get('type')!r}; only function tools can be rendered")
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise _RowProblem(f"`tools` item {j} has no function `name`")
        out.append({"type": "function", "function": fn})
    return out or None


def parse_tools(value: Any, where: str) -> list[dict] | None:
    """`_tools` for callers outside a data file (`fastsft generate --tools`): a DataError naming `where`."""
    try:
        return _tools(value)
    except _RowProblem as e:
        raise DataError(
            f'{where}: {e}. Expected a list like [{{"type": "function", "function": {{"name": ..., '
            '"description": ..., "parameters": {...}}}]'
        ) from None


def parse_messages(value: Any, where: str) -> list[dict]:
    """Chat messages from outside a data file (a `fastsft serve` request), normalised as a data row's
    are (tool calls to the template's form, arguments parsed); a DataError naming `where`."""
    try:
        return _message_list(value, where, sharegpt=False)
    except _RowProblem as e:
        raise DataError(str(e)) from None


def _check_answers(messages: list[dict], field_name: str) -> None:
    answers = [(i, m) for i, m in enumerate(messages, start=1) if m["role"] == "assistant"]
    if not answers:
        raise _RowProblem(f"`{field_name}` has no assistant turn: nothing to learn from")
    for i, m in answers:
        if not m["content"].strip() and not m.get("tool_calls"):
            raise _RowProblem(f"`{field_name}` message {i}: empty assistant answer")


ARROW_SOURCES = ("parquet", "disk", "hub")


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _undo_arrow_union(obj: dict) -> dict:
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
                {**m, "tool_calls": _drop_nulls(m["tool_calls"])} if isinstance(m, dict) and m.get("tool_calls") else m
                for m in msgs
            ]
    return out


def _tool_names(row: dict) -> list[str]:
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
            raise _RowProblem(f"missing field `{name}`")
        return ""
    if not isinstance(value, str):
        raise _RowProblem(f"`{name}` must be a string, got {_json_type(value)}")
    if nonempty and not value.strip():
        raise _RowProblem(f"`{name}` is empty")
    return value


def normalize(obj: dict, fmt: str) -> dict:
    """One renamed row in shape `fmt` -> TRL's form. Raises _RowProblem."""
    tools = _tools(obj.get("tools"))
    if fmt in ("messages", "conversations", "sharegpt"):
        col = "messages" if fmt == "messages" else "conversations"
        if col not in obj:
            raise _RowProblem(f"missing field `{col}`")
        messages = _message_list(obj[col], col, sharegpt=fmt == "sharegpt")
        _check_answers(messages, col)
        return {"messages": messages, **({"tools": tools} if tools else {})}
    if tools and not (fmt == "prompt_completion" and isinstance(_maybe_json(obj.get("prompt")), list)):
        raise _RowProblem(
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
                raise _RowProblem(f"missing field `{name}`")
        prompt, completion = _maybe_json(obj["prompt"]), _maybe_json(obj["completion"])
        if isinstance(prompt, list) or isinstance(completion, list):
            if not (isinstance(prompt, list) and isinstance(completion, list)):
                raise _RowProblem(
                    "`prompt` and `completion` must both be strings or both be lists of messages, got "
                    f"{_json_type(prompt)} and {_json_type(completion)}"
                )
            p = _message_list(prompt, "prompt", sharegpt=False)
            c = _message_list(completion, "completion", sharegpt=False)
            _check_answers(c, "completion")
            return {"prompt": p, "completion": c, **({"tools": tools} if tools else {})}
        if not isinstance(prompt, str):
            raise _RowProblem(f"`prompt` must be a string or a list of messages, got {_json_type(prompt)}")
        if not isinstance(completion, str):
            raise _RowProblem(f"`completion` must be a string or a list of messages, got {_json_type(completion)}")
        if not completion.strip():
            raise _RowProblem("`completion` is empty")
        return {"prompt": prompt, "completion": completion}
    if fmt == "text":
        return {"text": _string_field(obj, "text")}
    raise ValueError(fmt)  # pragma: no cover


def _kind(row: dict) -> str:
    """'messages', 'prompt_completion_chat', 'prompt_completion_text' or 'text'."""
    if "messages" in row:
        return "messages"
    if "prompt" in row:
        return "prompt_completion_chat" if isinstance(row["prompt"], list) else "prompt_completion_text"
    return "text"


def _load_examples(value: str, recipe, *, key: str, fmt: str | None, log) -> tuple[list[_Example], dict, str]:
    """Read, rename, detect, validate and normalise one source. Returns (examples, skip info, format)."""
    d = recipe.data
    raw_rows, source_kind = _read_source(value, recipe, key=key)
    if not raw_rows:
        raise DataError(f"data.{key} = {value!r}: no rows")
    columns = dict(d.columns or {})
    first = next((r for _, r in raw_rows if isinstance(r, dict)), None)
    if first is not None and columns:
        missing = [f"{t} = {s!r}" for t, s in columns.items() if s not in first and t not in first]
        if missing:
            raise DataError(
                f"data.columns: {', '.join(missing)}, but {value} has no such column "
                f"(its columns: {', '.join(map(str, first)) or 'none'})"
            )
    if first is None:  # not one row could be read: its problem says more than "no columns"
        where, problem = raw_rows[0]
        raise DataError(f"{where}: {problem}" + (f" (and every other row of {value} is unreadable too)" if len(raw_rows) > 1 else ""))
    if fmt is None:
        fmt = d.format
        if fmt == "auto":
            fmt = detect_format(_rename(first, columns)) if first is not None else None
            if fmt is None:
                cols = ", ".join(map(str, first)) if first else "none"
                expected = "; ".join(f"{k}: {v}" for k, v in _EXPECTED.items())
                raise DataError(
                    f"{value}: cannot tell the data's shape from its columns ({cols}). Expected one of: {expected}. "
                    'Set data.format, or rename columns with data.columns, e.g. { messages = "dialog" }'
                )
    examples: list[_Example] = []
    problems: list[str] = []
    kinds: str | None = None
    for where, obj in raw_rows:
        try:
            if isinstance(obj, _RowProblem):
                raise obj
            obj = _rename(obj, columns)
            if source_kind in ARROW_SOURCES:
                obj = _undo_arrow_union(obj)
            row = normalize(obj, fmt)
            k = _kind(row)
            if kinds is None:
                kinds = k
            elif k != kinds:
                raise _RowProblem(f"this row is {_KIND_NAMES[k]} but the rows before it are {_KIND_NAMES[kinds]}")
        except _RowProblem as e:
            message = f"{where}: {e}"
            if d.on_invalid == "error":
                raise DataError(message + _skip_hint()) from None
            problems.append(message)
            continue
        examples.append(_Example(where, row))
    info = {"name": value, "rows": len(raw_rows), "skipped": len(problems), "skip_reasons": problems[:MAX_SKIP_REASONS]}
    _check_skips(value, info)
    return examples, info, fmt


_KIND_NAMES = {
    "messages": "a conversation",
    "prompt_completion_chat": "a prompt/completion of messages",
    "prompt_completion_text": "a prompt/completion of strings",
    "text": "plain text",
}


def _skip_hint() -> str:
    return ' (set data.on_invalid = "skip" to skip bad rows and count them)'


def _check_skips(value: str, info: dict) -> None:
    total, skipped = info["rows"], info["skipped"]
    if skipped and skipped * 2 > total:
        shown = "\n".join(f"  - {p}" for p in info["skip_reasons"])
        raise DataError(
            f"{value}: {skipped} of {total} rows are invalid, more than half: the format or the columns are "
            f"probably wrong rather than a few rows. First problems:\n{shown}"
        )


# ----------------------------------------------------------------------------------------------
# The tokenizer: chat template, end of turn, pad token
# ----------------------------------------------------------------------------------------------


def _setup_template(recipe, tokenizer) -> str | None:
    """Apply `data.chat_template`; return a description of the template in use (None if none)."""
    name = recipe.data.chat_template
    if name:
        tokenizer.chat_template = load_template(name, recipe.base_dir)
        return name
    return "tokenizer" if getattr(tokenizer, "chat_template", None) else None


_PAD_CANDIDATES = (
    "<|finetune_right_pad_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<pad>",
    "[PAD]",
    "<|pad|>",
    "<unk>",
)


def _setup_pad_token(tokenizer, eot: str | None, log) -> str | None:
    """Give the tokenizer a pad token that is not the end-of-turn token. Returns the token it added
    (which needs the model's embeddings resized), or None."""
    if tokenizer.pad_token is not None:
        return None
    vocab = tokenizer.get_vocab()
    candidates = [tokenizer.unk_token, *_PAD_CANDIDATES, tokenizer.eos_token]
    for tok in candidates:
        if tok and tok != eot and tok in vocab:
            tokenizer.pad_token = tok
            log(f"data: the tokenizer has no pad token; using {tok!r} (not the end-of-turn token {eot!r})")
            return None
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    log(
        "warning: the tokenizer has no pad token and no spare special token; added '<|pad|>' "
        f"(id {tokenizer.pad_token_id}): the model's embeddings must be resized to {len(tokenizer)} "
        "(model.resize_token_embeddings(len(tokenizer)))"
    )
    return "<|pad|>"


# ----------------------------------------------------------------------------------------------
# Tokenizing as TRL does
# ----------------------------------------------------------------------------------------------


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _as_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


class _Encoder:
    """Tokenizes a normalised row into (input_ids, mask) exactly as TRL 1.15/1.16's SFTTrainer does,
    or, for assistant-only loss with a template without generation markers, with assistant spans
    found by rendering the conversation turn by turn."""

    def __init__(self, tokenizer, *, assistant_only: bool, completion_only: bool, markers: bool, eot: str | None):
        self.tok = tokenizer
        self.assistant_only = assistant_only
        self.completion_only = completion_only
        self.markers = markers
        self.eot = eot

    # -- conversations
    def _chat(self, messages: list[dict], tools: list[dict] | None = None, **kw) -> dict:
        if tools:
            kw["tools"] = tools
        out = self.tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
        return {k: _as_list(v) for k, v in out.items() if k in ("input_ids", "assistant_masks")}

    def _chat_with_assistant_mask(self, messages: list[dict], tools: list[dict] | None) -> tuple[list[int], list[int]]:
        if self.markers:
            out = self._chat(messages, tools, return_assistant_tokens_mask=True)
            return out["input_ids"], out["assistant_masks"]
        return self.own_assistant_mask(messages, tools)

    def check_tools(self, row: dict, ids: list[int]) -> None:
        """A row with tool definitions or calls: every function name must show in the encoded text, or
        the template dropped them (most templates without tool support ignore `tools` silently)."""
        names = _tool_names(row)
        if not names:
            return
        text = self.tok.decode(ids)
        missing = [n for n in dict.fromkeys(names) if n not in text]
        if missing:
            what = "tool definitions (`tools`)" if row.get("tools") else "tool calls"
            raise _RowProblem(
                f"the chat template drops this row's {what}: {', '.join(map(repr, missing))} does not appear in "
                "the rendered text, so the model would be trained without them. Use a template that renders "
                'tools: the model\'s own, or data.chat_template = "chatml", "qwen2.5", "llama3" or "mistral"'
            )

    def own_assistant_mask(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        """Assistant answers (and the end-of-turn token after each) found by rendering turn by turn."""
        tok = self.tok
        kw = {"tools": tools} if tools else {}
        full = tok.apply_chat_template(messages, tokenize=False, **kw)
        spans = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = -1
            if i > 0:
                before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True, **kw)
                if full.startswith(before) and len(before) >= cursor:
                    start = len(before)
            # a tool call without text is found by its function's name
            content = m["content"].strip() or next((c["function"]["name"] for c in m.get("tool_calls") or []), "")
            at = full.find(content, max(start, cursor))
            if start < 0:
                start = at
            if at < 0 or start < 0:
                raise _RowProblem(
                    f"cannot find assistant message {i + 1} in the rendered conversation: the chat template "
                    "changes earlier turns as later ones are added. Use a template with {% generation %} "
                    "markers (data.chat_template = \"chatml\", ...)"
                )
            upto = tok.apply_chat_template(messages[: i + 1], tokenize=False, **kw)
            limit = len(upto) if full.startswith(upto) and len(upto) > start else len(full)
            end = limit
            if self.eot:
                k = full.find(self.eot, at + len(content), limit)
                if k >= 0:
                    end = k + len(self.eot)
            spans.append((start, end))
            cursor = end
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = _as_list(enc["input_ids"])
        mask = [0] * len(ids)
        for j, (a, b) in enumerate(enc["offset_mapping"]):
            if any(a < e and b > s for s, e in spans):
                mask[j] = 1
        return ids, mask

    # -- any row
    def encode(self, row: dict) -> tuple[list[int], list[int]]:
        from jinja2 import TemplateError

        try:
            ids, mask = self._encode(row)
        except TemplateError as e:
            raise _RowProblem(f"the chat template fails on this row: {e}") from None
        except (OverflowError, RecursionError, MemoryError) as e:
            # jinja's sandbox refuses range(10**8) with an OverflowError; a template can recurse forever
            raise _RowProblem(f"the chat template fails on this row: {type(e).__name__}: {e}") from None
        self.check_tools(row, ids)
        return ids, mask

    def _encode(self, row: dict) -> tuple[list[int], list[int]]:
        tok = self.tok
        tools = row.get("tools")
        if "messages" in row:
            if self.assistant_only:
                return self._chat_with_assistant_mask(row["messages"], tools)
            ids = self._chat(row["messages"], tools)["input_ids"]
            return ids, [1] * len(ids)
        if "prompt" in row:
            if isinstance(row["prompt"], list):
                prompt_ids = self._chat(row["prompt"], tools, add_generation_prompt=True)["input_ids"]
                both = row["prompt"] + row["completion"]
                if self.assistant_only:
                    ids, amask = self._chat_with_assistant_mask(both, tools)
                else:
                    ids = self._chat(both, tools)["input_ids"]
                    amask = None
            else:
                eos = tok.eos_token or ""
                completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
                prompt_ids = _as_list(tok(text=row["prompt"])["input_ids"])
                ids = _as_list(tok(text=row["prompt"] + completion)["input_ids"])
                amask = None
            n = _common_prefix_length(prompt_ids, ids)
            mask = [0] * n + [1] * (len(ids) - n) if self.completion_only else [1] * len(ids)
            if amask is not None:
                mask = [a & b for a, b in zip(mask, amask, strict=False)]
            return ids, mask
        eos = tok.eos_token or ""
        text = row["text"] if row["text"].endswith(eos) else row["text"] + eos
        ids = _as_list(tok(text=text)["input_ids"])
        return ids, [1] * len(ids)


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of 1s."""
    out, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(mask)))
    return out


def _check_end_of_turn(examples: list[_Example], tokenizer, required: str | None, template: str | None) -> None:
    """Every trained span (an answer) of the first examples must include the end-of-turn token."""
    if required is None:
        raise DataError(
            "the tokenizer has no eos token, so no example can teach the model to stop; use a tokenizer with one"
        )
    rid = tokenizer.convert_tokens_to_ids(required)
    for ex in examples[:EOT_CHECK_EXAMPLES]:
        for s, e in _runs(ex.mask):
            if rid not in ex.input_ids[s:e]:
                answer = tokenizer.decode(ex.input_ids[s:e])
                raise DataError(
                    f"{ex.where}: the end-of-turn token {required!r} after the answer {_short(answer)!r} carries no "
                    f"loss under the chat template ({template or 'none'}), so the model would never learn to stop. "
                    "Use a template whose {% generation %} block includes the end-of-turn token "
                    '(data.chat_template = "chatml", "llama3", "mistral", "qwen2.5" or "gemma", matching the '
                    "model's tokens), or set data.assistant_only_loss = false"
                )


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Fingerprint and cache
# ----------------------------------------------------------------------------------------------


def _hash_source(h, value: str, recipe) -> None:
    path = recipe.resolve_path(value)
    # a local file counts by its bytes, not by how the recipe spells its path (relative in the recipe,
    # absolute in the run directory's copy: a resume must see the same fingerprint)
    h.update(b"source:local\n" if path.exists() else f"source:{value}\n".encode())
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode() + b"\0")
                h.update(p.read_bytes())
    else:  # hub: name, subset and split are all we know before loading
        h.update(f"hub:{recipe.data.subset}:{recipe.data.split}\n".encode())


def compute_fingerprint(recipe, tokenizer, *, template: str | None, options: dict) -> str:
    """sha256 of the data files' bytes, the tokenizer (vocab, special tokens, chat template), the
    template setting and every option that changes the prepared data."""
    d = recipe.data
    h = hashlib.sha256(f"fastsft-data-v{DATA_VERSION}\n".encode())
    _hash_source(h, d.train, recipe)
    if d.eval:
        _hash_source(h, d.eval, recipe)
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    meta = {
        "vocab_size": len(tokenizer),
        "tokenizer_class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "template": template,
        "data": {k: v for k, v in sorted(d.as_dict().items()) if k not in ("train", "eval")},
        "seed": recipe.train.seed,
        **options,
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _cache_dir(fingerprint: str) -> Path:
    from .machine import cache_root

    return cache_root() / "data" / fingerprint


def _cache_load(fingerprint: str):
    import datasets

    folder = _cache_dir(fingerprint)
    if not (folder / "stats.json").exists():
        return None
    try:
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
        train = datasets.load_from_disk(str(folder / "train"))
        ev = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").exists() else None
    except Exception:
        return None
    return train, ev, stats


def _cache_save(fingerprint: str, train, ev, stats: dict) -> None:
    from .files import WriteFailed, make_dir, temp_dir

    folder = _cache_dir(fingerprint)
    try:
        make_dir(folder.parent)
        tmp = temp_dir(folder.parent, f".{fingerprint}-")
    except WriteFailed:
        return  # the cache is an optimisation: no space (or no permission) for it, no cache
    try:
        train.save_to_disk(str(tmp / "train"))
        if ev is not None:
            ev.save_to_disk(str(tmp / "eval"))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
        try:
            tmp.replace(folder)
        except OSError:
            pass  # another process wrote it first: the same content
    except OSError:
        pass  # a full disk while writing the cache: the run goes on without it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# prepare_data
# ----------------------------------------------------------------------------------------------


def _loss_options(recipe, kind: str) -> tuple[bool, bool]:
    """(assistant_only_loss, completion_only_loss) in effect for data of `kind`."""
    d = recipe.data
    conversational = kind in ("messages", "prompt_completion_chat")
    aol = d.assistant_only_loss
    if aol is None:
        aol = conversational
    elif aol and not conversational:
        raise DataError(
            f"data.assistant_only_loss = true needs conversational data, but the data is {_KIND_NAMES[kind]}; "
            "remove the setting (prompt/completion data trains on the completion only by default)"
        )
    col = d.completion_only_loss
    if col is None:
        col = kind.startswith("prompt_completion")
    elif col and not kind.startswith("prompt_completion"):
        col = False  # nothing to do: only prompt/completion data has a completion
    return bool(aol), bool(col)


def _truncation_limit(recipe) -> int | None:
    d = recipe.data
    if d.packing and d.packing_strategy == "wrapped":
        return None  # wrapped packing keeps every token
    return d.max_length


def _encode_all(
    examples: list[_Example], encoder: _Encoder, limit: int | None, on_invalid: str, info: dict
) -> tuple[list[_Example], dict]:
    """Tokenize every example; refuse or skip those left without a trained token."""
    from jinja2 import TemplateError
    kept: list[_Example] = []
    problems: list[str] = []
    truncated = lost = 0
    for ex in examples:
        try:
            try:
                ex.input_ids, ex.mask = encoder.encode(ex.row)
            except TemplateError as e:
                raise _RowProblem(f"the chat template fails on this row: {e}") from None
            if not any(ex.mask):
                raise _RowProblem("no token carries loss: the chat template marks no assistant tokens")
            if limit is not None and len(ex.input_ids) > limit:
                kept_trained = sum(ex.mask[:limit])
                if kept_trained == 0:
                    first = ex.mask.index(1)
                    raise _RowProblem(
                        f"no token carries loss after truncation to max_length = {limit}: the first answer starts "
                        f"at token {first + 1} of {len(ex.input_ids)}. Raise data.max_length or shorten the example"
                    )
                truncated += 1
                lost += sum(ex.mask[limit:])
        except _RowProblem as e:
            message = f"{ex.where}: {e}"
            if on_invalid == "error":
                raise DataError(message + _skip_hint()) from None
            problems.append(message)
            continue
        kept.append(ex)
    if problems:
        info["skipped"] += len(problems)
        info["skip_reasons"] = (info["skip_reasons"] + problems)[:MAX_SKIP_REASONS]
        _check_skips(info["name"], info)
    return kept, {"truncated_examples": truncated, "answer_tokens_lost": lost}


def _split(examples: list[_Example], ratio: float, seed: int) -> tuple[list[_Example], list[_Example], int]:
    """(train, eval, duplicates): `ratio` of the distinct examples held out, one copy each; every copy
    of a held-out example leaves training, so no eval example is a training example (copies of one
    row would otherwise land on both sides and the eval loss would measure memorisation)."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(json.dumps(e.row, sort_keys=True, ensure_ascii=False, default=str), []).append(i)
    n = len(groups)
    n_eval = max(1, round(n * ratio))
    if n - n_eval < 1:
        raise DataError(f"data.val_ratio = {ratio}: {n} distinct example(s) are too few to split off an eval set")
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held = {g[0] for g in order[:n_eval]}
    dropped = {i for g in order[:n_eval] for i in g}
    train = [e for i, e in enumerate(examples) if i not in dropped]
    return train, [e for i, e in enumerate(examples) if i in held], len(examples) - n


def _token_stats(examples: list[_Example], limit: int | None) -> dict:
    lengths = [len(e.input_ids) for e in examples]
    seen = trained = 0
    for e in examples:
        k = len(e.input_ids) if limit is None else min(limit, len(e.input_ids))
        seen += k
        trained += sum(e.mask[:k])
    return {
        "tokens_per_example": {
            "min": min(lengths) if lengths else 0,
            "median": statistics.median(lengths) if lengths else 0,
            "max": max(lengths) if lengths else 0,
        },
        "tokens": seen,
        "trained_tokens": trained,
        "trained_share": round(trained / seen, 4) if seen else 0.0,
    }


def _summary(stats: dict) -> str:
    t = stats["tokens_per_example"]
    ev = f" / {stats['eval_examples']} eval" if stats.get("eval_examples") else ""
    tmpl = f", template {stats['template']}" if stats.get("template") else ""
    return (
        f"{stats['train_examples']} train{ev} examples ({stats['format']}{tmpl}); "
        f"tokens/example {t['min']}/{t['median']:g}/{t['max']} (min/median/max); "
        f"{stats['trained_share']:.0%} of tokens trained; "
        f"{stats['truncated_examples']} truncated ({stats['answer_tokens_lost']} answer tokens lost); "
        f"{stats['skipped']} skipped"
    )


def _to_dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


def prepare_data(recipe, tokenizer, *, log=print) -> PreparedData:
    """`[data]` -> datasets and SFTConfig kwargs for TRL, stats and a fingerprint. Raises DataError."""
    prepared, _, _ = _prepare(recipe, tokenizer, log=log)
    return prepared


def _prepare(recipe, tokenizer, *, log=print, keep: int = 0, use_cache: bool = True):
    """prepare_data, also returning the first `keep` encoded training examples (for preview) and the
    encoded eval examples (when `keep` or not `use_cache`: the cache holds datasets, not examples)."""
    d = recipe.data
    train_ex, train_info, fmt = _load_examples(d.train, recipe, key="train", fmt=None, log=log)
    eval_ex, eval_info = [], None
    if d.eval:
        eval_ex, eval_info, _ = _load_examples(d.eval, recipe, key="eval", fmt=fmt, log=log)
        if d.val_ratio > 0:
            log("data: data.eval is given, so val_ratio is not used")
    kind = _kind(train_ex[0].row)
    if eval_ex and _kind(eval_ex[0].row) != kind:
        raise DataError(
            f"data.eval: {eval_ex[0].where} is {_KIND_NAMES[_kind(eval_ex[0].row)]} but the training data is "
            f"{_KIND_NAMES[kind]}"
        )
    template = _setup_template(recipe, tokenizer)
    if kind == "prompt_completion_text" and getattr(tokenizer, "chat_template", None):
        # One rule for plain prompt/completion rows in every command: with a chat template they are one
        # user -> assistant exchange, as `generate`, `chat` and `eval` prompt the model.
        for ex in train_ex + eval_ex:
            ex.row = {
                **ex.row,
                "prompt": [{"role": "user", "content": ex.row["prompt"]}],
                "completion": [{"role": "assistant", "content": ex.row["completion"]}],
            }
        kind = "prompt_completion_chat"
        log(
            "data: plain prompt/completion rows are rendered through the chat template as one user -> assistant "
            "exchange (as generate, chat and eval prompt the model)"
        )
    conversational = kind in ("messages", "prompt_completion_chat")
    aol, col = _loss_options(recipe, kind)

    if conversational and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the data is conversational but the tokenizer has no chat template: set data.chat_template to "
            "the model's format (chatml, llama3, mistral, qwen2.5, gemma) or to the path of a .jinja file"
        )
    markers = conversational and has_generation_markers(tokenizer.chat_template)
    eot = end_of_turn_token(tokenizer) if conversational else tokenizer.eos_token
    added_pad = _setup_pad_token(tokenizer, eot, log)

    find_spans = conversational and aol and not markers
    # Rows with tools are tokenized here too: as Arrow columns, tool-call arguments of different rows
    # would be merged into one struct type (every row's keys in every call, null where absent).
    tool_rows = sum(1 for e in train_ex + eval_ex if _tool_names(e.row))
    own_route = find_spans or (conversational and tool_rows > 0)
    if tool_rows:
        log(f"data: {tool_rows} example(s) define or call tools; they are rendered with their tools and tokenized here")
    if find_spans:
        try:
            tokenizer("a", return_offsets_mapping=True)
        except NotImplementedError:
            raise DataError(
                "assistant-only loss with a chat template without {% generation %} markers needs a fast "
                "tokenizer (for character offsets); set data.chat_template to a built-in template instead"
            ) from None
        log(
            "data: the chat template has no {% generation %} markers; assistant turns are found by rendering "
            "the conversation turn by turn and the data is tokenized here"
        )
    limit = _truncation_limit(recipe)
    options = {
        "format": fmt,
        "assistant_only_loss": aol,
        "completion_only_loss": col,
        "route": "pretokenized" if own_route else "trl",
        "end_of_turn_token": eot,
        "max_length": d.max_length,
        "packing": d.packing,
        "packing_strategy": d.packing_strategy,
        "split": "distinct",  # val_ratio holds out distinct examples (no copy left in training)
    }
    fingerprint = compute_fingerprint(recipe, tokenizer, template=template, options=options)
    sft_kwargs = {
        "max_length": d.max_length,
        "packing": d.packing,
        "packing_strategy": d.packing_strategy,
        "truncation_mode": "keep_start",
        "dataset_text_field": "text",
        # pre-tokenized data carries its masks; TRL's options would look for conversations
        "assistant_only_loss": aol and not own_route,
        "completion_only_loss": col and not own_route,
    }

    if own_route and use_cache and not keep:
        cached = _cache_load(fingerprint)
        if cached is not None:
            train_ds, eval_ds, stats = cached
            log(f"data: tokenized data from the cache ({_cache_dir(fingerprint)})")
            log(f"data: {stats.get('summary', '')}")
            return PreparedData(train_ds, eval_ds, sft_kwargs, stats, fingerprint), [], []

    encoder = _Encoder(tokenizer, assistant_only=aol, completion_only=col, markers=markers, eot=eot)
    train_ex, trunc = _encode_all(train_ex, encoder, limit, d.on_invalid, train_info)
    if eval_ex:
        eval_ex, etrunc = _encode_all(eval_ex, encoder, limit, d.on_invalid, eval_info)
        trunc = {k: trunc[k] + etrunc[k] for k in trunc}
    if not train_ex:
        raise DataError(f"data.train = {d.train!r}: no usable examples")
    _check_end_of_turn(train_ex, tokenizer, eot, template)
    if not d.eval and d.val_ratio > 0:
        train_ex, eval_ex, duplicates = _split(train_ex, d.val_ratio, recipe.train.seed)
        log(
            f"data: held out {len(eval_ex)} distinct example(s) (val_ratio = {d.val_ratio:g}), none of them in "
            f"training" + (f"; {duplicates} duplicate row(s) in data.train" if duplicates else "")
        )

    skipped = train_info["skipped"] + (eval_info["skipped"] if eval_info else 0)
    reasons = (train_info["skip_reasons"] + (eval_info["skip_reasons"] if eval_info else []))[:MAX_SKIP_REASONS]
    stats = {
        "format": fmt,
        "template": template,
        "generation_markers": bool(markers),
        "end_of_turn_token": eot,
        "pad_token": tokenizer.pad_token,
        "added_pad_token": added_pad,
        "route": options["route"],
        "assistant_only_loss": aol,
        "completion_only_loss": col,
        "max_length": d.max_length,
        "train_examples": len(train_ex),
        "eval_examples": len(eval_ex),
        **_token_stats(train_ex, limit),
        **trunc,
        "skipped": skipped,
        "skip_reasons": reasons,
    }
    stats["summary"] = _summary(stats)
    if trunc["truncated_examples"]:
        log(
            f"warning: {trunc['truncated_examples']} example(s) are longer than max_length = {d.max_length} and are "
            f"truncated; {trunc['answer_tokens_lost']} answer token(s) are lost. Raise data.max_length to keep them"
        )
    if skipped:
        log(f"warning: {skipped} invalid row(s) skipped; first: {reasons[0]}")

    if own_route:
        # The prompt (the messages before the first answer, and the tools as JSON) rides along for
        # `train.sample_prompts`; the Trainer drops columns the model does not take, and TRL reads only
        # input_ids and the masks.
        def rows(exs):
            out = []
            with_tools = any(e.row.get("tools") for e in exs)
            for e in exs:
                key = "messages" if "messages" in e.row else "prompt"
                msgs = e.row[key]
                first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
                prompt = [{"role": m["role"], "content": m["content"]} for m in msgs[:first]]
                out.append({"input_ids": e.input_ids, "assistant_masks": e.mask, key: prompt})
                if with_tools:
                    out[-1]["tools"] = json.dumps(e.row["tools"], ensure_ascii=False) if e.row.get("tools") else ""
            return out
    else:
        def rows(exs):
            return [e.row for e in exs]
    train_ds = _to_dataset(rows(train_ex))
    eval_ds = _to_dataset(rows(eval_ex)) if eval_ex else None
    if own_route and use_cache:
        _cache_save(fingerprint, train_ds, eval_ds, stats)
    log(f"data: {stats['summary']}")
    return PreparedData(train_ds, eval_ds, sft_kwargs, stats, fingerprint), train_ex[:keep], eval_ex


def default_recipe(model: str | Path, data_file: str | Path):
    """The recipe a model without one (a merged export, any local model) is used with: every [data]
    default, so its data is shaped, templated and masked as `fastsft run` would train it."""
    from .recipe import validate

    return validate({"model": {"name": str(model)}, "data": {"train": str(Path(data_file).expanduser().resolve())}})


def encode_file(recipe, tokenizer, path: str | Path, *, log=None) -> list[dict]:
    """Every example of the data file `path`, tokenized and masked exactly as the run with `recipe`
    trained (its template, shape detection, loss options; `default_recipe` for a model without a
    recipe): [{"input_ids", "mask"}], untruncated. For `fastsft eval --data`: held-out loss measured
    on the tokens training would have trained."""
    import copy

    from .recipe import validate

    raw = copy.deepcopy(recipe.raw)
    data = raw.setdefault("data", {})
    data["train"] = str(Path(path).expanduser().resolve())
    data.pop("eval", None)
    data["val_ratio"] = 0.0
    _, examples, _ = _prepare(validate(raw, path=recipe.path), tokenizer, log=log or (lambda m: None),
                              keep=sys.maxsize, use_cache=False)  # fmt: skip
    return [{"input_ids": e.input_ids, "mask": e.mask} for e in examples]


def encode_eval_split(recipe, tokenizer, *, log=None) -> list[dict]:
    """The run's held-out examples ([data] eval, or the val_ratio split), tokenized and masked as
    training masked them: [{"input_ids", "mask"}], untruncated. Empty when the recipe holds none out."""
    _, _, examples = _prepare(recipe, tokenizer, log=log or (lambda m: None), use_cache=False)
    return [{"input_ids": e.input_ids, "mask": e.mask} for e in examples]


# ----------------------------------------------------------------------------------------------
# preview
# ----------------------------------------------------------------------------------------------


def _segments(tokenizer, ids: list[int], mask: list[int]) -> list[tuple[str, bool]]:
    """Consecutive tokens of the same loss state, decoded together (so multi-byte characters survive)."""
    out: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or bool(mask[i]) != bool(mask[start]):
            out.append((tokenizer.decode(ids[start:i]), bool(mask[start])))
            start = i
    return out


def preview_rows(recipe, tokenizer, n: int = 3, *, log=None) -> tuple[list[dict], dict]:
    """The first `n` training examples as the trainer sees them: dicts with source, text, input_ids,
    labels (-100 where no loss) and trained_text; and the stats."""
    log = log or (lambda msg: None)
    prepared, examples, _ = _prepare(recipe, tokenizer, log=log, keep=n, use_cache=False)
    limit = _truncation_limit(recipe)
    out = []
    for ex in examples:
        ids = ex.input_ids if limit is None else ex.input_ids[:limit]
        mask = ex.mask[: len(ids)]
        trained = "".join(t for t, m in _segments(tokenizer, ids, mask) if m)
        out.append(
            {
                "source": ex.where,
                "text": tokenizer.decode(ids),
                "input_ids": ids,
                "labels": [i if m else -100 for i, m in zip(ids, mask, strict=False)],
                "trained_text": trained,
            }
        )
    return out, prepared.stats


PLAIN_MARKS = ("[[", "]]")  # around trained tokens where preview cannot colour them


def preview(recipe, tokenizer, *, n: int = 3, as_json: bool = False, console=None) -> None:
    """Show the first `n` training examples with loss-carrying tokens in bold green, the rest dim,
    then the stats. With `as_json`, one JSON object per example on stdout and nothing else there."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console(stderr=as_json)

    def log(msg):
        console.print(msg, highlight=False, markup=False, soft_wrap=True)

    rows, stats = preview_rows(recipe, tokenizer, n, log=log)
    plain = console.no_color or not console.is_terminal or console.color_system is None
    if as_json:
        for r in rows:
            sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        for i, r in enumerate(rows, start=1):
            n_trained = sum(1 for x in r["labels"] if x != -100)
            console.rule(f"example {i}: {r['source']}  ({len(r['input_ids'])} tokens, {n_trained} trained)")
            text = Text()
            mask = [x != -100 for x in r["labels"]]
            for seg, trained in _segments(tokenizer, r["input_ids"], mask):
                if plain:  # no colours (a file, a pipe): the trained tokens between markers
                    text.append(f"{PLAIN_MARKS[0]}{seg}{PLAIN_MARKS[1]}" if trained else seg)
                else:
                    text.append(seg, style="bold green" if trained else "dim")
            console.print(text, soft_wrap=True)
        if plain:
            console.print(f"legend: {PLAIN_MARKS[0]}trained{PLAIN_MARKS[1]}, the rest not trained", markup=False)
        else:
            console.rule("legend: [bold green]trained[/] [dim]not trained[/]")
    table = Table(title="data", show_header=False)
    t = stats["tokens_per_example"]
    for key, value in (
        ("format", stats["format"]),
        ("template", stats["template"] or "none"),
        ("examples", f"{stats['train_examples']} train, {stats['eval_examples']} eval"),
        ("tokens / example", f"{t['min']} min, {t['median']:g} median, {t['max']} max"),
        ("tokens trained", f"{stats['trained_share']:.1%}"),
        ("truncated", f"{stats['truncated_examples']} examples, {stats['answer_tokens_lost']} answer tokens lost"),
        ("skipped", str(stats["skipped"])),
        ("end-of-turn token", str(stats["end_of_turn_token"])),
        ("assistant-only loss", str(stats["assistant_only_loss"])),
        ("completion-only loss", str(stats["completion_only_loss"])),
    ):
        table.add_row(key, Text(str(value)))
    console.print(table)


__all__ = [
    "PreparedData",
    "prepare_data",
    "preview",
    "preview_rows",
    "detect_format",
    "normalize",
    "compute_fingerprint",
    "default_recipe",
    "encode_file",
    "encode_eval_split",
]
