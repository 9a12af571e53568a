"""`DataSpec`: what the data pipeline reads of a recipe, built once (`DataSpec.of(recipe)`).

Every step of `data/` takes it instead of the whole recipe: the `[data]` section (validated with the
recipe), the seed that splits and mixes, and the folder that relative paths resolve from. Reading
another file exactly as training read `data.train` (each `[[data.sources]]` entry, `[data] retain`,
`fastsft eval --data`) is `spec.one_file(path)`: the same section with that file as its only data and
nothing held out, derived here rather than by rebuilding and re-validating a recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..recipe import DataSection, TrainSection


@dataclass(frozen=True)
class DataSpec:
    data: DataSection
    seed: int
    base_dir: Path

    @classmethod
    def of(cls, recipe) -> DataSpec:
        """The spec of a validated recipe; a DataSpec is returned as it is; None: every [data] default
        (a model used without a recipe is shaped, templated and masked as `fastsft run` would train it)."""
        if isinstance(recipe, DataSpec):
            return recipe
        if recipe is None:
            return cls(DataSection(), TrainSection().seed, Path.cwd())
        return cls(recipe.data, recipe.train.seed, recipe.base_dir)

    def resolve_path(self, value: str) -> Path:
        """A path of [data], resolved from the recipe's folder (not the current directory)."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def one_file(
        self, path: str | Path, *, format: str | None = None, columns: dict | None = None
    ) -> DataSpec:
        """This spec reading only `path`, as `data.train` would be read (its format and columns unless
        given), with no other source, no eval file, no retain set and nothing held out."""
        if isinstance(path, Path):
            path = str(path.expanduser().resolve())
        data = dataclasses.replace(
            self.data,
            train=path,
            sources=[],
            eval=None,
            retain=None,
            val_ratio=0.0,
            format=format if format is not None else self.data.format,
            columns=dict(columns) if columns is not None else self.data.columns,
        )
        return dataclasses.replace(self, data=data)
