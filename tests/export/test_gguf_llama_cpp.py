"""fastsft's GGUF files in real llama.cpp (llama-cpp-python, built by tests/install-test-extras.sh into
.cache/llama-cpp-python): each type loads and its greedy answers to the run's prompts agree with the
run's own (transformers) greedy answers, token by token: 16-bit equal, 8- and 4-bit within AGREEMENT.
Skipped when llama-cpp-python is not installed there."""

import importlib
import json
import sys

import pytest
from click.testing import CliRunner

from fastsft.cli.main import main

from _tiny import REPO, TINY_RECIPE, write_recipe

LLAMA_CPP = REPO / ".cache" / "llama-cpp-python"
AGREEMENT = {"fp16": 1.0, "q8_0": 0.9, "q4_0": 0.5}  # share of answer tokens equal to the run's
PROMPTS = (
    "What sound does a cow make?",
    "Where do you find an owl?",
    "Which colour does a grass have?",
    "Hi",
)


@pytest.fixture(scope="module")
def llama_cpp():
    if not (LLAMA_CPP / "llama_cpp").is_dir():
        pytest.skip("llama-cpp-python is not in .cache/llama-cpp-python (tests/install-test-extras.sh)")
    sys.path.insert(0, str(LLAMA_CPP))
    try:
        return importlib.import_module("llama_cpp")
    finally:
        sys.path.remove(str(LLAMA_CPP))


@pytest.fixture(scope="module")
def run(tmp_path_factory, llama_cpp):
    root = tmp_path_factory.mktemp("llamacpp")
    recipe = write_recipe(root / "r.toml", TINY_RECIPE.replace("max_steps = 6", "max_steps = 60"))
    out = root / "tiny"
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_llama_cpp_answers_as_the_run(run, llama_cpp, tmp_path):
    from fastsft.chat.generation import answer_batch
    from fastsft.chat.templates import chat_ids
    from fastsft.use import load_for_use

    loaded = load_for_use(run)
    tok = loaded.tokenizer
    prompts = [
        chat_ids(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0].tolist()
        for q in PROMPTS
    ]
    want = [a.ids for a in answer_batch(loaded.model, tok, prompts, max_new_tokens=12, batch_size=4)]
    measured = {}
    for dtype in AGREEMENT:
        out = tmp_path / dtype
        result = CliRunner().invoke(
            main, ["export", str(run), "--format", "gguf", "--dtype", dtype, "--to", str(out)]
        )
        assert result.exit_code == 0, result.output
        file = out / json.loads((out / "export.json").read_text())["file"]
        llm = llama_cpp.Llama(model_path=str(file), n_ctx=256, n_threads=2, verbose=False, logits_all=False)
        got = []
        for ids in prompts:
            llm.reset()
            new = []
            for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
                if t in loaded.eot or len(new) == 12:
                    break
                new.append(t)
            got.append(new)
        pairs = [(a, b) for w, g in zip(want, got, strict=True) for a, b in zip(w, g, strict=False)]
        measured[dtype] = sum(a == b for a, b in pairs) / max(1, len(pairs))
        del llm
    print("llama.cpp token agreement with the run:", measured)
    for dtype, share in AGREEMENT.items():
        assert measured[dtype] >= share, (dtype, measured)
