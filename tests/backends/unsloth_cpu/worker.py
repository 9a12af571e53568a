"""Runs fastsft's Unsloth backend on the CPU (under the shim in sitecustomize.py beside this file) and
writes what it measured as JSON; tests/backends/test_unsloth_cpu.py starts it once and checks the numbers.

    python tests/backends/unsloth_cpu/worker.py OUT.json [--archs llama,mistral,qwen2,gemma2] [--four-bit]

Per architecture (tiny built-in models), on one fixed batch of the demo data:
- the loss and LoRA gradients of every `[loss] kernel` on the Unsloth backend, the launches of
  fastsft's Triton kernel counted by wrapping it here (not by a hook in the package);
- the batch itself, for the test to compute the transformers backend's loss on it (the first loss of
  any run: LoRA's B starts at 0) in its own process, which Unsloth has not patched;
- fp16 (Unsloth's fused LoRA kernels), Unsloth's gradient checkpointing, and every kernel under the
  Trainer's bf16 autocast, against fp32 (Llama and Gemma 2; `--full`).
Once (tiny Llama), through `fastsft.run.train.run` with `backend = "unsloth"`: gradient accumulation
(batch 2 x 1 step == batch 1 x 2 accumulated), and the merged export of the trained run against the
trained Unsloth model's own logits; and a full fine-tune (`[train] method = "full"`: Unsloth's
`full_finetuning=True`), whose RUN_DIR/model the test loads with plain transformers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]  # the repo's kernels/ shadows

import unsloth  # noqa: E402,F401  # isort: skip  (first: it patches transformers, trl and peft)
import torch  # noqa: E402

from fastsft import backends, machine  # noqa: E402
from fastsft import recipe as R  # noqa: E402
from fastsft.kernels import cross_entropy  # noqa: E402
from fastsft.loss import route as loss  # noqa: E402
from fastsft.run import answers, retain, train  # noqa: E402

# the tests' shared helpers, by file: tests/ on sys.path would bring its folders (kernels/, data/, ...) too
_spec = importlib.util.spec_from_file_location("_tiny", REPO / "tests" / "_tiny.py")
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)
assistant_batch = _tiny.assistant_batch

ARCHS = ("llama", "mistral", "qwen2", "gemma2")
# On a GPU (benchmarks/gpu_check.sh) the same checks run natively, without the shim, plus 4-bit.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNELS = ("fastsft-linear", "fastsft", "torch", "unsloth")
DEMO = REPO / "recipes" / "data" / "demo.jsonl"

RECIPE = f"""
[model]
name = "builtin:tiny-llama"
backend = "unsloth"
load_in_4bit = false
dtype = "fp32"
[lora]
r = 8
lora_alpha = 16
[data]
train = "{DEMO}"
max_length = 64
[train]
learning_rate = 0.5
optim = "sgd"
lr_scheduler_type = "constant"
warmup_ratio = 0.0
max_grad_norm = 0
max_steps = 1
per_device_train_batch_size = 2
logging_steps = 1
save_strategy = "no"
gradient_checkpointing = false
seed = 0
"""

if os.environ.get("TRITON_INTERPRET") == "1":
    # Unsloth's GEGLU (Gemma's fused LoRA MLP) and softcapped loss call libdevice's tanh, which Triton's
    # interpreter does not implement (it returns None): give them a Triton tanh (fastsft's softcap one)
    from unsloth.kernels import cross_entropy_loss, geglu  # noqa: E402

    geglu.triton_tanh = cross_entropy_loss.triton_tanh = cross_entropy._tanh

# ------------------------------------------------------------------------------------------------
# Counting our kernel's launches from the outside
# ------------------------------------------------------------------------------------------------

LAUNCHES = {"cross_entropy": 0}


class _Counted:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        LAUNCHES["cross_entropy"] += 1
        return self.kernel[grid]


cross_entropy._ce_kernel = _Counted(cross_entropy._ce_kernel)

# ------------------------------------------------------------------------------------------------


def make_recipe(tmp: Path, *overrides: str):
    p = tmp / "recipe.toml"
    p.write_text(RECIPE)
    return R.load(p, list(overrides))


def batch(tokenizer, n_rows: int = 2):
    return {k: v.to(DEVICE) for k, v in assistant_batch(tokenizer, DEMO, n_rows).items()}


def lora_grads(model) -> dict:
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all the tensors of two gradient dicts with the same keys."""
    if set(a) != set(b) or not a:
        return float("inf")
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    den = sum(float(b[k].norm() ** 2) for k in b) ** 0.5
    return num / den if den else num


