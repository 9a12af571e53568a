"""The tokenized-data cache: prepared datasets under `$FASTSFT_CACHE/data/<fingerprint>`, and the
fingerprint that names them (and that `--resume` compares, to notice changed data).

The fingerprint covers everything the prepared data depends on: the data files' bytes, the tokenizer
(vocabulary, special tokens, chat template), the template setting and every [data] option. A second
run on the same data and tokenizer loads the tokenized datasets instead of tokenizing again. The cache
is an optimisation: a cache that cannot be written or read is skipped, never an error.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..files import WriteFailed, make_dir, temp_dir
from ..machine import cache_root

# Bump when the way data is prepared changes, so that stale caches are never reused.
# 3: every shape is handed to TRL tokenized (input_ids + its loss mask).
DATA_VERSION = "3"


def _hash_source(h, value: str, spec) -> None:
    path = spec.resolve_path(value)
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
        h.update(f"hub:{spec.data.subset}:{spec.data.split}\n".encode())


def compute_fingerprint(spec, tokenizer, *, template: str | None, options: dict) -> str:
    """sha256 of the data files' bytes, the tokenizer (vocab, special tokens, chat template), the
    template setting and every option that changes the prepared data."""
    d = spec.data
    h = hashlib.sha256(f"fastsft-data-v{DATA_VERSION}\n".encode())
    if d.train:
        _hash_source(h, d.train, spec)
    for source in d.sources or []:  # by bytes, like `train`; and how each is read and weighed
        _hash_source(h, source["path"], spec)
        h.update(json.dumps({k: v for k, v in sorted(source.items()) if k != "path"}, default=str).encode())
    if d.eval:
        _hash_source(h, d.eval, spec)
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    meta = {
        "vocab_size": len(tokenizer),
        "tokenizer_class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "template": template,
        "data": {
            k: v for k, v in sorted(d.as_dict().items()) if k not in ("train", "eval", "sources", "retain")
        },
        "seed": spec.seed,
        **options,
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def cache_dir(fingerprint: str) -> Path:
    return cache_root() / "data" / fingerprint


def load(fingerprint: str):
    import datasets

    folder = cache_dir(fingerprint)
    if not (folder / "stats.json").exists():
        return None
    try:
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
        train = datasets.load_from_disk(str(folder / "train"))
        ev = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").exists() else None
    except Exception:
        return None
    return train, ev, stats


def save(fingerprint: str, train, ev, stats: dict) -> None:
    folder = cache_dir(fingerprint)
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
