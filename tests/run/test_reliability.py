"""A run survives SIGKILL and Ctrl-C, stops on NaN and out-of-memory with a message, and refuses
hostile recipes and data without a traceback."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsft import recipe as R
from fastsft.cli.main import main
from fastsft.errors import DataError, FastSFTError, RecipeError
from fastsft.run import guard, train
from fastsft.rundir import RunDir

from _tiny import RECIPES, TINY_RECIPE

SHORT = [
    "--set",
    "train.max_steps=16",
    "--set",
    "train.save_steps=4",
    "--set",
    "train.logging_steps=1",
    "--set",
    "train.eval_strategy=no",
    "--set",
    "train.save_total_limit=2",
]

# Runs `fastsft run` in a child process, through the CLI's error handling, with a callback that sends
# the process a signal at the end of a given step.
DRIVER = """
import os, signal, sys
from transformers import TrainerCallback
from fastsft import recipe as R
from fastsft.run import train
from fastsft.cli.main import handle_errors

action, at, recipe, out, *overrides = sys.argv[1:]

class SignalAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == int(at):
            os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM}.get(action, signal.SIGINT))

handle_errors(lambda: train.run(R.load(recipe, overrides), output_dir=out, callbacks=[SignalAtStep()]))()
"""


def losses(run_dir):
    return {r["step"]: r["loss"] for r in RunDir(run_dir).read_metrics() if "loss" in r}


def child(tmp_path, action, at, out):
    """The tiny recipe with SHORT, run into `out` by a child that signals itself after step `at`."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    overrides = SHORT[1::2]  # the values of the --set pairs
    return subprocess.run(
        [sys.executable, str(driver), action, str(at), str(RECIPES / "tiny.toml"), str(out), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The same short run, never interrupted."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = CliRunner().invoke(main, ["run", str(RECIPES / "tiny.toml"), *SHORT, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def reference(reference_run):
    return losses(reference_run)


@pytest.mark.slow  # whole runs in child processes, then a resume
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "run"
    killed = child(tmp_path, "kill", 10, out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert RunDir(out).latest_checkpoint()[0] == 8
    assert max(losses(out)) == 9  # killed in step 10, before its log row
    result = CliRunner().invoke(main, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "checkpoint-8" in result.output
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 17))
    for step, value in reference.items():
        assert resumed[step] == pytest.approx(value, rel=1e-5, abs=1e-6), step
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["resumed"][0]["from"] == "checkpoint-8"


@pytest.mark.slow  # whole runs in child processes, then a resume
def test_ctrl_c_writes_a_checkpoint_and_prints_the_resume_command(tmp_path, reference):
    out = tmp_path / "run"
    stopped = child(tmp_path, "int", 6, out)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert f"fastsft run --resume {out}" in stopped.stderr + stopped.stdout
    assert "Traceback" not in stopped.stderr
    assert RunDir(out).latest_checkpoint()[0] == 6  # step 6 is not a save step: saved because of the signal
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    result = CliRunner().invoke(main, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    resumed = losses(out)
    for step, value in reference.items():
        assert resumed[step] == pytest.approx(value, rel=1e-5, abs=1e-6), step


@pytest.mark.slow  # whole runs in child processes, then a resume
def test_sigterm_exits_143_and_the_resumed_run_reports_the_whole_run(tmp_path, reference_run):
    """SIGTERM stops like Ctrl-C but exits 143, printed as a stop, not an error. After the resume,
    run.json's train loss, tokens and time, and the report's "before" answers, cover the whole run."""
    out = tmp_path / "run"
    stopped = child(tmp_path, "term", 6, out)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "stopped: interrupted at step 6" in stopped.stderr and "error:" not in stopped.stderr
    first = json.loads((out / "checkpoints" / "checkpoint-6" / "fastsft_totals.json").read_text())
    result = CliRunner().invoke(main, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    ref = json.loads((reference_run / "run.json").read_text())["result"]
    got = json.loads((out / "run.json").read_text())["result"]
    assert got["tokens"] == ref["tokens"]
    assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
    assert got["train_seconds"] > first["train_seconds"] > 0  # both segments counted
    assert [s["before"] for s in got["samples"]] == [s["before"] for s in ref["samples"]]
    assert all(s["before"] for s in got["samples"])
    assert ref["train_loss"] == pytest.approx(
        sum(losses(reference_run).values()) / 16, rel=1e-5
    )  # logging_steps = 1: the mean of the logged step losses


def test_a_half_written_checkpoint_is_never_resumed(tmp_path):
    run = RunDir(tmp_path)
    for step, complete in ((4, True), (8, True), (12, False)):
        d = run.checkpoints / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (run.checkpoints / "checkpoint-8" / "trainer_state.json").write_text('{"global_step": 8}')
    (run.checkpoints / ".staging" / "checkpoint-16").mkdir(parents=True)
    (run.checkpoints / "checkpoint-16").mkdir()
    (run.checkpoints / "checkpoint-16" / "trainer_state.json").write_text('{"global_')  # torn write
    assert run.latest_checkpoint()[0] == 8


@pytest.mark.slow  # a run, then resumes: 77 s
def test_resume_refuses_a_recipe_that_changes_the_training(tmp_path, reference):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["run", str(RECIPES / "tiny.toml"), *SHORT, "--set", "train.max_steps=4", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    refused = CliRunner().invoke(main, ["run", "--resume", str(out), "--set", "train.learning_rate=1e-2"])
    assert refused.exit_code == 2
    assert "train.learning_rate" in refused.output and "Traceback" not in refused.output
    other = CliRunner().invoke(main, ["run", str(RECIPES / "tiny.toml"), "--resume", str(out)])
    assert other.exit_code == 2 and "train.max_steps" in other.output  # the stored run had 4 steps
    nothing = CliRunner().invoke(main, ["run", "--resume", str(tmp_path / "nope")])
    assert nothing.exit_code == 2 and "not a fastsft run directory" in nothing.output


def _recipe(tmp_path, *overrides):
    p = tmp_path / "r.toml"
    p.write_text(TINY_RECIPE)
    return R.load(p, list(overrides))


@pytest.mark.slow  # training runs: 8 s
def test_nan_loss_stops_the_run_and_is_never_applied(tmp_path, monkeypatch):
    from fastsft.loss import route as loss_mod

    calls = {"n": 0}
    original = loss_mod.LossRoute.__call__

    def poisoned(self, model, inputs, num_items_in_batch=None):
        loss, out = original(self, model, inputs, num_items_in_batch)
        calls["n"] += model.training
        if model.training and calls["n"] == 3:
            loss = loss * float("nan")
        return loss, out

    monkeypatch.setattr(loss_mod.LossRoute, "__call__", poisoned)
    with pytest.raises(guard.NonFinite, match="step 3") as e:
        train.run(
            _recipe(tmp_path, "train.save_steps=2", "train.save_strategy=steps"), output_dir=tmp_path / "a"
        )
    assert "learning rate" in str(e.value) and "checkpoint-2" in str(e.value)
    assert json.loads((tmp_path / "a" / "run.json").read_text())["status"] == "stopped: non-finite"

    calls["n"] = 0  # allowed once: the step is skipped and the weights stay finite
    result = train.run(_recipe(tmp_path, "train.max_nonfinite_steps=1"), output_dir=tmp_path / "b")
    from safetensors.torch import load_file

    weights = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_out_of_memory_is_explained_without_a_traceback(tmp_path, capsys):
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_begin(self, *a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    from fastsft.cli.main import handle_errors

    with pytest.raises(SystemExit) as e:  # through the CLI's error handling, as `fastsft run` prints it
        handle_errors(lambda: train.run(_recipe(tmp_path), output_dir=tmp_path / "run", callbacks=[Boom()]))()
    assert e.value.code == 3
    output = capsys.readouterr().err
    assert "out of memory during train" in output
    assert "per_device_train_batch_size" in output and "Traceback" not in output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "stopped: out of memory"


def test_disk_space_is_checked_before_checkpoints(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 1024))
    with pytest.raises(FastSFTError, match="GiB is free"):
        train.run(_recipe(tmp_path, "train.save_strategy=steps"), output_dir=tmp_path / "run")


def test_memory_estimate_orders_the_losses_and_flags_a_recipe_that_cannot_fit(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32768,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    recipe = _recipe(tmp_path, "train.per_device_train_batch_size=8", "data.max_length=4096")
    parts = {k: guard.estimate_memory(model, recipe, k) for k in ("torch", "fastsft", "fastsft-linear")}
    assert parts["fastsft-linear"]["loss"] < parts["fastsft"]["loss"] < parts["torch"]["loss"]
    # the kernel's own figure on the path this device takes: with LoRA's frozen head, not a GPU here,
    # the PyTorch twin's tiles, not Triton's row chunks
    from fastsft.kernels.memory_plan import loss_memory

    model.get_output_embeddings().weight.requires_grad_(False)
    frozen = guard.estimate_memory(model, recipe, "fastsft-linear")["loss"]
    tiles = loss_memory(8 * 4096, 4096, 32768, torch.bfloat16, backend="torch")
    assert frozen == tiles < loss_memory(8 * 4096, 4096, 32768, torch.bfloat16)
    assert 13 * 2**30 < parts["torch"]["weights"] < 14 * 2**30  # 7.24B bf16 parameters
    line, wont_fit = guard.describe_estimate(parts["torch"], 24 * 2**30)
    assert wont_fit and "the GPU has 24.0 GiB" in line


# ----------------------------------------------------------------------------------------------
# Hostile input
# ----------------------------------------------------------------------------------------------

toml_scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
)
keys = st.sampled_from(
    [
        "name",
        "learning_rate",
        "max_steps",
        "r",
        "lora_alpha",
        "train",
        "kernel",
        "max_length",
        "bogus",
        "seed",
    ]
)
sections = st.sampled_from(["model", "lora", "data", "train", "loss", "export", "extra"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.dictionaries(sections, st.dictionaries(keys, toml_scalars, max_size=4), max_size=5))
def test_any_recipe_values_validate_or_fail_with_a_recipe_error(raw):
    try:
        R.validate(raw, path="fuzz.toml")
    except RecipeError as e:
        assert "fuzz.toml" in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_as_a_recipe_give_a_recipe_error(tmp_path, data):
    p = tmp_path / "fuzz.toml"
    p.write_bytes(data)
    try:
        R.load(p)
    except RecipeError as e:
        assert str(p) in str(e)


def test_mangled_recipes_through_the_cli(tmp_path):
    cases = {
        "empty": "",
        "syntax": "[model\nname = 'x'",
        "binary": "\x00\xff\xfe garbage",
        "negative lr": TINY_RECIPE.replace("learning_rate = 3e-3", "learning_rate = -1"),
        "nan": TINY_RECIPE.replace("learning_rate = 3e-3", "learning_rate = nan"),
        "zero steps": TINY_RECIPE.replace("max_steps = 6", "max_steps = 0"),
        "huge int": TINY_RECIPE.replace("max_steps = 6", "max_steps = 99999999999999999999"),
    }
    for what, text in cases.items():
        p = tmp_path / "bad.toml"
        p.write_bytes(text.encode("latin-1"))
        result = CliRunner().invoke(main, ["validate", str(p)])
        assert result.exit_code == 2, (what, result.output)
        assert "Traceback" not in result.output and str(p) in result.output, what


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
row_like = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "assistant", "system", "bot", 3]),
                    "content": st.text(max_size=10) | st.integers(),
                }
            ),
            max_size=3,
        ),
        "text": json_values,
        "prompt": json_values,
        "completion": json_values,
        "instruction": json_values,
        "output": json_values,
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(row_like.map(json.dumps) | st.text(max_size=30), min_size=1, max_size=4))
def test_any_data_file_loads_or_names_its_problem(tmp_path, tiny_model_dir, lines):
    from transformers import AutoTokenizer

    from fastsft import data

    p = tmp_path / "fuzz.jsonl"
    p.write_text("\n".join(line.replace("\n", " ") for line in lines) + "\n", encoding="utf-8")
    recipe = _recipe(tmp_path, f"data.train={json.dumps(str(p))}")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    try:
        data.prepare_data(recipe, tokenizer, log=lambda m: None)
    except DataError as e:
        assert "fuzz.jsonl" in str(e)


