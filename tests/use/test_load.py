"""Reading a run, adapter or model folder for use (fastsft.use.load)."""

import json

import pytest
from click.testing import CliRunner

from fastsft.cli.main import main

from _tiny import TINY_RECIPE


@pytest.mark.parametrize("checkpoint", [True, False])
def test_a_run_stopped_before_its_first_adapter_says_how_to_resume(tmp_path, checkpoint):
    """eval / generate on a run interrupted before it wrote adapter/ said "neither a run directory" (#28)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text(TINY_RECIPE)
    (run / "run.json").write_text(json.dumps({"status": "interrupted"}))
    if checkpoint:
        (run / "checkpoints" / "checkpoint-4").mkdir(parents=True)
        (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    for args in (["eval", str(run)], ["generate", str(run), "--prompt", "hi"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and result.exc_info[0] is SystemExit, result.output
        out = " ".join(result.output.split())
        assert "stopped before it wrote its first adapter" in out and "status: interrupted" in out
        if checkpoint:
            assert f"step 4: fastsft run --resume {run}" in out
        else:
            assert f"fastsft run RECIPE -o {run} --overwrite" in out


def test_a_base_is_named_as_its_recipe_names_it():
    """`fastsft generate/eval/serve builtin:NAME` (or package:PKG/FILE.gguf) use the folder training reads,
    so the base model is measured as it was trained; before, such a name was "no such folder"."""
    from fastsft.backends import builtin
    from fastsft.use import load_for_use

    loaded = load_for_use("builtin:tiny-mistral")
    assert loaded.kind == "model" and loaded.path == builtin.materialize("builtin:tiny-mistral")
    result = CliRunner().invoke(
        main, ["generate", "builtin:tiny-mistral", "--prompt", "Hi", "--max-new-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
