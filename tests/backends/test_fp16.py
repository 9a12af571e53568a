"""fp16 mixed precision as a GPU without bf16 runs it (T4, V100): the model computes in fp16 under
torch.autocast and a `torch.amp.GradScaler` scales the loss, which refuses fp16 gradients ("Attempting
to unscale FP16 gradients"). So the trainable weights must be float32 after the backend's load: every
weight in full fine-tuning, and PEFT's `modules_to_save` copies under LoRA. On the CPU accelerate runs
fp16 without autocast or a scaler, so the loop here is the Trainer's GPU step written out (autocast
forward, scaled backward, unscale, clip, step), on the CPU, where torch 2.13 has both."""

from __future__ import annotations

import pytest
import torch

from fastsft import backends
from fastsft import recipe as R

from _tiny import TINY_RECIPE

CASES = {
    "full": ["train.method=full", "model.load_in_4bit=false", "model.dtype=fp16"],
    "modules_to_save": ['lora.modules_to_save=["lm_head"]', "model.load_in_4bit=false", "model.dtype=fp16"],
}


def train_fp16(model, steps=8, lr=3e-3):
    """The Trainer's fp16 step on the CPU; the losses of each step."""
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (4, 32))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model.train()
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # raises on fp16 gradients
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return ids, losses


@pytest.mark.parametrize("case", CASES)
def test_fp16_trains_with_a_grad_scaler_and_saves(case, tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(TINY_RECIPE)
    recipe = R.load(p, CASES[case])
    loaded = backends.load_model(recipe, log=lambda *_: None)
    assert loaded.dtype == "fp16"
    model = loaded.model
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    if case == "modules_to_save":  # the frozen base stays in fp16: only what trains is upcast
        assert any(p.dtype == torch.float16 for p in model.parameters() if not p.requires_grad)
    ids, losses = train_fp16(model)
    assert all(map(torch.isfinite, torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.5, losses

    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        want = model(input_ids=ids).logits.float()
    model.save_pretrained(tmp_path / "saved")
    from transformers import AutoModelForCausalLM

    if case == "full":
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(loaded.model_path, dtype=torch.float16)
        back = PeftModel.from_pretrained(base, tmp_path / "saved")
    back.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        got = back(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
