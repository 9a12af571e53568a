"""What `fastsft validate` (and `run`, before the model loads) checks beyond the schema
(fastsft.run.preflight)."""

import shutil

from click.testing import CliRunner

from fastsft.cli.main import main

from _tiny import DEMO, TINY_RECIPE


def test_retain_pointing_at_the_training_data_is_refused(tmp_path):
    """`[data] retain` on the training file scored training data and reported "forgetting -3.02" (#28):
    refused by validate when it is the same file or the same bytes, naming both keys."""
    shutil.copy(DEMO, tmp_path / "copy.jsonl")
    (tmp_path / "general.jsonl").write_text(DEMO.read_text().splitlines()[0] + "\n")
    recipe = tmp_path / "r.toml"
    for retain, how in ((str(DEMO), "is the same file as"), ("copy.jsonl", "has the same content as")):
        recipe.write_text(TINY_RECIPE.replace("[data]\n", f'[data]\nretain = "{retain}"\n'))
        result = CliRunner().invoke(main, ["validate", str(recipe)])
        assert result.exit_code == 2, result.output
        assert f"data.retain = {retain!r} {how} data.train = {str(DEMO)!r}" in result.output
    recipe.write_text(TINY_RECIPE.replace("[data]\n", '[data]\nretain = "general.jsonl"\n'))
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
