"""Training health: `health.diagnose` on synthetic histories (one per diagnosis, and healthy ones that
must stay quiet), a planted overfit diagnosed live and in the report, and early stopping that stops a
run before max_steps."""

import io
import json
import math
import random

import pytest
from rich.console import Console

from fastsft import recipe as R
from fastsft.errors import RecipeError
from fastsft.run import health, train

from _tiny import TINY_RECIPE

pytestmark = pytest.mark.filterwarnings("ignore")


def history(train_losses, evals=(), grad_norms=None, every=1):
    """metrics.jsonl rows: a train row per loss (step = i * every), eval rows {step: loss}."""
    rows = []
    for i, loss in enumerate(train_losses, start=1):
        row = {"step": i * every, "loss": loss}
        if grad_norms is not None:
            row["grad_norm"] = grad_norms[i - 1]
        rows.append(row)
    rows += [{"step": s, "eval_loss": v} for s, v in evals]
    return sorted(rows, key=lambda r: r["step"])


def kinds(rows, **kw):
    return {f.kind for f in health.diagnose(rows, **kw)}


def falling(n, start=3.0, end=1.0, noise=0.02, seed=0):
    rng = random.Random(seed)
    return [start + (end - start) * i / (n - 1) + rng.uniform(-noise, noise) for i in range(n)]


def test_a_healthy_run_has_no_finding():
    rows = history(
        falling(60),
        evals=[(0, 3.2), (20, 2.2), (40, 1.7), (60, 1.5)],
        grad_norms=[1.0 + 0.1 * math.sin(i) for i in range(60)],
    )
    assert health.diagnose(rows, compliance={"base": 0.0, "fine_tuned": 1.0, "n": 3}) == []


def test_overfitting_rising_eval_while_train_falls():
    rows = history(falling(60, 3.0, 0.5), evals=[(0, 3.1), (15, 2.0), (30, 2.1), (45, 2.3), (60, 2.6)])
    (f,) = health.diagnose(rows)
    assert f.kind == "overfitting" and f.step == 45
    assert (
        "2.0000 -> 2.3000" in f.seen and "early_stopping_patience" in f.advice and "lora_dropout" in f.advice
    )
    # the held-out loss rising with the train loss rising too is not overfitting (it is instability)
    assert "overfitting" not in kinds(history(falling(60, 1.0, 3.0), evals=[(15, 2.0), (30, 2.1), (45, 2.3)]))
    # one noisy evaluation up is not a trend
    assert "overfitting" not in kinds(
        history(falling(60, 3.0, 0.5), evals=[(15, 2.0), (30, 2.1), (45, 1.9), (60, 2.0)])
    )


def test_memorisation_train_near_zero_eval_far_above():
    decay = [2.0 * 0.8**i for i in range(40)]  # ends near 0.0003
    rows = history(decay, evals=[(40, 3.5)])
    f = next(f for f in health.diagnose(rows) if f.kind == "memorisation")
    assert "held-out loss 3.5000" in f.seen and "[[data.sources]]" in f.advice
    assert "memorisation" not in kinds(history(decay, evals=[(40, 0.3)]))


def test_no_learning_flat_loss():
    rows = history([5.0 + 0.01 * ((-1) ** i) for i in range(30)])
    (f,) = health.diagnose(rows)
    assert f.kind == "no_learning" and "learning_rate" in f.advice
    assert kinds(history(falling(30, 5.0, 4.0, noise=0.0))) == set()  # 20% down is learning
    assert kinds(history([5.0] * 5)) == set()  # too short to judge


def test_spikes_in_loss_and_gradient_norm():
    losses = falling(40, 2.0, 1.0, noise=0.0)
    losses[30] = 8.0
    grads = [1.0] * 40
    grads[20] = 50.0
    found = {f.kind: f for f in health.diagnose(history(losses, grad_norms=grads))}
    assert set(found) == {"spike", "grad_spike"}
    assert found["spike"].step == 31 and "warmup" in found["spike"].advice
    assert found["grad_spike"].step == 21 and "50" in found["grad_spike"].seen


