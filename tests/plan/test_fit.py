"""[train] fit: the decision (fastsft.plan.fit) for a given memory size, its order and its answer when
nothing fits, the run that applies it (driven on the CPU with a given memory size and an injected
measured peak), the losses of a fitted run against the recipe as written, and bad input."""

from __future__ import annotations

import io
import json

import pytest
import torch
from peft import LoraConfig
from rich.console import Console
from transformers import LlamaConfig

from fastsft import plan
from fastsft import recipe as recipe_mod
from fastsft.errors import RecipeError
from fastsft.plan import LEVER_ORDER, Setup, fit_mod
from fastsft.plan.device import CUDA_CONTEXT, GiB

from _tiny import RECIPES


def small_setup(**kw):
    # a Llama-shaped model whose activations dominate at 8K tokens (a few seconds a simulation)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=65536,
    )
    lora = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    base = dict(lora=lora, batch_size=4, optim="adamw_8bit", expandable_segments=False, frozen16=False)
    return Setup(cfg, **{**base, **kw})


L = 8192


def test_order_is_free_levers_then_offload_then_shards_then_tiles_then_batch():
    s = small_setup()
    keys = [tuple(change) for change, _ in fit_mod.steps(s, LEVER_ORDER)]
    assert keys == [
        ("expandable_segments", "frozen16"),
        ("offload_checkpoints",),
        ("tiled_mlp",),
        ("tiled_mlp",),
        ("tiled_mlp",),
        ("tiled_layer",),
        ("tiled_layer",),
        ("tiled_layer",),
        ("tiled_layer",),
        ("batch_size",),
        ("batch_size",),
    ]
    counts = [c["tiled_mlp"] for c, _ in fit_mod.steps(s, LEVER_ORDER) if "tiled_mlp" in c]
    assert counts == [2, 4, 8]
    tiles = [c["tiled_layer"] for c, _ in fit_mod.steps(s, LEVER_ORDER) if "tiled_layer" in c]
    assert tiles == [2, 4, 8, 16]
    # the defaults (since #35) already hold the free levers: nothing to add there
    assert (
        "expandable_segments"
        not in fit_mod.steps(small_setup(expandable_segments=True, frozen16=True), LEVER_ORDER)[0][0]
    )


def test_decide_takes_the_cheapest_changes_that_fit_and_keeps_the_effective_batch():
    s = small_setup()
    ladder = fit_mod.ladder(s, L, LEVER_ORDER)
    assert ladder[0]["set"] == "as written"
    assert all(r["peak_bytes"] > 0 for r in ladder)
    as_written = ladder[0]["peak_bytes"]
    # fits as written: nothing changes
    f = fit_mod.decide(s, L, as_written, LEVER_ORDER, accumulation=2)
    assert f.fits and f.changes == [] and f.overrides() == []
    # a budget only every lever and batch 1 meet
    every = fit_mod.every_change(s, LEVER_ORDER)
    budget = fit_mod.device_peak(every, L)[0]
    f = fit_mod.decide(s, L, budget, LEVER_ORDER, accumulation=2)
    assert f.fits and fit_mod.device_peak(f.setup, L)[0] <= budget
    keys = [c["key"] for c in f.changes]
    assert keys[:3] == ["train.expandable_segments", "train.frozen_16bit", "train.offload_checkpoints"]
    assert keys[-1] == "train.per_device_train_batch_size"
    assert f.setup.batch_size * f.accumulation == 4 * 2  # the same effective batch
    assert f"train.gradient_accumulation_steps={f.accumulation}" in f.overrides()
    d = f.as_dict()
    assert d["fits"] and d["margin_gib"] >= 0 and d["planned_peak_gib"] <= d["budget_gib"]
    assert all(c["why"] and "peak_gib" in c for c in d["changes"])
    # a budget between: a prefix of the same order, no batch change
    mid = (as_written + budget) // 2
    g = fit_mod.decide(s, L, mid, LEVER_ORDER, accumulation=2)
    assert g.fits and g.peak <= mid and len(g.changes) < len(f.changes)
    assert [c["key"] for c in g.changes] == keys[: len(g.changes)]


@pytest.mark.slow  # memory simulations: 20 s
def test_nothing_fits_names_the_longest_length_and_the_keys():
    s = small_setup()
    # the weights alone do not fit: said so, no length search
    tiny_budget = CUDA_CONTEXT + 2**20
    w = fit_mod.decide(s, L, tiny_budget, LEVER_ORDER)
    assert w.max_length == 0 and "weights alone" in w.nothing_fits(L)
    # halfway between the weights alone and the step with every change fit takes
    budget = w.weights + (w.peak - w.weights) // 2
    f = fit_mod.decide(s, L, budget, LEVER_ORDER)
    assert not f.fits and 0 < f.max_length < L
    assert fit_mod.device_peak(f.setup, f.max_length)[0] <= budget
    msg = f.nothing_fits(L)
    assert f"{f.max_length:,}" in msg and "data.max_length" in msg and "train.offload_checkpoints" in msg


