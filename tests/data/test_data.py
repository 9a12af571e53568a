"""Data loading, validation, masks, truncation and preview (fastsft.data); the chat templates themselves are
tests/chat/test_templates.py."""

import csv
import io
import json

import pytest
from click.testing import CliRunner

from fastsft import data as D
from fastsft import recipe as R
from fastsft.chat import templates as C
from fastsft.errors import DataError

from _tiny import CHATML_NO_MARKERS, CONV, RECIPES

TRAINED = "A lime is green.<|im_end|>A plum is purple.<|im_end|>"


def qa(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    }


def write_jsonl(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def make_recipe(tmp_path, data_file="train.jsonl", **data):
    lines = ["[model]", 'name = "builtin:tiny-mistral"', "[data]", f"train = {json.dumps(str(data_file))}"]
    for k, v in data.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, str):
            v = json.dumps(v)
        elif isinstance(v, dict):
            v = "{ " + ", ".join(f"{a} = {json.dumps(b)}" for a, b in v.items()) + " }"
        lines.append(f"{k} = {v}")
    path = tmp_path / "recipe.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return R.load(path)


def quiet(msg):
    pass


def prepare(recipe, tok, log=quiet):
    return D.prepare_data(recipe, tok, log=log)


def trained_texts(recipe, tok, n=5):
    rows, _ = D.preview_rows(recipe, tok, n)
    return [r["trained_text"] for r in rows]


# ----------------------------------------------------------------------------------------------
# shapes and file types
# ----------------------------------------------------------------------------------------------

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


def _write(kind, folder, rows):
    if kind == "jsonl":
        return write_jsonl(folder / "d.jsonl", rows).name
    if kind == "json":
        (folder / "d.json").write_text(json.dumps(rows), encoding="utf-8")
        return "d.json"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), folder / "d.parquet")
        return "d.parquet"
    if kind == "csv":
        with open(folder / "d.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["messages"])
            w.writeheader()
            for r in rows:
                w.writerow({"messages": json.dumps(r["messages"])})  # lists are JSON in a CSV cell
        return "d.csv"
    if kind == "disk":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder / "ds"))
        return "ds"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "disk"])
def test_each_file_type(tmp_path, tok, kind):
    rows = [{"messages": CONV}, qa(1), qa(2)]
    name = _write(kind, tmp_path, rows)
    recipe = make_recipe(tmp_path, name)
    p = prepare(recipe, tok)
    assert len(p.train) == 3
    assert p.train[0]["messages"] == CONV[:2]  # the prompt turns
    assert trained_texts(recipe, tok, 1) == [TRAINED]


def test_disk_split_and_missing_file(tmp_path, tok):
    _write("disk", tmp_path, [qa(1)])
    with pytest.raises(DataError, match="no split 'test'; its splits are train"):
        prepare(make_recipe(tmp_path, "ds", split="test"), tok)
    with pytest.raises(DataError, match="file not found"):
        prepare(make_recipe(tmp_path, "nope.jsonl"), tok)


def test_csv_text_column(tmp_path, tok):
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([["first line"], ["second, with a comma"]])
    p = prepare(make_recipe(tmp_path, "d.csv"), tok)
    assert [tok.decode(ids) for ids in p.train["input_ids"]] == [
        "first line<|im_end|>",
        "second, with a comma<|im_end|>",
    ]


# ----------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------


def test_exact_masks_on_a_multi_turn_example(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}])
    recipe = make_recipe(tmp_path)
    (row,), stats = D.preview_rows(recipe, tok, 1)
    assert row["trained_text"] == TRAINED
    assert row["input_ids"] == tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    # label positions: every token of each answer and its <|im_end|>, nothing else
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    trained_ids = [i for i in row["labels"] if i != -100]
    assert trained_ids.count(eot) == 2
    assert tok.decode(trained_ids) == TRAINED
    assert stats["end_of_turn_token"] == "<|im_end|>"
    assert stats["trained_tokens"] == len(trained_ids)


