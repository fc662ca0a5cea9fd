"""Capacity, saturation and ratio arithmetic, on recorded and constructed load points."""

from __future__ import annotations

from pathlib import Path

import pytest

from recserve.perf import analyzer, figures
from recserve.perf.analyzer import Row

DATA = Path(__file__).parent / "data" / "perf"


def rate_row(rate: float, served: float, p99_ms: float) -> Row:
    return Row(
        infer_per_sec=served,
        p50_us=p99_ms * 300,
        p90_us=p99_ms * 800,
        p95_us=p99_ms * 900,
        p99_us=p99_ms * 1000,
        request_rate=rate,
    )


def test_capacity_is_last_rate_below_the_first_slo_violation():
    rows = [rate_row(100, 100, 10), rate_row(200, 199, 20), rate_row(300, 298, 70), rate_row(400, 396, 30)]
    cap = figures.capacity(rows, slo_ms=50)
    assert cap.capacity_rps == 200 and cap.first_violation_rps == 300
    assert cap.p99_ms_at_capacity == pytest.approx(20)
    assert "p99 70.0 ms > SLO 50 ms" in cap.reason


def test_a_rate_the_server_does_not_keep_up_with_is_not_capacity():
    """Recorded: search offered 643/s, served 481.75/s (p99 23.9 ms is under the SLO, but it fell behind)."""
    (recorded,) = analyzer.parse_csv((DATA / "rate.csv").read_text())
    cap = figures.capacity([rate_row(400, 400, 12), recorded], slo_ms=50)
    assert cap.capacity_rps == 400 and cap.first_violation_rps == 643
    assert "served 482/s of 643/s" in cap.reason


def test_capacity_zero_when_the_lowest_rate_fails_and_lower_bound_when_none_fails():
    assert figures.capacity([rate_row(100, 100, 80)], slo_ms=50).capacity_rps == 0
    top = figures.capacity([rate_row(100, 100, 10), rate_row(150, 150, 12)], slo_ms=50)
    assert top.capacity_rps == 150 and top.first_violation_rps is None and "lower bound" in top.reason


def test_capacity_depends_on_the_slo():
    rows = [rate_row(100, 100, 10), rate_row(200, 200, 30), rate_row(300, 300, 60)]
    assert figures.capacity(rows, slo_ms=25).capacity_rps == 100
    assert figures.capacity(rows, slo_ms=50).capacity_rps == 200
    assert figures.capacity(rows, slo_ms=100).capacity_rps == 300


def test_capacity_ignores_concurrency_rows():
    (conc,) = analyzer.parse_csv((DATA / "concurrency.csv").read_text())
    assert figures.capacity([conc]).capacity_rps == 0


def test_saturation_ratio_and_ladder():
    rows = [rate_row(1, 120, 1), rate_row(2, 300, 1), rate_row(3, 280, 1)]
    assert figures.saturation(rows) == 300 and figures.saturation([]) == 0
    assert figures.ratio(70, 100) == pytest.approx(0.7)
    assert figures.ratio(70, 0) is None
    assert figures.rate_ladder(800, [0.5, 1.0], batch_size=8) == [50, 100]
    assert figures.rate_ladder(10, [0.01, 0.02]) == [1.0]


def test_paired_ratio_is_the_median_of_round_ratios():
    assert figures.paired_ratio([(90, 100), (50, 100), (95, 100)]) == pytest.approx(0.9)
    assert figures.paired_ratio([(80, 100), (100, 100)]) == pytest.approx(0.9)
    assert figures.paired_ratio([(0, 100), (45, 50)]) == pytest.approx(0.9)  # a failed side drops its round
    assert figures.paired_ratio([(0, 100)]) is None


def test_inprocess_reads_threads_and_instances_from_the_committed_configs():
    from recserve.perf import inprocess
    from recserve.perf.inputs import REPO_ROOT

    text = (REPO_ROOT / "model_repository" / "ranker" / "config.pbtxt").read_text()
    assert inprocess.config_threads(text) == 1
    assert inprocess.config_instances(text) == 2
    assert inprocess.config_instances("name: 'x'") == 1
    assert inprocess.config_threads('parameters { key: "intra_op_thread_count", value: { string_value: "3" } }') == 3


def test_proxy_cpu_share_bounds_the_ratio_when_cpu_bound():
    samples = [
        {"server": 1.0, "stubs": 2.0, "perf_analyzer": 0.4, "haproxy": 0.2},
        {"server": 1.2, "stubs": 2.2, "perf_analyzer": 0.4, "haproxy": 0.15},
        {"server": 1.0, "stubs": 2.0, "perf_analyzer": 0.4},  # a direct point: not counted
    ]
    got = figures.proxy_cpu_share(samples)
    assert got["haproxy_cpu_ms_per_request"] == pytest.approx(0.175)
    assert got["other_cpu_ms_per_request"] == pytest.approx(3.6)
    assert got["cpu_bound_ratio"] == pytest.approx(3.6 / 3.775, abs=1e-3)
    assert figures.proxy_cpu_share([]) == {}


def test_rounds_with_stalls_are_left_out_unless_all_have_them():
    pairs = [(60, 100), (95, 100), (93, 100)]
    assert figures.clean_paired_ratio(pairs, [True, False, False]) == (pytest.approx(0.94), 1)
    assert figures.clean_paired_ratio(pairs, [True, True, True]) == (pytest.approx(0.93), 0)


def test_serving_cpu_ceiling_separates_serving_from_the_load_generator():
    got = figures.serving_cpu_ceiling([3.5, 3.6, 3.4], [{"stubs": 4.0, "server": 0.9, "perf_analyzer": 1.0}])
    assert got["cpu_ceiling_without_client"] == pytest.approx(3.5 / 4.9, abs=1e-3)
    assert got["cpu_ceiling_with_client"] == pytest.approx(3.5 / 5.9, abs=1e-3)
    assert figures.serving_cpu_ceiling([], []) == {}


def test_batching_cpu_ceiling_is_cpu_without_over_cpu_with():
    with_cpu = [{"server": 0.4, "stubs": 2.0, "perf_analyzer": 0.6},
                {"server": 0.5, "stubs": 2.1, "perf_analyzer": 0.6}]
    without = [{"server": 0.5, "stubs": 3.0, "perf_analyzer": 0.6}]
    got = figures.batching_cpu_ceiling(with_cpu, without)
    assert got["with_cpu_ms_per_request"] == pytest.approx(3.1)
    assert got["cpu_bound_gain"] == pytest.approx(4.1 / 3.1, abs=1e-3)
    assert figures.batching_cpu_ceiling([], without) == {}
