"""fastsft.data.spec: what the data pipeline reads of a recipe (`DataSpec.of`), its paths resolved from
the recipe's folder, and `one_file`: another file read as `data.train` is, with nothing else."""

from pathlib import Path

from fastsft.data.spec import DataSpec

from _tiny import load_tiny


def test_of_a_recipe_and_of_none(tmp_path, monkeypatch):
    recipe = load_tiny(tmp_path, "train.seed=7", "data.val_ratio=0.2")
    spec = DataSpec.of(recipe)
    assert (spec.data, spec.seed, spec.base_dir) == (recipe.data, 7, recipe.base_dir)
    assert DataSpec.of(spec) is spec
    monkeypatch.chdir(tmp_path)
    default = DataSpec.of(None)  # every [data] default, the default seed, the current folder
    assert default.base_dir == tmp_path and default.data.train is None and default.seed == 42


def test_paths_resolve_from_the_recipes_folder(tmp_path, monkeypatch):
    spec = DataSpec.of(load_tiny(tmp_path))
    monkeypatch.chdir("/")
    assert spec.resolve_path("rows.jsonl") == spec.base_dir / "rows.jsonl" == tmp_path / "rows.jsonl"
    assert spec.resolve_path("/abs/rows.jsonl") == Path("/abs/rows.jsonl")


def test_one_file_reads_only_that_file(tmp_path):
    held = tmp_path / "held.jsonl"
    recipe = load_tiny(
        tmp_path, f'data.eval="{held}"', f'data.retain="{held}"', "data.val_ratio=0.1", "data.format=messages"
    )
    spec = DataSpec.of(recipe)
    assert spec.data.retain and spec.data.eval
    one = spec.one_file(tmp_path / "other.jsonl")
    assert one.data.train == str((tmp_path / "other.jsonl").resolve())
    assert (one.data.sources, one.data.eval, one.data.retain, one.data.val_ratio) == ([], None, None, 0.0)
    assert one.data.format == "messages" and one.data.max_length == spec.data.max_length  # the rest kept
    assert one.seed == spec.seed and spec.data.eval == str(held)  # the original is untouched
    assert spec.one_file("x.jsonl", format="alpaca", columns={"a": "b"}).data.format == "alpaca"
