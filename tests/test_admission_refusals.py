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
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from recserve.control.routing.haproxy import OVERLOADED, HAProxy, HAProxyConfig, InitialRouting
from recserve.control.runtime.triton import free_port

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


@contextmanager
def _stand_in():
    """The stand-in instance: gRPC and HTTP servers that hold each inference for ``HOLD_S`` (their ports)."""
    http = ThreadingHTTPServer(("127.0.0.1", free_port()), _SlowHTTP)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    g = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_SlowGRPC(), g)
    g_port = g.add_insecure_port(f"127.0.0.1:{free_port()}")
    g.start()
    try:
        yield g_port, http.server_address[1]
    finally:
        g.stop(0)
        http.shutdown()


@contextmanager
def _stand_in_proxy(workdir, slots: int, route: str, fallback_timeout_queue_ms: int = 0):
    """HAProxy with ``slots`` slots, each bound to the one stand-in instance (limit 1 per server), routed to
    ``route`` (``pool`` or ``first``: slot 0 first); with ``fallback_timeout_queue_ms`` the stand-in is the
    degraded-answer server too (limit 1, a queue of 1 that long), else there is none."""
    with _stand_in() as (g_port, http_port):
        h = HAProxy(HAProxyConfig(workdir=workdir, grpc_port=free_port(), http_port=free_port(), slots=slots,
                                  maxconn=1, timeout_server_ms=3000, fallback_maxconn=1, fallback_queue=1,
                                  fallback_timeout_queue_ms=fallback_timeout_queue_ms or 100))
        try:
            h.start()
            for slot in range(slots):
                h.bind_slot(slot, g_port, http_port)
                h.set_state(slot, "ready")
            if fallback_timeout_queue_ms:
                h.bind_fallback(g_port, http_port)
            h.route(route, 0)

            def up() -> bool:
                rows = h.servers()
                return all(h.slot_up(s) for s in range(slots)) and (
                    not fallback_timeout_queue_ms or rows["be_grpc_fallback/fb"]["srv_op_state"] == "2")

            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not up():
                time.sleep(0.1)  # health checks (rise 2 x 200 ms)
            yield h
        finally:
            h.stop()


@pytest.fixture
def proxy(tmp_path):
    with _stand_in_proxy(tmp_path, 1, "pool") as h:
        yield h


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


def _grpc_second_while_first_held(h: HAProxy) -> tuple[grpc.RpcError | None, bool]:
    """Hold one gRPC inference, send a second while it is held: (the second's error or None, still held)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{h.config.grpc_port}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    req = service_pb2.ModelInferRequest(model_name="recommend")
    error = None
    try:
        with futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(stub.ModelInfer, req, timeout=10)
            time.sleep(0.3)
            try:
                stub.ModelInfer(req, timeout=10)
            except grpc.RpcError as exc:
                error = exc
            still_held = not held.done()
            assert held.result(timeout=10).model_name == "recommend"
    finally:
        channel.close()
    return error, still_held


def test_grpc_full_pool_gets_resource_exhausted_at_once(proxy):
    refused, still_held = _grpc_second_while_first_held(proxy)
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert refused.details() == OVERLOADED
    assert still_held
    assert _shed_counts(proxy) == {"be_grpc_shed": 1, "be_http_shed": 0}


def test_primary_standby_admits_only_what_the_primary_can_take(tmp_path):
    """``balance first`` lists the standby as a normal server (a retry may be redispatched to it), so the
    backend's free slots include the standby's: admission must count the primary's alone, or a full primary
    overflows onto the standby and the host takes twice its limit. Once the primary is down, the standby
    takes the traffic within its own limit."""
    with _stand_in_proxy(tmp_path, 2, "first") as h:
        refused, still_held = _grpc_second_while_first_held(h)
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert still_held and _shed_counts(h)["be_grpc_shed"] == 1
        served = {r["svname"]: int(r["stot"]) for r in h.stat() if r["pxname"] == "be_grpc_first_0"}
        assert served["s0"] == 1 and served["s1"] == 0  # nothing overflowed onto the standby
        h.set_state(0, "maint")  # the primary out: the standby serves, one at a time
        refused, _ = _grpc_second_while_first_held(h)
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        served = {r["svname"]: int(r["stot"]) for r in h.stat() if r["pxname"] == "be_grpc_first_0"}
        assert served["s1"] == 1 and _shed_counts(h)["be_grpc_shed"] == 2


@pytest.mark.parametrize("wait_ms", [300, 3000])
def test_a_shed_burst_waits_briefly_for_a_degraded_answer_then_is_refused_in_the_same_words(tmp_path, wait_ms):
    """Pool and fallback full (one request each): the next shed request waits in the fallback's queue (depth 1)
    for up to ``wait_ms``, a further one is refused at once. The waiting one gets the degraded answer when a
    slot frees in time (3000 ms: the held one ends after 0.8 s), else the same RESOURCE_EXHAUSTED refusal, never
    HAProxy's 503 (gRPC clients would see UNAVAILABLE and retry into the overload)."""
    with _stand_in_proxy(tmp_path, 1, "pool", fallback_timeout_queue_ms=wait_ms) as h:
        channel = grpc.insecure_channel(f"127.0.0.1:{h.config.grpc_port}")
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name="recommend")

        def call():
            t = time.monotonic()
            try:
                stub.ModelInfer(req, timeout=10)
                return "served", time.monotonic() - t
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()}", time.monotonic() - t

        try:
            with futures.ThreadPoolExecutor(3) as pool:
                held = [pool.submit(call) for _ in range(2)]  # the pool's one slot, then the fallback's
                time.sleep(0.3)
                waiting = pool.submit(call)
                time.sleep(0.1)
                refused_now = call()
                waited = waiting.result(timeout=10)
                assert [f.result(timeout=10)[0] for f in held] == ["served", "served"]
        finally:
            channel.close()
    refusal = f"RESOURCE_EXHAUSTED: {OVERLOADED}"
    assert refused_now[0] == refusal and refused_now[1] < 0.25, refused_now  # the queue was full: at once
    if wait_ms == 300:
        assert waited[0] == refusal and waited[1] >= 0.25, waited  # its wait ran out: the refusal, not a 503
    else:
        assert waited[0] == "served", waited  # the fallback's slot freed in time: the degraded answer
    # HAProxy's own account of it, read back the way the drills' report reads it (control/routing/accesslog.py)
    from recserve.control.routing.accesslog import read_from
    from recserve.drills.breakdown import haproxy_timers

    timers = haproxy_timers(read_from(tmp_path / "access.log", 0)[0], 0, float("inf"))
    assert timers["instances"]["requests"] == 1 and timers["refused"]["requests"] == 1, timers
    assert timers["refused"]["ta_p99_ms"] < 50, timers  # refused at once (Tt would add the channel's idle time)
    waited_kind = "refused after waiting" if wait_ms == 300 else "degraded"
    assert timers["degraded"]["requests"] == (1 if wait_ms == 300 else 2), timers
    assert timers[waited_kind]["tw_p99_ms"] >= 250, timers  # the waiting one's time in the fallback's queue
    if wait_ms == 300:  # HAProxy's own account: a server-side timeout while queued, answered by the errorfile
        assert timers[waited_kind]["statuses"] == {"503 sQ": 1}, timers


