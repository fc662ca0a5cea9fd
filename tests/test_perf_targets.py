"""Endpoint discovery: the fleet from 'recctl status --json' (recorded shape), and model checks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from recserve.control.runtime.triton import DEFAULT_REPOSITORY
from recserve.perf import targets

STATUS = {
    "endpoints": {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000", "control": "127.0.0.1:50051"},
    "instances": [
        {"id": "t1", "pid": 4242, "metrics_port": 8102, "grpc_port": 8101},
        {"id": "t2", "pid": 0, "metrics_port": 8202},  # not running: no pid, not sampled
    ],
}


def fake_run(stdout: str, returncode: int = 0, stderr: str = ""):
    def run(cmd, **kwargs):
        assert cmd[-2:] == ["status", "--json"]
        return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)

    return run


def test_fleet_endpoint_from_recctl_status(monkeypatch):
    monkeypatch.setattr(targets.subprocess, "run", fake_run(json.dumps(STATUS)))
    ep = targets.fleet()
    assert ep.via == "fleet" and ep.grpc_url == "127.0.0.1:8001"
    assert ep.pids == [4242] and ep.metrics_urls == ["http://127.0.0.1:8102/metrics"]


@pytest.mark.parametrize(
    "stdout, code, stderr, expect",
    [
        ("", 2, "recctl: no control plane at 127.0.0.1:50051 (run 'make fleet-up')", "no fleet running"),
        ("not json", 0, "", "printed no JSON"),
        (json.dumps({"endpoints": {}}), 0, "", "names no gRPC endpoint"),
    ],
)
def test_no_fleet_is_one_clear_line(monkeypatch, stdout, code, stderr, expect):
    monkeypatch.setattr(targets.subprocess, "run", fake_run(stdout, code, stderr))
    with pytest.raises(targets.Unavailable, match=expect):
        targets.fleet()


def test_check_models_explains_each_skip(tmp_path: Path):
    ok, skipped = targets.check_models(DEFAULT_REPOSITORY, ["no_such_model", "ranker_trt"])
    assert ok == []
    assert "does not exist" in skipped["no_such_model"]
    assert "TensorRT" in skipped["ranker_trt"] or "no built version" in skipped["ranker_trt"]
    empty = tmp_path / "repo"
    (empty / "ranker").mkdir(parents=True)
    (empty / "ranker" / "config.pbtxt").write_text((DEFAULT_REPOSITORY / "ranker" / "config.pbtxt").read_text())
    ok, skipped = targets.check_models(empty, ["ranker"])
    assert ok == [] and "no built version" in skipped["ranker"] and "make models" in skipped["ranker"]
