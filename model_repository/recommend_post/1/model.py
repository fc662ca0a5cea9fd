"""recommend_post: order retrieval candidates by ranker score and keep the best 20.

Retrieval already removed padding and every history item and returns distinct ids, so this step only
sorts (stable: ties keep retrieval order) and cuts.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

TOP_N = 20


class TritonPythonModel:
    """Ranks candidates; no model state."""

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            cand_ids = pb_utils.get_input_tensor_by_name(request, "cand_ids").as_numpy()
            scores = pb_utils.get_input_tensor_by_name(request, "rank_scores").as_numpy()
            order = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_N]
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("item_ids", np.take_along_axis(cand_ids, order, axis=1).astype(np.int64)),
                        pb_utils.Tensor("scores", np.take_along_axis(scores, order, axis=1).astype(np.float32)),
                    ]
                )
            )
        return responses
