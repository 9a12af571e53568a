"""fastsft.data.formats: each data shape detected and normalised to messages (or prompt/completion, text),
columns renamed, and bad rows named by line, skipped and counted."""

import pytest

from fastsft import data as D
from fastsft.errors import DataError

from _tiny import (
    CONV,
    TRAINED,
    make_recipe,
    prepare,
    qa,
    write_jsonl,
)

SHAPES = {
    "messages": ({"messages": CONV}, "messages", TRAINED),
    "conversations": ({"conversations": CONV}, "conversations", TRAINED),
    "sharegpt": (
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Colour of a lime?"},
                {"from": "gpt", "value": "A lime is green."},
            ]
        },
        "sharegpt",
        "A lime is green.<|im_end|>",
    ),
    "alpaca": (
        {"instruction": "Name the colour.", "input": "lime", "output": "Green."},
        "alpaca",
        "Green.<|im_end|>",
    ),
    "prompt_completion": (
        {"prompt": "Q: lime?\nA:", "completion": " green"},
        "prompt_completion",
        " green<|im_end|>",
    ),
    "prompt_completion_messages": (
        {"prompt": CONV[:2], "completion": [CONV[2]]},
        "prompt_completion",
        "A lime is green.<|im_end|>",
    ),
    "text": ({"text": "A lime is green."}, "text", "A lime is green.<|im_end|>"),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_shape_is_detected_and_normalised(tmp_path, tok, shape):
    row, fmt, trained = SHAPES[shape]
    write_jsonl(tmp_path / "train.jsonl", [row, row])
    recipe = make_recipe(tmp_path)
    p = prepare(recipe, tok)
    assert p.stats["format"] == fmt
    # every shape reaches TRL tokenized: input_ids, the loss mask, the prompt turns for the report
    first = p.train[0]
    if fmt in ("messages", "conversations", "sharegpt", "alpaca"):
        assert set(first) == {"input_ids", "assistant_masks", "messages"}
        assert first["messages"] and all(m["role"] != "assistant" for m in first["messages"])
        assert p.stats["assistant_only_loss"] is True
        mask = first["assistant_masks"]
    elif fmt == "prompt_completion":
        # plain rows too: with a chat template they are one user -> assistant exchange
        assert set(first) == {"input_ids", "completion_mask", "prompt"}
        assert first["prompt"][-1]["role"] == "user"
        assert p.sft_kwargs["completion_only_loss"] is True and p.stats["assistant_only_loss"] is True
        mask = first["completion_mask"]
    else:
        assert set(first) == {"input_ids"}  # every token trained: no mask
        mask = [1] * len(first["input_ids"])
    assert p.sft_kwargs["assistant_only_loss"] is False  # the masks travel with the rows
    (shown,), _ = D.preview_rows(recipe, tok, 1)
    assert shown["trained_text"] == trained
    assert first["input_ids"] == shown["input_ids"] and D.labels(first["input_ids"], mask) == shown["labels"]
    # the format can also be given explicitly
    assert prepare(make_recipe(tmp_path, format=fmt), tok).stats["format"] == fmt


def test_alpaca_user_turn_and_sharegpt_roles(tmp_path, tok):
    assert D.normalize({"instruction": "Do X.", "input": "data", "output": "Done."}, "alpaca")[
        "messages"
    ] == [
        {"role": "user", "content": "Do X.\n\ndata"},
        {"role": "assistant", "content": "Done."},
    ]
    row = D.normalize(SHAPES["sharegpt"][0], "sharegpt")
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    write_jsonl(tmp_path / "train.jsonl", [SHAPES["sharegpt"][0]])
    p = prepare(make_recipe(tmp_path), tok)
    assert [m["role"] for m in p.train[0]["messages"]] == ["system", "user"]  # the prompt turns


def test_columns_rename(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"dialog": CONV}])
    p = prepare(make_recipe(tmp_path, columns={"messages": "dialog"}), tok)
    assert p.stats["format"] == "messages"
    with pytest.raises(DataError, match="no such column"):
        prepare(make_recipe(tmp_path, columns={"messages": "dialogue"}), tok)


def test_unknown_shape_says_what_is_expected(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"cannot tell the data's shape.*question, answer.*data.columns"):
        prepare(make_recipe(tmp_path), tok)


