"""Report rendering and the baseline check, on a recorded-style document (no server)."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

from perf import check, report


def doc() -> dict:
    run = {
        "target": "recommend",
        "model": "recommend",
        "via": "direct",
        "mode": "concurrency",
        "variant": "committed",
        "batch_size": 1,
        "infer_per_sec": 300.0,
        "p50_ms": 5.0,
        "p90_ms": 9.0,
        "p99_ms": 12.0,
        "requests": 900,
        "server": {"recommend": {"queue_us": 3.0, "compute_infer_us": 2000.0, "avg_batch": 1.0}},
        "rss_mib": {"server_mib": 45.0, "stubs_mib": 320.0, "stub_count": 6},
        "csv": "csv/x.csv",
        "error": None,
    }
    runs = [
        dict(run, value=1),
        dict(run, value=4, infer_per_sec=350.0, p99_ms=30.0),
        dict(run, value=8, error="perf_analyzer ... failed (exit 99): boom"),
    ]
    return {
        "suite": "t",
        "started": "s",
        "finished": "f",
        "slo_ms": 50,
        "versions": {"server": "2.51.0"},
        "ratios": {
            "served_vs_inprocess": {
                "value": 0.8,
                "target": 0.7,
                "meets_target": True,
                "model": "ranker",
                "served_infer_per_sec": 800.0,
                "inprocess_infer_per_sec": 1000.0,
            },
            "haproxy_vs_direct": {"value": 0.85, "target": 0.9, "meets_target": False},
            "trt_vs_onnx": {"value": None, "skipped": "no NVIDIA GPU / TensorRT on this host"},
        },
        "capacity_rps": {"recommend": 300.0},
        "capacity": {
            "recommend": {
                "model": "recommend",
                "via": "direct",
                "capacity_rps": 300.0,
                "p99_ms_at_capacity": 20.0,
                "reason": "next rate 350/s failed",
            }
        },
        "runs": runs,
        "errors": ["recommend [committed, direct, concurrency 8]: boom"],
        "skipped": [],
    }


def test_write_produces_json_markdown_and_plots(tmp_path):
    d = doc()
    paths = report.write(d, tmp_path)
    assert json.loads(paths["json"].read_text())["capacity_rps"] == {"recommend": 300.0}
    md = paths["md"].read_text()
    assert "| served_vs_inprocess | 0.800 | >= 0.7 ok |" in md
    assert "| haproxy_vs_direct | 0.850 | >= 0.9 MISSED |" in md
    assert "trt_vs_onnx | skipped" in md and "| recommend | recommend | direct | 300 |" in md
    assert "## Errors" in md and "boom" in md
    pngs = list(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["recommend.png"] and "![recommend](recommend.png)" in md
    assert pngs[0].read_bytes()[:4] == b"\x89PNG"


def test_curves_leave_out_failed_points():
    (curve,) = report.curves(doc()).values()
    assert [r["value"] for r in curve] == [1, 4]


def test_run_dirs_are_unique_and_latest_follows(tmp_path):
    a, b = report.new_run_dir(tmp_path), report.new_run_dir(tmp_path)
    assert a != b
    report.link_latest(a)
    link = report.link_latest(b)
    assert link.is_symlink() and link.resolve() == b.resolve()


BASELINE = {
    "tolerance": 0.2,
    "ratios": {"served_vs_inprocess": {"baseline": 0.8, "min": 0.5}, "trt_vs_onnx": {"baseline": 3.0}},
    "capacity_rps": {"recommend": {"baseline": 280}},
}


def test_check_passes_within_tolerance_and_skips_with_reason():
    verdicts = {v.name: v for v in check.compare(doc(), BASELINE)}
    assert all(v.ok for v in verdicts.values())
    assert "skipped in this run (no NVIDIA GPU" in verdicts["trt_vs_onnx"].message


@pytest.mark.parametrize(
    "ratio, expect",
    [(0.6, "below baseline 0.800 - 20% = 0.640"), (None, "no value"), ("absent", "not in the report")],
)
def test_check_fails_on_regression_or_missing_value(ratio, expect):
    d = doc()
    if ratio == "absent":
        del d["ratios"]["served_vs_inprocess"]
    else:
        d["ratios"]["served_vs_inprocess"]["value"] = ratio
    (v,) = [v for v in check.compare(d, BASELINE) if v.name == "served_vs_inprocess"]
    assert not v.ok and expect in v.message


def test_check_capacity_regression_and_cli_exit_codes(tmp_path, capsys):
    d = doc()
    d["capacity_rps"]["recommend"] = 100.0
    (tmp_path / "report.json").write_text(json.dumps(d))
    (tmp_path / "base.json").write_text(json.dumps(BASELINE))
    args = Namespace(report=tmp_path, baseline=tmp_path / "base.json", tolerance=None)
    assert check.main(args) == 1
    out = capsys.readouterr().out
    assert "FAIL  capacity_rps[recommend]: 100 below" in out and "1 regression(s)" in out
    assert check.main(Namespace(report=tmp_path / "nope", baseline=None, tolerance=None)) == 2


def test_shipped_baseline_is_well_formed():
    base = json.loads(check.BASELINE.read_text())
    assert 0 < base["tolerance"] < 1
    assert {"served_vs_inprocess", "haproxy_vs_direct", "dynamic_batching_gain"} <= set(base["ratios"])
    assert all(float(v["baseline"]) > 0 for v in base["ratios"].values())
