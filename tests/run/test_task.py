"""fastsft.run.task: which held-out rows the task metric answers (the prompt up to the trained answer, the
answer as the expected text), only when the answers are short, and the answer budget."""

from fastsft.chat.templates import chat_ids
from fastsft.run import task

from _tiny import make_recipe, prepare, write_jsonl


def row(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_held_out_rows_are_prompts_and_expected_answers(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [row("Colour of a lime?", "Green.")] * 4)
    write_jsonl(
        tmp_path / "held.jsonl", [row(f"Colour of lime {i}?", "Green.") for i in range(task.MAX_ROWS + 3)]
    )
    refs = task.held_out(prepare(make_recipe(tmp_path, eval="held.jsonl"), tok), tok)
    assert len(refs) == task.MAX_ROWS  # the first MAX_ROWS
    prompt, expected = refs[0]
    assert expected == "Green."  # the trained answer, without its end-of-turn token
    want = chat_ids(tok, [{"role": "user", "content": "Colour of lime 0?"}], add_generation_prompt=True)[0]
    assert prompt == want.tolist()  # exactly what generation is given
    n = len(tok("Green.", add_special_tokens=False)["input_ids"])
    assert task.budget(tok, refs) == n + task.SLACK_TOKENS


def test_no_metric_without_held_out_rows_or_with_long_answers(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [row("Colour of a lime?", "Green.")] * 4)
    assert task.held_out(prepare(make_recipe(tmp_path), tok), tok) == []  # nothing held out
    essay = " ".join(["word"] * 40) + "."
    write_jsonl(tmp_path / "held.jsonl", [row(f"Tell me about {i}.", essay) for i in range(5)])
    assert task.held_out(prepare(make_recipe(tmp_path, eval="held.jsonl"), tok), tok) == []  # free text
    write_jsonl(tmp_path / "plain.jsonl", [{"text": "A lime is green."}] * 4)
    plain = make_recipe(tmp_path, "plain.jsonl", eval="plain.jsonl")
    assert task.held_out(prepare(plain, tok), tok) == []  # plain text: no prompt to answer