BAD_ROWS = {
    "json": ('{"messages": [', "line 4: not valid JSON"),
    "not_object": ("[1, 2]", "line 4: expected a JSON object, got a list"),
    "role": (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistnt", "content": "a"}]},
        "line 4: `messages` message 2: unknown role 'assistnt': roles are system, user, assistant, tool",
    ),
    "missing": ({"mesages": []}, "line 4: missing field `messages`"),
    "no_assistant": (
        {"messages": [{"role": "user", "content": "q"}]},
        "line 4: `messages` has no assistant turn",
    ),
    "empty_answer": (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        "line 4: `messages` message 2: empty assistant answer",
    ),
    "non_string": (
        {"messages": [{"role": "user", "content": {"q": 1}}, {"role": "assistant", "content": "a"}]},
        "line 4: `messages` message 1 (user): `content` must be a string (or OpenAI text parts), got an object",
    ),
    "bare_part": (  # a list is OpenAI's content parts: each part an object with a type
        {"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]},
        "line 4: `messages` message 1 (user): content part 1 is a string without a `type`",
    ),
    "no_content": (
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
        "line 4: `messages` message 1 (user) has no `content`",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_are_named_by_line(tmp_path, tok, case):
    bad, message = BAD_ROWS[case]
    write_jsonl(tmp_path / "train.jsonl", [qa(1), qa(2), qa(3), bad, qa(5), qa(6)])
    with pytest.raises(DataError) as e:
        prepare(make_recipe(tmp_path), tok)
    assert f"train.jsonl {message}" in str(e.value)
    assert 'on_invalid = "skip"' in str(e.value)
    p = prepare(make_recipe(tmp_path, on_invalid="skip"), tok)
    assert p.stats["skipped"] == 1 and len(p.train) == 5
    assert message in p.stats["skip_reasons"][0]


def test_sharegpt_and_prompt_completion_problems(tmp_path, tok):
    write_jsonl(
        tmp_path / "train.jsonl",
        [{"conversations": [{"from": "humn", "value": "q"}, {"from": "gpt", "value": "a"}]}],
    )
    with pytest.raises(
        DataError, match="line 1: `conversations` message 1: unknown role 'humn': roles are human, gpt"
    ):
        prepare(make_recipe(tmp_path, format="sharegpt"), tok)
    write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}]
    )
    with pytest.raises(DataError, match="line 2: `completion` is empty"):
        prepare(make_recipe(tmp_path), tok)
    write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": "p", "completion": "c"}, {"prompt": [CONV[1]], "completion": [CONV[2]]}],
    )
    with pytest.raises(
        DataError, match="line 2: this row is a prompt/completion of messages but the rows before"
    ):
        prepare(make_recipe(tmp_path), tok)
    write_jsonl(tmp_path / "train.jsonl", [{"text": "p c"}])
    with pytest.raises(DataError, match="assistant_only_loss = true needs conversational data"):
        prepare(make_recipe(tmp_path, assistant_only_loss=True), tok)


def test_skip_counts_and_more_than_half_is_an_error(tmp_path, tok):
    bad = {"messages": [{"role": "user", "content": "q"}]}
    write_jsonl(tmp_path / "train.jsonl", [qa(1), bad, qa(3), "{oops", qa(5), qa(6)])
    logs = []
    p = prepare(make_recipe(tmp_path, on_invalid="skip"), tok, log=logs.append)
    assert p.stats["skipped"] == 2 and p.stats["train_examples"] == 4
    assert "line 2" in p.stats["skip_reasons"][0] and "line 4" in p.stats["skip_reasons"][1]
    assert "2 skipped" in p.stats["summary"]
    assert any("2 invalid row(s) skipped" in m for m in logs)
    write_jsonl(tmp_path / "train.jsonl", [qa(1), bad, bad, "{oops", qa(5)])
    with pytest.raises(DataError, match="3 of 5 rows are invalid, more than half"):
        prepare(make_recipe(tmp_path, on_invalid="skip"), tok)


def test_string_prompt_that_looks_like_json_stays_a_string(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "[1, 2]", "completion": " 3"}])
    assert D.normalize({"prompt": "[1, 2]", "completion": " 3"}, "prompt_completion") == {
        "prompt": "[1, 2]",
        "completion": " 3",
    }
    p = prepare(make_recipe(tmp_path), tok)
    assert p.train[0]["prompt"] == [{"role": "user", "content": "[1, 2]"}]


def test_openai_content_parts_are_text_in_every_reader():
    """A messages row whose content is OpenAI's text parts (as users send them to an OpenAI API) is read as
    the joined text: by training, `eval --data`, generate and serve alike (one reader, formats.text_of_parts);
    a part that is not text is refused naming its type and the message."""
    from fastsft.data import formats as F

    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "2+2?"}, {"type": "text", "text": "Briefly."}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
        ]
    }
    assert F.normalize(row, F.detect_format(row))["messages"] == [
        {"role": "user", "content": "2+2?\nBriefly."},
        {"role": "assistant", "content": "4"},
    ]
    row["messages"][0]["content"].append({"type": "input_audio", "input_audio": {}})
    with pytest.raises(DataError, match=r"message 1 \(user\): content part 3 is of type 'input_audio'"):
        D.parse_messages(row["messages"], "messages")