def step(recipe, loaded, kernel: str, data: dict, num_items=None) -> tuple[float, dict, int]:
    """One forward + backward of `kernel` on the Unsloth backend: (loss, LoRA grads, our launches)."""
    r = make_recipe(Path(str(recipe.path)).parent, f"loss.kernel={kernel}")
    route = loss.resolve(r, loaded.model, loaded.backend, DEVICE)
    assert route.kernel == kernel, (route.kernel, route.reason)
    loaded.model.train()
    loaded.model.zero_grad(set_to_none=True)
    before = LAUNCHES["cross_entropy"]
    value, _ = route(loaded.model, data, num_items)
    value.backward()
    return float(value), lora_grads(loaded.model), LAUNCHES["cross_entropy"] - before


def check_arch(arch: str, tmp: Path, quick: bool, four_bit: bool) -> dict:
    out: dict = {"arch": arch}
    tmp.mkdir(parents=True, exist_ok=True)
    recipe = make_recipe(tmp, f"model.name=builtin:tiny-{arch}")
    t0 = time.perf_counter()
    loaded = backends.load_model(recipe, log=lambda *_: None)
    out["backend"] = loaded.backend
    out["class"] = type(loss.base_causal_lm(loaded.model)).__name__
    out["load_s"] = round(time.perf_counter() - t0, 1)
    data = batch(loaded.tokenizer)
    out["tokens"] = int(data["attention_mask"].sum())
    out["supervised"] = int((loss.shift_left(data["labels"]) != -100).sum())
    grads = {}
    for kernel in KERNELS:
        t = time.perf_counter()
        value, g, launches = step(recipe, loaded, kernel, data)
        grads[kernel] = g
        out[f"loss/{kernel}"] = value
        out[f"launches/{kernel}"] = launches
        out[f"seconds/{kernel}"] = round(time.perf_counter() - t, 1)
    for kernel in KERNELS:
        out[f"grad_rel/{kernel}"] = rel(grads[kernel], grads["torch"])
    out["grad_norm/torch"] = sum(float(v.norm() ** 2) for v in grads["torch"].values()) ** 0.5
    out["n_grads"] = len(grads["torch"])
    # the summed loss over num_items_in_batch, as the Trainer calls it under accumulation
    n = out["supervised"] * 3
    out["loss_sum/fastsft-linear"] = step(recipe, loaded, "fastsft-linear", data, torch.tensor(n))[0] * n
    fp32 = grads["fastsft-linear"]
    del loaded

    # the batch, for the transformers backend's loss (computed by the test, in a process Unsloth never
    # patched: Unsloth replaces the architectures' classes process-wide)
    out["batch"] = {k: v.tolist() for k, v in data.items()}

    if not quick:
        # Unsloth's gradient checkpointing: the same gradients as without
        rc = make_recipe(tmp, f"model.name=builtin:tiny-{arch}", "train.gradient_checkpointing=true")
        ck = backends.load_model(rc, log=lambda *_: None)
        value, g, _ = step(rc, ck, "fastsft-linear", data)
        out["checkpointing/loss"] = value
        out["checkpointing/grad_rel"] = rel(g, fp32)
        out["checkpointing/enabled"] = bool(
            getattr(loss.base_causal_lm(ck.model).model, "gradient_checkpointing", False)
        )
        del ck

        # fp16 weights: Unsloth's fused LoRA kernels (fast_lora) take the MLP and attention projections
        rh = make_recipe(tmp, f"model.name=builtin:tiny-{arch}", "model.dtype=fp16")
        half = backends.load_model(rh, log=lambda *_: None)
        out["fp16/dtype"] = str(loss.base_causal_lm(half.model).lm_head.weight.dtype)
        value, g, launches = step(rh, half, "fastsft-linear", data)
        out["fp16/loss"] = value
        out["fp16/launches"] = launches
        out["fp16/grad_rel"] = rel(g, fp32)
        out["fp16/fused_lora"] = _fused_lora_patched(half.model)
        del half

    if not quick:
        # the Trainer's bf16 mixed precision as accelerate sets it up (Accelerator.prepare_model): the
        # forward under autocast, its outputs upcast to float32, the loss outside. (Through the Trainer
        # itself it cannot run here: Unsloth refuses bf16 without a device, accelerate fp16 on the CPU.)
        from accelerate.utils import convert_outputs_to_fp32

        ra = make_recipe(tmp, f"model.name=builtin:tiny-{arch}")
        amp = backends.load_model(ra, log=lambda *_: None)
        autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16)
        amp.model.forward = convert_outputs_to_fp32(autocast(amp.model.forward))
        for kernel in KERNELS:
            value, g, launches = step(ra, amp, kernel, data)
            out[f"bf16/loss/{kernel}"] = value
            out[f"bf16/launches/{kernel}"] = launches
            out[f"bf16/grad_rel/{kernel}"] = rel(g, fp32)
        del amp

    if four_bit:  # GPU only: Unsloth turns 4-bit off without bitsandbytes' CUDA backend
        r4 = make_recipe(
            tmp, f"model.name=builtin:tiny-{arch}", "model.load_in_4bit=true", "model.dtype=bf16"
        )
        q = backends.load_model(r4, log=lambda *_: None)
        for kernel in KERNELS:
            value, _, launches = step(r4, q, kernel, data)
            out[f"4bit/loss/{kernel}"] = value
            out[f"4bit/launches/{kernel}"] = launches
        del q
    return out


