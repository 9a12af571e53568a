"""report.md says what a number means where it could mislead: forgetting only where the base had something
to forget, the compliance sample's size and why it differs from the task metric's, the first logged loss
beside the smoothed ones."""

import math

from fastsft.run import report, retain
from fastsft.rundir import RunDir


def summary(**extra) -> dict:
    return {
        "name": "r",
        "model": "builtin:tiny-mistral",
        "backend": "transformers",
        "backend_reason": "auto",
        "dtype": "fp32",
        "loss": {"implementation": "torch"},
        "device": "CPU",
        "global_step": 20,
        "train_seconds": 3.0,
        "tokens_per_s": 100.0,
        "peak_mem_gib": 0.7,
        "mem_kind": "cpu peak RSS",
        **extra,
    }


def written(tmp_path, s: dict, losses=(0.568, 0.05, 0.04, 0.041, 0.03, 0.02, 0.018)) -> str:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    for i, x in enumerate(losses):
        run.append_metrics({"step": i + 1, "loss": x})
    report.write_report(run, s)
    return (run.path / "report.md").read_text()


def row(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {start}"))


def test_a_base_that_knew_nothing_of_the_retain_set_shows_no_forgetting(tmp_path):
    """The demo's random tiny model: retain loss 8.43 -> 9.62 is no forgetting when ln V is 6.27."""
    vocab = 528
    r = retain.summary({"loss": 8.43}, {"loss": 9.62, "tokens": 1066}, source="general", vocab_size=vocab)
    assert math.isclose(r["uniform"], math.log(vocab))
    line = row(written(tmp_path, summary(retain=r)), "retain loss")
    assert "(forgetting)" not in line
    assert (
        "knew nothing of the retain set" in line
        and "ln V = 6.27" in line
        and "no forgetting is measured" in line
    )


def test_a_base_that_knew_the_retain_set_shows_its_forgetting(tmp_path):
    r = retain.summary({"loss": 1.2}, {"loss": 1.9, "tokens": 1066}, source="general", vocab_size=49152)
    line = row(written(tmp_path, summary(retain=r)), "retain loss")
    assert "(forgetting)" in line and "knew nothing" not in line


def test_compliance_names_its_sample_and_why_it_differs_from_the_task_metric(tmp_path):
    from fastsft.chat.scoring import score

    task = {"before": score(["a"] * 14, ["b"] * 14), "after": score(["a"] * 14, ["a"] * 14)}
    comp = {"base": 0.0, "fine_tuned": 1.0, "n": 3}
    line = row(written(tmp_path, summary(task=task, compliance=comp)), "template compliance")
    assert "(of 3: the sample prompts answered below; the task metric scores 14 held-out answers" in line


def test_the_loss_line_shows_the_first_logged_loss_beside_the_smoothed_ones(tmp_path):
    """A run that starts at 0.568 and whose smoothed first figure is 0.041 says both."""
    line = row(written(tmp_path, summary()), "train loss")
    assert "0.0410 / 0.0300" in line  # median of the first 5, median of the last 5
    assert "first logged (raw)" in line and "0.5680 (step 1)" in line


def test_on_the_cpu_one_memory_figure_the_process_peak_rss(tmp_path):
    text = written(tmp_path, summary())
    assert row(text, "peak memory") == "| peak memory | 0.70 GiB (cpu peak RSS) |"
    assert "estimate" not in text
