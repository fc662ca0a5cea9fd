"""One tiny real sweep: embedded tritonserver, real perf_analyzer, our HAProxy, report files and fields.

Uses the built models when ``make models`` has run, else the drills' synthetic fixture models (same
serving interfaces), so it runs on a fresh checkout too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest

from recserve.control.runtime.triton import DEFAULT_REPOSITORY, servable_models
from recserve.perf import runner, suite

SUITE = """
name: tiny
slo_ms: 50
seconds_per_point: 0.5
inprocess_seconds: 0.5
payload_rows: 32
targets:
  - {name: search, model: search, concurrency: [1, 2], capacity: [0.3, 0.5]}
  - {name: ghost, model: no_such_model, concurrency: [1]}
ratios:
  served_vs_inprocess: {model: ranker, batch_size: 4, concurrency: [1]}
  haproxy_vs_direct: {model: search, concurrency: [2]}
  dynamic_batching_gain: {model: ranker, concurrency: [2]}
"""


def _servers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.name() in ("tritonserver", "haproxy")]


def repository(tmp_path: Path) -> Path:
    if {"recommend", "search"} <= set(servable_models(DEFAULT_REPOSITORY, with_tensorrt=False)):
        return DEFAULT_REPOSITORY
    from recserve.drills.fixture_models import make_repository

    return make_repository(DEFAULT_REPOSITORY, tmp_path / "repo")


@pytest.mark.timeout(300)
def test_tiny_sweep_writes_a_complete_report(tmp_path):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed (make setup installs it)")
    before = {p.pid for p in _servers()}
    path = tmp_path / "tiny.yaml"
    path.write_text(SUITE)
    out = tmp_path / "report"
    doc = runner.run_suite(suite.load(path), out, repository(tmp_path))

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["suite"] == "tiny" and on_disk["versions"]["server"] == "2.51.0"
    assert on_disk["versions"]["client"] == "2.51.0"
    assert set(on_disk["versions"]["models"]) >= {"search", "search_model", "ranker"}

    ok = [r for r in doc["runs"] if not r["error"]]
    search = [r for r in ok if r["target"] == "search"]
    assert {r["mode"] for r in search} == {"concurrency", "rate"}
    for r in ok:
        assert r["infer_per_sec"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["requests"] >= 20
        assert (out / r["csv"]).exists()
        assert r["rss_mib"]["server_mib"] > 0 and r["rss_mib"]["stub_count"] >= 1
    s = search[0]["server"]
    assert s["search"]["requests"] > 0 and "search_model" in s and s["search_model"]["compute_infer_us"] > 0

    ratios = doc["ratios"]
    for name in ("served_vs_inprocess", "haproxy_vs_direct", "dynamic_batching_gain"):
        assert ratios[name]["value"] is not None and ratios[name]["value"] > 0, (name, ratios[name], doc["errors"])
    assert ratios["haproxy_vs_direct"]["haproxy_infer_per_sec"] > 0
    assert "trt_vs_onnx" not in ratios, "a ratio the suite did not ask for is not recorded"
    assert doc["versions"]["perf_analyzer"] == "2.51.0"  # what the binary says (--version), not a wheel's
    assert any(r["via"] == "haproxy" for r in ok)
    assert any(r["variant"] == "no_dynamic_batching" for r in ok)
    assert doc["inprocess"][0]["batch_size"] == 4

    # a ladder that found no rate within the SLO says why (perf-check fails it); its figure is never negative
    cap = doc["capacity"]["search"]
    assert cap["capacity_rps"] > 0 or "failed" in cap["reason"], cap
    assert any("no_such_model" in e for e in doc["errors"])  # bad target reported, the rest still ran

    md = (out / "report.md").read_text()
    assert "## Ratios" in md and "![search](search.png)" in md and (out / "search.png").exists()
    assert (out / "inputs" / "search.json").exists()
    # everything we started is stopped (servers of other tests' session fixtures excepted)
    assert not [p for p in _servers() if p.pid not in before]
