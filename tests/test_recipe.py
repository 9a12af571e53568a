import json

import pytest

from fastsft import recipe as R
from fastsft.errors import RecipeError

from _tiny import RECIPES, TINY_RECIPE


def load_text(tmp_path, text, overrides=None):
    p = tmp_path / "r.toml"
    p.write_text(text, encoding="utf-8")
    return R.load(p, overrides)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    r = R.load(path)
    assert r.model.name
    # data paths resolve from the recipe's folder, and the shipped data is there
    assert r.resolve_path(r.data.train).exists()


def test_defaults_and_types(tmp_path):
    r = load_text(tmp_path, TINY_RECIPE)
    assert r.train.learning_rate == 3e-3
    assert r.lora.bias == "none" and r.lora.target_modules == "all-linear"
    assert r.loss.kernel == "auto" and r.loss.label_smoothing == 0.0
    assert isinstance(r.lora.lora_alpha, float)


def test_misspelt_key_is_named_with_a_suggestion(tmp_path):
    text = TINY_RECIPE.replace("learning_rate = 3e-3", "learnig_rate = 3e-3")
    with pytest.raises(RecipeError) as e:
        load_text(tmp_path, text)
    msg = str(e.value)
    assert "`learnig_rate`: unknown key in [train]; did you mean `learning_rate`?" in msg
    assert "r.toml" in msg


def test_all_problems_reported_together(tmp_path):
    text = TINY_RECIPE.replace("learning_rate = 3e-3", "learning_rate = -1").replace(
        "r = 8", "r = \"eight\""
    ) + "\n[trian]\nseed = 1\n"
    with pytest.raises(RecipeError) as e:
        load_text(tmp_path, text)
    problems = e.value.problems
    assert len(problems) == 3, problems
    joined = "\n".join(problems)
    assert "[train] learning_rate = -1: must be > 0" in joined
    assert "[lora] r = 'eight': expected an integer, got a string" in joined
    assert "[trian]: unknown section; did you mean `train`?" in joined


def test_choices_suggest(tmp_path):
    with pytest.raises(RecipeError, match=r"must be one of .*did you mean `cosine`"):
        load_text(tmp_path, TINY_RECIPE, ["train.lr_scheduler_type=cosin"])


def test_overrides_are_toml_values_and_validated(tmp_path):
    r = load_text(tmp_path, TINY_RECIPE, ["train.learning_rate=1e-4", "lora.target_modules=['q_proj','v_proj']", "train.lr_scheduler_type=linear"])
    assert r.train.learning_rate == 1e-4
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.train.lr_scheduler_type == "linear"
    with pytest.raises(RecipeError, match="max_steps"):
        load_text(tmp_path, TINY_RECIPE, ["train.max_steps=true"])
    with pytest.raises(RecipeError, match="section.key=value"):
        load_text(tmp_path, TINY_RECIPE, ["train.max_steps"])


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "the recipe is empty"),
        ("[model\nname='x'", "invalid TOML"),
        (b"\xff\xfe\x00garbage", "not a text file"),
        ("[model]\nname='x'\n", "[data] train is required"),
        ("[model]\nname = 'x'\n[data]\ntrain='d.jsonl'\n[train]\nlearning_rate = nan\n", "finite"),
        ("[model]\nname = 'x'\n[data]\ntrain='d.jsonl'\n[train]\nmax_steps = 99999999999999\n", "must be <="),
    ],
)
def test_hostile_recipes_get_a_message(tmp_path, text, fragment):
    p = tmp_path / "bad.toml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RecipeError) as e:
        R.load(p)
    assert fragment in str(e.value)
    assert "bad.toml" in str(e.value)


def test_cross_checks(tmp_path):
    with pytest.raises(RecipeError, match="needs evaluation data"):
        load_text(tmp_path, TINY_RECIPE, ["train.eval_strategy=steps", "train.eval_steps=2"])
    with pytest.raises(RecipeError, match="formats"):
        load_text(tmp_path, TINY_RECIPE, ["export.formats=['merged','ggfu']"])


