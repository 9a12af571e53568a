"""Exports of a finished run: `export_run(RUN_DIR, fmt=...)` -> adapter, merged or GGUF.

transaction  reading the run, the export transaction (temporary folder, swap in, export.json), the
             merged export with its parity check, the adapter with its model card, the GGUF writer
"""

from .transaction import (
    DTYPES,
    EXPORT_JSON,
    FORMATS,
    RunInfo,
    check_destination,
    export_bytes,
    export_run,
    logits_of,
    merge,
    read_run,
    rel_diff,
    unpermute_qk,
)

__all__ = [
    "DTYPES",
    "EXPORT_JSON",
    "FORMATS",
    "RunInfo",
    "check_destination",
    "export_bytes",
    "export_run",
    "logits_of",
    "merge",
    "read_run",
    "rel_diff",
    "unpermute_qk",
]
