"""Quality gate on built models, through the in-process reference of the served ensembles.

    python -m recserve.build.quality [--repository model_repository] [--work-dir artifacts]

Why: offline metrics can look fine while the served pipeline (exclusion, re-ranking, tokenizer) is not;
this asks the same questions a user would, on the latest versions, against the generator's ground truth:
- recommend for users with clear preferences returns their preferred categories >= 3x as often as a
  random catalogue pick, never an item of the history, 20 distinct items;
- an unknown user with a history gets items of the history's categories; nobody at all gets popular items;
- search with words of a title finds an item containing those words in the top 10 for >= 90% of queries.
Exit status 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from recserve.build.data import load  # noqa: E402
from recserve.build.reference import Reference  # noqa: E402
from recserve.build.train import HParams, load_tokenizer, make_split  # noqa: E402

CATEGORY_RATIO_MIN = 3.0
LEXICAL_HIT_MIN = 0.9


def run(repository: Path, work_dir: Path, n: int = 200, seed: int = 0) -> dict[str, float]:
    ref = Reference.latest(repository)
    ddir = work_dir / "data"
    ds = load(ddir / "events.csv", ddir / "catalog.csv")
    truth = json.loads((ddir / "ground_truth.json").read_text())["user_preferred_categories"]
    sp = make_split(ds, HParams().holdout_days)
    rng = np.random.default_rng(seed)
    cat_share = np.bincount(ds.item_category[1:], minlength=ds.n_categories + 1) / ds.n_items
    clear = [
        u for u in range(1, ds.n_users + 1) if max(truth[str(u)].values()) >= 0.6 and len(sp.train_seq.get(u, [])) >= 5
    ]
    got, chance, leaks = [], [], 0
    for u in rng.choice(clear, min(n, len(clear)), replace=False).tolist():
        ids, _ = ref.recommend(u, sp.train_seq[u])
        prefs = [int(c) for c in truth[str(u)]]
        got.append(np.isin(ds.item_category[ids], prefs).mean())
        chance.append(cat_share[prefs].sum())
        leaks += int(
            bool(set(ids.tolist()) & set(sp.train_seq[u])) or len(set(ids.tolist())) != 20 or bool((ids <= 0).any())
        )
    cold_hist = []
    for u in rng.choice(clear, min(n // 2, len(clear)), replace=False).tolist():
        h = sp.train_seq[u][-10:]
        ids, _ = ref.recommend(ds.n_users + 10_000, h)
        cold_hist.append(np.isin(ds.item_category[ids], ds.item_category[h]).mean())
    ids, _ = ref.recommend(0, [])
    pop = sp.train_pop
    cold_pct = float(np.mean([(pop > pop[i]).mean() for i in ids]))
    tok = load_tokenizer()
    hits = 0
    for i in rng.integers(1, ds.n_items + 1, 5 * n).tolist():
        words = tok.tokenize(ds.titles[i])
        q = [words[j] for j in rng.permutation(len(words))[: int(rng.integers(1, len(words) + 1))]]
        ids, _ = ref.search(" ".join(q), None)
        hits += any(set(q) <= set(tok.tokenize(ds.titles[j])) for j in ids[:10].tolist())
    return {
        "recommend_preferred_category_share": round(float(np.mean(got)), 4),
        "random_pick_preferred_category_share": round(float(np.mean(chance)), 4),
        "recommend_category_ratio": round(float(np.mean(got) / np.mean(chance)), 2),
        "recommend_bad_answers": leaks,
        "unknown_user_history_category_share": round(float(np.mean(cold_hist)), 4),
        "nobody_top_popularity_percentile": round(cold_pct, 4),
        "search_lexical_hit@10": round(hits / (5 * n), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recserve.build.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--work-dir", type=Path, default=Path("artifacts"), help="where build.pipeline put data/")
    a = p.parse_args(argv)
    r = run(a.repository, a.work_dir)
    print(json.dumps(r, indent=1))
    bad = []
    if r["recommend_category_ratio"] < CATEGORY_RATIO_MIN:
        bad.append(f"recommend category ratio {r['recommend_category_ratio']} < {CATEGORY_RATIO_MIN}")
    if r["recommend_bad_answers"]:
        bad.append(f"{r['recommend_bad_answers']} recommend answers with history items, duplicates or item 0")
    if r["unknown_user_history_category_share"] < 0.5:
        bad.append("unknown users with a history do not get the history's categories")
    if r["nobody_top_popularity_percentile"] > 0.1:
        bad.append("requests with no user and no history do not get popular items")
    if r["search_lexical_hit@10"] < LEXICAL_HIT_MIN:
        bad.append(f"search lexical hit@10 {r['search_lexical_hit@10']} < {LEXICAL_HIT_MIN}")
    print("quality: " + ("ok" if not bad else "FAILED: " + "; ".join(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
