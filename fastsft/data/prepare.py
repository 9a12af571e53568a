"""`prepare_data(recipe, tokenizer)`: `[data]` -> the train/eval datasets TRL's SFTTrainer takes.

1. Read and normalise `train` (and `eval`) (`formats.load_examples`); plain prompt/completion rows
   become one user -> assistant exchange when the tokenizer has a chat template.
2. Set up the tokenizer (`encode.setup_template`, `encode.setup_pad_token`) and decide the loss:
   assistant-only for conversations, completion-only for prompt/completion, unless [data] says.
3. Tokenize every row once (`encode.Encoder`), refuse or skip rows left with no trained token, check
   that every answer's end-of-turn token is trained, hold out `val_ratio` of the distinct examples.
4. Hand TRL the tokens: every row is `input_ids` plus its loss mask (`assistant_masks` for
   conversations, `completion_mask` for prompt/completion; none when every token is trained), so
   SFTTrainer tokenizes nothing; it builds the labels from the mask, truncates and packs. The
   prompt turns (and the tools, as JSON) ride along for the report's sample answers. The datasets
   are cached by fingerprint (`cache`), so a second run on the same data tokenizes nothing either.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import dist
from ..chat.templates import end_of_turn_token, has_generation_markers
from ..errors import DataError
from ..progress import bar
from . import cache, mixing
from .encode import Encoder, check_end_of_turn, encode_all, setup_pad_token, setup_template, truncation_limit
from .formats import KIND_NAMES, MAX_SKIP_REASONS, Example, kind, load_examples, tool_names
from .spec import DataSpec


@dataclass
class PreparedData:
    """What `train.run` hands to SFTTrainer (`train`, `eval`, `sft_kwargs`) and to run.json."""

    train: Any  # datasets.Dataset: input_ids, the mask column, the prompt turns
    eval: Any | None
    sft_kwargs: dict
    stats: dict
    fingerprint: str


@dataclass
class _Plan:
    """How the loaded data is tokenized and masked, decided once from its kind, [data] and the tokenizer."""

    fmt: str
    kind: str  # formats.kind: messages | prompt_completion_chat | prompt_completion_text | text
    template: str | None
    assistant_only: bool
    completion_only: bool
    markers: bool  # the chat template has {% generation %} markers
    eot: str | None
    added_pad: str | None
    limit: int | None  # the tokens training keeps (encode.truncation_limit)

    @property
    def mask_column(self) -> str | None:
        """The column TRL reads the loss mask from (TRL ANDs it into the labels); None: every token trained."""
        if self.completion_only:
            return "completion_mask"  # read by TRL when completion_only_loss = True
        return "assistant_masks" if self.assistant_only else None


def _loss_options(spec: DataSpec, kind: str) -> tuple[bool, bool]:
    """(assistant_only_loss, completion_only_loss) in effect for data of `kind`."""
    d = spec.data
    conversational = kind in ("messages", "prompt_completion_chat")
    aol = d.assistant_only_loss
    if aol is None:
        aol = conversational
    elif aol and not conversational:
        raise DataError(
            f"data.assistant_only_loss = true needs conversational data, but the data is {KIND_NAMES[kind]}; "
            "remove the setting (prompt/completion data trains on the completion only by default)"
        )
    col = d.completion_only_loss
    if col is None:
        col = kind.startswith("prompt_completion")
    elif col and not kind.startswith("prompt_completion"):
        col = False  # nothing to do: only prompt/completion data has a completion
    return bool(aol), bool(col)


def _load(
    spec: DataSpec, log, origin: dict[int, int], key: str = "train"
) -> tuple[list[Example], list[Example], dict, dict | None, str]:
    """(train examples, eval examples, train skip info, eval skip info, format). With [[data.sources]],
    `origin` is filled with id(example) -> the index of its source. `key` names `data.train` in messages."""
    d = spec.data
    if d.sources:
        train_ex, train_info, fmt = _load_sources(spec, origin)
    else:
        train_ex, train_info, fmt = load_examples(d.train, spec, key=key, fmt=None)
    eval_ex, eval_info = [], None
    if d.eval:
        eval_ex, eval_info, _ = load_examples(d.eval, spec, key="eval", fmt=None if d.sources else fmt)
        if d.val_ratio > 0:
            log("data: data.eval is given, so val_ratio is not used")
        if kind(eval_ex[0].row) != kind(train_ex[0].row):
            raise DataError(
                f"data.eval: {eval_ex[0].where} is {KIND_NAMES[kind(eval_ex[0].row)]} but the training data is "
                f"{KIND_NAMES[kind(train_ex[0].row)]}"
            )
    return train_ex, eval_ex, train_info, eval_info, fmt


def _load_sources(spec: DataSpec, origin: dict[int, int]) -> tuple[list[Example], dict, str]:
    """Every [[data.sources]] entry through `load_examples` as if it were the only file (its own format and
    columns): (the examples of all sources, their skip info merged, the format(s)); `origin` gets
    id(example) -> source index."""
    sources = mixing.resolve(spec.data)
    examples: list[Example] = []
    info = {"name": "[[data.sources]]", "rows": 0, "skipped": 0, "skip_reasons": []}
    formats: list[str] = []
    first_kind = None
    for i, source in enumerate(sources):
        one_spec = spec.one_file(source.path, format=source.format, columns=source.columns)
        exs, one, fmt = load_examples(source.path, one_spec, key=f"sources #{i + 1} path", fmt=None)
        k = kind(exs[0].row) if exs else None
        if first_kind is not None and k is not None and k != first_kind:
            raise DataError(
                f"[[data.sources]] #{i + 1} ({source.path}) is {KIND_NAMES[k]} but #1 ({sources[0].path}) is "
                f"{KIND_NAMES[first_kind]}: the sources of one mix must become the same kind of example "
                "(conversations mix with conversations, whatever their file format); convert one, or set its `format`"
            )
        first_kind = first_kind or k
        for e in exs:
            origin[id(e)] = i
        examples += exs
        info["rows"] += one["rows"]
        info["skipped"] += one["skipped"]
        info["skip_reasons"] = (info["skip_reasons"] + one["skip_reasons"])[:MAX_SKIP_REASONS]
        if fmt not in formats:
            formats.append(fmt)
    return examples, info, "+".join(formats)


def _mix(
    spec: DataSpec, examples: list[Example], origin: dict[int, int], log
) -> tuple[list[Example], list[dict]]:
    """The encoded examples of every source -> the training mix (each source's share held exactly)."""
    sources = mixing.resolve(spec.data)
    by_source: list[list[Example]] = [[] for _ in sources]
    for e in examples:
        by_source[origin[id(e)]].append(e)
    for s, exs in zip(sources, by_source, strict=True):
        if not exs:
            raise DataError(f"[[data.sources]] path = {s.path!r}: no usable examples")
    want = mixing.counts(
        [len(x) for x in by_source], [s.fraction for s in sources], spec.data.stopping_strategy
    )
    mixed = mixing.draw(by_source, want, spec.seed)
    rows = [
        {"path": s.path, "share": round(s.fraction, 6), "available": len(exs), "used": n}
        for s, exs, n in zip(sources, by_source, want, strict=True)
    ]
    log(f"data: mixed {len(mixed)} examples ({spec.data.stopping_strategy}): {mixing.describe(rows)}")
    return mixed, rows


def _as_exchanges(examples: list[Example], log) -> None:
    """Plain prompt/completion rows -> one user -> assistant exchange each (in place). One rule for these
    rows in every command: with a chat template, `generate`, `chat` and `eval` prompt the model so."""
    for ex in examples:
        ex.row = {
            **ex.row,
            "prompt": [{"role": "user", "content": ex.row["prompt"]}],
            "completion": [{"role": "assistant", "content": ex.row["completion"]}],
        }
    log(
        "data: plain prompt/completion rows are rendered through the chat template as one user -> assistant "
        "exchange (as generate, chat and eval prompt the model)"
    )


def _plan(spec: DataSpec, tokenizer, fmt: str, examples: list[Example], log) -> _Plan:
    """Set up the tokenizer (template, pad token) for the loaded `examples` and decide their masking."""
    template = setup_template(spec, tokenizer)
    k = kind(examples[0].row)
    if k == "prompt_completion_text" and getattr(tokenizer, "chat_template", None):
        _as_exchanges(examples, log)
        k = "prompt_completion_chat"
    conversational = k in ("messages", "prompt_completion_chat")
    aol, col = _loss_options(spec, k)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the data is conversational but the tokenizer has no chat template: set data.chat_template to "
            "the model's format (chatml, llama3, mistral, qwen2.5, gemma) or to the path of a .jinja file"
        )
    markers = conversational and has_generation_markers(tokenizer.chat_template)
    eot = end_of_turn_token(tokenizer) if conversational else tokenizer.eos_token
    added_pad = setup_pad_token(tokenizer, eot, log)
    tool_rows = sum(1 for e in examples if tool_names(e.row))
    if tool_rows:
        log(f"data: {tool_rows} example(s) define or call tools; they are rendered with their tools")
    if conversational and aol and not markers:
        try:
            tokenizer("a", return_offsets_mapping=True)
        except NotImplementedError:
            raise DataError(
                "assistant-only loss with a chat template without {% generation %} markers needs a fast "
                "tokenizer (for character offsets); set data.chat_template to a built-in template instead"
            ) from None
        log(
            "data: the chat template has no {% generation %} markers; assistant turns are found by rendering "
            "the conversation turn by turn"
        )
    return _Plan(fmt, k, template, aol, col, bool(markers), eot, added_pad, truncation_limit(spec))


