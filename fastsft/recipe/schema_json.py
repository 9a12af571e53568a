"""The recipe schema as JSON Schema (draft 2020-12), for TOML editors (taplo / Even Better TOML):
`fastsft schema`. Read from the same keys as the validator (`SCHEMA`).
"""

from __future__ import annotations

import copy
from typing import Any

from .keys import REQUIRED, Key
from .loading import SCHEMA

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
