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

import difflib
import math
import random
from dataclasses import dataclass

SOURCE_KEYS = ("path", "format", "columns", "weight", "share")


@dataclass
class Source:
    path: str
    fraction: float  # of the mix, after normalising weights and shares
    format: str | None = None
    columns: dict | None = None


def check_sources(data: dict, formats: tuple) -> list[str]:
    """Problems of `[[data.sources]]` (one line each, for the recipe's all-at-once error); `formats` are
    the values a source's `format` may take."""
    sources = data.get("sources") or []
    if not sources:
        return []
    problems = []
    if data.get("train"):
        problems.append(
            "[data] train and [[data.sources]] are both set: use `train` for one data set, or list every data "
            "set (the task's included) as a [[data.sources]] table"
        )
    shares = 0.0
    all_shared = True
    for i, src in enumerate(sources, start=1):
        where = f"[[data.sources]] #{i}"
        for key in src:
            if key not in SOURCE_KEYS:
                close = difflib.get_close_matches(key, SOURCE_KEYS, n=1, cutoff=0.6)
                hint = f"; did you mean `{close[0]}`?" if close else f" (keys: {', '.join(SOURCE_KEYS)})"
                problems.append(f"{where}: unknown key `{key}`{hint}")
        path = src.get("path")
        if not isinstance(path, str) or not path:
            problems.append(
                f'{where}: `path` is required (a data file, folder or hub name), e.g. path = "data/general.jsonl"'
            )
        fmt = src.get("format")
        if fmt is not None and fmt not in formats:
            problems.append(f"{where}: format = {fmt!r} must be one of {', '.join(formats)}")
        cols = src.get("columns")
        if cols is not None and not (
            isinstance(cols, dict) and all(isinstance(v, str) for v in cols.values())
        ):
            problems.append(f'{where}: columns must be a table of strings, e.g. {{ messages = "dialog" }}')
        if "weight" in src and "share" in src:
            problems.append(f"{where}: give `weight` or `share`, not both")
        for key, hi in (("weight", math.inf), ("share", 1.0)):
            if key not in src:
                continue
            v = src[key]
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or not 0 < v <= hi
            ):
                rng = "> 0" if hi == math.inf else "> 0 and <= 1"
                problems.append(f"{where}: {key} = {v!r} must be a number {rng}")
            elif key == "share":
                shares += float(v)
        all_shared = all_shared and "share" in src
    if shares > 1 + 1e-9:
        problems.append(f"[[data.sources]]: the shares add up to {shares:g}, more than 1")
    elif all_shared and not problems and abs(shares - 1) > 1e-6:
        problems.append(
            f"[[data.sources]]: the shares add up to {shares:g}; with a share on every source they must add up "
            "to 1 (or leave `share` off one source: it takes the rest)"
        )
    elif not all_shared and not problems and shares >= 1 - 1e-9:
        problems.append(
            "[[data.sources]]: the shares add up to 1, leaving nothing for the sources without a share"
        )
    return problems


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
