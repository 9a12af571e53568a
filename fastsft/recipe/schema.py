"""The recipe: one TOML file -> a validated, typed `Recipe`.

The schema lives here and only here: each section is a frozen dataclass (`ModelSection`, `TrainSection`,
...) and each key is one field of it, with its type in the annotation and its help, allowed values and
bounds in the field's metadata (TRL's `SFTConfig` documents its fields the same way). The same text
serves `fastsft schema`, the validator's messages and the docs. Keys take the names TRL / transformers /
PEFT users already know.

Validation is strict and collects every problem before raising one `RecipeError`:
an unknown key is named with the closest valid one, a wrong type or an out-of-range value names the
key, the value and what is allowed.

Adding a key is one field in one section class, e.g. in `TrainSection`:

    neftune_noise_alpha: float | None = key(None, "NEFTune noise on the embeddings.", min=0, sft=True)

The annotation gives the type: `str`, `int`, `float`, `bool`, `str | list[str]`, `list[str]`,
`dict[str, str]`, `list[dict]` (`[[section.key]]` tables); `| None` lets it be unset. `key()` gives the
default (`REQUIRED` for none), the help and, optionally, `choices`, `min` / `max` (`min_exclusive`),
`path=True` (resolved from the recipe's folder), `resume_safe=True` (a resumed run may change it) and, in
`[train]`, `sft=True` (passed to SFTConfig under the same name; `sft="name"` for another; give it a test
value in tests/run/test_sft_args.py's NON_DEFAULT) or `sft=False` (fastsft's own key, or set in `sft_args.py`). Validation, `fastsft schema`, `--set`, `to_toml`
and the resume check follow from it. A rule between keys goes in `_cross_checks`.
"""

from __future__ import annotations

import copy
import difflib
import math
import sys
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from fastsft.errors import RecipeError
from fastsft.run import trackers

# ----------------------------------------------------------------------------------------------
# How a key is declared
# ----------------------------------------------------------------------------------------------

REQUIRED: Any = MISSING  # the default of a key the recipe must give


def key(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    path: bool = False,
    resume_safe: bool = False,
    sft: bool | str | None = None,
) -> Any:
    """One recipe key: a dataclass field whose metadata holds its help, bounds and choices.

    `choices` are the allowed values (for a `list[str]` key: of each item). `path`: a file path,
    resolved from the recipe's folder. `resume_safe`: a resumed run may change it (it changes how the
    run is watched and kept, not what is trained). `sft` (only in [train]): True when the key is the
    SFTConfig/TrainingArguments argument of the same name, a string for another name, False when it is
    not passed through 1:1.
    """
    metadata = {
        "help": help,
        "choices": choices,
        "min": min,
        "max": max,
        "min_exclusive": min_exclusive,
        "path": path,
        "resume_safe": resume_safe,
        "sft": sft,
    }
    if isinstance(default, (list, dict)):  # a fresh copy for each recipe
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Key:
    """What the validator, `fastsft schema` and the docs need of one key, read from its field.

    `type` is one of "str", "int", "float", "bool", "str_list" (a string or a list of strings, kept as
    written), "list" (a list of strings; one string is a list of one), "table" (a TOML inline table of
    strings to strings), "table_list" (an array of tables, `[[section.key]]` blocks; what each table
    holds is left to the cross-checks).
    """

    name: str
    type: str
    default: Any  # REQUIRED when the key has none
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    nullable: bool = False  # may be left out to mean "unset" (annotated `X | None`, default None)
    required: bool = False
    path: bool = False
    resume_safe: bool = False
    sft: str | None = None  # the SFTConfig argument it maps to 1:1

    @classmethod
    def of(cls, f: Field, hint: Any) -> Key:
        kind, nullable = _kind(hint, f.name)
        m = f.metadata
        if "help" not in m:
            raise TypeError(f"recipe key {f.name!r} is not declared with key()")
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        return cls(
            name=f.name,
            type=kind,
            default=default,
            help=m["help"],
            choices=m["choices"],
            min=m["min"],
            max=m["max"],
            min_exclusive=m["min_exclusive"],
            nullable=nullable,
            required=default is REQUIRED,
            path=m["path"],
            resume_safe=m["resume_safe"],
            sft=f.name if m["sft"] is True else (m["sft"] or None),
        )


