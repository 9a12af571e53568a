"""Forgetting by default: without [data] retain, every run scores fastsft's shipped general set before
and after training, and the report shows it beside the task metric."""

import json

import pytest
from click.testing import CliRunner

from fastsft import recipe as R
from fastsft.cli.main import main
from fastsft.errors import DataError
from fastsft.run import retain

from _tiny import TINY_RECIPE, write_recipe


def test_the_shipped_general_set_is_there_with_its_licence():
    rows = [json.loads(line) for line in retain.DEFAULT.read_text(encoding="utf-8").splitlines()]
    assert 40 <= len(rows) <= 60 and all(r["messages"][1]["role"] == "assistant" for r in rows)
    readme = (retain.DEFAULT.parent / "README.md").read_text(encoding="utf-8")
    assert "Apache-2.0" in readme and "Source" in readme


@pytest.mark.slow  # a training run scored before and after: 23 s
def test_a_run_without_retain_scores_the_general_set(tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", TINY_RECIPE)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    r = json.loads((out / "run.json").read_text())["result"]["retain"]
    assert r["source"] == retain.DEFAULT_NAME and r["examples"] == 50 and r["tokens"] > 500
    assert r["before"] is not None and r["delta"] == r["after"] - r["before"]
    report = (out / "report.md").read_text()
    assert f"forgetting: {retain.DEFAULT_NAME}" in report
    assert "general set" in result.output
    # the health check's token count: trained tokens per optimizer step, logged with each train loss
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    counts = [r["trained_tokens_per_step"] for r in rows if "loss" in r]
    assert counts and all(0 < c < 4 * 96 for c in counts)


def test_an_empty_retain_file_is_named_as_data_retain(tmp_path, tok):
    """An empty retain file was reported as `data.train` (#28)."""
    (tmp_path / "empty.jsonl").write_text("")
    p = tmp_path / "r.toml"
    p.write_text(TINY_RECIPE.replace("[data]\n", '[data]\nretain = "empty.jsonl"\n'))
    with pytest.raises(DataError) as e:
        retain.encode(R.load(p), tok, log=lambda m: None)
    assert str(e.value).startswith("data.retain = ") and "empty.jsonl" in str(e.value)
    assert "data.train" not in str(e.value)
