"""fastsft.use.scores: when every reference answer is a JSON object, eval scores the answers field by field
(a code fence allowed around an answer, nothing searched for inside free text)."""

import json

from fastsft.use.scores import json_fields, json_object, json_rows


def test_an_answer_is_a_json_object_bare_or_in_one_fence():
    assert json_object(' {"a": 1} ') == {"a": 1}
    assert json_object('```json\n{"a": 1}\n```') == {"a": 1}
    assert json_object('```\n{"a": 1}\n```') == {"a": 1}
    assert json_object('Here it is: {"a": 1}') is None  # not searched for in free text
    assert json_object("[1, 2]") is None and json_object("1") is None  # only an object
    assert json_object("{not json}") is None


def test_fields_are_scored_against_every_reference_key():
    expected = [json.dumps({"city": "Oslo", "zip": "0150"}), json.dumps({"city": "Bergen"})]
    got = ['```json\n{"city": "Oslo", "zip": "0151"}\n```', '{"city": "Bergen", "extra": 1}']
    s = json_fields(expected, got)
    assert (s["n"], s["valid_json_count"], s["all_keys_count"]) == (2, 2, 1)
    assert s["keys"]["city"] == {"n": 2, "correct": 2, "exact": 1.0}
    assert s["keys"]["zip"] == {"n": 1, "correct": 0, "exact": 0.0}  # a share of the rows that have the key
    assert "extra" not in s["keys"]
    s = json_fields(expected, ["Oslo", '{"city": "Bergen"}'])  # a free-text answer scores nothing
    assert (s["valid_json"], s["all_keys"], s["keys"]["city"]["correct"]) == (0.5, 0.5, 1)
    assert s["keys"]["city"]["exact"] == 0.5
    s = json_fields(expected, ['{"city": "Oslo", "zip": "0150"}', "{}"])
    assert s["keys"]["zip"]["exact"] == 1.0  # of the one row whose reference has a zip


def test_values_compare_as_json_values():
    s = json_fields(['{"n": 2, "tags": ["a", "b"]}'], ['{"n": 2.0, "tags": ["a", "b"]}'])
    assert s["all_keys_count"] == 1  # 2 == 2.0 as JSON numbers
    s = json_fields(['{"n": "2"}'], ['{"n": 2}'])
    assert s["all_keys_count"] == 0  # a string is not a number


def test_no_field_scores_unless_every_reference_is_an_object():
    assert json_fields(['{"a": 1}', "plain"], ['{"a": 1}', "plain"]) is None
    assert json_fields([], []) is None


def test_rows_for_the_table():
    rows = json_rows(json_fields(['{"a": 1}', '{"a": 2}'], ['{"a": 1}', "no"]))
    assert rows == [
        ("JSON answers: valid JSON objects", "1/2 (50%)"),
        ("  every key equal", "1/2 (50%)"),
        ("  key 'a' equal", "1/2 (50%)"),
    ]
