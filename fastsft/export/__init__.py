"""Exports of a finished run: `export_run(RUN_DIR, fmt=...)` -> adapter, merged or GGUF.

transaction  `export_run`: the destination's checks, the temporary folder swapped in at the end,
             export.json
read         `read_run(RUN_DIR) -> RunInfo`: the run an export reads
merged       base + adapter merged in 16-bit, reloaded and checked against base + adapter (parity)
adapter      the PEFT adapter, the tokenizer and a model card
gguf         one GGUF file for llama.cpp, read back and checked
"""

from .merged import logits_of, merge, rel_diff
from .read import RunInfo, read_run
from .transaction import EXPORT_JSON, check_destination, export_bytes, export_run

__all__ = [
    "EXPORT_JSON",
    "RunInfo",
    "check_destination",
    "export_bytes",
    "export_run",
    "logits_of",
    "merge",
    "read_run",
    "rel_diff",
]
