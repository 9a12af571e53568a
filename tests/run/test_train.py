"""End-to-end runs on the tiny model: what a run changes and writes, and how its loss is computed."""

import io
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fastsft import recipe as R
from fastsft.cli.main import main

from _launches import launch_counts, reset_launch_counts
from _tiny import DEMO, RECIPES, TINY_RECIPE, write_recipe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real `fastsft run` of the shipped tiny recipe, shortened."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    reset_launch_counts()
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(RECIPES / "tiny.toml"),
            "--set",
            "train.max_steps=30",
            "--set",
            "train.logging_steps=5",
            "--set",
            "train.eval_steps=15",
            "--set",
            "train.save_steps=15",
            "-o",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return out, result.output, dict(launch_counts)


def test_run_directory_holds_what_is_promised(tiny_run):
    out, _, _ = tiny_run
    for name in (
        "recipe.toml",
        "run.json",
        "metrics.jsonl",
        "report.md",
        "loss.png",
        "adapter/adapter_config.json",
    ):
        assert (out / name).exists(), name
    assert (out / "adapter" / "tokenizer.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-15",
        "checkpoint-30",
    ]
    # the stored recipe is the resolved one and loads back
    stored = R.load(out / "recipe.toml")
    assert stored.train.max_steps == 30
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["backend"] == "transformers"
    assert info["seed"] == 42
    assert info["data"]["fingerprint"]
    assert info["versions"]["trl"]


def test_metrics_rows_and_loss_falls(tiny_run):
    out, output, _ = tiny_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    for r in train:
        assert {"step", "loss", "learning_rate", "tokens_per_s", "peak_mem_gib"} <= set(r)
    assert train[-1]["step"] == 30
    first, last = train[0]["loss"], train[-1]["loss"]
    assert last < 0.6 * first, (first, last)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0]
    assert "tok/s" in output and "ETA" in output


def test_adapter_moved_away_from_its_initialisation(tiny_run):
    out, _, _ = tiny_run
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b, list(weights)[:5]
    # PEFT initialises every lora_B to zero: training must have moved all of them
    assert all(v.abs().sum() > 0 for v in b)


def test_run_records_the_loss_that_ran(tiny_run):
    out, _, launches = tiny_run
    loss = json.loads((out / "run.json").read_text())["loss"]
    assert loss["kernel"] == "fastsft-linear"
    assert loss["kernel_backend"] == "triton"  # the tests run Triton under TRITON_INTERPRET=1
    assert sum(launches.values()) > 0, "the run trained without launching our kernels"


def test_second_run_into_the_same_folder_is_refused(tiny_run):
    out, _, _ = tiny_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = CliRunner().invoke(main, ["run", str(RECIPES / "tiny.toml"), "-o", str(out)])
    assert result.exit_code == 2
    assert "already holds a fastsft run" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_report_shows_answers_before_and_after(tiny_run):
    out, _, _ = tiny_run
    text = (out / "report.md").read_text()
    assert "![loss curve](loss.png)" in text
    assert "| prompt | base model | fine-tuned |" in text
    # the base model against the fine-tuned one: held-out loss (evaluated at step 0) and compliance
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert f"base model {evals[0]['eval_loss']:.4f}" in text
    summary = json.loads((out / "run.json").read_text())["result"]["compliance"]
    assert summary["n"] == 3 and 0 <= summary["base"] <= summary["fine_tuned"] <= 1
    assert "template compliance" in text


def test_auto_backend_is_transformers_without_gpu():
    from fastsft.backends import choose_backend

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    backend, why = choose_backend("auto")
    assert backend == "transformers"
    assert "GPU" in why or "unsloth" in why


