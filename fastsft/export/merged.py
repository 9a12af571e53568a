"""The merged export: the base loaded in 16-bit (never a dequantised 4-bit copy), the adapter merged in,
saved as safetensors with the tokenizer (chat template included) and a generation_config that stops on
the chat template's end-of-turn token. After writing, the folder is reloaded with plain
`AutoModelForCausalLM.from_pretrained` and its logits compared with base + adapter in fp32 (the parity
check); the export fails when they differ by more than the dtype's tolerance. The drift against the
model as trained (4-bit base + adapter) is measured and recorded, not enforced.
"""

from __future__ import annotations

import math
from pathlib import Path

from fastsft.backends.transformers import load_base
from fastsft.chat.generation import answer
from fastsft.chat.templates import chat_ids, end_of_turn_ids
from fastsft.errors import ExportError
from fastsft.export.read import RunInfo, _collect, _print
from fastsft.progress import bar
from fastsft.rundir import RECIPE

# The merged export's parity check compares like with like. Rounding the weights to bf16 / fp16 moves
# the logits of the unchanged base already (its "floor"; 5e-3 to 3e-2 in bf16 for SmolLM2-135M), so:
# - parity: relative logit difference (||a - b|| / ||b||) of the reloaded merged model (computed in
#   fp32) against base + adapter in fp32, allowed up to max(TOLERANCE, FLOOR_FACTOR * floor);
# - reproduction: the merged model's change from the base rounded the same way, against the change
#   the unmerged adapter makes to that rounded base, relative to the latter; an adapter left out or
#   scaled wrong gives about 1, a correct merge a few percent at most (rounding of the merged sum).
#   Checked where the adapter's effect stands above the floor (else no dtype can carry it).
TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}


FLOOR_FACTOR = 3.0


MAX_REPRODUCTION_ERROR = 0.25


_SAMPLE_PROMPTS = (
    "What colour is a banana?",
    "Hello! Who are you?",
    "Write one short sentence about the sea.",
)


def sample_inputs(tokenizer, run_json: dict | None = None, n: int = 3) -> list:
    """A few short chat inputs (prompt + answer) for the parity check."""
    prompts = []
    for s in ((run_json or {}).get("result") or {}).get("samples") or []:
        if isinstance(s, dict) and s.get("prompt"):
            prompts.append(s["prompt"])
    prompts = (prompts + list(_SAMPLE_PROMPTS))[:n]
    out = []
    for p in prompts:
        msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": "A short answer."}]
        out.append(chat_ids(tokenizer, msgs, add_generation_prompt=False))
    return out


def logits_of(model, inputs: list):
    """fp32 logits of each input, concatenated (CPU)."""
    import torch

    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for ids in inputs:
            rows.append(model(input_ids=ids.to(device)).logits.float().cpu().reshape(-1))
    return torch.cat(rows)


def rel_diff(a, b) -> float:
    """||a - b|| / ||b||"""
    import torch

    den = torch.linalg.vector_norm(b).item()
    num = torch.linalg.vector_norm(a - b).item()
    return num / den if den > 0 else num


def merge(run: RunInfo, dtype: str, *, tokenizer=None):
    """Base model in `dtype` (16-bit or fp32, never a dequantised 4-bit copy) with the adapter merged in
    (`tokenizer`: the run's, by default loaded here)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(run.base_path, trust_remote_code=run.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read the base model's config {run.base_path!r}: {e}") from None
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = (
            quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        )
        raise ExportError(
            f"the base model {run.base_path!r} is stored pre-quantised ({method}); merging into it would "
            "bake quantisation error into the export. Point [model] name in "
            f"{run.path / RECIPE} at the 16-bit original of that model and export again."
        )
    model = run.load(dtype, tokenizer=tokenizer)
    return model if run.full else model.merge_and_unload()  # a full fine-tune: nothing to merge


def export_merged(run: RunInfo, out: Path, *, dtype: str, console=None) -> dict:
    """The merged model in `dtype` written to `out`, reloaded and checked (parity, smoke generation),
    with a progress bar over its stages; returns export.json's record."""
    with bar(console, len(STAGES), "merged export: " + ", ".join(STAGES)) as advance:
        return _export_merged(run, out, dtype=dtype, console=console, advance=advance)


STAGES = ("merge", "save", "reload", "parity", "smoke test")  # the steps of the merged export


