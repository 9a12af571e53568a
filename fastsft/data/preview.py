"""`fastsft data preview`: the first training examples as the trainer sees them, the tokens that carry
loss highlighted, then the data's stats. The tokens and labels come from training's own path
(`prepare.prepare_examples`, `encode.labels`), so what preview shows is what SFTTrainer trains on.
"""

from __future__ import annotations

import json
import sys

from .encode import IGNORE_INDEX, labels, truncation_limit
from .prepare import prepare_examples
from .spec import DataSpec


def _segments(tokenizer, ids: list[int], mask: list[int]) -> list[tuple[str, bool]]:
    """Consecutive tokens of the same loss state, decoded together (so multi-byte characters survive)."""
    out: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or bool(mask[i]) != bool(mask[start]):
            out.append((tokenizer.decode(ids[start:i]), bool(mask[start])))
            start = i
    return out


def preview_rows(recipe, tokenizer, n: int = 3, *, log=None) -> tuple[list[dict], dict]:
    """The first `n` training examples as the trainer sees them: dicts with source, text, input_ids,
    labels (IGNORE_INDEX, -100, where no loss) and trained_text; and the stats."""
    log = log or (lambda msg: None)
    spec = DataSpec.of(recipe)
    prepared, examples, _ = prepare_examples(spec, tokenizer, log=log, keep=n, use_cache=False)
    limit = truncation_limit(spec)
    out = []
    for ex in examples:
        ids = ex.input_ids if limit is None else ex.input_ids[:limit]
        trained = "".join(t for t, m in _segments(tokenizer, ids, ex.mask) if m)
        out.append(
            {
                "source": ex.where,
                "text": tokenizer.decode(ids),
                "input_ids": ids,
                "labels": labels(ex.input_ids, ex.mask, limit),
                "trained_text": trained,
            }
        )
    return out, prepared.stats


PLAIN_MARKS = ("[[", "]]")  # around trained tokens where preview cannot colour them


def preview(recipe, tokenizer, *, n: int = 3, as_json: bool = False, console=None) -> None:
    """Show the first `n` training examples with loss-carrying tokens in bold green, the rest dim,
    then the stats. With `as_json`, one JSON object per example on stdout and nothing else there."""
    from rich.console import Console

    console = console or Console(stderr=as_json)

    def log(msg):
        console.print(msg, highlight=False, markup=False, soft_wrap=True)

    rows, stats = preview_rows(recipe, tokenizer, n, log=log)
    if as_json:
        for r in rows:
            sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        _show(console, tokenizer, rows)
    console.print(_stats_table(stats))


def _show(console, tokenizer, rows: list[dict]) -> None:
    """Each example, its trained tokens in bold green (or between PLAIN_MARKS without colours), then a legend."""
    from rich.text import Text

    plain = console.no_color or not console.is_terminal or console.color_system is None
    for i, r in enumerate(rows, start=1):
        mask = [x != IGNORE_INDEX for x in r["labels"]]
        console.rule(f"example {i}: {r['source']}  ({len(r['input_ids'])} tokens, {sum(mask)} trained)")
        text = Text()
        for seg, trained in _segments(tokenizer, r["input_ids"], mask):
            if plain:  # no colours (a file, a pipe): the trained tokens between markers
                text.append(f"{PLAIN_MARKS[0]}{seg}{PLAIN_MARKS[1]}" if trained else seg)
            else:
                text.append(seg, style="bold green" if trained else "dim")
        console.print(text, soft_wrap=True)
    if plain:
        console.print(f"legend: {PLAIN_MARKS[0]}trained{PLAIN_MARKS[1]}, the rest not trained", markup=False)
    else:
        console.rule("legend: [bold green]trained[/] [dim]not trained[/]")


def _stats_table(stats: dict):
    from rich.table import Table
    from rich.text import Text

    table = Table(title="data", show_header=False)
    t = stats["tokens_per_example"]
    for key, value in (
        ("format", stats["format"]),
        ("template", stats["template"] or "none"),
        ("examples", f"{stats['train_examples']} train, {stats['eval_examples']} eval"),
        ("tokens / example", f"{t['min']} min, {t['median']:g} median, {t['max']} max"),
        ("tokens trained", f"{stats['trained_share']:.1%}"),
        (
            "truncated",
            f"{stats['truncated_examples']} examples, {stats['answer_tokens_lost']} answer tokens lost",
        ),
        ("skipped", str(stats["skipped"])),
        ("end-of-turn token", str(stats["end_of_turn_token"])),
        ("assistant-only loss", str(stats["assistant_only_loss"])),
        ("completion-only loss", str(stats["completion_only_loss"])),
    ):
        table.add_row(key, Text(str(value)))
    return table
