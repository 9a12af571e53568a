"""`fastsft eval`: the held-out loss of a model on the run's evaluation data (or a file), encoded and
masked as training encodes it; its greedy answers (batched) scored against the data's answers (the task
metric: exact, normalised, class accuracy) and how often they end their turn; written to eval.json.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from fastsft import data as data_mod
from fastsft import files
from fastsft import recipe as recipe_mod
from fastsft.chat.generation import answer_batch
from fastsft.chat.scoring import confusion_rows, reference_of, score, summary_line
from fastsft.data.formats import skip_hint
from fastsft.errors import DataError
from fastsft.export import EXPORT_JSON
from fastsft.loss.held_out import held_out_loss
from fastsft.progress import bar
from fastsft.run import before as before_cache
from fastsft.rundir import RECIPE
from fastsft.use.answer import read_folders
from fastsft.use.load import LoadedForUse, load_for_use
from fastsft.use.scores import json_fields, json_rows

EVAL_JSON = "eval.json"


def eval_conversations(recipe, tokenizer, *, log=None) -> tuple[list[dict], str]:
    """The run's held-out examples ([data] eval, or the val_ratio split with the run's seed),
    tokenized and masked by training's own code (`fastsft.data.encode_eval_split`):
    [{"input_ids", "mask"}], and where they came from."""
    d = recipe.data
    if not d.eval and not (d.val_ratio and d.val_ratio > 0):
        raise DataError(
            "the run has no held-out data: its recipe sets neither [data] eval nor [data] val_ratio. "
            "Pass a file of conversations: fastsft eval RUN --data held_out.jsonl"
        )
    items = data_mod.encode_eval_split(recipe, tokenizer, log=log)
    source = (
        f"[data] eval = {recipe.resolve_path(d.eval)}"
        if d.eval
        else (f"{d.val_ratio:g} of {recipe.resolve_path(d.train)} (seed {recipe.train.seed})")
    )
    return items, source + ", masked as training masked it"


def _recipe_near(path: Path):
    """The recipe of an export: its own recipe.toml, or that of the run named in its export.json."""
    if (path / RECIPE).exists():
        return recipe_mod.load(path / RECIPE)
    try:
        run_dir = json.loads((path / EXPORT_JSON).read_text(encoding="utf-8")).get("run_dir")
    except (OSError, json.JSONDecodeError):
        return None
    if run_dir and (Path(run_dir) / RECIPE).exists():
        return recipe_mod.load(Path(run_dir) / RECIPE)
    return None


def _held_out(loaded: LoadedForUse, data_file, console) -> tuple[list[dict], str, object | None]:
    """(encoded conversations, where they came from, the recipe that shaped them) to evaluate on:
    `data_file` masked as the run trained (or as `fastsft run` masks by default), else the run's split."""
    recipe = loaded.recipe
    if recipe is None and data_file is None:
        recipe = _recipe_near(loaded.path)
    if data_file is not None:  # masked as training masks it: the run's recipe, or every default
        convs = _encode_data_file(recipe, loaded.tokenizer, Path(data_file))
        how = "the run's training masked it" if recipe is not None else "`fastsft run` masks it"
        return convs, f"{data_file}, masked as {how}", recipe
    if recipe is not None:
        convs, source = eval_conversations(
            recipe, loaded.tokenizer, log=lambda m: console.print(m, highlight=False)
        )
        return convs, source, recipe
    raise DataError(f"{loaded.path} is not a run directory, so it has no eval split: pass --data FILE.")


def check_data_file(data_file) -> None:
    """`eval --data FILE` that cannot be read at all, refused before the model loads."""
    path = Path(data_file)
    if not path.exists():
        raise DataError(f"--data {data_file}: no such data file.")
    if path.is_file() and not path.read_bytes().strip():
        raise DataError(
            f"--data {data_file} is empty: it holds no conversations to evaluate. Give one "
            '{"messages": [...]} row a line (or any shape training takes).'
        )


def _encode_data_file(recipe, tokenizer, path: Path) -> list[dict]:
    """`fastsft.data.encode_file` (recipe None: every [data] default), its problems told as problems of
    `--data`: training's words name the recipe key (data.train) and offer data.on_invalid, which eval
    has not got."""
    try:
        return data_mod.encode_file(recipe, tokenizer, path)
    except DataError as e:
        text = re.sub(r"^data\.\w+ = '[^']*': ", f"--data {path}: ", str(e))
        if text.endswith(skip_hint()):
            text = text[: -len(skip_hint())] + (
                ". eval scores every row of --data and has no option to skip one: fix that row, or remove it "
                "from the file (or from a copy of it)"
            )
        raise DataError(text) from None


