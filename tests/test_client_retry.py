"""The client retry policy (RETRY_SERVICE_CONFIG) with real gRPC: a tiny in-process KServe v2 server that fails on
purpose and counts every attempt it receives, and RecClient (tritonclient underneath) as the client.

Each test gets its own server port: grpcio keeps retry-throttling tokens per target for the whole process.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from recserve.control.client import RETRY_SERVICE_CONFIG, RecClient, grpc_channel_args


class FlakyInference(service_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer fails with ``code`` for the first ``failures`` attempts (None = always), then answers."""

    def __init__(self, code: grpc.StatusCode, failures: int | None):
        self.code = code
        self.failures = failures
        self.attempts = 0
        self._lock = threading.Lock()

    def ModelInfer(self, request, context):
        with self._lock:
            self.attempts += 1
            failing = self.failures is None or self.attempts <= self.failures
        if failing:
            context.abort(self.code, f"attempt failed on purpose ({self.code.name})")
        response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version="1")
        for name, arr in (("item_ids", np.arange(1, 21, dtype=np.int64)), ("scores", np.ones(20, np.float32))):
            out = response.outputs.add(name=name, datatype="INT64" if name == "item_ids" else "FP32")
            out.shape.extend([1, 20])
            response.raw_output_contents.append(arr.tobytes())
        return response


@pytest.fixture
def flaky():
    """Start a FlakyInference on a free loopback port: flaky(code, failures) -> (servicer, url); stopped after."""
    servers = []

    def start(code: grpc.StatusCode, failures: int | None):
        servicer = FlakyInference(code, failures)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(grace=None)


def test_unavailable_then_answer_succeeds_through_retries(flaky):
    servicer, url = flaky(grpc.StatusCode.UNAVAILABLE, failures=2)
    with RecClient(url, timeout_s=5) as c:
        r = c.recommend(1, [2, 3])
    assert r.item_ids == list(range(1, 21))
    assert servicer.attempts == 3  # maxAttempts: the first try and two retries


def test_always_unavailable_attempts_stay_within_the_throttling_budget(flaky):
    servicer, url = flaky(grpc.StatusCode.UNAVAILABLE, failures=None)
    calls = 30
    throttle = RETRY_SERVICE_CONFIG["retryThrottling"]
    per_call = []
    with RecClient(url, timeout_s=5) as c:
        for _ in range(calls):
            before = servicer.attempts
            with pytest.raises(InferenceServerException) as err:
                c.recommend(1, [2])
            assert err.value.status() == "StatusCode.UNAVAILABLE"
            per_call.append(servicer.attempts - before)
    retries = servicer.attempts - calls
    print(f"\n{calls} calls to an always-failing server: {servicer.attempts} attempts, per call {per_call}")
    assert 0 < retries <= throttle["maxTokens"] / 2  # retried at first, then the token bucket ran dry
    assert per_call[-10:] == [1] * 10  # once throttled, one attempt per call: no amplification


def test_resource_exhausted_is_never_retried(flaky):
    servicer, url = flaky(grpc.StatusCode.RESOURCE_EXHAUSTED, failures=None)
    with RecClient(url, timeout_s=5) as c, pytest.raises(InferenceServerException) as err:
        c.search("boots")
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert servicer.attempts == 1


def test_no_policy_means_one_attempt(flaky):
    """What health probes use (retry_policy=None): they must see the first failure."""
    servicer, url = flaky(grpc.StatusCode.UNAVAILABLE, failures=1)
    with RecClient(url, timeout_s=5, retry_policy=None) as c, pytest.raises(InferenceServerException):
        c.recommend(1, [2])
    assert servicer.attempts == 1


def test_the_same_options_work_on_a_plain_grpc_channel(flaky):
    servicer, url = flaky(grpc.StatusCode.UNAVAILABLE, failures=1)
    with grpc.insecure_channel(url, options=grpc_channel_args()) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(service_pb2.ModelInferRequest(model_name="recommend"), timeout=5)
    assert servicer.attempts == 2


def test_the_readme_documents_the_policy_the_client_uses():
    import json
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### Client retry policy", 1)[1]
    block = re.search(r"```json\n(.*?)\n```", section, re.S)
    assert block and json.loads(block.group(1)) == RETRY_SERVICE_CONFIG
