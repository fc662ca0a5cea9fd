"""A full pool is refused by HAProxy itself, at once, in the words clients see: HTTP 429 and gRPC RESOURCE_EXHAUSTED.

Real HAProxy with the fleet's generated config and real tritonclient clients; the one instance behind it is a
stand-in that holds each inference for 0.8 s (a Triton cannot be made to hold a request that long on demand),
the degraded-answer server is not bound, and every server's in-flight limit is 1. Deterministic: the first
request holds the only slot, the second must be refused, and the refusal is counted on the refusal backends.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from recserve.control.haproxy import OVERLOADED, HAProxy, HAProxyConfig
from recserve.control.triton import free_port

HOLD_S = 0.8


class _SlowHTTP(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - HAProxy's health check: /v2/health/live
        self._send(b"")

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        time.sleep(HOLD_S)
        self._send(json.dumps({"model_name": "recommend", "outputs": []}).encode())

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _SlowGRPC(service_pb2_grpc.GRPCInferenceServiceServicer):
    def ModelInfer(self, request, context):  # noqa: N802
        time.sleep(HOLD_S)
        return service_pb2.ModelInferResponse(model_name=request.model_name)


@pytest.fixture
def proxy(tmp_path):
    http = ThreadingHTTPServer(("127.0.0.1", free_port()), _SlowHTTP)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    g = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_SlowGRPC(), g)
    g_port = g.add_insecure_port(f"127.0.0.1:{free_port()}")
    g.start()
    h = HAProxy(HAProxyConfig(workdir=tmp_path, grpc_port=free_port(), http_port=free_port(), slots=1, maxconn=1,
                              timeout_server_ms=3000))
    try:
        h.start()
        h.bind_slot(0, g_port, http.server_address[1])
        h.set_state(0, "ready")
        h.route("pool")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and h.servers()["be_grpc_pool/s0"]["srv_op_state"] != "2":
            time.sleep(0.1)  # health check (rise 2 x 200 ms)
        yield h
    finally:
        h.stop()
        g.stop(0)
        http.shutdown()


def _shed_counts(h: HAProxy) -> dict[str, int]:
    return {r["pxname"]: int(r["stot"]) for r in h.stat()
            if r["svname"] == "BACKEND" and r["pxname"].endswith("_shed")}


def test_http_full_pool_gets_429_at_once(proxy):
    import tritonclient.http as httpclient

    def infer(client):
        a = httpclient.InferInput("user_id", [1, 1], "INT64")
        a.set_data_from_numpy(np.asarray([[7]], dtype=np.int64))
        return client.infer("recommend", [a])

    holder = httpclient.InferenceServerClient(f"127.0.0.1:{proxy.config.http_port}")
    second = httpclient.InferenceServerClient(f"127.0.0.1:{proxy.config.http_port}")
    try:
        with futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(infer, holder)
            time.sleep(0.3)
            with pytest.raises(Exception) as refused:
                infer(second)
            still_held = not held.done()
            held.result(timeout=10)
    finally:
        holder.close()
        second.close()
    assert "429" in str(refused.value.status()) and OVERLOADED in str(refused.value), refused.value
    assert still_held  # refused while the slot was taken: answered by HAProxy at once, never queued for it
    assert _shed_counts(proxy) == {"be_grpc_shed": 0, "be_http_shed": 1}


def test_grpc_full_pool_gets_resource_exhausted_at_once(proxy):
    channel = grpc.insecure_channel(f"127.0.0.1:{proxy.config.grpc_port}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    req = service_pb2.ModelInferRequest(model_name="recommend")
    try:
        with futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(stub.ModelInfer, req, timeout=10)
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(req, timeout=10)
            still_held = not held.done()
            assert held.result(timeout=10).model_name == "recommend"
    finally:
        channel.close()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.details() == OVERLOADED
    assert still_held
    assert _shed_counts(proxy) == {"be_grpc_shed": 1, "be_http_shed": 0}
