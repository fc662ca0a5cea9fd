"""The local fleet warms every instance up on the one path of starts and reloads, before it takes traffic: at
``recctl up`` and in a rollover, where the canary's warm-up ends before any traffic moves to it, and Triton's
statistics show the warm-up's batch-16 executions on the new version of every instance."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.request

import pytest

from recserve.control.api.proto import control_pb2 as pb
from recserve.control.fleet import warmup as w
from recserve.control.runtime.triton import ADMIN_HEADER_HTTP
from tests.fleet_fixtures import all_healthy_exact, make_version, running_fleet

pytestmark = pytest.mark.timeout(600)


def _events(root) -> list[dict]:
    db = sqlite3.connect(str(root / "state.db"))
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT ts, kind, instance, message FROM events WHERE kind='warmup' "
                                            "ORDER BY seq")]
    finally:
        db.close()


def _results(events: list[dict]) -> list[dict]:
    return [e for e in events if "warm-up round" not in e["message"]]


def _batch16(fleet, inst: dict, model: str, version: int) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{inst['http_port']}{w.stats_path(model, version)}")
    req.add_header(ADMIN_HEADER_HTTP, (fleet.root / "stats.key").read_text().strip())
    with urllib.request.urlopen(req, timeout=5) as resp:
        return w.parse_stats(json.loads(resp.read())).batches.get(16, (0, 0))[0]


def test_instances_are_warmed_up_at_start_and_a_canary_before_traffic_moves(tmp_path):
    with running_fleet(tmp_path) as fleet:
        st = fleet.status()
        started = _results(_events(fleet.root))
        assert {e["instance"] for e in started} == {i["id"] for i in st["instances"]}, started
        assert all("warm after" in e["message"] for e in started), started  # warm, or not warm with figures
        new = make_version(fleet.repository, "retrieval", "copy")
        t_rollout = time.time()
        shift_at = None
        for ev in fleet.stub.Rollover(pb.RolloverRequest(model="retrieval", version=new, steps=[100], bake_seconds=1),
                                      metadata=fleet.auth, timeout=300):
            if ev.phase == "shift" and shift_at is None:
                shift_at = time.time()
            last = ev
        assert last.status == "succeeded", last.message
        st = fleet.wait(all_healthy_exact, what="every instance on the new version")
        during = [e for e in _results(_events(fleet.root)) if e["ts"] >= t_rollout]
        assert during and shift_at is not None
        assert min(e["ts"] for e in during) < shift_at, (during, shift_at)  # the canary warmed before traffic
        assert {e["instance"] for e in during} == {i["id"] for i in st["instances"]}, during
        for inst in st["instances"]:
            assert inst["models"]["retrieval"] == [new]
            assert _batch16(fleet, inst, "retrieval", new) >= 1, inst["id"]
