"""The typed `Recipe` and how one is read: the TOML file (`load`, `parse`), the command line's `--set
section.key=value` overrides, and validation (`validate`), strict and collecting every problem before
raising one `RecipeError`: an unknown key is named with the closest valid one, a wrong type or an
out-of-range value names the key, the value and what is allowed, and the rules between keys
(`rules.py`) follow.
"""

from __future__ import annotations

import copy
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from fastsft.errors import RecipeError

from .keys import Key, Section, check_value, suggest, type_name
from .rules import cross_checks
from .schema import (
    DataSection,
    DistributedSection,
    ExportSection,
    LoraSection,
    LossSection,
    ModelSection,
    TrainSection,
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
# Reading, overriding, validating
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


def _top_level_problems(raw: dict) -> list[str]:
    """Unknown sections, and keys written outside any section."""
    problems = []
    for name in raw:
        if name not in SCHEMA and not isinstance(raw[name], dict):  # a key outside any section
            home = next((s for s, keys in SCHEMA.items() if name in keys), None)
            hint = (
                f"; it belongs in [{home}]" if home else suggest(name, [], section="")
            ) or " (every key belongs in a section: " + ", ".join(f"[{s}]" for s in SCHEMA) + ")"
            problems.append(f"`{name}`: a key outside any section{hint}")
        elif name not in SCHEMA:
            problems.append(
                f"[{name}]: unknown section{suggest(name, SCHEMA)} (sections: {', '.join(SCHEMA)})"
            )
        elif not isinstance(raw[name], dict):
            problems.append(f"`{name}` must be a section ([{name}]), not {type_name(raw[name])}")
    return problems


def _section_values(name: str, given: Any, problems: list[str]) -> dict[str, Any]:
    """Every key of section `name`: the given value checked, or its default. Problems are appended."""
    keys = SCHEMA[name]
    given = given if isinstance(given, dict) else {}
    for k in given:
        if k not in keys:
            problems.append(f"`{k}`: unknown key in [{name}]{suggest(k, keys, section=name)}")
    values: dict[str, Any] = {}
    for k, spec in keys.items():
        if k in given:
            values[k], found = check_value(name, spec, given[k])
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
        problems += cross_checks(recipe)
    if problems:
        raise RecipeError(problems, path=str(path) if path is not None else None)
    return recipe