_KINDS = (  # annotation (without `| None`) -> how the validator reads the value
    ({str}, "str"),
    ({int}, "int"),
    ({float}, "float"),
    ({bool}, "bool"),
    ({str, list[str]}, "str_list"),
    ({list[str]}, "list"),
    ({dict[str, str]}, "table"),
    ({list[dict]}, "table_list"),
)


def _kind(hint: Any, name: str) -> tuple[str, bool]:
    """(kind, nullable) of an annotation: `int | None` -> ("int", True)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = set(typing.get_args(hint)) if union else {hint}
    nullable = type(None) in args
    args.discard(type(None))
    for match, kind in _KINDS:
        if args == match:
            return kind, nullable
    raise TypeError(f"recipe key {name!r}: unsupported type {hint!r}")


# ----------------------------------------------------------------------------------------------
# The sections
# ----------------------------------------------------------------------------------------------


class Section:
    """Base of the sections: frozen dataclasses whose fields are the section's keys
    (`recipe.train.learning_rate`). A recipe is changed through `Recipe.with_overrides`."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}


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
        choices=("auto", "text", "messages", "prompt_completion", "conversations", "sharegpt", "alpaca"),
    )
    columns: dict[str, str] = key(
        {}, 'Rename columns to the names the format expects, e.g. { messages = "dialog" }.'
    )
    chat_template: str | None = key(
        None,
        "Override the tokenizer's chat template: chatml, llama3, mistral, qwen2.5, gemma, or a .jinja path.",
        path=True,
    )
    max_length: int = key(1024, "Longest tokenized example; longer ones are truncated (and counted).", min=8)
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
        "and frozen_16bit, then offload_checkpoints, then tiled_mlp shards, then a smaller "
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


# ----------------------------------------------------------------------------------------------
# The typed recipe
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. `path` is the file it came from (None for one built in code); relative
    data paths are resolved against its folder. Its sections are the fields typed as a `Section`."""

    model: ModelSection
    lora: LoraSection
    data: DataSection
    train: TrainSection
    loss: LossSection
    distributed: DistributedSection
    export: ExportSection
    path: Path | None = None
    raw: dict = field(default_factory=dict, repr=False)  # what the user wrote, overrides applied

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    def resolve_path(self, value: str) -> Path:
        """A path from the recipe, resolved from the recipe's folder (not the current directory)."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Every key of every section, defaults filled in."""
        return {name: getattr(self, name).as_dict() for name in SECTIONS}

    def to_toml(self) -> str:
        """The resolved recipe as TOML (every key, defaults included); unset keys are left out. Written
        by tomli_w, so any string (quotes, control characters, backslashes) reads back as it was."""
        import tomli_w

        doc = {
            section: {k: v for k, v in values.items() if v is not None}
            for section, values in self.as_dict().items()
        }
        return tomli_w.dumps(doc)

    def with_absolute_paths(self) -> Recipe:
        """The same recipe with its relative file paths made absolute, so that a copy stored elsewhere
        (a run directory's recipe.toml) still finds its data, templates and local model."""
        raw = copy.deepcopy(self.raw)
        for section, key in PATH_KEYS:
            value = raw.get(section, {}).get(key)
            if not isinstance(value, str) or value.startswith("builtin:"):
                continue
            p = self.resolve_path(value)
            if not Path(value).expanduser().is_absolute() and p.exists():
                raw[section][key] = str(p.resolve())
        for source in raw.get("data", {}).get("sources") or []:
            value = source.get("path") if isinstance(source, dict) else None
            if (
                isinstance(value, str)
                and not Path(value).expanduser().is_absolute()
                and self.resolve_path(value).exists()
            ):
                source["path"] = str(self.resolve_path(value).resolve())
        return validate(raw, path=self.path)

    def differences(self, other: Recipe) -> list[str]:
        """`section.key` of every value that differs between the two recipes."""
        a, b = self.as_dict(), other.as_dict()
        return [f"{s}.{k}" for s in a for k in a[s] if a[s][k] != b[s].get(k)]

    def with_overrides(self, overrides: list[str]) -> Recipe:
        raw = copy.deepcopy(self.raw)
        apply_overrides(raw, overrides)
        return validate(raw, path=self.path)


def _sections() -> dict[str, type[Section]]:
    hints = typing.get_type_hints(Recipe)
    return {
        f.name: hints[f.name]
        for f in fields(Recipe)
        if isinstance(hints[f.name], type) and issubclass(hints[f.name], Section)
    }


