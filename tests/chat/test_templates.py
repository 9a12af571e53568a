"""fastsft.chat.templates: the built-in chat templates mark the answers and the end of a turn, and a
template is loaded by name or path; the system-role rule of the templates without one."""

import pytest

from fastsft.chat import templates as C
from fastsft.errors import DataError

from _tiny import CHATML_NO_MARKERS, CONV, make_recipe, prepare, qa, write_jsonl


@pytest.mark.parametrize("name", sorted(C.TEMPLATES))
def test_builtin_templates_mark_answers_and_end_of_turn(tok, name):
    template = C.load_template(name)
    assert C.has_generation_markers(template)
    out = tok.apply_chat_template(
        CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=template
    )
    trained = tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m])
    eot = {"chatml": "<|im_end|>", "qwen2.5": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}
    end = eot.get(name, tok.eos_token)  # mistral ends the answer with the tokenizer's eos
    assert trained.replace(" A plum", "A plum").lstrip() == f"A lime is green.{end}A plum is purple.{end}"
    prompt = tok.apply_chat_template(
        CONV[:2], tokenize=False, add_generation_prompt=True, chat_template=template
    )
    full = tok.apply_chat_template(CONV[:3], tokenize=False, chat_template=template)
    assert full.startswith(prompt)  # prefix-preserving
    with_tool = CONV[:3] + [{"role": "tool", "content": "42"}, CONV[3], CONV[4]]
    assert "42" in tok.apply_chat_template(with_tool, tokenize=False, chat_template=template)


def test_load_template_by_path_and_unknown_name(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert C.load_template("t.jinja", tmp_path) == "{{ messages[0]['content'] }}"
    with pytest.raises(DataError, match="chatml, llama3, mistral, qwen2.5, gemma"):
        C.load_template("chatmll")
    with pytest.raises(DataError, match="file not found"):
        C.load_template("missing.jinja", tmp_path)
    assert not C.has_generation_markers(CHATML_NO_MARKERS)
    assert C.has_generation_markers("{%- generation -%}x{% endgeneration %}")


def test_end_of_turn_token(tok):
    assert C.end_of_turn_token(tok) == "<|im_end|>"
    assert C.end_of_turn_token(tok, C.load_template("mistral")) == tok.eos_token
    tok.chat_template = None
    assert C.end_of_turn_token(tok) == tok.eos_token


@pytest.mark.parametrize("name", ["mistral", "gemma"])
def test_system_message_after_a_user_turn_is_kept_or_refused(tmp_path, tok, name):
    """Mistral and Gemma have no system role: a later system message goes into the next user message;
    one with no user message after it is refused by line, never dropped (#28)."""
    later = CONV[:3] + [{"role": "system", "content": "Now be formal."}] + CONV[3:]
    text = tok.apply_chat_template(later, tokenize=False, chat_template=C.load_template(name))
    assert "Now be formal." in text and "Be brief." in text
    two = [CONV[0], {"role": "system", "content": "Use metres."}] + CONV[1:3]
    assert "Use metres." in tok.apply_chat_template(two, tokenize=False, chat_template=C.load_template(name))
    orphan = [CONV[1], {"role": "system", "content": "Now be formal."}, CONV[2]]
    write_jsonl(tmp_path / "train.jsonl", [qa(1), {"messages": orphan}, qa(3), qa(4), qa(5)])
    with pytest.raises(DataError, match=r"line 2: .*message 2 \(system\) has no user message after it"):
        prepare(make_recipe(tmp_path, chat_template=name), tok)
