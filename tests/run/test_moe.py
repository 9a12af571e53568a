"""Mixture-of-experts models keep their router's load-balancing loss under fastsft's kernels.

A tiny Mixtral, Qwen2-MoE and Qwen3-MoE (real transformers classes, tiny sizes, fixed seed) with
`output_router_logits = True`: for every loss route, fastsft's loss equals the stock model's own loss
(cross-entropy + router_aux_loss_coef * aux_loss) on the same batch and weights, and so does every
parameter's gradient, the routers' included. The aux term is made large enough that leaving it out
fails the comparison.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastsft.loss import route as L

COEF = 0.5  # transformers' default is 0.001-0.02: large here, so a dropped aux term cannot hide


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,  # 4096, 14336, 32
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,  # 32, 8, 8
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=COEF,
    )
    return MixtralForCausalLM(cfg)


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        output_router_logits=True,
        router_aux_loss_coef=COEF,
    )
    return Qwen2MoeForCausalLM(cfg)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        output_router_logits=True,
        router_aux_loss_coef=COEF,
    )
    return Qwen3MoeForCausalLM(cfg)


MODELS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe}


def _batch(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding: the aux loss counts only real tokens
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.6, ids, -100)
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize(
    ("kernel", "accumulated"),
    [("fastsft-linear", False), ("fastsft-linear", True), ("fastsft", True), ("torch", False)],
)
def test_router_aux_loss_stays_in_the_loss(arch, kernel, accumulated):
    torch.manual_seed(0)
    stock = MODELS[arch]().float().train()
    ours = copy.deepcopy(stock)
    batch = _batch(stock.config.vocab_size, seed=hash((arch, kernel)) % 1000)
    n = (
        int((L.shift_left(batch["labels"]) != -100).sum()) + 5 if accumulated else None
    )  # as the Trainer counts

    ref = stock(**batch, use_cache=False, **({"num_items_in_batch": n} if n else {}))
    assert ref.aux_loss is not None and COEF * ref.aux_loss.item() > 1e-2 * ref.loss.item()
    ref.loss.backward()

    kb = "triton" if kernel != "torch" else "-"
    route = L.LossRoute(kernel, kb, "transformers", 0.0, type(ours).__name__, "test")
    route.install(ours)
    got, _ = route(ours, batch, n)
    got.backward()

    assert got.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    bad = []
    for (name, p), (_, q) in zip(stock.named_parameters(), ours.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None and p.grad.norm() > 0 and _rel(q.grad, p.grad) > 1e-4:
            bad.append((name, _rel(q.grad, p.grad)))
    assert not bad, bad
    routers = [
        n_ for n_, p in ours.named_parameters() if "gate" in n_ and "proj" not in n_ and p.grad is not None
    ]
    assert routers, "the routers got no gradient"


def test_without_router_logits_the_loss_is_the_plain_cross_entropy():
    """output_router_logits = False: no aux term is added (the stock model adds none either)."""
    torch.manual_seed(0)
    stock = _mixtral().float()
    stock.config.output_router_logits = False
    ours = copy.deepcopy(stock)
    batch = _batch(97, seed=3)
    ref = stock(**batch, use_cache=False)
    assert ref.aux_loss is None
    route = L.LossRoute("fastsft-linear", "triton", "transformers", 0.0, "MixtralForCausalLM", "test")
    route.install(ours)
    got, _ = route(ours, batch, None)
    assert got.item() == pytest.approx(ref.loss.item(), rel=1e-5)


def test_moe_architectures_get_the_linear_loss():
    for arch in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        assert L.ARCHITECTURES[arch].router_aux
