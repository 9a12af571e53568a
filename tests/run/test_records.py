"""fastsft.run.records: what run.json records, from what a run holds (plain functions, checked without a
model; a real run's run.json is tests/run/test_train.py's)."""

from types import SimpleNamespace

import pytest

from fastsft import recipe as R
from fastsft.run import records

from _tiny import TINY_RECIPE, write_recipe

FACTS = {
    "started": "now",
    "command": "fastsft run r.toml",
    "versions": {},
    "device": "cpu",
    "cpu_threads": {},
}
LOADED = SimpleNamespace(
    backend="transformers", reason="auto", model_path="/m", dtype="fp32", info={"trainable_parameters": 7}
)


@pytest.fixture
def recipe(tmp_path):
    return R.load(write_recipe(tmp_path / "r.toml", TINY_RECIPE))


def info(recipe, fingerprint="fp1", **kw):
    prepared = SimpleNamespace(fingerprint=fingerprint, stats={"rows": 10})
    return records.run_info(
        recipe, LOADED, prepared, loss={}, estimate={"total": 2**30}, planned=None, facts=FACTS, **kw
    )


def test_a_new_run(recipe):
    r = info(recipe, world_size=1)
    assert r["status"] == "running" and r["started"] == "now" and r["seed"] == recipe.train.seed
    assert r["data"] == {"fingerprint": "fp1", "rows": 10} and r["memory_estimate_gib"] == {"total": 1.0}
    assert not {"resumed", "fit", "world_size", "distributed", "data_changed_at"} & r.keys()


def test_a_resumed_segment_keeps_what_the_earlier_ones_recorded(recipe):
    previous = {
        "started": "first",
        "resumed": [{"at": "second", "from": "checkpoint-2"}],
        "before": [{"text": "hi", "complies": True}],
        "retain_before": {"loss": 1.5},
        "task_before": {"score": 0.1},  # kept by run.json itself: the segment's record does not carry it
        "data": {"fingerprint": "fp0"},
    }
    r = info(recipe, world_size=2, previous=previous, resumed_from="checkpoint-4", resumed_at="third")
    assert r["started"] == "first"
    assert r["resumed"] == [*previous["resumed"], {"at": "third", "from": "checkpoint-4"}]
    assert r["before"] == previous["before"] and r["retain_before"] == previous["retain_before"]
    assert r["data_changed_at"] == "checkpoint-4"  # resumed on other data (--allow-data-change)
    assert r["distributed"] == {"strategy": recipe.distributed.strategy, "world_size": 2}
    same = info(recipe, world_size=1, previous={"data": {"fingerprint": "fp1"}}, resumed_from="checkpoint-4")
    assert "data_changed_at" not in same


def summary(recipe, **kw):
    args = dict(
        name="run",
        loss={},
        device="cpu",
        global_step=4,
        totals={"loss_sum": 6.0, "tokens": 300, "train_seconds": 3.0},
        training_loss=9.9,
        peak=(1.25, "CPU RSS"),
        samples={"samples": []},
        data_summary="10 rows",
        watch={"health": []},
    )
    return records.summary(recipe, LOADED, **{**args, **kw})


def test_the_summary_covers_every_segment(recipe):
    s = summary(recipe)
    assert s["train_loss"] == 1.5 and s["tokens_per_s"] == 100.0  # the run's totals, not TRL's figure
    assert (s["peak_mem_gib"], s["mem_kind"], s["trainable_parameters"]) == (1.25, "CPU RSS", 7)
    assert s["data"] == {"summary": "10 rows"} and s["health"] == [] and s["samples"] == []
    none = summary(recipe, global_step=0, totals={"loss_sum": 0.0, "tokens": 0, "train_seconds": 0.0})
    assert none["train_loss"] == 9.9 and none["tokens_per_s"] is None


def test_fit_and_stop_and_early_stopping():
    planned = {"planned_peak_gib": 10.0}
    assert records.fit(planned, {"real_peak_gib": 9.0}) == {"planned_peak_gib": 10.0, "real_peak_gib": 9.0}
    assert planned == {"planned_peak_gib": 10.0}  # the plan itself is left as it was
    assert records.stop("killed", "why") == {"status": "killed", "error": "why"}
    state = SimpleNamespace(global_step=6, max_steps=10, best_model_checkpoint="c", best_metric=0.5)
    assert records.early_stopping(2, state) == {
        "patience": 2,
        "stopped_early": True,
        "max_steps": 10,
        "best_checkpoint": "c",
        "best_metric": 0.5,
    }
