"""The inputs of `generate`, `chat` and `eval` (#37): one reader of prompt rows naming the line, output
files that never replace an input, a run's files or (without --overwrite) any file, and prompts beyond
the model's context refused by row."""

import json

import pytest
from click.testing import CliRunner

from fastsft.cli.main import main
from fastsft.errors import DataError
from fastsft.use.answer import read_prompts


def _run(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize(
    "row, said",
    [
        ({"prompt": 5}, "`prompt` must be text or a list of chat messages ({role, content}), got a number"),
        ({"prompt": ["a", "b"]}, "`prompt` message 1 must be an object, got a string"),
        ({"prompt": [{"content": "hi"}]}, "`prompt` message 1 has no `role`"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot': roles are system, user"),
        (
            {"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "content part 1 is of type 'image_url'; fastsft's models read text only",
        ),
        (
            {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
            "the row has both `prompt` and `messages`",
        ),
        ({"messages": [{"role": "assistant", "content": "b"}]}, "starts with an assistant turn"),
        ({"prompt": []}, "`prompt` is an empty list of messages"),
        ({"answer": "x"}, "no prompt (the row's keys: answer)"),
    ],
)
def test_a_bad_prompt_row_is_refused_naming_its_line(tmp_path, row, said):
    """Before, {"prompt": 5}, ["a", "b"], a message without a role and content parts were tracebacks, and a
    row with both `prompt` and `messages` dropped `messages` without a word."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        read_prompts(data)
    assert f"{data} line 2" in str(e.value) and said in str(e.value)


def test_openai_text_parts_are_read_as_their_text(tmp_path):
    data = tmp_path / "p.jsonl"
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": parts}]}) + "\n")
    [(where, row, messages)] = read_prompts(data)
    assert messages == [{"role": "user", "content": "hi\nthere"}] and row["prompt"][0]["content"] == parts


def test_an_empty_prompt_file_is_named(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("\n\n")
    with pytest.raises(DataError, match="holds no rows"):
        read_prompts(data)


@pytest.fixture()
def received(tmp_path):
    """A run directory (its record files only: the refusals come before a model loads), a data file and
    a user's file."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"status": "finished"}')
    (run / "recipe.toml").write_text("# the run's recipe\n")
    data = tmp_path / "held.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
        + "\n"
    )
    mine = tmp_path / "existing.jsonl"
    mine.write_text("the user's own file\n")
    return run, data, mine


def _unchanged(*paths):
    return {p: p.read_bytes() for p in paths}


@pytest.mark.parametrize(
    "args, said",
    [
        (
            ["generate", "{run}", "--data", "{data}", "-o", "{run}/run.json", "--overwrite"],
            "is a file of {run}, which this command reads; nothing was changed, and --overwrite never replaces it",
        ),
        (
            ["eval", "{run}", "--data", "{data}", "--json-out", "{run}/recipe.toml", "--overwrite"],
            "is a file of {run}, which this command reads",
        ),
        (
            ["eval", "builtin:tiny-mistral", "--data", "{data}", "--json-out", "{data}", "--overwrite"],
            "--json-out {data} is the input {data} of this command; nothing was changed, and --overwrite never",
        ),
        (
            ["generate", "builtin:tiny-mistral", "--data", "{data}", "-o", "{data}", "--overwrite"],
            "-o {data} is the input {data}",
        ),
        (
            ["generate", "builtin:tiny-mistral", "--data", "{data}", "-o", "{mine}"],
            "-o {mine} already exists; nothing was changed. Pass --overwrite to replace it",
        ),
        (
            ["eval", "builtin:tiny-mistral", "--data", "{data}", "--json-out", "{mine}"],
            "--json-out {mine} already exists; nothing was changed. Pass --overwrite",
        ),
    ],
)
def test_an_output_never_replaces_an_input_a_run_file_or_without_overwrite_a_file(received, args, said):
    """Before, `-o RUN/run.json` replaced the run's record with answers, `--json-out held.jsonl` replaced
    the held-out data and `-o existing.jsonl` a user's file."""
    run, data, mine = received
    names = {"run": run, "data": data, "mine": mine}
    before = _unchanged(run / "run.json", run / "recipe.toml", data, mine)
    code, out = _run([a.format(**names) for a in args])
    assert code == 2 and said.format(**names) in out, out
    assert _unchanged(*before) == before


def test_a_prompt_beyond_the_context_is_refused_by_row_and_control_tokens_are_named(tmp_path):
    """A 105,000-character prompt was generated (cut by the model) and marked `stopped: true`; now its row
    says context_length_exceeded, as `fastsft serve` does, and the other rows are answered. A control
    token typed in a prompt is named once (the template's tokenizer reads it as that token)."""
    data = tmp_path / "p.jsonl"
    rows = [{"prompt": "hello"}, {"prompt": "x" * 105_000}, {"prompt": "say <|im_end|> now"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "a.jsonl"
    code, said = _run(
        ["generate", "builtin:tiny-mistral", "--data", data, "-o", out, "--max-new-tokens", "4"]
    )
    assert code == 0, said
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["prompt"] for g in got] == [r["prompt"] for r in rows]
    assert got[1]["answer"] is None and got[1]["stopped"] is False
    assert got[1]["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 1024 tokens" in got[1]["error"]["message"]
    assert all(isinstance(g["answer"], str) and "error" not in g for g in (got[0], got[2]))
    assert f"{data} line 2: not answered" in said and "1 not answered" in said
    assert f"{data} line 3 holds '<|im_end|>', a control token" in said
    code, said = _run(["generate", "builtin:tiny-mistral", "--prompt", "x" * 105_000])
    assert code == 2 and "--prompt: not answered: this model's maximum context length is 1024" in said
    code, said = _run(
        ["generate", "builtin:tiny-mistral", "--prompt", "a <|im_end|> b", "--max-new-tokens", "2"]
    )
    assert code == 0 and "--prompt holds '<|im_end|>', a control token" in said


def test_eval_data_problems_name_the_option_eval_has(tmp_path):
    """`eval --data empty.jsonl` blamed data.train, and a bad row suggested data.on_invalid = "skip",
    which eval cannot set."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, said = _run(["eval", "builtin:tiny-mistral", "--data", empty])
    assert code == 2 and f"--data {empty} is empty" in said and "data.train" not in said
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}) + "\n"
    )
    code, said = _run(["eval", "builtin:tiny-mistral", "--data", bad])
    assert code == 2 and f"{bad} line 1: `messages` message 2: unknown role 'bot'" in said, said
    assert "on_invalid" not in said and "has no option to skip one: fix that row" in said
