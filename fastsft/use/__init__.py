"""Using a trained model: load a run or model folder, generate, chat, evaluate, serve.

load    `load_for_use(model_ref)`: the reader of a run directory, an adapter or a model folder;
        `generate`, `chat` and `evaluate` on what it loaded
serve/  `fastsft serve`: an OpenAI-compatible HTTP server and a chat page
"""

from .load import (
    EVAL_JSON,
    Loaded,
    chat,
    eval_conversations,
    evaluate,
    generate,
    generate_ids,
    load_for_use,
    read_tools,
)

__all__ = [
    "EVAL_JSON",
    "Loaded",
    "chat",
    "eval_conversations",
    "evaluate",
    "generate",
    "generate_ids",
    "load_for_use",
    "read_tools",
]
