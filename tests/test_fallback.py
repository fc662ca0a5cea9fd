"""The degraded-answer fallback server, as a real process, over gRPC and HTTP (tritonclient, RecClient, urllib).

Refusals are compared with a real tritonserver serving the real ensembles (the shared ``server`` fixture), so
"same rules, same texts" is checked against Triton itself, not against a copy of its strings.
"""

from __future__ import annotations

import csv
import json
import threading
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from recserve.control.client import RecClient
from recserve.control.runtime.fallback import DATA_DIR, FallbackConfig, FallbackError, FallbackServer
from recserve.control.runtime.procs import port_in_use


@pytest.fixture(scope="module")
def fallback(tmp_path_factory):
    srv = FallbackServer(FallbackConfig(workdir=tmp_path_factory.mktemp("fallback")))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def catalogue() -> dict[int, tuple[int, str]]:
    with (DATA_DIR / "catalog.csv").open() as f:
        return {int(r["item_id"]): (int(r["category_id"]), r["title"]) for r in csv.DictReader(f)}


def _infer(url: str, protocol: str, model: str, arrays: dict[str, tuple[np.ndarray, str]]):
    mod = grpcclient if protocol == "grpc" else httpclient
    client = mod.InferenceServerClient(url)
    inputs = []
    for name, (value, dtype) in arrays.items():
        t = mod.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    try:
        return client.infer(model, inputs)
    finally:
        client.close()


def _refusal(url: str, protocol: str, model: str, arrays) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as err:
        _infer(url, protocol, model, arrays)
    return str(err.value.status()), err.value.message()


I64, F32, OBJ = np.int64, np.float32, object
BAD = {
    "history-limit": ("recommend", {"user_id": ([[1]], I64, "INT64"), "history": ([[1] * 1001], I64, "INT64")}),
    "negative-item": ("recommend", {"user_id": ([[1]], I64, "INT64"), "history": ([[1, -2]], I64, "INT64")}),
    "negative-user": ("recommend", {"user_id": ([[-1]], I64, "INT64"), "history": ([[1]], I64, "INT64")}),
    "data-type": ("recommend", {"user_id": ([[1.0]], F32, "FP32"), "history": ([[1]], I64, "INT64")}),
    "shape": ("recommend", {"user_id": ([[[1]]], I64, "INT64"), "history": ([[1]], I64, "INT64")}),
    "batch-65": ("recommend", {"user_id": ([[1]] * 65, I64, "INT64"), "history": ([[1]] * 65, I64, "INT64")}),
    "batch-mismatch": ("recommend", {"user_id": ([[1]] * 2, I64, "INT64"), "history": ([[1]] * 3, I64, "INT64")}),
    "missing-input": ("recommend", {"user_id": ([[1]], I64, "INT64")}),
    "extra-input": (
        "recommend",
        {"user_id": ([[1]], I64, "INT64"), "history": ([[1]], I64, "INT64"), "foo": ([[1]], I64, "INT64")},
    ),
    "unknown-model": ("nosuch", {"user_id": ([[1]], I64, "INT64")}),
    "empty-query": ("search", {"query": ([[b""]], OBJ, "BYTES")}),
    "blank-query": ("search", {"query": ([[b"   "]], OBJ, "BYTES")}),
    "long-query": ("search", {"query": ([[b"x" * 257]], OBJ, "BYTES")}),
    "bad-utf8": ("search", {"query": ([[b"\xff\xfe"]], OBJ, "BYTES")}),
    "no-word": ("search", {"query": ([[b"?!"]], OBJ, "BYTES")}),
    "query-shape": ("search", {"query": ([[b"a", b"b"]], OBJ, "BYTES")}),
    "search-negative-user": ("search", {"query": ([[b"boots"]], OBJ, "BYTES"), "user_id": ([[-4]], I64, "INT64")}),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_refusals_match_the_real_ensembles_word_for_word(server, fallback, protocol, case):
    model, spec = BAD[case]
    arrays = {n: (np.asarray(v, dtype=t), d) for n, (v, t, d) in spec.items()}
    real = _refusal(server.grpc_url if protocol == "grpc" else server.http_url, protocol, model, arrays)
    ours = _refusal(fallback.grpc_url if protocol == "grpc" else fallback.http_url, protocol, model, arrays)
    assert ours == real
    assert fallback.is_alive() and fallback.ready()


def test_the_fallback_runs_below_the_instances_cpu_priority(fallback):
    """Degraded answers get the CPU full answers leave: nice 10, the instances serve at nice 5 (FleetConfig)."""
    import os

    from recserve.control.fleet.config import FleetConfig

    assert os.getpriority(os.PRIO_PROCESS, fallback.pid) == fallback.config.nice == 10 > FleetConfig().instance_nice


def test_search_without_query_names_the_missing_input(fallback):
    """The one deliberate difference: Triton 2.51 answers 'unexpected deadlock' from inside the ensemble."""
    status, msg = _refusal(fallback.grpc_url, "grpc", "search", {"user_id": (np.asarray([[1]], I64), "INT64")})
    assert status == "StatusCode.INVALID_ARGUMENT" and "missing required input(s) ['query']" in msg


def test_metadata_and_health_match_triton(server, fallback):
    for model in ("recommend", "search"):
        real = grpcclient.InferenceServerClient(server.grpc_url).get_model_metadata(model, as_json=True)
        ours = grpcclient.InferenceServerClient(fallback.grpc_url).get_model_metadata(model, as_json=True)
        assert ours == real
        with urllib.request.urlopen(f"http://{fallback.http_url}/v2/models/{model}") as r:
            real_http = json.loads(urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}").read())
            assert json.loads(r.read()) == real_http
    g = grpcclient.InferenceServerClient(fallback.grpc_url)
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready("recommend") and g.is_model_ready("search")
    assert not g.is_model_ready("nosuch")
    h = httpclient.InferenceServerClient(fallback.http_url)
    assert h.is_server_ready() and h.is_model_ready("search") and not h.is_model_ready("nosuch")


def test_admin_calls_are_not_served(fallback):
    g = grpcclient.InferenceServerClient(fallback.grpc_url)
    with pytest.raises(InferenceServerException) as err:
        g.load_model("recommend")
    assert err.value.status() == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException):
        g.register_system_shared_memory("x", "/recserve-x", 64)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_answers_are_marked_degraded_and_real_ones_are_not(server, fallback, protocol):
    url = fallback.grpc_url if protocol == "grpc" else fallback.http_url
    with RecClient(url, protocol) as c:
        rec, found = c.recommend(7, [1, 2, 3]), c.search("red leather boots")
    for r in (rec, found):
        assert r.degraded and len(r.item_ids) == 20 and len(set(r.item_ids)) == 20 and min(r.item_ids) > 0
        assert r.scores == sorted(r.scores, reverse=True)
    real_url = server.grpc_url if protocol == "grpc" else server.http_url
    with RecClient(real_url, protocol) as c:
        assert not c.recommend(7, [1, 2, 3]).degraded and not c.search("boots").degraded


