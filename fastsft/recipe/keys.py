"""How a recipe key is declared and how one value of it is checked.

A key is one field of a section dataclass (`schema.py`): its type in the annotation, and `key()`'s
default, help, allowed values and bounds in the field's metadata (TRL's `SFTConfig` documents its fields
the same way). `Key` is what the validator, `fastsft schema` and the docs read of it. `check_value` turns
one value into the key's type or the problems with it, each naming the key, the value and what is
allowed; an unknown name gets the closest known one (or, for a name users bring from Axolotl or
LLaMA-Factory, `FOREIGN_KEYS`, fastsft's name for it).
"""

from __future__ import annotations

import copy
import difflib
import math
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

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


class Section:
    """Base of the sections: frozen dataclasses whose fields are the section's keys
    (`recipe.train.learning_rate`). A recipe is changed through `Recipe.with_overrides`."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}


# ----------------------------------------------------------------------------------------------
# One value checked against its key
# ----------------------------------------------------------------------------------------------

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


def suggest(word: str, options, section: str | None = None) -> str:
    if word in FOREIGN_KEYS:
        s, k = FOREIGN_KEYS[word]
        if s != section or k in options:
            return f"; fastsft calls it `{k}` in [{s}]"
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def type_name(value: Any) -> str:
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
            return value, f"{where}: expected true or false, got {type_name(value)}"
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                return int(value), None
            return value, f"{where}: expected an integer, got {type_name(value)}"
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{where}: expected a number, got {type_name(value)}"
        value = float(value)
        if not math.isfinite(value):
            return value, f"{where}: must be a finite number"
    elif kind == "str":
        if not isinstance(value, str):
            return value, f'{where}: expected a string, got {type_name(value)} (quote it: "...")'
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
                f"[{section}] {spec.name}: {item!r} is not one of {allowed}{suggest(item, spec.choices)}"
                for item in value
                if item not in spec.choices
            ]
        if value not in spec.choices:
            hint = suggest(value, spec.choices) if isinstance(value, str) else ""
            return [f"{where}: must be one of {allowed}{hint}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = spec.min, spec.max
        if lo is not None and (value < lo or (spec.min_exclusive and value <= lo)):
            op = ">" if spec.min_exclusive else ">="
            return [f"{where}: must be {op} {lo}" + (f" and <= {hi}" if hi is not None else "")]
        if hi is not None and value > hi:
            return [f"{where}: must be <= {hi}" + (f" and >= {lo}" if lo is not None else "")]
    return []


def check_value(section: str, spec: Key, value: Any) -> tuple[Any, list[str]]:
    """(coerced value, problems) of one key's value; None (only from Python) unsets a nullable key."""
    if value is None and spec.nullable:
        return None, []
    where = f"[{section}] {spec.name} = {value!r}"
    value, problem = _check_type(where, spec.type, value, f"{section}.{spec.name}")
    if problem:
        return value, [problem]
    return value, _check_allowed(section, spec, where, value)
