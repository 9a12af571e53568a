"""fastsft.recipe.schema_json: `fastsft schema`, the recipe as JSON Schema."""

import json
from dataclasses import fields

from fastsft import recipe as R


def test_json_schema_covers_every_key():
    """Every field of every section dataclass is in `fastsft schema`, with its help, bounds and choices."""
    schema = R.json_schema()
    json.dumps(schema)
    assert set(schema["properties"]) == {f.name for f in fields(R.Recipe) if f.name not in ("path", "raw")}
    for section, cls in R.SECTIONS.items():
        props = schema["properties"][section]["properties"]
        assert list(props) == [f.name for f in fields(cls)]
        for f in fields(cls):
            assert props[f.name]["description"] == f.metadata["help"]
            if f.metadata["max"] is not None:
                assert props[f.name]["maximum"] == f.metadata["max"]
    assert schema["properties"]["train"]["properties"]["lr_scheduler_type"]["enum"][0] == "cosine"
    # [data] needs train or [[data.sources]]
    assert schema["properties"]["data"]["anyOf"] == [{"required": ["train"]}, {"required": ["sources"]}]
    assert schema["required"] == ["model", "data"]
    formats = schema["properties"]["export"]["properties"]["formats"]["anyOf"]
    assert formats[1]["items"]["enum"] == list(R.EXPORT_FORMATS)
