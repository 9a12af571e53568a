"""Each memory lever is exact: the loss and every gradient equal the plain checkpointed step's."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fastsft.levers import frozen16, offload, tiled_layer, tiled_mlp


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


@pytest.mark.parametrize("lever", ["offload", "tiled_mlp", "both", "tiled_layer", "all"])
def test_lever_is_exact(lever):
    loss0, g0 = _step(_model())
    m = _model()
    if lever in ("offload", "both", "all"):
        assert offload.install(m) == 3
    if lever in ("tiled_mlp", "both", "all"):
        assert tiled_mlp.install(m, 3) == 3
    if lever in ("tiled_layer", "all"):
        assert tiled_layer.install(m, 3) == 3
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


def _padded_step(model, tiles_seen=None, autocast=None):
    """A batch of two rows of 37 tokens (not a multiple of the tiles), the second padded on the right:
    its padding masked out of attention and its labels ignored, as the collator makes them."""
    ids = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100  # a prompt not trained on
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("offloaded", [False, True], ids=["checkpointed", "offloaded"])
def test_tiled_layer_is_exact_and_tiled(dtype, offloaded):
    """The tiled decoder layer: loss and every LoRA gradient as the plain checkpointed step's (padding,
    ignored labels, 37 tokens in 3 tiles of 13, 13, 11; float32, and bf16 autocast over a bf16 model),
    and the per-token modules really see one tile at a time, in forward, recompute and backward."""
    autocast = torch.bfloat16 if dtype == torch.bfloat16 else None
    loss0, g0 = _padded_step(_model(dtype), autocast=autocast)
    m = _model(dtype)
    if offloaded:
        offload.install(m)
    assert tiled_layer.install(m, 3) == 3
    seen = {"q_proj": set(), "o_proj": set(), "mlp": set(), "input_layernorm": set()}
    base = m.get_base_model().model
    for layer in base.layers:
        for name, mod in (
            ("q_proj", layer.self_attn.q_proj),
            ("o_proj", layer.self_attn.o_proj),
            ("mlp", layer.mlp),
            ("input_layernorm", layer.input_layernorm),
        ):
            mod.register_forward_hook(lambda mod, args, out, name=name: seen[name].add(args[0].shape[1]))
    loss1, g1 = _padded_step(m, autocast=autocast)
    assert seen == {k: {13, 11} for k in seen}, seen
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss1, loss0, **tol)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **tol, msg=n)


def test_tiled_layer_spans_are_equal():
    assert tiled_layer.spans(37, 3) == [(0, 13), (13, 26), (26, 37)]
    assert tiled_layer.spans(32, 4) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert tiled_layer.spans(5, 8) == [(i, i + 1) for i in range(5)]
