"""Quantised GGUF files (Q8_0, Q4_0 through gguf.quants), their names and the Ollama Modelfile beside
them, on a tiny run. The files are read back with transformers' GGUF reader (which dequantizes them)
and the greedy answers compared with the run's: equal for F32, within a stated agreement for 8/4-bit.
(The same files in llama.cpp itself: tests/export/test_gguf_llama_cpp.py.)"""

import json

import pytest
from click.testing import CliRunner

from fastsft.cli.main import main

from _tiny import TINY_RECIPE, write_recipe

# every test reads tiny_run, a 30-step run (13 s); the GGUF test converts it too (143 s in all)
pytestmark = pytest.mark.slow

# Greedy answers (12 tokens, 4 prompts) that agree token for token with the run's, at least:
AGREEMENT = {"fp32": 1.0, "q8_0": 0.9, "q4_0": 0.5}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    recipe = write_recipe(root / "r.toml", TINY_RECIPE.replace("max_steps = 6", "max_steps = 30"))
    out = root / "sentiment"
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _greedy(model, tok, prompts):
    from fastsft.chat.generation import answer_batch

    return [a.ids for a in answer_batch(model, tok, prompts, max_new_tokens=12, batch_size=4)]


def test_gguf_types_names_modelfile_and_answers(tiny_run, tmp_path):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from fastsft.use import load_for_use

    loaded = load_for_use(tiny_run)
    prompts = [[{"role": "user", "content": q}] for q in ("Hi", "What sound does a cow make?", "Owl?", "Sea")]
    want = _greedy(loaded.model, loaded.tokenizer, prompts)
    sizes = {}
    for dtype, type_name in (("fp32", "F32"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        out = tmp_path / dtype
        result = CliRunner().invoke(
            main, ["export", str(tiny_run), "--format", "gguf", "--dtype", dtype, "--to", str(out)]
        )
        assert result.exit_code == 0, result.output
        file = out / f"sentiment-{type_name}.gguf"  # <run>-<TYPE>.gguf
        assert file.exists(), sorted(p.name for p in out.iterdir())
        sizes[dtype] = file.stat().st_size
        record = json.loads((out / "export.json").read_text())
        assert record["type"] == type_name and record["modelfile"] == "Modelfile"
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(file)).tensors}
        if dtype != "fp32":
            assert type_name in set(types.values()), types
            assert types["output_norm.weight"] == "F32"
        modelfile = (out / "Modelfile").read_text()
        assert f"FROM ./{file.name}" in modelfile and "PARAMETER stop" in modelfile
        eot = loaded.tokenizer.convert_ids_to_tokens(loaded.eot[0])
        assert json.dumps(eot) in modelfile
        model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=file.name, dtype=torch.float32)
        got = _greedy(model, loaded.tokenizer, prompts)
        pairs = [(a, b) for w, g in zip(want, got, strict=True) for a, b in zip(w, g, strict=False)]
        agree = sum(a == b for a, b in pairs) / max(1, len(pairs))
        assert agree >= AGREEMENT[dtype], (dtype, agree, got, want)
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["fp32"]


def test_quantised_dtypes_are_for_gguf_only(tiny_run, tmp_path):
    result = CliRunner().invoke(
        main, ["export", str(tiny_run), "--format", "merged", "--dtype", "q4_0", "--to", str(tmp_path / "m")]
    )
    assert result.exit_code == 2 and "GGUF quantisation" in result.output and "Traceback" not in result.output


def test_a_k_quant_without_llama_cpp_says_what_to_install(tiny_run, tmp_path, monkeypatch):
    """q4_k_m is llama.cpp's own quantizer's: without llama-cpp-python the export is refused with the
    install and the types fastsft writes itself, and leaves no folder behind."""
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    out = tmp_path / "k"
    result = CliRunner().invoke(
        main, ["export", str(tiny_run), "--format", "gguf", "--dtype", "q4_k_m", "--to", str(out)]
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "pip install llama-cpp-python" in text and "q8_0 or q4_0" in text and "Traceback" not in text
    assert not out.exists()