# Section name -> its dataclass, and section name -> key name -> `Key`, both read from the classes above.
SECTIONS: dict[str, type[Section]] = _sections()
SCHEMA: dict[str, dict[str, Key]] = {
    name: {f.name: Key.of(f, hint) for f in fields(cls) for hint in [typing.get_type_hints(cls)[f.name]]}
    for name, cls in SECTIONS.items()
}

# Keys holding file paths, resolved relative to the recipe's folder.
PATH_KEYS = tuple((s, k) for s, keys in SCHEMA.items() for k, spec in keys.items() if spec.path)

# Keys a resumed run may change: they do not change what is trained, only how it is watched and kept.
RESUME_SAFE_KEYS = frozenset(
    f"{s}.{k}" for s, keys in SCHEMA.items() for k, spec in keys.items() if spec.resume_safe
)


# ----------------------------------------------------------------------------------------------
# Reading and validating
# ----------------------------------------------------------------------------------------------


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Raises `RecipeError` with every problem found."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except OSError as e:
        raise RecipeError(f"cannot read the recipe: {e.strerror}", path=str(path)) from None
    raw = parse(data, path=str(path))
    if overrides:
        apply_overrides(raw, overrides, path=str(path))
    return validate(raw, path=path)


def parse(data: bytes | str, *, path: str | None = None) -> dict:
    """TOML text -> dict, with a message that names the line on a syntax error."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is dropped
        except UnicodeDecodeError as e:
            raise RecipeError(
                f"not a text file: byte {e.start} is not UTF-8. A recipe is a TOML text file.", path=path
            ) from None
    data = data.removeprefix("\ufeff")
    if not data.strip():
        raise RecipeError(
            "the recipe is empty. Start from recipes/tiny.toml; [model] name and [data] train are required.",
            path=path,
        )
    try:
        return tomllib.loads(data)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(
            f"invalid TOML: {e}. Check the quoting and brackets on that line.", path=path
        ) from None
    except RecursionError:
        raise RecipeError("arrays or tables nested too deeply to be a recipe.", path=path) from None


def parse_override(item: str, *, path: str | None = None) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value). The value is read as a TOML value; a bare word
    that is not valid TOML (`cosine`) is taken as a string."""
    if "=" not in item:
        raise RecipeError(
            f"--set {item!r}: expected section.key=value, e.g. train.learning_rate=1e-4", path=path
        )
    lhs, rhs = item.split("=", 1)
    lhs, rhs = lhs.strip(), rhs.strip()
    if lhs.count(".") != 1 or not all(lhs.split(".")):
        raise RecipeError(
            f"--set {item!r}: the name must be section.key, e.g. train.learning_rate", path=path
        )
    section, key = lhs.split(".")
    if not rhs:
        raise RecipeError(
            f"--set {lhs}=: no value after `=`. Give one, e.g. --set train.learning_rate=1e-4, or leave the "
            "--set out to keep the recipe's value",
            path=path,
        )
    try:
        parsed = tomllib.loads(f"v = {rhs}")
    except tomllib.TOMLDecodeError:
        parsed = {"v": rhs}  # a bare word (cosine) is a string
    except RecursionError:
        raise RecipeError(f"--set {lhs}=...: the value is nested too deeply", path=path) from None
    if len(parsed) > 1 or ("\n" in rhs and isinstance(parsed["v"], str) and parsed["v"] == rhs):
        raise RecipeError(
            f"--set {item!r}: the value is not a single TOML value (it goes on past the value, over a new line "
            "or with more keys or tables, which would be dropped). Give one value per --set, quoting a string "
            'that has spaces or newlines: --set model.name="org/model"',
            path=path,
        )
    return section, key, parsed["v"]


def apply_overrides(raw: dict, overrides: list[str], *, path: str | None = None) -> None:
    for item in overrides:
        section, key, value = parse_override(item, path=path)
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise RecipeError(f"--set {item!r}: [{section}] is not a table in the recipe", path=path)
        target[key] = value


