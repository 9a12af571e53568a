"""The recipe: one TOML file -> a validated, typed `Recipe`.

The schema lives here and only here: every key has its type, default, allowed values and one line of
help, and the same text serves `fastsft schema`, the validator's messages and the docs. Keys take the
names TRL / transformers / PEFT users already know.

Validation is strict and collects every problem before raising one `RecipeError`:
an unknown key is named with the closest valid one, a wrong type or an out-of-range value names the
key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import RecipeError

# ----------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------

_NO_DEFAULT = object()


@dataclass(frozen=True)
class Key:
    """One recipe key: its type, default and bounds.

    `type` is one of "str", "int", "float", "bool", "str_list" (a string or a list of strings),
    "table" (a TOML inline table of strings to strings).
    """

    type: str
    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    nullable: bool = False  # may be left out to mean "unset" (default None)
    required: bool = False


SCHEMA: dict[str, dict[str, Key]] = {
    "model": {
        "name": Key("str", _NO_DEFAULT, "Hub id or local path of the base model (a folder or a .gguf file), `package:PKG/FILE.gguf` (a GGUF an installed Python package ships), or `builtin:tiny-mistral`.", required=True),
        "backend": Key(
            "str",
            "auto",
            "unsloth (CUDA only), transformers (anywhere), or auto: unsloth when a CUDA GPU and unsloth are there.",
            choices=("auto", "unsloth", "transformers"),
        ),
        "load_in_4bit": Key("bool", True, "Load the base in 4-bit NF4 with double quantisation (QLoRA)."),
        "dtype": Key(
            "str",
            "auto",
            "Compute dtype: auto = bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU.",
            choices=("auto", "bf16", "fp16", "fp32"),
        ),
        "attn_implementation": Key(
            "str",
            "auto",
            "Attention kernel for the transformers backend (auto = sdpa).",
            choices=("auto", "sdpa", "eager", "flash_attention_2"),
        ),
        "trust_remote_code": Key(
            "bool",
            False,
            "The model needs its repository's own Python code. Granted only by --trust-remote-code on the command line.",
        ),
        "allow_pickle": Key(
            "bool",
            False,
            "The model's weights are pickle (.bin) files. Read only with --allow-pickle on the command line; "
            "by default only safetensors are read.",
        ),
    },
    "lora": {
        "r": Key("int", 16, "LoRA rank.", min=1, max=4096),
        "lora_alpha": Key("float", 16, "LoRA scaling numerator (scale = lora_alpha / r).", min=0, min_exclusive=True),
        "lora_dropout": Key("float", 0.0, "Dropout on the LoRA input.", min=0, max=1),
        "bias": Key("str", "none", "Which biases train.", choices=("none", "all", "lora_only")),
        "target_modules": Key(
            "str_list",
            "all-linear",
            'Modules that get adapters: "all-linear" or a list such as ["q_proj", "v_proj"].',
        ),
        "use_rslora": Key("bool", False, "Rank-stabilised LoRA scaling (lora_alpha / sqrt(r))."),
    },
    "data": {
        "train": Key(
            "str",
            _NO_DEFAULT,
            "Training data: .jsonl/.json/.parquet/.csv file, a save_to_disk folder, or a hub data set name. "
            "Relative paths are resolved from the recipe's folder.",
            required=True,
        ),
        "eval": Key("str", None, "Evaluation data, same kinds as `train`.", nullable=True),
        "split": Key("str", "train", "Split to read from a hub data set or a DatasetDict folder."),
        "subset": Key("str", None, "Configuration name of a hub data set.", nullable=True),
        "format": Key(
            "str",
            "auto",
            "Data shape; auto detects it from the columns.",
            choices=("auto", "text", "messages", "prompt_completion", "conversations", "sharegpt", "alpaca"),
        ),
        "columns": Key(
            "table",
            {},
            'Rename columns to the names the format expects, e.g. { messages = "dialog" }.',
        ),
        "chat_template": Key(
            "str",
            None,
            "Override the tokenizer's chat template: chatml, llama3, mistral, qwen2.5, gemma, or a .jinja path.",
            nullable=True,
        ),
        "max_length": Key("int", 1024, "Longest tokenized example; longer ones are truncated (and counted).", min=8),
        "packing": Key("bool", False, "Pack several examples into each sequence (TRL's packing)."),
        "packing_strategy": Key("str", "bfd", "TRL packing strategy.", choices=("bfd", "wrapped")),
        "assistant_only_loss": Key(
            "bool", None, "Loss only on assistant turns (default: true for conversations).", nullable=True
        ),
        "completion_only_loss": Key(
            "bool", None, "Loss only on the completion (default: true for prompt/completion data).", nullable=True
        ),
        "val_ratio": Key("float", 0.0, "Share of `train` split off for evaluation when `eval` is not given.", min=0, max=0.5),
        "on_invalid": Key("str", "error", "What a bad row does: stop with an error, or be skipped and counted.", choices=("error", "skip")),
    },
    "train": {
        "learning_rate": Key("float", 2e-4, "Peak learning rate.", min=0, max=1, min_exclusive=True),
        "num_train_epochs": Key("float", 1.0, "Epochs over the training data (ignored when max_steps > 0).", min=0, max=1e4, min_exclusive=True),
        "max_steps": Key("int", -1, "Optimizer steps to run; -1 = use num_train_epochs.", min=-1, max=10**9),
        "per_device_train_batch_size": Key("int", 2, "Sequences per forward pass.", min=1, max=65536),
        "per_device_eval_batch_size": Key("int", None, "Eval batch size (default: the train batch size).", min=1, max=65536, nullable=True),
        "gradient_accumulation_steps": Key("int", 1, "Forward passes per optimizer step.", min=1, max=65536),
        "warmup_ratio": Key("float", 0.0, "Share of the steps spent warming the learning rate up.", min=0, max=1),
        "warmup_steps": Key("int", 0, "Warm-up steps (overrides warmup_ratio when > 0).", min=0, max=10**9),
        "lr_scheduler_type": Key(
            "str",
            "cosine",
            "Learning-rate decay after warm-up.",
            choices=("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr"),
        ),
        "weight_decay": Key("float", 0.0, "AdamW weight decay.", min=0, max=1),
        "max_grad_norm": Key("float", 1.0, "Gradient clipping norm (0 disables).", min=0, max=1e6),
        "optim": Key(
            "str",
            "adamw_torch",
            "Optimizer (transformers' names). adamw_8bit / paged_adamw_8bit need bitsandbytes on a GPU.",
            choices=("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor"),
        ),
        "gradient_checkpointing": Key("bool", True, "Recompute activations in backward: less memory, ~30% slower."),
        "logging_steps": Key("int", 1, "Log every N optimizer steps.", min=1, max=10**9),
        "eval_strategy": Key("str", "no", "When to evaluate.", choices=("no", "steps", "epoch")),
        "eval_steps": Key("int", None, "Evaluate every N steps (eval_strategy = steps).", min=1, max=10**9, nullable=True),
        "save_strategy": Key("str", "steps", "When to write checkpoints.", choices=("no", "steps", "epoch")),
        "save_steps": Key("int", 500, "Checkpoint every N steps (save_strategy = steps).", min=1, max=10**9),
        "save_total_limit": Key("int", 2, "Checkpoints kept (older ones are deleted).", min=1, max=10**6, nullable=True),
        "load_best_model_at_end": Key("bool", False, "Keep the checkpoint with the best metric_for_best_model at the end."),
        "metric_for_best_model": Key("str", "eval_loss", "Metric that picks the best checkpoint."),
        "seed": Key("int", 42, "Seed for weights init, data order and dropout.", min=0, max=2**32 - 1),
        "max_nonfinite_steps": Key(
            "int",
            0,
            "Optimizer steps with a NaN/inf loss or gradient that are skipped (not applied) before the run "
            "stops; 0 stops at the first.",
            min=0,
            max=10**6,
        ),
    },
    "loss": {
        "kernel": Key(
            "str",
            "auto",
            "fastsft-linear (hidden states -> loss, never builds the logits), fastsft (logits -> our fused CE), "
            "torch (stock), unsloth (Unsloth's own fused loss), auto = fastsft-linear where supported.",
            choices=("auto", "fastsft-linear", "fastsft", "torch", "unsloth"),
        ),
        "label_smoothing": Key("float", 0.0, "Label smoothing epsilon.", min=0, max=1),
    },
    "distributed": {
        "num_processes": Key(
            "int",
            1,
            "Data-parallel processes on this machine (GPUs, or CPU processes over gloo); > 1 makes "
            "`fastsft run` launch itself through torchrun (same as --launch N).",
            min=1,
            max=1024,
        ),
        "strategy": Key(
            "str",
            "ddp",
            "How several processes share the work: ddp (a full copy each), fsdp (FSDP2: parameters, "
            "gradients and optimizer state sharded), deepspeed-zero3 (needs `pip install deepspeed`).",
            choices=("ddp", "fsdp", "deepspeed-zero3"),
        ),
        "deepspeed_config": Key(
            "str", None, "A DeepSpeed JSON config to use instead of fastsft's ZeRO-3 one (strategy = deepspeed-zero3).",
            nullable=True,
        ),
    },
    "export": {
        "formats": Key("str_list", [], 'Exports written after training: any of "adapter", "merged", "gguf".'),
        "dtype": Key("str", "bf16", "dtype of merged / GGUF exports.", choices=("bf16", "fp16", "fp32")),
    },
}

EXPORT_FORMATS = ("adapter", "merged", "gguf")


# ----------------------------------------------------------------------------------------------
# The typed recipe
# ----------------------------------------------------------------------------------------------


class Section:
    """Attribute access to one validated section (`recipe.train.learning_rate`)."""

    def __init__(self, name: str, values: dict[str, Any]):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"[{self._name}] has no key {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("recipes are read-only; use Recipe.with_overrides")

    def as_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._values)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. `path` is the file it came from (None for one built in code); relative
    data paths are resolved against its folder."""

    model: Section
    lora: Section
    data: Section
    train: Section
    loss: Section
    distributed: Section
    export: Section
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
        return {name: getattr(self, name).as_dict() for name in SCHEMA}

    def to_toml(self) -> str:
        """The resolved recipe as TOML (every key, defaults included); unset keys are left out. Written
        by tomli_w, so any string (quotes, control characters, backslashes) reads back as it was."""
        import tomli_w

        doc = {
            section: {k: v for k, v in values.items() if v is not None} for section, values in self.as_dict().items()
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
        return validate(raw, path=self.path)

    def differences(self, other: Recipe) -> list[str]:
        """`section.key` of every value that differs between the two recipes."""
        a, b = self.as_dict(), other.as_dict()
        return [f"{s}.{k}" for s in a for k in a[s] if a[s][k] != b[s].get(k)]

    def with_overrides(self, overrides: list[str]) -> Recipe:
        raw = copy.deepcopy(self.raw)
        apply_overrides(raw, overrides)
        return validate(raw, path=self.path)


# ----------------------------------------------------------------------------------------------
# Reading and validating
# ----------------------------------------------------------------------------------------------


# Keys holding file paths, resolved relative to the recipe's folder.
PATH_KEYS = (
    ("model", "name"),
    ("data", "train"),
    ("data", "eval"),
    ("data", "chat_template"),
    ("distributed", "deepspeed_config"),
)

# Keys a resumed run may change: they do not change what is trained, only how it is watched and kept.
RESUME_SAFE_KEYS = frozenset(
    {
        "train.logging_steps",
        "train.eval_steps",
        "train.save_steps",
        "train.save_total_limit",
        "train.per_device_eval_batch_size",
        "train.max_nonfinite_steps",
        "export.formats",
        "export.dtype",
    }
)


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
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(
                f"not a text file: byte {e.start} is not UTF-8. A recipe is a TOML text file.", path=path
            ) from None
    if not data.strip():
        raise RecipeError(
            "the recipe is empty. Start from recipes/tiny.toml; [model] name and [data] train are required.",
            path=path,
        )
    try:
        return tomllib.loads(data)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"invalid TOML: {e}. Check the quoting and brackets on that line.", path=path) from None
    except RecursionError:
        raise RecipeError("arrays or tables nested too deeply to be a recipe.", path=path) from None


