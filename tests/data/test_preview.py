"""fastsft.data.preview (`fastsft data preview`): the trained tokens marked in the terminal, in a file and
as JSON, through the function and the command."""

import io
import json

from click.testing import CliRunner

from fastsft import data as D

from _tiny import (
    CONV,
    TRAINED,
    make_recipe,
    qa,
    write_jsonl,
)


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