# Keys users bring from Axolotl and LLaMA-Factory configs -> (section, fastsft key).
FOREIGN_KEYS = {
    "base_model": ("model", "name"),
    "model_name_or_path": ("model", "name"),
    "load_in_4bit": ("model", "load_in_4bit"),
    "lora_r": ("lora", "r"),
    "lora_rank": ("lora", "r"),
    "lora_target": ("lora", "target_modules"),
    "lora_target_modules": ("lora", "target_modules"),
    "lora_alpha": ("lora", "lora_alpha"),
    "lora_dropout": ("lora", "lora_dropout"),
    "sequence_len": ("data", "max_length"),
    "cutoff_len": ("data", "max_length"),
    "max_seq_length": ("data", "max_length"),
    "sample_packing": ("data", "packing"),
    "val_set_size": ("data", "val_ratio"),
    "datasets": ("data", "train"),
    "dataset": ("data", "train"),
    "template": ("data", "chat_template"),
    "micro_batch_size": ("train", "per_device_train_batch_size"),
    "batch_size": ("train", "per_device_train_batch_size"),
    "lr": ("train", "learning_rate"),
    "learning_rate": ("train", "learning_rate"),
    "num_epochs": ("train", "num_train_epochs"),
    "num_train_epochs": ("train", "num_train_epochs"),
    "gradient_accumulation_steps": ("train", "gradient_accumulation_steps"),
    "lr_scheduler": ("train", "lr_scheduler_type"),
    "warmup_steps": ("train", "warmup_steps"),
    "optimizer": ("train", "optim"),
    "finetuning_type": ("train", "method"),
    "adapter": ("train", "method"),
    "load_in_8bit": ("model", "load_in_8bit"),
    "lora_modules_to_save": ("lora", "modules_to_save"),
    "additional_target": ("lora", "modules_to_save"),
    "peft_use_dora": ("lora", "use_dora"),
}


def _suggest(word: str, options, section: str | None = None) -> str:
    if word in FOREIGN_KEYS:
        s, k = FOREIGN_KEYS[word]
        if s != section or k in options:
            return f"; fastsft calls it `{k}` in [{s}]"
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "None" if value is None else type(value).__name__


def _check_type(where: str, kind: str, value: Any, dotted: str) -> tuple[Any, str | None]:
    """(the value as the key's type, or a problem): ints become floats for a float key, an integral float
    an int for an int key, one string a list of one for a `list[str]` key."""
    if kind == "bool":
        if not isinstance(value, bool):
            return value, f"{where}: expected true or false, got {_type_name(value)}"
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                return int(value), None
            return value, f"{where}: expected an integer, got {_type_name(value)}"
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{where}: expected a number, got {_type_name(value)}"
        value = float(value)
        if not math.isfinite(value):
            return value, f"{where}: must be a finite number"
    elif kind == "str":
        if not isinstance(value, str):
            return value, f'{where}: expected a string, got {_type_name(value)} (quote it: "...")'
    elif kind in ("str_list", "list"):
        if isinstance(value, str) and "," in value:
            items = ", ".join(f'"{v.strip()}"' for v in value.split(",") if v.strip())
            return value, f"{where}: {value!r} is one string; for several names write an array: [{items}]"
        if isinstance(value, str):
            return ([value] if kind == "list" else value), None
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value, f"{where}: expected a string or an array of strings"
    elif kind == "table":
        if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            return value, f'{where}: expected a table of strings, e.g. {{ messages = "dialog" }}'
    elif kind == "table_list":
        if not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            return value, f"{where}: expected an array of tables, e.g. [[{dotted}]] blocks"
    return value, None


