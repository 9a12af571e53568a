"""Chat templates for training, written here, each with `{% generation %}...{% endgeneration %}` around
the assistant's answer *and* its end-of-turn token, so that `return_assistant_tokens_mask=True` (and so
TRL's `assistant_only_loss`) trains the answer and the token that stops it, and nothing else.

`data.chat_template = "chatml"` (or llama3, mistral, qwen2.5, gemma, or a path to a .jinja file)
replaces the tokenizer's own template. Each template supports the roles system, user, assistant and
tool, and `add_generation_prompt`; all but gemma (which has no tool format) also render a row's
`tools` and its answers' `tool_calls`.

- `load_template(name_or_path, base_dir)`: the template text.
- `has_generation_markers(template)`: whether assistant masks can come from the template itself.
- `end_of_turn_token(tokenizer)`: the token that ends an assistant turn under the tokenizer's template;
  `end_of_turn_ids(tokenizer)`: its id and eos, the ids generation stops on. The one end-of-turn
  detector: training checks that its answers carry this token, generation stops on it.
- `ROLE_MARKERS`: text an answer must not hold (a model writing them invents new turns).
- `chat_ids(tokenizer, messages, ...)`: the token ids of messages through the template.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastsft.errors import DataError

# Role markers that must not appear in an answer: a model that writes them is inventing new turns.
ROLE_MARKERS = re.compile(
    r"<\|im_start\|>|<\|im_end\|>|<\|start_header_id\|>|<\|eot_id\|>"
    r"|<start_of_turn>|<end_of_turn>|\[INST\]|\[/INST\]"
    r"|^\s*(user|assistant|system|human|gpt)\s*:",
    re.IGNORECASE | re.MULTILINE,
)

# `bos_token` is guarded: a tokenizer without one passes None, which Jinja would print as "None".
_BOS = "{%- if bos_token %}{{- bos_token -}}{%- endif -%}\n"

# Tool calling in the Hermes format that Qwen 2.5 (and many ChatML fine-tunes) use: the function
# definitions in the system turn inside <tools>, each call in the answer as <tool_call>{json}</tool_call>,
# consecutive tool results in one user turn, each inside <tool_response>.
_HERMES_TOOLS_SYSTEM = (
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}\n"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}\n"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' -}}\n"
)
_HERMES_CALLS = (
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}\n"
    "{%- for call in message['tool_calls'] -%}\n"
    "{%- if message['content'] or not loop.first -%}{{- '\\n' -}}{%- endif -%}\n"
    "{{- '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' "
    "+ (call['function']['arguments'] | tojson) + '}\\n</tool_call>' -}}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
)
_HERMES_TOOL_RESULT = (
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}\n"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}\n"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}\n"
)


def _chatml(default_system: str) -> str:
    """ChatML with Hermes tool calls; `default_system` is the system turn written when there is none."""
    if default_system:
        default = "{{- '<|im_start|>system\\n" + default_system + "' -}}\n"
        no_system = "{{- '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' -}}\n"
    else:
        default = "{{- '<|im_start|>system\\n' -}}\n"
        no_system = ""
    return (
        "{%- set has_system = messages and messages[0]['role'] == 'system' -%}\n"
        "{%- if tools -%}\n"
        "{%- if has_system -%}{{- '<|im_start|>system\\n' + messages[0]['content'] + '\\n\\n' -}}\n"
        "{%- else -%}"
        + default
        + ("{{- '\\n\\n' -}}\n" if default_system else "")
        + "{%- endif -%}\n"
        + _HERMES_TOOLS_SYSTEM
        + "{%- elif not has_system -%}\n"
        + no_system
        + "{%- endif -%}\n"
        "{%- for message in messages -%}\n"
        "{%- if message['role'] == 'system' and loop.first and tools -%}\n"  # written with the tools above
        "{%- elif message['role'] == 'assistant' -%}\n"
        "{{- '<|im_start|>assistant\\n' -}}\n"
        "{%- generation -%}\n"
        "{{- message['content'] -}}\n" + _HERMES_CALLS + "{{- '<|im_end|>' -}}\n"
        "{%- endgeneration -%}\n"
        "{{- '\\n' -}}\n"
        "{%- elif message['role'] == 'tool' -%}\n" + _HERMES_TOOL_RESULT + "{%- else -%}\n"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "{{- '<|im_start|>assistant\\n' -}}\n"
        "{%- endif -%}\n"
    )


CHATML = _chatml("")

# Llama 3 / 3.1 / 3.2 instruct. Tools as Llama 3.1's template writes them by default: the definitions
# (JSON) in the first user turn, one call per answer as {"name": ..., "parameters": {...}}, results in
# the `ipython` role.
LLAMA3 = (
    _BOS + "{%- set ns = namespace(tools_written=false) -%}\n"
    "{%- for message in messages -%}\n"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}\n"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' -}}\n"
    "{%- if message['role'] == 'assistant' -%}\n"
    "{%- generation -%}\n"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}\n"
    "{%- if message['tool_calls'] | length > 1 -%}"
    "{{- raise_exception('Llama 3 takes one tool call per answer; this answer has ' "
    "+ (message['tool_calls'] | length | string)) -}}{%- endif -%}\n"
    "{%- set call = message['tool_calls'][0]['function'] -%}\n"
    "{{- '{\"name\": \"' + call['name'] + '\", \"parameters\": ' + (call['arguments'] | tojson) + '}<|eot_id|>' -}}\n"
    "{%- else -%}\n"
    "{{- message['content'] | trim + '<|eot_id|>' -}}\n"
    "{%- endif -%}\n"
    "{%- endgeneration -%}\n"
    "{%- elif message['role'] == 'user' and tools and not ns.tools_written -%}\n"
    "{%- set ns.tools_written = true -%}\n"
    "{{- 'Given the following functions, please respond with a JSON for a function call with its proper "
    'arguments that best answers the given prompt.\\n\\nRespond in the format {"name": function name, '
    '"parameters": dictionary of argument name and its value}. Do not use variables.\\n\\n\' -}}\n'
    "{%- for tool in tools -%}{{- (tool | tojson(indent=4)) + '\\n\\n' -}}{%- endfor -%}\n"
    "{{- message['content'] | trim + '<|eot_id|>' -}}\n"
    "{%- else -%}\n"
    "{{- message['content'] | trim + '<|eot_id|>' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "{%- endif -%}\n"
)

# Mistral and Gemma have no system role: a system message is written into the next user message, as their
# own templates do with the first one. A system message with no user message after it (before an answer,
# a tool result or the end) would be dropped, so the row is refused instead (named by its line).
_ORPHAN_SYSTEM = (
    "{%- if ns.system -%}{{- raise_exception('this template writes a system message into the next user "
    "message, and message ' + (ns.at | string) + ' (system) has no user message after it; move it before "
    "a user message or merge it into one') -}}{%- endif -%}\n"
)

# Mistral instruct ([INST] format). The system prompt goes before the first user message, as in
# Mistral's own templates; the answer ends with the tokenizer's eos token (</s>). The prompt already
# ends where the answer starts, so `add_generation_prompt` adds nothing. Tools as Mistral's v3 format
# writes them: [AVAILABLE_TOOLS] before the last user message, calls as [TOOL_CALLS] [{...}], results
# in [TOOL_RESULTS].
MISTRAL = (
    _BOS + "{%- set ns = namespace(system='', at=0, last_user=-1) -%}\n"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}\n"
    "{%- set ns.system = ns.system + message['content'] + '\\n\\n' -%}{%- set ns.at = loop.index -%}\n"
    "{%- elif message['role'] == 'user' -%}\n"
    "{%- if tools and loop.index0 == ns.last_user -%}"
    "{{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' -}}{%- endif -%}\n"
    "{{- '[INST] ' + ns.system + message['content'] + ' [/INST]' -}}\n"
    "{%- set ns.system = '' -%}\n"
    "{%- elif message['role'] == 'tool' -%}\n"
    + _ORPHAN_SYSTEM
    + "{{- '[TOOL_RESULTS] ' + message['content'] + ' [/TOOL_RESULTS]' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}\n" + _ORPHAN_SYSTEM + "{%- generation -%}\n"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}\n"
    "{{- ' [TOOL_CALLS] [' -}}\n"
    "{%- for call in message['tool_calls'] -%}\n"
    "{{- ('' if loop.first else ', ') + '{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' "
    "+ (call['function']['arguments'] | tojson) + '}' -}}\n"
    "{%- endfor -%}\n"
    "{{- ']' + eos_token -}}\n"
    "{%- else -%}\n"
    "{{- ' ' + message['content'] + eos_token -}}\n"
    "{%- endif -%}\n"
    "{%- endgeneration -%}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n" + _ORPHAN_SYSTEM
)

# Qwen 2.5 instruct: ChatML with Qwen's default system prompt, tools in the Hermes format above.
QWEN25 = _chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")

# Gemma (1, 2, 3 text): roles user and model; the system prompt goes before the first user message
# and tool results are user turns, as Gemma has no roles for them.
GEMMA = (
    _BOS + "{%- set ns = namespace(system='', at=0) -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}\n"
    "{%- set ns.system = ns.system + message['content'] + '\\n\\n' -%}{%- set ns.at = loop.index -%}\n"
    "{%- elif message['role'] == 'assistant' -%}\n" + _ORPHAN_SYSTEM + "{{- '<start_of_turn>model\\n' -}}\n"
    "{%- generation -%}\n"
    "{{- message['content'] | trim + '<end_of_turn>' -}}\n"
    "{%- endgeneration -%}\n"
    "{{- '\\n' -}}\n"
    "{%- else -%}\n"
    "{{- '<start_of_turn>user\\n' + ns.system + message['content'] | trim + '<end_of_turn>\\n' -}}\n"
    "{%- set ns.system = '' -%}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n" + _ORPHAN_SYSTEM + "{%- if add_generation_prompt -%}\n"
    "{{- '<start_of_turn>model\\n' -}}\n"
    "{%- endif -%}\n"
)

TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "qwen2.5": QWEN25,
    "gemma": GEMMA,
}

_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


def load_template(name_or_path: str, base_dir: str | Path | None = None) -> str:
    """A built-in template by name, or the text of a .jinja file (relative paths from `base_dir`)."""
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    looks_like_path = (
        name_or_path.endswith((".jinja", ".j2", ".jinja2")) or "/" in name_or_path or "\\" in name_or_path
    )
    if looks_like_path:
        p = Path(name_or_path).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"data.chat_template = {name_or_path!r}: file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"data.chat_template = {name_or_path!r}: cannot read {p}: {e}") from None
        if not text.strip():
            raise DataError(f"data.chat_template = {name_or_path!r}: {p} is empty")
        return text
    choices = ", ".join(TEMPLATES)
    raise DataError(
        f"data.chat_template = {name_or_path!r}: unknown template; built-in templates are {choices}, "
        "or give the path of a .jinja file"
    )


def has_generation_markers(template: str | dict | None) -> bool:
    """Whether `template` marks assistant turns with `{% generation %}` (any whitespace-trim variant)."""
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        return False
    return _GENERATION_RE.search(template) is not None


_PROBE_ANSWER = "Xq7zv answer Wk9"


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids or [])
    # every added token: control tokens such as <|im_end|> are added tokens, special-flagged or not
    ids.update(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))
    return ids


def end_of_turn_token(tokenizer, chat_template: str | None = None) -> str | None:
    """The token that ends an assistant turn under the tokenizer's chat template (or `chat_template`).

    Renders a user / assistant / user conversation and returns the first special token that follows
    the assistant's content; falls back to the eos token when none does (or there is no template).
    """
    eos = tokenizer.eos_token
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if not template:
        return eos
    messages = [
        {"role": "user", "content": "Ping?"},
        {"role": "assistant", "content": _PROBE_ANSWER},
        {"role": "user", "content": "Again?"},
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    except Exception:
        return eos
    at = text.rfind(_PROBE_ANSWER)
    if at < 0:
        return eos
    rest = text[at + len(_PROBE_ANSWER) :]
    ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
    special = _special_ids(tokenizer)
    for i in ids[:8]:  # only what directly follows the answer
        if i in special:
            return tokenizer.convert_ids_to_tokens(i)
    return eos


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the template's end-of-turn token (`end_of_turn_token`)
    first, then the eos token(s). Generation stops on any of them."""
    ids: list[int] = []
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        tid = tokenizer.convert_tokens_to_ids(eot)
        if isinstance(tid, int) and tid >= 0:
            ids.append(tid)
    eos = tokenizer.eos_token_id
    for tid in eos if isinstance(eos, list) else [eos]:
        if tid is not None and int(tid) not in ids:
            ids.append(int(tid))
    return ids


def role_markers(text: str) -> list[str]:
    """The role markers in `text` (an answer, special tokens kept), sorted and without repeats."""
    return sorted({m.group(0).strip() for m in ROLE_MARKERS.finditer(text)})


def chat_ids(
    tokenizer, messages: list[dict], *, add_generation_prompt: bool, tools: list[dict] | None = None
):
    """input_ids (1, T), int64: `messages` (and `tools`) through the chat template, or plain text
    without one (a single user message as it is: training took plain prompt/completion text)."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            return_tensors="pt",
            return_dict=True,
        )
        return out["input_ids"]
    if tools:
        raise DataError("--tools needs a chat template to write the tools into, and this tokenizer has none.")
    if len(messages) == 1 and messages[0]["role"] == "user":
        return torch.tensor([tokenizer(messages[0]["content"])["input_ids"]])
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    if add_generation_prompt:
        text += "\nassistant:"
    return torch.tensor([tokenizer(text)["input_ids"]])


__all__ = [
    "TEMPLATES",
    "ROLE_MARKERS",
    "load_template",
    "has_generation_markers",
    "end_of_turn_token",
    "end_of_turn_ids",
    "role_markers",
    "chat_ids",
]
