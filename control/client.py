"""A small typed client for the ``recommend`` and ``search`` ensembles over gRPC or HTTP.

Used by the demo, the tests, the control plane's deep health checks and the drill probes, so the
request contract lives in exactly one place on the client side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

#: gRPC service config for recserve clients (docs/peak-traffic.md "Client retry policy"). Retry only UNAVAILABLE (no
#: connection, a proxy restarting, an instance gone): at most 4 attempts with 100-500 ms jittered backoff, and wait
#: for the connection (``waitForReady``) instead of failing at once while the proxy is down, so a HAProxy restart (the
#: proxy-crash drill: ~0.2 s to accept connections again) costs latency, not errors. Never RESOURCE_EXHAUSTED:
#: that is the front door shedding load, and retrying it would multiply an overload. The retryThrottling token
#: bucket (per target, per process) stops retries when many calls fail: every failed attempt costs 1 token, every
#: success returns 0.1, and retries are allowed only while tokens > maxTokens / 2, so a client that sees only
#: failures makes at most ~maxTokens / 2 retries in all, then one attempt per call. 100 tokens: the requests in
#: flight when a proxy dies (a few dozen at the knee) are all retried once; a lasting outage is not amplified.
RETRY_SERVICE_CONFIG: dict = {
    "methodConfig": [
        {
            "name": [{"service": "inference.GRPCInferenceService"}],
            "waitForReady": True,
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
    "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
}
#: Reconnect quickly after a proxy restart (gRPC's default first reconnect backoff is 1 s).
RECONNECT_BACKOFF_MS = {"grpc.initial_reconnect_backoff_ms": 100, "grpc.min_reconnect_backoff_ms": 100,
                        "grpc.max_reconnect_backoff_ms": 1000}


def tritonclient_channel_args() -> list[tuple[str, object]]:
    """The channel options tritonclient's gRPC clients use when given none (message sizes, keepalive)."""
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    ka = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", ka.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", ka.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", ka.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", ka.http2_max_pings_without_data),
    ]


def grpc_channel_args(service_config: dict | None = RETRY_SERVICE_CONFIG) -> list[tuple[str, object]]:
    """Channel options for ``tritonclient.grpc.InferenceServerClient(url, channel_args=...)`` or
    ``grpc.insecure_channel(url, options=...)``: tritonclient's own defaults (its ``channel_args`` replaces them)
    plus the service config; ``None`` = no retry policy (for health probes, which must see the first failure)."""
    args = tritonclient_channel_args()
    if service_config is None:
        return args + [("grpc.enable_retries", 0)]
    return args + list(RECONNECT_BACKOFF_MS.items()) + [("grpc.enable_retries", 1),
                                                          ("grpc.service_config", json.dumps(service_config))]


def is_degraded(result) -> bool:
    """True when a tritonclient ``InferResult`` (gRPC, gRPC aio or HTTP) carries the response parameter
    ``degraded: true`` that the fallback server sets; Triton's own answers have no such parameter."""
    response = result.get_response()
    if isinstance(response, dict):  # HTTP: the JSON header
        return (response.get("parameters") or {}).get("degraded") is True
    params = response.parameters  # gRPC: ModelInferResponse
    return "degraded" in params and params["degraded"].bool_param


@dataclass(frozen=True)
class Result:
    item_ids: list[int]
    scores: list[float]
    #: True when the answer came from the fallback server (popular items / title matches), not from the models.
    degraded: bool = False


class RecClient:
    """Wraps a tritonclient gRPC or HTTP client; ``url`` is ``host:port``. Over gRPC it uses ``retry_policy``
    (default RETRY_SERVICE_CONFIG; None = no retries); tritonclient's HTTP client has no retry policy."""

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        timeout_s: float = 10.0,
        model_suffix: str = "",
        retry_policy: dict | None = RETRY_SERVICE_CONFIG,
        priority: int = 0,
    ):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.suffix = model_suffix
        #: Triton request priority (0 = the model's default level); the control plane's golden probes use 1.
        self.priority = priority
        if protocol == "grpc":
            import tritonclient.grpc as mod

            self._client = mod.InferenceServerClient(url, channel_args=grpc_channel_args(retry_policy))
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
        if self.priority:
            kwargs["priority"] = self.priority
        r = self._client.infer(model + self.suffix, inputs, outputs=outputs, **kwargs)
        return Result(r.as_numpy("item_ids")[0].tolist(), r.as_numpy("scores")[0].tolist(), is_degraded(r))

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

    def infer(self, model: str, inputs: dict[str, np.ndarray], datatypes: dict[str, str],
              outputs: list[str]) -> dict[str, np.ndarray]:
        """Any model: ``inputs`` by name (with the batch dimension when the model batches), ``datatypes`` their
        KServe names; returns the named ``outputs``. Used where a serving spec names the models."""
        tensors = [self._input(n, np.asarray(a), datatypes[n]) for n, a in inputs.items()]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        if self.priority:
            kwargs["priority"] = self.priority
        r = self._client.infer(model + self.suffix, tensors,
                               outputs=[self._mod.InferRequestedOutput(n) for n in outputs], **kwargs)
        return {n: r.as_numpy(n) for n in outputs}

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RecClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
