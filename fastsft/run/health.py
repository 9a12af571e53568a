"""Training health: what the loss curves say, with the SFT write-ups' advice and the recipe keys to turn.

`diagnose(rows)` is a pure function over the metrics history (the rows of metrics.jsonl: `loss`,
`grad_norm`, `eval_loss` by `step`) and the template compliance the report measures; it returns the
findings, each with what was seen (numbers) and what to change. `callbacks.HealthWatch` runs it on every log
during training and prints each new kind of finding once; the report lists them at the end.

The diagnoses:
- overfitting: the held-out loss rose over the last evaluations while the train loss fell;
- memorisation: the train loss is near zero while the held-out loss is far above it;
- no learning: the train loss stayed flat;
- spike: a train loss far above the running median of the ones before it (instability), beyond what the
  step's few trained tokens explain and not one of the run's recurring blips;
- gradient spike: a gradient norm far above its running median, with the same allowances;
- non-finite: a NaN or infinite loss or gradient norm (metrics.jsonl writes them as null);
- compliance falling: fewer answers stop on the end-of-turn token after training than before.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

# Thresholds, with the reason for each.
OVERFIT_EVALS = 3  # evaluations in a row with a rising held-out loss (two rises: not one noisy eval)
OVERFIT_RISE = 0.01  # the last of them at least 1% above the best held-out loss
MEMORISED_TRAIN = 0.05  # mean CE per token: the model reproduces its training answers almost exactly
MEMORISED_GAP = 1.0  # held-out loss this much above: it does not generalise
FLAT_MIN_LOGS = 8  # logged train losses before "no learning" can be judged
FLAT_DROP = 0.02  # the last quarter's mean fell less than 2% below the first quarter's
SPIKE_RATIO = 3.0  # a train loss this many times the running median of the ones before it
GRAD_SPIKE_RATIO = 10.0  # gradient norms vary more than losses
RUNNING = 20  # the running median covers this many earlier logs
# The run's own noise. A batch with few trained tokens (a classification answer: 1-2 tokens per
# example) moves its mean loss by a whole token's loss when one answer is wrong: at 16 trained tokens a
# step, one confidently wrong token (~5 nats) lifts the step's loss by 0.3 over a median of 0.03, 10x.
SPIKE_NATS = 20.0  # a loss spike must add this many nats over the batch ((value - median) x trained
# tokens per step): more than a few wrong tokens can, so one unlucky batch is not a spike
GRAD_REF_TOKENS = 256  # gradient norms of steps with fewer trained tokens than this are noisier: the
# gradient-spike ratio grows as sqrt(GRAD_REF_TOKENS / tokens) below it (sampling noise ~ 1/sqrt(n))
RECURRING = 3  # spikes this many times of about the same height (within 2x), each followed by a
# return to the median, are the run's own noise, not instability: only a larger one is a finding
MIN_HISTORY = 5  # logs before a spike can be judged
LIVE_TRAIN_LOGS = 200  # train logs the live check looks at (all evaluations are kept)

ADVICE = {
    "overfitting": (
        "train less or regularise: lower [train] num_train_epochs (or max_steps), lower learning_rate, add "
        "data, set [lora] lora_dropout = 0.05-0.1 and [train] weight_decay = 0.01-0.1, or stop early: "
        "[train] early_stopping_patience = 2 with load_best_model_at_end = true"
    ),
    "memorisation": (
        "the model recites its training answers: fewer [train] num_train_epochs / max_steps, more (or more "
        "varied) data, [lora] lora_dropout = 0.1, a lower [lora] r, or mix ~20% general data in with "
        "[[data.sources]]"
    ),
    "no_learning": (
        "raise [train] learning_rate (LoRA typically 1e-4 to 2e-4, x10 for tiny models), shorten warmup_ratio / "
        'warmup_steps, use [lora] target_modules = "all-linear" and a larger r, and check with `fastsft data '
        "preview` that the answers carry loss"
    ),
    "spike": (
        "lower [train] learning_rate, lengthen warmup_ratio / warmup_steps, keep max_grad_norm = 1.0, raise "
        'gradient_accumulation_steps for larger batches, and prefer [model] dtype = "bf16" to fp16'
    ),
    "grad_spike": (
        "lower [train] learning_rate or max_grad_norm (clipping), lengthen the warm-up, and look for unusual "
        "rows (very long examples: [data] max_length)"
    ),
    "nonfinite": (
        'lower [train] learning_rate, use [model] dtype = "bf16" (fp16 overflows), keep max_grad_norm = 1.0; '
        "[train] max_nonfinite_steps lets a run skip a few bad steps"
    ),
    "compliance": (
        "the model stops less often on its end-of-turn token: check with `fastsft data preview` that the "
        "end-of-turn token carries loss and that [data] chat_template is the model's; train less (lower "
        "learning_rate / num_train_epochs), and mix general chat data in with [[data.sources]]"
    ),
}

TITLES = {
    "overfitting": "overfitting",
    "memorisation": "memorisation",
    "no_learning": "no learning",
    "spike": "loss spike",
    "grad_spike": "gradient spike",
    "nonfinite": "non-finite loss",
    "compliance": "template compliance falling",
}


@dataclass(frozen=True)
class Finding:
    kind: str  # a key of ADVICE
    step: int  # where it was seen (the last step of the evidence)
    seen: str  # what the numbers show
    advice: str

    @property
    def title(self) -> str:
        return TITLES[self.kind]

    def line(self) -> str:
        return f"{self.title} at step {self.step}: {self.seen}. Fix: {self.advice}"

    def as_dict(self) -> dict:
        return {"title": self.title, **asdict(self)}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _finding(kind: str, step: int, seen: str) -> Finding:
    return Finding(kind, int(step), seen, ADVICE[kind])


def diagnose(rows: list[dict], *, compliance: dict | None = None) -> list[Finding]:
    """The findings of a metrics history, at most one per kind (the latest evidence).

    rows: metrics.jsonl rows in order; a train row has `loss` (and usually `grad_norm`), an eval row
    `eval_loss`; a non-finite value is None (null). compliance: {"base", "fine_tuned", "n"} shares."""
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r and _finite(r["eval_loss"])]
    losses = [(r["step"], r["loss"]) for r in train if _finite(r.get("loss"))]
    found = [
        _nonfinite(train),
        _overfitting(evals, losses),
        _memorisation(evals, losses),
        _no_learning(losses),
        *_spikes(train),
        _compliance_fell(compliance or {}, train),
    ]
    return [f for f in found if f is not None]


def _train_near(losses: list[tuple[int, float]], step: int, k: int = 5) -> float | None:
    """Mean of the last k train losses logged at or before `step`."""
    xs = [v for s, v in losses if s <= step][-k:]
    return sum(xs) / len(xs) if xs else None


def _nonfinite(train: list[dict]) -> Finding | None:
    bad = [
        r for r in train if not _finite(r.get("loss")) or ("grad_norm" in r and not _finite(r["grad_norm"]))
    ]
    if not bad:
        return None
    return _finding(
        "nonfinite", bad[-1]["step"], f"{len(bad)} logged step(s) with a NaN/inf loss or gradient norm"
    )


def _overfitting(evals: list[dict], losses: list[tuple[int, float]]) -> Finding | None:
    """OVERFIT_EVALS held-out losses in a row rise while the train loss over them falls; the first such
    window is where it began (a later dip of the held-out loss does not undo it)."""
    for i in range(len(evals) - OVERFIT_EVALS + 1):
        window = evals[i : i + OVERFIT_EVALS]
        e = [r["eval_loss"] for r in window]
        best = min(r["eval_loss"] for r in evals[: i + OVERFIT_EVALS])
        t0, t1 = _train_near(losses, window[0]["step"]), _train_near(losses, window[-1]["step"])
        rising = all(b > a for a, b in zip(e, e[1:], strict=False)) and e[-1] > best * (1 + OVERFIT_RISE)
        if rising and t0 is not None and t1 is not None and t1 < t0:
            end = evals[-1]
            return _finding(
                "overfitting",
                window[-1]["step"],
                f"held-out loss rose {e[0]:.4f} -> {e[-1]:.4f} over {OVERFIT_EVALS} evaluations (steps "
                f"{window[0]['step']}-{window[-1]['step']}; best {best:.4f}) while the train loss fell {t0:.4f} -> "
                f"{t1:.4f}; at the end (step {end['step']}) held-out {end['eval_loss']:.4f}",
            )
    return None


def _memorisation(evals: list[dict], losses: list[tuple[int, float]]) -> Finding | None:
    """Train loss near zero, held-out loss far above."""
    if not (evals and losses):
        return None
    last_eval = evals[-1]
    t = _train_near(losses, last_eval["step"])
    if t is not None and t < MEMORISED_TRAIN and last_eval["eval_loss"] - t > MEMORISED_GAP:
        return _finding(
            "memorisation",
            last_eval["step"],
            f"train loss {t:.4f} (near zero) but held-out loss {last_eval['eval_loss']:.4f}",
        )
    return None


def _no_learning(losses: list[tuple[int, float]]) -> Finding | None:
    """A flat train loss."""
    if len(losses) < FLAT_MIN_LOGS:
        return None
    q = max(2, len(losses) // 4)
    first = sum(v for _, v in losses[:q]) / q
    last = sum(v for _, v in losses[-q:]) / q
    if first > MEMORISED_TRAIN and last > first * (1 - FLAT_DROP):
        return _finding(
            "no_learning",
            losses[-1][0],
            f"train loss {first:.4f} over the first {q} logs and {last:.4f} over the last {q}: "
            f"it fell less than {FLAT_DROP:.0%}",
        )
    return None


def _tokens_per_step(train: list[dict]) -> float | None:
    """The median trained tokens per optimizer step (metrics.jsonl's `trained_tokens_per_step`), if logged."""
    xs = [r["trained_tokens_per_step"] for r in train if _finite(r.get("trained_tokens_per_step"))]
    return statistics.median(xs) if xs else None


def _spikes(train: list[dict]) -> list[Finding]:
    """A value far above the running median of the ones before it (train loss, gradient norm), beyond the
    run's own noise: for the loss, more summed nats over the step's trained tokens than a few wrong
    tokens add (SPIKE_NATS); for the gradient norm, a ratio that grows when few tokens are trained; and
    for both, not one of RECURRING blips of one height that the run came back from."""
    tokens = _tokens_per_step(train)
    grad_ratio = GRAD_SPIKE_RATIO * (
        math.sqrt(GRAD_REF_TOKENS / tokens) if tokens and tokens < GRAD_REF_TOKENS else 1
    )
    found = []
    for kind, key, ratio in (("spike", "loss", SPIKE_RATIO), ("grad_spike", "grad_norm", grad_ratio)):
        series = [(r["step"], r[key]) for r in train if _finite(r.get(key))]
        spikes = []  # (index, step, value, median)
        for i in range(MIN_HISTORY, len(series)):
            med = statistics.median(v for _, v in series[max(0, i - RUNNING) : i])
            v = series[i][1]
            if med <= 0 or v <= ratio * med:
                continue
            if key == "loss" and tokens and (v - med) * tokens < SPIKE_NATS:
                continue  # a few wrong tokens in a small batch: noise
            spikes.append((i, series[i][0], v, med))
        worst = _beyond_recurring(spikes, series, ratio)
        if worst:
            _, step, v, med = worst
            what = "train loss" if key == "loss" else "gradient norm"
            seen = f"{what} {v:.4g}, {v / med:.1f}x the running median {med:.4g}"
            if tokens:
                seen += f" ({tokens:.0f} trained tokens per step)"
            found.append(_finding(kind, step, seen))
    return found


def _beyond_recurring(spikes: list[tuple], series: list[tuple], ratio: float):
    """The latest spike that is not the run's recurring noise, or None. A spike is recurring noise when
    at least RECURRING spikes (itself included) are within 2x of its height over the median and the run
    came back below the threshold after each (a divergence stays up); a spike twice the recurring
    height is a finding still."""

    def recovered(i: int, med: float) -> bool:
        return i + 1 >= len(series) or series[i + 1][1] <= ratio * med

    worst = None
    for s in spikes:
        i, _, v, med = s
        height = v / med
        similar = [t for t in spikes if 0.5 <= (t[2] / t[3]) / height <= 2.0 and recovered(t[0], t[3])]
        if len(similar) >= RECURRING and recovered(i, med):
            continue
        worst = s
    return worst


def _compliance_fell(c: dict, train: list[dict]) -> Finding | None:
    """Template compliance lower after training than before."""
    if not c.get("n") or c.get("base") is None or c.get("fine_tuned") is None or c["fine_tuned"] >= c["base"]:
        return None
    return _finding(
        "compliance",
        train[-1]["step"] if train else 0,
        f"answers that stop on the end-of-turn token fell from {c['base']:.0%} (base model) to "
        f"{c['fine_tuned']:.0%} (fine-tuned), of {c['n']} prompts",
    )


def early_stopping_callback(recipe):
    """transformers' EarlyStoppingCallback for `[train] early_stopping_patience`, or None."""
    t = recipe.train
    if t.early_stopping_patience is None:
        return None
    from transformers import EarlyStoppingCallback

    return EarlyStoppingCallback(
        early_stopping_patience=t.early_stopping_patience, early_stopping_threshold=t.early_stopping_threshold
    )


def log_row(step: int, logs: dict) -> dict | None:
    """The numbers of one Trainer log that the diagnosis reads, as a history row ({"step": ..., "loss": ...};
    a non-finite value as None), or None when the log has none of them. (callbacks.HealthWatch keeps them.)"""
    row = {"step": step}
    for k in ("loss", "grad_norm", "eval_loss", "trained_tokens_per_step"):
        if k in logs:
            v = logs[k]
            row[k] = float(v) if _finite(v) else None
    return row if len(row) > 1 else None
