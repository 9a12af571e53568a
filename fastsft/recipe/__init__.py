"""The recipe: one TOML file -> a validated, typed `Recipe`.

schema  the sections and their keys (type, default, help, bounds), `Recipe`, loading, validation with
        every cross-key rule, and the JSON Schema of `fastsft schema`
"""

from .schema import (
    EXPORT_DTYPES,
    EXPORT_FORMATS,
    FOREIGN_KEYS,
    GGUF_K_QUANTS,
    GGUF_QUANTS,
    PATH_KEYS,
    REQUIRED,
    RESUME_SAFE_KEYS,
    SCHEMA,
    SECTIONS,
    DataSection,
    Key,
    LoraSection,
    Recipe,
    Section,
    TrainSection,
    apply_overrides,
    json_schema,
    key,
    load,
    parse,
    parse_override,
    validate,
)

__all__ = [
    "EXPORT_DTYPES",
    "EXPORT_FORMATS",
    "GGUF_K_QUANTS",
    "GGUF_QUANTS",
    "FOREIGN_KEYS",
    "DataSection",
    "Key",
    "LoraSection",
    "PATH_KEYS",
    "REQUIRED",
    "RESUME_SAFE_KEYS",
    "Recipe",
    "SCHEMA",
    "SECTIONS",
    "Section",
    "TrainSection",
    "apply_overrides",
    "json_schema",
    "key",
    "load",
    "parse",
    "parse_override",
    "validate",
]
