"""Exports of a finished run: `export_run(RUN_DIR, fmt=...)`.

- `merged`: the base model loaded in 16-bit (never a dequantised 4-bit copy), the adapter merged in,
  saved as safetensors with the tokenizer (chat template included) and a generation_config that stops
  on the chat template's end-of-turn token. After writing, the folder is reloaded with plain
  `AutoModelForCausalLM.from_pretrained` and its logits compared with base + adapter in fp32; the
  export fails (and leaves nothing) when they differ by more than the dtype's tolerance. The drift
  against the model as trained (4-bit base + adapter) is measured and recorded, not enforced.
- `adapter`: the PEFT adapter and tokenizer, with a README.md model card.
- `gguf`: one F16 / BF16 / F32 GGUF file for llama.cpp, for Llama, Mistral and Qwen2 models with a
  byte-level BPE tokenizer, written with the `gguf` package and read back to check it.

Every export is written into a temporary folder beside its destination and renamed at the end; an
existing destination is refused unless `overwrite`. `export.json` in the folder records what was done
and the checks' numbers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fastsft import files
from fastsft.chat.templates import chat_ids, end_of_turn_ids
from fastsft.errors import ExportError
from fastsft.recipe import EXPORT_DTYPES, EXPORT_FORMATS
from fastsft.run import guard
from fastsft.rundir import ADAPTER, MODEL, RECIPE, RUN_JSON

FORMATS = EXPORT_FORMATS  # owned by the recipe schema ([export] formats); the same names here and on the CLI
DTYPES = EXPORT_DTYPES
EXPORT_JSON = "export.json"

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

# HF architecture -> (llama.cpp architecture, whether q/k weights are permuted as convert_hf_to_gguf does)
GGUF_ARCHS = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}

_SAMPLE_PROMPTS = (
    "What colour is a banana?",
    "Hello! Who are you?",
    "Write one short sentence about the sea.",
)

# Files of a Trainer's adapter folder that are not part of an adapter (pickles, optimizer state).
_ADAPTER_SKIP = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


def _print(console, msg: str, style: str | None = None) -> None:
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    console.print(msg, style=style, highlight=False, markup=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# The run being exported
# ----------------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    path: Path
    adapter: Path
    recipe: object | None  # fastsft.recipe.Recipe
    run_json: dict
    base_path: str  # what from_pretrained reads for the base model
    train_dtype: str  # compute dtype of the run: bf16 | fp16 | fp32
    load_in_4bit: bool
    trust_remote_code: bool  # granted by the command line (backends.LoadPolicy), never by the recipe
    allow_pickle: bool = False
    # a full fine-tune ([train] method = "full"): no adapter; `adapter` and `base_path` are both RUN/model,
    # the trained model itself, which merged / gguf export as they are
    full: bool = False

    @property
    def policy(self):
        """What loading this run's models may do (backends.LoadPolicy)."""
        from fastsft.backends.common import LoadPolicy

        return LoadPolicy(trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle)

    def tokenizer(self):
        """The run's tokenizer: the adapter folder's (chat template and any added pad token), else the base's."""
        from fastsft.backends.common import load_tokenizer

        return load_tokenizer(self.adapter, self.base_path, policy=self.policy)

    def load(self, dtype: str, *, load_in_4bit: bool = False, upcast: bool = False, tokenizer=None):
        """Base model + the run's adapter (backends.transformers.load_trained); a full fine-tune's model."""
        from fastsft.backends.transformers import load_base, load_trained

        if self.full:
            model = load_base(self.base_path, dtype, policy=self.policy, what="the fine-tuned model")
            return model.float() if upcast else model

        return load_trained(
            self.base_path, self.adapter, dtype, tokenizer=tokenizer or self.tokenizer(),
            load_in_4bit=load_in_4bit, upcast=upcast, policy=self.policy,
        )  # fmt: skip