def _cli_refuses(args, *, expect):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert "Traceback" not in result.output and result.exc_info[0] is SystemExit, result.output
    assert expect in result.output, result.output
    return result


def test_hostile_inputs_are_clear_errors_not_tracebacks(tmp_path, tiny_model_dir):
    """Each of these was a traceback: every one is now an error naming the place and the fix (exit 2)."""
    nested = tmp_path / "nested.toml"
    nested.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    _cli_refuses(["validate", str(nested)], expect="nested too deeply")
    _cli_refuses(
        ["validate", str(RECIPES / "tiny.toml"), "--set", "lora.target_modules=q_proj,v_proj"],
        expect='["q_proj", "v_proj"]',
    )

    demo = (RECIPES / "data" / "demo.jsonl").read_text()
    rows = {
        "deep.jsonl": '{"messages": ' + "[" * 100000 + "]" * 100000 + "}\n",
        "surrogate.jsonl": '{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "ok"}]}\n',
        "big.jsonl": '{"text": "' + "word " * (2 * 2**20) + '"}\n',
    }
    expect = {
        "deep.jsonl": "nested too deeply",
        "surrogate.jsonl": "lone surrogate",
        "big.jsonl": "MB in one row",
    }
    for name, first in rows.items():
        p = tmp_path / name
        p.write_text(first + demo)
        recipe = tmp_path / f"{name}.toml"
        recipe.write_text(TINY_RECIPE.replace(str(RECIPES / "data" / "demo.jsonl"), str(p)))
        result = _cli_refuses(["data", "preview", str(recipe), "-n", "1"], expect=expect[name])
        assert f"{name} line 1" in result.output

    template = tmp_path / "loop.jinja"
    template.write_text(
        "{% for i in range(10**8) %}x{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    recipe = tmp_path / "loop.toml"
    recipe.write_text(TINY_RECIPE.replace("[data]", f'[data]\nchat_template = "{template}"'))
    _cli_refuses(["data", "preview", str(recipe), "-n", "1"], expect="the chat template fails")

    _cli_refuses(["generate", str(tiny_model_dir), "--prompt", "bad \udcff byte"], expect="lone surrogate")


def test_a_big_row_is_refused_before_it_is_tokenized(tmp_path, tiny_model_dir):
    """A 50 MB row once took 3.5 GB: a row over MAX_ROW_BYTES is named, not read into the tokenizer."""
    from transformers import AutoTokenizer

    from fastsft import data

    p = tmp_path / "big.jsonl"
    p.write_text(
        (RECIPES / "data" / "demo.jsonl").read_text() + '{"text": "' + "a" * (data.MAX_ROW_BYTES + 1) + '"}\n'
    )
    recipe = _recipe(tmp_path, f"data.train={json.dumps(str(p))}")
    with pytest.raises(DataError, match="big.jsonl line 401: .* MB in one row"):
        data.prepare_data(recipe, AutoTokenizer.from_pretrained(tiny_model_dir), log=lambda m: None)


TINY_SHORT = [
    "--set",
    "train.max_steps=4",
    "--set",
    "train.save_strategy=steps",
    "--set",
    "train.save_steps=2",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A short finished run whose data file is a copy the tests may change."""
    root = tmp_path_factory.mktemp("finished")
    data_file = root / "data.jsonl"
    data_file.write_text((RECIPES / "data" / "demo.jsonl").read_text())
    recipe = root / "r.toml"
    recipe.write_text(TINY_RECIPE.replace(str(RECIPES / "data" / "demo.jsonl"), str(data_file)))
    out = root / "run"
    result = CliRunner().invoke(main, ["run", str(recipe), *TINY_SHORT, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, recipe, data_file


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_overwrite_replaces_only_a_run_and_only_after_setup(tmp_path, finished_run):
    out, recipe, _ = finished_run
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text("print('my code')")
    _cli_refuses(["run", str(recipe), "-o", str(project), "--overwrite"], expect="not a fastsft run")
    assert (project / "main.py").read_text() == "print('my code')"
    link = tmp_path / "link"
    link.symlink_to(out)
    _cli_refuses(["run", str(recipe), "-o", str(link), "--overwrite"], expect="symbolic link")

    # the new run fails in setup (bad data): the old run is untouched, nothing is left beside it
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    before = _snapshot(out)
    _cli_refuses(
        ["run", str(recipe), "--set", f"data.train={json.dumps(str(bad))}", "-o", str(out), "--overwrite"],
        expect="bad.jsonl",
    )
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["data.jsonl", "r.toml", "run"])
    # and a new folder is not made at all when setup fails
    _cli_refuses(
        ["run", str(recipe), "--set", f"data.train={json.dumps(str(bad))}", "-o", str(tmp_path / "new")],
        expect="bad.jsonl",
    )
    assert not (tmp_path / "new").exists()


def test_a_run_directory_in_use_is_refused(finished_run):
    out, recipe, _ = finished_run
    holder = RunDir.open(out, lock=True)
    try:
        for args in (["run", "--resume", str(out)], ["run", str(recipe), "-o", str(out), "--overwrite"]):
            _cli_refuses(args, expect=f"in use by another fastsft process (PID {__import__('os').getpid()})")
    finally:
        holder.unlock()


def test_resume_of_a_finished_run_changes_nothing(finished_run):
    out, _, _ = finished_run
    before = _snapshot(out)
    _cli_refuses(["run", "--resume", str(out)], expect="this run finished (4 steps); nothing was changed")
    assert _snapshot(out) == before


@pytest.mark.slow  # a resume of a run: 8 s
def test_resume_after_the_data_changed_is_refused(tmp_path, finished_run, monkeypatch):
    import shutil

    from fastsft import backends

    loads = []
    load = backends.Start.load
    monkeypatch.setattr(backends.Start, "load", lambda self, **kw: loads.append(1) or load(self, **kw))
    src, recipe, data_file = finished_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    info = json.loads((out / "run.json").read_text())
    info["status"] = "interrupted"  # as if stopped after its last checkpoint
    (out / "run.json").write_text(json.dumps(info))
    original = data_file.read_text()
    try:
        data_file.write_text(original.replace("yellow", "purple"))
        before = _snapshot(out)
        _cli_refuses(["run", "--resume", str(out)], expect="--allow-data-change")
        assert _snapshot(out) == before and loads == []  # refused before the model loaded
        result = CliRunner().invoke(main, ["run", "--resume", str(out), "--allow-data-change"])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "run.json").read_text())["data_changed_at"] == "checkpoint-4"
    finally:
        data_file.write_text(original)


@pytest.mark.slow  # a run, then a resume: 9 s
def test_a_full_disk_during_training_is_an_error_and_the_run_resumes(tmp_path, monkeypatch):
    import errno

    p = tmp_path / "r.toml"
    p.write_text(TINY_RECIPE)
    out = tmp_path / "run"
    original = RunDir.append_metrics

    def full_at_step_3(self, row):
        if row.get("step") == 3:
            (self.path / "metrics.jsonl").open("a").write('{"step": 3, "lo')  # torn, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "metrics.jsonl"))
        return original(self, row)

    monkeypatch.setattr(RunDir, "append_metrics", full_at_step_3)
    result = _cli_refuses(["run", str(p), *TINY_SHORT, "-o", str(out)], expect="the disk is full")
    assert f"fastsft run --resume {out}" in result.output
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "stopped: write failed"
    monkeypatch.undo()
    result = CliRunner().invoke(main, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(losses(out)) == [1, 2, 3, 4]


def test_a_run_where_every_step_is_nan_fails(tmp_path, monkeypatch):
    from fastsft.loss import route as loss_mod

    original = loss_mod.LossRoute.__call__

    def poisoned(self, model, inputs, num_items_in_batch=None):
        loss, out = original(self, model, inputs, num_items_in_batch)
        return (loss * float("nan"), out) if model.training else (loss, out)

    monkeypatch.setattr(loss_mod.LossRoute, "__call__", poisoned)
    with pytest.raises(guard.NonFinite, match="every step of the run \\(3\\)"):
        train.run(
            _recipe(tmp_path, "train.max_steps=3", "train.max_nonfinite_steps=100"), output_dir=tmp_path / "a"
        )
    info = json.loads((tmp_path / "a" / "run.json").read_text())
    assert info["status"] == "stopped: non-finite" and "result" not in info
    for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl is not JSON"))


@pytest.mark.slow  # training runs: 13 s
def test_eval_loss_is_the_token_weighted_mean_everywhere(tmp_path):
    """The same held-out loss whatever the eval batch size, and the same as `fastsft eval` gives."""
    from fastsft import use

    results = {}
    for bs in (1, 7):
        r = _recipe(
            tmp_path,
            "train.max_steps=2",
            "train.eval_strategy=steps",
            "train.eval_steps=2",
            "data.val_ratio=0.05",
            f"train.per_device_eval_batch_size={bs}",
        )
        out = train.run(r, output_dir=tmp_path / f"bs{bs}").run_dir
        results[bs] = {
            row["step"]: row["eval_loss"] for row in RunDir(out).read_metrics() if "eval_loss" in row
        }
    assert sorted(results[1]) == [0, 2]
    for step in (0, 2):
        assert results[7][step] == pytest.approx(results[1][step], rel=1e-5), step
    evaluated = use.evaluate(tmp_path / "bs7", n_gen=0)
    assert evaluated["loss"] == pytest.approx(results[7][2], rel=1e-4)
