"""fastsft.backends.builtin: the offline tiny models (`builtin:tiny-*`) are made once per cache, with a
tokenizer trained on the spot that carries the ChatML template, and the demo data is seeded."""

import json

import pytest
from transformers import AutoConfig, AutoTokenizer

from fastsft.backends import builtin
from fastsft.errors import BackendError


def test_a_builtin_model_is_made_once_and_loads(tiny_model_dir):
    assert builtin.materialize("builtin:tiny-mistral") == tiny_model_dir  # the second call finds it
    assert tiny_model_dir.name == f"tiny-mistral-v{builtin.BUILTIN_VERSION}"
    config = AutoConfig.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert config.model_type == "mistral" and config.vocab_size == len(tok)
    assert tok.chat_template == builtin.chatml_template()
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert config.pad_token_id == tok.pad_token_id and config.eos_token_id == tok.eos_token_id


def test_an_unknown_name_lists_the_builtin_models():
    with pytest.raises(BackendError) as e:
        builtin.materialize("builtin:tiny-nope")
    assert "'builtin:tiny-nope'" in str(e.value)
    assert all(name in str(e.value) for name in builtin.builtin_names())
    assert builtin.is_builtin("builtin:tiny-llama") and not builtin.is_builtin("HuggingFaceTB/SmolLM2-135M")


def test_demo_rows_are_seeded_conversations():
    rows = builtin.demo_rows(50, seed=3)
    assert rows == builtin.demo_rows(50, seed=3) != builtin.demo_rows(50, seed=4)
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert (
            roles[-1] == "assistant" and roles[-2] == "user" and set(roles) <= {"system", "user", "assistant"}
        )
    assert any(m["role"] == "system" for r in rows for m in r["messages"])  # about a fifth have one
    assert json.loads(json.dumps(rows)) == rows
