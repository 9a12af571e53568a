"""`fastsft eval` and `fastsft generate --data` on a tiny trained run: the task metric (greedy answers
against the data's) rises from the base model to the fine-tuned one, in eval.json, the terminal and
the report; a file of prompts is answered in batches."""

import json

import pytest
from click.testing import CliRunner

from fastsft.cli.main import main

from _tiny import DEMO, tiny_recipe, write_recipe

STEPS = 120

pytestmark = pytest.mark.slow  # every test reads `taught`: a 120-step run, 32 s


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A tiny run that learns 8 of the demo answers (held out = 8 training rows, so 120 steps suffice)."""
    root = tmp_path_factory.mktemp("taught")
    rows = DEMO.read_text(encoding="utf-8").splitlines()
    held = root / "held.jsonl"
    held.write_text("\n".join(rows[:8]) + "\n", encoding="utf-8")
    recipe = write_recipe(
        root / "r.toml",
        # a larger adapter on every linear layer and batches of 8: the tiny model has to learn 8 answers
        tiny_recipe(
            lora={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
            data={"eval": held},
            train={"max_steps": STEPS, "per_device_train_batch_size": 8, "logging_steps": 20},
        ),
    )
    out = root / "run"
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, held


def test_the_report_shows_the_task_metric_rising(taught):
    out, _ = taught
    task = json.loads((out / "run.json").read_text())["result"]["task"]
    assert task["before"]["n"] == task["after"]["n"] == 8
    assert task["before"]["exact_count"] < task["after"]["exact_count"]
    text = (out / "report.md").read_text()
    assert "task metric" in text and f"exact {task['after']['exact_count']}/8" in text
    assert "train loss, smoothed" in text


def test_eval_scores_answers_before_and_after(taught, tiny_model_dir, tmp_path):
    out, held = taught
    runner = CliRunner()
    base = runner.invoke(
        main,
        [
            "eval",
            str(tiny_model_dir),
            "--data",
            str(held),
            "--batch-size",
            "3",
            "--json-out",
            str(tmp_path / "b.json"),
        ],
    )
    assert base.exit_code == 0, base.output
    tuned = runner.invoke(main, ["eval", str(out), "--data", str(held), "--batch-size", "3"])
    assert tuned.exit_code == 0, tuned.output
    b = json.loads((tmp_path / "b.json").read_text())
    t = json.loads((out / "eval.json").read_text())
    assert b["generated"] == t["generated"] == 8
    assert b["task"]["exact_count"] < t["task"]["exact_count"]
    assert t["task"]["normalised_count"] >= t["task"]["exact_count"]
    assert "exact match (8 greedy answers)" in tuned.output and "answering" in tuned.output
    s = t["samples"][0]
    assert s["expected"] == json.loads(held.read_text().splitlines()[0])["messages"][1]["content"]


def test_generate_answers_a_file_in_batches(taught, tmp_path):
    out, held = taught
    prompts = tmp_path / "p.jsonl"
    rows = [json.loads(line) for line in held.read_text().splitlines()]
    prompts.write_text(
        "\n".join(
            [json.dumps({"prompt": rows[0]["messages"][0]["content"], "id": 1})]
            + [json.dumps(r) for r in rows[1:4]]
        )
        + "\n"
    )
    answers = tmp_path / "a.jsonl"
    args = ["generate", str(out), "--data", str(prompts), "-o", str(answers), "--max-new-tokens", "16"]
    result = CliRunner().invoke(main, [*args, "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(got) == 4 and got[0]["id"] == 1 and all("answer" in g and "stopped" in g for g in got)
    # batched == one at a time is tests/chat/test_scoring.py's, in one process state; here, after other
    # tests changed torch's thread count, a 1-ulp matmul difference can flip a greedy token of this
    # barely trained model, so the CLI test checks the rows and their order, not the tokens
    assert [g.get("id") for g in got[:1]] == [1] and all(isinstance(g["answer"], str) for g in got)


def test_generate_data_errors_name_the_line(taught, tmp_path):
    out, _ = taught
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"nothing": 1}\n')
    result = CliRunner().invoke(
        main, ["generate", str(out), "--data", str(bad), "-o", str(tmp_path / "o.jsonl")]
    )
    assert result.exit_code == 2 and "bad.jsonl line 2" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["generate", str(out), "--data", str(bad)])
    assert result.exit_code == 2 and "-o OUT.jsonl" in result.output
