"""What recommend_pre computes, in plain numpy: validation of a recommend request and its shaping.

Why a module of its own: the served model (``model.py`` beside this file) and recserve's in-process
reference (``build/reference.py``, which loads this very file) must apply the same rules, so there is one
implementation. It needs only numpy, which the NGC container ships.
"""

from __future__ import annotations

import numpy as np

#: Hard limit: longer histories are rejected, not silently cut.
HISTORY_LIMIT = 1000
#: What the models look at: the most recent items.
MODEL_HISTORY = 50


def check(user_id: np.ndarray, history: np.ndarray) -> str | None:
    """The reason a batch (user_id [B, 1], history [B, n]) is refused, or None when it is valid."""
    if history.shape[1] > HISTORY_LIMIT:
        return f"input 'history' has {history.shape[1]} items; the limit is {HISTORY_LIMIT}"
    if (user_id < 0).any():
        return f"input 'user_id' must be >= 0, got {int(user_id.min())}"
    if (history < 0).any():
        return f"input 'history' item ids must be >= 0 (0 is padding), got {int(history.min())}"
    return None


def shape_row(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop 0 padding, keep order; history50 = last 50 ids right-aligned (left-padded with 0), exclude =
    every history id left-aligned (right-padded with 0) so nothing the user already saw is recommended."""
    items = np.asarray(row, dtype=np.int64).reshape(-1)
    items = items[items != 0]
    history50 = np.zeros(MODEL_HISTORY, dtype=np.int64)
    recent = items[-MODEL_HISTORY:]
    if len(recent):
        history50[-len(recent) :] = recent
    exclude = np.zeros(HISTORY_LIMIT, dtype=np.int64)
    exclude[: len(items)] = items
    return history50, exclude


def prepare(user_id: np.ndarray, history: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user_idx [B, 1], history50 [B, 50], exclude [B, 1000]); ValueError naming the input and the rule."""
    problem = check(user_id, history)
    if problem:
        raise ValueError(problem)
    shaped = [shape_row(row) for row in history]
    history50 = np.stack([h for h, _ in shaped]) if shaped else np.zeros((0, MODEL_HISTORY), np.int64)
    exclude = np.stack([e for _, e in shaped]) if shaped else np.zeros((0, HISTORY_LIMIT), np.int64)
    return user_id.astype(np.int64), history50, exclude
