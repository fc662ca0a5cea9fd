"""perf_analyzer output handling on recorded output (tests/data/perf/, from real 2.51.0 runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recserve.perf import analyzer

DATA = Path(__file__).parent / "data" / "perf"


def test_concurrency_csv_maps_every_column():
    (row,) = analyzer.parse_csv((DATA / "concurrency.csv").read_text())
    assert row.concurrency == 4 and row.request_rate is None
    assert row.infer_per_sec == pytest.approx(287.425)
    assert (row.p50_us, row.p90_us, row.p95_us, row.p99_us) == (12290, 16833, 19200, 23387)
    assert row.server_queue_us == 3 and row.server_compute_infer_us == 4565
    assert row.p99_ms == pytest.approx(23.387)


def test_rate_csv_reads_request_rate():
    (row,) = analyzer.parse_csv((DATA / "rate.csv").read_text())
    assert row.request_rate == 643 and row.concurrency is None
    assert row.infer_per_sec == pytest.approx(481.75)


@pytest.mark.parametrize(
    "text, missing",
    [
        ("", "empty"),
        ("Concurrency,Inferences/Second\n1,10\n", "p50 latency"),
        ("Concurrency,Inferences/Second,p50 latency,p90 latency,p99 latency\n1,10,1,2,3\n", "p95 latency"),
        ("Inferences/Second,p50 latency,p90 latency,p95 latency,p99 latency\n1,2,3,4,5\n", "neither"),
    ],
)
def test_malformed_csv_names_the_problem(text, missing):
    with pytest.raises(ValueError, match=missing):
        analyzer.parse_csv(text)


def test_run_record_keeps_p95_apart_from_p99():
    """p95 was reported as the p99 value; a load point carries both as measured."""
    from recserve.perf.suiterun import RunRecord

    rec = RunRecord("t", "m", "direct", "concurrency", 4, 1, p50_ms=5.0, p90_ms=8.0, p95_ms=9.5, p99_ms=14.0)
    row = rec.row()
    assert (row.p95_us, row.p99_us) == (9500.0, 14000.0)


def test_version_is_what_the_binary_reports():
    """perf_analyzer --version of the installed binary (tritonclient's wheel version is another thing)."""
    assert analyzer.version() == "2.51.0"


def test_profile_export_gives_exact_throughput_and_percentiles():
    doc = json.loads((DATA / "profile_export.json").read_text())
    reqs = doc["experiments"][0]["requests"]
    span_s = (max(r["response_timestamps"][-1] for r in reqs) - min(r["timestamp"] for r in reqs)) / 1e9
    lat_us = sorted((r["response_timestamps"][-1] - r["timestamp"]) / 1000 for r in reqs)
    got = analyzer.parse_profile(doc)
    assert got["requests"] == len(reqs) == 12
    assert got["infer_per_sec"] == pytest.approx(len(reqs) / span_s)
    assert got["p99_us"] == pytest.approx(lat_us[-1]) and got["p50_us"] == pytest.approx(lat_us[5])
    assert got["p50_us"] <= got["p90_us"] <= got["p99_us"]
    assert analyzer.parse_profile(doc, batch_size=8)["infer_per_sec"] == pytest.approx(8 * got["infer_per_sec"])
    # the tail beyond p99: p99.9, and the requests slower than the point's slow_ms (the suites pass 4x the SLO)
    assert got["p999_us"] == pytest.approx(lat_us[-1]) and got["slow"] == 0  # no slow_ms: not counted
    cut_ms = lat_us[8] / 1000
    assert analyzer.parse_profile(doc, slow_ms=cut_ms)["slow"] == sum(x > lat_us[8] for x in lat_us) == 3


def test_profile_without_completed_requests_is_an_error():
    with pytest.raises(ValueError, match="no completed requests"):
        analyzer.parse_profile({"experiments": [{"requests": [{"timestamp": 1, "response_timestamps": []}]}]})


def test_quote_picks_the_error_line_from_recorded_output():
    quoted = analyzer.quote_output(
        (DATA / "unknown_model.stdout").read_text(), (DATA / "unknown_model.stderr").read_text()
    )
    assert "Request for unknown model: 'nosuch' is not found" in quoted


def test_command_has_load_mode_and_payload(tmp_path):
    p = analyzer.LoadPoint(
        "ranker",
        "127.0.0.1:1",
        "rate",
        250,
        batch_size=8,
        input_data=tmp_path / "in.json",
        request_count=500,
        shapes={"history": [12]},
    )
    cmd = p.command(tmp_path / "x.csv")
    assert cmd[cmd.index("--request-rate-range") + 1] == "250:250:1"
    assert cmd[cmd.index("-b") + 1] == "8" and cmd[cmd.index("--request-count") + 1] == "500"
    assert cmd[cmd.index("--input-data") + 1] == str(tmp_path / "in.json")
    assert "history:12" in cmd and "--profile-export-file" in cmd
    with pytest.raises(ValueError, match="mode"):
        analyzer.LoadPoint("m", "u", "burst", 1).command(tmp_path / "x.csv")


def test_unreachable_server_raises_with_perf_analyzers_words(tmp_path):
    """The real binary against a closed port: the error quotes what perf_analyzer said."""
    point = analyzer.LoadPoint("ranker", "127.0.0.1:9", "concurrency", 1, timeout_s=30)
    with pytest.raises(analyzer.PerfAnalyzerError) as err:
        analyzer.run(point, tmp_path / "x.csv")
    msg = str(err.value)
    assert "ranker" in msg and "127.0.0.1:9" in msg and "exit" in msg
    assert "failed" in msg.lower() or "unavailable" in msg.lower() or "connect" in msg.lower()
    assert (tmp_path / "x.log").exists()


def test_profile_counts_stalled_requests():
    reqs = [{"timestamp": 0, "response_timestamps": [2_000_000]} for _ in range(98)]
    reqs += [{"timestamp": 0, "response_timestamps": [501_000_000]} for _ in range(2)]
    got = analyzer.parse_profile({"experiments": [{"requests": reqs}]})
    assert got["stalls"] == 2 and got["p50_us"] == 2000
