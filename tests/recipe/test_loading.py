"""fastsft.recipe.loading: a recipe read from TOML and `--set` overrides, every problem reported at once,
hostile input refused with a message, and the resolved recipe written back as valid TOML."""

import json

import pytest

from fastsft import recipe as R
from fastsft.errors import RecipeError

from _tiny import TINY_RECIPE, load_text


def test_all_problems_reported_together(tmp_path):
    text = (
        TINY_RECIPE.replace("learning_rate = 3e-3", "learning_rate = -1").replace("r = 8", 'r = "eight"')
        + "\n[trian]\nseed = 1\n"
    )
    with pytest.raises(RecipeError) as e:
        load_text(tmp_path, text)
    problems = e.value.problems
    assert len(problems) == 3, problems
    joined = "\n".join(problems)
    assert "[train] learning_rate = -1: must be > 0" in joined
    assert "[lora] r = 'eight': expected an integer, got a string" in joined
    assert "[trian]: unknown section; did you mean `train`?" in joined


def test_overrides_are_toml_values_and_validated(tmp_path):
    r = load_text(
        tmp_path,
        TINY_RECIPE,
        [
            "train.learning_rate=1e-4",
            "lora.target_modules=['q_proj','v_proj']",
            "train.lr_scheduler_type=linear",
        ],
    )
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


def test_resolved_recipe_round_trips(tmp_path):
    r = load_text(tmp_path, TINY_RECIPE, ["train.seed=7"])
    p2 = tmp_path / "again.toml"
    p2.write_text(r.to_toml())
    r2 = R.load(p2)
    assert r2.as_dict() == r.as_dict()


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


def test_a_set_value_is_one_toml_value(tmp_path):
    """A --set value that goes on over a new line into a table (or more keys) was read as its first
    line, the table dropped (#28): refused, naming the --set."""
    for bad in (
        'train.learning_rate=1e-4\n[model]\nname = "other"',
        "train.lr_scheduler_type=cosine\n[model]",
    ):
        with pytest.raises(RecipeError, match="not a single TOML value") as e:
            load_text(tmp_path, TINY_RECIPE, [bad])
        assert "r.toml" in str(e.value) and repr(bad) in str(e.value)
    r = load_text(tmp_path, TINY_RECIPE, ["lora.target_modules=[\n'q_proj',\n'v_proj']"])  # one value
    assert r.lora.target_modules == ["q_proj", "v_proj"]


def test_an_empty_set_value_or_model_name_is_refused(tmp_path):
    """`--set model.name=` validated and `run` then loaded the recipe's folder as the model (#28)."""
    with pytest.raises(RecipeError, match=r"--set model.name=: no value after `=`"):
        load_text(tmp_path, TINY_RECIPE, ["model.name="])
    for name in ('""', '"  "'):
        with pytest.raises(RecipeError, match=r"\[model\] name = .* is empty"):
            load_text(tmp_path, TINY_RECIPE, [f"model.name={name}"])


def test_a_byte_order_mark_is_accepted(tmp_path):
    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbf" + TINY_RECIPE.encode())
    assert R.load(p).model.name == "builtin:tiny-mistral"
