"""fastsft.data.prepare: truncation counted and warned, the held-out split (seeded, distinct rows), an eval
file, the stats and summary, and plain prompt/completion rows trained as one exchange."""

import json

import pytest

from fastsft import data as D
from fastsft import recipe as R
from fastsft.errors import DataError

from _tiny import (
    CONV,
    RECIPES,
    make_recipe,
    prepare,
    qa,
    write_jsonl,
)


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
