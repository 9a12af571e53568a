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
    before = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    changed = frozen16.install(m.get_base_model(), torch.bfloat16)
    assert len(changed) == 2
    assert m.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16
    loss1, g1 = _step(m, autocast=torch.bfloat16)
    assert torch.equal(loss1, loss0)
    for n in g0:
        assert torch.equal(g1[n], g0[n]), n
    # after training (no autocast: answers, merge, export) the weights are float32 again, the same values;
    # a 16-bit lm_head left in place met float32 hidden states there ("expected m1 and m2 to have the same dtype")
    frozen16.restore(changed)
    for n, p in m.named_parameters():
        if n in before:
            assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n


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


@pytest.mark.parametrize(
    "dtype,autocast",
    [(torch.float32, None), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
    ids=["fp32", "bf16", "fp32-under-bf16-autocast"],
)
@pytest.mark.parametrize("offloaded", [False, True], ids=["checkpointed", "offloaded"])
def test_tiled_layer_is_exact_and_tiled(dtype, autocast, offloaded):
    """The tiled decoder layer: loss and every LoRA gradient as the plain checkpointed step's (padding,
    ignored labels, 37 tokens in 3 tiles of 13, 13, 11; float32; a bf16 model under bf16 autocast; and
    QLoRA's case, float32 residual stream and norms under bf16 autocast), and the per-token modules
    really see one tile at a time, in forward, recompute and backward."""
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
    assert g1.keys() == g0.keys()
    if autocast is None:
        torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)
        return
    # 16-bit matmuls: each tile's weight-gradient product is rounded to bf16 before the tiles are
    # summed, the plain step's once (both are ~2.6% of the largest gradient away from the float32
    # step's; tiled vs plain: <= 1.2%); the loss is the same to the bit
    assert torch.equal(loss1, loss0)
    for n in g0:
        assert (g1[n].float() - g0[n].float()).abs().max() <= 0.03 * g0[n].float().abs().max(), n


def test_tiled_layer_spans_are_equal():
    assert tiled_layer.spans(37, 3) == [(0, 13), (13, 26), (26, 37)]
    assert tiled_layer.spans(32, 4) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert tiled_layer.spans(5, 8) == [(i, i + 1) for i in range(5)]


def _plan_config(layers):
    # Llama-3-8B's shape, scaled: hidden 4096 -> 128, grouped-query attention kept
    return LlamaConfig(
        hidden_size=128,
        intermediate_size=448,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=300,
        max_position_embeddings=8192,
    )


def test_plan_runs_tiled_layer_on_real_and_meta_tensors():
    """The plan simulates the lever by running it: the tracker over real CPU tensors and over meta
    tensors, one step with tiled_layer, the same peak to the byte (and the same reserved segments)."""
    from fastsft.plan import Setup
    from fastsft.plan.device import CachingAllocator
    from fastsft.plan.model import build
    from fastsft.plan.simulate import prepare, run_step
    from fastsft.plan.tracker import MemoryTracker

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    setup = Setup(
        _plan_config(2),
        dtype=torch.float32,
        load_in_4bit=False,
        lora=lora,
        loss="fastsft-linear",
        optim="sgd",
        mixed_precision=False,
        kernel_backend="torch",
        tiled_layer=3,
    )

    def peak(device):
        torch.manual_seed(0)
        model = build(setup.config, dtype=setup.dtype, load_in_4bit=False, lora=lora, device=device)
        prepare(model, setup)
        assert all(layer._fastsft_tiles == 3 for layer in model.get_base_model().model.layers)
        tracker = MemoryTracker(device, allocator=CachingAllocator())
        with tracker:
            run_step(model, setup, 97, tracker)
        return tracker.peak, tracker.allocator.reserved_peak

    assert peak("cpu") == peak("meta")


def test_plan_tiled_layer_cuts_the_per_token_cost():
    """The plan's QLoRA step (4-bit, bf16, every other lever on): with tiled_layer, the memory each token
    adds (between 2,048 and 4,096 tokens) is well below the step's without it: 0.61x at this scale (8.3
    vs 13.5 MB per 2,048 tokens); 0.77x before the recomputed layer output became a placeholder, the
    offloaded layer output's gradient was donated, the final norm was tiled and the first layer's
    input was no longer held (benchmarks/results/2026-12-07-tiled-layer/)."""
    from fastsft.plan import Setup
    from fastsft.plan.simulate import simulate_layers

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    base = Setup(
        _plan_config(2),
        lora=lora,
        optim="adamw_8bit",
        offload_checkpoints=True,
        tiled_mlp=8,
        frozen16=True,
        expandable_segments=True,
    )
    tiled = Setup(**{**base.__dict__, "tiled_layer": 8})

    def slope(s):
        return simulate_layers(s, 4096, 2).peak_bytes - simulate_layers(s, 2048, 2).peak_bytes

    assert slope(tiled) <= 0.65 * slope(base), (slope(tiled), slope(base))


def test_tiled_layer_leaves_patched_layers_alone(monkeypatch):
    """A decoder layer class whose forward is not transformers' own (Unsloth patches LlamaDecoderLayer's)
    is not tiled: the tiled forward reproduces transformers' layer, not another one."""
    from transformers.models.llama import modeling_llama

    def patched(self, hidden_states, *args, **kwargs):  # stands for unsloth.models.llama's fast forward
        return hidden_states

    patched.__module__ = "unsloth.models.llama"
    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", patched)
    assert tiled_layer.install(_model(), 3) == 0


def test_tiled_layer_attends_per_head_group_and_skips_the_recomputed_output(monkeypatch):
    """Attention runs once per key/value head group (FA2's backward scratch per group, not for every head
    at once); in checkpointing's recomputation the layer's output is a placeholder (only the first tile
    runs, for its dtype), so the MLP runs tiles (forward) + 1 (recompute) + tiles (backward) times per
    layer, not 3 x tiles; the final norm is tiled too. Loss and gradients as the plain step's."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    loss0, g0 = _padded_step(_model())
    m = _model()
    assert tiled_layer.install(m, 3) == 3
    base = m.get_base_model().model
    assert base.norm._fastsft_tiles == 3
    heads, mlp_calls = [], []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def counting(module, q, k, v, *args, **kwargs):
        heads.append((q.shape[1], k.shape[1]))
        return sdpa(module, q, k, v, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", counting)
    for layer in base.layers:
        layer.mlp.register_forward_hook(lambda mod, args, out: mlp_calls.append(args[0].shape[1]))
    loss1, g1 = _padded_step(m)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)
    # 4 query heads over 2 key/value heads: 2 groups of (2 query heads, 1 key/value head), in forward
    # and in the recomputation, 3 layers
    assert heads == [(2, 1)] * (2 * 2 * 3), heads
    assert len(mlp_calls) == 3 * (3 + 1 + 3), mlp_calls


def test_head_groups():
    from types import SimpleNamespace as C

    assert tiled_layer.head_groups(C(num_attention_heads=32, num_key_value_heads=8)) == 8
    assert tiled_layer.head_groups(C(num_attention_heads=32, num_key_value_heads=32)) == 8
    assert tiled_layer.head_groups(C(num_attention_heads=12, num_key_value_heads=12)) == 6
    assert tiled_layer.head_groups(C(num_attention_heads=14, num_key_value_heads=2)) == 2
    assert tiled_layer.head_groups(C(num_attention_heads=8, num_key_value_heads=1)) == 1
    assert tiled_layer.head_groups(C(num_attention_heads=8, num_key_value_heads=None)) == 8
