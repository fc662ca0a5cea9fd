"""Real-Prometheus integration tests: a real fleet (control plane, two tritonservers, HAProxy) scraped by a real
Prometheus with the committed rules (1 s intervals, as the drills run them).

* Quiet when healthy (issue 19): in each serving mode, an idle healthy fleet makes every alert expression of
  ``rules/alerts.yml`` return an empty vector (an alert that fires on a healthy fleet pages for nothing and is
  counted as the next drill's alert).
* Every dashboard panel's query evaluated while clients are served through HAProxy. Also: the file_sd targets
  follow the fleet, recctl prints the URLs, and monitor-down leaves no process behind.

One fleet and its monitoring stack are up at a time (``Monitored``): the tests of one mode share them.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from recserve.control.monitoring.config import DEPLOY_DIR
from recserve.control.monitoring.stack import MonitorConfig, MonitorStack, missing_binaries
from tests.fleet_fixtures import FleetProcess, LoadClient, all_healthy_exact, fleet_repository

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(bool(missing_binaries()), reason=f"not installed: {missing_binaries()} "
                                 "('make setup' installs them)")]
#: Panels whose series come from another component; their queries must still parse.
EXTERNAL = {"recserve_backup_last_success_timestamp_seconds": "exported by the backup job (issue 11)"}
#: Every scrape target of a two-instance fleet: 2 tritonservers, HAProxy's and the control plane's exporters.
JOBS = 'job=~"triton|haproxy|recserve-control"'


def _ok(stack: MonitorStack, expr: str) -> tuple[bool, dict]:
    ans = stack.prometheus.query(expr)
    return ans.get("status") == "success" and bool(ans["data"]["result"]), ans


def _api(stack: MonitorStack, path: str) -> dict:
    with urllib.request.urlopen(f"{stack.prometheus.url}{path}", timeout=5) as r:
        return json.loads(r.read())


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((DEPLOY_DIR / "rules" / "alerts.yml").read_text())["groups"]
            for r in g["rules"] if "alert" in r]


class Monitored:
    """One fleet in one serving mode (``recctl up --mode``) plus its Prometheus/Alertmanager, started on demand;
    asking for another mode stops the current pair first (two fleets at once would share 2 cores). Like
    ``make fleet-up``, the fleet runs deploy/backup-policy.yaml (its target moved to a scratch directory)."""

    def __init__(self, base: Path):
        self.base = base
        self.mode: str | None = None
        self.fleet: FleetProcess | None = None
        self.stack: MonitorStack | None = None
        self.repo = None
        self.healthy_at = 0.0  # unix time the current fleet was seen healthy

    def get(self, mode: str) -> tuple[FleetProcess, MonitorStack]:
        if self.mode != mode:
            self.close()
            if self.repo is None:
                self.repo = fleet_repository(self.base / "model_repository")
            root = self.base / mode / "runtime"
            policy = self.base / mode / "backup-policy.yaml"
            policy.parent.mkdir(parents=True, exist_ok=True)
            policy.write_text((DEPLOY_DIR.parent / "backup-policy.yaml").read_text()
                              .replace("/var/backups/recserve", str(self.base / mode / "backups")))
            self.mode = mode
            self.fleet = FleetProcess(root, self.repo, up_args=("--mode", mode, "--backup-policy", str(policy)))
            self.stack = MonitorStack(MonitorConfig(root=root, fast=True))
            try:
                self.stack.up()  # first: Prometheus is warm and finds the targets while the fleet starts
                self.fleet.up()
                self.fleet.wait(all_healthy_exact, what=f"two healthy instances ({mode})")
                self.healthy_at = time.time()
            except BaseException:
                self.close()  # never handed out half started
                raise
        return self.fleet, self.stack

    def close(self) -> None:
        """Stops the stack and the fleet; fails when a monitoring process outlives ``down``."""
        if self.mode is None:
            return
        from recserve.control.runtime.procs import pid_alive

        pids = [p.pid for p in self.stack.procs]
        try:
            self.stack.down()
        finally:
            self.fleet.close()
            self.mode = self.fleet = self.stack = None
        assert not [p for p in pids if p and pid_alive(p)]


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    m = Monitored(tmp_path_factory.mktemp("monitored"))
    try:
        yield m
    finally:
        try:
            m.close()
        finally:
            shutil.rmtree(m.base, ignore_errors=True)


def wait_scraped_and_evaluated(stack: MonitorStack, since: float, scrapes: int = 3, timeout_s: float = 60.0) -> None:
    """Until every target answered ``scrapes`` scrapes after unix time ``since``, then until every rule group
    evaluated after that."""
    deadline = time.monotonic() + timeout_s
    while True:
        window = int(time.time() - since)  # whole seconds: only scrapes after ``since``
        if window >= scrapes and _ok(stack, f"count(sum_over_time(up{{{JOBS}}}[{window}s]) >= {scrapes}) == 4")[0]:
            break
        assert time.monotonic() < deadline, f"targets not scraped {scrapes} times: {stack.prometheus.query('up')}"
        time.sleep(0.5)
    since = time.time()
    while True:
        groups = _api(stack, "/api/v1/rules")["data"]["groups"]
        stale = [g["name"] for g in groups if _unix(g.get("lastEvaluation", "")) <= since]
        if groups and not stale:
            break
        assert time.monotonic() < deadline, f"rule groups not evaluated since the scrapes: {stale}"
        time.sleep(0.5)
    bad = [(r.get("name"), r.get("lastError")) for g in groups for r in g["rules"] if r.get("health") != "ok"]
    assert not bad, f"rules that fail to evaluate: {bad}"


def _unix(rfc3339: str) -> float:
    """Prometheus' RFC 3339 times (nanosecond fractions, 'Z') as unix seconds; 0 for none ('0001-01-01...')."""
    import calendar
    import re

    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z$", rfc3339)
    if not m or m.group(1).startswith("0001"):
        return 0.0
    return calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + float(m.group(2) or 0)


