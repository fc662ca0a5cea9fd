"""recommend_pre: validate a recommend request and shape it for the retrieval and ranker models.

Contract (per batch row): ``user_id`` INT64 [1] (>= 0; unknown ids are fine, the model treats them as
cold-start), ``history`` INT64 [-1] (item ids, most recent last, 0 = padding, at most 1000 items).
Outputs: ``user_idx`` [1], ``history50`` [50] (last 50 ids right-aligned, left-padded with 0) for the
models, and ``exclude`` [1000] (every history id, so nothing the user already saw is recommended).
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

HISTORY_LIMIT = 1000  # hard limit: longer histories are rejected, not silently cut
MODEL_HISTORY = 50  # what the models look at: the most recent items


def _shape(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop padding, keep order; return (history50, exclude)."""
    items = row[row != 0]
    history50 = np.zeros(MODEL_HISTORY, dtype=np.int64)
    recent = items[-MODEL_HISTORY:]
    if len(recent):
        history50[-len(recent) :] = recent
    exclude = np.zeros(HISTORY_LIMIT, dtype=np.int64)
    exclude[: len(items)] = items
    return history50, exclude


def _check(user_id: np.ndarray, history: np.ndarray) -> str | None:
    if history.shape[1] > HISTORY_LIMIT:
        return f"input 'history' has {history.shape[1]} items; the limit is {HISTORY_LIMIT}"
    if (user_id < 0).any():
        return f"input 'user_id' must be >= 0, got {int(user_id.min())}"
    if (history < 0).any():
        return f"input 'history' item ids must be >= 0 (0 is padding), got {int(history.min())}"
    return None


class TritonPythonModel:
    """Validation and shaping only; no model state."""

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            user_id = pb_utils.get_input_tensor_by_name(request, "user_id").as_numpy()
            history = pb_utils.get_input_tensor_by_name(request, "history").as_numpy()
            problem = _check(user_id, history)
            if problem:
                err = pb_utils.TritonError(problem, pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
                continue
            shaped = [_shape(row) for row in history]
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("user_idx", user_id.astype(np.int64)),
                        pb_utils.Tensor("history50", np.stack([h for h, _ in shaped])),
                        pb_utils.Tensor("exclude", np.stack([e for _, e in shaped])),
                    ]
                )
            )
        return responses