def _fingerprint(spec: DataSpec, tokenizer, plan: _Plan) -> str:
    d = spec.data
    options = {
        "format": plan.fmt,
        "assistant_only_loss": plan.assistant_only,
        "completion_only_loss": plan.completion_only,
        "mask_column": plan.mask_column,
        "end_of_turn_token": plan.eot,
        "max_length": d.max_length,
        "packing": d.packing,
        "packing_strategy": d.packing_strategy,
        "split": "distinct",  # val_ratio holds out distinct examples (no copy left in training)
    }
    return cache.compute_fingerprint(spec, tokenizer, template=plan.template, options=options)


def _sft_kwargs(spec: DataSpec, plan: _Plan) -> dict:
    """SFTConfig's data fields. The rows carry their masks, so TRL's own masking options stay off
    (they would look for conversations to render), except completion_only_loss, which makes TRL read
    the `completion_mask` column."""
    d = spec.data
    return {
        "max_length": d.max_length,
        "packing": d.packing,
        "packing_strategy": d.packing_strategy,
        "truncation_mode": "keep_start",
        "assistant_only_loss": False,
        "completion_only_loss": plan.mask_column == "completion_mask",
    }


def _split(examples: list[Example], ratio: float, seed: int) -> tuple[list[Example], list[Example], int]:
    """(train, eval, duplicates): `ratio` of the distinct examples held out, one copy each; every copy
    of a held-out example leaves training, so no eval example is a training example (copies of one
    row would otherwise land on both sides and the eval loss would measure memorisation). `datasets`'
    seeded `train_test_split` picks the held-out distinct examples."""
    import datasets

    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(json.dumps(e.row, sort_keys=True, ensure_ascii=False, default=str), []).append(i)
    order = list(groups.values())
    n = len(order)
    n_eval = max(1, round(n * ratio))
    if n - n_eval < 1:
        raise DataError(
            f"data.val_ratio = {ratio}: {n} distinct example(s) are too few to split off an eval set"
        )
    distinct = datasets.Dataset.from_dict({"group": list(range(n))})
    picked = distinct.train_test_split(test_size=n_eval, seed=seed)["test"]["group"]
    held = {order[g][0] for g in picked}
    dropped = {i for g in picked for i in order[g]}
    train = [e for i, e in enumerate(examples) if i not in dropped]
    return train, [e for i, e in enumerate(examples) if i in held], len(examples) - n


