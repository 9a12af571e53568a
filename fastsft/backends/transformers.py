"""The stock backend: `AutoModelForCausalLM` (+ bitsandbytes NF4 / int8) + PEFT LoRA or DoRA, or every
weight trainable (`[train] method = "full"`: no PEFT at all, the model itself trains).

Runs anywhere (bitsandbytes quantises on the CPU too) and is the baseline the benchmarks compare
against. Gradient checkpointing is switched on by the Trainer from `SFTConfig`.
"""

from __future__ import annotations

import pickle

from ..errors import BackendError
from .common import (
    LoadPolicy,
    check_target_modules,
    fit_embeddings,
    float32_trainable,
    tokenizer_from,
    torch_dtype,
)


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
        use_dora=lc.use_dora,
        modules_to_save=modules_to_save(recipe),
        task_type="CAUSAL_LM",
    )


def modules_to_save(recipe) -> list[str] | None:
    """`[lora] modules_to_save` as a list (None when unset or empty)."""
    names = recipe.lora.modules_to_save
    if isinstance(names, str):
        names = [names]
    return list(names or []) or None


def load(recipe, path: str, dtype: str, *, policy=None, tokenizer=None):
    """The recipe's model from `path` with a fresh LoRA adapter, its tokenizer (`tokenizer` when given:
    the same files, already set up by the data), and what was done."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    attn = recipe.model.attn_implementation
    attn = "sdpa" if attn == "auto" else attn
    model = load_base(
        path,
        dtype,
        load_in_4bit=recipe.model.load_in_4bit,
        load_in_8bit=recipe.model.load_in_8bit,
        policy=policy,
        attn_implementation=attn,
        on_gpu=True,
        what="the model",
    )
    tokenizer = tokenizer if tokenizer is not None else tokenizer_from(path, policy=policy)
    fit_embeddings(model, tokenizer)  # a pad token the data added gets its row before LoRA is attached
    if recipe.model.load_in_4bit or recipe.model.load_in_8bit:
        # Casts norms to float32 and readies the inputs for checkpointing; checkpointing itself is
        # enabled by the Trainer, so not here.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    if recipe.model.load_in_4bit and not torch.cuda.is_available():
        _keep_cpu_4bit_trainable(model)
    info = {
        "quantization": "nf4+double-quant"
        if recipe.model.load_in_4bit
        else "int8"
        if recipe.model.load_in_8bit
        else None,
        "attn_implementation": attn,
    }
    if recipe.train.method == "full":
        # Every weight trains (the recipe refuses a quantised base here); the Trainer's gradient
        # checkpointing needs nothing more, since the embeddings' output requires grad already.
        model.requires_grad_(True)
        return float32_trainable(model, dtype), tokenizer, info
    check_target_modules(model, recipe.lora.target_modules)
    model = get_peft_model(model, lora_config(recipe))
    return float32_trainable(model, dtype), tokenizer, info


# ----------------------------------------------------------------------------------------------
# Loading a model: for training (above) and for using or exporting a trained one
# ----------------------------------------------------------------------------------------------


def load_base(
    path: str,
    dtype: str,
    *,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    policy=None,
    attn_implementation: str | None = None,
    on_gpu: bool | None = None,
    what: str = "the base model",
):
    """The causal LM in `path` in `dtype`, or in 4-bit NF4 (as `fastsft run` trains it) computing in
    `dtype`, in eval mode. Remote code and pickle weights only when `policy` (common.LoadPolicy)
    grants them. `on_gpu`: placed on the current CUDA device when there is one (default: only a 4-bit
    model, which cannot move after loading; a 16-bit one is moved, or merged on the CPU, by the caller)."""
    import torch
    from transformers import AutoModelForCausalLM

    policy = policy or LoadPolicy()
    policy.check_weights(path, what)
    tdtype = torch_dtype(dtype)
    kwargs = dict(dtype=tdtype, **policy.from_pretrained_kwargs())
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        kwargs["quantization_config"] = nf4_config(tdtype)
    elif load_in_8bit:  # bitsandbytes' LLM.int8 (LoRA on an 8-bit base)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if ((load_in_4bit or load_in_8bit) if on_gpu is None else on_gpu) and torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError as e:
        raise policy.refused_pickle(e, path, what) from None
    except (OSError, ValueError) as e:
        raise BackendError(f"cannot load {what} {path!r}: {e}") from None
    model.eval()
    return model


def attach_adapter(base, adapter_dir, *, policy=None):
    """The trained LoRA adapter in `adapter_dir` on `base` (not trainable, eval mode)."""
    from peft import PeftModel

    policy = policy or LoadPolicy()
    policy.check_weights(adapter_dir, "the adapter")
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except pickle.UnpicklingError as e:
        raise policy.refused_pickle(e, adapter_dir, "the adapter") from None
    model.eval()
    return model


def load_trained(
    base_path: str,
    adapter_dir,
    dtype: str,
    *,
    tokenizer,
    load_in_4bit: bool = False,
    upcast: bool = False,
    policy=None,
):
    """Base model + trained adapter, as the run trained it: the base in `dtype` (or 4-bit NF4), its
    embeddings grown to `tokenizer` (the run's, which may hold a pad token training added), the adapter
    attached. `upcast`: the base's weights rounded to `dtype`, then computed in fp32 (what a merged
    export in `dtype` computes when reloaded in fp32). The one way fastsft loads a trained adapter
    (generate, chat, eval, serve, export)."""
    base = load_base(base_path, dtype, load_in_4bit=load_in_4bit, policy=policy)
    if upcast:
        base = base.float()
    fit_embeddings(base, tokenizer)
    return attach_adapter(base, adapter_dir, policy=policy)


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