def test_non_finite_values():
    rows = history([2.0, 1.9, None, 1.8], grad_norms=[1.0, 1.0, None, 1.0])
    (f,) = health.diagnose(rows)
    assert f.kind == "nonfinite" and f.step == 3 and "bf16" in f.advice


def test_template_compliance_falling():
    rows = history(falling(20))
    f = next(f for f in health.diagnose(rows, compliance={"base": 1.0, "fine_tuned": 1 / 3, "n": 3}))
    assert f.kind == "compliance" and "100%" in f.seen and "33%" in f.seen and "data preview" in f.advice
    assert kinds(rows, compliance={"base": 1 / 3, "fine_tuned": 1.0, "n": 3}) == set()


# ----------------------------------------------------------------------------------------------
# A planted overfit and early stopping, on the tiny model
# ----------------------------------------------------------------------------------------------


def write_overfit_data(tmp_path):
    """4 training rows and 4 held-out rows whose answers are random words: the model first learns what
    such answers look like (held-out loss falls), then memorises the 4 (held-out loss rises)."""
    rng = random.Random(0)

    def row():
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))
        words = " ".join(
            [word] + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(5)]
        )
        return {
            "messages": [
                {"role": "user", "content": "Say the code."},
                {"role": "assistant", "content": words},
            ]
        }

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(4)))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(4)))


OVERFIT = [
    "lora.r=16",
    "lora.lora_alpha=32",
    "data.max_length=64",
    "train.learning_rate=1e-2",
    "train.lr_scheduler_type=constant",
    "train.logging_steps=1",
    "train.eval_strategy=steps",
    "train.eval_steps=5",
]


def overfit_recipe(tmp_path, *extra):
    write_overfit_data(tmp_path)
    p = tmp_path / "r.toml"
    p.write_text(TINY_RECIPE)
    data = [f'data.train="{tmp_path / "train.jsonl"}"', f'data.eval="{tmp_path / "eval.jsonl"}"']
    return R.load(p, data + OVERFIT + list(extra))


@pytest.mark.slow  # a long training run: 130 s
def test_a_planted_overfit_is_diagnosed_live_and_in_the_report(tmp_path):
    recipe = overfit_recipe(tmp_path, "train.max_steps=30")
    out = io.StringIO()
    result = train.run(recipe, output_dir=tmp_path / "run", console=Console(file=out, width=400))
    evals = [
        r["eval_loss"]
        for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
        if "eval_loss" in r
    ]
    assert min(evals) < evals[-1]  # the plant took: the held-out loss went up again
    found = {f["kind"]: f for f in result.summary["health"]}
    assert "overfitting" in found, (evals, result.summary["health"])
    assert "warning: training health: overfitting" in out.getvalue()  # live, once
    assert out.getvalue().count("training health: overfitting") == 1
    report = (result.run_dir / "report.md").read_text()
    assert (
        "## Training health" in report and "**overfitting**" in report and "early_stopping_patience" in report
    )
    stored = json.loads((result.run_dir / "run.json").read_text())["result"]["health"]
    assert any(f["kind"] == "overfitting" for f in stored)


