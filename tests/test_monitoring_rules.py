"""Monitoring files without a fleet: promtool/amtool checks, a promtool test for every alert, routing by
severity, the rendered runtime configs, the dashboard JSON, the file_sd writer and the webhook receiver."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import yaml

from recserve.control.monitoring.alertsink import read_notifications
from recserve.control.monitoring.config import (
    DEPLOY_DIR,
    alert_names,
    render_alertmanager,
    render_prometheus,
    rule_files,
    write_yaml,
)
from recserve.control.monitoring.targets import FleetCollector, TargetFiles
from recserve.control.runtime.promstack import AlertReceiver, ProcConfig, binary

PROMTOOL, AMTOOL = binary("promtool"), binary("amtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: 'make setup' installs prometheus")
needs_amtool = pytest.mark.skipif(AMTOOL is None,
                                  reason="amtool missing: 'make setup' installs prometheus-alertmanager")
RULE_TESTS = DEPLOY_DIR / "tests" / "alerts_test.yml"


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_check_rules():
    r = run(PROMTOOL, "check", "rules", *map(str, rule_files()))
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_rule_unit_tests_pass():
    r = run(PROMTOOL, "test", "rules", str(RULE_TESTS))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_has_a_firing_and_a_silent_test_and_a_runbook():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired, silent = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
            for a in case.get("exp_alerts") or []:
                assert a["exp_labels"].get("severity") and a["exp_annotations"].get("runbook"), case
    names = alert_names()
    assert len(names) >= 17
    assert names - fired == set(), f"alerts never shown firing: {sorted(names - fired)}"
    assert names - silent == set(), f"alerts never shown silent on healthy series: {sorted(names - silent)}"
    for f in rule_files():
        for g in yaml.safe_load(f.read_text())["groups"]:
            for rule in g["rules"]:
                if "alert" in rule:
                    assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
                    assert "recctl" in rule["annotations"]["runbook"] or "make" in rule["annotations"]["runbook"]


@needs_amtool
@pytest.mark.parametrize("fast", [False, True])
def test_amtool_checks_the_committed_and_rendered_config(tmp_path, fast):
    path = write_yaml(tmp_path / "alertmanager.yml", render_alertmanager("127.0.0.1:19095", fast=fast))
    for p in (DEPLOY_DIR / "alertmanager.yml", path):
        r = run(AMTOOL, "check-config", str(p))
        assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load(path.read_text())
    urls = [h["url"] for rc in cfg["receivers"] for h in rc["webhook_configs"]]
    assert urls and all(u.startswith("http://127.0.0.1:19095/") for u in urls)
    assert (cfg["route"]["group_interval"] == "1s") is fast


@needs_amtool
@pytest.mark.parametrize("labels,receiver", [
    ("severity=critical", "recserve-page"), ("severity=warning", "recserve-ticket"),
    ("severity=info", "recserve-info"), ("severity=other", "recserve-default")])
def test_routing_by_severity(labels, receiver):
    r = run(AMTOOL, "config", "routes", "test", f"--config.file={DEPLOY_DIR / 'alertmanager.yml'}",
            "alertname=X", "fleet=f", labels)
    assert r.returncode == 0 and r.stdout.strip() == receiver, r.stdout + r.stderr


def test_inhibition_mutes_symptoms_of_a_down_instance_in_the_same_fleet():
    rules = yaml.safe_load((DEPLOY_DIR / "alertmanager.yml").read_text())["inhibit_rules"]
    down = next(r for r in rules if r["source_matchers"] == ['alertname="RecserveInstanceDown"'])
    assert down["equal"] == ["fleet"]
    for name in ("RecserveP99OverSLO", "RecserveErrorBudgetBurnFast", "RecserveErrorBudgetBurnSlow"):
        assert name in down["target_matchers"][0] and name in alert_names()


@needs_promtool
@pytest.mark.parametrize("fast", [False, True])
def test_promtool_checks_the_rendered_prometheus_config(tmp_path, fast):
    cfg = render_prometheus(tmp_path / "targets", "127.0.0.1:19093", fast=fast)
    assert (cfg["global"]["scrape_interval"] == "1s") is fast
    assert all(p.startswith("/") for p in cfg["rule_files"])
    (tmp_path / "targets").mkdir()
    r = run(PROMTOOL, "check", "config", str(write_yaml(tmp_path / "prometheus.yml", cfg)))
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_json_is_valid_and_every_panel_has_a_query():
    dash = json.loads((DEPLOY_DIR / "grafana-dashboard.json").read_text())
    assert dash["panels"]
    for p in dash["panels"]:
        assert p["title"] and p["targets"] and all(t["expr"].strip() for t in p["targets"]), p


def test_target_files_follow_membership_and_write_only_on_change(tmp_path):
    tf = TargetFiles(tmp_path / "targets", fleet="f")
    recs = [SimpleNamespace(id="t2", metrics_port=1002), SimpleNamespace(id="t1", metrics_port=1001),
            SimpleNamespace(id="t3", metrics_port=0)]
    assert tf.sync_instances(recs) is True
    assert tf.sync_instances(recs) is False  # unchanged: no rewrite
    got = json.loads((tmp_path / "targets" / "triton.json").read_text())
    assert got == [{"labels": {"fleet": "f", "instance": "t1"}, "targets": ["127.0.0.1:1001"]},
                   {"labels": {"fleet": "f", "instance": "t2"}, "targets": ["127.0.0.1:1002"]}]
    assert tf.sync_instances(recs[1:]) is True  # t2 removed
    assert [g["labels"]["instance"] for g in json.loads((tmp_path / "targets" / "triton.json").read_text())] == ["t1"]


def test_fleet_collector_reports_states_golden_mismatch_and_rollbacks():
    recs = [SimpleNamespace(id="t1", role="primary", state="broken"), SimpleNamespace(id="t2", role="standby",
                                                                                      state="healthy")]
    fleet = SimpleNamespace(
        state=SimpleNamespace(instances=lambda: recs, latest_rollout=lambda m: SimpleNamespace(
            status="rolled_back", finished=123.0) if m == "ranker" else None),
        last_probe={"t1": SimpleNamespace(ok=False, stage="golden", reason="wrong answer: recommend differs")}.get,
        versioned_models=lambda: ["ranker", "retrieval"], config=SimpleNamespace(mode="primary-standby"))
    fams = {f.name: f for f in FleetCollector(fleet).collect()}
    samples = lambda n: {tuple(sorted(s.labels.items())): s.value for s in fams[n].samples}  # noqa: E731
    assert samples("recserve_instance_golden_mismatch") == {(("instance", "t1"),): 1, (("instance", "t2"),): 0}
    assert samples("recserve_instance_state")[(("instance", "t1"), ("role", "primary"), ("state", "broken"))] == 1
    assert samples("recserve_fleet_healthy_standbys") == {(): 1}
    # the serving mode, which RecserveNoHealthyStandby selects on (active-active has no standby by design)
    assert samples("recserve_fleet_mode") == {(("mode", "primary-standby"),): 1, (("mode", "active-active"),): 0}
    assert samples("recserve_rollout_last_finished_timestamp_seconds") == {
        (("model", "ranker"), ("status", "rolled_back")): 123.0}


def test_backup_policy_start_is_exported_with_the_policy(tmp_path):
    """RecserveBackupStale counts the age from the policy's start while no verified backup is known (last
    success 0): exported from the moment the policy's max age is, so a starting control plane is never stale."""
    from recserve.control.backup.manager import BackupManager
    from recserve.control.backup.policy import load_policy
    from recserve.control.monitoring.metrics import ControlMetrics

    metrics = ControlMetrics()
    value = metrics.registry.get_sample_value
    assert value("recserve_backup_policy_start_timestamp_seconds") == value("recserve_backup_max_age_seconds") == 0
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(json.dumps({"target": {"path": str(tmp_path / "offhost")}}))
    policy = load_policy(policy_file, tmp_path / "runtime", tmp_path / "repo")
    BackupManager(policy, tmp_path / "repo", tmp_path / "runtime" / "state.db", metrics, clock=lambda: 1234.5)
    assert value("recserve_backup_policy_start_timestamp_seconds") == 1234.5
    assert value("recserve_backup_max_age_seconds") == policy.max_age_s > 0
    assert value("recserve_backup_last_success_timestamp_seconds") == 0  # none known yet: not stale for that