def read_run(run_dir: str | Path, *, policy=None) -> RunInfo:
    """The run directory's recipe, run.json and base model, or an ExportError saying what is missing.
    `policy` (backends.LoadPolicy, default: neither remote code nor pickle) is what loading may do."""
    from fastsft.backends import LoadPolicy, compute_dtype, resolve_model_path

    policy = policy or LoadPolicy()

    path = Path(run_dir)
    if not path.is_dir():
        raise ExportError(
            f"{path}: no such run directory. Pass the folder `fastsft run` wrote (runs/<name>)."
        )
    adapter = path / ADAPTER
    if not (adapter / "adapter_config.json").exists() and (path / MODEL / "config.json").exists():
        return _read_full_run(path, policy)
    if not (adapter / "adapter_config.json").exists():
        raise ExportError(
            f"{path} has no trained adapter ({adapter}/adapter_config.json is missing). "
            "Export a run that finished: `fastsft run` writes the adapter at the end of training."
        )
    run_json, recipe = _run_json_and_recipe(path, policy)

    recorded = run_json.get("model_path")
    base_path = None
    if recorded and Path(recorded).exists():
        base_path = recorded  # the folder the run trained on
    elif recipe is not None:
        base_path = resolve_model_path(recipe)  # a builtin model is re-made if its cache was cleared
    elif recorded:
        base_path = recorded  # a hub id
    else:
        cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        base_path = cfg.get("base_model_name_or_path")
    if not base_path:
        raise ExportError(f"{path}: cannot tell the base model (no recipe.toml, no model_path in run.json).")

    train_dtype = run_json.get("dtype") or (
        compute_dtype(recipe.model.dtype) if recipe is not None else "fp32"
    )
    return RunInfo(
        path=path,
        adapter=adapter,
        recipe=recipe,
        run_json=run_json,
        base_path=str(base_path),
        train_dtype=train_dtype,
        load_in_4bit=bool(recipe.model.load_in_4bit) if recipe is not None else False,
        trust_remote_code=policy.trust_remote_code,
        allow_pickle=policy.allow_pickle,
    )


