"""Each memory lever is exact: the loss and every gradient equal the plain checkpointed step's."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fastsft.levers import frozen16, offload, tiled_mlp


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        attn_implementation="sdpa",
    )
    m = LlamaForCausalLM(cfg).to(dtype)
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    # LoRA's B starts at zero: a random one, so every LoRA weight gets a gradient that tells paths apart
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


def _step(model, autocast=None):
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("lever", ["offload", "tiled_mlp", "both"])
def test_lever_is_exact(lever):
    loss0, g0 = _step(_model())
    m = _model()
    if lever in ("offload", "both"):
        assert offload.install(m) == 3
    if lever in ("tiled_mlp", "both"):
        assert tiled_mlp.install(m, 3) == 3
    loss1, g1 = _step(m)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)


def test_frozen16_is_exact_under_bf16_autocast():
    """QLoRA's float32 embeddings / lm_head (PEFT's kbit preparation) hold 16-bit values: stored in bf16,
    the step under bf16 autocast is bit for bit the same."""

    def kbit_like():
        m = _model(torch.bfloat16)
        base = m.get_base_model()
        for mod in (base.get_input_embeddings(), base.get_output_embeddings()):
            mod.weight.data = mod.weight.data.float()  # what prepare_model_for_kbit_training does
        return m

    loss0, g0 = _step(kbit_like(), autocast=torch.bfloat16)
    m = kbit_like()
    assert frozen16.install(m.get_base_model(), torch.bfloat16) == 2
    assert m.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16
    loss1, g1 = _step(m, autocast=torch.bfloat16)
    assert torch.equal(loss1, loss0)
    for n in g0:
        assert torch.equal(g1[n], g0[n]), n
