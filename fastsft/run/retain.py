"""Forgetting as a number: `[data] retain`, or by default the general set fastsft ships.

The retain set is general data the fine-tune should not make worse (chat, instructions, the domain's
neighbours). Without `[data] retain`, it is `fastsft/data/general/general_qa.jsonl`: 50 short general
questions and answers written for fastsft (Apache-2.0; its README names source and licence), so every
report shows whether the model narrowed. It is tokenized and masked exactly as training masks its data
(`data.encode_file`: the run's template, shape detection and loss options), and scored before training
and after: the held-out loss, token-weighted (the summed NLL over every scored token divided by their
count, like the eval loss), through the run's own loss route. run.json's `result.retain`, metrics.jsonl
(`retain_loss` rows at the first and last step) and the report show before -> after and the change; a
rise is forgetting.
"""

from __future__ import annotations

import math
from pathlib import Path

from fastsft import data as data_mod
from fastsft.errors import DataError

DEFAULT = Path(__file__).resolve().parents[1] / "data" / "general" / "general_qa.jsonl"
DEFAULT_NAME = "fastsft's general set (50 Q/A, Apache-2.0)"


def encode(recipe, tokenizer, *, log) -> tuple[list[dict] | None, str | None]:
    """(the retain examples [{"input_ids", "mask"}] (untruncated), masked as training masks; where they
    came from). The default set is skipped, with a line saying why, when the run's data cannot take
    chat messages (plain text without a chat template)."""
    if recipe.data.retain:
        path = recipe.resolve_path(recipe.data.retain)
        if not path.exists():
            raise DataError(f"data.retain = {recipe.data.retain!r}: file not found: {path}")
        items = data_mod.encode_file(recipe, tokenizer, path, key="retain")
        log(f"retain: {len(items)} example(s) from {path}, scored before and after training")
        return items, str(path)
    try:
        items = data_mod.encode_file(recipe, tokenizer, DEFAULT)
    except DataError as e:
        log(f"retain: {DEFAULT_NAME} not scored ({e}); set [data] retain to data of the run's shape")
        return None, None
    if not any(any(it["mask"]) for it in items):
        log(f"retain: {DEFAULT_NAME} not scored: the run's loss options train none of its tokens")
        return None, None
    log(
        f"retain: {len(items)} example(s) of {DEFAULT_NAME} (no [data] retain), scored before and after training"
    )
    return items, DEFAULT_NAME


def summary(
    before: dict | None, after: dict, *, source: str | None = None, vocab_size: int | None = None
) -> dict:
    """run.json's `retain`: before, after, delta (after - before; > 0 is forgetting), the set's source, and
    `uniform` = ln(vocab_size), a uniform guess's loss: a base near it knew nothing to forget."""
    b = before.get("loss") if before else None
    a = after.get("loss")
    return {
        "before": b,
        "after": a,
        "delta": (a - b) if a is not None and b is not None else None,
        "tokens": after.get("tokens"),
        "examples": after.get("examples"),
        "source": source,
        "uniform": math.log(vocab_size) if vocab_size else None,
    }
