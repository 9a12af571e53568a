"""Using a trained model: a run directory, an adapter or a model folder.

load        `load_for_use(model_ref) -> LoadedForUse`: the model as trained, its tokenizer, its end-of-turn ids
answer      `generate` (one prompt), `generate_file` (a file of prompts, batched), `chat` (the terminal)
evaluation  `evaluate`: held-out loss, answers scored against the data's, compliance; eval.json
serve/      `fastsft serve`: an OpenAI-compatible server and a chat page
"""

from .answer import chat, generate, generate_file, generate_for, read_tools
from .evaluation import EVAL_JSON, eval_conversations, evaluate
from .load import LoadedForUse, load_for_use

__all__ = [
    "EVAL_JSON",
    "LoadedForUse",
    "chat",
    "eval_conversations",
    "evaluate",
    "generate",
    "generate_file",
    "generate_for",
    "load_for_use",
    "read_tools",
]
