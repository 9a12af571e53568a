"""The training loss route (fastsft.loss.route): the loss goes through fastsft's kernels, and computes what the
formula says."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fastsft import backends
from fastsft.loss import route as loss
from fastsft.run import train

from _launches import launch_counts, reset_launch_counts
from _tiny import assistant_batch, load_tiny, losses


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    out = {}
    for kernel in ("torch", "fastsft", "fastsft-linear"):
        tmp = tmp_path_factory.mktemp(kernel)
        recipe = load_tiny(tmp, f"loss.kernel={kernel}", "train.max_steps=4", "loss.label_smoothing=0.1")
        reset_launch_counts()
        result = train.run(recipe, output_dir=tmp / "run")
        out[kernel] = (losses(result.run_dir), dict(launch_counts), result.summary["loss"])
    return out


@pytest.mark.slow  # reads trajectories: three training runs, 27 s
def test_kernels_give_the_stock_loss_trajectory(trajectories):
    ref, _, _ = trajectories["torch"]
    assert len(ref) == 4
    for kernel in ("fastsft", "fastsft-linear"):
        got, _, _ = trajectories[kernel]
        assert got == pytest.approx(ref, rel=2e-4), kernel


@pytest.mark.slow  # reads trajectories: three training runs, 27 s
def test_kernels_really_ran(trajectories):
    _, torch_launches, _ = trajectories["torch"]
    assert sum(torch_launches.values()) == 0
    for kernel in ("fastsft", "fastsft-linear"):
        _, launches, info = trajectories[kernel]
        assert info["kernel"] == kernel and info["kernel_backend"] == "triton"
        # a run that silently fell back to the PyTorch path would launch nothing
        assert sum(launches.values()) >= 4, (kernel, launches)


@pytest.mark.parametrize("kernel", ["torch", "fastsft", "fastsft-linear"])
def test_label_smoothing_changes_the_loss_as_the_formula_says(tmp_path, kernel):
    eps = 0.2
    recipe = load_tiny(tmp_path, f"loss.kernel={kernel}", f"loss.label_smoothing={eps}")
    loaded = backends.load_model(recipe, log=lambda *_: None)
    route = loss.resolve(recipe, loaded.model, loaded.backend, torch.device("cpu"))
    route.install(loaded.model)
    batch = assistant_batch(loaded.tokenizer, recipe.resolve_path(recipe.data.train), 3)
    with torch.no_grad():
        logits = loaded.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.double()
        got, _ = route(loaded.model, batch)
    target = loss.shift_left(batch["labels"]).reshape(-1)
    logp = logits.reshape(-1, logits.shape[-1]).log_softmax(-1)
    keep = target != -100
    nll = -logp[keep].gather(1, target[keep, None]).squeeze(1)
    uniform = -logp[keep].mean(-1)
    expected = ((1 - eps) * nll + eps * uniform).mean()
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    # and it is not the unsmoothed loss
    assert abs(float(got) - float(nll.mean())) > 1e-3
    assert float(expected) == pytest.approx(
        float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, label_smoothing=eps)), rel=1e-9
    )


# the linear kernel in Triton's interpreter: 10 s, in the full suite; torch's stays in the quick loop
@pytest.mark.parametrize("kernel", [pytest.param("fastsft-linear", marks=pytest.mark.slow), "torch"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, kernel):
    """Batch 4 x accumulation 1 and batch 1 x accumulation 4 take the same optimizer step: the loss
    is normalised over the supervised tokens of the whole accumulated batch (num_items_in_batch)."""
    common = [
        f"loss.kernel={kernel}",
        "train.max_steps=1",
        "train.optim=sgd",
        "train.learning_rate=0.5",
        "train.warmup_ratio=0.0",
        "train.lr_scheduler_type=constant",
        "train.max_grad_norm=0",
    ]
    a = train.run(
        load_tiny(
            tmp_path, *common, "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1"
        ),
        output_dir=tmp_path / "a",
    )
    b = train.run(
        load_tiny(
            tmp_path, *common, "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=4"
        ),
        output_dir=tmp_path / "b",
    )
    wa = load_file(str(a.run_dir / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b.run_dir / "adapter" / "adapter_model.safetensors"))
    moved = 0
    for k in wa:
        if "lora_B" in k:
            moved += int(wa[k].abs().sum() > 0)
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    assert moved > 0
    assert losses(a.run_dir)[0] == pytest.approx(losses(b.run_dir)[0], rel=1e-4)


@pytest.mark.parametrize("model_backend", ["transformers", "unsloth"])
def test_an_architecture_without_a_linear_patch_falls_back_to_logits_in(tmp_path, model_backend):
    """On either backend: the hidden-states route would skip model-specific logit scaling (Cohere's
    logit_scale, Granite's logits_scaling), so unknown architectures take the logits."""

    class CohereForCausalLM(torch.nn.Module):
        pass

    recipe = load_tiny(tmp_path, "loss.kernel=fastsft-linear")
    route = loss.resolve(recipe, CohereForCausalLM(), model_backend, torch.device("cpu"))
    assert route.kernel == "fastsft" and "no linear-loss patch" in route.reason