@pytest.mark.parametrize(
    "model,inputs",
    [
        ("search", [{"name": "query", "shape": [1, 1], "datatype": "BYTES", "data": ["red leather boots"]}]),
        (
            "recommend",
            [
                {"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [42]},
                {"name": "history", "shape": [1, 3], "datatype": "INT64", "data": [10, 11, 12]},
            ],
        ),
    ],
)
def test_plain_json_as_in_the_readme_answers_with_the_degraded_parameter(fallback, model, inputs):
    req = urllib.request.Request(
        f"http://{fallback.http_url}/v2/models/{model}/infer", json.dumps({"inputs": inputs}).encode()
    )
    answer = json.loads(urllib.request.urlopen(req).read())
    assert answer["parameters"] == {"degraded": True}
    ids = next(o for o in answer["outputs"] if o["name"] == "item_ids")
    assert ids["shape"] == [1, 20] and len(set(ids["data"])) == 20
    if model == "recommend":
        assert not {10, 11, 12} & set(ids["data"])


def test_grpc_typed_contents_are_read_like_raw_ones(fallback):
    """Clients other than tritonclient may send InferTensorContents instead of raw bytes."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    req = service_pb2.ModelInferRequest(model_name="recommend")
    user = req.inputs.add(name="user_id", datatype="INT64", shape=[1, 1])
    user.contents.int64_contents.append(42)
    hist = req.inputs.add(name="history", datatype="INT64", shape=[1, 3])
    hist.contents.int64_contents.extend([10, 11, 12])
    with grpc.insecure_channel(fallback.grpc_url) as channel:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=5)
    assert resp.parameters["degraded"].bool_param
    typed = np.frombuffer(resp.raw_output_contents[0], dtype=np.int64).tolist()
    with RecClient(fallback.grpc_url) as c:
        assert typed == c.recommend(42, [10, 11, 12]).item_ids


def test_recommend_uses_the_history_categories_and_never_returns_the_history(fallback, catalogue):
    by_cat: dict[int, list[int]] = {}
    for item, (cat, _) in catalogue.items():
        by_cat.setdefault(cat, []).append(item)
    cat = max(by_cat, key=lambda c: len(by_cat[c]))
    history = by_cat[cat][:10]  # ten items of one category, the category keeps more than 20 others
    with RecClient(fallback.grpc_url) as c:
        r = c.recommend(3, history)
        assert not set(history) & set(r.item_ids)
        assert {catalogue[i][0] for i in r.item_ids} == {cat}
        popular = c.recommend(3, []).item_ids  # no history: overall popular items
        big = c.recommend(3, popular + list(range(1, 981)))  # 1,000 items, the popular ones among them
        assert len(set(big.item_ids)) == 20 and not set(big.item_ids) & set(popular + list(range(1, 981)))


def test_search_ranks_title_matches_first(fallback, catalogue):
    title = catalogue[1][1]  # e.g. "blue steel hiking camera horizon"
    words = title.split()[:3]
    with RecClient(fallback.grpc_url) as c:
        r = c.search(" ".join(w.upper() for w in words))  # the served tokenizer lower-cases
    assert 1 in r.item_ids[:5]
    for item in r.item_ids[:5]:
        assert set(words) & set(catalogue[item][1].split())
    with RecClient(fallback.grpc_url) as c:
        none = c.search("zzzz-qqqq")  # no title word: popular items, still 20
    assert len(set(none.item_ids)) == 20 and none.degraded


def test_batch_of_64_rows(fallback):
    users = np.arange(64, dtype=I64).reshape(64, 1)
    hist = np.tile(np.asarray([[0, 5, 6]], dtype=I64), (64, 1))
    r = _infer(fallback.grpc_url, "grpc", "recommend", {"user_id": (users, "INT64"), "history": (hist, "INT64")})
    assert r.as_numpy("item_ids").shape == (64, 20) and r.as_numpy("scores").shape == (64, 20)
    assert not {5, 6} & set(r.as_numpy("item_ids").reshape(-1).tolist())


def test_cpu_per_request_and_the_counters(fallback):
    """2,000 requests over gRPC; the server's own CPU time (user + system) per request is printed. The bound only
    catches per-request recomputation of the tables (that costs ~1 s), not noise of the shared cores."""
    proc = psutil.Process(fallback.pid)
    before = proc.cpu_times()
    n = 2000
    with RecClient(fallback.grpc_url) as c:
        for k in range(n // 2):
            c.recommend(k, [k % 3000 + 1, (k * 7) % 3000 + 1])
            c.search(("red boots", "blue camera", "oak wallet")[k % 3])
    after = proc.cpu_times()
    _refusal(
        fallback.grpc_url,
        "grpc",
        "recommend",
        {"user_id": (np.asarray([[-1]], I64), "INT64"), "history": (np.asarray([[1]], I64), "INT64")},
    )
    cpu_ms = ((after.user - before.user) + (after.system - before.system)) * 1000 / n
    print(f"\nfallback server CPU per request: {cpu_ms:.3f} ms (gRPC, {n} requests, recommend + search)")
    assert cpu_ms < 20
    metrics = urllib.request.urlopen(f"http://{fallback.http_url}/metrics").read().decode()
    degraded = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("recserve_fallback_requests_total{") and 'outcome="degraded"' in line
    )
    assert degraded >= n
    assert 'recserve_fallback_requests_total{model="recommend",outcome="refused",protocol="grpc"}' in metrics


def test_start_refuses_a_busy_port_and_missing_data_and_stop_frees_the_ports(fallback, tmp_path):
    with pytest.raises(FallbackError, match=f"grpc port {fallback.config.grpc_port} is already in use"):
        FallbackServer(FallbackConfig(workdir=tmp_path, grpc_port=fallback.config.grpc_port)).start()
    with pytest.raises(FallbackError, match="events_csv .* not found"):
        FallbackServer(FallbackConfig(workdir=tmp_path, events_csv=Path(tmp_path / "none.csv"))).start()
    for bad, rule in (
        ({"workers": 0}, "workers must be >= 1"),
        ({"grpc_port": 70000}, "grpc_port must be 0 .pick a free one. or 1..65535"),
        ({"grpc_port": 5000, "http_port": 5000}, "grpc_port and http_port must differ"),
    ):
        with pytest.raises(FallbackError, match=rule):
            FallbackServer(FallbackConfig(workdir=tmp_path, **bad)).start()
    other = FallbackServer(FallbackConfig(workdir=tmp_path, name="other", workers=1, max_concurrent=1))
    try:
        other.start()
        ports = (other.config.grpc_port, other.config.http_port)
        outcomes = _burst(other.grpc_url, 300)
    finally:
        code = other.stop()
    print(
        f"\nmax_concurrent=1, 300 async calls: {outcomes.count('ok')} answered, "
        f"{outcomes.count('StatusCode.RESOURCE_EXHAUSTED')} refused"
    )
    # Its own bound: calls sent without waiting, one admitted at a time; the rest refused at once, never queued.
    assert set(outcomes) == {"ok", "StatusCode.RESOURCE_EXHAUSTED"}
    assert code == 0 and not other.is_alive()
    assert not any(port_in_use(p) for p in ports)
    assert "fallback stopped" in other.log_path.read_text()


def _burst(url: str, n: int) -> list[str]:
    """``n`` search calls sent without waiting for answers; the status of each ("ok" or the gRPC status)."""
    client = grpcclient.InferenceServerClient(url)
    query = grpcclient.InferInput("query", [1, 1], "BYTES")
    query.set_data_from_numpy(np.asarray([[b"red boots"]], dtype=object))
    outcomes: list[str] = []
    done = threading.Semaphore(0)

    def collect(result, error):
        outcomes.append(error.status() if error else "ok")
        done.release()

    try:
        for _ in range(n):
            client.async_infer("search", [query], collect)
        for _ in range(n):
            assert done.acquire(timeout=30)
    finally:
        client.close()
    return outcomes


def test_haproxy_serves_it_as_just_another_backend(fallback, tmp_path):
    """The fleet's own HAProxy config (h2 to the gRPC port, HTTP health check on the HTTP port) in front of the
    fallback: tritonclient through the proxy gets degraded answers and the same refusals."""
    import time

    from recserve.control.routing.haproxy import HAProxy, HAProxyConfig
    from recserve.control.runtime.procs import free_port

    proxy = HAProxy(HAProxyConfig(workdir=tmp_path, grpc_port=free_port(), http_port=free_port(), slots=1))
    proxy.start()
    try:
        proxy.bind_slot(0, fallback.config.grpc_port, fallback.config.http_port)
        proxy.set_state(0, "ready")
        proxy.route("first", 0)
        deadline = time.monotonic() + 10
        while not proxy.slot_up(0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proxy.slot_up(0), "HAProxy's health check never passed on the fallback's HTTP port"
        grpc_url, http_url = f"127.0.0.1:{proxy.config.grpc_port}", f"127.0.0.1:{proxy.config.http_port}"
        for url, protocol in ((grpc_url, "grpc"), (http_url, "http")):
            with RecClient(url, protocol) as c:
                r = c.recommend(1, [1, 2, 3])
                assert r.degraded and not {1, 2, 3} & set(r.item_ids) and c.search("boots").degraded
        arrays = {"query": (np.asarray([[b""]], dtype=object), "BYTES")}
        assert _refusal(grpc_url, "grpc", "search", arrays) == _refusal(fallback.grpc_url, "grpc", "search", arrays)
    finally:
        proxy.stop()
    assert not proxy.is_alive()


def test_the_tensorrt_twins_get_the_same_degraded_answers(fallback):
    with RecClient(fallback.grpc_url, model_suffix="_trt") as trt, RecClient(fallback.grpc_url) as onnx:
        assert trt.search("red boots") == onnx.search("red boots") and trt.recommend(1, [5]).degraded
    arrays = {"query": (np.asarray([[b""]], dtype=object), "BYTES")}
    assert _refusal(fallback.grpc_url, "grpc", "search_trt", arrays)[1] == (
        "in ensemble 'search_trt', input 'query' must not be empty"
    )


def test_malformed_tensors_and_oversized_bodies_are_refused_and_it_keeps_serving(fallback):
    import http.client

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    req = service_pb2.ModelInferRequest(model_name="search")
    req.inputs.add(name="query", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append(b"\x10\x00")  # a length prefix cut short
    with grpc.insecure_channel(fallback.grpc_url) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input 'query'" in err.value.details()
    conn = http.client.HTTPConnection(*fallback.http_url.split(":"), timeout=5)
    conn.putrequest("POST", "/v2/models/search/infer")
    conn.putheader("Content-Length", str(1 << 30))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and b"Content-Length" in resp.read()
    conn.close()
    with RecClient(fallback.http_url, "http") as c:
        assert c.search("boots").degraded