def test_compare_warns_above_five_percent():
    ok = fit_mod.compare(10 * GiB, int(10.4 * GiB))
    assert ok["measured_over_planned"] == 1.04 and "warning" not in ok
    over = fit_mod.compare(10 * GiB, int(10.6 * GiB))
    assert "warning" in over and "6%" in over["warning"]


def _tiny(tmp_path, *sets):
    r = recipe_mod.load(RECIPES / "tiny.toml", ["data.max_length=1024", *sets])
    return r


@pytest.mark.slow  # memory simulations: 19 s
def test_fit_recipe_modes_and_fallback(tmp_path):
    r = _tiny(tmp_path, "train.expandable_segments=false", "train.frozen_16bit=false")
    logged = []
    # the budget only fit's every change meets (its last configuration when nothing smaller fits)
    every = fit_mod.decide(plan.setup_from_recipe(r), 1024, CUDA_CONTEXT + 2**20, LEVER_ORDER, longest=False)
    tight = every.peak
    out, rec = plan.fit_recipe(r.with_overrides(["train.fit=off"]), tight, logged.append)
    assert rec is None and out.train.tiled_mlp == 0 and "off" in logged[-1]
    out, rec = plan.fit_recipe(r.with_overrides(["train.fit=warn"]), tight, logged.append)
    assert out.train.tiled_mlp == 0 and rec["mode"] == "warn" and not rec["fits"]
    assert any("warning: this recipe will run out of GPU memory" in x for x in logged)
    logged.clear()
    out, rec = plan.fit_recipe(r, tight, logged.append)
    assert rec["mode"] == "auto" and rec["fits"] and rec["changes"]
    assert out.train.offload_checkpoints and out.train.tiled_mlp and out.train.gradient_checkpointing
    assert any(x.startswith("fit: train.offload_checkpoints = true") for x in logged)
    assert (
        rec["planned_reserved_bytes"] == int(rec["planned_peak_gib"] * GiB)
        or rec["planned_reserved_bytes"] > 0
    )
    # nothing fits: a RecipeError naming the longest max_length, before anything loads
    with pytest.raises(RecipeError, match="longest max_length that fits with every lever is"):
        plan.fit_recipe(r, every.weights + (tight - every.weights) // 2, logged.append)
    # the simulation cannot plan it (a loss it does not simulate): the stated fallback, recipe unchanged
    logged.clear()
    odd = r.with_overrides(['loss.kernel="unsloth"'])
    out, rec = plan.fit_recipe(odd, tight, logged.append)
    assert rec is None and out is odd and "formula's estimate" in logged[-1]


def test_unknown_fit_value_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError) as e:
        recipe_mod.load(RECIPES / "tiny.toml", ['train.fit="sometimes"'])
    msg = str(e.value)
    assert "fit" in msg and "sometimes" in msg and "auto" in msg and "warn" in msg and "off" in msg


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_a_fitted_run_trains_to_the_losses_of_none_and_records_plan_against_real(tmp_path, monkeypatch):
    """The tiny model (max_length 1024), trained twice on the CPU: as written with no lever (fit = "off"), and with
    fit = "auto" driven by a given memory size that only every lever and batch 1 meet (the GPU's free
    memory and the measured peak injected): the same losses (the levers' exactness tolerances), and
    run.json / report.md carry the changes and the plan beside the measured peak (10% above: warned)."""
    from fastsft.run import guard, train

    common = [
        "train.max_steps=2",
        "train.logging_steps=1",
        "train.eval_strategy=no",
        "train.save_strategy=no",
        "data.val_ratio=0",
        "train.expandable_segments=false",
        "train.frozen_16bit=false",
    ]
    plain = _tiny(tmp_path, *common, "train.fit=off")
    a = train.run(plain, output_dir=tmp_path / "a", console=Console(file=io.StringIO()))
    r = _tiny(tmp_path, *common)
    budget = fit_mod.decide(
        plan.setup_from_recipe(r), 1024, CUDA_CONTEXT + 2**20, LEVER_ORDER, longest=False
    ).peak
    monkeypatch.setattr(guard, "gpu_memory", lambda: 24 * GiB)
    monkeypatch.setattr(plan, "free_memory", lambda: budget)
    planned = {}

    def measured():
        return int(planned["reserved"] * 1.10)

    real_callback = fit_mod.callback

    def spy(planned_reserved, record, **kw):
        planned["reserved"] = planned_reserved
        return real_callback(planned_reserved, record, **kw)

    monkeypatch.setattr(fit_mod, "callback", spy)
    monkeypatch.setattr(fit_mod, "measured_reserved", measured)
    out = io.StringIO()
    b = train.run(r, output_dir=tmp_path / "b", console=Console(file=out, width=300))
    log = out.getvalue()
    assert "fit: train.offload_checkpoints = true" in log and "above the plan" in log
    info = json.loads((b.run_dir / "run.json").read_text())
    fit = info["fit"]
    keys = [c["key"] for c in fit["changes"]]
    assert "train.offload_checkpoints" in keys and "train.tiled_mlp" in keys
    assert "train.per_device_train_batch_size" in keys and fit["gradient_accumulation_steps"] > 1
    assert fit["measured_over_planned"] == pytest.approx(1.10, abs=0.01) and "warning" in fit
    stored = recipe_mod.load(b.run_dir / "recipe.toml")
    assert stored.train.offload_checkpoints and stored.train.tiled_mlp > 0  # as if the user had set them
    report = (b.run_dir / "report.md").read_text()
    assert "## Memory plan" in report and "train.offload_checkpoints" in report and "Warning" in report
    la, lb = _losses(a.run_dir), _losses(b.run_dir)
    # test_levers.py's gradient tolerance: the first loss is the same weights', the second follows one
    # AdamW step on gradients equal to it (a third step lets Adam's normalised update carry the rounding
    # further: 4.6e-5 measured, so the comparison stops at two)
    assert len(la) == len(lb) == 2
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "gib,length",
    [(24, 16384), (24, 65536), (24, 131072), (80, 16384), (80, 65536), (80, 131072)],
)
def test_8b_recipe_fit_at_24_and_80_gib(gib, length):
    """recipes/llama3_8b_qlora.toml as shipped: fit finds a configuration whose simulated step fits, the
    recipe's effective batch kept; 128K in 24 GiB takes the tiled decoder layer (it did not fit before
    the layer's tiles joined fit's ladder: 24.84 GiB at 78,475 tokens without them)."""
    r = recipe_mod.load(RECIPES / "llama3_8b_qlora.toml", [f"data.max_length={length}"])
    s = plan.setup_from_recipe(r)
    f = fit_mod.decide(s, length, gib * GiB, LEVER_ORDER, accumulation=r.train.gradient_accumulation_steps)
    assert f.fits and fit_mod.device_peak(f.setup, length)[0] <= gib * GiB
    assert f.setup.batch_size * f.accumulation == 2 * 8  # the recipe's effective batch
    if gib == 24 and length == 131072:
        assert f.setup.tiled_layer > 0, f.changes