def test_a_restarted_haproxy_serves_its_first_request_from_the_routing_in_its_config(tmp_path):
    """A HAProxy started again after a crash must not refuse the clients reconnecting at once while its
    runtime state is rebuilt: the Router writes the routing into the config (``InitialRouting``), so the
    first request right after start is served, with no runtime command and no health-check ``rise`` to wait
    for (bound at runtime, the slot sits in maintenance until then: the request is refused)."""
    outcomes = {}
    with _stand_in() as (g_port, http_port):
        for baked in (False, True):
            workdir = tmp_path / str(baked)
            workdir.mkdir()
            (workdir / "routes.map").write_text("grpc be_grpc_pool\nhttp be_http_pool\n")  # the route outlives it
            init = InitialRouting(slots={0: (g_port, http_port)}, pool={0}, limits={0: 4})
            h = HAProxy(HAProxyConfig(workdir=workdir, grpc_port=free_port(), http_port=free_port(), slots=2,
                                      timeout_server_ms=3000, initial=init if baked else None))
            h.start()
            try:
                channel = grpc.insecure_channel(f"127.0.0.1:{h.config.grpc_port}")
                try:
                    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                    stub.ModelInfer(service_pb2.ModelInferRequest(model_name="recommend"), timeout=10)
                    outcomes[baked] = "served"
                except grpc.RpcError as exc:
                    outcomes[baked] = exc.code().name
                finally:
                    channel.close()
                if baked:
                    assert h.servers()["be_grpc_pool/s0"]["srv_op_state"] == "2"
                    assert {r["slim"] for r in h.stat() if r["svname"] == "s0" and r["pxname"].startswith("be_")} \
                        == {"4"}
            finally:
                h.stop()
    assert outcomes == {False: "RESOURCE_EXHAUSTED", True: "served"}, outcomes


def test_a_retry_away_from_a_dead_server_waits_for_a_live_one(tmp_path):
    """Slot 0's gRPC port refuses connections while its health check still passes (a server that just died,
    not yet marked down); slot 1 is alive with its one slot held. Admission counts slot 0's free slot and admits
    a second request; least-connections sends it to slot 0, the connection is refused, and the retry is
    redispatched. Slot 1 is full: without room in its queue HAProxy's balancer falls back to the server it was
    told to avoid, the dead one, and the client gets 503 (UNAVAILABLE; crash-at-peak saw 8 "503 SC"). With
    ``server_maxqueue`` the retry waits for slot 1 and is served."""
    with _stand_in() as (g_port, http_port):
        dead = free_port()  # nothing listens here
        h = HAProxy(HAProxyConfig(workdir=tmp_path, grpc_port=free_port(), http_port=free_port(), slots=2,
                                  maxconn=1, timeout_server_ms=3000, timeout_queue_ms=3000))
        try:
            h.start()
            h.bind_slot(0, dead, http_port)
            h.bind_slot(1, g_port, http_port)
            for slot in (0, 1):
                h.set_state(slot, "ready")
            h.route("pool", 0)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(h.slot_up(s) for s in (0, 1)):
                time.sleep(0.1)
            error, _ = _grpc_second_while_first_held(h)
            assert error is None, error  # both served by slot 1, the second after the first freed its slot
            pool = {r["svname"]: r for r in h.stat() if r["pxname"] == "be_grpc_pool"}
            assert int(pool["s1"]["stot"]) == 2 and int(pool["BACKEND"]["wredis"]) >= 1, pool
        finally:
            h.stop()
