"""Served answers: equal to the in-process pipeline, and good on data whose structure we know.

The generator plants user category preferences and titles made of category and attribute words
(``artifacts/data/ground_truth.json``, ``catalog.csv``), so quality is checked against that truth.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict

import numpy as np
import pytest

from recserve.build.reference import Reference
from recserve.control.client import RecClient
from recserve.control.runtime.triton import DEFAULT_REPOSITORY, REPO_ROOT

DATA = REPO_ROOT / "artifacts" / "data"
GOLDEN = REPO_ROOT / "artifacts" / "golden.json"


@pytest.fixture(scope="module")
def data():
    if not (DATA / "ground_truth.json").exists():
        pytest.skip(f"no generated data in {DATA}: run 'make models'")
    truth = json.loads((DATA / "ground_truth.json").read_text())
    with (DATA / "catalog.csv").open() as f:
        catalog = {int(r["item_id"]): (int(r["category_id"]), r["title"]) for r in csv.DictReader(f)}
    histories: dict[int, list[int]] = defaultdict(list)
    with (DATA / "events.csv").open() as f:
        for r in sorted(csv.DictReader(f), key=lambda r: int(r["timestamp"])):
            histories[int(r["user_id"])].append(int(r["item_id"]))
    return truth, catalog, histories


@pytest.fixture(scope="module")
def reference():
    return Reference.latest(DEFAULT_REPOSITORY)


@pytest.fixture(scope="module")
def client(server):
    with RecClient(server.grpc_url) as c:
        yield c


def test_served_recommend_equals_in_process_pipeline(client, reference, data):
    _, _, histories = data
    cases = [(u, histories[u][-k:]) for u, k in zip(list(histories)[:12], [0, 1, 5, 50, 80, 300] * 2, strict=True)]
    cases += [(10**9, []), (10**9, list(histories[1][-10:]))]
    if GOLDEN.exists():
        cases += [(g["user_id"], g["history"]) for g in json.loads(GOLDEN.read_text()).get("recommend", [])]
    for user, history in cases:
        served = client.recommend(user, history)
        ids, scores = reference.recommend(user, history)
        assert served.item_ids == ids.tolist(), f"user {user}, history of {len(history)}"
        np.testing.assert_allclose(served.scores, scores, atol=1e-4)


def test_served_search_equals_in_process_pipeline(client, reference, data):
    _, catalog, _ = data
    titles = [t for _, t in list(catalog.values())[:10]]
    cases = [(" ".join(t.split()[:2]), None) for t in titles] + [(titles[0], 7), ("Red BOOTS!", None), ("näive", 3)]
    if GOLDEN.exists():
        cases += [(g["query"], g.get("user_id")) for g in json.loads(GOLDEN.read_text()).get("search", [])]
    for query, user in cases:
        served = client.search(query, user)
        ids, scores = reference.search(query, user)
        assert served.item_ids == ids.tolist(), query
        np.testing.assert_allclose(served.scores, scores, atol=1e-4)


def test_recommend_prefers_the_users_categories_3x_over_random(client, data):
    truth, catalog, histories = data
    weights = {int(u): {int(c): w for c, w in cw.items()} for u, cw in truth["user_preferred_categories"].items()}
    prefs = {u: set(cw) for u, cw in weights.items()}
    # clear preference: one category carries at least 60% of the user's planted interest
    clear = [u for u, cw in weights.items() if max(cw.values()) >= 0.6 and len(histories.get(u, [])) >= 5][:60]
    assert len(clear) >= 20, "too few users with a clear preference in the generated data"
    share_in_pref, share_random = [], []
    cat_count = defaultdict(int)
    for cat, _ in catalog.values():
        cat_count[cat] += 1
    for u in clear:
        result = client.recommend(u, histories[u][-50:])
        share_in_pref.append(np.mean([catalog[i][0] in prefs[u] for i in result.item_ids]))
        share_random.append(sum(cat_count[c] for c in prefs[u]) / len(catalog))
    lift = np.mean(share_in_pref) / np.mean(share_random)
    assert lift >= 3.0, f"preferred-category share {np.mean(share_in_pref):.2f} is only {lift:.1f}x random"


def test_search_finds_title_words_in_top10_for_90_percent(client, data):
    _, catalog, _ = data
    rng = np.random.default_rng(1234)  # not the training seed: fresh queries
    items = rng.choice(sorted(catalog), 200, replace=False)
    hits = 0
    for item in items:
        words = catalog[int(item)][1].lower().split()
        picked = list(rng.choice(words, min(2, len(words)), replace=False))
        result = client.search(" ".join(picked))
        titles = [set(catalog[i][1].lower().split()) for i in result.item_ids[:10]]
        hits += any(set(picked) <= t for t in titles)
    assert hits / len(items) >= 0.9, f"only {hits}/{len(items)} queries found an item with their words in the top 10"
