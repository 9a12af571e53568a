"""The stock backend: `AutoModelForCausalLM` (+ bitsandbytes NF4 when 4-bit) + PEFT LoRA.

Runs anywhere (bitsandbytes quantises on the CPU too) and is the baseline the benchmarks compare
against. Gradient checkpointing is switched on by the Trainer from `SFTConfig`.
"""

from __future__ import annotations

from ..errors import BackendError


def lora_config(recipe):
    from peft import LoraConfig

    lc = recipe.lora
    return LoraConfig(
        r=lc.r,
        lora_alpha=lc.lora_alpha,
        lora_dropout=lc.lora_dropout,
        bias=lc.bias,
        target_modules=lc.target_modules,
        use_rslora=lc.use_rslora,
        task_type="CAUSAL_LM",
    )


def load(recipe, path: str, dtype: str, *, policy=None):
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from . import LoadPolicy, check_target_modules, load_tokenizer, torch_dtype

    policy = policy or LoadPolicy()

    tdtype = torch_dtype(dtype)
    kwargs = dict(dtype=tdtype, **policy.from_pretrained_kwargs())
    attn = recipe.model.attn_implementation
    kwargs["attn_implementation"] = "sdpa" if attn == "auto" else attn
    if recipe.model.load_in_4bit:
        kwargs["quantization_config"] = nf4_config(tdtype)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise BackendError(f"cannot load the model {path!r}: {e}") from None
    tokenizer = load_tokenizer(recipe, path, policy=policy)
    if recipe.model.load_in_4bit:
        # Casts norms to float32 and readies the inputs for checkpointing; checkpointing itself is
        # enabled by the Trainer, so not here.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    if recipe.model.load_in_4bit and not torch.cuda.is_available():
        _keep_cpu_4bit_trainable(model)
    check_target_modules(model, recipe.lora.target_modules)
    model = get_peft_model(model, lora_config(recipe))
    info = {
        "quantization": "nf4+double-quant" if recipe.model.load_in_4bit else None,
        "attn_implementation": kwargs["attn_implementation"],
    }
    return model, tokenizer, info


def _keep_cpu_4bit_trainable(model) -> None:
    """bitsandbytes repacks a CPU Linear4bit's weight for its bf16 inference kernel at the first
    eval-mode forward (generation, evaluation) and keeps it so in training, where that kernel has no
    autograd (wrong input gradients, bf16 numerics, a resumed run that differs from the original).
    fastsft evaluates and generates between training steps, so the repacking is turned off."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def nf4_config(compute_dtype):
    """QLoRA's quantisation: NF4 with double quantisation, computing (and storing, which FSDP needs to
    shard the packed weights) in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
    )