def _token_stats(examples: list[Example], limit: int | None) -> dict:
    lengths = [len(e.input_ids) for e in examples]
    seen = trained = 0
    for e in examples:
        k = len(e.input_ids) if limit is None else min(limit, len(e.input_ids))
        seen += k
        trained += sum(e.mask[:k])
    return {
        "tokens_per_example": {
            "min": min(lengths) if lengths else 0,
            "median": statistics.median(lengths) if lengths else 0,
            "max": max(lengths) if lengths else 0,
        },
        "tokens": seen,
        "trained_tokens": trained,
        "trained_share": round(trained / seen, 4) if seen else 0.0,
    }


def _stats(spec: DataSpec, tokenizer, plan: _Plan, train_ex, eval_ex, trunc: dict, infos: list[dict]) -> dict:
    reasons = [r for info in infos for r in info["skip_reasons"]][:MAX_SKIP_REASONS]
    stats = {
        "format": plan.fmt,
        "template": plan.template,
        "generation_markers": plan.markers,
        "end_of_turn_token": plan.eot,
        "pad_token": tokenizer.pad_token,
        "added_pad_token": plan.added_pad,
        "route": "pretokenized",  # every shape reaches TRL as input_ids and its mask
        "mask_column": plan.mask_column,
        "assistant_only_loss": plan.assistant_only,
        "completion_only_loss": plan.completion_only,
        "max_length": spec.data.max_length,
        "train_examples": len(train_ex),
        "eval_examples": len(eval_ex),
        **_token_stats(train_ex, plan.limit),
        **trunc,
        "skipped": sum(info["skipped"] for info in infos),
        "skip_reasons": reasons,
    }
    t = stats["tokens_per_example"]
    ev = f" / {stats['eval_examples']} eval" if stats["eval_examples"] else ""
    tmpl = f", template {stats['template']}" if stats["template"] else ""
    stats["summary"] = (
        f"{stats['train_examples']} train{ev} examples ({stats['format']}{tmpl}); "
        f"tokens/example {t['min']}/{t['median']:g}/{t['max']} (min/median/max); "
        f"{stats['trained_share']:.0%} of tokens trained; "
        f"{stats['truncated_examples']} truncated ({stats['answer_tokens_lost']} answer tokens lost); "
        f"{stats['skipped']} skipped"
    )
    return stats


