"""What recommend_post computes, in plain numpy: order retrieval candidates by ranker score, keep 20.

Why a module of its own: the served model (``model.py`` beside this file) and recserve's in-process
reference (``build/reference.py``, which loads this very file) must order and cut alike. Retrieval
already removed padding and every history item and returns distinct ids, so this step only sorts
(stable: ties keep retrieval order) and cuts.
"""

from __future__ import annotations

import numpy as np

TOP_N = 20


def top_n(cand_ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(item_ids [B, 20] INT64, scores [B, 20] FP32), best first, from candidates [B, 100] and their scores."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_N]
    return (
        np.take_along_axis(cand_ids, order, axis=1).astype(np.int64),
        np.take_along_axis(scores, order, axis=1).astype(np.float32),
    )
