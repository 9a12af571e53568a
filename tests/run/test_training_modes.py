"""One tiny run with the data and monitoring modes together: a [[data.sources]] mix, a [data] retain
set and report_to = "tensorboard". Checked by what each changes: the mix's counts in run.json, the retain
loss before and after (reported, and moved by training), and TensorBoard's event files holding exactly
the train and eval losses of metrics.jsonl. Also: a tracker whose package is missing is a recipe error
naming the pip command."""

import importlib.util
import io
import json

import pytest
from click.testing import CliRunner
from rich.console import Console

from fastsft import recipe as R
from fastsft.errors import RecipeError
from fastsft.run import train

from _tiny import DEMO, TINY_RECIPE, read_tensorboard

pytestmark = pytest.mark.filterwarnings("ignore")

ROWS = DEMO.read_text().splitlines()


def modes_recipe(tmp_path, *extra):
    (tmp_path / "task.jsonl").write_text("\n".join(ROWS[:48]) + "\n")
    (tmp_path / "general.jsonl").write_text("\n".join(ROWS[100:300]) + "\n")
    (tmp_path / "retain.jsonl").write_text("\n".join(ROWS[300:316]) + "\n")
    text = TINY_RECIPE.replace(f'train = "{DEMO}"\n', "").replace(
        "[data]\n", '[data]\nretain = "retain.jsonl"\nval_ratio = 0.1\n'
    )
    text += '\nreport_to = "tensorboard"\neval_strategy = "steps"\neval_steps = 3\n'
    text += '\n[[data.sources]]\npath = "task.jsonl"\nshare = 0.75\n[[data.sources]]\npath = "general.jsonl"\nshare = 0.25\n'
    p = tmp_path / "modes.toml"
    p.write_text(text)
    return R.load(p, list(extra))


@pytest.fixture(scope="module")
def modes_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("modes")
    result = train.run(modes_recipe(tmp), output_dir=tmp / "run", console=Console(file=io.StringIO()))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def test_the_mix_is_trained_and_recorded(modes_run):
    result, _ = modes_run
    data = json.loads((result.run_dir / "run.json").read_text())["data"]
    used = {m["path"].rsplit("/", 1)[-1]: m["used"] for m in data["mix"]}
    assert used == {"task.jsonl": 48, "general.jsonl": 16}  # 48 task rows are 75%
    # the val split comes out of the mix (copies of a held-out row leave training too: the demo repeats a few)
    assert data["eval_examples"] == 6 and 60 <= data["train_examples"] + data["eval_examples"] <= 64
    assert (
        "mix: task.jsonl 75% (48 of 48 rows), general.jsonl 25% (16 of 200 rows)"
        in (result.run_dir / "report.md").read_text()
    )


def test_the_retain_loss_is_reported_before_and_after(modes_run):
    result, rows = modes_run
    r = result.summary["retain"]
    assert r["before"] > r["after"] + 0.1  # trained on the same kind of data: the retain loss falls
    assert r["delta"] == pytest.approx(r["after"] - r["before"]) and r["tokens"] > 0 and r["examples"] == 16
    retain_rows = [x for x in rows if "retain_loss" in x]
    assert [x["step"] for x in retain_rows] == [0, result.summary["global_step"]]
    assert [x["retain_loss"] for x in retain_rows] == pytest.approx([r["before"], r["after"]])
    stored = json.loads((result.run_dir / "run.json").read_text())
    assert stored["result"]["retain"] == r and stored["retain_before"]["loss"] == r["before"]
    assert (
        f"before {r['before']:.4f} → after {r['after']:.4f}, Δ {r['delta']:+.4f}"
        in (result.run_dir / "report.md").read_text()
    )


def test_the_retain_loss_is_the_token_weighted_eval_loss(modes_run, tmp_path):
    """Scored as the trainer scores its eval set: with retain = the eval data, the retain loss before
    training equals the trainer's step-0 eval loss (eval_on_start)."""
    (tmp_path / "e.jsonl").write_text("\n".join(ROWS[300:310]) + "\n")
    p = tmp_path / "r.toml"
    p.write_text(
        TINY_RECIPE.replace(
            "[data]\n", f'[data]\neval = "{tmp_path / "e.jsonl"}"\nretain = "{tmp_path / "e.jsonl"}"\n'
        )
    )
    recipe = R.load(
        p,
        [
            "train.max_steps=1",
            "train.eval_strategy=steps",
            "train.eval_steps=1",
            "train.per_device_eval_batch_size=3",
        ],
    )
    result = train.run(recipe, output_dir=tmp_path / "run", console=Console(file=io.StringIO()))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    eval0 = next(x["eval_loss"] for x in rows if "eval_loss" in x and x["step"] == 0)
    assert result.summary["retain"]["before"] == pytest.approx(eval0, rel=1e-5)


def test_tensorboard_event_files_hold_the_logged_losses(modes_run):
    result, rows = modes_run
    scalars = read_tensorboard(result.run_dir / "tensorboard")
    train_rows = [(x["step"], x["loss"]) for x in rows if "loss" in x]
    eval_rows = [(x["step"], x["eval_loss"]) for x in rows if "eval_loss" in x]
    assert len(train_rows) == 6 and len(eval_rows) == 3  # steps 0, 3, 6
    for tag, want in (("train/loss", train_rows), ("eval/loss", eval_rows)):
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx(
            [v for _, v in want], rel=1e-6
        )  # float32 in the event file


def test_a_missing_tracker_package_names_the_pip_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    p = tmp_path / "r.toml"
    p.write_text(TINY_RECIPE + '\nreport_to = ["tensorboard", "wandb"]\n')
    recipe = R.load(p)
    with pytest.raises(RecipeError, match=r'report_to = "wandb": wandb is not installed: pip install wandb'):
        train.run(recipe, output_dir=tmp_path / "run", console=Console(file=io.StringIO()))
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
    from fastsft.cli.main import main

    out = CliRunner().invoke(main, ["validate", str(p)])
    assert out.exit_code == 2 and "pip install wandb" in out.output


def test_unknown_tracker_names_are_recipe_errors(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(TINY_RECIPE + '\nreport_to = "tensorbord"\n')
    with pytest.raises(RecipeError, match="did you mean `tensorboard`"):
        R.load(p)
