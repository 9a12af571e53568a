"""The base model's before-numbers, paid once: its answers to the report's sample prompts, its task metric
on the held-out split, its held-out loss (the trainer's step-0 evaluation) and its retain loss, kept under `$FASTSFT_CACHE/before/` and reused by later runs
(and by `fastsft eval` of the same base model on the same data and settings).

A number is named by everything it depends on, so a changed input recomputes it:
- the model: its resolved path, every file's name, size and modification time (a hub model: its cached
  snapshot, whose folder is the commit), config.json's bytes and how it is loaded (the [model] section,
  backend, dtype). A LoRA adapter at initialisation leaves the base's outputs unchanged (B = 0), so the
  adapter settings are not part of it;
- the data: the content of the rows scored (token ids, masks, messages, expected answers);
- the settings: the generation budget, batch size and end-of-turn ids for answers; the loss route,
  max_length and batch size for a loss.
A model that is not a local file or folder (nothing to fingerprint) is never cached. The cache is an
optimisation: one that cannot be written or read is skipped, never an error. Each entry is one JSON file
written atomically under `files.cache_lock` (of several processes computing the same entry, one does).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastsft.files import WriteFailed, cache_lock, write_text
from fastsft.machine import cache_root

# Bump when what a before-number means changes (how answers are generated or a loss is computed)
VERSION = "1"
FOLDER = "before"


def _local_model(model_path: str) -> Path | None:
    """The local file or folder of `model_path` (a hub id: its cached snapshot), or None."""
    p = Path(model_path).expanduser()
    if p.exists():
        return p.resolve()
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(model_path), "config.json")
    except Exception:  # not a hub id, or no hub package: nothing to fingerprint
        return None
    return Path(found).parent if isinstance(found, str) else None


def model_fingerprint(model_path: str | None, **settings) -> str | None:
    """sha256 (24 hex) of the model's files (name, size, mtime), its config.json and `settings` (how it
    is loaded); None when the model is not local."""
    if not model_path:
        return None
    root = _local_model(str(model_path))
    if root is None:
        return None
    h = hashlib.sha256(f"fastsft-before-v{VERSION}\n{root}\n".encode())
    found = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in found:
        rel = p.relative_to(root) if p != root else Path(p.name)
        if any(part.startswith(".") for part in rel.parts):
            continue  # locks and notes of a cache folder
        st = p.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    config = root / "config.json" if root.is_dir() else None
    if config is not None and config.is_file():
        h.update(config.read_bytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def entry_path(kind: str, model: str, parts: dict) -> Path:
    """The cache file of a `kind` of number for `model` (a fingerprint) and its inputs `parts`."""
    blob = json.dumps(
        {"v": VERSION, "kind": kind, "model": model, "parts": parts}, sort_keys=True, default=str
    )
    return cache_root() / FOLDER / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}.json"


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))["value"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached(kind: str, model: str | None, parts: dict, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """(value, reused): the stored value for (`kind`, `model`, `parts`), else `compute()` stored. `model`
    None (not fingerprintable): computed, not stored."""
    if model is None:
        return compute(), False
    path = entry_path(kind, model, parts)
    hit = _read(path)
    if hit is not None:
        return hit, True
    try:
        lock = cache_lock(path)
        lock.__enter__()
    except (OSError, WriteFailed):
        return compute(), False  # no cache folder: computed each time
    try:
        hit = _read(path)  # another process may have made it while this one waited
        if hit is not None:
            return hit, True
        value = compute()
        try:
            write_text(path, json.dumps({"kind": kind, "model": model, "value": value}, default=str))
        except (OSError, WriteFailed):
            pass
        return value, False
    finally:
        lock.__exit__(None, None, None)


def content_hash(obj) -> str:
    """sha256 (32 hex) of a JSON-able value (rows, token ids, settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def dataset_hash(dataset, rows: int = 256) -> str:
    """sha256 (32 hex) of a datasets.Dataset's rows as it reads them (every column, in order; a selection
    or shuffle of a larger table is hashed as the rows it yields), `rows` at a time."""
    h = hashlib.sha256(json.dumps(sorted(dataset.column_names)).encode())
    for i in range(0, len(dataset), rows):
        h.update(json.dumps(dataset[i : i + rows], sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


__all__ = ["cached", "content_hash", "dataset_hash", "entry_path", "model_fingerprint"]
