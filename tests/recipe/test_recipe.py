import dataclasses
import json
import typing
from dataclasses import FrozenInstanceError, dataclass, fields

import pytest

from fastsft import recipe as R
from fastsft.errors import RecipeError
from fastsft.recipe import keys

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
    paths = [r.data.train] if r.data.train else [s["path"] for s in r.data.sources]
    paths += [r.data.retain] if r.data.retain else []
    assert paths and all(r.resolve_path(p).exists() for p in paths)


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


def test_choices_suggest(tmp_path):
    with pytest.raises(RecipeError, match=r"must be one of .*did you mean `cosine`"):
        load_text(tmp_path, TINY_RECIPE, ["train.lr_scheduler_type=cosin"])


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
    """Every field of every section dataclass is in `fastsft schema`, with its help, bounds and choices."""
    schema = R.json_schema()
    json.dumps(schema)
    assert set(schema["properties"]) == {f.name for f in fields(R.Recipe) if f.name not in ("path", "raw")}
    for section, cls in R.SECTIONS.items():
        props = schema["properties"][section]["properties"]
        assert list(props) == [f.name for f in fields(cls)]
        for f in fields(cls):
            assert props[f.name]["description"] == f.metadata["help"]
            if f.metadata["max"] is not None:
                assert props[f.name]["maximum"] == f.metadata["max"]
    assert schema["properties"]["train"]["properties"]["lr_scheduler_type"]["enum"][0] == "cosine"
    # [data] needs train or [[data.sources]]
    assert schema["properties"]["data"]["anyOf"] == [{"required": ["train"]}, {"required": ["sources"]}]
    assert schema["required"] == ["model", "data"]
    formats = schema["properties"]["export"]["properties"]["formats"]["anyOf"]
    assert formats[1]["items"]["enum"] == list(R.EXPORT_FORMATS)


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


def test_sections_are_frozen_dataclasses_with_typed_values(tmp_path):
    r = load_text(tmp_path, TINY_RECIPE, ["export.formats=adapter"])
    assert isinstance(r.train, R.TrainSection) and isinstance(r.lora, R.LoraSection)
    with pytest.raises(FrozenInstanceError):
        r.train.learning_rate = 1.0
    assert r.export.formats == ["adapter"]  # a list[str] key takes one name as a list of one
    assert r.train.as_dict()["learning_rate"] == 3e-3 and r.as_dict()["lora"]["r"] == 8
    assert r.train.per_device_eval_batch_size is None  # `int | None`: unset


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


def test_path_and_resume_safe_keys_come_from_the_metadata():
    assert ("data", "train") in R.PATH_KEYS and ("distributed", "deepspeed_config") in R.PATH_KEYS
    assert (
        len(R.PATH_KEYS) == 6
    )  # data.retain too ([[data.sources]] paths are made absolute by their own loop)
    assert "train.save_steps" in R.RESUME_SAFE_KEYS and "train.learning_rate" not in R.RESUME_SAFE_KEYS
    assert len(R.RESUME_SAFE_KEYS) == 9  # train.report_to: trackers watch, they do not change the training


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


def test_warmup_longer_than_the_run_is_refused(tmp_path):
    """warmup_steps >= max_steps trained the whole run at a sliver of the learning rate (#28)."""
    with pytest.raises(RecipeError) as e:
        load_text(tmp_path, TINY_RECIPE, ["train.warmup_steps=1000000000"])
    msg = str(e.value)
    assert "warmup_steps = 1000000000" in msg and "max_steps = 6" in msg and "below max_steps" in msg
    assert load_text(tmp_path, TINY_RECIPE, ["train.warmup_steps=5"]).train.warmup_steps == 5