def test_validate_command(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(TINY_RECIPE.replace("max_steps", "max_stepz"))
    result = CliRunner().invoke(main, ["validate", str(p)])
    assert result.exit_code == 2
    assert "did you mean `max_steps`?" in result.output
    assert "Traceback" not in result.output
    p.write_text(TINY_RECIPE)
    result = CliRunner().invoke(main, ["validate", str(p), "--set", "train.seed=3"])
    assert result.exit_code == 0
    assert "seed = 3" in result.output


def test_schema_command_is_json():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert "learning_rate" in schema["properties"]["train"]["properties"]


def test_every_command_has_help_with_an_example():
    for cmd in (["run"], ["validate"], ["schema"], ["doctor"], ["data", "preview"]):
        result = CliRunner().invoke(main, [*cmd, "--help"])
        assert result.exit_code == 0
        assert "Example" in result.output, cmd


def test_doctor_reports_versions_and_backend():
    result = CliRunner().invoke(main, ["doctor"])
    assert "transformers" in result.output and "trl" in result.output
    assert 'backend = "auto" picks' in result.output


def test_a_target_module_that_matches_nothing_is_an_error(tmp_path):
    from fastsft import backends
    from fastsft.errors import BackendError

    from _tiny import write_recipe

    text = TINY_RECIPE.replace("lora_alpha = 16", 'lora_alpha = 16\ntarget_modules = ["q_proj", "v_prj"]')
    recipe = R.load(write_recipe(tmp_path / "r.toml", text))
    with pytest.raises(
        BackendError, match=r"'v_prj' \(did you mean 'v_proj'\?\) matches no module of the model"
    ):
        backends.load_model(recipe, log=lambda m: None)


def test_run_refuses_what_validate_refuses_before_the_model_loads(tmp_path, monkeypatch):
    """`fastsft run` calls validate's preflight before the model loads: a missing data file is refused
    with validate's message, no model is loaded and no run directory is made."""
    import io

    from rich.console import Console

    from fastsft import backends
    from fastsft.errors import RecipeError
    from fastsft.run import train

    from _tiny import DEMO, write_recipe

    loads = []
    monkeypatch.setattr(backends.Start, "load", lambda *a, **k: loads.append(1))
    text = TINY_RECIPE.replace(f'train = "{DEMO}"', 'train = "missing.jsonl"')
    recipe = R.load(write_recipe(tmp_path / "r.toml", text))
    with pytest.raises(RecipeError, match="data.train = 'missing.jsonl': file not found"):
        train.run(recipe, output_dir=tmp_path / "run", console=Console(file=io.StringIO()))
    assert not loads and not (tmp_path / "run").exists()


def test_the_data_is_read_before_the_model_loads(tmp_path, monkeypatch):
    """A bad row (the file's line named) is refused before any weight is read: a 7B model takes minutes
    to load (a resume on changed data: test_reliability). The data is encoded with the model folder's
    tokenizer, which the transformers backend then trains with."""
    import io

    from rich.console import Console

    from fastsft import backends
    from fastsft.errors import DataError
    from fastsft.run import train

    from _tiny import DEMO, write_recipe

    loads = []
    original = backends.Start.load

    def spy(self, **kw):
        loads.append(kw.get("tokenizer"))
        return original(self, **kw)

    monkeypatch.setattr(backends.Start, "load", spy)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(DEMO.read_text().splitlines()[0] + "\n" + '{"messages": "not a list"}\n')
    text = TINY_RECIPE.replace(f'train = "{DEMO}"', f'train = "{bad}"')
    recipe = R.load(write_recipe(tmp_path / "r.toml", text))
    with pytest.raises(DataError, match="line 2"):
        train.run(recipe, output_dir=tmp_path / "run", console=Console(file=io.StringIO()))
    assert loads == []

    recipe = R.load(write_recipe(tmp_path / "ok.toml", TINY_RECIPE), ["train.max_steps=1"])
    train.run(recipe, output_dir=tmp_path / "ok", console=Console(file=io.StringIO()))
    assert len(loads) == 1 and loads[0] is not None  # the tokenizer the data was encoded with
    assert (tmp_path / "ok" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("gib", [24.0, 0.3])
def test_on_a_gpu_the_plan_speaks_before_the_model_loads(tmp_path, monkeypatch, gib):
    """On a GPU (its memory stood in for here), `run` with `[train] fit = "warn"` prints the plan's simulated
    peak before any weight is read, instead of the formula's estimate, and warns when the recipe will not
    fit; the run goes on (fit = "auto", the default: tests/plan/test_fit.py)."""
    import io

    from rich.console import Console

    from fastsft import backends
    from fastsft.run import guard, train

    from _tiny import write_recipe

    monkeypatch.setattr(guard, "gpu_memory", lambda: int(gib * 2**30))
    order = []
    load = backends.Start.load
    monkeypatch.setattr(backends.Start, "load", lambda self, **kw: order.append("load") or load(self, **kw))
    out = io.StringIO()
    console = Console(file=out, width=400)
    monkeypatch.setattr(console, "print", lambda msg, **kw: order.append(str(msg)) or out.write(f"{msg}\n"))
    recipe = R.load(write_recipe(tmp_path / "r.toml", TINY_RECIPE), ["train.max_steps=1", "train.fit=warn"])
    train.run(recipe, output_dir=tmp_path / "run", console=console)
    planned = [i for i, line in enumerate(order) if line.startswith("plan: one step peaks at")]
    assert planned and planned[0] < order.index("load"), order
    assert not any(line.startswith("memory estimate:") for line in order), order
    warned = any("will run out of GPU memory" in line for line in order)
    assert warned == (gib < 1), order


def test_the_end_of_run_export_is_handed_the_runs_recipe(tmp_path, monkeypatch):
    """The recipe's [export] formats are written from what the run holds: recipe.toml is not read back, and
    the export sees the recipe as recipe.toml stores it (a relative data path made absolute)."""
    from rich.console import Console

    from fastsft import recipe as recipe_mod
    from fastsft.run import train

    (tmp_path / "data.jsonl").write_text(DEMO.read_text(encoding="utf-8"), encoding="utf-8")
    text = TINY_RECIPE.replace(f'train = "{DEMO}"', 'train = "data.jsonl"')
    recipe = R.load(write_recipe(tmp_path / "r.toml", text), ["train.max_steps=2", "export.formats=adapter"])
    read_back = []
    real = recipe_mod.load
    monkeypatch.setattr(recipe_mod, "load", lambda *a, **kw: read_back.append(a[0]) or real(*a, **kw))
    out = train.run(recipe, output_dir=tmp_path / "run", console=Console(file=io.StringIO())).run_dir
    card = (out / "export-adapter" / "README.md").read_text(encoding="utf-8")
    assert f"- train: `{(tmp_path / 'data.jsonl').resolve()}`" in card
    assert read_back == []
