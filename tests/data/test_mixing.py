"""[[data.sources]]: several data sets mixed by ratio. The shares hold in the prepared training set
(rows counted by where they came from), every source goes through the normal pipeline (its own format,
errors naming its file and line), and bad mixes are refused with the key named."""

import json

import pytest

from fastsft import data as D
from fastsft import recipe as R
from fastsft.data import mixing
from fastsft.errors import DataError, RecipeError

from _tiny import DEMO

# rows that open with the question (the prompt column the prepared set keeps is the turns before the first answer)
ROWS = [r for r in map(json.loads, DEMO.read_text().splitlines()) if r["messages"][0]["role"] == "user"]


def write_sources(tmp_path, n_task=60, n_general=200):
    """task.jsonl (messages) and general.jsonl (the same kind of rows, in sharegpt form), disjoint."""

    def tagged(rows, tag):  # the demo repeats questions: a tag on the first question tells the sources apart
        out = []
        for i, r in enumerate(rows):
            msgs = [dict(m) for m in r["messages"]]
            first = next(m for m in msgs if m["role"] == "user")
            first["content"] = f"{tag} {i}: {first['content']}"
            out.append({"messages": msgs})
        return out

    task = tagged(ROWS[:n_task], "task")
    general = tagged(ROWS[100 : 100 + n_general], "general")
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task))
    sharegpt = [
        {
            "conversations": [
                {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                for m in r["messages"]
            ]
        }
        for r in general
    ]
    (tmp_path / "general.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sharegpt))
    return {first_question(r["messages"]) for r in task}, {first_question(r["messages"]) for r in general}


def first_question(msgs):
    return next(m["content"] for m in msgs if m["role"] == "user")


def recipe_with(tmp_path, sources: str, *extra: str):
    text = f"""
[model]
name = "builtin:tiny-mistral"
[data]
max_length = 96
{chr(10).join(extra)}
{sources}
[train]
seed = 3
"""
    p = tmp_path / "mix.toml"
    p.write_text(text)
    return R.load(p)


MIX_80_20 = """
[[data.sources]]
path = "task.jsonl"
share = 0.8
[[data.sources]]
path = "general.jsonl"
format = "sharegpt"
share = 0.2
"""


def origins(dataset, task_prompts, general_prompts):
    counts = {"task": 0, "general": 0, "?": 0}
    for row in dataset:
        msgs = row.get("messages") or row.get("prompt")
        first = first_question(msgs)
        counts["task" if first in task_prompts else "general" if first in general_prompts else "?"] += 1
    return counts


def test_the_mix_ratio_holds_in_the_prepared_training_set(tmp_path, tok):
    task, general = write_sources(tmp_path)
    prepared = D.prepare_data(recipe_with(tmp_path, MIX_80_20), tok, log=lambda m: None)
    got = origins(prepared.train, task, general)
    n = len(prepared.train)
    # first_exhausted: the 60 task rows are 80%, so the mix has 75 rows: all 60 task rows, 15 general
    assert got == {"task": 60, "general": 15, "?": 0} and n == 75
    assert [r["used"] for r in prepared.stats["mix"]] == [60, 15]
    assert "mix: task.jsonl 80%" in prepared.stats["summary"]
    # the sources are interleaved, not in blocks: general rows appear in both halves
    firsts = [origins([row], task, general)["general"] for row in prepared.train]
    assert 0 < sum(firsts[: n // 2]) < 15


def test_weights_and_all_exhausted_repeat_the_smaller_source(tmp_path, tok):
    task, general = write_sources(tmp_path, n_task=20, n_general=100)
    sources = MIX_80_20.replace("share = 0.8", "weight = 1").replace("share = 0.2", "weight = 1")
    prepared = D.prepare_data(
        recipe_with(tmp_path, sources, 'stopping_strategy = "all_exhausted"'), tok, log=lambda m: None
    )
    got = origins(prepared.train, task, general)
    assert got == {
        "task": 100,
        "general": 100,
        "?": 0,
    }  # every general row once, the 20 task rows 5 times each
    seen = [first_question(r["messages"]) for r in prepared.train if first_question(r["messages"]) in task]
    assert {seen.count(p) for p in task} == {5}


def test_a_held_out_split_keeps_the_ratio_within_tolerance(tmp_path, tok):
    task, general = write_sources(tmp_path, n_task=160, n_general=300)
    prepared = D.prepare_data(recipe_with(tmp_path, MIX_80_20, "val_ratio = 0.1"), tok, log=lambda m: None)
    got = origins(prepared.train, task, general)
    share = got["general"] / (got["task"] + got["general"])
    assert got["?"] == 0 and abs(share - 0.2) < 0.04
    assert len(prepared.eval) == 20


@pytest.mark.parametrize("k", [2, 3, 5])
def test_counts_are_exact_shares(k):
    fractions = [1 / k] * k
    got = mixing.counts([1000 + i for i in range(k)], fractions, "first_exhausted")
    assert got == [1000] * k  # the smallest source sets the size; none is repeated
    got = mixing.counts([997] * k, [0.7] + [0.3 / (k - 1)] * (k - 1), "first_exhausted")
    exact = [sum(got) * f for f in [0.7] + [0.3 / (k - 1)] * (k - 1)]
    assert all(abs(g - x) < 1 for g, x in zip(got, exact, strict=True)) and max(got) <= 997
    got = mixing.counts([10, 1000, 500], [0.5, 0.3, 0.2], "first_exhausted")
    assert got == [10, 6, 4]
    got = mixing.counts([10, 1000, 500], [0.5, 0.3, 0.2], "all_exhausted")
    assert sum(got) == 3334 and got[1] == 1000 and got[0] == 1667


def test_a_bad_row_in_a_source_names_that_file_and_line(tmp_path, tok):
    write_sources(tmp_path)
    lines = (tmp_path / "general.jsonl").read_text().splitlines()
    lines[6] = '{"conversations": [{"from": "human", "value": "hi"}]}'  # no answer
    (tmp_path / "general.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"general\.jsonl line 7"):
        D.prepare_data(recipe_with(tmp_path, MIX_80_20), tok, log=lambda m: None)


def test_sources_of_different_kinds_are_refused(tmp_path, tok):
    write_sources(tmp_path)
    (tmp_path / "text.jsonl").write_text('{"text": "plain words"}\n' * 5)
    sources = MIX_80_20.replace('path = "general.jsonl"\nformat = "sharegpt"', 'path = "text.jsonl"')
    with pytest.raises(
        DataError, match=r"#2 \(text.jsonl\) is plain text but #1 \(task.jsonl\) is a conversation"
    ):
        D.prepare_data(recipe_with(tmp_path, sources), tok, log=lambda m: None)
    with pytest.raises(DataError, match="missing.jsonl"):
        D.prepare_data(
            recipe_with(tmp_path, MIX_80_20.replace("general.jsonl", "missing.jsonl")),
            tok,
            log=lambda m: None,
        )


@pytest.mark.parametrize(
    "sources, extra, fragment",
    [
        (MIX_80_20.replace("share = 0.2", "share = 0.3"), "", "add up to 1.1, more than 1"),
        (MIX_80_20.replace("share = 0.2", "share = 0.1"), "", "add up to 0.9"),
        (MIX_80_20.replace("share = 0.2", "share = 0.2\nweight = 2"), "", "`weight` or `share`, not both"),
        (MIX_80_20.replace("share = 0.2", "shre = 0.2"), "", "did you mean `share`?"),
        (MIX_80_20.replace('path = "task.jsonl"\n', ""), "", "`path` is required"),
        (MIX_80_20.replace("share = 0.8", "weight = -1"), "", "weight = -1 must be a number > 0"),
        (MIX_80_20, 'train = "task.jsonl"', "train and [[data.sources]] are both set"),
        (
            MIX_80_20.replace('format = "sharegpt"', 'format = "sharegtp"'),
            "",
            "format = 'sharegtp' must be one of",
        ),
        ("", "", "[data] train is required"),
    ],
)
def test_bad_mixes_are_recipe_errors(tmp_path, sources, extra, fragment):
    with pytest.raises(RecipeError) as e:
        recipe_with(tmp_path, sources, extra)
    assert fragment in str(e.value)


def test_the_fingerprint_follows_the_shares_and_bytes_not_the_spelling(tmp_path, tok):
    write_sources(tmp_path)
    r = recipe_with(tmp_path, MIX_80_20)
    f = D.prepare_data(r, tok, log=lambda m: None).fingerprint
    assert (
        D.prepare_data(r.with_absolute_paths(), tok, log=lambda m: None).fingerprint == f
    )  # as a resume reads it
    other = recipe_with(tmp_path, MIX_80_20.replace("0.8", "0.7").replace("0.2", "0.3"))
    assert D.prepare_data(other, tok, log=lambda m: None).fingerprint != f
    r.to_toml()  # the resolved recipe, sources included, is writable
    assert R.validate(R.parse(r.with_absolute_paths().to_toml())).data.sources[0]["path"] == str(
        tmp_path / "task.jsonl"
    )
