"""GPU-like mixed precision on the CPU, through the real Trainer: `[model] dtype = "bf16"` makes the
Trainer (accelerate) run the model under torch.autocast(bfloat16), as it does on a GPU, and with
`load_in_4bit` the QLoRA preparation leaves the hidden states and lm_head in float32 (the case that
crashed the fused linear loss). Every loss route trains, and they agree."""

import pytest
import torch

from fastsft import recipe as R
from fastsft.loss import route as loss
from fastsft.run import train

from _tiny import TINY_RECIPE, losses

KERNELS = ("torch", "fastsft", "fastsft-linear")
# run name -> (loss.kernel, extra overrides): each route as shipped (frozen_16bit on: the frozen lm_head in
# bf16), and the fused linear loss once more with the float32 head PEFT's kbit preparation leaves
RUNS = {k: (k, []) for k in KERNELS} | {
    "fastsft-linear-f32-head": ("fastsft-linear", ["train.frozen_16bit=false"])
}


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    out = {}
    for run_name, (kernel, extra) in RUNS.items():
        tmp = tmp_path_factory.mktemp(f"bf16-{run_name}")
        p = tmp / "r.toml"
        p.write_text(TINY_RECIPE)
        recipe = R.load(
            p,
            [
                f"loss.kernel={kernel}",
                "model.dtype=bf16",
                "model.load_in_4bit=true",
                "train.max_steps=5",
                "loss.label_smoothing=0.1",
                *extra,
            ],
        )
        seen = []  # what the loss kernels were given: dtypes and whether autocast was on
        mp = pytest.MonkeyPatch()
        for name in ("fused_linear_cross_entropy", "fused_cross_entropy"):
            original = getattr(loss, name)

            def spy(x, *args, _original=original, _name=name, _seen=seen, **kw):
                w = args[0] if _name == "fused_linear_cross_entropy" else None
                if torch.is_grad_enabled():  # the training steps, not the retain set scored around them
                    _seen.append(
                        (_name, x.dtype, None if w is None else w.dtype, torch.is_autocast_enabled("cpu"))
                    )
                return _original(x, *args, **kw)

            mp.setattr(loss, name, spy)
        try:
            result = train.run(recipe, output_dir=tmp / "run")
        finally:
            mp.undo()
        out[run_name] = (result, losses(result.run_dir), seen)
    return out


@pytest.mark.slow  # reads bf16_runs: four training runs, 44 s
def test_every_route_trains_under_bf16_autocast(bf16_runs):
    for name, (result, steps, _) in bf16_runs.items():
        kernel = RUNS[name][0]
        assert result.summary["dtype"] == "bf16", name
        assert result.summary["loss"]["kernel"] == kernel
        assert len(steps) == 5 and all(map(torch.isfinite, torch.tensor(steps))), (name, steps)
        assert steps[-1] < steps[0] - 0.5, (name, steps)


@pytest.mark.slow  # reads bf16_runs: four training runs, 44 s
def test_the_routes_agree_under_bf16_autocast(bf16_runs):
    ref = bf16_runs["torch"][1]
    for kernel in ("fastsft", "fastsft-linear"):
        got = bf16_runs[kernel][1]
        assert got[0] == pytest.approx(ref[0], rel=2e-3), kernel  # same weights, bf16 logits
        assert got == pytest.approx(ref, rel=2e-2), kernel  # a few bf16 steps later


@pytest.mark.slow  # reads bf16_runs: four training runs, 44 s
def test_the_fused_linear_loss_saw_the_qlora_case(bf16_runs):
    """float32 hidden states and lm_head (prepare_model_for_kbit_training), inside the Trainer's
    autocast: what raised "Expected out tensor to have dtype BFloat16, but got float"; and as shipped, the
    frozen lm_head stored in bf16 by frozen_16bit (the hidden states still float32)."""
    seen = bf16_runs["fastsft-linear-f32-head"][2]
    assert seen and all(
        s == ("fused_linear_cross_entropy", torch.float32, torch.float32, True) for s in seen
    ), seen
    seen = bf16_runs["fastsft-linear"][2]
    assert seen and all(
        s == ("fused_linear_cross_entropy", torch.float32, torch.bfloat16, True) for s in seen
    ), seen
    # the logits-in route gets the head's autocast logits, upcast by accelerate on the way out
    seen = bf16_runs["fastsft"][2]
    assert seen and all(s[0] == "fused_cross_entropy" for s in seen), seen


def test_the_unsloth_linear_route_keeps_a_16bit_head_in_16_bits(monkeypatch):
    """Under the Trainer's mixed precision accelerate upcasts a bf16 model's outputs (Unsloth's hidden
    states, read with UNSLOTH_RETURN_HIDDEN_STATES) to float32; the loss must cast them back rather than
    copy the lm_head to float32 and run the largest matmul there."""
    import types

    torch.manual_seed(0)

    class Model(torch.nn.Module):  # what the route reads of an Unsloth causal LM
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16, dtype=torch.bfloat16)
            self.lm_head = torch.nn.Linear(16, 50, bias=False, dtype=torch.bfloat16)
            self.config = types.SimpleNamespace(final_logit_softcapping=None)

        def forward(self, input_ids, **kw):
            return types.SimpleNamespace(logits=self.embed(input_ids).float())  # as accelerate returns it

    seen = []
    original = loss.fused_linear_cross_entropy

    def spy(hidden, weight, *args, **kw):
        seen.append((hidden.dtype, weight.dtype))
        return original(hidden, weight, *args, **kw)

    monkeypatch.setattr(loss, "fused_linear_cross_entropy", spy)
    route = loss.LossRoute("fastsft-linear", "torch", "unsloth", 0.0, "LlamaForCausalLM", "test")
    model = Model()
    ids = torch.randint(0, 50, (2, 9))
    got, _ = route(model, {"input_ids": ids, "labels": ids})
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    logits = model.lm_head(model.embed(ids)).float()
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    assert float(got) == pytest.approx(float(want), rel=1e-3)
