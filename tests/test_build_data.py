"""build.data: generator determinism and structure, CSV round trip, loader errors, id remapping."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from recserve.build.data import (
    BEHAVIORS,
    CATEGORY_WORDS,
    DataError,
    GenConfig,
    generate,
    is_identity,
    load,
    write_id_maps,
)

SMALL = GenConfig(seed=3, n_users=300, n_items=400, n_categories=12, days=9)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("gen"), SMALL)


def test_generator_is_deterministic_per_seed(small: dict[str, Path], tmp_path: Path) -> None:
    again = generate(tmp_path / "again", SMALL)
    other = generate(tmp_path / "other", GenConfig(**{**SMALL.__dict__, "seed": 4}))
    for k in ("events", "catalog", "ground_truth"):
        assert small[k].read_bytes() == again[k].read_bytes(), k
    assert small["events"].read_bytes() != other["events"].read_bytes()


def test_layout_header_and_dense_ids(small: dict[str, Path]) -> None:
    with small["events"].open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
    ds = load(small["events"], small["catalog"])
    assert ds.n_events == len(rows) - 1
    assert ds.n_users == SMALL.n_users and ds.n_items == SMALL.n_items and ds.n_categories == SMALL.n_categories
    assert all(is_identity(m) for m in ds.id_maps.values())
    assert set(np.unique(ds.behavior).tolist()) == set(range(len(BEHAVIORS)))
    assert ds.ts.max() - ds.ts.min() <= SMALL.days * 86_400
    assert ds.ts.max() - ds.ts.min() > (SMALL.days - 1) * 86_400


def test_titles_unique_and_name_their_category(small: dict[str, Path]) -> None:
    ds = load(small["events"], small["catalog"])
    assert len(set(ds.titles[1:])) == ds.n_items
    for i in range(1, ds.n_items + 1):
        words = ds.titles[i].split()
        assert len(words) == 5
        assert CATEGORY_WORDS[ds.item_category[i] - 1] in words


def test_popularity_is_zipf_like(small: dict[str, Path]) -> None:
    ds = load(small["events"], small["catalog"])
    counts = np.sort(np.bincount(ds.item, minlength=ds.n_items + 1)[1:])[::-1]
    top = counts[: ds.n_items // 100].sum() / counts.sum()
    assert top > 5 * 0.01, f"top 1% of items get only {top:.1%} of events"
    ranks = np.arange(1, 51)
    slope = np.polyfit(np.log(ranks), np.log(counts[:50] + 1), 1)[0]
    assert -1.6 < slope < -0.4, slope


def test_preferred_categories_dominate_each_users_events(small: dict[str, Path]) -> None:
    ds = load(small["events"], small["catalog"])
    prefs = json.loads(small["ground_truth"].read_text())["user_preferred_categories"]
    shares, chance = [], []
    cat_share = np.bincount(ds.item_category[1:], minlength=ds.n_categories + 1) / ds.n_items
    for u in range(1, ds.n_users + 1):
        p = [int(c) for c in prefs[str(u)]]
        assert 1 <= len(p) <= 3
        shares.append(np.isin(ds.category[ds.user == u], p).mean())
        chance.append(cat_share[p].sum())
    assert np.mean(shares) > 0.75
    assert np.mean(shares) > 2.5 * np.mean(chance)


def test_csv_round_trip_without_header(small: dict[str, Path], tmp_path: Path) -> None:
    lines = small["events"].read_text().splitlines()
    bare = tmp_path / "UserBehavior.csv"
    bare.write_text("\n".join(lines[1:]) + "\n")  # the real Taobao file has no header
    a, b = load(small["events"], small["catalog"]), load(bare, small["catalog"])
    for k in ("user", "item", "category", "behavior", "ts"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    first = lines[1].split(",")
    k = int(np.flatnonzero((a.user == int(first[0])) & (a.ts == int(first[4])))[0])
    assert (a.item[k], a.category[k], BEHAVIORS[a.behavior[k]]) == (int(first[1]), int(first[2]), first[3])
    with small["catalog"].open() as f:
        cat_rows = list(csv.reader(f))[1:]
    assert [r[2] for r in cat_rows] == a.titles[1:]


GOOD = "1,10,3,pv,1511568000"


@pytest.mark.parametrize(
    ("bad", "rule"),
    [
        ("1,10,3,pv", "expected 5 columns"),
        ("1,10,3,pv,1511568000,9", "expected 5 columns"),
        ("-4,10,3,pv,1511568000", "user_id -4 is negative"),
        ("1,-10,3,pv,1511568000", "item_id -10 is negative"),
        ("1,x7,3,pv,1511568000", "item_id 'x7' is not an integer"),
        ("1,10,3,click,1511568000", "behavior_type 'click' is not one of pv, buy, cart, fav"),
        ("1,10,3,pv,15115680.5", "timestamp '15115680.5' is not an integer"),
        ("1,10,3,pv,tomorrow", "timestamp 'tomorrow' is not an integer"),
    ],
)
def test_loader_names_file_line_and_rule(tmp_path: Path, bad: str, rule: str) -> None:
    p = tmp_path / "events.csv"
    p.write_text("user_id,item_id,category_id,behavior_type,timestamp\n" + f"{GOOD}\n" * 15 + bad + "\n" + GOOD + "\n")
    with pytest.raises(DataError) as e:
        load(p)
    assert str(e.value).startswith("events.csv line 17: ")
    assert rule in str(e.value)


def test_catalog_errors(tmp_path: Path) -> None:
    ev = tmp_path / "events.csv"
    ev.write_text(GOOD + "\n")
    cat = tmp_path / "catalog.csv"
    cat.write_text("item_id,category_id,title\n10,3,red boots\n10,3,blue boots\n")
    with pytest.raises(DataError, match=r"catalog.csv line 3: item_id 10 appears twice"):
        load(ev, cat)
    cat.write_text("10,3,red, boots\n")
    with pytest.raises(DataError, match=r"catalog.csv line 1: expected 3 columns"):
        load(ev, cat)


def test_sparse_ids_are_remapped_to_dense_ranges(tmp_path: Path) -> None:
    ev = tmp_path / "events.csv"
    ev.write_text("1000,900,77,pv,30\n5,42,12,buy,10\n1000,42,12,cart,20\n77,900,77,fav,5\n")
    cat = tmp_path / "catalog.csv"
    cat.write_text('item_id,category_id,title\n42,12,"red, leather boots"\n900,77,blue mug\n3,12,grey sock\n')
    ds = load(ev, cat)
    assert ds.id_maps["user"] == {5: 1, 77: 2, 1000: 3}
    assert ds.id_maps["item"] == {3: 1, 42: 2, 900: 3}  # catalogue-only item 3 keeps a dense id
    assert ds.id_maps["category"] == {12: 1, 77: 2}
    assert not is_identity(ds.id_maps["user"])
    assert (ds.n_users, ds.n_items, ds.n_categories) == (3, 3, 2)
    # events sorted by user then time, in dense ids
    assert ds.user.tolist() == [1, 2, 3, 3]
    assert ds.item.tolist() == [2, 3, 2, 3]
    assert ds.ts.tolist() == [10, 5, 20, 30]
    assert ds.titles == ["", "grey sock", "red, leather boots", "blue mug"]
    assert ds.item_category.tolist() == [0, 1, 1, 2]
    write_id_maps(ds, tmp_path / "maps")
    assert (tmp_path / "maps" / "user_map.csv").read_text() == "original_id,dense_id\n5,1\n77,2\n1000,3\n"


def test_items_without_catalogue_get_category_titles(tmp_path: Path) -> None:
    ev = tmp_path / "events.csv"
    ev.write_text("1,900,77,pv,30\n2,42,12,buy,10\n")
    ds = load(ev)
    assert ds.titles == ["", "c12", "c77"]
