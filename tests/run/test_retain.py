"""The retain set (fastsft.run.retain): read and masked as training data, named by its own key."""

import pytest

from fastsft import recipe as R
from fastsft.errors import DataError
from fastsft.run import retain

from _tiny import TINY_RECIPE


def test_an_empty_retain_file_is_named_as_data_retain(tmp_path, tok):
    """An empty retain file was reported as `data.train` (#28)."""
    (tmp_path / "empty.jsonl").write_text("")
    p = tmp_path / "r.toml"
    p.write_text(TINY_RECIPE.replace("[data]\n", '[data]\nretain = "empty.jsonl"\n'))
    with pytest.raises(DataError) as e:
        retain.encode(R.load(p), tok, log=lambda m: None)
    assert str(e.value).startswith("data.retain = ") and "empty.jsonl" in str(e.value)
    assert "data.train" not in str(e.value)