@pytest.mark.slow
def test_8b_default_recipe_needs_no_hand_set_lever_up_to_the_headline_length():
    """Unsloth's published 78,475 tokens in 24 GiB: the shipped recipe, only max_length raised, fits."""
    r = recipe_mod.load(RECIPES / "llama3_8b_qlora.toml", ["data.max_length=78475"])
    lines = []
    out, rec = plan.fit_recipe(r, 24 * GiB, lines.append)
    assert rec["fits"] and rec["planned_peak_gib"] <= 24
    assert out.train.offload_checkpoints and out.data.max_length == 78475


@pytest.mark.slow  # `fastsft plan` children that simulate: 18 s
def test_plan_cli_names_what_fit_would_change_and_weights_that_cannot_fit():
    """`fastsft plan` with fit = "auto": what each lever saves, what a run would change; a --gpu-memory
    below what the weights alone hold is said so (no silent "fits", no traceback)."""
    import subprocess
    import sys

    def cli(*args):
        cmd = [sys.executable, "-m", "fastsft.cli", "plan", str(RECIPES / "tiny.toml"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900)

    small = cli("--set", "data.max_length=1024", "--gpu-memory", "600MiB", "--json")
    assert small.returncode == 0, small.stderr[-2000:]
    d = json.loads(small.stdout)
    assert d["lever_savings"][0]["set"] == "as written" and len(d["lever_savings"]) > 2
    assert d["fit"]["fits"] and d["fit"]["changes"] and not d["fits"]
    tiny = cli("--gpu-memory", "300MiB")
    out = tiny.stdout + tiny.stderr
    assert tiny.returncode == 0 and "weights alone" in out and "Traceback" not in out, out[-2000:]
    assert "fits in" not in out


def test_each_simulated_step_is_reported_as_it_runs():
    """A length search or fit's ladder can simulate for minutes (the tiled 8B step: ~30-90 s each): inside
    `reporting`, each new step is said before it runs and with its need after; a step already simulated
    is not simulated again, so nothing is said."""
    s = small_setup(tiled_mlp=2)
    lines = []
    with fit_mod.reporting(lines.append):
        peak = fit_mod.device_peak(s, 1237)[0]
        fit_mod.device_peak(s, 1237)
    assert len(lines) == 2, lines
    assert (
        lines[0].startswith("plan: simulating one step of 1,237 tokens (batch 4, ")
        and "tiled_mlp=2" in lines[0]
    )
    assert f"1,237 tokens need {peak / GiB:.2f} GiB" in lines[1]
    fit_mod.device_peak(s, 1238)  # outside: nothing heard
    assert len(lines) == 2
