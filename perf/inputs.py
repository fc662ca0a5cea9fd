"""Realistic request payloads for perf_analyzer ``--input-data`` and the in-process reference.

Why not zeros or random: zeros hit one embedding row (cache-friendly, unrealistically fast) and random
int64 ids crash the models (out-of-range Gather). Samples here come from the generated data: real user
ids, history prefixes whose lengths follow the data's distribution, candidates drawn by popularity, and
queries cut from real catalogue titles.
"""

from __future__ import annotations

import csv
import functools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.control.defaults import REPO_ROOT

DEFAULT_DATA = REPO_ROOT / "artifacts" / "data"
HISTORY50 = 50
EXCLUDE = 1000
CANDIDATES = 100
TOKENIZER_DIR = REPO_ROOT / "model_repository" / "search_pre" / "1"

#: Targets we can make payloads for.
TARGETS = ("recommend", "search", "retrieval", "ranker", "search_model")


class InputError(ValueError):
    """The data needed for payloads is missing or unusable; the message names the file."""


@dataclass
class Corpus:
    """What payloads are drawn from: per-user item sequences (time order) and catalogue titles."""

    sequences: dict[int, list[int]]
    titles: list[str]
    item_popularity: dict[int, int]
    source: str


def load_corpus(data_dir: Path = DEFAULT_DATA, max_events: int = 400_000) -> Corpus:
    """Read events.csv and catalog.csv (columns as written by build/data.py)."""
    events, catalog = data_dir / "events.csv", data_dir / "catalog.csv"
    for f in (events, catalog):
        if not f.exists():
            raise InputError(f"{f} not found: run 'make models' (it generates the data) or pass --data")
    rows: list[tuple[int, int, int]] = []
    with events.open(newline="") as fh:
        reader = csv.DictReader(fh)
        for col in ("user_id", "item_id", "timestamp"):
            if col not in (reader.fieldnames or []):
                raise InputError(f"{events}: column '{col}' missing (header: {reader.fieldnames})")
        for i, r in enumerate(reader):
            if i >= max_events:
                break
            rows.append((int(r["user_id"]), int(r["timestamp"]), int(r["item_id"])))
    rows.sort()
    sequences: dict[int, list[int]] = defaultdict(list)
    for user, _, item in rows:
        sequences[user].append(item)
    with catalog.open(newline="") as fh:
        titles = [r["title"] for r in csv.DictReader(fh) if r.get("title")]
    if not sequences or not titles:
        raise InputError(f"{data_dir}: no events or no titles to build payloads from")
    popularity = Counter(item for _, _, item in rows)
    return Corpus(dict(sequences), titles, dict(popularity), str(data_dir))


def synthetic_corpus(workdir: Path) -> Corpus:
    """Fallback when artifacts/data does not exist yet: the project's own generator, small."""
    from recserve.build.data import GenConfig, generate

    generate(workdir, GenConfig(n_users=300, n_items=3000, days=3))
    corpus = load_corpus(workdir)
    corpus.source = f"synthetic (build.data.generate, {workdir})"
    return corpus


@functools.cache
def _tokenizer():
    """The very file search_pre serves with, imported by its path (no sys.path or sys.modules entry is left)."""
    from recserve.build.reference import served_module

    return served_module(TOKENIZER_DIR / "tokenizer.py")


def _history_prefix(seq: list[int], rng: np.random.Generator) -> list[int]:
    """A prefix of a real sequence, cut at a random point: lengths follow the data's distribution."""
    cut = int(rng.integers(1, len(seq) + 1))
    return seq[:cut][-EXCLUDE:]


def _pad_left(items: list[int], n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.int64)
    recent = items[-n:]
    if recent:
        out[-len(recent) :] = recent
    return out


def _pad_right(items: list[int], n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.int64)
    out[: min(n, len(items))] = items[:n]
    return out


def _query(title: str, rng: np.random.Generator) -> str:
    """A query as people type it: one to three consecutive words of a real title."""
    words = title.split()
    k = int(rng.integers(1, min(3, len(words)) + 1))
    start = int(rng.integers(0, len(words) - k + 1))
    return " ".join(words[start : start + k])


def samples(target: str, corpus: Corpus, n: int = 256, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` request rows for ``target`` (no batch dimension); names match the model's config inputs."""
    if target not in TARGETS:
        raise InputError(f"no payload recipe for '{target}' (known: {', '.join(TARGETS)})")
    rng = np.random.default_rng(seed)
    users = sorted(corpus.sequences)
    items = np.array(sorted(corpus.item_popularity))
    weights = np.array([corpus.item_popularity[i] for i in items], dtype=np.float64)
    weights /= weights.sum()
    out = []
    for _ in range(n):
        user = int(users[int(rng.integers(len(users)))])
        hist = _history_prefix(corpus.sequences[user], rng)
        if target == "recommend":
            out.append({"user_id": np.array([user], dtype=np.int64), "history": np.array(hist, dtype=np.int64)})
        elif target == "retrieval":
            out.append(
                {
                    "user_id": np.array([user], dtype=np.int64),
                    "history": _pad_left(hist, HISTORY50),
                    "exclude": _pad_right(hist, EXCLUDE),
                }
            )
        elif target == "ranker":
            cands = rng.choice(items, size=min(CANDIDATES, len(items)), replace=False, p=weights)
            out.append({"history": _pad_left(hist, HISTORY50), "candidates": _pad_right(cands.tolist(), CANDIDATES)})
        else:
            q = _query(corpus.titles[int(rng.integers(len(corpus.titles)))], rng)
            if target == "search":
                out.append({"query": np.array([q.encode()], dtype=object), "user_id": np.array([user], dtype=np.int64)})
            else:
                tokens = np.array(_tokenizer().encode(q), dtype=np.int64)
                out.append({"tokens": tokens, "user_id": np.array([user], dtype=np.int64)})
    return out


def _json_value(a: np.ndarray, variable: bool) -> object:
    if a.dtype == object:
        content = [v.decode() if isinstance(v, bytes) else str(v) for v in a.reshape(-1)]
    else:
        content = a.reshape(-1).tolist()
    return {"content": content, "shape": list(a.shape)} if variable else content


def write_input_data(rows: list[dict[str, np.ndarray]], path: Path, variable: tuple[str, ...] = ()) -> Path:
    """perf_analyzer ``--input-data`` JSON; inputs named in ``variable`` carry their own shape."""
    data = [{k: _json_value(v, k in variable) for k, v in row.items()} for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": data}))
    return path


#: Inputs whose length varies per request (config dims -1): perf_analyzer needs their shape per entry.
VARIABLE_INPUTS: dict[str, tuple[str, ...]] = {"recommend": ("history",)}


def batch(rows: list[dict[str, np.ndarray]], start: int, size: int) -> dict[str, np.ndarray]:
    """``size`` consecutive rows (wrapping) stacked into one batch, for the in-process reference."""
    picked = [rows[(start + i) % len(rows)] for i in range(size)]
    return {k: np.stack([r[k] for r in picked]) for k in picked[0]}


def history_lengths(rows: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """p50/p90/max history length of a recommend payload set (reported, so readers see it is not zeros)."""
    lens = np.array([len(r["history"]) for r in rows if "history" in r])
    if not len(lens):
        return {}
    return {"p50": float(np.percentile(lens, 50)), "p90": float(np.percentile(lens, 90)), "max": float(lens.max())}