def _run_json_and_recipe(path: Path, policy) -> tuple[dict, object]:
    """A run directory's run.json ({} when absent) and recipe (None when absent), the recipe checked
    against what `policy` allows."""
    from fastsft import recipe as recipe_mod

    run_json = {}
    if (path / RUN_JSON).exists():
        try:
            run_json = json.loads((path / RUN_JSON).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ExportError(f"{path / RUN_JSON} cannot be read: {e}") from None
    recipe = recipe_mod.load(path / RECIPE) if (path / RECIPE).exists() else None
    if recipe is not None:
        policy.check_recipe(recipe, where=str(path / RECIPE))
    return run_json, recipe


def _read_full_run(path: Path, policy) -> RunInfo:
    """A full fine-tune's run directory: its model/ folder is the trained model."""
    run_json, recipe = _run_json_and_recipe(path, policy)
    model = path / MODEL
    return RunInfo(path=path, adapter=model, recipe=recipe, run_json=run_json, base_path=str(model),
                   train_dtype=run_json.get("dtype") or "fp32", load_in_4bit=False,
                   trust_remote_code=policy.trust_remote_code, allow_pickle=policy.allow_pickle, full=True)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The parity check's inputs and numbers
# ----------------------------------------------------------------------------------------------


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


def _collect() -> None:
    import gc

    gc.collect()


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------


def export_run(
    run_dir: str | Path,
    *,
    fmt: str,
    to: str | Path | None = None,
    dtype: str = "bf16",
    overwrite: bool = False,
    console=None,
    policy=None,
) -> Path:
    """Export the run in `run_dir` as `fmt` (merged | adapter | gguf) into `to`
    (default RUN_DIR/export-<fmt>) and return that folder. `policy` (backends.LoadPolicy) is what loading
    the base model may do. Raises ExportError."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}.")
    if dtype not in DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}; choose one of: {', '.join(DTYPES)}.")
    run = read_run(run_dir, policy=policy)
    target = Path(to) if to is not None else run.path / f"export-{fmt}"
    _prepare_destination(run, target, fmt, dtype, overwrite=overwrite)
    tmp = files.temp_dir(target.parent, f".{target.name}.tmp-")
    try:
        what = fmt if fmt == "adapter" else f"{fmt} ({dtype})"
        _print(console, f"export {what} of {run.path} -> {target}")
        _write_export(run, fmt, dtype, tmp, console=console)
        _swap_in(tmp, target)
    except Exception as e:  # ENOSPC, EIO... while writing: nothing is left half-written
        if not files.is_write_error(e) or isinstance(e, ExportError):
            raise
        where = getattr(e, "filename", None) or tmp
        cause = (
            files.describe_os_error(e, where) if isinstance(e, OSError) else str(e).strip().splitlines()[0]
        )
        raise ExportError(
            f"the {fmt} export to {target} failed: {cause}; nothing was written"
            f"{' and the previous export is kept' if target.exists() else ''}. Free some space or choose another --to."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print(console, f"exported {fmt}: {target}", style="green")
    return target


def _prepare_destination(run: RunInfo, target: Path, fmt: str, dtype: str, *, overwrite: bool) -> None:
    """Refuse a destination that would lose data, make its parent, clear what killed exports left there,
    and check the free space before anything is loaded (a full disk would fail at the very end)."""
    check_destination(target, run.path, overwrite=overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--to {target}: {files.describe_os_error(e, target.parent)}") from None
    files.remove_stale(target.parent, f".{target.name}.tmp-")  # left by killed exports
    files.remove_stale(target.parent, f".{target.name}.old-")
    if fmt != "adapter":
        need = export_bytes(run, dtype)
        if need is not None:
            guard.check_disk(
                target.parent, need, f"the {fmt} export ({dtype})", flag="--to", error=ExportError
            )


def _write_export(run: RunInfo, fmt: str, dtype: str, out: Path, *, console=None) -> dict:
    """Write the export into folder `out` with its export.json (what was done, the checks' numbers)."""
    t0 = time.perf_counter()
    if fmt == "merged":
        record = export_merged(run, out, dtype=dtype, console=console)
    elif fmt == "adapter":
        record = export_adapter(run, out, console=console)
    else:
        record = export_gguf(run, out, dtype=dtype, console=console)
    record = {
        "format": fmt,
        "dtype": dtype if fmt != "adapter" else None,
        "run_dir": str(run.path.resolve()),
        "base_model": run.recipe.model.name if run.recipe is not None else run.base_path,
        "base_path": run.base_path,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - t0, 2),
        **record,
    }
    files.write_text(out / EXPORT_JSON, json.dumps(record, indent=2, default=str) + "\n")
    files.apply_umask(out)
    return record


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished folder `tmp` to `target`; an earlier export there is moved aside first and
    put back when anything fails, deleted when all went well."""
    old = None
    try:
        if target.exists():
            old = files.temp_dir(target.parent, f".{target.name}.old-")
            os.replace(target, old / "export")
        os.replace(tmp, target)
    except BaseException:
        if old is not None and (old / "export").exists() and not target.exists():
            os.replace(old / "export", target)  # put the previous export back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_destination(target: Path, run_path: Path, *, overwrite: bool) -> None:
    """Refuse a --to that would lose data: a symbolic link, a file, the run being exported or a folder
    holding it, a folder holding any fastsft run, or (even with `overwrite`) anything but an earlier
    export. Nothing is changed when refused."""
    from fastsft.rundir import is_run_dir

    if target.is_symlink():
        raise ExportError(
            f"--to {target} is a symbolic link; fastsft never writes through a link. Choose another --to."
        )
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} is a file, not a folder; nothing was changed. Choose another --to.")
    t, r = target.resolve(), run_path.resolve()
    if t == r or t in r.parents:
        raise ExportError(
            f"--to {target} is the run being exported{'' if t == r else ' or a folder that holds it'}; "
            f"nothing was changed. Choose a new folder, e.g. {run_path / 'export-merged'}."
        )
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise ExportError(
            f"{target} already exists; nothing was changed. "
            "Pass --overwrite to replace it, or choose another --to."
        )
    if not (target / EXPORT_JSON).is_file() or is_run_dir(target) or _holds_a_run(target):
        raise ExportError(
            f"--to {target} holds files that are not a fastsft export; nothing was changed. --overwrite only "
            "ever replaces an earlier export: choose another --to."
        )


def _holds_a_run(folder: Path, limit: int = 10000) -> bool:
    """Whether a fastsft run directory lies anywhere under `folder` (looked for in at most `limit` folders)."""
    for n, (_root, _dirs, names) in enumerate(os.walk(folder)):
        if RUN_JSON in names and RECIPE in names:
            return True
        if n > limit:
            return True  # too big to tell: refuse rather than guess
    return False


def export_bytes(run: RunInfo, dtype: str) -> int | None:
    """About the size of a merged or GGUF export: the base model's parameters (counted on the meta
    device, tied weights once) in `dtype`, plus the tokenizer; None when the config cannot be read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastsft.backends.common import torch_dtype

    try:
        config = AutoConfig.from_pretrained(run.base_path, trust_remote_code=run.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=run.trust_remote_code)
    except Exception:  # noqa: BLE001 - the export itself will say what is wrong with the base
        return None
    n = sum(p.numel() for p in model.parameters())
    return int(n * torch_dtype(dtype).itemsize * 1.02) + 64 * 2**20


