"""The real Unsloth path on the CPU: fastsft's Unsloth backend and every `[loss] kernel` on tiny Llama,
Mistral, Qwen2 and Gemma 2, with Unsloth's own Triton kernels run by Triton's interpreter.

The README's test command installs the `gpu` extra's unsloth and unsloth_zoo into .cache/unsloth (no
dependencies: the core's torch, transformers, peft and TRL 1.15 from .cache/trl-1.15 serve). One child
process (tests/backends/unsloth_cpu/worker.py) does every check and writes JSON; the tests below read it. The
child runs with Unsloth's test switch UNSLOTH_ALLOW_CPU=1 and tests/backends/unsloth_cpu/sitecustomize.py, a
test-only shim answering torch.cuda's queries and mapping "cuda" tensors onto the CPU. 4-bit is not
exercised this way (Unsloth turns it off without bitsandbytes' CUDA backend). On a CUDA machine
(benchmarks/gpu_check.sh) the same child runs natively, without the shim, and adds a 4-bit base.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _tiny import DEMO, REPO

# benchmarks/gpu_check.sh points FASTSFT_UNSLOTH_SITE at the GPU archive's folder (unsloth and TRL 1.15)
SITE = os.environ.get("FASTSFT_UNSLOTH_SITE")
UNSLOTH = Path(SITE) if SITE else REPO / ".cache" / "unsloth"
TRL_115 = Path(SITE) if SITE else REPO / ".cache" / "trl-1.15"
SHIM = REPO / "tests" / "backends" / "unsloth_cpu"
ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
KERNELS = ("fastsft-linear", "fastsft", "torch", "unsloth")
FULL = ("llama", "gemma2")  # also fp16 and checkpointing (Mistral and Qwen2 run Unsloth's Llama code there)

pytestmark = [
    pytest.mark.slow,  # one child runs Unsloth and our kernels in Triton's interpreter
    pytest.mark.skipif(
        not (UNSLOTH / "unsloth").is_dir() or not (TRL_115 / "trl").is_dir(),
        reason="unsloth (.cache/unsloth) or TRL 1.15 (.cache/trl-1.15) not installed: run tests/install-test-extras.sh",
    ),
]


GPU = torch.cuda.is_available()
# float32 agreement: exact up to summation order on the CPU; on a GPU the child's cuBLAS / Triton sums
# and the reference's may differ more (a first GPU session may tighten these with its figures)
TOL = 1e-4 if GPU else 1e-5


def unsloth_env(cache: str) -> dict:
    drop = ("UNSLOTH_", "PYTHONPATH", "TRITON_INTERPRET", "FASTSFT_CUDA_SHIM")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PYTHONPATH=os.pathsep.join(dict.fromkeys(map(str, (UNSLOTH, TRL_115)))), FASTSFT_CACHE=cache)
    if not GPU:
        env.update(
            PYTHONPATH=os.pathsep.join(map(str, (SHIM, UNSLOTH, TRL_115))),
            FASTSFT_CUDA_SHIM="1",
            UNSLOTH_ALLOW_CPU="1",
            TRITON_INTERPRET="1",
            HF_DEACTIVATE_ASYNC_LOAD="1",
        )
    return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("unsloth-cpu") / "results.json"
    cache = os.environ.get("FASTSFT_CACHE") or str(tmp_path_factory.mktemp("cache"))
    proc = subprocess.run(
        [sys.executable, str(SHIM / "worker.py"), str(out)] + (["--four-bit"] if GPU else []),
        env=unsloth_env(cache),
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    data = json.loads(out.read_text())
    print(f"unsloth-on-CPU worker: {data['seconds']} s")
    return data


def arch_results(results, arch):
    assert arch not in results["errors"], results["errors"][arch]
    return results["archs"][arch]


def test_it_is_the_unsloth_the_gpu_extra_installs(results):
    v = results["versions"]
    assert v["unsloth"].startswith("2026.10.") and v["trl"] == "1.15.0", v


@pytest.mark.parametrize("arch", ARCHS)
def test_the_unsloth_backend_loads(results, arch):
    r = arch_results(results, arch)
    assert r["backend"] == "unsloth" and r["class"] == ARCHS[arch]
    assert r["supervised"] > 5 and r["n_grads"] > 0


def tensors(batch: dict) -> dict:
    return {k: torch.tensor(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def transformers_losses(results, tmp_path_factory):
    """The transformers backend's loss on each architecture's batch, here (Unsloth patched the child's
    model classes process-wide, so the reference is computed in a process it never touched)."""
    from fastsft import backends
    from fastsft import recipe as R
    from fastsft.loss import route as loss

    out = {}
    for arch, r in results["archs"].items():
        p = tmp_path_factory.mktemp(f"ref-{arch}") / "r.toml"
        p.write_text(
            f'[model]\nname = "builtin:tiny-{arch}"\nload_in_4bit = false\n[data]\ntrain = "{DEMO}"\n'
        )
        recipe = R.load(p, ["model.backend=transformers", "model.dtype=fp32", "loss.kernel=torch"])
        loaded = backends.load_model(recipe, log=lambda *_: None)
        route = loss.resolve(recipe, loaded.model, loaded.backend, torch.device("cpu"))
        with torch.no_grad():
            device = next(loaded.model.parameters()).device
            batch = {k: v.to(device) for k, v in tensors(r["batch"]).items()}
            out[arch] = float(route(loaded.model, batch)[0])
    return out


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_gives_the_transformers_backends_first_loss(results, transformers_losses, arch, kernel):
    """LoRA's B starts at 0, so the first loss of a run is the base model's on both backends."""
    r = arch_results(results, arch)
    assert r[f"loss/{kernel}"] == pytest.approx(transformers_losses[arch], rel=TOL), r
    assert r[f"loss/{kernel}"] == pytest.approx(r["loss/torch"], rel=TOL), r


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_gives_the_same_lora_gradients(results, arch, kernel):
    r = arch_results(results, arch)
    assert r["grad_norm/torch"] > 0
    assert r[f"grad_rel/{kernel}"] < TOL, r


@pytest.mark.parametrize("arch", ARCHS)
def test_our_kernels_really_launch_on_unsloth(results, arch):
    """Counted by wrapping the Triton kernel in the child, not by a hook in the package."""
    r = arch_results(results, arch)
    assert r["launches/fastsft-linear"] >= 1 and r["launches/fastsft"] >= 1, r
    assert r["launches/torch"] == 0 and r["launches/unsloth"] == 0, r


@pytest.mark.parametrize("arch", ARCHS)
def test_the_accumulated_batch_normalisation(results, arch):
    """With num_items_in_batch (the Trainer under accumulation) the loss is the sum over it."""
    r = arch_results(results, arch)
    assert r["loss_sum/fastsft-linear"] == pytest.approx(r["loss/fastsft-linear"] * r["supervised"], rel=1e-5)


@pytest.mark.parametrize("arch", FULL)
def test_unsloth_gradient_checkpointing(results, arch):
    r = arch_results(results, arch)
    assert r["checkpointing/enabled"]
    assert r["checkpointing/loss"] == pytest.approx(r["loss/fastsft-linear"], rel=1e-6)
    assert r["checkpointing/grad_rel"] < TOL, r


@pytest.mark.parametrize("arch", FULL)
def test_fp16_through_unsloths_fused_lora_kernels(results, arch):
    r = arch_results(results, arch)
    assert r["fp16/dtype"] == "torch.float16" and r["fp16/fused_lora"] > 0, r
    assert r["fp16/launches"] >= 1
    assert r["fp16/loss"] == pytest.approx(r["loss/fastsft-linear"], rel=2e-3), r
    assert r["fp16/grad_rel"] < 3e-2, r


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", FULL)
def test_every_kernel_under_the_trainers_bf16_autocast(results, arch, kernel):
    """The forward under torch.autocast(bfloat16) with float32 outputs, as accelerate wraps it."""
    r = arch_results(results, arch)
    assert r[f"bf16/loss/{kernel}"] == pytest.approx(r["loss/torch"], rel=2e-2), r
    # the logits routes get the head's bf16 logits; fastsft-linear runs a float32 head in float32
    assert r[f"bf16/loss/{kernel}"] == pytest.approx(r["bf16/loss/torch"], rel=2e-3), r
    assert r[f"bf16/grad_rel/{kernel}"] < 5e-2, r
    assert (r[f"bf16/launches/{kernel}"] >= 1) == kernel.startswith("fastsft"), r


@pytest.fixture()
def training(results):
    assert "training" not in results["errors"], results["errors"]["training"]
    return results["training"]


def test_fastsft_run_trains_on_unsloth_through_our_kernel(training):
    assert training["a/summary_backend"] == "unsloth" and training["b/summary_backend"] == "unsloth"
    assert training["a/loss_kernel"] == "fastsft-linear" and training["a/launches"] >= 1


def test_gradient_accumulation_is_exact_on_unsloth(training):
    """batch 2 x 1 micro-batch and batch 1 x 2 accumulated take the same SGD step."""
    assert training["accum/keys_equal"] and training["accum/lora_B_moved"] > 0
    assert training["accum/lora_B_rel"] < 1e-4, training
    assert training["accum/loss_a"] == pytest.approx(training["accum/loss_b"], rel=1e-4)


def test_the_merged_export_of_an_unsloth_run_reproduces_its_logits(training, tmp_path):
    """`fastsft export` of the Unsloth-trained run, here (a process Unsloth never patched, as a user's
    later `fastsft export` is), loaded by plain transformers, against the trained model's logits."""
    from transformers import AutoModelForCausalLM

    from fastsft import export

    folder = export.export_run(training["run_a"], fmt="merged", dtype="fp32", to=tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    data = tensors(training["export/batch"])
    with torch.no_grad():
        exported = merged(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    trained = torch.load(training["export/trained_logits"])
    assert exported.shape == trained.shape
    keep = data["attention_mask"].bool()
    diff = float((exported[keep] - trained[keep]).norm() / trained[keep].norm())
    assert diff < 10 * TOL, diff  # the trained logits come from the child's device, the export's from the CPU


@pytest.fixture()
def full_run(results):
    assert "full" not in results["errors"], results["errors"]["full"]
    return results["full"]


def test_unsloth_full_finetuning_trains_every_weight_through_our_kernel(full_run):
    """`[train] method = "full"` on the Unsloth backend (its full_finetuning=True): the whole model
    trains, through fastsft's linear kernel (patched onto the forward: Unsloth's full-fine-tuning forward
    ignores UNSLOTH_RETURN_HIDDEN_STATES), and every weight moves."""
    from safetensors.torch import load_file

    r = full_run
    assert r["summary_backend"] == "unsloth" and r["loss_kernel"] == "fastsft-linear"
    assert r["launches"] >= 3 and r["trainable_parameters"] == r["n_params"]
    assert r["losses"][-1] < 0.8 * r["losses"][0], r["losses"]
    base = load_file(str(sorted(Path(r["base"]).glob("*.safetensors"))[0]))
    trained = load_file(str(Path(r["run"]) / "model" / "model.safetensors"))
    assert set(base) == set(trained)
    assert not [k for k in base if torch.equal(base[k], trained[k])]


def test_unsloth_full_run_loads_with_plain_transformers(full_run):
    """RUN_DIR/model, loaded here (a process Unsloth never patched) by plain transformers, gives the
    trained Unsloth model's logits."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(Path(full_run["run"]) / "model", dtype=torch.float32)
    data = tensors(full_run["batch"])
    with torch.no_grad():
        got = merged(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    trained = torch.load(full_run["trained_logits"])
    keep = data["attention_mask"].bool()
    assert float((got[keep] - trained[keep]).norm() / trained[keep].norm()) < 10 * TOL
