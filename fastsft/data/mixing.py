"""Several training data sets mixed by ratio: `[[data.sources]]`.

    [[data.sources]]
    path = "data/my_task.jsonl"
    share = 0.8
    [[data.sources]]
    path = "data/general_chat.jsonl"     # ~20% general data: the documented cure for forgetting
    share = 0.2
    format = "sharegpt"                  # optional, per source (as `columns`)

Each source goes through the normal pipeline on its own (read, rename, shape detection, validation,
tokenization and masking; a bad row is named by its file and line), then the examples are drawn so
that the prepared training set holds each source's share exactly (up to rounding to whole rows):

- `share` is a fraction of the mix; sources without a `share` split what is left by `weight`
  (default 1). Shares must not add up to more than 1 (exactly 1 when every source has one).
- `[data] stopping_strategy` sets the size, with datasets' `interleave_datasets` names:
  `first_exhausted` (default) makes the mix as large as possible without repeating a row (the source
  that runs out first sets the size); `all_exhausted` uses every row of every source at least once
  and repeats the rows of the sources that would otherwise fall short of their share.

Unlike `interleave_datasets`, whose probabilities hold only in expectation, the counts are fixed
(largest-remainder rounding) and the rows are drawn with the recipe's seed, so the ratio holds in
every run and a resume sees the same data.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass
class Source:
    path: str
    fraction: float  # of the mix, after normalising weights and shares
    format: str | None = None
    columns: dict | None = None


def resolve(data) -> list[Source]:
    """`[data] sources` (validated) -> sources with their fraction of the mix."""
    sources = data.sources
    shared = sum(float(s["share"]) for s in sources if "share" in s)
    rest = [s for s in sources if "share" not in s]
    weights = sum(float(s.get("weight", 1.0)) for s in rest)
    out = []
    for s in sources:
        f = float(s["share"]) if "share" in s else (1 - shared) * float(s.get("weight", 1.0)) / weights
        out.append(Source(s["path"], f, s.get("format"), s.get("columns")))
    return out


def counts(available: list[int], fractions: list[float], strategy: str) -> list[int]:
    """Rows drawn from each source: proportional to `fractions`, summing to the mix size.

    first_exhausted: size = min_i(n_i / f_i) (no row repeated); all_exhausted: size = max_i(n_i / f_i)
    (every row at least once). Largest-remainder rounding keeps the total and each count within one row
    of its exact share."""
    sizes = [n / f for n, f in zip(available, fractions, strict=True)]
    total = math.floor(min(sizes) + 1e-9) if strategy == "first_exhausted" else math.ceil(max(sizes) - 1e-9)
    exact = [total * f for f in fractions]
    got = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: got[i] - exact[i])
    for i in by_remainder[: total - sum(got)]:
        got[i] += 1
    if strategy == "first_exhausted":
        got = [min(g, n) for g, n in zip(got, available, strict=True)]
    return got


def draw(examples_by_source: list[list], want: list[int], seed: int) -> list:
    """`want[i]` examples of source i (all of them once before any repeats, each pass shuffled), then the
    whole mix shuffled: the sources are interleaved, not in blocks."""
    rng = random.Random(seed)
    mixed = []
    for exs, n in zip(examples_by_source, want, strict=True):
        picked = []
        while len(picked) < n:
            order = list(range(len(exs)))
            rng.shuffle(order)
            picked += [exs[i] for i in order[: n - len(picked)]]
        mixed += picked
    rng.shuffle(mixed)
    return mixed


def describe(rows: list[dict]) -> str:
    """'task.jsonl 80% (800 of 1000 rows), general.jsonl 20% (200 of 5000)'."""
    total = sum(r["used"] for r in rows) or 1
    return ", ".join(
        f"{r['path'].rsplit('/', 1)[-1]} {r['used'] / total:.0%} ({r['used']} of {r['available']} rows)"
        for r in rows
    )