def test_template_without_markers_still_masks_assistant_turns(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}, qa(1)])
    (tmp_path / "plain.jinja").write_text(CHATML_NO_MARKERS, encoding="utf-8")
    with_markers = D.preview_rows(make_recipe(tmp_path), tok, 2)[0]
    recipe = make_recipe(tmp_path, chat_template="plain.jinja")
    p = prepare(recipe, tok)
    assert p.stats["route"] == "pretokenized" and not p.stats["generation_markers"]
    assert set(p.train.column_names) == {"input_ids", "assistant_masks", "messages"}
    assert p.sft_kwargs["assistant_only_loss"] is False  # the masks travel with the data
    rows = D.preview_rows(recipe, tok, 2)[0]
    assert [r["labels"] for r in rows] == [r["labels"] for r in with_markers]
    assert rows[0]["trained_text"] == TRAINED
    assert p.train[0]["input_ids"] == rows[0]["input_ids"]
    assert [
        i if m else -100 for i, m in zip(p.train[0]["input_ids"], p.train[0]["assistant_masks"], strict=True)
    ] == (rows[0]["labels"])


@pytest.mark.parametrize("case", ["markers", "no_markers", "prompt_completion", "text"])
def test_trl_builds_the_same_labels_as_preview(tmp_path, tiny_model_dir, tok, case):
    """What SFTTrainer trains on is what preview shows (TRL 1.15 and 1.16 prepare data alike)."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    rows = {
        "markers": [{"messages": CONV}],
        "no_markers": [{"messages": CONV}],
        "prompt_completion": [{"prompt": CONV[:2], "completion": [CONV[2]]}],
        "text": [{"text": "Some text."}],
    }[case]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "plain.jinja").write_text(CHATML_NO_MARKERS, encoding="utf-8")
    recipe = make_recipe(tmp_path, **({"chat_template": "plain.jinja"} if case == "no_markers" else {}))
    p = prepare(recipe, tok)
    shown = D.preview_rows(recipe, tok, 1)[0][0]
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, **p.sft_kwargs)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = SFTTrainer(model=model, args=args, train_dataset=p.train, processing_class=tok)
    row = trainer.train_dataset[0]
    assert row["input_ids"] == shown["input_ids"]
    assert row["labels"] == shown["labels"]


TOOL_ROW = {
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}],
        },
        {"role": "tool", "content": "sleet"},
        {"role": "assistant", "content": "Sleet in Oslo."},
    ],
}
ONCE_CASES = {  # rows, [data] settings, tokenizations per row in prepare_data
    "markers": ([{"messages": CONV}, qa(1), TOOL_ROW], {}, 1),
    "no_markers": ([{"messages": CONV}, qa(1), TOOL_ROW], {"chat_template": "plain.jinja"}, 1),
    "prompt_completion": (
        [{"prompt": CONV[:2], "completion": [CONV[2]]}, {"prompt": [CONV[3]], "completion": [CONV[4]]}],
        {},
        2,
    ),  # the prompt alone, then prompt + completion: where they part, the completion starts
    "text": ([{"text": "Some text."}, {"text": "More text."}], {}, 1),
    "packing": ([{"messages": CONV}, qa(1), qa(2)], {"packing": True, "max_length": 64}, 1),
}


@pytest.mark.parametrize("case", sorted(ONCE_CASES))
def test_rows_are_tokenized_once(tmp_path, tiny_model_dir, tok, monkeypatch, case):
    """prepare_data tokenizes each row once and hands SFTTrainer input_ids and masks: TRL tokenizes
    nothing (it builds labels, truncates, packs), and a second run reads the cache instead."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    rows, settings, per_row = ONCE_CASES[case]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "plain.jinja").write_text(CHATML_NO_MARKERS, encoding="utf-8")
    monkeypatch.setenv("FASTSFT_CACHE", str(tmp_path / "cache"))
    recipe = make_recipe(tmp_path, **settings)
    calls, depth = [], [0]
    cls = type(tok)
    call, render = cls.__call__, cls.apply_chat_template

    def probe(text) -> bool:  # end_of_turn_token's "Again?" turn, the fast-tokenizer check's "a"
        return isinstance(text, str) and ("Again?" in text or text == "a")

    def counted_call(self, *args, **kwargs):
        text = args[0] if args else kwargs.get("text")
        if not depth[0] and not probe(text):
            calls.append(text)
        return call(self, *args, **kwargs)

    def counted_render(self, *args, **kwargs):
        if kwargs.get("tokenize", True):  # renders and tokenizes (through __call__, not counted twice)
            calls.append(args[0] if args else kwargs.get("conversation"))
        depth[0] += 1
        try:
            return render(self, *args, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(cls, "__call__", counted_call)
    monkeypatch.setattr(cls, "apply_chat_template", counted_render)
    p = prepare(recipe, tok)
    assert len(calls) == per_row * len(rows), calls
    assert "input_ids" in p.train.column_names
    calls.clear()
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, **p.sft_kwargs)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=p.train,
        processing_class=tok,
    )
    assert calls == []  # TRL took the ids as they are
    if case == "packing":  # packed rows hold every example's ids, in our order within a row
        assert sum(len(r["input_ids"]) for r in trainer.train_dataset) == sum(
            len(ids) for ids in p.train["input_ids"]
        )
    else:
        assert sorted(map(tuple, trainer.train_dataset["input_ids"])) == sorted(
            map(tuple, p.train["input_ids"])
        )
    assert prepare(recipe, tok).train[:] == p.train[:] and calls == []  # the second time, from the cache


