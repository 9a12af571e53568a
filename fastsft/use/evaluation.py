"""`fastsft eval`: the held-out loss of a model on the run's evaluation data (or a file), encoded and
masked as training encodes it, and how often its greedy answers end their turn; written to eval.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fastsft.data import IGNORE_INDEX
from fastsft.errors import DataError
from fastsft.rundir import RECIPE
from fastsft.use.load import LoadedForUse, load_for_use

EVAL_JSON = "eval.json"


def eval_conversations(recipe, tokenizer, *, log=None) -> tuple[list[dict], str]:
    """The run's held-out examples ([data] eval, or the val_ratio split with the run's seed),
    tokenized and masked by training's own code (`fastsft.data.encode_eval_split`):
    [{"input_ids", "mask"}], and where they came from."""
    from fastsft import data as data_mod

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


def _loss_tokens(item: dict, max_length: int):
    """(input_ids (1, T), labels (1, T)) of an encoded example: loss where training had it."""
    import torch

    from fastsft.data import labels

    return torch.tensor([item["input_ids"][:max_length]]), torch.tensor(
        [labels(item["input_ids"], item["mask"], max_length)]
    )


def _prompt_of(item: dict):
    """The token ids before the first trained token (the prompt, generation prompt included)."""
    first = next((i for i, m in enumerate(item["mask"]) if m), None)
    return item["input_ids"][:first] if first else None


def _recipe_near(path: Path):
    """The recipe of an export: its own recipe.toml, or that of the run named in its export.json."""
    from fastsft import recipe as recipe_mod
    from fastsft.export import EXPORT_JSON

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
        from fastsft import data as data_mod

        if not Path(data_file).exists():
            raise DataError(f"{data_file}: no such data file.")
        shaping = recipe if recipe is not None else data_mod.default_recipe(loaded.path, data_file)
        convs = data_mod.encode_file(shaping, loaded.tokenizer, data_file)
        how = "the run's training masked it" if recipe is not None else "`fastsft run` masks it"
        return convs, f"{data_file}, masked as {how}", recipe
    if recipe is not None:
        convs, source = eval_conversations(
            recipe, loaded.tokenizer, log=lambda m: console.print(m, highlight=False)
        )
        return convs, source, recipe
    raise DataError(f"{loaded.path} is not a run directory, so it has no eval split: pass --data FILE.")


def held_out_loss(model, convs: list[dict], max_length: int) -> tuple[float, int]:
    """(mean cross-entropy over the tokens training trained, their count) of encoded conversations."""
    import torch

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for conv in convs:
            ids, labels = _loss_tokens(conv, max_length)
            if (labels[:, 1:] != IGNORE_INDEX).sum() == 0:
                continue
            logits = model(input_ids=ids.to(device)).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[0, :-1], labels[0, 1:].to(device), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += int((labels[0, 1:] != IGNORE_INDEX).sum())
    return (total_nll / total_tokens if total_tokens else float("nan")), total_tokens


def _compliance_samples(
    loaded: LoadedForUse, convs: list[dict], n_gen: int, max_new_tokens: int
) -> list[dict]:
    """Greedy answers (fastsft.chat.generation.answer) to the prompts of the first `n_gen` conversations."""
    from fastsft.chat.generation import answer

    tokenizer = loaded.tokenizer
    samples = []
    prompts = [p for p in (_prompt_of(c) for c in convs) if p][: max(0, n_gen)]
    for prompt in prompts:
        got = answer(loaded.model, tokenizer, prompt, eot=loaded.eot, max_new_tokens=max_new_tokens)
        samples.append(
            {
                "prompt": tokenizer.decode(prompt),
                "answer": got.text,
                "stopped": got.stopped,
                "role_markers": got.role_markers,
                "complies": got.complies,
            }
        )
    return samples


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
        table.add_row(f"template compliance ({n} greedy answers)", f"{result['compliance']:.0%}")
        table.add_row("  ended with end-of-turn", f"{result['stopped_share']:.0%}")
        table.add_row("  free of role markers", f"{result['role_marker_free_share']:.0%}")
    console.print(table)


def evaluate(
    model_ref,
    data_file=None,
    n_gen: int = 16,
    *,
    max_new_tokens: int = 64,
    json_out=None,
    max_length: int | None = None,
    console=None,
    policy=None,
) -> dict:
    """Held-out loss and perplexity (assistant tokens), and template compliance of greedy answers.

    Compliance is the share of answers to held-out prompts that end with the end-of-turn token within
    `max_new_tokens` and hold no role markers. The results are printed as a table and saved as JSON:
    `json_out`, else RUN_DIR/eval.json for a run directory."""
    from rich.console import Console

    console = console or Console()
    loaded = load_for_use(model_ref, policy=policy)
    convs, source, recipe = _held_out(loaded, data_file, console)
    if max_length is None:
        max_length = recipe.data.max_length if recipe is not None else 2048
    loss, tokens = held_out_loss(loaded.model, convs, max_length)
    if tokens == 0:
        raise DataError(f"{source}: no assistant tokens to score.")
    samples = _compliance_samples(loaded, convs, n_gen, max_new_tokens)
    n = len(samples)
    result = {
        "model": str(loaded.path),
        "kind": loaded.kind,
        "data": source,
        "conversations": len(convs),
        "tokens": tokens,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "generated": n,
        "max_new_tokens": max_new_tokens,
        "compliance": (sum(s["complies"] for s in samples) / n) if n else None,
        "stopped_share": (sum(s["stopped"] for s in samples) / n) if n else None,
        "role_marker_free_share": (sum(not s["role_markers"] for s in samples) / n) if n else None,
        "samples": samples,
    }
    _print_eval(console, result)
    target = (
        Path(json_out) if json_out else (loaded.run_dir / EVAL_JSON if loaded.run_dir is not None else None)
    )
    if target is not None:
        _write_json_atomic(target, result)
        result["saved_to"] = str(target)
        console.print(f"saved {target}", highlight=False)
    return result


def _write_json_atomic(path: Path, obj) -> None:
    from fastsft import files

    files.make_dir(path.parent)
    files.write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
