"""search_pre: validate a search query and hash it into the token ids the search model reads.

Contract (per batch row): ``query`` BYTES [1] (UTF-8, 1..256 bytes, at least one word), optional
``user_id`` INT64 [1] (>= 0; absent means anonymous). The tokenizer sits beside this file and is the
very one training used.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tokenizer  # noqa: E402


def _encode(raw: bytes) -> list[int] | str:
    """Token ids, or the reason the query is refused."""
    if len(raw) == 0 or not raw.strip():
        return "input 'query' must not be empty"
    if len(raw) > tokenizer.MAX_QUERY_BYTES:
        return f"input 'query' is {len(raw)} bytes; the limit is {tokenizer.MAX_QUERY_BYTES} UTF-8 bytes"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "input 'query' must be valid UTF-8"
    ids = tokenizer.encode(text)
    if not any(ids):
        return "input 'query' must contain at least one word (letters or digits)"
    return ids


class TritonPythonModel:
    """Validation and tokenisation only; no model state."""

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            query = pb_utils.get_input_tensor_by_name(request, "query").as_numpy().reshape(-1)
            user_in = pb_utils.get_input_tensor_by_name(request, "user_id")
            users = (
                user_in.as_numpy().reshape(-1, 1).astype(np.int64)
                if user_in is not None
                else np.zeros((len(query), 1), dtype=np.int64)
            )
            encoded = [_encode(q if isinstance(q, bytes) else str(q).encode()) for q in query]
            problem = next((e for e in encoded if isinstance(e, str)), None)
            if problem is None and (users < 0).any():
                problem = f"input 'user_id' must be >= 0, got {int(users.min())}"
            if problem:
                err = pb_utils.TritonError(problem, pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("tokens", np.asarray(encoded, dtype=np.int64)),
                        pb_utils.Tensor("user_idx", users),
                    ]
                )
            )
        return responses