MASK_LIMIT = 480  # cuts the tool row (503 tokens with the tiny tokenizer) after its first answer


@pytest.mark.parametrize("template", ["chatml", "no_markers"])
def test_training_preview_and_eval_mask_alike(tmp_path, tiny_model_dir, tok, template):
    """One owner of masking: the labels SFTTrainer trains on (train and eval sets), the ones `fastsft data
    preview` shows and the ones `fastsft eval` scores (the run's eval set, and `--data FILE`) are the same,
    on a multi-turn row, a tool row and a short row."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from fastsft.data.encode import collate
    from fastsft.use import evaluation as use

    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}, TOOL_ROW, qa(1)])
    (tmp_path / "plain.jinja").write_text(CHATML_NO_MARKERS, encoding="utf-8")
    recipe = make_recipe(
        tmp_path,
        eval="train.jsonl",
        max_length=MASK_LIMIT,
        chat_template="chatml" if template == "chatml" else "plain.jinja",
    )
    p = prepare(recipe, tok)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        shuffle_dataset=False,
        **p.sft_kwargs,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=p.train,
        eval_dataset=p.eval,
        processing_class=tok,
    )
    trained = trainer.train_dataset["labels"]
    assert trainer.eval_dataset["labels"] == trained
    shown = [r["labels"] for r in D.preview_rows(recipe, tok, 3)[0]]
    assert shown == trained
    items, _ = use.eval_conversations(recipe, tok)
    assert [
        collate([item], max_length=MASK_LIMIT, pad_id=0)["labels"][0].tolist() for item in items
    ] == trained
    items = D.encode_file(recipe, tok, tmp_path / "train.jsonl")
    assert [
        collate([item], max_length=MASK_LIMIT, pad_id=0)["labels"][0].tolist() for item in items
    ] == trained
    assert any(x != -100 for x in trained[1]) and any(x == -100 for x in trained[1])  # the tool row is masked
    assert len(trained[1]) == MASK_LIMIT  # the tool row is cut at max_length, in every path


def test_end_of_turn_outside_generation_is_refused(tmp_path, tok):
    bad = C.CHATML.replace(
        "{{- '<|im_end|>' -}}\n{%- endgeneration -%}\n",
        "{%- endgeneration -%}\n{{- '<|im_end|>' -}}\n",
    )
    assert bad != C.CHATML
    (tmp_path / "bad.jinja").write_text(bad, encoding="utf-8")
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}])
    with pytest.raises(
        DataError, match=r"train.jsonl line 1: the end-of-turn token '<\|im_end\|>'.*never learn to stop"
    ):
        prepare(make_recipe(tmp_path, chat_template="bad.jinja"), tok)
    # training on everything trains the end-of-turn token too
    p = prepare(make_recipe(tmp_path, chat_template="bad.jinja", assistant_only_loss=False), tok)
    assert p.stats["trained_share"] == 1.0


def test_template_override_by_name_and_path(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}])
    recipe = make_recipe(tmp_path, chat_template="mistral")
    p = prepare(recipe, tok)
    assert p.stats["template"] == "mistral"
    assert tok.chat_template == C.TEMPLATES["mistral"]
    (row,), _ = D.preview_rows(recipe, tok, 1)
    assert row["text"].startswith("[INST] Be brief.\n\nColour of a lime? [/INST]")
    assert row["trained_text"] == " A lime is green.<|im_end|> A plum is purple.<|im_end|>"
    (tmp_path / "mine.jinja").write_text(C.CHATML, encoding="utf-8")
    assert prepare(make_recipe(tmp_path, chat_template="mine.jinja"), tok).stats["template"] == "mine.jinja"
    with pytest.raises(DataError, match="unknown template"):
        prepare(make_recipe(tmp_path, chat_template="chatmll"), tok)
    # llama3's <|eot_id|> is not a token of this tokenizer: its end of turn would never be trained
    with pytest.raises(DataError, match="never learn to stop"):
        prepare(make_recipe(tmp_path, chat_template="llama3"), tok)


def test_no_chat_template_for_conversations(tmp_path, tok):
    tok.chat_template = None
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}])
    with pytest.raises(DataError, match="no chat template: set data.chat_template"):
        prepare(make_recipe(tmp_path), tok)
    assert prepare(make_recipe(tmp_path, chat_template="chatml"), tok).stats["template"] == "chatml"


def test_pad_token_is_not_the_end_of_turn_token(tmp_path, tok):
    tok.pad_token = None
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}])
    logs = []
    p = prepare(make_recipe(tmp_path), tok, log=logs.append)
    assert tok.pad_token == "<|endoftext|>" != p.stats["end_of_turn_token"]
    assert p.stats["added_pad_token"] is None
    assert any("no pad token" in m for m in logs)


# ----------------------------------------------------------------------------------------------
# bad rows
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# truncation, split, stats, fingerprint
# ----------------------------------------------------------------------------------------------


def test_truncation_is_counted_and_warned(tmp_path, tok):
    long_answer = " ".join(["A banana is yellow."] * 10)
    long = {
        "messages": [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": long_answer}]
    }
    write_jsonl(tmp_path / "train.jsonl", [qa(1), long, qa(3)])
    logs = []
    recipe = make_recipe(tmp_path, max_length=40)
    p = prepare(recipe, tok, log=logs.append)
    full = D.preview_rows(make_recipe(tmp_path, max_length=1024), tok, 3)[0][1]
    n_trained = sum(1 for x in full["labels"] if x != -100)
    kept = sum(1 for x in full["labels"][:40] if x != -100)
    assert p.stats["truncated_examples"] == 1
    assert p.stats["answer_tokens_lost"] == n_trained - kept > 0
    assert p.stats["tokens_per_example"]["max"] == len(full["input_ids"])
    assert any("truncated" in m and "answer token(s) are lost" in m for m in logs)
    shown = D.preview_rows(recipe, tok, 3)[0][1]
    assert len(shown["input_ids"]) == 40 and shown["labels"] == full["labels"][:40]


def test_no_trained_token_after_truncation_is_named(tmp_path, tok):
    long_q = {
        "messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "Yes."}]
    }
    write_jsonl(tmp_path / "train.jsonl", [qa(1), qa(2), long_q, qa(4)])
    with pytest.raises(
        DataError, match=r"train.jsonl line 3: no token carries loss after truncation to max_length = 32"
    ):
        prepare(make_recipe(tmp_path, max_length=32), tok)
    p = prepare(make_recipe(tmp_path, max_length=32, on_invalid="skip"), tok)
    assert p.stats["skipped"] == 1 and len(p.train) == 3
    assert "line 3" in p.stats["skip_reasons"][0]


def test_val_ratio_split_is_seeded(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(20)])
    a = prepare(make_recipe(tmp_path, val_ratio=0.2), tok)
    b = prepare(make_recipe(tmp_path, val_ratio=0.2), tok)
    assert len(a.train) == 16 and len(a.eval) == 4
    assert a.eval["messages"] == b.eval["messages"]
    seen = {m[0]["content"] for m in a.train["messages"]} | {m[0]["content"] for m in a.eval["messages"]}
    assert len(seen) == 20
    assert a.stats["eval_examples"] == 4
    assert prepare(make_recipe(tmp_path), tok).eval is None


def test_val_ratio_holds_out_distinct_rows_and_no_copy_stays_in_training(tmp_path, tok):
    # 10 distinct rows, each three times (the shipped demo data has 273 distinct rows in 400)
    write_jsonl(tmp_path / "train.jsonl", [qa(i % 10) for i in range(30)])
    p = prepare(make_recipe(tmp_path, val_ratio=0.2), tok)
    held = [m[0]["content"] for m in p.eval["messages"]]
    trained = [m[0]["content"] for m in p.train["messages"]]
    assert len(held) == len(set(held)) == 2  # 20% of the 10 distinct rows, one copy each
    assert not set(held) & set(trained) and len(trained) == 24  # every copy of a held-out row left training
    # the demo data: no eval row copies a training row
    demo = R.load(RECIPES / "tiny.toml")
    d = prepare(demo, tok)
    assert not {tuple(ids) for ids in d.eval["input_ids"]} & {tuple(ids) for ids in d.train["input_ids"]}


def test_eval_file(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [qa(1), qa(2)])
    write_jsonl(tmp_path / "eval.jsonl", [qa(3), {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="eval.jsonl line 2: `messages` has no assistant turn"):
        prepare(make_recipe(tmp_path, eval="eval.jsonl"), tok)
    write_jsonl(tmp_path / "eval.jsonl", [qa(3)])
    p = prepare(make_recipe(tmp_path, eval="eval.jsonl"), tok)
    assert len(p.eval) == 1 and p.stats["eval_examples"] == 1


def test_stats_and_summary(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}, qa(1), qa(2)])
    p = prepare(make_recipe(tmp_path), tok)
    s = p.stats
    for key in (
        "train_examples",
        "eval_examples",
        "tokens_per_example",
        "trained_share",
        "truncated_examples",
        "answer_tokens_lost",
        "skipped",
        "format",
        "template",
        "summary",
    ):
        assert key in s, key
    t = s["tokens_per_example"]
    assert t["min"] <= t["median"] <= t["max"]
    assert 0 < s["trained_share"] < 1
    assert s["summary"].startswith("3 train examples (messages, template tokenizer)")
    json.dumps(s)  # goes into run.json


def test_fingerprint_and_cache(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("FASTSFT_CACHE", str(tmp_path / "cache"))
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}, qa(1)])
    logs = []
    first = prepare(make_recipe(tmp_path), tok, log=logs.append)
    base = first.fingerprint
    assert (tmp_path / "cache" / "data" / base / "stats.json").exists()  # every shape is cached
    assert not any("from the cache" in m for m in logs)
    again = prepare(make_recipe(tmp_path), tok, log=logs.append)
    assert again.fingerprint == base and any("from the cache" in m for m in logs)
    assert again.train[:] == first.train[:] and again.stats == first.stats
    assert prepare(make_recipe(tmp_path, max_length=64), tok).fingerprint != base
    assert prepare(make_recipe(tmp_path, assistant_only_loss=False), tok).fingerprint != base
    (tmp_path / "plain.jinja").write_text(CHATML_NO_MARKERS, encoding="utf-8")
    logs = []
    first = prepare(make_recipe(tmp_path, chat_template="plain.jinja"), tok, log=logs.append)
    assert (tmp_path / "cache" / "data" / first.fingerprint / "stats.json").exists()
    again = prepare(make_recipe(tmp_path, chat_template="plain.jinja"), tok, log=logs.append)
    assert any("from the cache" in m for m in logs)
    assert again.fingerprint == first.fingerprint and again.train[:] == first.train[:]
    assert again.stats == first.stats
    # a changed template (same file name) never reuses the stale cache
    (tmp_path / "plain.jinja").write_text(
        CHATML_NO_MARKERS.replace("<|im_start|>' + message['role']", "<|im_start|>' + message['role'] + ':'"),
        encoding="utf-8",
    )
    changed = prepare(make_recipe(tmp_path, chat_template="plain.jinja"), tok)
    assert changed.fingerprint != first.fingerprint
    assert changed.train[0]["input_ids"] != first.train[0]["input_ids"]
    # changed data too
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}, qa(2)])
    assert prepare(make_recipe(tmp_path), tok).fingerprint != base


# ----------------------------------------------------------------------------------------------
# preview
# ----------------------------------------------------------------------------------------------


def test_preview_rich(tmp_path, tok):
    from rich.console import Console

    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}, qa(1)])
    console = Console(record=True, width=120, force_terminal=True, color_system="truecolor")
    D.preview(make_recipe(tmp_path), tok, n=1, console=console)
    text = console.export_text(clear=False)
    assert "example 1: train.jsonl line 1" in text
    assert "A lime is green." in text and "tokens / example" in text
    assert "example 2:" not in text
    # the bold green spans of the example are exactly the trained tokens, the rest is dim
    from rich.text import Text

    shown = Text.from_ansi(console.export_text(styles=True).split("legend")[0])
    green = [s for s in shown.spans if s.style.bold and s.style.color and s.style.color.number == 2]
    assert "".join(shown.plain[s.start : s.end] for s in green) == TRAINED
    dim = "".join(shown.plain[s.start : s.end] for s in shown.spans if s.style.dim)
    assert "Colour of a lime?" in dim and "A lime" not in dim


def test_preview_to_a_file_marks_trained_tokens_in_plain_text_and_does_not_wrap(tmp_path, tok):
    from rich.console import Console

    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}])
    out = io.StringIO()  # not a terminal: no colours, so plain markers
    D.preview(make_recipe(tmp_path), tok, n=1, console=Console(file=out, width=40))
    text = out.getvalue()
    assert "[[A lime is green.<|im_end|>]]" in text and "[[A plum is purple.<|im_end|>]]" in text
    assert "[[Colour of a lime?" not in text and text.count("[[") == 2 + 1  # two answers + the legend
    assert any(len(line) > 40 for line in text.splitlines())  # a long example line is not cut at 40


def test_preview_json_stdout_only(tmp_path, tok, capsys):
    from rich.console import Console

    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}, qa(1), qa(2)])
    D.preview(make_recipe(tmp_path), tok, n=2, as_json=True, console=Console(stderr=True))
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2
    assert set(rows[0]) >= {"text", "input_ids", "labels", "trained_text"}
    assert rows[0]["trained_text"] == TRAINED
    assert rows[1]["trained_text"] == "Answer 1.<|im_end|>"
    assert "tokens / example" in err


def test_preview_json_through_the_cli(tmp_path):
    from fastsft.cli.main import main

    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}, qa(1)])
    make_recipe(tmp_path)
    result = CliRunner().invoke(main, ["data", "preview", str(tmp_path / "recipe.toml"), "--json", "-n", "1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["trained_text"] == TRAINED
    assert len(row["labels"]) == len(row["input_ids"])
    # a data error is one paragraph on stderr, exit 2
    write_jsonl(tmp_path / "train.jsonl", ['{"messages": ['])
    result = CliRunner().invoke(main, ["data", "preview", str(tmp_path / "recipe.toml"), "--json"])
    assert result.exit_code == 2
    assert "train.jsonl line 1: not valid JSON" in result.stderr


def test_hub_name_needs_network(tmp_path, tok, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="needs network access; otherwise give a local path"):
        prepare(make_recipe(tmp_path, "someone/some-dataset"), tok)


def test_template_errors_name_the_row(tmp_path, tok):
    strict = (
        "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('no system prompts') }}{% endif -%}"
        + C.CHATML
    )
    (tmp_path / "strict.jinja").write_text(strict, encoding="utf-8")
    write_jsonl(tmp_path / "train.jsonl", [qa(1), {"messages": CONV}, qa(3)])
    with pytest.raises(DataError, match="line 2: the chat template fails on this row: no system prompts"):
        prepare(make_recipe(tmp_path, chat_template="strict.jinja"), tok)


def test_string_prompt_that_looks_like_json_stays_a_string(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "[1, 2]", "completion": " 3"}])
    assert D.normalize({"prompt": "[1, 2]", "completion": " 3"}, "prompt_completion") == {
        "prompt": "[1, 2]",
        "completion": " 3",
    }
    p = prepare(make_recipe(tmp_path), tok)
    assert p.train[0]["prompt"] == [{"role": "user", "content": "[1, 2]"}]


def test_plain_prompt_completion_rows_follow_one_rule(tmp_path, tok):
    """With a chat template, a plain prompt/completion row is trained as the user -> assistant exchange
    that generate / chat / eval send (and preview says so); without one, as plain text, and generate
    sends a lone prompt as plain text too."""
    from fastsft.chat.templates import chat_ids

    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Colour of a lime?", "completion": "Green."}])
    said = []
    rows, _ = D.preview_rows(make_recipe(tmp_path), tok, 1, log=said.append)
    assert any("one user -> assistant exchange" in m for m in said)
    prompt = chat_ids(tok, [{"role": "user", "content": "Colour of a lime?"}], add_generation_prompt=True)[
        0
    ].tolist()
    first = next(i for i, x in enumerate(rows[0]["labels"]) if x != -100)
    assert rows[0]["input_ids"][:first] == prompt  # generate's prompt is exactly the untrained prefix
    assert rows[0]["trained_text"] == "Green.<|im_end|>"
    tok.chat_template = None
    rows, _ = D.preview_rows(make_recipe(tmp_path), tok, 1)
    prompt = chat_ids(tok, [{"role": "user", "content": "Colour of a lime?"}], add_generation_prompt=True)[
        0
    ].tolist()
    assert rows[0]["input_ids"][: len(prompt)] == prompt and rows[0]["trained_text"].startswith("Green.")


@pytest.mark.parametrize("name", ["mistral", "gemma"])
def test_system_message_after_a_user_turn_is_kept_or_refused(tmp_path, tok, name):
    """Mistral and Gemma have no system role: a later system message goes into the next user message;
    one with no user message after it is refused by line, never dropped (#28)."""
    later = CONV[:3] + [{"role": "system", "content": "Now be formal."}] + CONV[3:]
    text = tok.apply_chat_template(later, tokenize=False, chat_template=C.load_template(name))
    assert "Now be formal." in text and "Be brief." in text
    two = [CONV[0], {"role": "system", "content": "Use metres."}] + CONV[1:3]
    assert "Use metres." in tok.apply_chat_template(two, tokenize=False, chat_template=C.load_template(name))
    orphan = [CONV[1], {"role": "system", "content": "Now be formal."}, CONV[2]]
    write_jsonl(tmp_path / "train.jsonl", [qa(1), {"messages": orphan}, qa(3), qa(4), qa(5)])
    with pytest.raises(DataError, match=r"line 2: .*message 2 \(system\) has no user message after it"):
        prepare(make_recipe(tmp_path, chat_template=name), tok)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_a_byte_order_mark_is_dropped(tmp_path, tok, kind):
    """A UTF-8 BOM (Excel, Notepad) stuck to the first column's name or made line 1 invalid JSON, with a
    message that did not show it (#28)."""
    name = _write(kind, tmp_path, [{"messages": CONV}, qa(1)])
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    recipe = make_recipe(tmp_path, name)
    assert len(prepare(recipe, tok).train) == 2
    assert trained_texts(recipe, tok, 1) == [TRAINED]


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