def _check_allowed(section: str, spec: Key, where: str, value: Any) -> list[str]:
    """The key's metadata against a value of the right type: its choices, its min and max."""
    if spec.choices is not None:
        allowed = ", ".join(str(c) for c in spec.choices)
        if spec.type == "list":  # each item is one of the choices
            return [
                f"[{section}] {spec.name}: {item!r} is not one of {allowed}{_suggest(item, spec.choices)}"
                for item in value
                if item not in spec.choices
            ]
        if value not in spec.choices:
            hint = _suggest(value, spec.choices) if isinstance(value, str) else ""
            return [f"{where}: must be one of {allowed}{hint}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = spec.min, spec.max
        if lo is not None and (value < lo or (spec.min_exclusive and value <= lo)):
            op = ">" if spec.min_exclusive else ">="
            return [f"{where}: must be {op} {lo}" + (f" and <= {hi}" if hi is not None else "")]
        if hi is not None and value > hi:
            return [f"{where}: must be <= {hi}" + (f" and >= {lo}" if lo is not None else "")]
    return []


def _check_value(section: str, spec: Key, value: Any) -> tuple[Any, list[str]]:
    """(coerced value, problems) of one key's value; None (only from Python) unsets a nullable key."""
    if value is None and spec.nullable:
        return None, []
    where = f"[{section}] {spec.name} = {value!r}"
    value, problem = _check_type(where, spec.type, value, f"{section}.{spec.name}")
    if problem:
        return value, [problem]
    return value, _check_allowed(section, spec, where, value)


def _top_level_problems(raw: dict) -> list[str]:
    """Unknown sections, and keys written outside any section."""
    problems = []
    for name in raw:
        if name not in SCHEMA and not isinstance(raw[name], dict):  # a key outside any section
            home = next((s for s, keys in SCHEMA.items() if name in keys), None)
            hint = (
                f"; it belongs in [{home}]" if home else _suggest(name, [], section="")
            ) or " (every key belongs in a section: " + ", ".join(f"[{s}]" for s in SCHEMA) + ")"
            problems.append(f"`{name}`: a key outside any section{hint}")
        elif name not in SCHEMA:
            problems.append(
                f"[{name}]: unknown section{_suggest(name, SCHEMA)} (sections: {', '.join(SCHEMA)})"
            )
        elif not isinstance(raw[name], dict):
            problems.append(f"`{name}` must be a section ([{name}]), not {_type_name(raw[name])}")
    return problems


def _section_values(name: str, given: Any, problems: list[str]) -> dict[str, Any]:
    """Every key of section `name`: the given value checked, or its default. Problems are appended."""
    keys = SCHEMA[name]
    given = given if isinstance(given, dict) else {}
    for k in given:
        if k not in keys:
            problems.append(f"`{k}`: unknown key in [{name}]{_suggest(k, keys, section=name)}")
    values: dict[str, Any] = {}
    for k, spec in keys.items():
        if k in given:
            values[k], found = _check_value(name, spec, given[k])
            problems += found
        elif spec.required:
            problems.append(f"[{name}] {k} is required: {spec.help}")
            values[k] = None
        else:
            values[k] = copy.deepcopy(spec.default)
    return values


def validate(raw: dict, *, path: str | Path | None = None) -> Recipe:
    """dict (as read from TOML, overrides applied) -> `Recipe`. Collects every problem."""
    problems = _top_level_problems(raw)
    values = {name: _section_values(name, raw.get(name), problems) for name in SCHEMA}
    data = values["data"]
    if not data.get("train") and not data.get("sources"):
        problems.append(
            f"[data] train is required: {SCHEMA['data']['train'].help.split(' Required')[0]} "
            "(or mix several with [[data.sources]] tables)"
        )
    if not problems and "load_in_4bit" not in (raw.get("model") or {}):
        # the 4-bit default gives way to a full fine-tune (4-bit weights cannot train) and to 8-bit loading
        if values["train"]["method"] == "full" or values["model"]["load_in_8bit"]:
            values["model"]["load_in_4bit"] = False
    if not problems:
        recipe = Recipe(
            **{name: SECTIONS[name](**v) for name, v in values.items()},
            path=Path(path).resolve() if path is not None else None,
            raw=copy.deepcopy(raw),
        )
        problems += _cross_checks(recipe)
    if problems:
        raise RecipeError(problems, path=str(path) if path is not None else None)
    return recipe


SOURCE_KEYS = ("path", "format", "columns", "weight", "share")


def check_sources(data: dict, formats: tuple) -> list[str]:
    """Problems of `[[data.sources]]` (one line each, for the recipe's all-at-once error); `formats` are
    the values a source's `format` may take."""
    sources = data.get("sources") or []
    if not sources:
        return []
    problems = []
    if data.get("train"):
        problems.append(
            "[data] train and [[data.sources]] are both set: use `train` for one data set, or list every data "
            "set (the task's included) as a [[data.sources]] table"
        )
    shares = 0.0
    all_shared = True
    for i, src in enumerate(sources, start=1):
        where = f"[[data.sources]] #{i}"
        for key in src:
            if key not in SOURCE_KEYS:
                close = difflib.get_close_matches(key, SOURCE_KEYS, n=1, cutoff=0.6)
                hint = f"; did you mean `{close[0]}`?" if close else f" (keys: {', '.join(SOURCE_KEYS)})"
                problems.append(f"{where}: unknown key `{key}`{hint}")
        path = src.get("path")
        if not isinstance(path, str) or not path:
            problems.append(
                f'{where}: `path` is required (a data file, folder or hub name), e.g. path = "data/general.jsonl"'
            )
        fmt = src.get("format")
        if fmt is not None and fmt not in formats:
            problems.append(f"{where}: format = {fmt!r} must be one of {', '.join(formats)}")
        cols = src.get("columns")
        if cols is not None and not (
            isinstance(cols, dict) and all(isinstance(v, str) for v in cols.values())
        ):
            problems.append(f'{where}: columns must be a table of strings, e.g. {{ messages = "dialog" }}')
        if "weight" in src and "share" in src:
            problems.append(f"{where}: give `weight` or `share`, not both")
        for key, hi in (("weight", math.inf), ("share", 1.0)):
            if key not in src:
                continue
            v = src[key]
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or not 0 < v <= hi
            ):
                rng = "> 0" if hi == math.inf else "> 0 and <= 1"
                problems.append(f"{where}: {key} = {v!r} must be a number {rng}")
            elif key == "share":
                shares += float(v)
        all_shared = all_shared and "share" in src
    if shares > 1 + 1e-9:
        problems.append(f"[[data.sources]]: the shares add up to {shares:g}, more than 1")
    elif all_shared and not problems and abs(shares - 1) > 1e-6:
        problems.append(
            f"[[data.sources]]: the shares add up to {shares:g}; with a share on every source they must add up "
            "to 1 (or leave `share` off one source: it takes the rest)"
        )
    elif not all_shared and not problems and shares >= 1 - 1e-9:
        problems.append(
            "[[data.sources]]: the shares add up to 1, leaving nothing for the sources without a share"
        )
    return problems


