"""The Unsloth backend: `FastLanguageModel` (CUDA only).

Unsloth patches transformers, trl and peft when it is imported, so `import_unsloth_first` runs
before anything of those is imported by the run (see `backends.load_model`).
"""

from __future__ import annotations

import sys
import warnings

from ..errors import BackendError
from .common import LoadPolicy, check_target_modules, float32_trainable, torch_dtype
from .transformers import modules_to_save

# Unsloth wants explicit module names; "all-linear" means these for the decoder architectures it patches.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def import_unsloth_first() -> None:
    if "unsloth" in sys.modules:  # imported earlier, first (it imports transformers, trl and peft itself)
        return
    late = [m for m in ("transformers", "trl", "peft") if m in sys.modules]
    if late:
        warnings.warn(
            f"{', '.join(late)} imported before unsloth: some of Unsloth's patches may not apply",
            stacklevel=2,
        )
    try:
        import unsloth  # noqa: F401
    except Exception as e:  # unsloth raises plain exceptions (NotImplementedError, ImportError...)
        raise BackendError(f'unsloth failed to import: {e}. Use [model] backend = "transformers".') from None


def load(recipe, path: str, dtype: str, *, policy=None):
    from unsloth import FastLanguageModel

    policy = policy or LoadPolicy()

    full = recipe.train.method == "full"
    extra = {}
    if full:
        # Unsloth's full fine-tuning (its FastModel path): every weight trainable, its own checkpointing
        extra = {
            "full_finetuning": True,
            "use_gradient_checkpointing": "unsloth" if recipe.train.gradient_checkpointing else False,
        }
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=path,
            max_seq_length=recipe.data.max_length,
            dtype=torch_dtype(dtype),
            load_in_4bit=recipe.model.load_in_4bit,
            load_in_8bit=recipe.model.load_in_8bit,
            trust_remote_code=policy.trust_remote_code,
            **extra,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise BackendError(f"unsloth cannot load {path!r}: {e}") from None
    quantization = (
        "unsloth 4-bit"
        if recipe.model.load_in_4bit
        else "unsloth 8-bit"
        if recipe.model.load_in_8bit
        else None
    )
    if full:  # (`modules_to_save` under fp16 Unsloth's get_peft_model makes float32 itself)
        return float32_trainable(model, dtype), tokenizer, {"quantization": None}
    lc = recipe.lora
    check_target_modules(model, lc.target_modules)
    targets = ALL_LINEAR if lc.target_modules == "all-linear" else lc.target_modules
    model = FastLanguageModel.get_peft_model(
        model,
        r=lc.r,
        lora_alpha=lc.lora_alpha,
        lora_dropout=lc.lora_dropout,
        bias=lc.bias,
        target_modules=targets,
        use_rslora=lc.use_rslora,
        use_dora=lc.use_dora,
        modules_to_save=modules_to_save(recipe),
        use_gradient_checkpointing="unsloth" if recipe.train.gradient_checkpointing else False,
        random_state=recipe.train.seed,
        max_seq_length=recipe.data.max_length,
    )
    return model, tokenizer, {"quantization": quantization}