def parse_override(item: str, *, path: str | None = None) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value). The value is read as a TOML value; a bare word
    that is not valid TOML (`cosine`) is taken as a string."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected section.key=value, e.g. train.learning_rate=1e-4", path=path)
    lhs, rhs = item.split("=", 1)
    lhs, rhs = lhs.strip(), rhs.strip()
    if lhs.count(".") != 1 or not all(lhs.split(".")):
        raise RecipeError(f"--set {item!r}: the name must be section.key, e.g. train.learning_rate", path=path)
    section, key = lhs.split(".")
    try:
        value = tomllib.loads(f"v = {rhs}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs
    except RecursionError:
        raise RecipeError(f"--set {lhs}=...: the value is nested too deeply", path=path) from None
    return section, key, value


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
    return type(value).__name__


def _check_value(section: str, key: str, spec: Key, value: Any) -> tuple[Any, str | None]:
    """Returns (coerced value, problem or None)."""
    where = f"[{section}] {key} = {value!r}"
    if value is None:
        return None, None
    t = spec.type
    if t == "bool":
        if not isinstance(value, bool):
            return value, f"{where}: expected true or false, got {_type_name(value)}"
    elif t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                value = int(value)
            else:
                return value, f"{where}: expected an integer, got {_type_name(value)}"
    elif t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{where}: expected a number, got {_type_name(value)}"
        value = float(value)
        if not math.isfinite(value):
            return value, f"{where}: must be a finite number"
    elif t == "str":
        if not isinstance(value, str):
            return value, f"{where}: expected a string, got {_type_name(value)} (quote it: \"...\")"
    elif t == "str_list":
        if isinstance(value, str) and "," in value:
            items = ", ".join(f'"{v.strip()}"' for v in value.split(",") if v.strip())
            return value, f"{where}: {value!r} is one string; for several names write an array: [{items}]"
        if isinstance(value, str):
            pass
        elif not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value, f"{where}: expected a string or an array of strings"
    elif t == "table":
        if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            return value, f"{where}: expected a table of strings, e.g. {{ messages = \"dialog\" }}"
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(str(c) for c in spec.choices)
        hint = _suggest(value, spec.choices) if isinstance(value, str) else ""
        return value, f"{where}: must be one of {allowed}{hint}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = spec.min, spec.max
        if lo is not None and (value < lo or (spec.min_exclusive and value <= lo)):
            op = ">" if spec.min_exclusive else ">="
            return value, f"{where}: must be {op} {lo}" + (f" and <= {hi}" if hi is not None else "")
        if hi is not None and value > hi:
            return value, f"{where}: must be <= {hi}" + (f" and >= {lo}" if lo is not None else "")
    return value, None


def validate(raw: dict, *, path: str | Path | None = None) -> Recipe:
    """dict (as read from TOML, overrides applied) -> `Recipe`. Collects every problem."""
    problems: list[str] = []
    sections: dict[str, dict[str, Any]] = {}
    for name in raw:
        if name not in SCHEMA and not isinstance(raw[name], dict):  # a key outside any section
            home = next((s for s, keys in SCHEMA.items() if name in keys), None)
            hint = (
                f"; it belongs in [{home}]" if home else _suggest(name, [], section="")
            ) or " (every key belongs in a section: " + ", ".join(f"[{s}]" for s in SCHEMA) + ")"
            problems.append(f"`{name}`: a key outside any section{hint}")
        elif name not in SCHEMA:
            problems.append(f"[{name}]: unknown section{_suggest(name, SCHEMA)} (sections: {', '.join(SCHEMA)})")
        elif not isinstance(raw[name], dict):
            problems.append(f"`{name}` must be a section ([{name}]), not {_type_name(raw[name])}")
    for name, keys in SCHEMA.items():
        given = raw.get(name, {})
        if not isinstance(given, dict):
            given = {}
        values: dict[str, Any] = {}
        for key in given:
            if key not in keys:
                problems.append(f"`{key}`: unknown key in [{name}]{_suggest(key, keys, section=name)}")
        for key, spec in keys.items():
            if key in given:
                value, problem = _check_value(name, key, spec, given[key])
                if problem:
                    problems.append(problem)
                values[key] = value
            elif spec.required:
                problems.append(f"[{name}] {key} is required: {spec.help}")
                values[key] = None
            else:
                values[key] = copy.deepcopy(spec.default)
        sections[name] = values
    if not problems:
        problems += _cross_checks(sections)
    if problems:
        raise RecipeError(problems, path=str(path) if path is not None else None)
    return Recipe(
        **{name: Section(name, values) for name, values in sections.items()},
        path=Path(path).resolve() if path is not None else None,
        raw=copy.deepcopy(raw),
    )


def _cross_checks(s: dict[str, dict[str, Any]]) -> list[str]:
    """Rules that involve more than one key."""
    problems = []
    t = s["train"]
    if t["max_steps"] == 0:
        problems.append("[train] max_steps = 0 trains nothing: use a positive number, or -1 to train num_train_epochs")
    if t["eval_strategy"] != "no" and not (s["data"]["eval"] or s["data"]["val_ratio"] > 0):
        problems.append(
            f"[train] eval_strategy = {t['eval_strategy']!r} needs evaluation data: set [data] eval or [data] val_ratio"
        )
    if t["load_best_model_at_end"]:
        if t["eval_strategy"] == "no":
            problems.append("[train] load_best_model_at_end = true needs eval_strategy = \"steps\" or \"epoch\"")
        elif t["save_strategy"] != t["eval_strategy"]:
            problems.append(
                "[train] load_best_model_at_end = true needs save_strategy equal to eval_strategy "
                f"(now {t['save_strategy']!r} and {t['eval_strategy']!r})"
            )
    if t["eval_strategy"] == "steps" and t["eval_steps"] is None:
        problems.append("[train] eval_strategy = \"steps\" needs eval_steps")
    if s["loss"]["label_smoothing"] >= 1:
        problems.append(f"[loss] label_smoothing = {s['loss']['label_smoothing']}: must be < 1")
    formats = s["export"]["formats"]
    formats = [formats] if isinstance(formats, str) else formats
    for f in formats:
        if f not in EXPORT_FORMATS:
            problems.append(f"[export] formats: {f!r} is not one of {', '.join(EXPORT_FORMATS)}{_suggest(f, EXPORT_FORMATS)}")
    s["export"]["formats"] = list(formats)
    if s["model"]["backend"] == "unsloth" and s["loss"]["kernel"] == "torch":
        pass  # allowed: Unsloth's forward with the stock loss path is the comparison row
    if s["loss"]["kernel"] == "unsloth" and s["model"]["backend"] == "transformers":
        problems.append('[loss] kernel = "unsloth" needs [model] backend = "unsloth" (or "auto" on a CUDA GPU)')
    return problems


# ----------------------------------------------------------------------------------------------
# JSON Schema, for TOML editors (taplo / Even Better TOML)
# ----------------------------------------------------------------------------------------------


def json_schema() -> dict:
    """The recipe schema as JSON Schema (draft 2020-12)."""

    def key_schema(spec: Key) -> dict:
        base = {
            "str": {"type": "string"},
            "int": {"type": "integer"},
            "float": {"type": "number"},
            "bool": {"type": "boolean"},
            "str_list": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "table": {"type": "object", "additionalProperties": {"type": "string"}},
        }[spec.type]
        out = dict(base)
        out["description"] = spec.help
        if spec.choices:
            out["enum"] = list(spec.choices)
        if spec.min is not None:
            out["exclusiveMinimum" if spec.min_exclusive else "minimum"] = spec.min
        if spec.max is not None:
            out["maximum"] = spec.max
        if spec.default is not _NO_DEFAULT and spec.default is not None:
            out["default"] = spec.default
        return out

    props = {}
    required_sections = []
    for name, keys in SCHEMA.items():
        req = [k for k, spec in keys.items() if spec.required]
        if req:
            required_sections.append(name)
        props[name] = {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: key_schema(spec) for k, spec in keys.items()},
            **({"required": req} if req else {}),
        }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "fastsft recipe",
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "required": required_sections,
    }