def _fused_lora_patched(model) -> int:
    """How many of Unsloth's fused LoRA forwards (apply_lora_mlp / _qkv / _o) are in place."""
    n = 0
    for m in model.modules():
        for attr in ("forward", "apply_qkv", "apply_o"):
            fn = m.__dict__.get(attr) or getattr(type(m), attr, None)
            fn = getattr(fn, "__func__", fn)
            n += "apply_lora" in getattr(fn, "__name__", "")
    return n


def check_training(tmp: Path) -> dict:
    """Through fastsft.run.train.run with backend = "unsloth" (tiny Llama)."""
    out: dict = {}
    tmp.mkdir(parents=True, exist_ok=True)
    keep = model_keeper()
    answers.sample_prompts = lambda *a, **k: []  # before / after answers: Unsloth's generation is slow here
    # nor the retain set's loss before and after (100 forwards of the general set in Triton's interpreter, ~4
    # of this child's ~11 minutes): it runs through the same loss route on every backend
    # (tests/run/test_retain.py); what this checks is the training, accumulation and export
    retain.encode = lambda *a, **k: (None, None)
    LAUNCHES["cross_entropy"] = 0
    a = train.run(
        make_recipe(tmp, "train.per_device_train_batch_size=2"), output_dir=tmp / "a", callbacks=[keep]
    )
    out["a/launches"] = LAUNCHES["cross_entropy"]
    out["a/summary_backend"] = a.summary["backend"]
    out["a/loss_kernel"] = a.summary["loss"]["kernel"]
    model = keep.model
    b = train.run(
        make_recipe(tmp, "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=2"),
        output_dir=tmp / "b",
    )
    out["b/summary_backend"] = b.summary["backend"]
    from safetensors.torch import load_file

    wa = load_file(str(a.run_dir / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b.run_dir / "adapter" / "adapter_model.safetensors"))
    out["accum/keys_equal"] = set(wa) == set(wb)
    out["accum/lora_B_moved"] = sum(int(v.abs().sum() > 0) for k, v in wa.items() if "lora_B" in k)
    num = sum(float((wa[k].double() - wb[k].double()).norm() ** 2) for k in wa) ** 0.5
    den = sum(float((wa[k].double()).norm() ** 2) for k in wa if "lora_B" in k) ** 0.5
    out["accum/lora_B_rel"] = num / den if den else float("inf")
    la = [json.loads(x) for x in (a.run_dir / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b.run_dir / "metrics.jsonl").read_text().splitlines()]
    out["accum/loss_a"] = next(r["loss"] for r in la if "loss" in r)
    out["accum/loss_b"] = next(r["loss"] for r in lb if "loss" in r)

    # the trained Unsloth model's logits, for the test to compare with the merged export of run a, made
    # and loaded in its own process (Unsloth's class patches here would run the export's checks)
    out["run_a"] = str(a.run_dir)
    out["export/trained_logits"] = str(tmp / "trained_logits.pt")
    out["export/batch"] = save_logits(model, loaded_tokenizer(a.run_dir), out["export/trained_logits"])
    return out


