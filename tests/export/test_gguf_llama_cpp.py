"""fastsft's GGUF files in real llama.cpp (llama-cpp-python, built by tests/install-test-extras.sh into
.cache/llama-cpp-python): each type loads and its greedy answers to the run's prompts agree with the
run's own (transformers) greedy answers, token by token (llama.cpp's top-1 after the run's prefix): 16-bit
equal, 8- and 4-bit within AGREEMENT; Q4_K_M is made by llama.cpp's own quantizer from the F16 file.
Skipped when llama-cpp-python is not installed there. (SmolLM2's files: tests/test_real_model.py.)"""

import pytest
from _llama_cpp import agreement, import_llama_cpp
from click.testing import CliRunner

from fastsft.cli.main import main

from _tiny import TINY_RECIPE, write_recipe

AGREEMENT = {
    "fp16": 1.0,
    "q8_0": 0.9,
    "q4_0": 0.5,
    "q4_k_m": 0.5,
}  # share of answer tokens llama.cpp predicts as the run
PROMPTS = (
    "What sound does a cow make?",
    "Where do you find an owl?",
    "Which colour does a grass have?",
    "Hi",
)


pytestmark = pytest.mark.slow  # a training run, GGUF conversions and real llama.cpp


@pytest.fixture(scope="module")
def llama_cpp():
    return import_llama_cpp()


@pytest.fixture(scope="module")
def run(tmp_path_factory, llama_cpp):
    root = tmp_path_factory.mktemp("llamacpp")
    recipe = write_recipe(root / "r.toml", TINY_RECIPE.replace("max_steps = 6", "max_steps = 60"))
    out = root / "tiny"
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_llama_cpp_answers_as_the_run(run, llama_cpp, tmp_path):
    measured = agreement(llama_cpp, run, PROMPTS, AGREEMENT, tmp_path)
    for dtype, share in AGREEMENT.items():
        assert measured[dtype] >= share, (dtype, measured)
