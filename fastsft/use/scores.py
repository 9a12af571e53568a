"""JSON-aware scores for `fastsft eval`: when every reference answer is a JSON object, the answers are
scored field by field beside exact match: how many are valid JSON objects, each key's exact match (the
answer's value equal to the reference's, as JSON values) and how many match on every reference key.

An answer counts as JSON when, stripped of surrounding whitespace and of one Markdown code fence
(```json ... ```), it parses as a JSON object; nothing is searched for inside free text.
"""

from __future__ import annotations

import json
import re

_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n(.*)\n\s*```$", re.S)


def json_object(text: str) -> dict | None:
    """`text` as a JSON object (one surrounding code fence allowed), else None."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def json_fields(expected: list[str], got: list[str]) -> dict | None:
    """Field-by-field scores when every expected answer is a JSON object (None otherwise):
    {"n", "valid_json_count", "valid_json", "all_keys_count", "all_keys",
     "keys": {key: {"n", "correct", "exact"}}} (shares are of n, or of the rows whose reference has the key).
    """
    refs = [json_object(e) for e in expected]
    if not refs or any(r is None for r in refs):
        return None
    answers = [json_object(g) for g in got]
    keys: dict[str, dict] = {}
    all_keys = 0
    for ref, ans in zip(refs, answers, strict=True):
        every = True
        for key, value in ref.items():
            row = keys.setdefault(key, {"n": 0, "correct": 0})
            row["n"] += 1
            ok = ans is not None and key in ans and ans[key] == value
            row["correct"] += ok
            every = every and ok
        all_keys += every
    for row in keys.values():
        row["exact"] = row["correct"] / row["n"]
    n = len(refs)
    valid = sum(a is not None for a in answers)
    return {
        "n": n,
        "valid_json_count": valid,
        "valid_json": valid / n,
        "all_keys_count": all_keys,
        "all_keys": all_keys / n,
        "keys": keys,
    }


def json_rows(scores: dict) -> list[tuple[str, str]]:
    """(metric, value) rows for eval's table."""
    n = scores["n"]
    rows = [
        (
            "JSON answers: valid JSON objects",
            f"{scores['valid_json_count']}/{n} ({scores['valid_json']:.0%})",
        ),
        ("  every key equal", f"{scores['all_keys_count']}/{n} ({scores['all_keys']:.0%})"),
    ]
    for key, row in scores["keys"].items():
        rows.append((f"  key {key!r} equal", f"{row['correct']}/{row['n']} ({row['exact']:.0%})"))
    return rows
