"""The Kubernetes readiness gate waits for the warm-up: the operator (against kmock, pods backed by real
tritonservers: tests/test_kube_operator.py's cluster) warms each new pod up before its golden-ok gate first opens."""

from __future__ import annotations

import json
import urllib.request
from datetime import datetime

import pytest

from recserve.control.fleet import warmup as w
from recserve.control.kube.api import GATE
from tests.test_kube_operator import cluster, wait_for  # noqa: F401 - the module's fixture: a cluster of its own

pytestmark = pytest.mark.timeout(300)


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_each_pod_is_warmed_up_before_its_golden_gate_first_opens(cluster):  # noqa: F811
    wait_for(cluster.all_open, 150, "both pods' gates open")
    pool = cluster.op.pool
    events = pool.state.events(1000, kind="warmup")
    for name, srv in cluster.ctl.servers.items():
        mine = [e for e in events if e["instance"] == name]
        rounds = [e for e in mine if e["message"].startswith(f"{name}: warm-up round")]
        results = [e for e in mine if e not in rounds]
        assert rounds and results, mine
        assert "warm after" in results[0]["message"], results[0]  # "warm after" or "not warm after", figures
        cond = next(c for c in cluster.pod(name)["status"]["conditions"] if c["type"] == GATE)
        assert cond["status"] == "True"
        assert results[0]["ts"] <= _ts(cond["lastTransitionTime"]) + 1.0, (results[0], cond)
        # Triton on the pod counted the warm-up's batch-16 ranker executions (pods serve statistics without a key)
        version = max(cluster.loaded(name)["ranker"])
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.config.http_port}{w.stats_path('ranker', version)}",
                                    timeout=5) as resp:
            stats = w.parse_stats(json.loads(resp.read()))
        assert stats.batches.get(16, (0, 0))[0] >= 1, stats
