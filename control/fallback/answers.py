"""Degraded answers: popular items and lexical title matches, precomputed so one answer costs almost no CPU.

Why: when every instance is full or down, a shopper is better served by a plausible shelf than by an error. These
answers need no model: item popularity (event count per item in the build's data), each item's category and title
(the build's catalogue). Everything is turned into numpy arrays once, at start; a request then costs a few array
operations on at most a few hundred items.

Scores order the answer and separate its tiers, nothing more (they are not model scores): for ``recommend`` items
of the history's categories score in [1, 2) (category share x normalised popularity), padding with overall
popular items scores in [0, 1); for ``search`` an item scores (query words its title contains) + normalised
popularity, padding in [0, 1). Items of the request's history are never returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOP_N = 20


@dataclass(frozen=True)
class Catalogue:
    """What the answers are computed from; ``item_category`` and ``titles`` are indexed by item id (0 = none)."""

    popularity: np.ndarray  # (n_items + 1,) event counts
    item_category: np.ndarray  # (n_items + 1,)
    titles: list[str]  # (n_items + 1,)

    @classmethod
    def from_build(cls, events_csv: Path, catalog_csv: Path) -> Catalogue:
        """Read the build's data with the build's own reader (same validation, same dense ids as the models)."""
        from recserve.build.data import load

        ds = load(events_csv, catalog_csv)
        pop = np.bincount(ds.item, minlength=ds.n_items + 1).astype(np.float64)
        return cls(popularity=pop, item_category=ds.item_category.astype(np.int64), titles=list(ds.titles))


class FallbackAnswers:
    """Top-20 degraded answers for recommend (history categories, else popular) and search (title words)."""

    def __init__(self, catalogue: Catalogue, tokenize: Callable[[str], list[str]]):
        pop = catalogue.popularity.astype(np.float64).copy()
        pop[0] = 0.0
        self.n_items = len(pop) - 1
        self.item_category = catalogue.item_category
        self.pnorm = pop / (pop.max() + 1.0)  # [0, 1): ties broken by id below
        ids = np.arange(1, self.n_items + 1)
        self.popular = ids[np.lexsort((ids, -pop[1:]))]  # most popular first
        self.by_category: dict[int, np.ndarray] = {}
        cats = self.item_category[self.popular]
        for c in np.unique(cats):
            self.by_category[int(c)] = self.popular[cats == c]
        words: dict[str, list[int]] = {}
        for item in range(1, self.n_items + 1):
            for w in set(tokenize(catalogue.titles[item])):
                words.setdefault(w, []).append(item)
        self.by_word = {w: np.asarray(v, dtype=np.int64) for w, v in words.items()}

    # ------------------------------------------------------------------ answers
    def _top(
        self, cand: np.ndarray, scores: np.ndarray, exclude: np.ndarray, n: int = TOP_N
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best ``n`` of candidates (best first, then id), minus ``exclude``, padded with popular items."""
        taken = np.zeros(self.n_items + 1, dtype=bool)
        taken[exclude[(exclude >= 1) & (exclude <= self.n_items)]] = True
        keep = ~taken[cand]
        cand, scores = cand[keep], scores[keep]
        if len(cand) < n:
            taken[cand] = True
            pad = self.popular[: n + len(exclude) + len(cand)]
            pad = pad[~taken[pad]][: n - len(cand)]
            cand = np.concatenate([cand, pad])
            scores = np.concatenate([scores, self.pnorm[pad]])
        order = np.lexsort((cand, -scores))[:n]
        ids = np.zeros(n, dtype=np.int64)
        out = np.zeros(n, dtype=np.float32)
        ids[: len(order)], out[: len(order)] = cand[order], scores[order]
        return ids, out

    def recommend(self, history: np.ndarray, n: int = TOP_N) -> tuple[np.ndarray, np.ndarray]:
        """(item_ids [B, n], scores [B, n]) for history rows [B, h] (0 = padding, unknown ids ignored)."""
        rows = [self._recommend_row(np.asarray(r, dtype=np.int64).reshape(-1), n) for r in history]
        return _stack(rows, n)

    def _recommend_row(self, row: np.ndarray, n: int = TOP_N) -> tuple[np.ndarray, np.ndarray]:
        items = row[row != 0]
        known = items[(items >= 1) & (items <= self.n_items)]
        if not len(known):
            return self._top(self.popular[:0], self.pnorm[:0], items, n)
        cats, counts = np.unique(self.item_category[known], return_counts=True)
        share = counts / counts.sum()
        cand, scores = [], []
        for c, w in zip(cats.tolist(), share.tolist(), strict=True):
            top = self.by_category.get(c, self.popular[:0])[: n + len(items)]
            cand.append(top)
            scores.append(1.0 + w * self.pnorm[top])
        return self._top(np.concatenate(cand), np.concatenate(scores), items, n)

    def search(self, queries: list[list[str]], n: int = TOP_N) -> tuple[np.ndarray, np.ndarray]:
        """(item_ids [B, n], scores [B, n]) for the words of each query."""
        return _stack([self._search_row(words, n) for words in queries], n)

    def _search_row(self, words: list[str], n: int = TOP_N) -> tuple[np.ndarray, np.ndarray]:
        hits = [self.by_word[w] for w in set(words) if w in self.by_word]
        if not hits:
            return self._top(self.popular[:0], self.pnorm[:0], self.popular[:0], n)
        cand, matched = np.unique(np.concatenate(hits), return_counts=True)
        return self._top(cand, matched + self.pnorm[cand], self.popular[:0], n)


def _stack(rows: list[tuple[np.ndarray, np.ndarray]], n: int = TOP_N) -> tuple[np.ndarray, np.ndarray]:
    if not rows:
        return np.zeros((0, n), np.int64), np.zeros((0, n), np.float32)
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