def check_full_finetuning(tmp: Path) -> dict:
    """`[train] method = "full"` through `fastsft.run.train.run` with backend = "unsloth" (tiny Llama): every
    weight trains through Unsloth's full_finetuning path and our kernel; the trained model's logits are
    kept for the test to compare with RUN_DIR/model loaded by plain transformers in its own process."""
    out: dict = {}
    tmp.mkdir(parents=True, exist_ok=True)
    keep = model_keeper()
    answers.sample_prompts = lambda *a, **k: []
    retain.encode = lambda *a, **k: (None, None)
    LAUNCHES["cross_entropy"] = 0
    r = train.run(
        make_recipe(
            tmp,
            "train.method=full",
            "train.learning_rate=1e-3",
            "train.optim=adamw_torch",
            "train.max_steps=3",
            "train.per_device_train_batch_size=2",
        ),
        output_dir=tmp / "full",
        callbacks=[keep],
    )
    info = json.loads((r.run_dir / "run.json").read_text())
    out["run"] = str(r.run_dir)
    out["base"] = info["model_path"]
    out["summary_backend"] = r.summary["backend"]
    out["loss_kernel"] = r.summary["loss"]["kernel"]
    out["trainable_parameters"] = r.summary["trainable_parameters"]
    out["launches"] = LAUNCHES["cross_entropy"]
    out["losses"] = [
        json.loads(x)["loss"]
        for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(x)
    ]
    model = keep.model
    out["n_params"] = sum(p.numel() for p in model.parameters())
    out["trained_logits"] = str(tmp / "full_logits.pt")
    out["batch"] = save_logits(model, loaded_tokenizer(r.run_dir, "model"), out["trained_logits"])
    return out


def model_keeper():
    """A callback that keeps the trained model (as `.model`): train.run returns the run, not the model."""
    from transformers import TrainerCallback  # after Unsloth's import, as everywhere here

    class Keep(TrainerCallback):
        model = None

        def on_train_end(self, args, state, control, model=None, **kw):
            self.model = model

    return Keep()


def save_logits(model, tokenizer, path: str) -> dict:
    """Saves the model's logits (Unsloth asked to return them) on a 2-row batch; returns the batch."""
    data = batch(tokenizer, 2)
    model.eval()
    with torch.no_grad(), loss._env(UNSLOTH_RETURN_LOGITS="1"):
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    torch.save(logits.float().cpu(), path)
    return {k: v.tolist() for k, v in data.items()}


def loaded_tokenizer(run_dir: Path, folder: str = "adapter"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run_dir / folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument(
        "--full",
        default="llama,gemma2",
        help="architectures that also check fp16 and checkpointing (Mistral and "
        "Qwen2 run Unsloth's Llama code for those)",
    )
    ap.add_argument("--no-training", action="store_true")
    ap.add_argument("--no-full", action="store_true", help="skip the full fine-tune")
    ap.add_argument("--four-bit", action="store_true", help="also every kernel on a 4-bit base (GPU only)")
    args = ap.parse_args()
    import tempfile

    if DEVICE.type == "cpu":
        backends.unsloth_status = lambda: (True, "the CPU test shim stands in for a GPU")
    tmp = Path(tempfile.mkdtemp(prefix="work-", dir=Path(args.out).resolve().parent))
    results: dict = {
        "versions": machine.versions(),
        "device": machine.device_description(),
        "archs": {},
        "errors": {},
    }
    t0 = time.perf_counter()
    for arch in [a for a in args.archs.split(",") if a]:
        try:
            results["archs"][arch] = check_arch(
                arch, tmp / arch, arch not in args.full.split(","), args.four_bit
            )
        except Exception:
            results["errors"][arch] = traceback.format_exc()
        print(f"{arch}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if not args.no_training:
        try:
            results["training"] = check_training(tmp / "training")
        except Exception:
            results["errors"]["training"] = traceback.format_exc()
    if not args.no_full:
        try:
            results["full"] = check_full_finetuning(tmp / "full")
        except Exception:
            results["errors"]["full"] = traceback.format_exc()
    results["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