def _answered(
    loaded: LoadedForUse,
    convs: list[dict],
    n_gen: int,
    max_new_tokens: int,
    batch_size: int,
    console,
    record: dict | None = None,
) -> list[dict]:
    """Greedy answers (batched, fastsft.chat.generation.answer_batch) to the prompts of the first `n_gen`
    conversations, each beside the answer the data expects."""
    tokenizer = loaded.tokenizer
    refs = [r for r in (reference_of(c, tokenizer, loaded.eot) for c in convs) if r][: max(0, n_gen)]
    if not refs:
        return []

    def compute():
        with bar(console, len(refs), "answering") as advance:
            got = answer_batch(
                loaded.model,
                tokenizer,
                [p for p, _ in refs],
                eot=loaded.eot,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                on_batch=advance,
            )
        return [
            {
                "prompt": tokenizer.decode(prompt),
                "expected": expected,
                "answer": a.text,
                "stopped": a.stopped,
                "role_markers": a.role_markers,
                "complies": a.complies,
            }
            for (prompt, expected), a in zip(refs, got, strict=True)
        ]

    parts = {"refs": refs, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "eot": loaded.eot}
    return _cached(loaded, "eval-answers", parts, compute, console, {} if record is None else record)


def _base_fingerprint(loaded: LoadedForUse) -> str | None:
    """A plain model folder's fingerprint (fastsft.run.before): the base model, or a merged export; None
    for a run or an adapter (not cached: the base they sit on is not part of their folder)."""
    if loaded.kind != "model":
        return None
    dtype = str(next(loaded.model.parameters()).dtype)
    return before_cache.model_fingerprint(str(loaded.path), kind=loaded.kind, dtype=dtype)


def _cached(loaded: LoadedForUse, kind: str, parts: dict, compute, console, record: dict):
    """A base model's number from fastsft.run.before's cache (a second eval of the same model, data and
    settings computes nothing), else computed and stored."""
    value, reused = before_cache.cached(kind, _base_fingerprint(loaded), parts, compute)
    if reused:
        what = "held-out loss" if kind == "eval-loss" else "answers"
        console.print(f"{what}: reused from the cache (same model, data and settings)", highlight=False)
    record[kind] = "reused" if reused else "computed"
    return value


def print_task(console, task: dict, title: str = "task metric") -> None:
    """The task metric (exact / normalised match, class accuracy) and the confusion table."""
    from rich.table import Table

    console.print(f"{title}: {summary_line(task)}", highlight=False)
    c = task.get("classes")
    if c and c.get("n"):
        rows = confusion_rows(c)
        table = Table(title="confusion (rows: expected, columns: answered)")
        for i, h in enumerate(rows[0]):
            table.add_column(h, justify="left" if i == 0 else "right")
        for r in rows[1:]:
            table.add_row(*r)
        console.print(table)


