"""The task metric (fastsft.chat.scoring) and the batched greedy generator (answer_batch) against the
one-at-a-time one, on the tiny model."""

import pytest

from fastsft.chat import scoring


def test_normalised_match_ignores_case_spaces_and_punctuation():
    assert scoring.normalise("  The   Ocean. ") == "the ocean"
    assert scoring.normalise("Positive!") == scoring.normalise("positive")
    s = scoring.score(["The ocean.", "blue", "A cow says moo."], ["the ocean", "blue", "A cow says moo"])
    assert (s["exact_count"], s["normalised_count"], s["n"]) == (1, 3, 3)
    assert s["classes"] is None  # free text: no known set


def test_a_known_set_of_answers_gets_accuracy_and_a_confusion_table():
    expected = ["positive", "negative", "neutral"] * 4 + ["an odd one"]
    got = ["Positive.", "negative", "neutral"] * 3 + ["negative", "negative", "I think so"] + ["x"]
    s = scoring.score(expected, got)
    c = s["classes"]
    assert set(c["labels"]) == {"positive", "negative", "neutral"}
    assert c["n"] == 12 and c["correct"] == 10  # the odd row is not one of the labels
    assert c["confusion"]["positive"] == {"positive": 3, "negative": 1, "neutral": 0, "(other)": 0}
    assert c["confusion"]["neutral"]["(other)"] == 1
    rows = scoring.confusion_rows(c)
    assert rows[0][0].startswith("expected") and len(rows) == 4
    assert "accuracy over 3 labels 10/12" in scoring.summary_line(s)


def test_short_answers():
    assert scoring.is_short(["positive", "a cow says moo"])
    assert not scoring.is_short(["one two three four five six seven eight nine ten"] * 3)


def test_batched_answers_equal_one_at_a_time_greedy_answers(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastsft.chat.generation import answer, answer_batch

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = [
        [{"role": "user", "content": text}]
        for text in (
            "Hi",
            "What colour is a banana?",
            "Where do you find an owl, and what does it say at night in the forest?",
            "Cow?",
            "Tell me about the sea in one sentence.",
        )
    ]
    one = [answer(model, tok, p, max_new_tokens=12) for p in prompts]
    for batch_size in (2, 5):
        many = answer_batch(model, tok, prompts, max_new_tokens=12, batch_size=batch_size)
        assert [a.ids for a in many] == [a.ids for a in one], batch_size
        assert [a.stopped for a in many] == [a.stopped for a in one]
    assert len({len(x[0]["content"]) for x in prompts}) == len(prompts)  # different lengths: padding happened


@pytest.mark.parametrize("n", [0])
def test_answer_batch_of_nothing(tiny_model_dir, n):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastsft.chat.generation import answer_batch

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert answer_batch(model, tok, [], batch_size=4) == []
