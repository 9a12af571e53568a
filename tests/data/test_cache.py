"""fastsft.data.cache: the tokenized data is cached under a fingerprint of everything that shapes it."""

from _tiny import (
    CHATML_NO_MARKERS,
    CONV,
    make_recipe,
    prepare,
    qa,
    write_jsonl,
)


def test_fingerprint_and_cache(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("FASTSFT_CACHE", str(tmp_path / "cache"))
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}, qa(1)])
    logs = []
    first = prepare(make_recipe(tmp_path), tok, log=logs.append)
    base = first.fingerprint
    assert (tmp_path / "cache" / "data" / base / "stats.json").exists()  # every shape is cached
    assert not any("from the cache" in m for m in logs)
    again = prepare(make_recipe(tmp_path), tok, log=logs.append)
    assert again.fingerprint == base and any("from the cache" in m for m in logs)
    assert again.train[:] == first.train[:] and again.stats == first.stats
    assert prepare(make_recipe(tmp_path, max_length=64), tok).fingerprint != base
    assert prepare(make_recipe(tmp_path, assistant_only_loss=False), tok).fingerprint != base
    (tmp_path / "plain.jinja").write_text(CHATML_NO_MARKERS, encoding="utf-8")
    logs = []
    first = prepare(make_recipe(tmp_path, chat_template="plain.jinja"), tok, log=logs.append)
    assert (tmp_path / "cache" / "data" / first.fingerprint / "stats.json").exists()
    again = prepare(make_recipe(tmp_path, chat_template="plain.jinja"), tok, log=logs.append)
    assert any("from the cache" in m for m in logs)
    assert again.fingerprint == first.fingerprint and again.train[:] == first.train[:]
    assert again.stats == first.stats
    # a changed template (same file name) never reuses the stale cache
    (tmp_path / "plain.jinja").write_text(
        CHATML_NO_MARKERS.replace("<|im_start|>' + message['role']", "<|im_start|>' + message['role'] + ':'"),
        encoding="utf-8",
    )
    changed = prepare(make_recipe(tmp_path, chat_template="plain.jinja"), tok)
    assert changed.fingerprint != first.fingerprint
    assert changed.train[0]["input_ids"] != first.train[0]["input_ids"]
    # changed data too
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}, qa(2)])
    assert prepare(make_recipe(tmp_path), tok).fingerprint != base