def test_webhook_receiver_records_notifications_and_stops_cleanly(tmp_path):
    rx = AlertReceiver(ProcConfig(tmp_path / "rx"))
    rx.start()
    try:
        body = {"status": "firing", "alerts": [{"status": "firing", "labels": {"alertname": "RecserveInstanceDown",
                                                                             "instance": "t1"}, "startsAt": "x"}]}
        req = urllib.request.Request(rx.url + "/page", data=json.dumps(body).encode(), method="POST")
        assert urllib.request.urlopen(req, timeout=5).status == 200
        bad = urllib.request.Request(rx.url + "/page", data=b"not json", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=5)
        assert err.value.code == 400
        rows = read_notifications(rx.out)
        assert [(r["receiver"], r["alertname"], r["status"]) for r in rows] == [("page", "RecserveInstanceDown",
                                                                                  "firing")]
        assert abs(rows[0]["received"] - time.time()) < 60
    finally:
        pid = rx.pid
        rx.stop()
    assert not rx.is_alive() and not rx.pid_path.exists()
    assert not (pid and __import__("recserve.control.runtime.procs").control.runtime.procs.pid_alive(pid))


@pytest.mark.skipif(PROMTOOL is None or AMTOOL is None, reason="prometheus/alertmanager missing: 'make setup'")
def test_monitor_up_twice_adopts_and_down_stops_exactly_its_processes(tmp_path):
    """What make monitor-up / monitor-down do, in separate processes (pid files, command lines naming the root)."""
    import sys

    from recserve.control.monitoring.stack import read_endpoints
    from recserve.control.runtime.procs import pid_alive

    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "recserve.control.monitoring.stack", "--root", str(tmp_path), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    ports = ["--prometheus-port", "0", "--alertmanager-port", "0", "--receiver-port", "0"]
    try:
        assert cli("up", *ports).returncode == 0
        first = read_endpoints(tmp_path)
        pids = [int((tmp_path / "monitoring" / n / f"{n}.pid").read_text().split()[0])
                for n in ("prometheus", "alertmanager", "receiver")]
        assert cli("up", *ports).returncode == 0 and read_endpoints(tmp_path) == first  # adopted, not doubled
        assert urllib.request.urlopen(first["prometheus"] + "/-/ready", timeout=5).status == 200
    finally:
        down = cli("down")
    assert "stopped prometheus, alertmanager, receiver" in down.stdout, down.stdout + down.stderr
    assert not [p for p in pids if pid_alive(p)] and read_endpoints(tmp_path) == {}