# ----------------------------------------------------------------------------------------------
# merged
# ----------------------------------------------------------------------------------------------


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
    from transformers import GenerationConfig

    from fastsft.backends.transformers import load_base

    tokenizer = run.tokenizer()
    eot = end_of_turn_ids(tokenizer)

    merged = merge(run, dtype)
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

    inputs = sample_inputs(tokenizer, run.run_json)
    # reloaded as any user would (AutoModelForCausalLM.from_pretrained), computing in fp32
    reloaded = load_base(str(out), "fp32", what="the merged export")
    got = logits_of(reloaded, inputs)
    check = merge_parity(run, inputs, got, dtype)
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
    from fastsft.chat.generation import answer

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


# ----------------------------------------------------------------------------------------------
# adapter
# ----------------------------------------------------------------------------------------------


def export_adapter(run: RunInfo, out: Path, *, console=None) -> dict:
    if run.full:
        raise ExportError(
            f'{run.path} is a full fine-tune ([train] method = "full"): it has no adapter, its model/ is the '
            "whole trained model. Export --format merged (or gguf) instead."
        )
    copied = []
    for f in sorted(run.adapter.iterdir()):
        if f.name in _ADAPTER_SKIP or f.name.startswith("."):
            continue
        if f.is_dir():
            shutil.copytree(f, out / f.name)
        else:
            shutil.copy2(f, out / f.name)
        copied.append(f.name)
    if not any(n.startswith("tokenizer") for n in copied):
        from fastsft.backends.common import load_tokenizer

        tok = load_tokenizer(run.base_path, policy=run.policy)
        tok.save_pretrained(str(out))
    if (run.path / RECIPE).exists():
        shutil.copy2(run.path / RECIPE, out / RECIPE)
    model_card(run).save(out / "README.md")
    return {"files": sorted(p.name for p in out.iterdir())}


_CARD_METRICS = (
    "global_step",
    "train_loss",
    "tokens",
    "train_seconds",
    "tokens_per_s",
    "peak_mem_gib",
    "device",
    "backend",
)


