"""fastsft.data.encode: the loss masks (exactly the assistant's tokens, with or without generation markers,
the same as TRL builds them and as preview and eval show them), each row tokenized once, and the chat
template choices and errors that decide them."""

import pytest

from fastsft import data as D
from fastsft.chat import templates as C
from fastsft.errors import DataError

from _tiny import (
    CHATML_NO_MARKERS,
    CONV,
    TRAINED,
    make_recipe,
    prepare,
    qa,
    write_jsonl,
)


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


def test_template_errors_name_the_row(tmp_path, tok):
    strict = (
        "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('no system prompts') }}{% endif -%}"
        + C.CHATML
    )
    (tmp_path / "strict.jinja").write_text(strict, encoding="utf-8")
    write_jsonl(tmp_path / "train.jsonl", [qa(1), {"messages": CONV}, qa(3)])
    with pytest.raises(DataError, match="line 2: the chat template fails on this row: no system prompts"):
        prepare(make_recipe(tmp_path, chat_template="strict.jinja"), tok)