def test_resolved_recipe_round_trips(tmp_path):
    r = load_text(tmp_path, TINY_RECIPE, ["train.seed=7"])
    p2 = tmp_path / "again.toml"
    p2.write_text(r.to_toml())
    r2 = R.load(p2)
    assert r2.as_dict() == r.as_dict()


def test_json_schema_covers_every_key():
    schema = R.json_schema()
    json.dumps(schema)
    for section, keys in R.SCHEMA.items():
        assert set(schema["properties"][section]["properties"]) == set(keys)
    assert schema["properties"]["train"]["properties"]["lr_scheduler_type"]["enum"][0] == "cosine"


def test_any_string_in_a_recipe_is_written_back_as_valid_toml(tmp_path):
    """recipe.toml is written by a TOML writer: control characters, quotes, backslashes and newlines in
    a --set string read back unchanged."""
    p = tmp_path / "r.toml"
    p.write_text(TINY_RECIPE)
    nasty = 'a\x01b"c\\d\ne\tf\x7f\u2028'
    r = R.load(p, ["data.chat_template=" + json.dumps(nasty)])  # JSON escapes are TOML escapes
    assert r.data.chat_template == nasty
    again = R.validate(R.parse(r.to_toml()))
    assert again.data.chat_template == nasty
    assert again.as_dict() == r.as_dict()


def test_axolotl_and_llama_factory_keys_get_the_fastsft_name():
    raw = R.parse(
        'lr = 1e-4\n[model]\nbase_model = "x"\n[data]\ntrain = "y"\nsequence_len = 64\n'
        "[train]\nmicro_batch_size = 2\n[lora]\nlora_r = 4\n"
    )
    with pytest.raises(RecipeError) as e:
        R.validate(raw)
    msg = str(e.value)
    for line in (
        "`lr`: a key outside any section; fastsft calls it `learning_rate` in [train]",
        "`base_model`: unknown key in [model]; fastsft calls it `name` in [model]",
        "`sequence_len`: unknown key in [data]; fastsft calls it `max_length` in [data]",
        "`micro_batch_size`: unknown key in [train]; fastsft calls it `per_device_train_batch_size` in [train]",
        "`lora_r`: unknown key in [lora]; fastsft calls it `r` in [lora]",
    ):
        assert line in msg, msg
    with pytest.raises(RecipeError, match=r"`max_steps`: a key outside any section; it belongs in \[train\]"):
        R.validate(R.parse('max_steps = 3\n[model]\nname = "x"\n[data]\ntrain = "y"\n'))


def test_validate_refuses_what_run_would_refuse(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from fastsft.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[model]\nname = "builtin:tiny-mistrall"\n[data]\ntrain = "nope.jsonl"\nchat_template = "chatmll"\n'
        '[loss]\nkernel = "unsloth"\n', encoding="utf-8")  # fmt: skip
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 2
    for part in ("unknown built-in model", "data.train = 'nope.jsonl': file not found", "'chatmll': unknown template",
                 'kernel = "unsloth": unsloth is not installed'):  # fmt: skip
        assert part in result.output, result.output
    # target modules against the model's config (the built-in model is on this machine)
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    typo = tmp_path / "typo.toml"
    typo.write_text(f'[model]\nname = "{tiny_model_dir}"\n[lora]\ntarget_modules = ["q_proj", "v_prj"]\n'
                    f'[data]\ntrain = "d.jsonl"\n', encoding="utf-8")  # fmt: skip
    result = CliRunner().invoke(main, ["validate", str(typo)])
    assert result.exit_code == 2 and "'v_prj' (did you mean 'v_proj'?) matches no module" in result.output


def test_an_uncached_hub_id_fails_at_once_when_offline(tmp_path, monkeypatch):
    import time

    from fastsft.backends import resolve_model_path
    from fastsft.errors import BackendError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = load_text(tmp_path, TINY_RECIPE.replace('name = "builtin:tiny-mistral"', 'name = "someone/not-cached-7b"'))
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match="not in the local cache, and the hub cannot be reached"):
        resolve_model_path(r)
    assert time.perf_counter() - t0 < 5
