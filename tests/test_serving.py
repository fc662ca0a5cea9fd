"""The embedded runtime serving the committed model repository with a real tritonserver.

One server (free ports) is shared by the module; every test leaves it ready for the next, which is
itself part of what is checked: bad input must never take the server down.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from recserve.control.client import RecClient
from recserve.control.runtime.triton import (
    ADMIN_HEADER_GRPC,
    ADMIN_HEADER_HTTP,
    DEFAULT_REPOSITORY,
    TritonConfig,
    TritonError,
    TritonServer,
    port_in_use,
    servable_models,
)


@pytest.fixture(scope="module")
def grpc(server):
    with RecClient(server.grpc_url, "grpc") as c:
        yield c


def _infer_raw(server, model: str, inputs: dict[str, tuple[np.ndarray, str]]):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        tensors = []
        for name, (array, dtype) in inputs.items():
            t = grpcclient.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            tensors.append(t)
        return client.infer(model, tensors)
    finally:
        client.close()


def test_repository_loads_both_ensembles_and_no_trt_without_gpu(server):
    loaded = server.loaded_versions()
    for name in ("recommend", "search", "retrieval", "ranker", "search_model", "recommend_pre", "search_pre"):
        assert name in loaded, f"{name} not loaded: {loaded}"
    assert not any(n.endswith("_trt") for n in loaded), "TensorRT models must not load on a host without a GPU"
    assert server.live() and server.ready()


def test_typed_http_api_of_the_server(server):
    """What callers used to read through TritonServer._request: status, metadata, a model's config."""
    assert server.live_status() == 200
    assert server.server_metadata()["version"] == "2.51.0"
    cfg = server.model_config("ranker")
    assert cfg["name"] == "ranker" and "dynamic_batching" in cfg
    with pytest.raises(TritonError, match="no_such_model"):
        server.model_config("no_such_model")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_recommend_and_search_answer_over_both_protocols(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with RecClient(url, protocol) as c:
        rec = c.recommend(user_id=3, history=[10, 11, 12])
        found = c.search("red leather boots", user_id=3)
        anon = c.search("red leather boots")
    for result in (rec, found, anon):
        assert len(result.item_ids) == 20 and len(result.scores) == 20
        assert len(set(result.item_ids)) == 20, "duplicates in the answer"
        assert 0 not in result.item_ids, "padding id returned"
        assert result.scores == sorted(result.scores, reverse=True), "not best first"
    assert not {10, 11, 12} & set(rec.item_ids), "history items recommended again"


def test_whole_history_is_excluded_not_only_the_model_window(grpc):
    first = grpc.recommend(user_id=5, history=[])
    seen = first.item_ids[:10]
    history = seen + list(range(1, 200))  # the seen items are far outside the model's last-50 window
    again = grpc.recommend(user_id=5, history=history)
    assert not set(history) & set(again.item_ids)


def test_unknown_user_gets_sensible_results(grpc):
    cold = grpc.recommend(user_id=10**12, history=[])
    assert len(set(cold.item_ids)) == 20 and all(i > 0 for i in cold.item_ids)


@pytest.mark.parametrize(
    "model,inputs,fragment",
    [
        ("recommend", {"user_id": ([[1]], "INT64"), "history": ([[1, -2]], "INT64")}, "'history' item ids must"),
        ("recommend", {"user_id": ([[-1]], "INT64"), "history": ([[1]], "INT64")}, "'user_id' must be >= 0"),
        ("recommend", {"user_id": ([[1]], "INT64"), "history": ([[1] * 1001], "INT64")}, "the limit is 1000"),
        ("recommend", {"user_id": ([[1.0]], "FP32"), "history": ([[1]], "INT64")}, "user_id"),
        ("recommend", {"user_id": ([[[1]]], "INT64"), "history": ([[1]], "INT64")}, "user_id"),
        ("recommend", {"user_id": ([[1]] * 65, "INT64"), "history": ([[1]] * 65, "INT64")}, "batch-size must be <= 64"),
        ("search", {"query": ([[b""]], "BYTES")}, "'query' must not be empty"),
        ("search", {"query": ([[b"   "]], "BYTES")}, "'query' must not be empty"),
        ("search", {"query": ([[b"x" * 257]], "BYTES")}, "the limit is 256"),
        ("search", {"query": ([[b"\xff\xfe"]], "BYTES")}, "valid UTF-8"),
        ("search", {"query": ([[b"?!"]], "BYTES")}, "at least one word"),
        ("search", {"query": ([[b"boots"]], "BYTES"), "user_id": ([[-4]], "INT64")}, "'user_id' must be >= 0"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_rule_and_server_stays_ready(server, model, inputs, fragment):
    arrays = {}
    for name, (value, dtype) in inputs.items():
        np_dtype = {"INT64": np.int64, "FP32": np.float32, "BYTES": object}[dtype]
        arrays[name] = (np.asarray(value, dtype=np_dtype), dtype)
    with pytest.raises(InferenceServerException) as err:
        _infer_raw(server, model, arrays)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
    assert fragment in err.value.message(), err.value.message()
    assert server.ready() and server.model_ready(model)
    assert len(RecClient(server.grpc_url).search("boots").item_ids) == 20  # others unaffected


def test_http_bad_input_is_400(server):
    client = httpclient.InferenceServerClient(server.http_url)
    t = httpclient.InferInput("query", [1, 1], "BYTES")
    t.set_data_from_numpy(np.asarray([[b""]], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        client.infer("search", [t])
    assert err.value.status() == "400" and "must not be empty" in err.value.message()


def test_batched_request_answers_each_row(server):
    hist = np.asarray([[0, 0, 7], [4, 5, 6]], dtype=np.int64)  # left-padded to equal length
    users = np.asarray([[1], [2]], dtype=np.int64)
    r = _infer_raw(server, "recommend", {"user_id": (users, "INT64"), "history": (hist, "INT64")})
    ids = r.as_numpy("item_ids")
    assert ids.shape == (2, 20)
    assert 7 not in ids[0] and not {4, 5, 6} & set(ids[1].tolist())
    single = RecClient(server.grpc_url).recommend(2, [4, 5, 6])
    assert ids[1].tolist() == single.item_ids


def test_port_in_use_is_a_clear_error(server, tmp_path):
    other = TritonServer(TritonConfig(workdir=tmp_path, grpc_port=server.config.grpc_port))
    with pytest.raises(TritonError, match=f"grpc port {server.config.grpc_port} is already in use"):
        other.start()
    assert not other.is_alive()


def test_model_load_failure_quotes_the_server(tmp_path):
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "onnxruntime"\nmax_batch_size: 4\n'
        'input [ { name: "x", data_type: TYPE_FP32, dims: [ 2 ] } ]\n'
        'output [ { name: "y", data_type: TYPE_FP32, dims: [ 2 ] } ]\n'
    )
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    srv = TritonServer(TritonConfig(model_repository=repo, workdir=tmp_path / "w", startup_timeout_s=60))
    with pytest.raises(TritonError) as err:
        srv.start()
    srv.stop()
    assert "broken" in str(err.value) and "failed to load" in str(err.value)
    assert not srv.is_alive()


def test_stop_leaves_no_process_or_port(tmp_path):
    srv = TritonServer(TritonConfig(workdir=tmp_path, models=["search"]))
    srv.start()
    ports = (srv.config.http_port, srv.config.grpc_port, srv.config.metrics_port)
    pid = srv.pid
    assert srv.shm_usage()[0] > 0  # the Python steps' stubs hold regions under this server's own prefix
    assert srv.stop() == 0
    assert srv.shm_usage() == (0, 0)
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not any(port_in_use(p) for p in ports)
    assert "search" in srv.log_path.read_text()


def test_a_killed_server_s_shm_regions_go_with_the_next_stop_or_start(tmp_path):
    """SIGKILL leaves the stubs' /dev/shm regions; the owner removes exactly its own prefix's regions."""
    import os
    import signal

    from recserve.control.runtime.procs import kill_group
    from recserve.drills.faults import group_members

    srv = TritonServer(TritonConfig(workdir=tmp_path, models=["search"], nice=19))
    srv.start()
    regions = srv.shm_usage()[0]
    # nice=19 (how the fleet loads an instance out of rotation): the server and its backend stubs inherit it
    group = group_members(srv.pid)
    assert len(group) > 1 and {os.getpriority(os.PRIO_PROCESS, p) for p in group} == {19}
    kill_group(srv.pid, signal.SIGKILL)
    srv.process.wait(10)
    assert srv.shm_usage()[0] == regions > 0  # what a crash leaves behind
    other = Path("/dev/shm") / f"{srv.shm_prefix[:-1]}x-{os.getpid()}"  # another server's region, same stem
    other.write_bytes(b"\0")
    try:
        srv.stop()
        assert srv.shm_usage() == (0, 0)
        assert other.exists(), "stop removed a region that is not this server's"
    finally:
        other.unlink(missing_ok=True)


def test_admin_apis_are_locked_on_every_server_started_without_a_key(server):
    """make serve, perf and test servers too: shared memory, logging, trace and repository need the admin key."""
    import urllib.error
    import urllib.request

    assert server.admin_key and (server.config.workdir / "admin.key").stat().st_mode & 0o777 == 0o600
    for path, body in (("/v2/logging", b'{"log_verbose_level": 1}'), ("/v2/trace/setting", b'{"trace_rate": "1"}'),
                       ("/v2/systemsharedmemory/region/x/register", b'{"key": "x", "offset": 0, "byte_size": 8}'),
                       ("/v2/repository/index", b"{}")):
        req = urllib.request.Request(f"http://{server.http_url}{path}", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=5)
        assert exc.value.code == 403, path
    assert server.ready()


def _http(server, method: str, path: str, key: str | None, body: bytes | None = None) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{server.http_url}{path}", data=body, method=method)
    if key is not None:
        req.add_header(ADMIN_HEADER_HTTP, key)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_statistics_key_reads_statistics_and_nothing_else(server):
    """perf_analyzer's key (on its command line, so readable where /proc has no hidepid) reads model statistics and
    cannot unload, load or list models; statistics need it (no key, or the admin key, gets 403/UNAVAILABLE)."""
    stats, admin = server.stats_key, server.admin_key
    assert stats and admin and stats != admin
    assert (server.config.workdir / "stats.key").stat().st_mode & 0o777 == 0o600
    assert _http(server, "GET", "/v2/models/search/stats", stats) == 200
    for key in (None, admin, stats + "x"):
        assert _http(server, "GET", "/v2/models/search/stats", key) == 403, key
    for path in ("/v2/repository/models/search/unload", "/v2/repository/models/search/load", "/v2/repository/index"):
        assert _http(server, "POST", path, stats, b"{}") == 403, path
    g = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert g.get_inference_statistics("search", headers={ADMIN_HEADER_GRPC: stats}).model_stats[0].name == "search"
        refused = ((lambda h: g.unload_model("search", headers=h), stats),
                   (lambda h: g.get_model_repository_index(headers=h), stats),
                   (lambda h: g.get_inference_statistics("search", headers=h), admin))
        for call, key in refused:
            with pytest.raises(InferenceServerException, match="restricted"):
                call({ADMIN_HEADER_GRPC: key})
    finally:
        g.close()
    assert server.model_ready("search") and "search" in server.loaded_versions()


def test_admin_key_is_fresh_at_every_start_and_an_adopter_reads_it_back(tmp_path):
    """No admin key outlives its tritonserver: each start makes a new one (0600 in the workdir, where a restarted
    control plane adopting the running process reads it back), stop removes it, and the old key opens nothing."""
    srv = TritonServer(TritonConfig(workdir=tmp_path, models=[], name="keys"))
    keys, stats = [], []
    try:
        for _ in range(2):
            srv.start()
            key_file = tmp_path / "admin.key"
            assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.read_text() == srv.admin_key
            keys.append(srv.admin_key)
            stats.append(srv.stats_key)
            adopter = TritonServer(TritonConfig(workdir=tmp_path, http_port=srv.config.http_port, name="keys"))
            assert adopter.admin_key == srv.admin_key and adopter.loaded_versions() == {}  # the repository API answers
            if len(keys) == 2:
                assert _http(srv, "POST", "/v2/repository/index", keys[0], b"{}") == 403  # the first start's key
            assert _http(srv, "POST", "/v2/repository/index", srv.admin_key, b"{}") == 200
            srv.stop()
            assert not key_file.exists()
    finally:
        srv.stop()
    assert keys[0] != keys[1], "the same admin key for two starts"
    assert stats[0] == stats[1], "the statistics key is kept (the front door and perf_analyzer hold it)"


def test_servable_models_skip_tensorrt_without_gpu():
    names = servable_models(DEFAULT_REPOSITORY, with_tensorrt=False)
    assert "recommend" in names and "search" in names
    assert not [n for n in names if n.endswith("_trt")]


def test_batched_steps_have_no_priority_levels_or_queue_policy_and_serve_probes(server):
    """Every composing model with a dynamic batcher has no priority levels and no queue policy: with either, Triton
    2.51 dispatches through an idle-consumer count with a 500 ms wait and held requests ~500 ms (perf/holds.py,
    docs/holds.md). The control plane's golden probes, at the default priority, are served through both ensembles."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    batched = {}
    for path in sorted(DEFAULT_REPOSITORY.glob("*/config.pbtxt")):
        cfg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        if cfg.HasField("dynamic_batching"):
            batched[cfg.name] = cfg.dynamic_batching
    assert {"ranker", "retrieval", "recommend_pre", "recommend_post", "search_pre", "search_model"} <= set(batched)
    for name, db in batched.items():
        assert db.priority_levels == 0 and not db.priority_queue_policy, name
        assert not db.HasField("default_queue_policy"), name
    with RecClient(server.grpc_url, "grpc") as probe:
        assert len(probe.recommend(7, [11, 12, 13]).item_ids) == 20
        assert probe.search("red shoes").item_ids
