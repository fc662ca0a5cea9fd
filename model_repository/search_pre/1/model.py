"""search_pre: validate a search query and hash it into the token ids the search model reads.

Contract (per batch row): ``query`` BYTES [1] (UTF-8, 1..256 bytes, at least one word), optional
``user_id`` INT64 [1] (>= 0; absent means anonymous). The rules and the tokenizer live in
``tokenizer.py`` beside this file: the very file training and recserve's reference import.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tokenizer  # noqa: E402


class TritonPythonModel:
    """Validation and tokenisation only; no model state."""

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            query = pb_utils.get_input_tensor_by_name(request, "query").as_numpy().reshape(-1)
            user_in = pb_utils.get_input_tensor_by_name(request, "user_id")
            users = None if user_in is None else user_in.as_numpy().reshape(-1).tolist()
            raw = [q if isinstance(q, bytes) else str(q).encode() for q in query]
            try:
                tokens, user_idx = tokenizer.search_inputs(raw, users)
            except ValueError as exc:
                err = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("tokens", np.asarray(tokens, dtype=np.int64)),
                        pb_utils.Tensor("user_idx", np.asarray(user_idx, dtype=np.int64)),
                    ]
                )
            )
        return responses
