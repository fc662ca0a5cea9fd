"""recommend_pre: validate a recommend request and shape it for the retrieval and ranker models.

Contract (per batch row): ``user_id`` INT64 [1] (>= 0; unknown ids are fine, the model treats them as
cold-start), ``history`` INT64 [-1] (item ids, most recent last, 0 = padding, at most 1000 items).
Outputs: ``user_idx`` [1], ``history50`` [50] (last 50 ids right-aligned, left-padded with 0) for the
models, and ``exclude`` [1000] (every history id, so nothing the user already saw is recommended).
The rules live in ``shaping.py`` beside this file, which recserve's reference imports too.
"""

from __future__ import annotations

import os
import sys

import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shaping  # noqa: E402


class TritonPythonModel:
    """Validation and shaping only; no model state."""

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            user_id = pb_utils.get_input_tensor_by_name(request, "user_id").as_numpy()
            history = pb_utils.get_input_tensor_by_name(request, "history").as_numpy()
            try:
                user_idx, history50, exclude = shaping.prepare(user_id, history)
            except ValueError as exc:
                err = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("user_idx", user_idx),
                        pb_utils.Tensor("history50", history50),
                        pb_utils.Tensor("exclude", exclude),
                    ]
                )
            )
        return responses