def _print_eval(console, result: dict) -> None:
    from rich.table import Table

    n = result["generated"]
    table = Table(title=f"fastsft eval: {result['model']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("held-out data", result["data"])
    table.add_row("conversations / scored tokens", f"{result['conversations']} / {result['tokens']}")
    table.add_row("loss (assistant tokens)", f"{result['loss']:.4f}")
    table.add_row("perplexity", f"{result['perplexity']:.3f}")
    if n:
        task = result["task"]
        table.add_row(f"exact match ({n} greedy answers)", f"{task['exact_count']}/{n} ({task['exact']:.0%})")
        table.add_row(
            "  normalised (case, spaces, punctuation)",
            f"{task['normalised_count']}/{n} ({task['normalised']:.0%})",
        )
        for metric, value in json_rows(result["json"]) if result.get("json") else ():
            table.add_row(metric, value)
        c = task.get("classes")
        if c and c.get("n"):
            table.add_row(
                f"  accuracy ({len(c['labels'])} labels)", f"{c['correct']}/{c['n']} ({c['accuracy']:.0%})"
            )
        table.add_row("template compliance", f"{result['compliance']:.0%}")
        table.add_row("  ended with end-of-turn", f"{result['stopped_share']:.0%}")
        table.add_row("  free of role markers", f"{result['role_marker_free_share']:.0%}")
    console.print(table)
    if n and (result["task"].get("classes") or {}).get("n"):
        print_task(console, result["task"])


def evaluate(
    model_ref,
    data_file=None,
    n_gen: int = 64,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    json_out=None,
    overwrite: bool = False,
    max_length: int | None = None,
    console=None,
    policy=None,
) -> dict:
    """Held-out loss and perplexity (assistant tokens); the greedy answers to the first `n_gen` prompts
    scored against the data's answers (exact, normalised, class accuracy with a confusion table:
    fastsft.chat.scoring) and their template compliance.

    Compliance is the share of answers to held-out prompts that end with the end-of-turn token within
    `max_new_tokens` and hold no role markers. Answers are generated `batch_size` at a time (left
    padding). The results are printed as a table and saved as JSON: `json_out`, else RUN_DIR/eval.json
    for a run directory (eval's own file, replaced by each eval). `json_out` replaces an existing file only
    with `overwrite`, and never the data nor a file of the model's folder (fastsft.files.check_output)."""
    from rich.console import Console

    console = console or Console()
    if data_file is not None:
        check_data_file(data_file)
    if json_out is not None:
        _check_json_out(json_out, model_ref, data_file, overwrite)
    with bar(console, None, f"loading {model_ref}"):
        loaded = load_for_use(model_ref, policy=policy)
    if json_out is not None:
        _check_json_out(json_out, loaded, data_file, overwrite)
    convs, source, recipe = _held_out(loaded, data_file, console)
    if max_length is None:
        max_length = recipe.data.max_length if recipe is not None else 2048
    reuse: dict[str, str] = {}  # eval.json's before_cache: which numbers an earlier eval had paid for

    def compute():
        with bar(console, len(convs), "held-out loss") as advance:
            return held_out_loss(loaded.model, convs, max_length=max_length, advance=advance)

    scored = _cached(loaded, "eval-loss", {"items": convs, "max_length": max_length}, compute, console, reuse)
    loss, tokens = scored["loss"], scored["tokens"]
    if tokens == 0:
        raise DataError(f"{source}: no assistant tokens to score.")
    samples = _answered(loaded, convs, n_gen, max_new_tokens, batch_size, console, reuse)
    n = len(samples)
    result = {
        "model": loaded.ref or str(loaded.path),  # as the user named it (a GGUF file, not its cache folder)
        "model_path": str(loaded.path),
        "kind": loaded.kind,
        "data": source,
        "conversations": len(convs),
        "tokens": tokens,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "generated": n,
        "max_new_tokens": max_new_tokens,
        "task": score([s["expected"] for s in samples], [s["answer"] for s in samples]) if n else None,
        "json": json_fields([s["expected"] for s in samples], [s["answer"] for s in samples]) if n else None,
        "compliance": (sum(s["complies"] for s in samples) / n) if n else None,
        "stopped_share": (sum(s["stopped"] for s in samples) / n) if n else None,
        "role_marker_free_share": (sum(not s["role_markers"] for s in samples) / n) if n else None,
        "samples": samples,
    }
    if _base_fingerprint(loaded) is not None:
        result["before_cache"] = reuse
    _print_eval(console, result)
    text = json.dumps(result, indent=2, default=str) + "\n"
    target = None
    if json_out is not None and not _is_own_file(json_out, loaded):
        target = files.write_output(json_out, text, option="--json-out", overwrite=overwrite)
    elif loaded.run_dir is not None:
        target = loaded.run_dir / EVAL_JSON
        files.write_text(target, text)
    if target is not None:
        result["saved_to"] = str(target)
        console.print(f"saved {target}", highlight=False)
    return result


def _is_own_file(json_out, loaded) -> bool:
    """Whether --json-out names RUN_DIR/eval.json, the file eval writes anyway."""
    ref = loaded.run_dir if isinstance(loaded, LoadedForUse) else None
    return ref is not None and Path(json_out).resolve() == (Path(ref) / EVAL_JSON).resolve()


def _check_json_out(json_out, model, data_file, overwrite: bool) -> None:
    """--json-out, refused before the work when it would replace the data, a file of the model's folder or
    (without --overwrite) any existing file; RUN_DIR/eval.json is eval's own."""
    if _is_own_file(json_out, model) or (
        not isinstance(model, LoadedForUse)
        and Path(json_out).resolve() == (Path(model) / EVAL_JSON).resolve()
    ):
        return
    files.check_output(
        json_out,
        option="--json-out",
        overwrite=overwrite,
        inputs=[data_file],
        folders=read_folders(model, json_out),
    )
