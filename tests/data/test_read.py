"""fastsft.data.read: each file type (JSONL, JSON, CSV, Parquet, a saved dataset folder) read to the same rows,
a byte-order mark dropped, and a missing file or a hub name offline named."""

import csv
import json

import pytest

from fastsft.errors import DataError

from _tiny import (
    CONV,
    TRAINED,
    make_recipe,
    prepare,
    qa,
    trained_texts,
    write_jsonl,
)


def _write(kind, folder, rows):
    if kind == "jsonl":
        return write_jsonl(folder / "d.jsonl", rows).name
    if kind == "json":
        (folder / "d.json").write_text(json.dumps(rows), encoding="utf-8")
        return "d.json"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), folder / "d.parquet")
        return "d.parquet"
    if kind == "csv":
        with open(folder / "d.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["messages"])
            w.writeheader()
            for r in rows:
                w.writerow({"messages": json.dumps(r["messages"])})  # lists are JSON in a CSV cell
        return "d.csv"
    if kind == "disk":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder / "ds"))
        return "ds"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "disk"])
def test_each_file_type(tmp_path, tok, kind):
    rows = [{"messages": CONV}, qa(1), qa(2)]
    name = _write(kind, tmp_path, rows)
    recipe = make_recipe(tmp_path, name)
    p = prepare(recipe, tok)
    assert len(p.train) == 3
    assert p.train[0]["messages"] == CONV[:2]  # the prompt turns
    assert trained_texts(recipe, tok, 1) == [TRAINED]


def test_disk_split_and_missing_file(tmp_path, tok):
    _write("disk", tmp_path, [qa(1)])
    with pytest.raises(DataError, match="no split 'test'; its splits are train"):
        prepare(make_recipe(tmp_path, "ds", split="test"), tok)
    with pytest.raises(DataError, match="file not found"):
        prepare(make_recipe(tmp_path, "nope.jsonl"), tok)


def test_csv_text_column(tmp_path, tok):
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([["first line"], ["second, with a comma"]])
    p = prepare(make_recipe(tmp_path, "d.csv"), tok)
    assert [tok.decode(ids) for ids in p.train["input_ids"]] == [
        "first line<|im_end|>",
        "second, with a comma<|im_end|>",
    ]


def test_hub_name_needs_network(tmp_path, tok, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="needs network access; otherwise give a local path"):
        prepare(make_recipe(tmp_path, "someone/some-dataset"), tok)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_a_byte_order_mark_is_dropped(tmp_path, tok, kind):
    """A UTF-8 BOM (Excel, Notepad) stuck to the first column's name or made line 1 invalid JSON, with a
    message that did not show it (#28)."""
    name = _write(kind, tmp_path, [{"messages": CONV}, qa(1)])
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    recipe = make_recipe(tmp_path, name)
    assert len(prepare(recipe, tok).train) == 2
    assert trained_texts(recipe, tok, 1) == [TRAINED]
