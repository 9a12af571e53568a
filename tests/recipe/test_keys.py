"""fastsft.recipe.keys: a key's type, bounds and choices come from its declaration, one value is checked
against them, and an unknown name gets the closest known one (or fastsft's name for an Axolotl or
LLaMA-Factory key)."""

import dataclasses
import typing
from dataclasses import dataclass, fields

import pytest

from fastsft import recipe as R
from fastsft.errors import RecipeError
from fastsft.recipe import keys

from _tiny import TINY_RECIPE, load_text


def test_misspelt_key_is_named_with_a_suggestion(tmp_path):
    text = TINY_RECIPE.replace("learning_rate = 3e-3", "learnig_rate = 3e-3")
    with pytest.raises(RecipeError) as e:
        load_text(tmp_path, text)
    msg = str(e.value)
    assert "`learnig_rate`: unknown key in [train]; did you mean `learning_rate`?" in msg
    assert "r.toml" in msg


def test_choices_suggest(tmp_path):
    with pytest.raises(RecipeError, match=r"must be one of .*did you mean `cosine`"):
        load_text(tmp_path, TINY_RECIPE, ["train.lr_scheduler_type=cosin"])


def _keys_with(*names):
    return [
        pytest.param(s, f, id=f"{s}.{f.name}")
        for s, cls in R.SECTIONS.items()
        for f in fields(cls)
        if any(f.metadata[n] is not None for n in names)
    ]


def _raw_with(section, key, value):
    raw = {"model": {"name": "x"}, "data": {"train": "y", "val_ratio": 0.1}}  # eval data for eval_strategy
    raw.setdefault(section, {})[key] = value
    return raw


@pytest.mark.parametrize("section, f", _keys_with("min", "max"))
def test_bounds_come_from_the_field_metadata(section, f):
    """An out-of-range value is refused with the bound its dataclass field declares."""
    m, kind = f.metadata, R.SCHEMA[section][f.name].type
    cast = float if kind == "float" else int
    cases = []
    if m["max"] is not None:
        cases.append((cast(m["max"] + 1), f"must be <= {m['max']}"))
    if m["min"] is not None:
        op = ">" if m["min_exclusive"] else ">="
        cases.append((cast(m["min"] if m["min_exclusive"] else m["min"] - 1), f"must be {op} {m['min']}"))
    for value, bound in cases:
        with pytest.raises(RecipeError) as e:
            R.validate(_raw_with(section, f.name, value))
        assert e.value.problems[0].startswith(f"[{section}] {f.name} = {value!r}: {bound}"), e.value.problems


@pytest.mark.parametrize("section, f", _keys_with("choices"))
def test_choices_come_from_the_field_metadata(section, f):
    choices = f.metadata["choices"]
    near = choices[-1][:-1] + "x"  # one letter off the last choice
    with pytest.raises(RecipeError) as e:
        R.validate(_raw_with(section, f.name, near))
    allowed = ", ".join(choices)
    wanted = (
        f"[{section}] {f.name}: {near!r} is not one of {allowed}"
        if R.SCHEMA[section][f.name].type == "list"
        else f"[{section}] {f.name} = {near!r}: must be one of {allowed}"
    )
    assert e.value.problems == [f"{wanted}; did you mean `{choices[-1]}`?"]
    R.validate(_raw_with(section, f.name, choices[-1]))  # each choice is accepted


def test_a_key_is_typed_by_its_annotation():
    @dataclass(frozen=True, kw_only=True)
    class Demo(R.Section):
        a: int | None = R.key(None, "an optional int", min=1)
        b: str | list[str] = R.key("x", "names")
        c: str = R.key(R.REQUIRED, "required", sft=True)

    hints = typing.get_type_hints(Demo)
    a, b, c = (R.Key.of(f, hints[f.name]) for f in fields(Demo))
    assert (a.type, a.nullable, a.required, a.min, a.default) == ("int", True, False, 1, None)
    assert (b.type, b.nullable) == ("str_list", False)
    assert (c.type, c.required, c.sft) == ("str", True, "c")
    table_list = R.Key.of(fields(Demo)[0], list[dict])
    assert table_list.type == "table_list"
    problems = keys.check_value("data", dataclasses.replace(table_list, name="sources"), [{"path": "a"}, 3])[
        1
    ]
    assert problems == [
        "[data] sources = [{'path': 'a'}, 3]: expected an array of tables, e.g. [[data.sources]] blocks"
    ]
    with pytest.raises(TypeError, match="unsupported type"):
        R.Key.of(fields(Demo)[0], list[int])


def test_none_unsets_only_a_nullable_key():
    assert R.validate(_raw_with("train", "eval_steps", None)).train.eval_steps is None
    with pytest.raises(RecipeError, match=r"\[loss\] label_smoothing = None: expected a number, got None"):
        R.validate(_raw_with("loss", "label_smoothing", None))


def test_every_foreign_key_names_a_real_key():
    for foreign, (section, key) in R.FOREIGN_KEYS.items():
        assert key in R.SCHEMA[section], foreign


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