def model_card(run: RunInfo):
    """The adapter export's README.md: a `huggingface_hub.ModelCard` whose metadata (library, base
    model, tags) the hub reads, and a body saying what was trained, on what, how well, and how to load
    it. A base fastsft makes locally (built-in, GGUF) is not named as `base_model` (no hub id)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = run.recipe.model.name if run.recipe is not None else run.base_path
    made_here = base.startswith(("builtin:", "package:")) or base.lower().endswith(".gguf")
    meta = ModelCardData(
        library_name="peft", base_model=None if made_here else base, tags=["fastsft", "lora", "sft"]
    )
    body = [
        *_card_summary(run, base),
        *_card_data(run),
        *_card_metrics(run),
        *_card_use(run, base, made_here),
    ]
    if (run.path / RECIPE).exists():
        recipe_text = (run.path / RECIPE).read_text(encoding="utf-8").strip()
        body += ["## Recipe", "", "```toml", recipe_text, "```", ""]
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body))


def _card_summary(run: RunInfo, base: str) -> list[str]:
    cfg = json.loads((run.adapter / "adapter_config.json").read_text(encoding="utf-8"))
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, set, tuple)):  # PEFT records full module paths for "all-linear"
        targets = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
    return [
        f"# LoRA adapter for {base}",
        "",
        f"Fine-tuned with fastsft (supervised fine-tuning, LoRA r={cfg.get('r')}, "
        f"alpha={cfg.get('lora_alpha')}, "
        f"targets {', '.join(targets) if isinstance(targets, list) else targets}).",
        "",
        "## Base model",
        "",
        f"- name: `{base}`",
        f"- loaded from: `{run.base_path}`",
        f"- trained in 4-bit (QLoRA): {run.load_in_4bit}",
        "",
    ]


def _card_data(run: RunInfo) -> list[str]:
    data = run.run_json.get("data") or {}
    result = run.run_json.get("result") or {}
    lines = ["## Data", ""]
    if run.recipe is not None:
        lines.append(f"- train: `{run.recipe.data.train}`")
        if run.recipe.data.eval:
            lines.append(f"- eval: `{run.recipe.data.eval}`")
    if data.get("fingerprint"):
        lines.append(f"- fingerprint: `{data['fingerprint']}`")
    summary = data.get("summary") or (result.get("data") or {}).get("summary")
    if summary:
        lines.append(f"- {summary}")
    return [*lines, ""]


def _card_metrics(run: RunInfo) -> list[str]:
    result = run.run_json.get("result") or {}
    metrics = {k: result.get(k) for k in _CARD_METRICS if result.get(k) is not None}
    if not metrics:
        return ["## Metrics", "", "No metrics recorded (run.json has no result).", ""]
    lines = ["## Metrics", "", "| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return [*lines, ""]


def _card_use(run: RunInfo, base: str, made_here: bool) -> list[str]:
    lines = ["## Use", ""]
    if made_here:
        lines += [
            f"The base, `{base}`, is a model fastsft makes locally (a built-in tiny model, or a GGUF file "
            f"converted to safetensors) into its cache; on the training machine that is the folder "
            f"`{run.base_path}`, which `fastsft run` with the recipe below makes again. Load it as:",
            "",
        ]
    return [
        *lines,
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{run.base_path if made_here else base}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]


# ----------------------------------------------------------------------------------------------
# gguf
# ----------------------------------------------------------------------------------------------


def permute_qk(w, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's q/k permutation (convert_hf_to_gguf.LlamaModel.permute): HF's rotate-half layout ->
    GGML's interleaved rotary pairs. Works on torch tensors and numpy arrays (weights and biases)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(w, n_head: int, n_head_kv: int | None = None):
    """The inverse of `permute_qk`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


_LLAMA3_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def _tokenizer_pre(tok_json: dict, arch: str) -> tuple[str, str | None]:
    """llama.cpp's pre-tokenizer name for this tokenizer, and a warning when it is a guess."""
    pre = tok_json.get("pre_tokenizer") or {}
    if arch == "qwen2":
        return "qwen2", None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2", None
    if pre.get("type") == "Sequence":
        for p in pre.get("pretokenizers", []):
            regex = (p.get("pattern") or {}).get("Regex", "")
            if p.get("type") == "Split" and regex.startswith(_LLAMA3_REGEX_START):
                return "llama-bpe", None
    return "default", "unrecognised pre-tokenizer: llama.cpp will split text with its default regex"