def _with_mix(stats: dict, mix: list[dict] | None) -> dict:
    if mix:
        stats["mix"] = mix
        stats["summary"] += f"; mix: {mixing.describe(mix)}"
    return stats


def _report(stats: dict, log) -> None:
    """The warnings and the one-line summary, the same whether the data was tokenized now or cached."""
    if stats["truncated_examples"]:
        log(
            f"warning: {stats['truncated_examples']} example(s) are longer than max_length = {stats['max_length']} "
            f"and are truncated; {stats['answer_tokens_lost']} answer token(s) are lost. Raise data.max_length to "
            "keep them"
        )
    if stats["skipped"]:
        log(f"warning: {stats['skipped']} invalid row(s) skipped; first: {stats['skip_reasons'][0]}")
    log(f"data: {stats['summary']}")


def _prompt_columns(row: dict, with_tools: bool) -> dict:
    """A conversational row's turns before its first answer (role and content) under its own column
    name, and its tools as JSON: for `run.answers.sample_prompts`. As Arrow columns, full turns would merge
    the tool-call arguments of all rows into one struct type; the Trainer drops these columns."""
    key = "messages" if "messages" in row else "prompt"
    msgs = row.get(key)
    if not isinstance(msgs, list):
        return {}
    first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
    out: dict = {key: [{"role": m["role"], "content": m["content"]} for m in msgs[:first]]}
    if with_tools:
        out["tools"] = json.dumps(row["tools"], ensure_ascii=False) if row.get("tools") else ""
    return out


def _to_dataset(examples: list[Example], mask_column: str | None):
    """Encoded examples -> the datasets.Dataset TRL takes as already processed (it has `input_ids`)."""
    import datasets

    with_tools = any(e.row.get("tools") for e in examples)
    rows = []
    for e in examples:
        row = {"input_ids": e.input_ids, **({mask_column: e.mask} if mask_column else {})}
        rows.append({**row, **_prompt_columns(e.row, with_tools)})
    return datasets.Dataset.from_list(rows)


def prepare_data(recipe, tokenizer, *, log=print) -> PreparedData:
    """`[data]` of a recipe (or a DataSpec) -> datasets and SFTConfig kwargs for TRL, stats and a
    fingerprint. Raises DataError."""
    prepared, _, _ = prepare_examples(recipe, tokenizer, log=log)
    return prepared


PROGRESS_ROWS = 5000  # data sets this large show a progress bar while they are tokenized


def _progress(total: int, what: str):
    """fastsft.progress.bar on stderr for `total` >= PROGRESS_ROWS rows (on the main process), else nothing."""
    import contextlib

    if total < PROGRESS_ROWS or not dist.is_main():
        return contextlib.nullcontext()
    from rich.console import Console

    return bar(Console(stderr=True), total, what)


