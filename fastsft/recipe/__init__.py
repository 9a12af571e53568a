"""The recipe: one TOML file -> a validated, typed `Recipe`.

schema       the sections and their keys, one dataclass per section (type, default, help, bounds): read
             this to learn what a recipe may say
keys         how a key is declared (`key()`, `Key`) and how one value of it is checked
loading      the typed `Recipe`; reading the TOML, `--set` overrides, validation (every problem at once)
rules        the rules between keys (cross-section checks)
schema_json  the JSON Schema of `fastsft schema`, for TOML editors
"""

from .keys import FOREIGN_KEYS, REQUIRED, Key, Section, key
from .loading import (
    PATH_KEYS,
    RESUME_SAFE_KEYS,
    SCHEMA,
    SECTIONS,
    Recipe,
    apply_overrides,
    load,
    parse,
    parse_override,
    validate,
)
from .schema import (
    EXPORT_DTYPES,
    EXPORT_FORMATS,
    GGUF_K_QUANTS,
    GGUF_QUANTS,
    DataSection,
    LoraSection,
    TrainSection,
)
from .schema_json import json_schema

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