def _vocab(tokenizer, n_vocab: int):
    """(tokens, types) as convert_hf_to_gguf's BPE vocab: ids without a token become [PAD<id>] (unused)."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


@dataclass
class _GGUFVocab:
    tokenizer: object
    tokens: list[str]
    types: list
    special: object  # gguf.SpecialVocab: merges, special token ids, chat template
    pre: str  # llama.cpp's pre-tokenizer name
    eot: list[int]


def _gguf_arch(run: RunInfo):
    """(config, HF architecture, llama.cpp architecture, permute q/k, rope scaling dict, its type), or
    an ExportError for what the GGUF writer does not handle."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(run.base_path, trust_remote_code=run.trust_remote_code)
    hf_arch = (getattr(config, "architectures", None) or ["?"])[0]
    if hf_arch not in GGUF_ARCHS:
        raise ExportError(
            f"GGUF export supports {', '.join(GGUF_ARCHS)}; {run.base_path} is {hf_arch}. Export `merged` "
            "instead and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    arch, permute = GGUF_ARCHS[hf_arch]
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = (
        (rope.get("rope_type") or rope.get("type") or "default") if isinstance(rope, dict) else "default"
    )
    if rope_type not in ("default", "linear"):
        raise ExportError(
            f"GGUF export does not handle rope scaling {rope_type!r} yet; "
            "export `merged` and convert it with "
            "llama.cpp's convert_hf_to_gguf.py."
        )
    return config, hf_arch, arch, permute, rope, rope_type


def _gguf_vocab(run: RunInfo, n_vocab: int, arch: str, console=None) -> _GGUFVocab:
    """The run's tokenizer as llama.cpp's byte-level BPE ("gpt2") vocabulary, or an ExportError."""
    import gguf

    tokenizer = run.tokenizer()
    with tempfile.TemporaryDirectory(prefix="fastsft-tok-") as tokdir:
        tokenizer.save_pretrained(tokdir)
        tj_path = Path(tokdir) / "tokenizer.json"
        tok_json = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.exists() else {}
        model_type = (tok_json.get("model") or {}).get("type")
        byte_level = (
            "ByteLevel" in json.dumps(tok_json.get("pre_tokenizer"))
            or (tok_json.get("decoder") or {}).get("type") == "ByteLevel"
        )
        if model_type != "BPE" or not byte_level:
            raise ExportError(
                'GGUF export writes byte-level BPE ("gpt2") tokenizers; '
                f"this one is {model_type or 'not a tokenizer.json'}"
                f"{'' if byte_level else ' without byte-level pre-tokenisation'}. "
                "Export `merged` and convert it with "
                "llama.cpp's convert_hf_to_gguf.py."
            )
        tokens, types = _vocab(tokenizer, n_vocab)
        if len(tokenizer) > n_vocab:
            raise ExportError(
                f"the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embeddings."
            )
        special = gguf.SpecialVocab(tokdir, load_merges=True, n_vocab=n_vocab)
    pre, pre_warning = _tokenizer_pre(tok_json, arch)
    if pre_warning:
        _print(console, f"warning: {pre_warning}", style="yellow")
    return _GGUFVocab(tokenizer, tokens, types, special, pre, end_of_turn_ids(tokenizer))


def _gguf_header(writer, config, vocab: _GGUFVocab, *, dtype: str, rope: dict, rope_type: str) -> None:
    """The model's hyperparameters and tokenizer as GGUF metadata."""
    import gguf

    n_head = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope.get("factor", 1.0)))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(
        {
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "fp16": gguf.LlamaFileType.MOSTLY_F16,
            "fp32": gguf.LlamaFileType.ALL_F32,
        }[dtype]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    vocab.special.add_to_gguf(writer, quiet=True)
    tokenizer = vocab.tokenizer
    if vocab.special.chat_template is None and getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    if vocab.eot and vocab.eot[0] != tokenizer.eos_token_id:
        writer.add_eot_token_id(vocab.eot[0])


def _gguf_tensors(
    writer, state: dict, config, *, arch_name: str, permute: bool, dtype: str
) -> tuple[dict, dict]:
    """Add the merged model's tensors under llama.cpp's names (q/k permuted where llama.cpp expects it;
    1-D tensors in F32). Returns ({name: shape}, {name: first values as written}) for the read-back."""
    import gguf
    import numpy as np

    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "fp16": gguf.GGMLQuantizationType.F16,
             "fp32": gguf.GGMLQuantizationType.F32}[dtype]  # fmt: skip
    tmap = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.LLAMA if arch_name == "llama" else gguf.MODEL_ARCH.QWEN2,
        int(config.num_hidden_layers),
    )
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected: dict[str, tuple[int, ...]] = {}
    samples: dict[str, np.ndarray] = {}
    for key, tensor in state.items():
        if (tied and key == "lm_head.weight") or key.endswith("rotary_emb.inv_freq"):
            continue
        gname = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(
                f"GGUF export: no llama.cpp name for tensor {key!r} of {config.architectures[0]}."
            )
        data = tensor.detach().float().cpu()
        if permute and key.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_qk(data, n_head, n_head)
        elif permute and key.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_qk(data, n_head, n_kv)
        arr = data.numpy()
        # 1-D tensors (norms, biases) stay F32, as llama.cpp's converter keeps them.
        t_qtype = gguf.GGMLQuantizationType.F32 if arr.ndim == 1 else qtype
        q = gguf.quants.quantize(arr, t_qtype)
        if t_qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(gname, q)
        else:
            writer.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=t_qtype)
        expected[gname] = tuple(arr.shape)
        flat = arr.reshape(-1)
        samples[gname] = gguf.quants.dequantize(
            gguf.quants.quantize(flat[:64].copy(), t_qtype), t_qtype
        ).reshape(-1)
    return expected, samples