def prepare_examples(
    recipe, tokenizer, *, log=print, keep: int = 0, use_cache: bool = True, key: str = "train"
):
    """prepare_data, also returning the first `keep` encoded training examples (for preview) and the
    encoded eval examples (when `keep` or not `use_cache`: the cache holds datasets, not examples).
    `recipe`: a recipe or a DataSpec. `key`: the recipe key that messages name for `data.train`
    (`encode_file` reads other keys' files)."""
    spec = DataSpec.of(recipe)
    d = spec.data
    origin: dict[int, int] = {}  # id(example) -> its [[data.sources]] entry
    train_ex, eval_ex, train_info, eval_info, fmt = _load(spec, log, origin, key)
    plan = _plan(spec, tokenizer, fmt, train_ex + eval_ex, log)
    fingerprint = _fingerprint(spec, tokenizer, plan)
    sft_kwargs = _sft_kwargs(spec, plan)
    if use_cache and not keep:
        cached = cache.load(fingerprint)
        if cached is not None:
            train_ds, eval_ds, stats = cached
            log(f"data: tokenized data from the cache ({cache.cache_dir(fingerprint)})")
            _report(stats, log)
            return PreparedData(train_ds, eval_ds, sft_kwargs, stats, fingerprint), [], []

    encoder = Encoder(
        tokenizer,
        assistant_only=plan.assistant_only,
        completion_only=plan.completion_only,
        markers=plan.markers,
        eot=plan.eot,
    )
    total = len(train_ex) + len(eval_ex)
    with _progress(total, "tokenizing") as advance:  # a bar for large data sets only
        train_ex, trunc = encode_all(train_ex, encoder, plan.limit, d.on_invalid, train_info, advance=advance)
        if eval_ex:
            eval_ex, etrunc = encode_all(
                eval_ex, encoder, plan.limit, d.on_invalid, eval_info, advance=advance
            )
            trunc = {k: trunc[k] + etrunc[k] for k in trunc}
    if not train_ex:
        raise DataError(f"data.{key} = {d.train!r}: no usable examples")
    check_end_of_turn(train_ex, tokenizer, plan.eot, plan.template)
    mix = None
    if d.sources:
        train_ex, mix = _mix(spec, train_ex, origin, log)
    if not d.eval and d.val_ratio > 0:
        train_ex, eval_ex, duplicates = _split(train_ex, d.val_ratio, spec.seed)
        log(
            f"data: held out {len(eval_ex)} distinct example(s) (val_ratio = {d.val_ratio:g}), none of them in "
            f"training" + (f"; {duplicates} duplicate row(s) in data.train" if duplicates else "")
        )
    infos = [train_info] + ([eval_info] if eval_info else [])
    stats = _with_mix(_stats(spec, tokenizer, plan, train_ex, eval_ex, trunc, infos), mix)
    _report(stats, log)
    train_ds = _to_dataset(train_ex, plan.mask_column)
    eval_ds = _to_dataset(eval_ex, plan.mask_column) if eval_ex else None
    if use_cache:
        cache.save(fingerprint, train_ds, eval_ds, stats)
    return PreparedData(train_ds, eval_ds, sft_kwargs, stats, fingerprint), train_ex[:keep], eval_ex


def encode_file(recipe, tokenizer, path: str | Path, *, log=None, key: str = "train") -> list[dict]:
    """Every example of the data file `path`, tokenized and masked exactly as the run with `recipe`
    trained (its template, shape detection, loss options; `recipe=None`: every [data] default, for a
    model without a recipe): [{"input_ids", "mask"}], untruncated. For `fastsft eval --data`: held-out
    loss measured on the tokens training would have trained. `key` is the recipe key that names `path`
    in messages (`retain` for `[data] retain`)."""
    _, examples, _ = prepare_examples(
        DataSpec.of(recipe).one_file(Path(path)),
        tokenizer,
        log=log or (lambda m: None),
        keep=sys.maxsize,
        use_cache=False,
        key=key,
    )
    return [{"input_ids": e.input_ids, "mask": e.mask} for e in examples]


def encode_eval_split(recipe, tokenizer, *, log=None) -> list[dict]:
    """The run's held-out examples ([data] eval, or the val_ratio split), tokenized and masked as
    training masked them: [{"input_ids", "mask"}], untruncated. Empty when the recipe holds none out."""
    _, _, examples = prepare_examples(recipe, tokenizer, log=log or (lambda m: None), use_cache=False)
    return [{"input_ids": e.input_ids, "mask": e.mask} for e in examples]
