"""The task metric in the report: the held-out split's greedy answers scored against its answers (exact,
normalised, class accuracy: fastsft.chat.scoring), before and after training, when the answers are short
enough to be matched (a classification, a word, a short phrase). Long free-text answers are left to the
held-out loss and the before / after samples.
"""

from __future__ import annotations

from fastsft.chat import scoring
from fastsft.chat.generation import answer_batch
from fastsft.chat.scoring import is_short, reference_of
from fastsft.chat.templates import end_of_turn_ids

MAX_ROWS = 64  # held-out rows answered (twice: before and after training)
SLACK_TOKENS = 4  # the answer budget: the longest expected answer plus this
BATCH = 16  # prompts answered at once


def held_out(prepared, tokenizer) -> list[tuple[list[int], str]]:
    """(prompt ids, expected answer) of the first MAX_ROWS held-out examples, or [] when the run holds
    none out or its answers are not short."""
    eot = end_of_turn_ids(tokenizer)
    ds = getattr(prepared, "eval", None)
    if ds is None:
        return []
    mask_col = next((c for c in ("assistant_masks", "completion_mask") if c in ds.column_names), None)
    if mask_col is None:
        return []  # plain text: every token trained, no prompt to answer
    rows = ds.select(range(min(len(ds), MAX_ROWS)))
    refs = [reference_of({"input_ids": r["input_ids"], "mask": r[mask_col]}, tokenizer, eot) for r in rows]
    refs = [r for r in refs if r is not None]
    return refs if refs and is_short([e for _, e in refs]) else []


def budget(tokenizer, refs: list[tuple[list[int], str]]) -> int:
    """New tokens allowed: the longest expected answer plus SLACK_TOKENS."""
    return max(len(tokenizer(e, add_special_tokens=False)["input_ids"]) for _, e in refs) + SLACK_TOKENS


def score(
    model, tokenizer, refs: list[tuple[list[int], str]], *, batch_size: int = BATCH, advance=None
) -> dict:
    """fastsft.chat.scoring.score of the greedy answers (batched) to `refs`, with the first few pairs.
    `advance(n)`: progress, called with each batch's size."""
    got = answer_batch(
        model,
        tokenizer,
        [p for p, _ in refs],
        max_new_tokens=budget(tokenizer, refs),
        batch_size=batch_size,
        on_batch=advance,
    )
    expected = [e for _, e in refs]
    out = scoring.score(expected, [a.text for a in got])
    out["examples"] = [{"expected": e, "answer": a.text} for e, a in zip(expected[:5], got[:5], strict=True)]
    return out


__all__ = ["budget", "held_out", "score"]
