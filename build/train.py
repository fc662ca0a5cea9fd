"""Training and offline evaluation of the three models on a time-based split.

Why a time split: the served models predict the future from the past, so the last ``holdout_days`` of
events are held out and every metric is computed on them, each next to a baseline that the model must beat.
Everything is seeded and sized so that all three models train on 2 CPU cores in about a minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recserve.build.data import BEHAVIOR_CODE, Dataset
from recserve.build.models import HISTORY_LEN, BSTRanker, RetrievalGraph, SearchGraph, SearchModel, TwoTower
from recserve.build.reference import served_module
from recserve.control.defaults import REPO_ROOT

TOKENIZER_PATH = REPO_ROOT / "model_repository" / "search_pre" / "1" / "tokenizer.py"
MIN_ITEMS = 1101  # the retrieval graph excludes up to 1000 items and must still return 100

Progress = Callable[[str, int, int], None]


def load_tokenizer(path: Path = TOKENIZER_PATH) -> ModuleType:
    """Import the served tokenizer file itself (not a copy), so training and serving cannot drift."""
    return served_module(path)


@dataclass(frozen=True)
class HParams:
    """Hyper-parameters; part of the training cache key."""

    holdout_days: float = 1.5
    retr_dim: int = 64
    retr_epochs: int = 3
    retr_batch: int = 512
    retr_lr: float = 5e-3
    user_dropout: float = 0.15
    history_dropout: float = 0.1
    rank_dim: int = 32
    rank_heads: int = 2
    rank_epochs: int = 3
    rank_batch: int = 256
    rank_negatives: int = 4
    rank_lr: float = 5e-3
    search_dim: int = 64
    search_epochs: int = 5
    search_batch: int = 512
    search_lr: float = 5e-3
    search_title_queries_per_item: int = 3
    search_uniform_frac: float = 0.25
    max_eval: int = 6000

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ data shaping


def pad_left(seq: list[int] | np.ndarray, length: int) -> np.ndarray:
    """Last ``length`` ids, right-aligned (most recent last), left-padded with 0."""
    s = np.asarray(seq, dtype=np.int64)[-length:] if length else np.zeros(0, np.int64)
    out = np.zeros(length, dtype=np.int64)
    if len(s):
        out[length - len(s) :] = s
    return out


@dataclass
class Split:
    """Per-user chronological item sequences (consecutive repeats collapsed) before/after the cutoff."""

    cutoff: int
    train_seq: dict[int, list[int]]
    test_seq: dict[int, list[int]]
    train_pop: np.ndarray  # (n_items + 1,) interaction counts in the training period
    train_buys: list[tuple[int, int]]  # (user, item) of cart/buy/fav events in the training period
    test_buys: list[tuple[int, int]]


def make_split(ds: Dataset, holdout_days: float) -> Split:
    cutoff = int(ds.ts.max() - holdout_days * 86_400)
    keep = np.ones(ds.n_events, dtype=bool)
    keep[1:] = (ds.user[1:] != ds.user[:-1]) | (ds.item[1:] != ds.item[:-1])
    train_seq: dict[int, list[int]] = {}
    test_seq: dict[int, list[int]] = {}
    for u, i, t in zip(ds.user[keep].tolist(), ds.item[keep].tolist(), ds.ts[keep].tolist(), strict=True):
        (train_seq if t <= cutoff else test_seq).setdefault(u, []).append(i)
    is_train = ds.ts <= cutoff
    pop = np.bincount(ds.item[is_train], minlength=ds.n_items + 1).astype(np.float64)
    strong = ds.behavior != BEHAVIOR_CODE["pv"]
    train_buys = list(zip(ds.user[strong & is_train].tolist(), ds.item[strong & is_train].tolist(), strict=True))
    test_buys = list(zip(ds.user[strong & ~is_train].tolist(), ds.item[strong & ~is_train].tolist(), strict=True))
    return Split(cutoff, train_seq, test_seq, pop, train_buys, test_buys)


def next_item_examples(
    seqs: dict[int, list[int]], prefix: dict[int, list[int]] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, history50, target) for every position whose item is new to the user (what serving
    recommends: the history is excluded). ``prefix`` holds earlier events (train seq for test examples)."""
    users, hists, targets = [], [], []
    for u, seq in seqs.items():
        before = list(prefix.get(u, [])) if prefix else []
        seen = set(before)
        for i in seq:
            if i not in seen:
                users.append(u)
                hists.append(pad_left(before, HISTORY_LEN))
                targets.append(i)
                seen.add(i)
            before.append(i)
    if not users:
        return np.zeros(0, np.int64), np.zeros((0, HISTORY_LEN), np.int64), np.zeros(0, np.int64)
    return np.asarray(users, np.int64), np.stack(hists), np.asarray(targets, np.int64)


