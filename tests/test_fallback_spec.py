"""Degraded answers of a serving spec's models (``degraded`` in docs/bring-your-own-models.md): the fallback program
started with ``--spec`` answers each model from its answer file (or provider) over gRPC and HTTP with the degraded
flag, refuses bad input as Triton does, refuses the shed requests of a model without ``degraded``; HAProxy sends
those straight to its refusal, per model, over both protocols; a spec whose answer file does not fit the model's
config is refused before anything starts.

The repository is generated at test time (tests/byo_repository.py); real fallback program, HAProxy, tritonclient.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from recserve.control.client import is_degraded
from recserve.control.fallback import app
from recserve.control.routing.haproxy import OVERLOADED, HAProxy, HAProxyConfig, no_degraded_lines
from recserve.control.runtime.fallback import DATA_DIR, FallbackConfig, FallbackServer
from recserve.control.runtime.triton import free_port
from recserve.control.spec.spec import SpecError, load_spec
from tests.byo_repository import TOP_K, make_repository
from tests.test_admission_refusals import _stand_in

ROOT = Path(__file__).resolve().parent.parent
HAVE_DATA = (DATA_DIR / "events.csv").is_file() and (DATA_DIR / "catalog.csv").is_file()

PAGE_GOLDEN = [{"raw": {"content": [0.0] * 8, "shape": [8]}, "item_ids": {"content": [1, 2, 3, 4], "shape": [4]}}]
SIMILAR_GOLDEN = [{"item_id": {"content": [3], "shape": [1]}}]
TEXT_GOLDEN = [{"text": {"content": ["shoes"], "shape": [1]}}]
RANKER_GOLDEN = [{"dense": {"content": [0.0] * 8, "shape": [8]}, "sparse": {"content": [1, 2, 3, 4], "shape": [4]}}]


def _write_spec(base: Path, degraded: dict[str, dict | None], answers: dict[str, dict]) -> Path:
    """A spec over the generated repository ``base/repo``: rank_page, similar_items, query_norm, ctr_ranker, each
    with the given ``degraded`` (None: none); ``answers``: answer files by name."""
    for name, doc in answers.items():
        (base / name).write_text(json.dumps(doc))
    golden = {"rank_page": PAGE_GOLDEN, "similar_items": SIMILAR_GOLDEN, "query_norm": TEXT_GOLDEN,
              "ctr_ranker": RANKER_GOLDEN}
    outputs = {"rank_page": {"ctr": {"compare": "close", "atol": 1e-5}},
               "similar_items": {"item_ids": {"compare": "exact"}},
               "query_norm": {"token_ids": {"compare": "exact"}},
               "ctr_ranker": {"score": {"compare": "close", "atol": 1e-5}}}
    models = {}
    for name, data in golden.items():
        (base / f"{name}.golden.json").write_text(json.dumps({"data": data}))
        models[name] = {"golden": f"{name}.golden.json", "outputs": outputs[name]}
        if degraded.get(name) is not None:
            models[name]["degraded"] = degraded[name]
    path = base / "spec.yaml"
    path.write_text(yaml.safe_dump({"schemaVersion": 1, "repository": "repo", "models": models}))
    return path


PAGE_ANSWER = {"ctr": {"content": [0.25], "shape": [1]}}
SIMILAR_ANSWER = {"item_ids": {"content": list(range(1, TOP_K + 1)), "shape": [TOP_K]},
                  "scores": {"content": [1.0 / (k + 1) for k in range(TOP_K)], "shape": [TOP_K]}}


@pytest.fixture(scope="module")
def spec_fallback(tmp_path_factory):
    base = tmp_path_factory.mktemp("fbspec")
    repo = make_repository(base / "repo")
    text_answer = {"normalized": {"content": ["(busy)"], "shape": [1]},
                   "token_ids": {"content": [7] * _tokens(repo), "shape": [_tokens(repo)]}}
    degraded = {"rank_page": {"file": "page.json"}, "query_norm": {"file": "text.json"},
                "similar_items": {"provider": "popular_items"} if HAVE_DATA else {"file": "similar.json"}}
    spec = _write_spec(base, degraded, {"page.json": PAGE_ANSWER, "similar.json": SIMILAR_ANSWER,
                                        "text.json": text_answer})
    server = FallbackServer(FallbackConfig(workdir=base / "fb", model_repository=repo, spec=spec))
    server.start()
    try:
        yield base, repo, spec, server
    finally:
        server.stop()


def _tokens(repo: Path) -> int:
    cfg = (repo / "query_norm" / "config.pbtxt").read_text()
    line = next(ln for ln in cfg.splitlines() if '"token_ids"' in ln)
    return int(line.split("dims: [")[1].split("]")[0])


def _page_inputs(mod, batch: int, raw_type: str = "FP32"):
    raw = mod.InferInput("raw", [batch, 8], raw_type)
    raw.set_data_from_numpy(np.zeros((batch, 8), dtype=np.float32 if raw_type == "FP32" else np.float64))
    ids = mod.InferInput("item_ids", [batch, 4], "INT64")
    ids.set_data_from_numpy(np.ones((batch, 4), dtype=np.int64))
    return [raw, ids]


def _client(server: FallbackServer, protocol: str):
    if protocol == "grpc":
        return grpcclient, grpcclient.InferenceServerClient(server.grpc_url)
    return httpclient, httpclient.InferenceServerClient(server.http_url)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_spec_model_is_answered_from_its_answer_file_with_the_degraded_flag(spec_fallback, protocol):
    _, repo, _, server = spec_fallback
    mod, client = _client(server, protocol)
    try:
        r = client.infer("rank_page", _page_inputs(mod, 3))  # the answer broadcast over the batch
        assert is_degraded(r)
        np.testing.assert_array_equal(r.as_numpy("ctr"), np.full((3, 1), 0.25, np.float32))
        text = mod.InferInput("text", [2, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"Red Shoes"], [b"mug"]], dtype=object))
        r = client.infer("query_norm", [text])  # BYTES outputs too
        assert is_degraded(r) and r.as_numpy("normalized").reshape(-1).tolist() == [b"(busy)", b"(busy)"]
        assert r.as_numpy("token_ids").shape == (2, _tokens(repo))
        item = mod.InferInput("item_id", [1], "INT64")  # max_batch_size 0: the whole shape, answered as it is
        item.set_data_from_numpy(np.array([3], dtype=np.int64))
        r = client.infer("similar_items", [item])
        assert is_degraded(r)
        ids, scores = r.as_numpy("item_ids"), r.as_numpy("scores")
        assert ids.shape == (TOP_K,) and scores.shape == (TOP_K,) and ids.dtype == np.int64
        if HAVE_DATA:  # popular_items: distinct items of the build's data, best first
            assert len(set(ids.tolist())) == TOP_K and list(scores) == sorted(scores, reverse=True)
        meta = client.get_model_metadata("similar_items")
        shape = meta.outputs[0].shape if protocol == "grpc" else meta["outputs"][0]["shape"]
        assert [int(d) for d in shape] == [TOP_K]  # no batch dimension in the metadata either
    finally:
        client.close()


def _refusal(server: FallbackServer, protocol: str, model: str, inputs_of) -> str:
    mod, client = _client(server, protocol)
    try:
        with pytest.raises(InferenceServerException) as exc:
            client.infer(model, inputs_of(mod))
        return f"{exc.value.status()} {exc.value.message()}"
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_input_unknown_models_and_models_without_degraded_are_refused_like_triton(spec_fallback, protocol):
    server = spec_fallback[3]
    bad_type = _refusal(server, protocol, "rank_page", lambda m: _page_inputs(m, 1, "FP64"))
    assert ("INVALID_ARGUMENT" in bad_type or "400" in bad_type), bad_type
    assert "inference input 'raw' data-type is 'FP64', but model 'rank_page' expects 'FP32'" in bad_type
    too_big = _refusal(server, protocol, "rank_page", lambda m: _page_inputs(m, 17))
    assert "inference request batch-size must be <= 16 for 'rank_page'" in too_big

    def short(m):
        raw, ids = _page_inputs(m, 1)
        wrong = m.InferInput("raw", [1, 7], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 7), dtype=np.float32))
        return [wrong, ids]

    assert "unexpected shape for input 'raw' for model 'rank_page'. Expected [-1,8], got [1,7]." in _refusal(
        server, protocol, "rank_page", short)
    unknown = _refusal(server, protocol, "no_such_model", lambda m: _page_inputs(m, 1))
    assert ("NOT_FOUND" in unknown or "404" in unknown) and "Request for unknown model: 'no_such_model'" in unknown

    def ranker(m):
        dense = m.InferInput("dense", [1, 8], "FP32")
        dense.set_data_from_numpy(np.zeros((1, 8), dtype=np.float32))
        sparse = m.InferInput("sparse", [1, 4], "INT64")
        sparse.set_data_from_numpy(np.ones((1, 4), dtype=np.int64))
        return [dense, sparse]

    refused = _refusal(server, protocol, "ctr_ranker", ranker)  # no degraded: HAProxy's refusal, in its words
    assert ("RESOURCE_EXHAUSTED" in refused or "429" in refused) and OVERLOADED in refused, refused
    assert app.OVERLOADED == OVERLOADED


def test_an_answer_file_or_provider_that_does_not_fit_is_refused_by_name(spec_fallback, tmp_path):
    base, repo, _, _ = spec_fallback
    (tmp_path / "repo").symlink_to(repo)
    cases = [
        ({"ctr": {"content": [0.1, 0.2], "shape": [2]}}, "page.json: ctr.shape", "dims [1]"),
        ({"ctr": {"content": ["x"], "shape": [1]}}, "page.json: ctr.content.0", ""),
        ({}, "page.json: ctr", "required"),
        (PAGE_ANSWER | {"score": {"content": [1.0]}}, "page.json: score", "unknown field"),
    ]
    for doc, where, words in cases:
        path = _write_spec(tmp_path, {"rank_page": {"file": "page.json"}}, {"page.json": doc})
        with pytest.raises(SpecError) as exc:
            load_spec(path)
        assert where in str(exc.value) and words in str(exc.value), str(exc.value)
    path = _write_spec(tmp_path, {"rank_page": {"provider": "popular_items"}}, {})
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert "models.rank_page.degraded.provider" in str(exc.value) and "item_ids INT64" in str(exc.value)
    path = _write_spec(tmp_path, {"similar_items": {"provider": "lexical_search"}}, {})
    with pytest.raises(SpecError, match="BYTES query input"):
        load_spec(path)
    # recctl up refuses it before anything starts
    bad = _write_spec(tmp_path, {"rank_page": {"file": "page.json"}}, {"page.json": {"ctr": {"content": [1, 2]}}})
    r = subprocess.run([sys.executable, "-m", "recserve.control.recctl", "--root", str(tmp_path / "root"), "up",
                        "--spec", str(bad)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert "page.json: ctr" in r.stderr and not (tmp_path / "root" / "control.pid").exists()


def test_haproxy_acl_names_the_models_without_degraded_answers():
    assert no_degraded_lines("grpc", ()) == [] and no_degraded_lines("http", ()) == []
    (http,) = no_degraded_lines("http", ("a.b",))
    assert http == "  acl no_degraded path_reg ^/v2/models/(a[.]b)(/.*)?$"
    (grpc_line,) = no_degraded_lines("grpc", ("ctr",))
    assert grpc_line.endswith("req.body,bytes(5,5),hex -m str 0A03637472")  # field 1, length 3, "ctr"
    long = "m" * 130  # a two-byte length varint
    assert no_degraded_lines("grpc", (long,))[0].split()[-1].startswith("0A8201")


def _shed_counts(h: HAProxy) -> dict[str, int]:
    return {r["pxname"]: int(r["stot"]) for r in h.stat() if r["svname"] == "BACKEND" and "_shed" in r["pxname"]}


def test_haproxy_sends_shed_requests_to_degraded_answers_per_model(spec_fallback, tmp_path):
    """One-slot pool held by a slow stand-in instance (one request per protocol): a shed rank_page request gets
    its degraded answer from the fallback, a shed ctr_ranker request (no ``degraded``) HAProxy's refusal at once,
    over gRPC and HTTP."""
    server = spec_fallback[3]
    with _stand_in() as (g_port, http_port):
        h = HAProxy(HAProxyConfig(workdir=tmp_path / "haproxy", grpc_port=free_port(), http_port=free_port(),
                                  slots=1, maxconn=1, timeout_server_ms=3000, no_degraded_models=("ctr_ranker",)))
        try:
            h.start()
            h.bind_slot(0, g_port, http_port)
            h.set_state(0, "ready")
            h.bind_fallback(server.config.grpc_port, server.config.http_port)
            h.route("pool", 0)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                    h.slot_up(0) and h.servers()["be_grpc_fallback/fb"]["srv_op_state"] == "2"):
                time.sleep(0.1)
            channel = grpc.insecure_channel(f"127.0.0.1:{h.config.grpc_port}")
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            gclient = grpcclient.InferenceServerClient(f"127.0.0.1:{h.config.grpc_port}")
            hclient = httpclient.InferenceServerClient(f"127.0.0.1:{h.config.http_port}")
            hold = httpclient.InferenceServerClient(f"127.0.0.1:{h.config.http_port}")
            try:
                with futures.ThreadPoolExecutor(2) as pool:  # each protocol's backends have their own slot
                    held = [pool.submit(stub.ModelInfer, service_pb2.ModelInferRequest(model_name="x"), timeout=10),
                            pool.submit(hold.infer, "x", _page_inputs(httpclient, 1))]
                    time.sleep(0.3)
                    for mod, client in ((grpcclient, gclient), (httpclient, hclient)):
                        r = client.infer("rank_page", _page_inputs(mod, 2))
                        assert is_degraded(r) and r.as_numpy("ctr").shape == (2, 1)
                        dense = mod.InferInput("dense", [1, 8], "FP32")
                        dense.set_data_from_numpy(np.zeros((1, 8), dtype=np.float32))
                        sparse = mod.InferInput("sparse", [1, 4], "INT64")
                        sparse.set_data_from_numpy(np.ones((1, 4), dtype=np.int64))
                        with pytest.raises(InferenceServerException) as exc:
                            client.infer("ctr_ranker", [dense, sparse])
                        assert OVERLOADED in str(exc.value), exc.value
                    assert not any(f.done() for f in held)  # all of it while the pool's only slot was taken
                    for f in held:
                        f.result(timeout=10)
            finally:
                channel.close()
                hold.close()
                gclient.close()
                hclient.close()
            counts = _shed_counts(h)
            assert counts["be_grpc_shed"] == 1 and counts["be_http_shed"] == 1, counts  # HAProxy's refusals
        finally:
            h.stop()
