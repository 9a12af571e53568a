"""A model's answers on held-out data scored against the expected ones (the task metric); its loss on
the same data is `fastsft.loss.held_out`.

- `reference_of(item, tokenizer, eot)`: (prompt ids, expected answer) of an encoded example: the prompt is
  every token before the first trained one, the answer the first run of trained tokens (its end-of-turn
  token left out), decoded. So any shape training takes (messages, prompt/completion, alpaca, ...) is
  scored the way it was trained; a multi-turn conversation is scored on its first answer.
- `normalise(text)`: lower case, punctuation dropped, whitespace collapsed ("The Ocean." == "the ocean").
- `score(expected, got)`: exact match, normalised match and, when the expected answers come from a small
  set of labels (a classification task: sentiment, yes/no, a category), accuracy over those rows with a
  confusion table (expected label x answered label; an answer outside the set is "(other)").
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# A set of answers is "known" (a classification) when at most MAX_LABELS distinct normalised answers,
# each given at least MIN_PER_LABEL times, cover at least LABEL_SHARE of the rows.
MAX_LABELS = 12
MIN_PER_LABEL = 2
LABEL_SHARE = 0.8
SHORT_WORDS = 8  # answers this short (median, in words) are "short": the report scores them
OTHER = "(other)"


def normalise(text: str) -> str:
    """Lower case, Unicode punctuation removed, whitespace collapsed to single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return re.sub(r"\s+", " ", text).strip()


def reference_of(item: dict, tokenizer, eot: list[int]) -> tuple[list[int], str] | None:
    """(prompt token ids, expected answer text) of an encoded example {"input_ids", "mask"}, or None when
    it has no trained tokens after a prompt."""
    ids, mask = item["input_ids"], item["mask"]
    first = next((i for i, m in enumerate(mask) if m), None)
    if not first:
        return None
    end = next((i for i in range(first, len(mask)) if not mask[i]), len(mask))
    answer = [t for t in ids[first:end] if t not in eot]
    return ids[:first], tokenizer.decode(answer, skip_special_tokens=True).strip()


def labels_of(expected: list[str]) -> list[str]:
    """The known set of answers (normalised, most frequent first), or [] when the answers are free text."""
    counts = Counter(normalise(e) for e in expected)
    frequent = [(k, n) for k, n in counts.most_common() if n >= MIN_PER_LABEL and k]
    if not 2 <= len(frequent) <= MAX_LABELS:
        return []
    if sum(n for _, n in frequent) < LABEL_SHARE * len(expected):
        return []
    return [k for k, _ in frequent]


def is_short(expected: list[str]) -> bool:
    """The answers are short enough to be scored by matching (median at most SHORT_WORDS words)."""
    if not expected:
        return False
    words = sorted(len(e.split()) for e in expected)
    return words[len(words) // 2] <= SHORT_WORDS


def score(expected: list[str], got: list[str]) -> dict:
    """{"n", "exact", "normalised", "exact_count", "normalised_count", "classes"}: shares of answers equal
    to the expected one (exactly, after stripping; and after `normalise`). "classes" (None for free-text
    answers): {"labels", "n", "correct", "accuracy", "confusion": {expected: {answered: count}}} over the
    rows whose expected answer is one of the labels."""
    n = len(expected)
    exact = sum(e.strip() == g.strip() for e, g in zip(expected, got, strict=True))
    norm = sum(normalise(e) == normalise(g) for e, g in zip(expected, got, strict=True))
    out = {
        "n": n,
        "exact_count": exact,
        "normalised_count": norm,
        "exact": exact / n if n else None,
        "normalised": norm / n if n else None,
        "classes": None,
    }
    labels = labels_of(expected)
    if labels:
        confusion = {k: dict.fromkeys([*labels, OTHER], 0) for k in labels}
        for e, g in zip(expected, got, strict=True):
            e, g = normalise(e), normalise(g)
            if e in confusion:
                confusion[e][g if g in confusion else OTHER] += 1
        total = sum(sum(row.values()) for row in confusion.values())
        correct = sum(confusion[k][k] for k in labels)
        out["classes"] = {
            "labels": labels,
            "n": total,
            "correct": correct,
            "accuracy": correct / total if total else None,
            "confusion": confusion,
        }
    return out


def summary_line(s: dict) -> str:
    """'exact 49/50 (98%), normalised 49/50 (98%), accuracy over 2 labels 49/50 (98%)'."""
    if not s or not s.get("n"):
        return "-"
    n = s["n"]
    line = f"exact {s['exact_count']}/{n} ({s['exact']:.0%}), normalised {s['normalised_count']}/{n} ({s['normalised']:.0%})"
    c = s.get("classes")
    if c and c.get("n"):
        line += f", accuracy over {len(c['labels'])} labels {c['correct']}/{c['n']} ({c['accuracy']:.0%})"
    return line


def confusion_rows(c: dict) -> list[list[str]]:
    """The confusion table as rows of cells: a header (expected \\ answered, labels, (other)), then one
    row per expected label."""
    cols = [*c["labels"], OTHER]
    rows = [["expected \\ answered", *cols]]
    for k in c["labels"]:
        rows.append([k, *(str(c["confusion"][k][j]) for j in cols)])
    return rows


__all__ = [
    "confusion_rows",
    "is_short",
    "labels_of",
    "normalise",
    "reference_of",
    "score",
    "summary_line",
]
