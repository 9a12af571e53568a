"""fastsft.recipe as a whole: every shipped recipe validates, and `fastsft validate` refuses what `run` would
(the model, the data files, the template, the kernel, the target modules)."""

import pytest

from fastsft import recipe as R

from _tiny import RECIPES, TINY_RECIPE, load_text


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    r = R.load(path)
    assert r.model.name
    # data paths resolve from the recipe's folder, and the shipped data is there
    paths = [r.data.train] if r.data.train else [s["path"] for s in r.data.sources]
    paths += [r.data.retain] if r.data.retain else []
    assert paths and all(r.resolve_path(p).exists() for p in paths)


def test_validate_refuses_what_run_would_refuse(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from fastsft.cli.main import main

    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[model]\nname = "builtin:tiny-mistrall"\n[data]\ntrain = "nope.jsonl"\nchat_template = "chatmll"\n'
        '[loss]\nkernel = "unsloth"\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 2
    for part in (
        "unknown built-in model",
        "data.train = 'nope.jsonl': file not found",
        "'chatmll': unknown template",
        'kernel = "unsloth": unsloth is not installed',
    ):
        assert part in result.output, result.output
    # target modules against the model's config (the built-in model is on this machine)
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    typo = tmp_path / "typo.toml"
    typo.write_text(
        f'[model]\nname = "{tiny_model_dir}"\n[lora]\ntarget_modules = ["q_proj", "v_prj"]\n'
        f'[data]\ntrain = "d.jsonl"\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["validate", str(typo)])
    assert result.exit_code == 2 and "'v_prj' (did you mean 'v_proj'?) matches no module" in result.output


def test_an_uncached_hub_id_fails_at_once_when_offline(tmp_path, monkeypatch):
    import time

    from fastsft.backends import resolve_model_path
    from fastsft.errors import BackendError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = load_text(
        tmp_path, TINY_RECIPE.replace('name = "builtin:tiny-mistral"', 'name = "someone/not-cached-7b"')
    )
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match="not in the local cache, and the hub cannot be reached"):
        resolve_model_path(r)
    assert time.perf_counter() - t0 < 5
