"""Payloads come from the data: real ids, real history lengths, real title words; JSON perf_analyzer reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recserve.perf import inputs


@pytest.fixture()
def corpus(tmp_path: Path) -> inputs.Corpus:
    (tmp_path / "events.csv").write_text(
        "user_id,item_id,category_id,behavior_type,timestamp\n"
        + "".join(f"7,{100 + i},1,pv,{1000 + i}\n" for i in range(60))
        + "9,5,2,buy,50\n9,6,2,pv,40\n"
    )
    (tmp_path / "catalog.csv").write_text(
        "item_id,category_id,title\n5,2,red leather boots acme\n6,2,blue wool coat nova\n"
        + "".join(f"{100 + i},1,grey steel lamp orbit\n" for i in range(60))
    )
    return inputs.load_corpus(tmp_path)


def test_corpus_orders_each_users_items_by_time(corpus):
    assert corpus.sequences[9] == [6, 5]
    assert corpus.sequences[7][:3] == [100, 101, 102]


def test_missing_data_names_the_file(tmp_path):
    with pytest.raises(inputs.InputError, match="events.csv not found"):
        inputs.load_corpus(tmp_path)


def test_recommend_rows_are_real_prefixes(corpus):
    rows = inputs.samples("recommend", corpus, 50)
    for r in rows:
        user = int(r["user_id"][0])
        hist = r["history"].tolist()
        assert user in (7, 9) and 1 <= len(hist) and hist == corpus.sequences[user][: len(hist)]
    assert len({len(r["history"]) for r in rows}) > 3  # lengths vary like the data, not one fixed size


def test_model_rows_have_config_shapes_and_known_ids(corpus):
    ret = inputs.samples("retrieval", corpus, 10)[0]
    assert ret["history"].shape == (50,) and ret["exclude"].shape == (1000,) and ret["user_id"].shape == (1,)
    rank = inputs.samples("ranker", corpus, 10)
    known = set(corpus.item_popularity) | {0}
    for r in rank:
        assert r["candidates"].shape == (100,) and set(r["candidates"].tolist()) <= known
        assert r["history"].dtype == np.int64 and r["history"][-1] != 0  # right-aligned, most recent last
    sm = inputs.samples("search_model", corpus, 10)[0]
    assert sm["tokens"].shape == (16,) and sm["tokens"][0] > 0


def test_queries_are_words_of_titles(corpus):
    words = {w for t in corpus.titles for w in t.split()}
    for r in inputs.samples("search", corpus, 30):
        q = r["query"][0].decode()
        assert q and set(q.split()) <= words


def test_input_data_json_carries_shape_for_variable_inputs(corpus, tmp_path):
    rows = inputs.samples("recommend", corpus, 5)
    path = inputs.write_input_data(rows, tmp_path / "r.json", variable=("history",))
    doc = json.loads(path.read_text())
    first = doc["data"][0]
    assert first["history"]["shape"] == [len(rows[0]["history"])]
    assert first["history"]["content"] == rows[0]["history"].tolist()
    assert first["user_id"] == rows[0]["user_id"].tolist()
    s = inputs.write_input_data(inputs.samples("search", corpus, 2), tmp_path / "s.json")
    assert isinstance(json.loads(s.read_text())["data"][0]["query"][0], str)


def test_batch_wraps_and_stacks(corpus):
    rows = inputs.samples("ranker", corpus, 3)
    b = inputs.batch(rows, 2, 4)
    assert b["candidates"].shape == (4, 100)
    assert (b["candidates"][1] == rows[0]["candidates"]).all()


def test_unknown_target_is_refused(corpus):
    with pytest.raises(inputs.InputError, match="no payload recipe"):
        inputs.samples("nope", corpus)
