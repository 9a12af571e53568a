"""Tool calls in a model's answer: the JSON a chat template's tool format asks the model to write, read
back into OpenAI's `tool_calls`.
"""

from __future__ import annotations

import json
import uuid


def parse_tool_calls(text: str, tools: list[dict]) -> list[dict] | None:
    """Tool calls in an answer, as the built-in templates write them: Hermes `<tool_call>{...}</tool_call>`
    blocks (chatml, qwen2.5), or an answer that is only a JSON call `{"name", "arguments"|"parameters"}`
    or a list of them (llama3, mistral's `[TOOL_CALLS] [...]`). None when the answer holds no call to
    one of `tools`."""
    import re

    names = {t["function"]["name"] for t in tools}
    blocks = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.DOTALL)
    candidates = []
    if blocks:
        for b in blocks:
            try:
                candidates.append(json.loads(b))
            except json.JSONDecodeError:
                return None
    else:
        body = text.strip()
        if body.startswith("[TOOL_CALLS]"):
            body = body[len("[TOOL_CALLS]") :].strip()
        if not body.startswith(("{", "[")):
            return None
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        candidates = value if isinstance(value, list) else [value]
    calls = []
    for c in candidates:
        if not isinstance(c, dict) or c.get("name") not in names:
            return None
        args = c.get("arguments", c.get("parameters", {}))
        calls.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {
                    "name": c["name"],
                    "arguments": args if isinstance(args, str) else json.dumps(args),
                },
            }
        )
    return calls or None