@pytest.mark.slow  # a long training run: 20 s
def test_early_stopping_stops_before_max_steps(tmp_path):
    recipe = overfit_recipe(
        tmp_path,
        "train.max_steps=60",
        "train.early_stopping_patience=2",
        "train.load_best_model_at_end=true",
        "train.save_strategy=steps",
        "train.save_steps=5",
        "train.save_total_limit=2",
    )
    result = train.run(recipe, output_dir=tmp_path / "run", console=Console(file=io.StringIO()))
    early = result.summary["early_stopping"]
    assert result.summary["global_step"] < 60 and early["stopped_early"] and early["max_steps"] == 60
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    best = min(v for _, v in evals)
    # it stopped after `patience` evaluations without improving on the best
    assert [v for _, v in evals[-2:]] and all(v >= best for _, v in evals[-2:]) and evals[-3][1] == best
    assert early["best_metric"] == pytest.approx(best)
    assert "early stopping (patience 2) | stopped at step" in (result.run_dir / "report.md").read_text()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ([], "needs eval_strategy"),
        (
            ["train.eval_strategy=steps", "train.eval_steps=5", "data.val_ratio=0.1"],
            "load_best_model_at_end = true",
        ),
        (
            [
                "train.eval_strategy=steps",
                "train.eval_steps=4",
                "data.val_ratio=0.1",
                "train.load_best_model_at_end=true",
                "train.save_strategy=steps",
                "train.save_steps=10",
            ],
            "must be a multiple of eval_steps",
        ),
    ],
)
def test_early_stopping_without_what_it_needs_is_explained(tmp_path, extra, fragment):
    p = tmp_path / "r.toml"
    p.write_text(TINY_RECIPE)
    with pytest.raises(RecipeError) as e:
        R.load(p, ["train.early_stopping_patience=2", *extra])
    assert fragment in str(e.value) and "keeps the best checkpoint" in str(e.value)


# ----------------------------------------------------------------------------------------------
# The run of issue 29: a word-sentiment task at 98% accuracy, ~2 trained tokens per example
# ----------------------------------------------------------------------------------------------

SPIKE_STEPS = (25, 31, 83, 95, 100)


def replayed_sentiment_run(diverge_at=None):
    """metrics.jsonl of the run the issue describes: SmolLM2-135M taught a one-word answer (2 trained
    tokens per example, batch 8: 16 trained tokens a step), 100 steps logged each step. The loss falls
    from 2.4 to ~0.03 within 20 steps; at steps 25, 31, 83, 95 and the final one a batch holds a word
    the model gets wrong, and the step's loss is 0.32 (one token of ~5 nats over 16) with its gradient
    norm ~15x the median. With `diverge_at`, the run really diverges there: loss ~3 and gradient norm
    ~50 from then on."""
    rng = random.Random(29)
    rows = []
    for step in range(1, 101):
        loss = 0.03 + 2.37 * math.exp(-step / 4) + rng.uniform(0, 0.02)
        grad = 0.2 + 3.0 * math.exp(-step / 4) + rng.uniform(0, 0.05)
        if step in SPIKE_STEPS:
            loss, grad = 0.32, 3.2
        if diverge_at is not None and step >= diverge_at:
            loss, grad = 3.0 + rng.uniform(0, 0.3), 50.0 + rng.uniform(0, 5)
        rows.append({"step": step, "loss": loss, "grad_norm": grad, "trained_tokens_per_step": 16.0})
    return rows


def test_the_issue_run_gets_no_spike_warning():
    rows = replayed_sentiment_run()
    assert kinds(rows) == set()
    # the same blips without the token count: the recurring rule alone keeps the final one quiet
    bare = [{k: v for k, v in r.items() if k != "trained_tokens_per_step"} for r in rows]
    assert not any(f.step == 100 for f in health.diagnose(bare))
    # and the live check during training (callbacks.HealthWatch's diagnose over the rows so far) never warns
    for n in range(MIN := health.MIN_HISTORY + 1, len(rows) + 1):
        assert kinds(rows[:n]) == set(), n
    assert MIN > 1


def test_a_real_divergence_still_warns():
    found = {f.kind: f for f in health.diagnose(replayed_sentiment_run(diverge_at=90))}
    assert {"spike", "grad_spike"} <= set(found)
    assert found["spike"].step >= 90 and "16 trained tokens" in found["spike"].seen


def test_the_report_headline_loss_is_smoothed():
    from fastsft.run.report import smoothed_loss

    train = replayed_sentiment_run()
    assert train[-1]["loss"] == 0.32  # the final step is a blip
    last = smoothed_loss(train)
    assert last < 0.06  # the median of the last logs, not the blip
