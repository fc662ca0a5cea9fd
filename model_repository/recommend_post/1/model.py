"""recommend_post: order retrieval candidates by ranker score and keep the best 20.

The rule lives in ``ranking.py`` beside this file, which recserve's reference imports too.
"""

from __future__ import annotations

import os
import sys

import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ranking  # noqa: E402


class TritonPythonModel:
    """Ranks candidates; no model state."""

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            cand_ids = pb_utils.get_input_tensor_by_name(request, "cand_ids").as_numpy()
            scores = pb_utils.get_input_tensor_by_name(request, "rank_scores").as_numpy()
            item_ids, top_scores = ranking.top_n(cand_ids, scores)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("item_ids", item_ids), pb_utils.Tensor("scores", top_scores)]
                )
            )
        return responses
