"""Rules between keys: what a recipe whose every key is valid alone may still get wrong (an eval
strategy without eval data, a quantised base with a full fine-tune, shares that add up past 1, ...).
`cross_checks` runs them all; validation (`loading.py`) reports their problems with every other one.
"""

from __future__ import annotations

import difflib
import math

from .schema import DATA_FORMATS, GGUF_QUANTS, TRACKER_NAMES

SOURCE_KEYS = ("path", "format", "columns", "weight", "share")


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


def check_early_stopping(train: dict, data: dict) -> list[str]:
    """Recipe problems of `[train] early_stopping_patience` (transformers' EarlyStoppingCallback keeps the
    best checkpoint by `metric_for_best_model`, so it needs evaluations and load_best_model_at_end)."""
    if train.get("early_stopping_patience") is None:
        return []
    why = (
        "early stopping watches the eval metric (metric_for_best_model) at every evaluation and keeps the "
        "best checkpoint, so it needs"
    )
    problems = []
    if train["eval_strategy"] == "no":
        problems.append(
            f'[train] early_stopping_patience: {why} eval_strategy = "steps" (with eval_steps) or "epoch"'
        )
    if not train["load_best_model_at_end"]:
        problems.append(
            f"[train] early_stopping_patience: {why} load_best_model_at_end = true (with save_strategy equal to "
            "eval_strategy)"
        )
    if (
        train["eval_strategy"] == "steps"
        and train["save_strategy"] == "steps"
        and train.get("eval_steps")
        and train["save_steps"] % train["eval_steps"]
    ):
        problems.append(
            f"[train] early_stopping_patience: {why} a checkpoint at every evaluation: save_steps "
            f"({train['save_steps']}) must be a multiple of eval_steps ({train['eval_steps']})"
        )
    return problems


def check_report_to(train: dict) -> list[str]:
    """Recipe problems of `[train] report_to`: unknown names, "none" among others."""
    value = train.get("report_to")
    items = [value] if isinstance(value, str) else list(value or [])
    problems = []
    for n in items:
        if n != "none" and n not in TRACKER_NAMES:
            close = difflib.get_close_matches(n, list(TRACKER_NAMES), n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append(f"[train] report_to: {n!r} is not one of none, {', '.join(TRACKER_NAMES)}{hint}")
    if "none" in items and len(items) > 1:
        problems.append('[train] report_to: "none" with other trackers; list only the trackers to use')
    return problems


def cross_checks(r) -> list[str]:
    """Rules that involve more than one key, of a `Recipe` whose every key has been checked alone."""
    problems = []
    t = r.train
    if r.export.dtype in GGUF_QUANTS and "merged" in r.export.formats:
        problems.append(
            f'[export] dtype = {r.export.dtype!r} is a GGUF quantisation, but formats holds "merged": '
            'a merged model is 16- or 32-bit; use dtype = "bf16" (and `fastsft export RUN --format gguf '
            f"--dtype {r.export.dtype}` for the quantised file)"
        )
    if t.max_steps == 0:
        problems.append(
            "[train] max_steps = 0 trains nothing: use a positive number, or -1 to train num_train_epochs"
        )
    if t.max_steps > 0 and t.warmup_steps >= t.max_steps:
        problems.append(
            f"[train] warmup_steps = {t.warmup_steps} is not shorter than the run (max_steps = {t.max_steps}): "
            f"the learning rate would stay below learning_rate = {t.learning_rate:g} (at most "
            f"{t.learning_rate * t.max_steps / t.warmup_steps:.2g}) for the whole run. Use warmup_steps below "
            f"max_steps (e.g. {max(t.max_steps // 10, 1) if t.max_steps > 1 else 0}), or warmup_ratio"
        )
    if t.eval_strategy != "no" and not (r.data.eval or r.data.val_ratio > 0):
        problems.append(
            f"[train] eval_strategy = {t.eval_strategy!r} needs evaluation data: set [data] eval or [data] val_ratio"
        )
    if t.load_best_model_at_end:
        if t.eval_strategy == "no":
            problems.append('[train] load_best_model_at_end = true needs eval_strategy = "steps" or "epoch"')
        elif t.save_strategy != t.eval_strategy:
            problems.append(
                "[train] load_best_model_at_end = true needs save_strategy equal to eval_strategy "
                f"(now {t.save_strategy!r} and {t.eval_strategy!r})"
            )
    if t.eval_strategy == "steps" and t.eval_steps is None:
        problems.append('[train] eval_strategy = "steps" needs eval_steps')
    m = r.model
    if not m.name.strip():
        problems.append(
            f"[model] name = {m.name!r} is empty: give a hub name (mistralai/Mistral-7B-Instruct-v0.3), a local "
            'folder, a .gguf file or a built-in model ("builtin:tiny-mistral")'
        )
    if m.load_in_4bit and m.load_in_8bit:
        problems.append(
            "[model] load_in_4bit and load_in_8bit are both true: a base is loaded one way. Set one of them to false."
        )
    if t.method == "full":
        for name in ("load_in_4bit", "load_in_8bit"):
            if getattr(m, name):
                problems.append(
                    f'[model] {name} = true with [train] method = "full": quantised weights cannot be trained, '
                    f"only an adapter on them. Set [model] {name} = false (the model trains in [model] dtype; "
                    'an 8-bit optimizer, optim = "adamw_8bit", saves most of the memory), or use method = "lora".'
                )
        if r.lora.use_dora:
            problems.append(
                '[lora] use_dora = true with [train] method = "full": DoRA is an adapter; '
                'use method = "lora" for DoRA, or drop use_dora'
            )
        if r.lora.modules_to_save:
            problems.append(
                '[lora] modules_to_save with [train] method = "full": every module trains and is saved '
                "already; drop modules_to_save"
            )
    problems += check_sources(r.data.as_dict(), DATA_FORMATS)
    problems += check_early_stopping(r.train.as_dict(), r.data.as_dict())
    problems += check_report_to(r.train.as_dict())
    if r.loss.label_smoothing >= 1:
        problems.append(f"[loss] label_smoothing = {r.loss.label_smoothing}: must be < 1")
    # an unsloth model with the stock loss is allowed: it is the comparison row of the benchmarks
    if r.loss.kernel == "unsloth" and r.model.backend == "transformers":
        problems.append(
            '[loss] kernel = "unsloth" needs [model] backend = "unsloth" (or "auto" on a CUDA GPU)'
        )
    return problems
