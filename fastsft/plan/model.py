"""The model a recipe trains, built on `meta` from its config: no weights read.

The same steps as `backends.transformers.load` (and in its order): the causal LM in the compute dtype,
the linear layers quantised to bitsandbytes' NF4 (double quantisation, storage in the compute dtype) with
their quantisation state on `meta` (shapes of `bitsandbytes.functional.quantize_4bit`'s output),
`prepare_model_for_kbit_training` (which casts the embeddings, lm_head and norms to float32), then
PEFT's `get_peft_model` with the recipe's `LoraConfig`. Attention is FA2's memory (`plan.attention`).
"""

from __future__ import annotations

import torch

from fastsft.backends import builtin, gguf
from fastsft.errors import BackendError

from .attention import register

# Configs of models the benchmarks plan for, so that no download is needed (config.json of
# meta-llama/Llama-3.1-8B-Instruct; the instruct and base models share it).
KNOWN_CONFIGS = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        rope_scaling={
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    ),
}
# The shipped recipes' other hub models (their public config.json), so that `fastsft plan` runs on
# each shipped recipe offline.
KNOWN_CONFIGS["mistralai/Mistral-7B-v0.3"] = dict(
    model_type="mistral",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=32768,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=1000000.0,
    sliding_window=None,
    tie_word_embeddings=False,
    hidden_act="silu",
)
KNOWN_CONFIGS["Qwen/Qwen2.5-0.5B-Instruct"] = dict(
    model_type="qwen2",
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
)
KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"] = KNOWN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"]
KNOWN_CONFIGS["unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"] = KNOWN_CONFIGS[
    "meta-llama/Llama-3.1-8B-Instruct"
]


def load_config(name: str, *, trust_remote_code: bool = False, base_dir=None):
    """The model's `PretrainedConfig`, named as a recipe names it, without reading a weight: a known one, a
    built-in model's, a GGUF file's metadata (`package:PKG/FILE.gguf` or a path), config.json of a local
    folder (relative to `base_dir`, the recipe's folder) or of the hub cache."""
    from pathlib import Path

    from transformers import AutoConfig

    if name in KNOWN_CONFIGS:
        d = dict(KNOWN_CONFIGS[name])
        return AutoConfig.for_model(d.pop("model_type"), **d)
    if builtin.is_builtin(name):
        return AutoConfig.from_pretrained(builtin.materialize(name))  # a tiny model, made in a second
    if gguf.is_gguf(name):
        file = gguf.resolve_file(name, base_dir)
        return AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)  # the file's metadata
    local = Path(base_dir or ".") / Path(name).expanduser()
    if local.is_dir():
        return AutoConfig.from_pretrained(str(local), trust_remote_code=trust_remote_code)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise BackendError(
            f"[model] name = {name!r}: its config.json is neither a local folder nor in the hub cache, and "
            f"the hub cannot be read here ({str(e).splitlines()[0]}). fastsft plan needs only the config: "
            f"download it where there is a network (huggingface-cli download {name} config.json), or point "
            "[model] name at a local folder."
        ) from None


def linear4bit_meta(linear: torch.nn.Linear, compute_dtype: torch.dtype, device="meta"):
    """A bitsandbytes `Linear4bit` holding the storage NF4 + double quantisation gives `linear`'s weight,
    on `device` (meta): packed weight (out x in / 2 bytes, in `compute_dtype` storage as transformers'
    `bnb_4bit_quant_storage`), absmax uint8 per 64 weights, its float32 absmax per 256 blocks and code,
    the offset. bitsandbytes' `matmul_4bit` runs forward and backward over it on meta."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    out_f, in_f = linear.out_features, linear.in_features
    n = out_f * in_f
    n_blocks = -(-n // 64)

    def m(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device=device)

    state2 = QuantState(
        absmax=m(-(-n_blocks // 256), dtype=torch.float32),
        code=m(256, dtype=torch.float32),
        blocksize=256,
        quant_type=None,
        dtype=torch.float32,
    )
    qs = QuantState(
        absmax=m(n_blocks, dtype=torch.uint8),
        shape=torch.Size([out_f, in_f]),
        code=m(16, dtype=torch.float32),
        blocksize=64,
        quant_type="nf4",
        dtype=compute_dtype,
        offset=m((), dtype=torch.float32),
        state2=state2,
    )
    layer = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        quant_type="nf4",
        quant_storage=compute_dtype,
        device=device,
    )
    packed = m(-(-n // 2) // compute_dtype.itemsize, 1, dtype=compute_dtype)
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=qs,
        blocksize=64,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=compute_dtype,
        module=layer,
        bnb_quantized=True,
    )
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(m(out_f, dtype=compute_dtype), requires_grad=False)
    return layer


def quantize_meta(model, compute_dtype: torch.dtype, skip=("lm_head",)) -> None:
    """Every nn.Linear but the `skip` ones (transformers keeps the lm_head in 16 bits) -> `linear4bit_meta`."""
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child_name not in skip:
                setattr(module, child_name, linear4bit_meta(child, compute_dtype))
    model.is_loaded_in_4bit = True


def build(
    config,
    *,
    dtype: torch.dtype,
    load_in_4bit: bool,
    lora=None,
    full: bool = False,
    num_layers: int | None = None,
    attn: str | None = None,
    device="meta",
):
    """The causal LM of `config` on `device` (meta unless a test builds a real one), `num_layers` of its
    decoder layers (all by default), as the transformers backend readies it for training: 4-bit, kbit
    preparation, LoRA from `lora` (a peft LoraConfig) unless `full`."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    config.use_cache = False
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn or register())
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        quantize_meta(model, dtype)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    if full:
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    with torch.device(device):  # the adapters made where the model is (no CPU init of meta weights)
        return get_peft_model(model, copy.deepcopy(lora))  # (PEFT resolves the config in place)