def check_early_stopping(train: dict, data: dict) -> list[str]:
    """Recipe problems of `[train] early_stopping_patience` (transformers' EarlyStoppingCallback keeps the
    best checkpoint by `metric_for_best_model`, so it needs evaluations and load_best_model_at_end)."""
    if train.get("early_stopping_patience") is None:
        return []
    why = (
        "early stopping watches the eval metric (metric_for_best_model) at every evaluation and keeps the "
        "best checkpoint, so it needs"
    )
    problems = []
    if train["eval_strategy"] == "no":
        problems.append(
            f'[train] early_stopping_patience: {why} eval_strategy = "steps" (with eval_steps) or "epoch"'
        )
    if not train["load_best_model_at_end"]:
        problems.append(
            f"[train] early_stopping_patience: {why} load_best_model_at_end = true (with save_strategy equal to "
            "eval_strategy)"
        )
    if (
        train["eval_strategy"] == "steps"
        and train["save_strategy"] == "steps"
        and train.get("eval_steps")
        and train["save_steps"] % train["eval_steps"]
    ):
        problems.append(
            f"[train] early_stopping_patience: {why} a checkpoint at every evaluation: save_steps "
            f"({train['save_steps']}) must be a multiple of eval_steps ({train['eval_steps']})"
        )
    return problems


