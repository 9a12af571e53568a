"""Reading `data.train` / `data.eval`: a file, a `save_to_disk` folder or a hub data set, into raw rows.

Every row comes with where it came from ("data/x.jsonl line 4", "d.parquet row 7"), so that a later
problem names it. A row that cannot be read at all (not JSON, not UTF-8, too big) comes back as a
`RowProblem` in its place, so that `data.on_invalid = "skip"` can skip and count it.

Which reader reads what, and why:
- .jsonl, .json: our own readers. A JSON problem is named by its line (a `datasets` JSON reader
  stops at the first bad line without naming it), a bad line can be skipped, a huge row is refused
  before it is parsed, and rows stay Python objects: Arrow would merge the tool-call arguments of
  all rows into one struct type (null for every key a row lacks) and refuses rows whose same key
  holds different types.
- .csv: Python's csv module. Each row keeps the line it ends on (a quoted cell may span lines) and
  every cell stays a string; the `datasets` CSV reader goes through pandas, which infers numbers
  ("123" -> 123, then refused as "not a string") and gives no line.
- .parquet: `datasets` (`load_dataset("parquet")`); Parquet rows have no lines, and Arrow types are
  what the file holds. The nulls Arrow adds to tools and tool calls are removed by
  `formats.undo_arrow_union`.
- folder: `datasets.load_from_disk`; a hub name: `datasets.load_dataset`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# Sources read through Arrow (their nested columns carry the nulls of Arrow's struct union).
ARROW_SOURCES = ("parquet", "disk", "hub")
# One row larger than this is refused (its line named): tokenizing it would take gigabytes of memory
# (a 50 MB row took 3.5 GB), and max_length keeps only its start anyway.
MAX_ROW_BYTES = 8 * 2**20

Row = tuple[str, Any]  # (where, a raw row dict or a RowProblem)


class RowProblem(Exception):
    """One row that cannot be used; becomes a DataError (or a skip) naming the row."""


def is_local(value: str, resolved: Path) -> bool:
    """Whether `data.train/eval = value` names a local file or folder (else a hub data set)."""
    if resolved.exists():
        return True
    return value.endswith(LOCAL_SUFFIXES) or value.startswith((".", "/", "~")) or "\\" in value


def read_source(value: str, spec, *, key: str) -> tuple[list[Row], str]:
    """`data.train/eval` -> ([(where, raw row or RowProblem)], kind of source). `spec`: a DataSpec."""
    d = spec.data
    path = spec.resolve_path(value)
    if not is_local(value, path):
        return _read_hub(value, d.subset, d.split), "hub"
    if not path.exists():
        raise DataError(f"data.{key} = {value!r}: file not found: {path}")
    if path.is_dir():
        return _read_disk(value, path, d.split), "disk"
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    suffix = path.suffix.lower()
    if suffix in readers:
        return readers[suffix](value, path), suffix[1:]
    raise DataError(
        f"data.{key} = {value!r}: unknown file type {suffix or '(none)'!r}; use .jsonl, .json, .parquet, "
        ".csv, a folder written by datasets' save_to_disk, or a hub data set name"
    )


def _checked(where: str, obj: Any) -> Row:
    """A parsed JSON value as a row: an object of text, else the problem."""
    if not isinstance(obj, dict):
        return where, RowProblem(f"expected a JSON object, got {json_type(obj)}")
    problem = not_text(obj)
    return where, (RowProblem(problem) if problem else obj)


def _read_jsonl(name: str, path: Path) -> list[Row]:
    rows: list[Row] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{name} line {lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is dropped
            except UnicodeDecodeError as e:
                rows.append((where, RowProblem(f"not UTF-8 text (byte {e.start} of the line)")))
                continue
            if not line.strip():
                continue
            if len(raw) > MAX_ROW_BYTES:
                rows.append((where, RowProblem(_too_big(len(raw)))))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((where, RowProblem(f"not valid JSON: {e.msg} (column {e.colno})")))
                continue
            except RecursionError:
                rows.append(
                    (
                        where,
                        RowProblem("nested too deeply to be a data row (JSON arrays/objects in each other)"),
                    )
                )
                continue
            rows.append(_checked(where, obj))
    return rows


def _read_json(name: str, path: Path) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is dropped
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{name} line {e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(
            f"{name}: nested too deeply to be a data file (JSON arrays/objects in each other)"
        ) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(
            f"{name}: expected a JSON list of objects, got {json_type(data)} (for one object a line, use .jsonl)"
        )
    return [_checked(f"{name} row {i}", obj) for i, obj in enumerate(data, start=1)]


def _read_csv(name: str, path: Path) -> list[Row]:
    try:
        # utf-8-sig: a byte-order mark (Excel writes one) would otherwise stick to the first column's name
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            # reader.line_num is the line the row ends on (a quoted field may span lines)
            return [(f"{name} line {reader.line_num}", dict(obj)) for obj in reader]
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{name}: cannot read as CSV: {e}") from None


def _numbered(name: str, rows: Iterable[dict]) -> list[Row]:
    return [(f"{name} row {i}", obj) for i, obj in enumerate(rows, start=1)]


def _read_parquet(name: str, path: Path) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:  # pyarrow and datasets raise several kinds
        raise DataError(f"{name}: cannot read as Parquet: {type(e).__name__}: {e}") from None
    return _numbered(name, ds)


def _read_disk(name: str, path: Path, split: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(
            f"{name}: a folder, but not one written by datasets' save_to_disk ({type(e).__name__}: {e})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split {split!r}; its splits are {', '.join(ds)} (set data.split)")
        ds = ds[split]
    return _numbered(name, ds)


def _read_hub(name: str, subset: str | None, split: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        raise DataError(
            f"data.{name!r} is not a local file or folder, and loading it as a hub data set failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). A hub data set needs network "
            "access; otherwise give a local path (.jsonl, .json, .parquet, .csv or a save_to_disk folder)."
        ) from None
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - split is always given
        ds = ds[split]
    return _numbered(name, ds)


def _too_big(n: int) -> str:
    return (
        f"{n / 2**20:.1f} MB in one row, over the {MAX_ROW_BYTES // 2**20} MB a row may hold; training keeps only "
        "its first data.max_length tokens anyway. Split it or shorten it"
    )


def not_text(obj, depth: int = 0) -> str | None:
    """Why `obj` (a parsed row, or chat messages) holds something that is not text: a lone surrogate
    such as "\\ud800" (a half of a UTF-16 pair, which no tokenizer can encode), or None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            return (
                f"a lone surrogate ({obj[e.start]!r} at character {e.start + 1} of {short(obj)!r}) is not text; "
                "write the character itself or its full UTF-16 pair (\\ud83d\\ude00)"
            )
        return None
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, list):
        items = obj
    else:
        return None
    for v in items:
        problem = not_text(v, depth + 1)
        if problem:
            return problem
    return None


def json_type(value: Any) -> str:
    """How a user would name the JSON type of `value` ("a list", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