# active-active last: the dashboard test below reuses that fleet (one fleet start fewer)
@pytest.mark.parametrize("mode", ["primary-standby", "active-active"])
def test_idle_healthy_fleet_fires_no_alert(monitored, mode):
    """Quiet when healthy: every alert's expr, evaluated now, is an empty vector on an idle healthy fleet."""
    fleet, stack = monitored.get(mode)
    wait_scraped_and_evaluated(stack, since=monitored.healthy_at)
    firing = []
    for rule in alert_rules():
        ans = stack.prometheus.query(rule["expr"])
        assert ans.get("status") == "success", f"{rule['alert']}: {ans.get('error')}"
        firing += [f"{rule['alert']}: {r['metric']} = {r['value'][1]}" for r in ans["data"]["result"]]
    assert not firing, f"alert expressions non-empty on an idle healthy {mode} fleet: {firing}"
    # quiet for the right reasons: the control plane tells the rules its mode (NoHealthyStandby reads it), and
    # the backup alerts saw a policy in force
    ans = stack.prometheus.query('recserve_fleet_mode == 1')
    assert [r["metric"].get("mode") for r in ans["data"]["result"]] == [mode], ans
    assert _ok(stack, "recserve_backup_max_age_seconds > 0 and recserve_backup_policy_start_timestamp_seconds > 0")[0]
    st = fleet.status()
    assert all_healthy_exact(st) and st["mode"] == mode, st  # and it stayed healthy while we looked


def test_every_panel_query_returns_data_from_a_real_fleet(monitored):
    fleet, stack = monitored.get("active-active")
    load = None
    try:
        targets = json.loads((fleet.root / "monitoring" / "targets" / "triton.json").read_text())
        assert sorted(g["labels"]["instance"] for g in targets) == ["t1", "t2"]
        ep = stack.endpoints()
        assert "monitoring: Prometheus " + ep["prometheus"] in fleet.recctl("status").stdout.replace("\n", " ")
        load = LoadClient(fleet.grpc_url, threads=2, max_seconds=120).start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not _ok(stack, f'count(up{{{JOBS}}} == 1) == 4 '
                                                             'and count(recserve:goodput:rate1m) == 2')[0]:
            time.sleep(1)
        time.sleep(3)  # a few evaluations of the 1m-window rules with traffic
        dash = json.loads((DEPLOY_DIR / "grafana-dashboard.json").read_text())
        empty, broken = [], []
        for panel in dash["panels"]:
            for t in panel["targets"]:
                ok, ans = _ok(stack, t["expr"])
                if ans.get("status") != "success":
                    broken.append(f"{panel['title']}: {ans.get('error')}")
                elif not ok and not any(m in t["expr"] for m in EXTERNAL):
                    empty.append(f"{panel['title']}: {t['expr']}")
        assert not broken, broken
        assert not empty, f"panels without data while the fleet serves: {empty}"
        assert not load.failed(load.records)
        # The alert rules evaluate without errors against the real series; nothing fires on a healthy fleet
        # except what the fresh start explains.
        rules = stack.prometheus.query('ALERTS{alertstate="firing"}')
        firing = {r["metric"]["alertname"] for r in rules["data"]["result"]}
        assert not firing & {"RecserveInstanceDown", "RecserveHAProxyDown", "RecserveControlPlaneDown",
                             "RecserveGoldenMismatch", "RecserveInstanceErrors", "RecserveLoadShedding"}, firing
    finally:
        if load is not None:
            load.stop()