def _export_merged(run: RunInfo, out: Path, *, dtype: str, console, advance) -> dict:
    from transformers import GenerationConfig

    tokenizer = run.tokenizer()
    eot = end_of_turn_ids(tokenizer)

    merged = merge(run, dtype)
    advance()
    gen = merged.generation_config if merged.generation_config is not None else GenerationConfig()
    gen.eos_token_id = eot if len(eot) > 1 else (eot[0] if eot else gen.eos_token_id)
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    merged.generation_config = gen
    merged.config.use_cache = True
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    del merged
    _collect()
    if not any(out.glob("*.safetensors")):
        raise ExportError(f"the merged model was not written as safetensors in {out}")
    advance()

    inputs = sample_inputs(tokenizer, run.run_json)
    # reloaded as any user would (AutoModelForCausalLM.from_pretrained), computing in fp32
    reloaded = load_base(str(out), "fp32", what="the merged export")
    advance()
    got = logits_of(reloaded, inputs)
    check = merge_parity(run, inputs, got, dtype)
    advance()
    parity = check["rel_logit_diff"]
    _print(
        console,
        f"parity: merged ({dtype}, reloaded) vs {check['reference']}: relative logit diff {parity:.2e} "
        f"(tolerance {check['tolerance']:.1e}: the base alone in {dtype} moves them {check['floor']:.1e}); "
        f"top-1 agreement {check['top1_agreement']:.1%}, KL {check['kl']:.1e}; adapter effect reproduced to "
        + (
            f"{check['reproduction_error']:.1e}"
            if check["reproduction_error"] is not None
            else "(below the floor, not checked)"
        ),
    )
    if not check["passed"]:
        raise ExportError(
            f"the merged model does not reproduce base + adapter ({check['why']}); nothing was written. "
            f"Try --dtype fp32, and check that the adapter in {run.adapter} was trained on {run.base_path}."
        )
    record = {
        "parity": check,
        "end_of_turn_ids": eot,
        "end_of_turn_tokens": tokenizer.convert_ids_to_tokens(eot),
    }

    record["drift_vs_trained"] = _drift_vs_trained(run, inputs, got, parity, tokenizer, console=console)

    # Smoke generation: a greedy answer must end on the end-of-turn token within its budget.
    record["smoke"] = smoke_generation(reloaded, tokenizer, eot, run.run_json, console=console)
    record["stops"] = record["smoke"]["stops"]
    advance()
    del reloaded
    _collect()
    return record


def _drift_vs_trained(run: RunInfo, inputs: list, got, parity: float, tokenizer, *, console=None) -> dict:
    """How far the merged model's logits `got` are from the model as trained (a 4-bit base + adapter);
    recorded, never enforced. A run trained on the 16-bit base: that is the parity number itself."""
    if not run.load_in_4bit:
        return {"reference": "the run trained on the 16-bit base", "rel_logit_diff": parity}
    try:
        trained = run.load(run.train_dtype, load_in_4bit=True, tokenizer=tokenizer)
        drift = rel_diff(got, logits_of(trained, inputs))
        del trained
        _collect()
    except Exception as e:  # bitsandbytes missing or unusable here: say so, do not fail the export
        _print(
            console,
            f"warning: could not measure the drift against the 4-bit model as trained: {e}",
            style="yellow",
        )
        return {"error": f"{type(e).__name__}: {e}"}
    _print(
        console,
        f"drift: merged vs the model as trained (4-bit base + adapter): relative logit diff {drift:.2e}",
    )
    return {"reference": f"4-bit NF4 base ({run.train_dtype}) + adapter", "rel_logit_diff": drift}