def export_gguf(run: RunInfo, out: Path, *, dtype: str, console=None) -> dict:
    """One GGUF file (llama.cpp) of the merged model in `dtype`, written with the `gguf` package and
    read back to check every tensor's shape and first values and the vocabulary."""
    import gguf

    config, hf_arch, arch, permute, rope, rope_type = _gguf_arch(run)
    vocab = _gguf_vocab(run, int(config.vocab_size), arch, console=console)
    name = Path(run.recipe.model.name if run.recipe is not None else run.base_path).name.replace(
        "builtin:", ""
    )
    file = out / f"{name}-sft-{dtype}.gguf"
    writer = gguf.GGUFWriter(str(file), arch)
    writer.add_name(f"{name}-sft")
    _gguf_header(writer, config, vocab, dtype=dtype, rope=rope, rope_type=rope_type)

    merged = merge(run, dtype)
    state = merged.state_dict()
    expected, samples = _gguf_tensors(writer, state, config, arch_name=arch, permute=permute, dtype=dtype)
    del merged, state
    _collect()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    check = verify_gguf(file, expected, samples, n_tokens=len(vocab.tokens))
    _print(console, f"gguf: {file.name}: {check['tensors']} tensors, {arch}, {dtype}; read back and checked")
    return {
        "file": file.name,
        "arch": arch,
        "hf_arch": hf_arch,
        "tokenizer_pre": vocab.pre,
        "permuted_qk": permute,
        "end_of_turn_ids": vocab.eot,
        "verify": check,
    }


def verify_gguf(file: Path, expected: dict, samples: dict, *, n_tokens: int) -> dict:
    """Read the file back: every tensor present with its shape, sample values equal, vocab complete."""
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as e:
        raise ExportError(f"the GGUF file {file.name} cannot be read back: {e}") from None
    got = {t.name: t for t in reader.tensors}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ExportError(f"GGUF read-back: missing tensors {missing}, unexpected {extra}")
    worst = 0.0
    for name, shape in expected.items():
        t = got[name]
        shape_back = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGML lists dimensions fastest first
        if shape_back != shape:
            raise ExportError(f"GGUF read-back: {name} has shape {shape_back}, expected {shape}")
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)[: len(samples[name])]
        diff = float(np.max(np.abs(values - samples[name]))) if len(values) else 0.0
        worst = max(worst, diff)
        if diff != 0.0:
            raise ExportError(
                f"GGUF read-back: values of {name} differ from what was written (max {diff:.3e})"
            )
    field = reader.get_field("tokenizer.ggml.tokens")
    n_back = len(field.data) if field is not None else 0
    if n_back != n_tokens:
        raise ExportError(f"GGUF read-back: {n_back} tokens, expected {n_tokens}")
    return {"tensors": len(expected), "tokens": n_back, "max_abs_diff": worst}


__all__ = [
    "FORMATS",
    "DTYPES",
    "TOLERANCE",
    "GGUF_ARCHS",
    "export_run",
    "export_merged",
    "export_adapter",
    "export_gguf",
    "read_run",
    "merge",
    "permute_qk",
    "unpermute_qk",
    "verify_gguf",
]
