"""The drills' alert expectations: spec validation (field and rule named), matching receiver records to
expectations, time-to-alert/resolve, verdict rows and timeline marks."""

from __future__ import annotations

import pytest

from recserve.drills import alerts
from recserve.drills.spec import AlertExpect, SpecError, load_all, parse


def spec(alerts_field) -> dict:
    return {
        "name": "t", "targets": ["recommend"], "load": {"duration_s": 20, "probe_rps": 10},
        "steady_state": {"slo_p99_ms": 100, "error_rate_max": 0.0, "before_s": 3, "after_s": 3},
        "method": [{"fault": "gpu-xid-crash", "at_s": 5}], "expect": {"failed_requests_max": 0},
        "alerts": alerts_field,
    }


def test_issue_drills_expect_their_alerts():
    want = {"crash": "RecserveInstanceDown", "overload": "RecserveLoadShedding",
            "bad-rollover": "RecserveRolloutRolledBack", "gpu-lost": "RecserveInstanceDown",
            "wrong-answer": "RecserveGoldenMismatch"}
    specs = load_all()
    for name, alert in want.items():
        assert alert in {a.alert for a in specs[name].alerts}, name
    assert specs["crash"].alerts[0].resolve_within_s is not None
    assert specs["wrong-answer"].method[0].params["mode"] == "wrong"


@pytest.mark.parametrize("field,path,rule", [
    ([{"alert": "NoSuchAlert", "within_s": 5}], "alerts[0].alert", "unknown alert 'NoSuchAlert'"),
    ([{"alert": "RecserveInstanceDown"}], "alerts[0].within_s", "missing required field"),
    ([{"alert": "RecserveInstanceDown", "within_s": 0}], "alerts[0].within_s", "must be > 0"),
    ([{"alert": "RecserveInstanceDown", "within_s": 10, "resolve_within_s": 5}], "alerts[0].resolve_within_s",
     "must be > within_s"),
    ([{"alert": "RecserveInstanceDown", "within_s": 5, "page": True}], "alerts[0].page", "unknown field"),
    ([], "spec.alerts", "non-empty list"),
])
def test_bad_alert_expectations_are_refused_naming_field_and_rule(field, path, rule):
    with pytest.raises(SpecError) as err:
        parse(spec(field), "t.yaml")
    assert err.value.field == path and rule in err.value.rule


def _n(t, status, name="RecserveInstanceDown", inst="t1", starts="2026-12-01T10:00:05.123456789Z"):
    return {"received": t, "receiver": "ticket", "status": status, "alertname": name,
            "labels": {"alertname": name, "instance": inst}, "startsAt": starts}


def test_match_measures_from_the_fault_and_ignores_earlier_incidents():
    fault = alerts._unix("2026-12-01T10:00:00Z")
    old = _n(fault - 50, "firing", starts="2026-12-01T09:59:00Z")
    notes = [old, _n(fault + 8.5, "firing"), _n(fault + 9, "firing", inst="t2", starts="2026-12-01T10:00:06Z"),
             _n(fault + 30.25, "resolved"), _n(fault + 20, "resolved", inst="t2", starts="2026-12-01T10:00:06Z")]
    row = alerts.match(AlertExpect("RecserveInstanceDown", 10, 40), notes, fault)
    assert row["time_to_alert_s"] == 8.5 and row["time_to_resolve_s"] == 30.25 and row["labels"]["instance"] == "t1"
    assert alerts.done([row])
    rows = alerts.checks([row])
    assert [(r["expectation"], r["ok"], r["deterministic"]) for r in rows] == [
        ("alerts.RecserveInstanceDown.fired", True, True), ("alerts.RecserveInstanceDown.within_s", True, False),
        ("alerts.RecserveInstanceDown.resolve_within_s", True, False)]
    assert alerts.marks([row], fault - 5) == [(13.5, "alert InstanceDown firing"),
                                              (35.25, "alert InstanceDown resolved")]


def test_an_alert_that_never_came_fails_and_a_late_one_is_missed_by_its_excess():
    never = alerts.match(AlertExpect("RecserveGoldenMismatch", 10), [_n(100.0, "firing")], 50.0)
    assert never["time_to_alert_s"] is None and not alerts.done([never])
    fired, timing = alerts.checks([never])
    # never received is a deterministic failure (a broken rule or pipeline), not a timing miss
    assert fired["ok"] is False and fired["deterministic"] is True and fired["missed_by"].startswith("never received")
    assert timing["ok"] is False and timing["missed_by"] == "never received" and not timing["deterministic"]
    late = alerts.match(AlertExpect("RecserveInstanceDown", 10), [_n(1764583220.0, "firing")], 1764583200.0)
    fired, row = alerts.checks([late])
    assert fired["ok"] and row["measured"] == 20.0 and not row["ok"] and row["missed_by"].startswith("10.0")
    assert not row["deterministic"]  # late is a timing on shared cores
    assert alerts.wait_s(late) == 30.0  # the runner waits past the goal, so late is not read as never
    # without a monitoring stack nothing can arrive: no deterministic row claims otherwise
    assert [r["expectation"] for r in alerts.checks([never], monitored=False)] == [
        "alerts.RecserveGoldenMismatch.within_s"]


def test_active_names_only_the_expected_alerts_prometheus_holds_pending_or_firing():
    """A drill waits for these to clear first: an alert firing before the fault cannot be timed (the knee
    ladder's shedding kept RecserveLoadShedding up through the overload drill, read as 'never received')."""
    answer = {"status": "success", "data": {"alerts": [
        {"labels": {"alertname": "RecserveLoadShedding", "fleet": "f"}, "state": "firing"},
        {"labels": {"alertname": "RecserveInstanceDown", "fleet": "f"}, "state": "pending"},
        {"labels": {"alertname": "RecserveFailover", "fleet": "f"}, "state": "firing"},
        {"labels": {"alertname": "RecserveP99OverSLO", "fleet": "f"}, "state": "inactive"}]}}
    names = {"RecserveLoadShedding", "RecserveInstanceDown", "RecserveP99OverSLO"}
    assert alerts.active(answer, names) == ["RecserveInstanceDown", "RecserveLoadShedding"]
    assert alerts.active({"status": "success", "data": {"alerts": []}}, names) == []
    assert alerts.active({}, names) == []
