"""In-process reference of the served ensembles, with onnxruntime on the latest model versions.

Why: the golden-request checks and quality tests need the exact answer the Triton ensembles should give.
Each step mirrors a served model one to one (recommend_pre -> retrieval -> ranker -> recommend_post;
search_pre -> search_model), so a difference between this and the server is a serving bug.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recserve.build.export import ort_session
from recserve.build.train import load_tokenizer

HISTORY_LIMIT = 1000  # recommend_pre rejects longer histories
MODEL_HISTORY = 50
TOP_N = 20
MODELS = ("retrieval", "ranker", "search_model")


def latest_version_dir(repository: str | Path, model: str) -> Path:
    """Highest numeric version dir of ``model`` (FileNotFoundError when there is none)."""
    from recserve.build.manifest import numeric_versions

    versions = numeric_versions(Path(repository) / model)
    if not versions:
        raise FileNotFoundError(f"no numeric version of {model!r} under {repository}")
    return Path(repository) / model / str(versions[-1])


def latest_versions(repository: str | Path, models: tuple[str, ...] = MODELS) -> dict[str, Path]:
    """Latest version dir of each model."""
    return {m: latest_version_dir(repository, m) for m in models}


def shape_history(history: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """recommend_pre: drop 0 padding, keep order; history50 = last 50 right-aligned (left-padded with 0),
    exclude = every history id (at most 1000) left-aligned, right-padded with 0."""
    items = np.asarray(history, dtype=np.int64).reshape(-1)
    items = items[items != 0]
    history50 = np.zeros(MODEL_HISTORY, dtype=np.int64)
    recent = items[-MODEL_HISTORY:]
    if len(recent):
        history50[-len(recent) :] = recent
    exclude = np.zeros(HISTORY_LIMIT, dtype=np.int64)
    exclude[: len(items)] = items[-HISTORY_LIMIT:]
    return history50, exclude


class Reference:
    """recommend() and search() exactly as the served ensembles compute them (batch of one)."""

    def __init__(self, repository: str | Path = "model_repository", threads: int = 2) -> None:
        self.versions = latest_versions(repository)
        self.sessions = {m: ort_session(d / "model.onnx", threads) for m, d in self.versions.items()}
        self.tokenizer = load_tokenizer()

    def recommend(self, user_id: int, history: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Top-20 (item_ids, ranker scores): retrieval top-100 with the history excluded, re-ranked."""
        if len(history) > HISTORY_LIMIT:
            raise ValueError(f"input 'history' has {len(history)} items; the limit is {HISTORY_LIMIT}")
        if user_id < 0:
            raise ValueError(f"input 'user_id' must be >= 0, got {user_id}")
        if any(i < 0 for i in history):
            raise ValueError("input 'history' item ids must be >= 0 (0 is padding)")
        history50, exclude = shape_history(history)
        cand_ids, _ = self.sessions["retrieval"].run(
            None,
            {"user_id": np.array([[user_id]], dtype=np.int64), "history": history50[None], "exclude": exclude[None]},
        )
        (scores,) = self.sessions["ranker"].run(None, {"history": history50[None], "candidates": cand_ids})
        order = np.argsort(-scores[0], kind="stable")[:TOP_N]  # recommend_post: stable, ties keep retrieval order
        return cand_ids[0][order].astype(np.int64), scores[0][order].astype(np.float32)

    def search(self, query: str, user_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-20 (item_ids, scores) for a query; ``user_id`` None = anonymous (0)."""
        raw = query.encode("utf-8")
        if not raw.strip():
            raise ValueError("input 'query' must not be empty")
        if len(raw) > self.tokenizer.MAX_QUERY_BYTES:
            raise ValueError(
                f"input 'query' is {len(raw)} bytes; the limit is {self.tokenizer.MAX_QUERY_BYTES} UTF-8 bytes"
            )
        tokens = self.tokenizer.encode(query)
        if not any(tokens):
            raise ValueError("input 'query' must contain at least one word (letters or digits)")
        uid = 0 if user_id is None else int(user_id)
        if uid < 0:
            raise ValueError(f"input 'user_id' must be >= 0, got {uid}")
        ids, scores = self.sessions["search_model"].run(
            None, {"tokens": np.array([tokens], dtype=np.int64), "user_id": np.array([[uid]], dtype=np.int64)}
        )
        return ids[0].astype(np.int64), scores[0].astype(np.float32)