def item_word_matrix(ds: Dataset, tok: ModuleType, max_words: int = 8) -> torch.Tensor:
    """(n_items + 1, max_words) compact title-word ids (1..V, 0 = padding): item side features."""
    words = [tok.tokenize(t)[:max_words] for t in ds.titles]
    vocab = {w: k for k, w in enumerate(sorted({w for ws in words for w in ws}), start=1)}
    out = torch.zeros(len(words), max_words, dtype=torch.long)
    for r, ws in enumerate(words):
        out[r, : len(ws)] = torch.tensor([vocab[w] for w in ws], dtype=torch.long)
    return out


class NegativeSampler:
    """Ranker negatives: half by smoothed popularity, half from the positive's category (hard negatives,
    like retrieval candidates, which mostly share the history's categories)."""

    def __init__(self, ds: Dataset, pop: np.ndarray) -> None:
        w = (pop + 1.0) ** 0.75
        w[0] = 0.0
        self.cum = np.cumsum(w) / w.sum()
        cats = ds.item_category[1:]
        order = np.argsort(cats, kind="stable")
        self.items_by_cat = order + 1
        keys = np.zeros(len(order))
        for c in np.unique(cats):
            seg = np.flatnonzero(cats[order] == c)
            keys[seg] = c + np.cumsum(w[order[seg] + 1]) / w[order[seg] + 1].sum()
        self.keys = keys
        self.item_category = ds.item_category

    def sample(self, pos: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        b = len(pos)
        n_pop = n - n // 2
        by_pop = np.searchsorted(self.cum, rng.random((b, n_pop)), side="right")
        c = self.item_category[pos][:, None] + rng.random((b, n // 2))
        idx = np.minimum(np.searchsorted(self.keys, c, side="right"), len(self.keys) - 1)
        same_cat = self.items_by_cat[idx]
        out = np.concatenate([by_pop, same_cat], axis=1).astype(np.int64)
        clash = out == pos[:, None]
        out[clash] = np.searchsorted(self.cum, rng.random(int(clash.sum())), side="right")
        return np.clip(out, 1, len(self.cum) - 1)


def length_buckets(lengths: np.ndarray, batch: int, rng: np.random.Generator, chunk: int = 32) -> list[np.ndarray]:
    """Shuffled batches of similar history length (sorted within chunks of ``chunk`` batches), so a
    batch can drop its all-padding columns: ~3x less ranker work on typical (short) histories."""
    perm = rng.permutation(len(lengths))
    out = []
    for s in range(0, len(perm), batch * chunk):
        part = perm[s : s + batch * chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        out.extend(part[k : k + batch] for k in range(0, len(part), batch))
    return [out[k] for k in rng.permutation(len(out))]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum statistic, ties counted half."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2.0 + 1.0
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    pos = labels.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / max(n_pos * n_neg, 1))


def _fit(model: nn.Module, lr: float, steps: int, losses: Iterator[torch.Tensor], name: str,
         progress: Progress | None) -> None:
    """The training loop the three trainers share: Adam with a one-cycle schedule over ``steps`` batches.

    ``losses`` yields one batch's loss at a time and is advanced only after the previous step, so each
    forward pass sees the weights the last step left (the trainers own their sampling and loss).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    for done, loss in enumerate(losses, 1):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(name, done, steps)


# -------------------------------------------------------------------------------------------- retrieval


def train_retrieval(
    model: TwoTower, ds: Dataset, sp: Split, hp: HParams, seed: int, progress: Progress | None = None
) -> TwoTower:
    """Full softmax over the catalogue (the exact form of sampled softmax: cheap for a few thousand items),
    history items masked out as serving excludes them; user ids dropped to 0 and histories emptied at
    random so the unknown-user row and the popularity bias learn cold start."""
    torch.manual_seed(seed + 1)
    rng = np.random.default_rng(seed + 1)
    users, hists, targets = next_item_examples(sp.train_seq)
    n = len(users)
    steps = hp.retr_epochs * ((n + hp.retr_batch - 1) // hp.retr_batch)

    def losses() -> Iterator[torch.Tensor]:
        for _ in range(hp.retr_epochs):
            perm = rng.permutation(n)
            for s in range(0, n, hp.retr_batch):
                b = perm[s : s + hp.retr_batch]
                u = users[b].copy()
                u[rng.random(len(b)) < hp.user_dropout] = 0
                h = hists[b].copy()
                h[rng.random(len(b)) < hp.history_dropout] = 0
                ht = torch.from_numpy(h)
                logits = model.logits(model.user_vec(torch.from_numpy(u), ht))
                logits = logits.scatter(1, ht, -1e9)  # history items masked (serving excludes them)
                logits[:, 0] = -1e9
                yield F.cross_entropy(logits, torch.from_numpy(targets[b]))

    _fit(model, hp.retr_lr, steps, losses(), "retrieval", progress)
    model.eval()
    with torch.no_grad():  # users never seen in training behave exactly like the unknown user
        unseen = torch.ones(ds.n_users + 1, dtype=torch.bool)
        unseen[torch.from_numpy(np.unique(users))] = False
        unseen[0] = False
        model.user_emb.weight[unseen] = model.user_emb.weight[0].clone()
    return model


def retrieval_eval_requests(sp: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[set[int]]]:
    """Held-out users with new items: (user, history50, exclude1000, target sets)."""
    users, hists, excls, targets = [], [], [], []
    for u, seq in sorted(sp.test_seq.items()):
        before = sp.train_seq.get(u, [])
        t = set(seq) - set(before)
        if not t:
            continue
        users.append(u)
        hists.append(pad_left(before, HISTORY_LEN))
        excls.append(pad_left(before, 1000))
        targets.append(t)
    return np.asarray(users, np.int64), np.stack(hists), np.stack(excls), targets


def _recall(top: np.ndarray, targets: list[set[int]], k: int) -> float:
    return float(np.mean([len(set(row[:k].tolist()) & t) / len(t) for row, t in zip(top, targets, strict=True)]))


def eval_retrieval(model: TwoTower, sp: Split, hp: HParams) -> dict[str, float]:
    users, hists, excls, targets = retrieval_eval_requests(sp)
    users, hists, excls, targets = (
        users[: hp.max_eval],
        hists[: hp.max_eval],
        excls[: hp.max_eval],
        targets[: hp.max_eval],
    )
    graph = RetrievalGraph(model).eval()
    with torch.no_grad():
        ids, _ = graph(torch.from_numpy(users[:, None]), torch.from_numpy(hists), torch.from_numpy(excls))
        ids_cold, _ = graph(
            torch.zeros(len(users), 1, dtype=torch.long), torch.from_numpy(hists), torch.from_numpy(excls)
        )
    pop_rank = np.argsort(-sp.train_pop[1:], kind="stable") + 1
    base = np.stack([pop_rank[:1100][~np.isin(pop_rank[:1100], e)][:50] for e in excls])
    return {
        "recall@50": round(_recall(ids.numpy(), targets, 50), 4),
        "recall@50_as_unknown_user": round(_recall(ids_cold.numpy(), targets, 50), 4),
        "baseline_popularity_recall@50": round(_recall(base, targets, 50), 4),
        "eval_users": len(users),
    }


# ----------------------------------------------------------------------------------------------- ranker


def train_ranker(
    model: BSTRanker, ds: Dataset, sp: Split, hp: HParams, seed: int, progress: Progress | None = None
) -> BSTRanker:
    """Binary cross-entropy: the next new item against sampled negatives (popular + same category)."""
    torch.manual_seed(seed + 11)
    rng = np.random.default_rng(seed + 11)
    _, hists, targets = next_item_examples(sp.train_seq)
    sampler = NegativeSampler(ds, sp.train_pop)
    n = len(targets)
    steps = hp.rank_epochs * ((n + hp.rank_batch - 1) // hp.rank_batch)
    labels = torch.zeros(1, 1 + hp.rank_negatives)
    labels[0, 0] = 1.0
    lengths = (hists > 0).sum(1)

    def losses() -> Iterator[torch.Tensor]:
        for _ in range(hp.rank_epochs):
            for b in length_buckets(lengths, hp.rank_batch, rng):
                pos = targets[b]
                cands = np.concatenate([pos[:, None], sampler.sample(pos, hp.rank_negatives, rng)], axis=1)
                width = max(int(lengths[b].max()), 1)  # right-aligned: the left columns are all padding
                logits = model(torch.from_numpy(hists[b, HISTORY_LEN - width :]), torch.from_numpy(cands))
                yield F.binary_cross_entropy_with_logits(logits, labels.expand_as(logits))

    _fit(model, hp.rank_lr, steps, losses(), "ranker", progress)
    return model.eval()


def ranker_eval_set(ds: Dataset, sp: Split, hp: HParams, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out (history50, candidates = [positive, negatives...], labels), fixed by the seed."""
    rng = np.random.default_rng(seed + 12)
    _, hists, targets = next_item_examples(sp.test_seq, prefix=sp.train_seq)
    if len(targets) > hp.max_eval:
        keep = np.sort(rng.choice(len(targets), hp.max_eval, replace=False))
        hists, targets = hists[keep], targets[keep]
    negs = NegativeSampler(ds, sp.train_pop).sample(targets, hp.rank_negatives, rng)
    cands = np.concatenate([targets[:, None], negs], axis=1)
    labels = np.zeros_like(cands, dtype=np.float64)
    labels[:, 0] = 1.0
    return hists, cands, labels


def eval_ranker(model: BSTRanker, ds: Dataset, sp: Split, hp: HParams, seed: int) -> dict[str, float]:
    hists, cands, labels = ranker_eval_set(ds, sp, hp, seed)
    with torch.no_grad():
        scores = torch.cat(
            [
                model(torch.from_numpy(hists[s : s + 1024]), torch.from_numpy(cands[s : s + 1024]))
                for s in range(0, len(cands), 1024)
            ]
        ).numpy()
    pop = sp.train_pop[cands]
    # A non-sequence baseline that still knows the user's taste: share of the history in the candidate's
    # category (ties broken by popularity).
    hcat = ds.item_category[hists]
    ccat = ds.item_category[cands]
    share = (hcat[:, None, :] == ccat[:, :, None]).sum(-1) / np.maximum((hists > 0).sum(1), 1)[:, None]
    return {
        "auc": round(auc(scores.ravel(), labels.ravel()), 4),
        "baseline_popularity_auc": round(auc(pop.ravel(), labels.ravel()), 4),
        "baseline_history_category_auc": round(auc((share + 1e-6 * pop / pop.max()).ravel(), labels.ravel()), 4),
        "eval_examples": len(cands),
    }


# ----------------------------------------------------------------------------------------------- search


def title_token_matrix(ds: Dataset, tok: ModuleType) -> torch.Tensor:
    """(n_items + 1, MAX_TOKENS) hashed title tokens exactly as the served tokenizer encodes them."""
    return torch.tensor([tok.encode(t) for t in ds.titles], dtype=torch.long)


def user_category_lift(ds: Dataset, sp: Split, alpha: float = 5.0) -> torch.Tensor:
    """(n_users + 1, n_categories + 1): log of the user's smoothed share of training events in each category
    over the global share; 0 for user 0 and for users without training events (no personalisation)."""
    n_cat = int(ds.item_category.max()) + 1
    counts = np.zeros((ds.n_users + 1, n_cat))
    for u, seq in sp.train_seq.items():
        np.add.at(counts[u], ds.item_category[np.asarray(seq)], 1.0)
    glob = (counts.sum(0) + 1.0) / (counts.sum() + n_cat)
    n_u = counts.sum(1, keepdims=True)
    lift = np.log((counts + alpha * glob) / (n_u + alpha) / glob)
    lift[n_u[:, 0] == 0] = 0.0
    lift[:, 0] = 0.0
    return torch.from_numpy(lift).float()


def _query_tokens(
    title_hashes: list[list[int]], items: np.ndarray, rng: np.random.Generator, max_tokens: int, sizes: np.ndarray
) -> np.ndarray:
    out = np.zeros((len(items), max_tokens), dtype=np.int64)
    for r, (i, k) in enumerate(zip(items.tolist(), sizes.tolist(), strict=True)):
        h = title_hashes[i]
        if h:
            pick = rng.permutation(len(h))[: max(1, min(k, len(h)))]
            out[r, : len(pick)] = np.asarray(h)[pick]
    return out


QUERY_SIZES = np.array([1, 2, 3, 4, 5])
QUERY_SIZE_P = np.array([0.15, 0.35, 0.3, 0.15, 0.05])


def train_search(
    model: SearchModel,
    ds: Dataset,
    sp: Split,
    hp: HParams,
    seed: int,
    tok: ModuleType,
    progress: Progress | None = None,
) -> SearchModel:
    """Full softmax over items for (subset of a title's words -> that item) pairs, items drawn partly
    uniformly (every title learned) and partly by popularity (the bias learns popularity), plus
    (words of an item a user carted/bought, user) -> item pairs for the personalisation term."""
    torch.manual_seed(seed + 21)
    rng = np.random.default_rng(seed + 21)
    title_hashes = [[tok.hash_token(w) for w in tok.tokenize(t)][: tok.MAX_TOKENS] for t in ds.titles]
    p_pop = sp.train_pop[1:] / max(sp.train_pop[1:].sum(), 1.0)
    n_title = hp.search_title_queries_per_item * ds.n_items
    buys = np.asarray(sp.train_buys, dtype=np.int64).reshape(-1, 2)
    n = n_title + len(buys)
    steps = hp.search_epochs * ((n + hp.search_batch - 1) // hp.search_batch)

    def losses() -> Iterator[torch.Tensor]:
        for _ in range(hp.search_epochs):
            n_uni = int(n_title * hp.search_uniform_frac)
            items = np.concatenate(
                [rng.integers(1, ds.n_items + 1, n_uni), 1 + rng.choice(ds.n_items, n_title - n_uni, p=p_pop),
                 buys[:, 1]]
            )
            users = np.concatenate([np.zeros(n_title, np.int64), buys[:, 0]])
            users[rng.random(n) < hp.user_dropout] = 0
            sizes = rng.choice(QUERY_SIZES, n, p=QUERY_SIZE_P)
            tokens = _query_tokens(title_hashes, items, rng, tok.MAX_TOKENS, sizes)
            perm = rng.permutation(n)
            for s in range(0, n, hp.search_batch):
                b = perm[s : s + hp.search_batch]
                logits = model.scores(torch.from_numpy(tokens[b]), torch.from_numpy(users[b]))
                logits[:, 0] = -1e9
                yield F.cross_entropy(logits, torch.from_numpy(items[b]))

    _fit(model, hp.search_lr, steps, losses(), "search", progress)
    return model.eval()


def search_eval_set(
    ds: Dataset, sp: Split, tok: ModuleType, hp: HParams, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out (tokens, user, item): ONE word of an item a user carted/bought after the cutoff (with two
    words, plain lexical matching already finds nearly every item; one word leaves room for popularity
    and personalisation)."""
    rng = np.random.default_rng(seed + 22)
    pairs = np.asarray(sorted(set(sp.test_buys)), dtype=np.int64).reshape(-1, 2)
    if len(pairs) > hp.max_eval:
        pairs = pairs[np.sort(rng.choice(len(pairs), hp.max_eval, replace=False))]
    title_hashes = [[tok.hash_token(w) for w in tok.tokenize(t)][: tok.MAX_TOKENS] for t in ds.titles]
    tokens = _query_tokens(title_hashes, pairs[:, 1], rng, tok.MAX_TOKENS, np.ones(len(pairs), np.int64))
    return tokens, pairs[:, 0], pairs[:, 1]


def lexical_hit_queries(ds: Dataset, tok: ModuleType, n: int, seed: int) -> tuple[list[str], list[set[str]]]:
    """Queries made of 1-4 words of random titles (shuffled), with the word sets a hit must contain."""
    rng = np.random.default_rng(seed + 23)
    queries, wants = [], []
    for i in rng.integers(1, ds.n_items + 1, n).tolist():
        words = tok.tokenize(ds.titles[i])
        k = int(rng.integers(1, min(4, len(words)) + 1))
        pick = [words[j] for j in rng.permutation(len(words))[:k]]
        queries.append(" ".join(pick))
        wants.append(set(pick))
    return queries, wants


def eval_search(
    model: SearchModel, ds: Dataset, sp: Split, hp: HParams, seed: int, tok: ModuleType
) -> dict[str, float]:
    graph = SearchGraph(model).eval()
    tokens, users, items = search_eval_set(ds, sp, tok, hp, seed)
    res: dict[str, float] = {"eval_queries": len(items)}
    if len(items):
        with torch.no_grad():
            scores = model.scores(torch.from_numpy(tokens), torch.from_numpy(users), graph.items)
            scores[:, 0] = float("-inf")
            top = torch.topk(scores, 50, dim=1).indices.numpy()
        res["recall@50"] = round(float(np.mean((top == items[:, None]).any(1))), 4)
        pop_top = np.argsort(-sp.train_pop[1:], kind="stable")[:50] + 1
        res["baseline_popularity_recall@50"] = round(float(np.mean(np.isin(items, pop_top))), 4)
        # Lexical baseline: number of query tokens in the title, ties by popularity.
        titles = title_token_matrix(ds, tok).numpy()
        hits = 0
        for q, i in zip(tokens, items.tolist(), strict=True):
            qs = q[q > 0]
            match = np.isin(titles, qs).sum(1).astype(np.float64)
            match[0] = -1
            s = match + 0.5 * sp.train_pop / (sp.train_pop.max() + 1.0)
            hits += int(i in np.argsort(-s, kind="stable")[:50])
        res["baseline_lexical_popularity_recall@50"] = round(hits / len(items), 4)
    queries, wants = lexical_hit_queries(ds, tok, 1000, seed)
    q_tok = torch.tensor([tok.encode(q) for q in queries], dtype=torch.long)
    with torch.no_grad():
        ids, _ = graph(q_tok, torch.zeros(len(queries), 1, dtype=torch.long))
    ok = [
        any(w <= set(tok.tokenize(ds.titles[i])) for i in row[:10]) for row, w in zip(ids.tolist(), wants, strict=True)
    ]
    res["lexical_hit@10"] = round(float(np.mean(ok)), 4)
    return res


# ------------------------------------------------------------------------------------------------- all


def new_models(
    ds: Dataset, sp: Split, hp: HParams, seed: int, tok: ModuleType
) -> tuple[TwoTower, BSTRanker, SearchModel]:
    """Freshly initialised models (also the skeletons that cached weights are loaded into)."""
    cats = torch.from_numpy(ds.item_category)
    torch.manual_seed(seed)
    retr = TwoTower(ds.n_users, ds.n_items, cats, hp.retr_dim)
    torch.manual_seed(seed + 10)
    rank = BSTRanker(ds.n_items, cats, item_word_matrix(ds, tok), hp.rank_dim, hp.rank_heads)
    torch.manual_seed(seed + 20)
    search = SearchModel(
        ds.n_users,
        ds.n_items,
        title_token_matrix(ds, tok),
        tok.NUM_BUCKETS,
        cats,
        user_category_lift(ds, sp),
        hp.search_dim,
        torch.from_numpy(np.log1p(sp.train_pop)),
    )
    return retr, rank, search


@dataclass
class Trained:
    retrieval: TwoTower
    ranker: BSTRanker
    search: SearchModel
    metrics: dict[str, dict]


def train_all(
    ds: Dataset, hp: HParams, seed: int, progress: Progress | None = None, log: Callable[[str], None] = print
) -> Trained:
    """Train and evaluate all three models on held-in/held-out data; 2 threads (the target machine)."""
    check_size(ds)
    torch.set_num_threads(2)
    tok = load_tokenizer()
    sp = make_split(ds, hp.holdout_days)
    retr, rank, search = new_models(ds, sp, hp, seed, tok)
    secs: dict[str, float] = {}
    t, c = time.perf_counter(), time.process_time()
    train_retrieval(retr, ds, sp, hp, seed, progress)
    secs["retrieval"] = round(time.perf_counter() - t, 1)
    secs["retrieval_cpu"] = round(time.process_time() - c, 1)
    t, c = time.perf_counter(), time.process_time()
    train_ranker(rank, ds, sp, hp, seed, progress)
    secs["ranker"] = round(time.perf_counter() - t, 1)
    secs["ranker_cpu"] = round(time.process_time() - c, 1)
    t, c = time.perf_counter(), time.process_time()
    train_search(search, ds, sp, hp, seed, tok, progress)
    secs["search"] = round(time.perf_counter() - t, 1)
    secs["search_cpu"] = round(time.process_time() - c, 1)
    metrics = evaluate(Trained(retr, rank, search, {}), ds, sp, hp, seed, tok)
    metrics["train_seconds"] = secs
    for k in ("retrieval", "ranker", "search"):
        log(f"{k}: trained in {secs[k]} s; held-out {metrics[k]}")
    return Trained(retr, rank, search, metrics)


def check_size(ds: Dataset) -> None:
    if ds.n_items < MIN_ITEMS:
        raise ValueError(
            f"need at least {MIN_ITEMS} items (retrieval excludes up to 1000 and returns 100), got {ds.n_items}"
        )


def evaluate(tr: Trained, ds: Dataset, sp: Split, hp: HParams, seed: int, tok: ModuleType) -> dict[str, dict]:
    """Offline metrics of all three models on the held-out period, each next to its baselines."""
    return {
        "retrieval": eval_retrieval(tr.retrieval, sp, hp),
        "ranker": eval_ranker(tr.ranker, ds, sp, hp, seed),
        "search": eval_search(tr.search, ds, sp, hp, seed, tok),
        "split": {
            "cutoff_unix": sp.cutoff,
            "holdout_days": hp.holdout_days,
            "train_users": len(sp.train_seq),
            "test_users": len(sp.test_seq),
        },
    }