def _agreement(got, ref, vocab: int) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || got) per position) of two flat fp32 logit vectors."""
    import torch

    g, r = got.reshape(-1, vocab), ref.reshape(-1, vocab)
    top1 = (g.argmax(-1) == r.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(
        g.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    return top1, max(0.0, kl.item())


def merge_parity(run: RunInfo, inputs: list, got, dtype: str) -> dict:
    """Check the merged model's logits `got` (weights rounded to `dtype`, computed in fp32) against
    base + adapter: in fp32, and against the base rounded to `dtype` the same way (see TOLERANCE)."""
    if run.full:
        return _full_parity(run, inputs, got, dtype)
    tokenizer = run.tokenizer()
    ref_model = run.load("fp32", tokenizer=tokenizer)
    ref = logits_of(ref_model, inputs)
    with ref_model.disable_adapter():
        base_only = logits_of(ref_model, inputs)
    vocab = ref_model.get_output_embeddings().weight.shape[0]
    del ref_model
    _collect()
    if dtype == "fp32":
        floor, base_r, ref_r = 0.0, base_only, ref
    else:  # the same base, its weights rounded to dtype, computed in fp32 as `got` was
        rounded = run.load(dtype, upcast=True, tokenizer=tokenizer)
        ref_r = logits_of(rounded, inputs)
        with rounded.disable_adapter():
            base_r = logits_of(rounded, inputs)
        del rounded
        _collect()
        floor = rel_diff(base_r, base_only)
    parity = rel_diff(got, ref)
    tol = max(TOLERANCE[dtype], FLOOR_FACTOR * floor)
    effect = rel_diff(ref_r, base_r)
    reproduction = rel_diff(got - base_r, ref_r - base_r) if effect > 2 * floor and effect > 0 else None
    top1, kl = _agreement(got, ref, vocab)
    why = []
    if not math.isfinite(parity) or parity > tol:
        why.append(f"relative logit difference {parity:.3e} is above the {dtype} tolerance {tol:.1e}")
    if reproduction is not None and not reproduction <= MAX_REPRODUCTION_ERROR:
        why.append(
            f"its change from the base differs from the adapter's by {reproduction:.0%} (at most "
            f"{MAX_REPRODUCTION_ERROR:.0%}): the adapter is missing or scaled wrong"
        )
    return {
        "reference": "base (fp32) + adapter, unmerged",
        "rel_logit_diff": parity,
        "floor": floor,  # the base alone, weights rounded to dtype, against itself in fp32
        "tolerance": tol,
        "adapter_effect": rel_diff(ref, base_only),  # how much the adapter changes the base's logits
        "reproduction_error": reproduction,
        "top1_agreement": top1,
        "kl": kl,
        "inputs": len(inputs),
        "passed": not why,
        "why": "; ".join(why),
    }


def _full_parity(run: RunInfo, inputs: list, got, dtype: str) -> dict:
    """A full fine-tune's export is its trained model rounded to `dtype`: the reloaded export must give
    exactly the logits of that model rounded so (a missing or stale weight shows), and stay within the
    rounding tolerance of the model in fp32."""
    ref_model = run.load("fp32")
    ref = logits_of(ref_model, inputs)
    vocab = ref_model.get_output_embeddings().weight.shape[0]
    del ref_model
    rounded = ref if dtype == "fp32" else logits_of(run.load(dtype, upcast=True), inputs)
    _collect()
    floor = rel_diff(rounded, ref)
    parity, exact = rel_diff(got, ref), rel_diff(got, rounded)
    tol = max(TOLERANCE[dtype], FLOOR_FACTOR * floor)
    top1, kl = _agreement(got, ref, vocab)
    why = []
    if not math.isfinite(parity) or parity > tol:
        why.append(f"relative logit difference {parity:.3e} is above the {dtype} tolerance {tol:.1e}")
    if not exact <= 1e-6:
        why.append(f"it differs from the trained model rounded to {dtype} by {exact:.1e}")
    return {
        "reference": "the fully fine-tuned model (fp32)",
        "rel_logit_diff": parity,
        "floor": floor,
        "tolerance": tol,
        "adapter_effect": None,
        "reproduction_error": None,
        "rounded_diff": exact,
        "top1_agreement": top1,
        "kl": kl,
        "inputs": len(inputs),
        "passed": not why,
        "why": "; ".join(why),
    }


def smoke_generation(
    model, tokenizer, eot: list[int], run_json: dict | None = None, *, budget: int = 64, console=None
) -> dict:
    """A greedy answer of the exported model (fastsft.chat.generation) to a sample prompt: it must end on the
    end-of-turn token within `budget` tokens, else a warning (recorded, not enforced)."""
    prompt = None
    for s in ((run_json or {}).get("result") or {}).get("samples") or []:
        if isinstance(s, dict) and s.get("prompt"):
            prompt = s["prompt"]
            break
    prompt = prompt or _SAMPLE_PROMPTS[0]
    got = answer(model, tokenizer, [{"role": "user", "content": prompt}], eot=eot, max_new_tokens=budget)
    if not got.stopped:
        _print(
            console,
            f"WARNING: the exported model did not end its answer with the end-of-turn token "
            f"{tokenizer.convert_ids_to_tokens(eot[:1])} within {budget} tokens (prompt {prompt!r}). It may "
            "ramble or invent new turns: check the chat template and train longer on complete answers.",
            style="bold yellow",
        )
    new_tokens = len(got.ids) + got.stopped  # the end-of-turn token counts, as generate returned it
    return {
        "prompt": prompt,
        "answer": got.text,
        "new_tokens": new_tokens,
        "budget": budget,
        "stops": got.stopped,
    }
