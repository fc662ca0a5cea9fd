"""The warm-up on a real tritonserver: its requests reach every composing model at the batch sizes the batcher forms,
Triton's statistics count them, and the judgement reads those statistics (control/fleet/warmup.py)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from recserve.control.client import RecClient
from recserve.control.fleet import warmup as w
from recserve.control.fleet.golden import Golden
from recserve.control.fleet.health import ready_versions
from recserve.control.runtime.triton import ADMIN_HEADER_HTTP, DEFAULT_REPOSITORY

pytestmark = pytest.mark.timeout(120)


def _raw_stats(server, model: str, version: int) -> dict:
    req = urllib.request.Request(f"http://{server.http_url}{w.stats_path(model, version)}")
    req.add_header(ADMIN_HEADER_HTTP, server.stats_key)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())["model_stats"][0]


def test_warm_up_sends_real_requests_at_the_batcher_sizes_and_judges_on_tritons_statistics(server):
    versions = ready_versions(server) or {}
    assert {"recommend", "search", "ranker", "search_pre"} <= set(versions), versions
    latest = {m: max(v) for m, v in versions.items()}
    golden = Golden(DEFAULT_REPOSITORY)
    configs = w.served_configs(server, w.top_models(golden))
    sizes = w.batch_sizes(configs, "recommend", w.step_closure(configs, "recommend"))
    assert sizes == (1, 8, 16)  # ranker's and retrieval's preferred sizes; the Python steps name none
    before = {m: _raw_stats(server, m, latest[m]) for m in ("recommend", "ranker", "search_pre")}
    lines: list[str] = []
    # the server is its own reference here (it serves and answered its golden check); the fleet passes another
    ref = w.Endpoint(server.http_url, server.stats_key, latest)
    with RecClient(server.grpc_url, timeout_s=w.REQUEST_TIMEOUT_S, retry_policy=None) as client:
        result = w.warm_up_instance(server, client, server.stats_key, versions, ref, golden,
                                    w.WarmupConfig(rounds=3, ratio=1.5, deadline_s=60), progress=lines.append)
    after = {m: _raw_stats(server, m, latest[m]) for m in before}
    per = max(w.instance_count(configs[s]) for s in ("ranker", "retrieval", "search_model"))  # 2: one per instance
    assert per == 2
    assert 1 <= result.rounds <= 3 and len(lines) == result.rounds, (result.text(), lines)
    assert result.requests == result.rounds * 2 * per * len(sizes)  # recommend and search, every size
    # Triton counted exactly those requests, with their batch sizes, on the ensemble ...
    rec = {k: after["recommend"]["inference_stats"]["success"]["count"]
           - before["recommend"]["inference_stats"]["success"]["count"] for k in ("requests",)}
    assert rec["requests"] == result.rounds * per * len(sizes)
    assert after["recommend"]["inference_count"] - before["recommend"]["inference_count"] == \
        result.rounds * per * sum(sizes)
    # ... and on its composing models, at batch sizes above 1 (only the warm-up sends batch 16)
    def execs(doc: dict, b: int) -> int:
        return sum(s["compute_infer"]["count"] for s in doc.get("batch_stats", []) if s["batch_size"] >= b)

    assert execs(after["ranker"], 16) > execs(before["ranker"], 16)
    assert execs(after["search_pre"], 8) > execs(before["search_pre"], 8)
    # the judgement read Triton's compute figures of every composing model
    assert result.judgement is not None
    judged = {f.model for f in result.judgement.figures}
    assert {"recommend_pre", "retrieval", "ranker", "recommend_post", "search_pre", "search_model"} <= judged
    assert all(f.new_us and f.new_us > 0 for f in result.judgement.figures), result.text()
    assert result.warm, result.text()  # against itself, within the same rounds: within any ratio >= 1
    assert "warm after" in result.text() and "ms serving" in result.text()