def _cross_checks(r: Recipe) -> list[str]:
    """Rules that involve more than one key."""
    problems = []
    t = r.train
    if r.export.dtype in GGUF_QUANTS and "merged" in r.export.formats:
        problems.append(
            f'[export] dtype = {r.export.dtype!r} is a GGUF quantisation, but formats holds "merged": '
            'a merged model is 16- or 32-bit; use dtype = "bf16" (and `fastsft export RUN --format gguf '
            f"--dtype {r.export.dtype}` for the quantised file)"
        )
    if t.max_steps == 0:
        problems.append(
            "[train] max_steps = 0 trains nothing: use a positive number, or -1 to train num_train_epochs"
        )
    if t.max_steps > 0 and t.warmup_steps >= t.max_steps:
        problems.append(
            f"[train] warmup_steps = {t.warmup_steps} is not shorter than the run (max_steps = {t.max_steps}): "
            f"the learning rate would stay below learning_rate = {t.learning_rate:g} (at most "
            f"{t.learning_rate * t.max_steps / t.warmup_steps:.2g}) for the whole run. Use warmup_steps below "
            f"max_steps (e.g. {max(t.max_steps // 10, 1) if t.max_steps > 1 else 0}), or warmup_ratio"
        )
    if t.eval_strategy != "no" and not (r.data.eval or r.data.val_ratio > 0):
        problems.append(
            f"[train] eval_strategy = {t.eval_strategy!r} needs evaluation data: set [data] eval or [data] val_ratio"
        )
    if t.load_best_model_at_end:
        if t.eval_strategy == "no":
            problems.append('[train] load_best_model_at_end = true needs eval_strategy = "steps" or "epoch"')
        elif t.save_strategy != t.eval_strategy:
            problems.append(
                "[train] load_best_model_at_end = true needs save_strategy equal to eval_strategy "
                f"(now {t.save_strategy!r} and {t.eval_strategy!r})"
            )
    if t.eval_strategy == "steps" and t.eval_steps is None:
        problems.append('[train] eval_strategy = "steps" needs eval_steps')
    m = r.model
    if not m.name.strip():
        problems.append(
            f"[model] name = {m.name!r} is empty: give a hub name (mistralai/Mistral-7B-Instruct-v0.3), a local "
            'folder, a .gguf file or a built-in model ("builtin:tiny-mistral")'
        )
    if m.load_in_4bit and m.load_in_8bit:
        problems.append(
            "[model] load_in_4bit and load_in_8bit are both true: a base is loaded one way. Set one of them to false."
        )
    if t.method == "full":
        for name in ("load_in_4bit", "load_in_8bit"):
            if getattr(m, name):
                problems.append(
                    f'[model] {name} = true with [train] method = "full": quantised weights cannot be trained, '
                    f"only an adapter on them. Set [model] {name} = false (the model trains in [model] dtype; "
                    'an 8-bit optimizer, optim = "adamw_8bit", saves most of the memory), or use method = "lora".'
                )
        if r.lora.use_dora:
            problems.append(
                '[lora] use_dora = true with [train] method = "full": DoRA is an adapter; '
                'use method = "lora" for DoRA, or drop use_dora'
            )
        if r.lora.modules_to_save:
            problems.append(
                '[lora] modules_to_save with [train] method = "full": every module trains and is saved '
                "already; drop modules_to_save"
            )
    problems += check_sources(r.data.as_dict(), SCHEMA["data"]["format"].choices)
    problems += check_early_stopping(r.train.as_dict(), r.data.as_dict())
    problems += trackers.check_names(r.train.as_dict())
    if r.loss.label_smoothing >= 1:
        problems.append(f"[loss] label_smoothing = {r.loss.label_smoothing}: must be < 1")
    # an unsloth model with the stock loss is allowed: it is the comparison row of the benchmarks
    if r.loss.kernel == "unsloth" and r.model.backend == "transformers":
        problems.append(
            '[loss] kernel = "unsloth" needs [model] backend = "unsloth" (or "auto" on a CUDA GPU)'
        )
    return problems


# ----------------------------------------------------------------------------------------------
# JSON Schema, for TOML editors (taplo / Even Better TOML)
# ----------------------------------------------------------------------------------------------

_JSON_TYPES = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "str_list": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "table": {"type": "object", "additionalProperties": {"type": "string"}},
    "table_list": {"type": "array", "items": {"type": "object"}},
}


def _key_schema(spec: Key) -> dict:
    if spec.type == "list":  # one name or an array of names, each one of the choices
        item = {"type": "string", **({"enum": list(spec.choices)} if spec.choices else {})}
        out: dict[str, Any] = {"anyOf": [item, {"type": "array", "items": item}]}
    else:
        out = copy.deepcopy(_JSON_TYPES[spec.type])
        if spec.choices:
            out["enum"] = list(spec.choices)
    out["description"] = spec.help
    if spec.min is not None:
        out["exclusiveMinimum" if spec.min_exclusive else "minimum"] = spec.min
    if spec.max is not None:
        out["maximum"] = spec.max
    if spec.default is not REQUIRED and spec.default is not None:
        out["default"] = spec.default
    return out


def json_schema() -> dict:
    """The recipe schema as JSON Schema (draft 2020-12)."""
    props = {}
    required_sections = []
    for name, keys in SCHEMA.items():
        req = [k for k, spec in keys.items() if spec.required]
        if req:
            required_sections.append(name)
        props[name] = {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: _key_schema(spec) for k, spec in keys.items()},
            **({"required": req} if req else {}),
        }
    # [data] needs one of `train` or [[data.sources]] (checked in `validate`)
    props["data"]["anyOf"] = [{"required": ["train"]}, {"required": ["sources"]}]
    required_sections.insert(list(SCHEMA).index("data"), "data")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "fastsft recipe",
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "required": required_sections,
    }
