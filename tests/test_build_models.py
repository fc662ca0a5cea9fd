"""build.models/export/train helpers: serving graphs honour their contract in torch and in ONNX Runtime."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
import torch

from recserve.build.export import contract, export_onnx, ort_session, parity
from recserve.build.models import (
    EXCLUDE_LEN,
    HISTORY_LEN,
    BSTRanker,
    RankerGraph,
    RetrievalGraph,
    SearchGraph,
    SearchModel,
    TwoTower,
)
from recserve.build.reference import latest_version_dir, served_module
from recserve.build.train import TOKENIZER_PATH, auc, load_tokenizer, pad_left

N_USERS, N_ITEMS, N_CAT = 30, 1200, 6
BIG = np.iinfo(np.int64).max


@pytest.fixture(scope="module")
def cats() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.randint(1, N_CAT + 1, (N_ITEMS,))])


@pytest.fixture(scope="module")
def tok() -> ModuleType:
    return load_tokenizer()


def _retrieval_feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    b = 8
    hist = np.zeros((b, HISTORY_LEN), np.int64)
    excl = np.zeros((b, EXCLUDE_LEN), np.int64)
    for r in range(1, b):
        items = rng.choice(np.arange(1, N_ITEMS + 1), 10 * r, replace=False)
        hist[r] = pad_left(items, HISTORY_LEN)
        excl[r, : len(items)] = items
    excl[2, :3] = [-1, N_ITEMS + 1, BIG]  # bad ids must not break anything
    excl[3] = np.arange(1, EXCLUDE_LEN + 1)  # the maximum exclusion
    hist[4, -2:] = [-7, BIG]
    users = np.array([[0], [1], [N_USERS], [N_USERS + 1], [-5], [BIG], [3], [4]], np.int64)
    return {"user_id": users, "history": hist, "exclude": excl}


def test_retrieval_graph_contract_exclusion_and_onnx_parity(cats: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(1)
    graph = RetrievalGraph(TwoTower(N_USERS, N_ITEMS, cats, dim=8)).eval()
    feeds = _retrieval_feeds(np.random.default_rng(0))
    with torch.no_grad():
        ids, scores = graph(*(torch.from_numpy(feeds[k]) for k in ("user_id", "history", "exclude")))
    assert ids.shape == (8, 100) and scores.dtype == torch.float32 and ids.dtype == torch.int64
    for r in range(8):
        row = ids[r].tolist()
        assert 0 not in row and len(set(row)) == 100
        assert not set(row) & set(feeds["exclude"][r].tolist())
        assert torch.isfinite(scores[r]).all() and (scores[r][:-1] >= scores[r][1:]).all()
    # unknown ids (0, > N, negative, huge) all mean "unknown user": identical answers for the same history
    same_hist = {k: np.repeat(v[:1], 4, axis=0) for k, v in feeds.items()}
    same_hist["user_id"] = np.array([[0], [N_USERS + 1], [-5], [BIG]], np.int64)
    with torch.no_grad():
        ids_u, _ = graph(*(torch.from_numpy(same_hist[k]) for k in ("user_id", "history", "exclude")))
    assert all(torch.equal(ids_u[0], ids_u[i]) for i in range(1, 4))

    path = export_onnx(
        graph,
        "retrieval",
        tuple(torch.from_numpy(feeds[k][:2]) for k in ("user_id", "history", "exclude")),
        tmp_path / "retrieval.onnx",
    )
    c = contract(path)
    assert c["inputs"] == [
        {"name": "user_id", "data_type": "TYPE_INT64", "dims": [-1, 1]},
        {"name": "history", "data_type": "TYPE_INT64", "dims": [-1, HISTORY_LEN]},
        {"name": "exclude", "data_type": "TYPE_INT64", "dims": [-1, EXCLUDE_LEN]},
    ]
    assert c["outputs"] == [
        {"name": "cand_ids", "data_type": "TYPE_INT64", "dims": [-1, 100]},
        {"name": "cand_scores", "data_type": "TYPE_FP32", "dims": [-1, 100]},
    ]
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"TopK", "ScatterElements"} <= ops and not ops & {"EmbeddingBag", "Loop", "If", "NonZero"}
    p = parity(graph, "retrieval", path, feeds)
    assert p.passed and p.topk_ids_identical and p.max_abs_diff <= 1e-4


def test_ranker_graph_scores_every_candidate_and_matches_onnx(cats: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(2)
    words = torch.randint(0, 40, (N_ITEMS + 1, 8))
    words[0] = 0
    graph = RankerGraph(BSTRanker(N_ITEMS, cats, words, dim=16, heads=2)).eval()
    rng = np.random.default_rng(1)
    hist = np.zeros((5, HISTORY_LEN), np.int64)  # row 0: empty history (the warmup request)
    hist[1, -1] = 5
    hist[2] = rng.integers(1, N_ITEMS + 1, HISTORY_LEN)
    hist[3, -3:] = [-1, BIG, 9]
    hist[4, -20:] = rng.integers(1, N_ITEMS + 1, 20)
    cand = rng.integers(1, N_ITEMS + 1, (5, 100))
    cand[0] = 0
    feeds = {"history": hist, "candidates": cand}
    with torch.no_grad():
        s = graph(torch.from_numpy(hist), torch.from_numpy(cand))
    assert s.shape == (5, 100) and torch.isfinite(s).all() and ((s > 0) & (s < 1)).all()
    # a candidate's score does not depend on the other candidates of the request
    with torch.no_grad():
        s_perm = graph(torch.from_numpy(hist), torch.from_numpy(cand[:, ::-1].copy()))
    assert torch.allclose(s, s_perm.flip(1), atol=1e-6)
    path = export_onnx(graph, "ranker", (torch.from_numpy(hist[:2]), torch.from_numpy(cand[:2])), tmp_path / "r.onnx")
    assert contract(path)["outputs"] == [{"name": "scores", "data_type": "TYPE_FP32", "dims": [-1, 100]}]
    p = parity(graph, "ranker", path, feeds)
    assert p.passed and p.max_abs_diff <= 1e-4


def test_search_graph_matches_titles_and_never_returns_item_zero(
    cats: torch.Tensor, tok: ModuleType, tmp_path: Path
) -> None:
    colours, nouns = ["red", "blue", "green", "black"], ["boots", "mug", "lamp", "sofa", "tent", "drone"]
    titles = [""] + [
        f"{c} {n} brand{i % 7}"
        for i, (c, n) in enumerate(itertools.islice(itertools.cycle(itertools.product(colours, nouns)), N_ITEMS))
    ]
    title_tokens = torch.tensor([tok.encode(t) for t in titles])
    lift = torch.zeros(N_USERS + 1, N_CAT + 1)
    torch.manual_seed(3)
    # distinct popularity biases, as after training: with exact ties (an empty query on an all-zero bias)
    # torch.topk and ONNX TopK (lower index first) may order equal scores differently
    log_pop = torch.rand(N_ITEMS + 1) * 3
    model = SearchModel(N_USERS, N_ITEMS, title_tokens, tok.NUM_BUCKETS, cats, lift, dim=32, log_popularity=log_pop)
    model.eval()
    graph = SearchGraph(model).eval()
    queries = ["red boots", "Blue MUG!", "", "zzzz unknown words", "green"]
    tokens = np.array([tok.encode(q) for q in queries], np.int64)
    tokens[3, 3] = BIG
    users = np.array([[0], [1], [0], [N_USERS + 9], [-2]], np.int64)
    with torch.no_grad():
        ids, scores = graph(torch.from_numpy(tokens), torch.from_numpy(users))
    assert ids.shape == (5, 20) and (ids > 0).all() and torch.isfinite(scores).all()
    # untrained, the shared word table already makes exact word matches win
    assert all({"red", "boots"} <= set(titles[i].split()) for i in ids[0, :10].tolist())
    assert all("green" in titles[i].split() for i in ids[4, :10].tolist())
    path = export_onnx(
        graph, "search_model", (torch.from_numpy(tokens[:2]), torch.from_numpy(users[:2])), tmp_path / "s.onnx"
    )
    p = parity(graph, "search_model", path, {"tokens": tokens, "user_id": users})
    assert p.passed and p.topk_ids_identical
    out = ort_session(path).run(None, {"tokens": tokens[:1], "user_id": users[:1]})
    assert out[0].shape == (1, 20) and out[0].dtype == np.int64


def test_tokenizer_is_the_served_file(tok: ModuleType) -> None:
    assert Path(tok.__file__).resolve() == TOKENIZER_PATH.resolve()
    assert TOKENIZER_PATH.parts[-4:] == ("model_repository", "search_pre", "1", "tokenizer.py")
    ids = tok.encode("Red leather, BOOTS!")
    assert len(ids) == tok.MAX_TOKENS and ids[:3] == [tok.hash_token(w) for w in ("red", "leather", "boots")]


def test_history_shaping_of_recommend_pre() -> None:
    shaping = served_module(latest_version_dir(TOKENIZER_PATH.parents[2], "recommend_pre") / "shaping.py")
    shape_history = shaping.shape_row
    h50, excl = shape_history(np.array([0, 5, 0, 6, 7]))
    assert h50[-3:].tolist() == [5, 6, 7] and not h50[:-3].any()
    assert excl[:3].tolist() == [5, 6, 7] and not excl[3:].any()
    long = list(range(1, 1001))
    h50, excl = shape_history(np.array(long))
    assert h50.tolist() == long[-50:] and excl.tolist() == long
    assert pad_left([1, 2, 3], 5).tolist() == [0, 0, 1, 2, 3] and pad_left(list(range(9)), 4).tolist() == [5, 6, 7, 8]


def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(5)
    s = rng.integers(0, 5, 200).astype(float)  # many ties
    y = (rng.random(200) < 0.3).astype(float)
    pos, neg = s[y == 1], s[y == 0]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auc(s, y) == pytest.approx(brute)
