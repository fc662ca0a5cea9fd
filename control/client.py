"""A small typed client for the ``recommend`` and ``search`` ensembles over gRPC or HTTP.

Used by the demo, the tests, the control plane's deep health checks and the drill probes, so the
request contract lives in exactly one place on the client side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Result:
    item_ids: list[int]
    scores: list[float]


class RecClient:
    """Wraps a tritonclient gRPC or HTTP client; ``url`` is ``host:port``."""

    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 10.0, model_suffix: str = ""):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.suffix = model_suffix
        if protocol == "grpc":
            import tritonclient.grpc as mod

            self._client = mod.InferenceServerClient(url)
        else:
            import tritonclient.http as mod

            self._client = mod.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        self._mod = mod

    def _input(self, name: str, array: np.ndarray, dtype: str):
        t = self._mod.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    def _infer(self, model: str, inputs: list) -> Result:
        outputs = [self._mod.InferRequestedOutput(n) for n in ("item_ids", "scores")]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        r = self._client.infer(model + self.suffix, inputs, outputs=outputs, **kwargs)
        return Result(r.as_numpy("item_ids")[0].tolist(), r.as_numpy("scores")[0].tolist())

    def recommend(self, user_id: int, history: list[int]) -> Result:
        """Top 20 items for a user; ``history`` is most-recent-last item ids."""
        user = np.asarray([[user_id]], dtype=np.int64)
        hist = np.asarray([history or [0]], dtype=np.int64)
        return self._infer("recommend", [self._input("user_id", user, "INT64"), self._input("history", hist, "INT64")])

    def search(self, query: str | bytes, user_id: int | None = None) -> Result:
        """Top 20 items for a text query, optionally personalised for ``user_id``."""
        raw = query.encode("utf-8") if isinstance(query, str) else query
        inputs = [self._input("query", np.asarray([[raw]], dtype=object), "BYTES")]
        if user_id is not None:
            inputs.append(self._input("user_id", np.asarray([[user_id]], dtype=np.int64), "INT64"))
        return self._infer("search", inputs)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RecClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
