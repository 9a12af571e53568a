"""Every command takes what a recipe takes as a model, a GGUF file included, and names it as the user did;
the Ollama Modelfile carries the system prompt training used; eval scores JSON answers field by field
(issue 38, item 4)."""

import json

import pytest
from click.testing import CliRunner

from fastsft.cli.main import main
from fastsft.use.scores import json_fields, json_object

from _tiny import TINY_RECIPE, write_recipe

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def test_json_fields_scores_each_key():
    expected = [
        '{"city": "Oslo", "postcode": "0150"}',
        '{"city": "Bergen", "postcode": "5003"}',
        '{"city": "Roma", "postcode": "00100"}',
    ]
    got = [
        '```json\n{"city": "Oslo", "postcode": "0150"}\n```',
        '{"city": "Bergen", "postcode": "5004"}',
        "Roma, 00100",
    ]
    s = json_fields(expected, got)
    assert (s["n"], s["valid_json_count"], s["all_keys_count"]) == (3, 2, 1)
    assert s["keys"]["city"]["correct"] == 2 and s["keys"]["postcode"]["correct"] == 1
    assert json_fields(["A cow says moo.", '{"a": 1}'], ["x", "y"]) is None  # not every reference is JSON
    assert json_object("[1, 2]") is None and json_object(' {"a": [1]} ') == {"a": [1]}


def test_the_default_system_prompt_of_a_template(tok):
    from fastsft.chat.templates import TEMPLATES
    from fastsft.export.gguf import default_system_prompt, modelfile_text

    found = {}
    for name in ("qwen2.5", "chatml", "mistral", "llama3"):
        tok.chat_template = TEMPLATES[name]
        found[name] = default_system_prompt(tok)
    assert found == {"qwen2.5": QWEN_SYSTEM, "chatml": None, "mistral": None, "llama3": None}, found
    text = modelfile_text("m.gguf", TEMPLATES["qwen2.5"], ["<|im_end|>"], system=QWEN_SYSTEM)
    assert f'SYSTEM """{QWEN_SYSTEM}"""' in text
    assert "SYSTEM" not in modelfile_text("m.gguf", TEMPLATES["chatml"], ["<|im_end|>"])


@pytest.fixture(scope="module")
def gguf_export(tmp_path_factory):
    """A tiny run trained with the qwen2.5 template (a default system prompt), exported as an F32 GGUF.
    Its tokenizer is given a BOS token, as the GGUFs recipes train from have (transformers' GGUF tokenizer
    reader fails on a file without tokenizer.ggml.bos_token_id, a bug of its own)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("gguf-ref")
    text = TINY_RECIPE.replace("max_length = 96", 'max_length = 96\nchat_template = "qwen2.5"')
    recipe = write_recipe(root / "r.toml", text)
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(root / "run")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(root / "run" / "adapter")
    tok.bos_token = "<|im_start|>"
    tok.save_pretrained(root / "run" / "adapter")
    out = root / "export"
    result = CliRunner().invoke(
        main, ["export", str(root / "run"), "--format", "gguf", "--dtype", "fp32", "--to", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


def test_the_modelfile_carries_the_system_prompt_training_used(gguf_export):
    modelfile = (gguf_export / "Modelfile").read_text()
    assert f'SYSTEM """{QWEN_SYSTEM}"""' in modelfile, modelfile


def test_eval_takes_a_gguf_file_names_it_as_given_and_scores_json(gguf_export, tmp_path):
    """`fastsft eval FILE.gguf` was refused ("a GGUF export: run it with llama.cpp"); it is read as a
    recipe's `[model] name` reads it, the results name the file (not its cache folder), and JSON answers
    are scored field by field."""
    (file,) = gguf_export.glob("*.gguf")
    data = tmp_path / "held_out.jsonl"
    rows = [("Where is Oslo?", {"city": "Oslo", "postcode": "0150"}), ("Bergen?", {"city": "Bergen"})]
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": json.dumps(a)},
                    ]
                }
            )
            + "\n"
            for q, a in rows
        )
    )
    out = tmp_path / "eval.json"
    args = [
        "eval",
        str(file),
        "--data",
        str(data),
        "-n",
        "2",
        "--max-new-tokens",
        "8",
        "--json-out",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert got["model"] == str(file) and got["kind"] == "model", got["model"]
    assert str(file) in " ".join(result.output.split())
    assert got["json"]["n"] == 2 and set(got["json"]["keys"]) == {"city", "postcode"}
    assert got["json"]["keys"]["city"]["n"] == 2 and got["json"]["keys"]["postcode"]["n"] == 1
    assert "valid JSON objects" in result.output


def test_every_model_command_names_the_forms_it_takes():
    for command in ("eval", "generate", "chat", "serve"):
        result = CliRunner().invoke(main, [command, "--help"])
        text = " ".join(result.output.split())
        assert result.exit_code == 0 and "package:PKG/FILE.gguf" in text and "a GGUF file" in text, text


def test_a_folder_of_gguf_files_names_them(tmp_path):
    (tmp_path / "m-Q8_0.gguf").write_bytes(b"GGUF")
    result = CliRunner().invoke(main, ["eval", str(tmp_path)])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "pass one of them" in out and "m-Q8_0.gguf" in out, out
