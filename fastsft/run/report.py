"""report.md and loss.png at the end of a run."""

from __future__ import annotations

import io

from fastsft.chat.scoring import confusion_rows, summary_line
from fastsft.errors import RunDirError
from fastsft.rundir import LOSS_PNG, REPORT, RUN_JSON, RunDir


def plot_loss(run: RunDir) -> bool:
    """Writes loss.png (train loss, and eval loss when there is one). False when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run.read_metrics()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=False), label="train loss", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals, strict=False), "o-", label="eval loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean CE per supervised token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    run.write_bytes(LOSS_PNG, buf.getvalue())  # atomic, never through a symlink
    return True


SMOOTH_LOGS = 5  # the headline train loss is the median of this many logged losses (one step is noise)


def smoothed_loss(train: list[dict], *, first: bool = False) -> float | None:
    """The median of the first (or last) SMOOTH_LOGS finite train losses: one spiky step (a batch of
    few trained tokens) does not become the run's headline."""
    import math
    import statistics

    xs = [r["loss"] for r in train if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    xs = xs[:SMOOTH_LOGS] if first else xs[-SMOOTH_LOGS:]
    return statistics.median(xs) if xs else None


def _loss_row(train: list[dict]) -> str:
    """The first logged loss as it was (a run that starts high and falls in its first log shows it), then
    the smoothed first and last."""
    first = train[0] if train else {}
    raw = f"{_fmt(first.get('loss'))} (step {first.get('step', '-')})"
    return (
        f"| train loss, smoothed (median of {SMOOTH_LOGS} logs): first / last; first logged (raw) | "
        f"{_fmt(smoothed_loss(train, first=True))} / {_fmt(smoothed_loss(train))}; {raw} |"
    )


def _fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def write_report(run: RunDir, summary: dict) -> None:
    """summary: the dict `train.run` builds (recipe name, backend, loss route, metrics, samples)."""
    has_plot = plot_loss(run)
    rows = run.read_metrics()
    lines = [f"# fastsft run: {summary.get('name', run.path.name)}", ""]
    lines += _summary_table(summary, rows)
    lines.append("")
    if has_plot:
        lines += ["![loss curve](loss.png)", ""]
    lines += _fit_section(_run_json(run).get("fit"))
    lines += _health_section(summary) + _task_section(summary) + _samples_section(summary)
    lines += _files_section(summary)
    run.write_text(REPORT, "\n".join(lines))


def _summary_table(summary: dict, rows: list[dict]) -> list[str]:
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    lines = [
        "| | |",
        "|---|---|",
        f"| model | `{summary['model']}` |",
        f"| backend | {summary['backend']} ({summary['backend_reason']}) |",
        f"| precision | {summary['dtype']}{', 4-bit NF4 base' if summary.get('load_in_4bit') else ''} |",
        f"| loss | {summary['loss']['implementation']} |",
        f"| device | {summary['device']} |",
        f"| steps | {summary.get('global_step', '-')} |",
        f"| train time | {_fmt(summary.get('train_seconds'), '.1f')} s |",
        f"| tokens/s | {_fmt(summary.get('tokens_per_s'), '.0f')} |",
        f"| peak memory | {_fmt(summary.get('peak_mem_gib'), '.2f')} GiB ({summary.get('mem_kind', '')}) |",
        _loss_row(train),
    ]
    task = summary.get("task") or {}
    if task.get("after"):
        lines.append(
            f"| task metric (held-out answers against the expected ones) | base model "
            f"{summary_line(task.get('before') or {})} → fine-tuned {summary_line(task['after'])} |"
        )
    if evals:
        import math

        first, last = evals[0], evals[-1]
        ppl = lambda x: math.exp(min(x, 50.0))  # noqa: E731
        what = "base model" if first.get("step") == 0 else f"step {first.get('step')}"
        lines.append(
            f"| held-out loss (perplexity) | {what} {_fmt(first['eval_loss'])} ({_fmt(ppl(first['eval_loss']), '.1f')})"
            f" → fine-tuned {_fmt(last['eval_loss'])} ({_fmt(ppl(last['eval_loss']), '.1f')}) |"
        )
    comp = summary.get("compliance") or {}
    if comp.get("n"):
        base = "-" if comp.get("base") is None else f"{comp['base']:.0%}"
        task_n = ((task.get("after") or {}).get("n")) if task else None
        why = (
            f"; the task metric scores {task_n} held-out answers, this only the sample prompts"
            if task_n and task_n != comp["n"]
            else ""
        )
        lines.append(
            f"| template compliance (answers that stop on the end-of-turn token, no invented turns) | "
            f"base model {base} → fine-tuned {comp['fine_tuned']:.0%} (of {comp['n']}: the sample prompts "
            f"answered below{why}) |"
        )
    retain = summary.get("retain")
    if retain:
        lines.append(_retain_row(retain))
    early = summary.get("early_stopping")
    if early:
        what = (
            f"stopped at step {summary.get('global_step')} of {early.get('max_steps')}"
            if early.get("stopped_early")
            else "did not trigger"
        )
        lines.append(
            f"| early stopping (patience {early.get('patience')}) | {what}; best {_fmt(early.get('best_metric'))} |"
        )
    data = summary.get("data") or {}
    if data:
        lines.append(f"| data | {data.get('summary', '')} |")
    return lines


KNEW_NOTHING = 0.8  # a retain loss above this share of ln(V) (a uniform guess) is a base that knew nothing


def _retain_row(retain: dict) -> str:
    """Before -> after on the retain set; "forgetting" only where the base had something to forget: a base
    whose loss was near a uniform guess over the vocabulary (ln V: random weights) knew nothing of the set."""
    before, delta, uniform = retain.get("before"), retain.get("delta"), retain.get("uniform")
    if before is not None and uniform and before >= KNEW_NOTHING * uniform:
        verdict = (
            f" (the base knew nothing of the retain set: its loss {before:.2f} is no better than a uniform guess "
            f"over the vocabulary, ln V = {uniform:.2f}; no forgetting is measured)"
        )
    else:
        verdict = "" if delta is None else (" (forgetting)" if delta > 0 else " (no forgetting)")
    return (
        f"| retain loss (forgetting: {retain.get('source') or '[data] retain'}, {retain.get('tokens')} tokens) | "
        f"before {_fmt(before)} → after {_fmt(retain.get('after'))}, Δ {_fmt(delta, '+.4f')}{verdict} |"
    )


def _run_json(run: RunDir) -> dict:
    try:
        return run.read_json(RUN_JSON)
    except RunDirError:  # a report written without run.json (a test's bare folder): no plan to show
        return {}


def _fit_section(fit: dict | None) -> list[str]:
    """[train] fit: what the plan changed and why, its peak beside the real one (run.json's `fit`)."""
    if not fit:
        return []
    lines = ["## Memory plan", ""]
    mode = fit.get("mode", "auto")
    lines.append(
        f'`[train] fit = "{mode}"`: one step of {fit.get("seq_len", 0):,} tokens planned at '
        f"{_fmt(fit.get('planned_peak_gib'), '.2f')} GiB of {_fmt(fit.get('budget_gib'), '.2f')} GiB free "
        f"(margin {_fmt(fit.get('margin_gib'), '.2f')} GiB; simulated by fastsft plan)."
    )
    changes = fit.get("changes") or []
    if changes:
        lines += ["", "| changed | from | to | why | planned peak GiB |", "|---|---|---|---|---|"]
        lines += [
            f"| `{c['key']}` | {c['from']} | {c['to']} | {c['why']} | {_fmt(c.get('peak_gib'), '.2f')} |"
            for c in changes
        ]
        if fit.get("gradient_accumulation_steps"):
            lines.append(
                f"| `train.gradient_accumulation_steps` | | {fit['gradient_accumulation_steps']} | "
                "the same effective batch | |"
            )
    elif mode == "auto":
        lines += ["", "Nothing changed: the recipe fits as written."]
    if fit.get("measured_reserved_gib") is not None:
        lines += [
            "",
            f"Plan against the real step: {fit['planned_reserved_gib']:.2f} GiB planned, "
            f"{fit['measured_reserved_gib']:.2f} GiB reserved after the first optimizer steps "
            f"(torch.cuda.max_memory_reserved; {fit['measured_over_planned']:.3f} of the plan).",
        ]
        if fit.get("warning"):
            lines += ["", f"**Warning:** {fit['warning']}."]
    return lines + [""]


def _health_section(summary: dict) -> list[str]:
    lines: list[str] = []
    if "health" in summary:
        lines += ["## Training health", ""]
        findings = summary.get("health") or []
        if not findings:
            lines += [
                "No overfitting, memorisation, flat loss, spikes, non-finite values or falling template "
                "compliance found in the metrics.",
                "",
            ]
        for f in findings:
            lines += [f"- **{f['title']}** (step {f['step']}): {f['seen']}. *Fix:* {f['advice']}."]
        lines.append("")
    return lines


def _task_section(summary: dict) -> list[str]:
    """The held-out answers' confusion table (a classification task), base model and fine-tuned."""
    task = summary.get("task") or {}
    lines: list[str] = []
    for when in ("before", "after"):
        c = (task.get(when) or {}).get("classes")
        if not c or not c.get("n"):
            continue
        if not lines:
            lines += ["## Task metric: confusion on the held-out split", ""]
        rows = confusion_rows(c)
        lines += [
            f"{'Base model' if when == 'before' else 'Fine-tuned'} (rows: expected, columns: answered):",
            "",
        ]
        lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]] + [""]
    return lines


def _samples_section(summary: dict) -> list[str]:
    lines: list[str] = []
    samples = summary.get("samples") or []
    if samples:
        lines += ["## Answers before and after", ""]
        if summary.get("samples_source"):
            lines += [f"Prompts: {summary['samples_source']}.", ""]
        lines += ["| prompt | base model | fine-tuned |", "|---|---|---|"]
        for s in samples:
            cells = [s["prompt"], s["before"], s["after"]]
            cells = [c.replace("|", "\\|").replace("\n", " ") for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    elif summary.get("samples_skipped"):
        lines += [
            "## Answers before and after",
            "",
            summary["samples_skipped"][0].upper() + summary["samples_skipped"][1:] + ".",
            "",
        ]
    return lines


def _files_section(summary: dict) -> list[str]:
    weights = (
        "`model/`: the whole fine-tuned model and tokenizer."
        if summary.get("method") == "full"
        else "`adapter/`: the LoRA adapter and tokenizer."
    )
    return [
        "## Files",
        "",
        "- `recipe.toml`: the resolved recipe; `run.json`: versions, device, data fingerprint;",
        f"- `metrics.jsonl`: one line per logged step; {weights}",
        "",
    ]
