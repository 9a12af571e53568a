"""fastsft's GGUF files in real llama.cpp (llama-cpp-python, built by tests/install-test-extras.sh into
.cache/llama-cpp-python): the share of greedy answer tokens equal to the run's own (transformers) greedy
answers, per GGUF type. Used by tests/export/test_gguf_llama_cpp.py (the tiny run) and
tests/test_real_model.py (SmolLM2-135M-Instruct)."""

import importlib
import json
import sys

import pytest
from click.testing import CliRunner

from _tiny import REPO

LLAMA_CPP = REPO / ".cache" / "llama-cpp-python"


def import_llama_cpp():
    """The llama_cpp module from .cache/llama-cpp-python, or a skip saying how to get it."""
    if not (LLAMA_CPP / "llama_cpp").is_dir():
        pytest.skip("llama-cpp-python is not in .cache/llama-cpp-python (tests/install-test-extras.sh)")
    sys.path.insert(0, str(LLAMA_CPP))
    try:
        return importlib.import_module("llama_cpp")
    finally:
        sys.path.remove(str(LLAMA_CPP))


def agreement(llama_cpp, run, questions, dtypes, tmp_path, *, max_new_tokens: int = 12) -> dict:
    """{dtype: share of answer tokens llama.cpp predicts as the run does}: `fastsft export RUN --format gguf
    --dtype D` for each dtype; the run's greedy answers to `questions` (through its chat template) are fed
    to llama.cpp after their prompts, and each answer token counts when llama.cpp's top-1 at that position
    is the token the run chose (teacher forcing: one near-tie flipped early does not void the rest)."""
    import numpy as np

    from fastsft.chat.generation import answer_batch
    from fastsft.chat.templates import chat_ids
    from fastsft.cli.main import main
    from fastsft.use import load_for_use

    loaded = load_for_use(run)
    tok = loaded.tokenizer
    prompts = [
        chat_ids(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0].tolist()
        for q in questions
    ]
    want = [
        a.ids for a in answer_batch(loaded.model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=4)
    ]
    assert all(want), want
    measured = {}
    for dtype in dtypes:
        out = tmp_path / dtype
        result = CliRunner().invoke(
            main, ["export", str(run), "--format", "gguf", "--dtype", dtype, "--to", str(out)]
        )
        assert result.exit_code == 0, result.output
        file = out / json.loads((out / "export.json").read_text())["file"]
        llm = llama_cpp.Llama(model_path=str(file), n_ctx=512, n_threads=2, verbose=False, logits_all=True)
        equal = total = 0
        for prompt, answer in zip(prompts, want, strict=True):
            llm.reset()
            llm.eval(prompt + answer)
            top1 = np.asarray(llm.scores[len(prompt) - 1 : len(prompt) + len(answer) - 1]).argmax(axis=-1)
            equal += int((top1 == np.asarray(answer)).sum())
            total += len(answer)
        measured[dtype] = equal / total
        del llm
    print(f"llama.cpp top-1 agreement with {run.name}'s answers:", measured)
    return measured
