"""Triton metric deltas (recorded scrape of a real 2.51.0 server) and the RSS sampler."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recserve.perf import metrics

DATA = Path(__file__).parent / "data" / "perf"


def test_parse_recorded_scrape_sums_failure_reasons():
    m = metrics.parse_metrics((DATA / "metrics.txt").read_text())
    assert set(m) == {"search", "search_pre", "search_model"}
    assert m["search_model"]["nv_inference_request_success"] == 20
    assert m["search_model"]["nv_inference_exec_count"] == 12
    assert m["search"]["nv_inference_request_failure"] == 0


def test_typed_counters_read_the_same_as_untyped_ones():
    """Triton 2.51 writes # TYPE counter lines; prometheus_client's parser then names the samples <name>_total."""
    typed = ("# HELP nv_inference_request_success Number of successful inference requests\n"
             "# TYPE nv_inference_request_success counter\n"
             'nv_inference_request_success{model="search",version="1"} 12\n'
             'nv_inference_request_success{model="search",version="2"} 3\n'
             "# TYPE nv_inference_queue_duration_us counter\n"
             'nv_inference_queue_duration_us{model="search",version="1"} 700\n')
    assert metrics.parse_metrics(typed) == {"search": {"nv_inference_request_success": 15.0,
                                                       "nv_inference_queue_duration_us": 700.0}}


def test_deltas_are_per_request_averages_between_scrapes():
    before = metrics.parse_metrics((DATA / "metrics.txt").read_text())
    after = {k: dict(v) for k, v in before.items()}
    after["search_model"]["nv_inference_request_success"] += 10
    after["search_model"]["nv_inference_queue_duration_us"] += 5000
    after["search_model"]["nv_inference_compute_infer_duration_us"] += 20000
    after["search_model"]["nv_inference_count"] += 10
    after["search_model"]["nv_inference_exec_count"] += 4
    d = metrics.deltas(before, after)
    assert set(d) == {"search_model"}  # untouched models had no traffic in the window
    f = d["search_model"]
    assert f.requests == 10 and f.queue_us == pytest.approx(500) and f.compute_infer_us == pytest.approx(2000)
    assert f.avg_batch == pytest.approx(2.5)


def test_unreachable_metrics_endpoint_reads_empty():
    assert metrics.scrape("http://127.0.0.1:9/metrics", timeout_s=0.5) == {}


def test_rss_sampler_sees_this_process_and_resets_windows():
    with metrics.RssSampler([os.getpid()], interval_s=0.05) as s:
        first = s.reset()
    assert first.server_mib > 1 and s.peaks.server_mib > 1
    assert metrics.RssSampler([2**22 + 12345]).peaks.server_mib == 0


def test_cpu_delta_survives_replaced_stub_processes():
    before = {1: ("server", 10.0), 2: ("stubs", 5.0)}
    after = {1: ("server", 10.5), 3: ("stubs", 0.25)}  # stub 2 was replaced by 3 during a reload
    assert metrics.cpu_delta(before, after) == {"server": 0.5, "stubs": 0.25}
    assert metrics.cpu_delta({}, {}) == {"server": 0.0, "stubs": 0.0}  # the named kinds are there when idle


def test_fleet_groups_name_each_process_of_a_tree():
    import subprocess

    child = subprocess.Popen(["sleep", "30"])
    try:
        got = metrics.fleet_cpu_s(os.getpid())
        assert got[os.getpid()][0] == "other fleet processes" and got[child.pid][0] == "other fleet processes"
        assert metrics.fleet_cpu_s(child.pid + 10_000_000) == {}  # no such root
    finally:
        child.kill()
        child.wait(5)


def test_tree_cpu_reads_this_process():
    got = metrics.tree_cpu_s([os.getpid()])
    assert got[os.getpid()][0] == "server" and got[os.getpid()][1] > 0


def test_rollout_gates_and_perf_read_triton_metrics_with_one_parser(tmp_path):
    """control.monitoring.metrics.triton_request_counts (rollout gates) reads the same recorded scrape through the same
    prometheus_client parser as perf; an unreachable endpoint is None, not zero."""
    import http.server
    import threading

    from recserve.control.monitoring.metrics import triton_request_counts

    body = (DATA / "metrics.txt").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}/metrics"
        ok, bad = triton_request_counts(url, models=("search",))
        m = metrics.parse_metrics(body.decode())
        assert (ok, bad) == (m["search"]["nv_inference_request_success"], m["search"]["nv_inference_request_failure"])
        assert triton_request_counts(url, models=("recommend",)) == (0.0, 0.0)
    finally:
        srv.shutdown()
        srv.server_close()
    assert triton_request_counts("http://127.0.0.1:9/metrics", timeout=0.5) is None
