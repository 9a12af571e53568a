"""The recipe's sections and their keys: one frozen dataclass per section (`[model]`, `[lora]`, `[data]`,
`[train]`, `[loss]`, `[distributed]`, `[export]`), one field per key, read top to bottom like TRL's
`SFTConfig`. Each key has its type in the annotation and, from `key()` (`keys.py`), its default, one line of
help, its allowed values and bounds. Keys take the names TRL / transformers / PEFT users already know.

Adding a key is one field in one section class, e.g. in `TrainSection`:

    neftune_noise_alpha: float | None = key(None, "NEFTune noise on the embeddings.", min=0, sft=True)

The annotation gives the type: `str`, `int`, `float`, `bool`, `str | list[str]`, `list[str]`,
`dict[str, str]`, `list[dict]` (`[[section.key]]` tables); `| None` lets it be unset. `key()` gives the
default (`REQUIRED` for none), the help and, optionally, `choices`, `min` / `max` (`min_exclusive`),
`path=True` (resolved from the recipe's folder), `resume_safe=True` (a resumed run may change it) and, in
`[train]`, `sft=True` (passed to SFTConfig under the same name; `sft="name"` for another; give it a test
value in tests/run/test_sft_args.py's NON_DEFAULT) or `sft=False` (fastsft's own key, or set in `sft_args.py`).
Validation (`loading.py`), `fastsft schema` (`schema_json.py`), `--set`, `to_toml` and the resume check
follow from it. A rule between keys goes in `rules.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .keys import REQUIRED, Section, key


@dataclass(frozen=True, kw_only=True)
class ModelSection(Section):
    """[model]: the base model and how it is loaded."""

    name: str = key(
        REQUIRED,
        "Hub id or local path of the base model (a folder or a .gguf file), `package:PKG/FILE.gguf` (a GGUF "
        "an installed Python package ships), or `builtin:tiny-mistral`.",
        path=True,
    )
    backend: str = key(
        "auto",
        "unsloth (CUDA only), transformers (anywhere), or auto: unsloth when a CUDA GPU and unsloth are there.",
        choices=("auto", "unsloth", "transformers"),
    )
    load_in_4bit: bool = key(
        True,
        "Load the base in 4-bit NF4 with double quantisation (QLoRA). Default true for LoRA; false when "
        '[train] method = "full" (4-bit weights cannot be trained) or load_in_8bit = true.',
    )
    load_in_8bit: bool = key(
        False,
        "Load the base in 8-bit (bitsandbytes LLM.int8) for LoRA: about twice the memory of 4-bit, closer to "
        '16-bit quality. Exclusive with load_in_4bit; not with [train] method = "full".',
    )
    dtype: str = key(
        "auto",
        "Compute dtype: auto = bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU.",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    attn_implementation: str = key(
        "auto",
        "Attention kernel for the transformers backend (auto = sdpa).",
        choices=("auto", "sdpa", "eager", "flash_attention_2"),
    )
    trust_remote_code: bool = key(
        False,
        "The model needs its repository's own Python code. Granted only by --trust-remote-code on the command line.",
    )
    allow_pickle: bool = key(
        False,
        "The model's weights are pickle (.bin) files. Read only with --allow-pickle on the command line; "
        "by default only safetensors are read.",
    )


@dataclass(frozen=True, kw_only=True)
class LoraSection(Section):
    """[lora]: the adapter (PEFT's LoraConfig names)."""

    r: int = key(16, "LoRA rank.", min=1, max=4096)
    lora_alpha: float = key(
        16.0, "LoRA scaling numerator (scale = lora_alpha / r).", min=0, min_exclusive=True
    )
    lora_dropout: float = key(0.0, "Dropout on the LoRA input.", min=0, max=1)
    bias: str = key("none", "Which biases train.", choices=("none", "all", "lora_only"))
    target_modules: str | list[str] = key(
        "all-linear", 'Modules that get adapters: "all-linear" or a list such as ["q_proj", "v_proj"].'
    )
    use_rslora: bool = key(False, "Rank-stabilised LoRA scaling (lora_alpha / sqrt(r)).")
    use_dora: bool = key(
        False,
        "DoRA: weight-decomposed LoRA (a trained magnitude vector per adapted layer); slower than LoRA.",
    )
    modules_to_save: str | list[str] | None = key(
        None,
        'Modules trained whole (beside the adapter) and saved with it, e.g. ["embed_tokens", "lm_head"] to '
        "teach new tokens. Unset: none trained; when the data adds a pad token the resized embeddings and "
        "lm_head are still saved with the adapter (the pad row is never trained), and loading it back "
        "resizes the base to the tokenizer.",
    )


# `[data] format` (and a `[[data.sources]]` table's `format`): the data shapes fastsft.data reads
DATA_FORMATS = ("auto", "text", "messages", "prompt_completion", "conversations", "sharegpt", "alpaca")


@dataclass(frozen=True, kw_only=True)
class DataSection(Section):
    """[data]: where the examples come from and how they become tokens."""

    train: str | None = key(
        None,
        "Training data: .jsonl/.json/.parquet/.csv file, a save_to_disk folder, or a hub data set name. "
        "Relative paths are resolved from the recipe's folder. Required unless [[data.sources]] mixes several.",
        path=True,
    )
    sources: list[dict] = key(
        [],
        "Several training data sets mixed by ratio, instead of `train`: [[data.sources]] tables with `path`, "
        "optional `format` / `columns`, and `weight` (relative) or `share` (a fraction of the mix). Mixing "
        "~20% general chat data into a narrow task is the usual cure for forgetting.",
    )
    stopping_strategy: str = key(
        "first_exhausted",
        "Size of a [[data.sources]] mix (datasets' names): first_exhausted = as large as the shares allow "
        "without repeating a row; all_exhausted = every row at least once, smaller shares repeated.",
        choices=("first_exhausted", "all_exhausted"),
    )
    retain: str | None = key(
        None,
        "General data scored (held-out loss) before and after training: forgetting as a number in run.json "
        "and the report. Same kinds as `train`; never trained on.",
        path=True,
    )
    eval: str | None = key(None, "Evaluation data, same kinds as `train`.", path=True)
    split: str = key("train", "Split to read from a hub data set or a DatasetDict folder.")
    subset: str | None = key(None, "Configuration name of a hub data set.")
    format: str = key(
        "auto",
        "Data shape; auto detects it from the columns.",
        choices=DATA_FORMATS,
    )
    columns: dict[str, str] = key(
        {}, 'Rename columns to the names the format expects, e.g. { messages = "dialog" }.'
    )
    chat_template: str | None = key(
        None,
        "Override the tokenizer's chat template: chatml, llama3, mistral, qwen2.5, gemma, or a .jinja path.",
        path=True,
    )
    # At most 2**24 = 16,777,216 tokens: past the longest context of any model (10M), and a step that long
    # would need terabytes; larger values overflowed torch's size arithmetic (a traceback, #37).
    max_length: int = key(
        1024,
        "Longest tokenized example; longer ones are truncated (and counted). At most 2**24, past any model's context.",
        min=8,
        max=2**24,
    )
    packing: bool = key(False, "Pack several examples into each sequence (TRL's packing).")
    packing_strategy: str = key("bfd", "TRL packing strategy.", choices=("bfd", "wrapped"))
    assistant_only_loss: bool | None = key(
        None, "Loss only on assistant turns (default: true for conversations)."
    )
    completion_only_loss: bool | None = key(
        None, "Loss only on the completion (default: true for prompt/completion data)."
    )
    val_ratio: float = key(
        0.0, "Share of `train` split off for evaluation when `eval` is not given.", min=0, max=0.5
    )
    on_invalid: str = key(
        "error",
        "What a bad row does: stop with an error, or be skipped and counted.",
        choices=("error", "skip"),
    )


# `[train] report_to`'s trackers (besides "none"); fastsft.run.trackers knows what each needs installed
TRACKER_NAMES = ("tensorboard", "wandb", "mlflow", "trackio")


@dataclass(frozen=True, kw_only=True)
class TrainSection(Section):
    """[train]: the optimisation. `sft` marks the keys `sft_args.sft_config` passes to SFTConfig as they are."""

    method: str = key(
        "lora",
        "lora: train the [lora] adapter on a frozen base (the run writes adapter/); full: train every "
        "weight of the model (no adapter; the run writes model/, a complete model plain transformers "
        "loads; needs 16/32-bit weights, so load_in_4bit / load_in_8bit = false, and a lower learning "
        "rate, ~1e-5 to 2e-5).",
        choices=("lora", "full"),
        sft=False,
    )

    learning_rate: float = key(2e-4, "Peak learning rate.", min=0, max=1, min_exclusive=True, sft=True)
    num_train_epochs: float = key(
        1.0,
        "Epochs over the training data (ignored when max_steps > 0).",
        min=0,
        max=1e4,
        min_exclusive=True,
        sft=True,
    )
    max_steps: int = key(
        -1, "Optimizer steps to run; -1 = use num_train_epochs.", min=-1, max=10**9, sft=True
    )
    per_device_train_batch_size: int = key(2, "Sequences per forward pass.", min=1, max=65536, sft=True)
    per_device_eval_batch_size: int | None = key(
        None,
        "Eval batch size (default: the train batch size).",
        min=1,
        max=65536,
        resume_safe=True,
        sft=False,
    )
    gradient_accumulation_steps: int = key(
        1, "Forward passes per optimizer step.", min=1, max=65536, sft=True
    )
    warmup_ratio: float = key(
        0.0, "Share of the steps spent warming the learning rate up.", min=0, max=1, sft=False
    )
    warmup_steps: int = key(
        0, "Warm-up steps (overrides warmup_ratio when > 0).", min=0, max=10**9, sft=False
    )
    lr_scheduler_type: str = key(
        "cosine",
        "Learning-rate decay after warm-up.",
        choices=("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr"),
        sft=True,
    )
    weight_decay: float = key(0.0, "AdamW weight decay.", min=0, max=1, sft=True)
    max_grad_norm: float = key(1.0, "Gradient clipping norm (0 disables).", min=0, max=1e6, sft=True)
    optim: str = key(
        "adamw_torch",
        "Optimizer (transformers' names). adamw_8bit / paged_adamw_8bit: bitsandbytes' 8-bit AdamW "
        "(moments in 8 bits: 2 bytes per weight instead of 8, what makes full fine-tuning fit); runs on "
        "CUDA and, more slowly, on the CPU.",
        choices=("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor"),
        sft=True,
    )
    gradient_checkpointing: bool = key(
        True, "Recompute activations in backward: less memory, ~30% slower.", sft=False
    )
    offload_checkpoints: bool = key(
        False,
        "Keep gradient checkpoints in host memory until backward (fastsft.levers.offload): long "
        "sequences fit; exact. Needs gradient_checkpointing.",
        sft=False,
    )
    tiled_mlp: int = key(
        0,
        "Run each MLP over this many sequence shards (ALST's TiledMLP, fastsft.levers.tiled_mlp); 0: off. "
        "Exact.",
        min=0,
        max=4096,
        sft=False,
    )
    tiled_layer: int = key(
        0,
        "Run each decoder layer's per-token work (norms, q/k/v/o projections with their adapters, "
        "residuals, MLP) over this many sequence tiles, only attention over the whole sequence "
        "(fastsft.levers.tiled_layer; attention per key/value head group, the final norm tiled too); 0: off. "
        'Exact. Llama, Mistral, Qwen2, Qwen3 layers. fit = "auto" sets it (2 to 16) when the levers before it '
        "do not fit.",
        min=0,
        max=4096,
        sft=False,
    )
    expandable_segments: bool = key(
        True,
        "The CUDA caching allocator's expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, "
        "as Unsloth sets it): far less fragmentation at long sequences; numerics unchanged, no time. On by "
        "default.",
        sft=False,
    )
    frozen_16bit: bool = key(
        True,
        "Store the frozen float32 embeddings and lm_head of a 4-bit / 8-bit model (PEFT's kbit preparation "
        "upcasts their 16-bit values) back in the 16-bit compute dtype (fastsft.levers.frozen16); exact "
        "under bf16 / fp16 mixed precision, no time. On by default; nothing changes for other models.",
        sft=False,
    )
    fit: str = key(
        "auto",
        "On a CUDA GPU, before the weights load, `fastsft plan` simulates one step for the GPU's free memory. "
        '"auto": when it would not fit, turn on the exact memory levers in order of cost (expandable_segments '
        "and frozen_16bit, then offload_checkpoints, then tiled_mlp shards, then tiled_layer tiles, then a smaller "
        "per_device_train_batch_size with more gradient_accumulation_steps: the same effective batch), print "
        "each change and record it in run.json; stop before loading when nothing fits, naming the longest "
        'data.max_length that does. "warn": only warn, naming the levers. "off": plan nothing.',
        choices=("auto", "warn", "off"),
        sft=False,
    )
    logging_steps: int = key(1, "Log every N optimizer steps.", min=1, max=10**9, resume_safe=True, sft=True)
    eval_strategy: str = key("no", "When to evaluate.", choices=("no", "steps", "epoch"), sft=True)
    eval_steps: int | None = key(
        None, "Evaluate every N steps (eval_strategy = steps).", min=1, max=10**9, resume_safe=True, sft=True
    )
    save_strategy: str = key(
        "steps", "When to write checkpoints.", choices=("no", "steps", "epoch"), sft=True
    )
    save_steps: int = key(
        500, "Checkpoint every N steps (save_strategy = steps).", min=1, max=10**9, resume_safe=True, sft=True
    )
    save_total_limit: int | None = key(
        2, "Checkpoints kept (older ones are deleted).", min=1, max=10**6, resume_safe=True, sft=True
    )
    load_best_model_at_end: bool = key(
        False, "Keep the checkpoint with the best metric_for_best_model at the end.", sft=True
    )
    metric_for_best_model: str = key("eval_loss", "Metric that picks the best checkpoint.", sft=True)
    seed: int = key(42, "Seed for weights init, data order and dropout.", min=0, max=2**32 - 1, sft=True)
    max_nonfinite_steps: int = key(
        0,
        "Optimizer steps with a NaN/inf loss or gradient that are skipped (not applied) before the run "
        "stops; 0 stops at the first.",
        min=0,
        max=10**6,
        resume_safe=True,
        sft=False,
    )
    early_stopping_patience: int | None = key(
        None,
        "Stop when the eval metric (metric_for_best_model) has not improved for this many evaluations "
        "(transformers' EarlyStoppingCallback; needs load_best_model_at_end = true).",
        min=1,
        max=10**6,
        sft=False,
    )
    early_stopping_threshold: float = key(
        0.0,
        "How much the eval metric must improve to count as an improvement (early stopping).",
        min=0,
        sft=False,
    )
    report_to: str | list[str] = key(
        "none",
        'Experiment trackers: "none", or any of "tensorboard" (event files in the run directory\'s '
        'tensorboard/, offline), "wandb", "mlflow", "trackio" (each configured by its own environment).',
        resume_safe=True,
        sft=False,
    )


@dataclass(frozen=True, kw_only=True)
class LossSection(Section):
    """[loss]: which cross-entropy computes the loss."""

    kernel: str = key(
        "auto",
        "fastsft-linear (hidden states -> loss, never builds the logits), fastsft (logits -> our fused CE), "
        "torch (stock), unsloth (Unsloth's own fused loss), auto = fastsft-linear where supported.",
        choices=("auto", "fastsft-linear", "fastsft", "torch", "unsloth"),
    )
    label_smoothing: float = key(0.0, "Label smoothing epsilon.", min=0, max=1)


@dataclass(frozen=True, kw_only=True)
class DistributedSection(Section):
    """[distributed]: several processes on this machine."""

    num_processes: int = key(
        1,
        "Data-parallel processes on this machine (GPUs, or CPU processes over gloo; on each host with "
        "`fastsft run --nnodes`); > 1 makes `fastsft run` launch itself through torchrun (same as --launch N).",
        min=1,
        max=1024,
    )
    strategy: str = key(
        "ddp",
        "How several processes share the work: ddp (a full copy each), fsdp (FSDP2: parameters, "
        "gradients and optimizer state sharded), deepspeed-zero3 (needs `pip install deepspeed`).",
        choices=("ddp", "fsdp", "deepspeed-zero3"),
    )
    deepspeed_config: str | None = key(
        None,
        "A DeepSpeed JSON config to use instead of fastsft's ZeRO-3 one (strategy = deepspeed-zero3).",
        path=True,
    )
    timeout: int = key(
        600,
        "Seconds a rank waits for the others in a collective (a gradient all-reduce, a barrier) before the "
        "run stops and names the stuck rank (torch's own default: 30 minutes). The longest wait is for "
        "what rank 0 does alone (answers before training, a checkpoint's files): raise it for a slow one.",
        min=10,
        max=86400,
    )


EXPORT_FORMATS = ("adapter", "merged", "gguf")
GGUF_K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")  # llama.cpp's K-quants, by its own quantizer (llama-cpp-python)
GGUF_QUANTS = ("q8_0", "q4_0", *GGUF_K_QUANTS)  # GGUF only; q8_0 and q4_0 fastsft writes itself (gguf.quants)
EXPORT_DTYPES = (
    "bf16",
    "fp16",
    "fp32",
    *GGUF_QUANTS,
)  # of merged and GGUF exports; export/ and the CLI use these


@dataclass(frozen=True, kw_only=True)
class ExportSection(Section):
    """[export]: what is written after training."""

    formats: list[str] = key(
        [],
        'Exports written after training: any of "adapter", "merged", "gguf".',
        choices=EXPORT_FORMATS,
        resume_safe=True,
    )
    dtype: str = key(
        "bf16",
        "dtype of merged / GGUF exports; q8_0 and q4_0 (llama.cpp's 8- and 4-bit types) for GGUF only, and "
        "q4_k_m, q5_k_m, q6_k (llama.cpp's K-quants; needs llama-cpp-python) for GGUF only.",
        choices=EXPORT_DTYPES,
        resume_safe=True,
    )
