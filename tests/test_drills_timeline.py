"""RTO, percentiles, windows, overload figures and abort rules on hand-recorded timelines."""

from __future__ import annotations

import pytest

from recserve.control.routing.haproxy import OVERLOADED
from recserve.control.stats import percentile
from recserve.drills.probe import Record
from recserve.drills.timeline import (
    abort_reason,
    error_budget_used,
    failed_or_wrong_after,
    failure_samples,
    is_shed,
    per_second,
    phases,
    rto_ms,
    rto_vs_before_ms,
    steady_state_ok,
    window_stats,
)

SLO = 100.0


def rec(t: float, status: str = "OK", lat: float = 10.0, matched: bool | None = True, seq: int = 0,
        detail: str = "") -> Record:
    return Record(seq, "recommend", t, lat, status, matched if status == "OK" else None, detail)


#: admission's refusal as the probe records it (tritonclient's text of the gRPC error)
REFUSED = {"status": "RESOURCE_EXHAUSTED", "detail": f"[StatusCode.RESOURCE_EXHAUSTED] {OVERLOADED}"}


def every(t_from: float, t_to: float, step: float = 0.1, **kw) -> list[Record]:
    n = round((t_to - t_from) / step)
    return [rec(round(t_from + i * step, 6), **kw) for i in range(n)]


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 99) is None
    assert percentile([5, 1, 3], 50) == 3
    with pytest.raises(ValueError):
        percentile([1], 0)


def test_rto_zero_when_nothing_went_bad():
    records = every(0, 10)
    assert rto_ms(records, fault_t=5.0, slo_ms=SLO, end_t=10.0) == 0.0


def test_rto_is_start_of_first_full_good_second_after_last_bad_request():
    records = every(0, 5) + every(5, 6.5, status="UNAVAILABLE") + every(6.5, 10)
    # last bad request sent at 6.4: the next request (6.5) starts the first full good second
    assert rto_ms(records, fault_t=5.0, slo_ms=SLO, end_t=10.0) == 1500.0


def test_slow_and_wrong_answers_count_as_bad_for_rto():
    slow = every(0, 5) + every(5, 5.3, lat=SLO + 1) + every(5.3, 10)
    assert rto_ms(slow, 5.0, SLO, 10.0) == 300.0
    wrong = every(0, 5) + every(5, 7, matched=False) + every(7, 10)
    assert rto_ms(wrong, 5.0, SLO, 10.0) == 2000.0


def test_isolated_late_failure_restarts_the_window():
    records = every(5, 10)
    records[3] = rec(records[3].t_send, status="UNAVAILABLE")  # sent at 5.3: the window restarts at 5.4
    records[33] = rec(records[33].t_send, status="UNAVAILABLE")  # after recovery: does not move RTO
    assert rto_ms(records, 5.0, SLO, 10.0) == pytest.approx(400.0)


def test_rto_none_when_no_full_good_second_was_recorded():
    records = every(0, 5) + every(5, 9.5, status="UNAVAILABLE") + every(9.5, 10)
    assert rto_ms(records, 5.0, SLO, 10.0) is None
    assert rto_ms([], 5.0, SLO, 10.0) is None


def test_requests_sent_before_the_fault_do_not_move_rto():
    records = every(0, 4.9) + [rec(4.95, status="DEADLINE_EXCEEDED")] + every(5, 10)
    assert rto_ms(records, 5.0, SLO, 10.0) == 0.0


def test_window_stats_counts_and_overload_figures():
    records = (every(0, 1, lat=20.0) + every(1, 2, step=0.05, lat=2.0, **REFUSED)
               + [rec(1.5, lat=300.0), rec(1.6, matched=False)])
    s = window_stats(records, 1.0, 2.0, SLO)
    assert s["total"] == 22 and s["ok"] == 2 and s["failed"] == 20 and s["rejected"] == 20 and s["wrong"] == 1
    assert s["shed_rate"] == pytest.approx(20 / 22, abs=1e-4)
    assert s["rejected_p99_ms"] == 2.0
    assert s["goodput_rps"] == 0.0  # one too slow, one wrong
    assert s["throughput_rps"] == 2.0
    before = window_stats(records, 0.0, 1.0, SLO)
    assert before["p50_ms"] == 20.0 and before["p99_ms"] == 20.0 and before["goodput_rps"] == 10.0
    assert steady_state_ok(before, SLO, 0.0) and not steady_state_ok(s, SLO, 0.5)
    assert not steady_state_ok(window_stats([], 0, 1, SLO), SLO, 0.0), "no traffic is not a steady state"


def test_phases_split_at_fault_and_fault_end():
    records = every(0, 3, lat=5.0) + every(3, 6, lat=50.0) + every(6, 9, lat=7.0)
    p = phases(records, 0.0, 3.0, 6.0, 9.0, SLO)
    assert (p["before"]["p99_ms"], p["during"]["p99_ms"], p["after"]["p99_ms"]) == (5.0, 50.0, 7.0)
    assert sum(p[k]["total"] for k in p) == len(records)


def test_per_second_rows():
    records = every(0, 2) + [rec(2.5, status="INTERNAL"), rec(2.6, matched=False, lat=40.0)]
    rows = per_second(records, 0.0, 3.0)
    assert [r["sent"] for r in rows] == [10, 10, 2]
    assert rows[2]["errors"] == 1 and rows[2]["wrong"] == 1 and rows[2]["p99_ms"] == 40.0


def test_error_budget_used():
    assert error_budget_used(0, 100, 0.0) == 0.0
    assert error_budget_used(1, 100, 0.0) is None
    assert error_budget_used(1, 100, 0.02) == 0.5


def test_abort_on_burnt_budget_and_on_long_p99():
    failing = every(0, 5, status="UNAVAILABLE")
    assert "error budget burnt" in abort_reason(failing, 6.0, SLO, 0.5, 1000, 3, 20)
    assert abort_reason(failing[:10], 6.0, SLO, 0.5, 1000, 3, 20) is None  # too few requests to judge
    slow = every(0, 5, lat=2000.0)
    assert "p99 over the 1000 ms ceiling for 3s" in abort_reason(slow, 7.0, SLO, 1.0, 1000, 3, 20)
    mixed = every(0, 3, lat=2000.0) + every(3, 5, lat=10.0)
    assert abort_reason(mixed, 7.0, SLO, 1.0, 1000, 3, 20) is None


def test_bad_answers_after_detection_are_counted_by_send_time():
    records = every(0, 5) + every(5, 5.5, status="INTERNAL") + every(5.5, 6, matched=False) + every(6, 8, lat=900.0)
    assert failed_or_wrong_after(records, 5.0) == 10
    assert failed_or_wrong_after(records, 5.5) == 5
    assert failed_or_wrong_after(records, 6.0) == 0, "slow but right answers are not bad answers"


def test_fault_window_follows_the_actions_that_really_ran():
    from recserve.drills.journal import ActionEntry, Journal
    from recserve.drills.runner import _fault_window
    from recserve.drills.spec import parse

    raw = {"name": "t", "targets": ["recommend"], "load": {"duration_s": 40, "probe_rps": 10},
           "steady_state": {"slo_p99_ms": 100, "error_rate_max": 0.0},
           "method": [{"fault": "rollover-under-load", "at_s": 6, "observe_s": 3, "params": {"model": "ranker"}}],
           "expect": {"failed_requests_max": 0}}
    spec = parse(raw)
    j = Journal("t")
    j.actions.append(ActionEntry("rollover-under-load", "method", 1006.2, 1027.0, "succeeded"))
    assert _fault_window(spec, j, 1000.0) == (1006.2, 1027.0), "a rollover lasts until its action ends"
    j.actions[0].ended_at = 1007.0
    assert _fault_window(spec, j, 1000.0) == (1006.2, 1009.2), "at least observe_s"
    raw["method"] = [{"fault": "gpu-hang", "at_s": 5, "duration_s": 5}]
    hang = parse(raw)
    j = Journal("t")
    j.actions += [ActionEntry("gpu-hang", "method", 1005.1, 1005.1, "succeeded"),
                  ActionEntry("gpu-hang", "method-end", 1010.3, 1010.3, "succeeded")]
    assert _fault_window(hang, j, 1000.0) == (1005.1, 1010.3)


def _peak(t_from: float, t_to: float, shed_every: int = 4, **kw) -> list[Record]:
    """Above the knee: every ``shed_every``-th request is refused fast (RESOURCE_EXHAUSTED), the rest answered."""
    out = every(t_from, t_to, step=0.01, **kw)
    return [rec(r.t_send, **REFUSED) if i % shed_every == 0 else r for i, r in enumerate(out)]


def test_rto_at_peak_is_back_to_the_before_level_with_shedding_allowed():
    before = _peak(0, 5)  # 75 good answers/s, 25 shed/s: the steady state above the knee
    good_rps = 75.0
    # no full good second exists at all at the peak (shedding never stops): the all-good RTO is undefined
    assert rto_ms(before + _peak(5, 10), 5.0, SLO) is None
    assert rto_vs_before_ms(before + _peak(5, 10), 5.0, SLO, good_rps, end_t=10.0) == 0.0
    # the crash: 0.8 s of failed requests (not shed), then a dip with half of the requests shed
    crashed = [rec(r.t_send, status="INTERNAL") for r in every(5, 5.8, step=0.01)]
    dip = _peak(5.8, 6.5, shed_every=2)  # good/s at 50 < 0.9 x 75
    after = _peak(6.5, 10)
    got = rto_vs_before_ms(before + crashed + dip + after, 5.0, SLO, good_rps, end_t=10.0)
    # no window may hold a failure (all end by 5.8 s); the first one reaching 67.5 good/s overlaps the dip's end
    assert got == pytest.approx(1300.0, abs=100.0)
    wrong = [rec(r.t_send, matched=False) for r in every(5, 6, step=0.01)]
    assert rto_vs_before_ms(before + wrong + _peak(6, 10), 5.0, SLO, good_rps, end_t=10.0) == 1000.0
    assert rto_vs_before_ms(before, 5.0, SLO, 0.0, end_t=10.0) is None  # nothing good before: undefined



def test_failure_samples_group_by_status_and_message_most_frequent_first():
    recs = every(0, 2) + [
        Record(1, "recommend", 3.0, 2000.0, "DEADLINE_EXCEEDED", None, "Deadline Exceeded"),
        Record(2, "recommend", 4.5, 3.0, "INTERNAL", None, "failed to find the requested model version"),
        Record(3, "recommend", 4.0, 2.0, "INTERNAL", None, "failed to find the requested model version"),
    ]
    got = failure_samples(recs, t0=0.0, fault_t=2.5)
    assert [(g["status"], g["count"]) for g in got] == [("INTERNAL", 2), ("DEADLINE_EXCEEDED", 1)]
    assert got[0]["first_at_s"] == 4.0 and got[0]["first_after_fault_s"] == 1.5 and got[0]["first_latency_ms"] == 2.0
    assert got[0]["detail"] == "failed to find the requested model version"
    assert failure_samples(every(0, 2), 0.0, 1.0) == []


def test_only_admissions_refusal_is_shed_every_other_refusal_is_a_failure():
    """Shed = the front door's own RESOURCE_EXHAUSTED naming OVERLOADED. An instance that vanished, a refused
    connection, Triton's full queue, a request timeout or another RESOURCE_EXHAUSTED (the body limit) fail."""
    others = [("UNAVAILABLE", "[StatusCode.UNAVAILABLE] Socket closed"),
              ("UNAVAILABLE", "[StatusCode.UNAVAILABLE] failed to connect to all addresses"),
              ("UNAVAILABLE", "[StatusCode.UNAVAILABLE] Exceeds maximum queue size"),
              ("UNAVAILABLE", "[StatusCode.UNAVAILABLE] Request timeout expired"),
              ("RESOURCE_EXHAUSTED", "[StatusCode.RESOURCE_EXHAUSTED] request body over 92276 bytes")]
    recs = [rec(1.0 + i * 0.1, status=st, detail=d) for i, (st, d) in enumerate(others)]
    recs += [rec(2.0, **REFUSED), rec(2.1)]
    w = window_stats(recs, 0.0, 3.0, SLO)
    assert w["rejected"] == 1 and w["failed"] == 6 and w["failed_unshed"] == 5
    assert [is_shed(r) for r in recs] == [False] * 5 + [True, False]


def test_the_tail_beyond_p99_is_reported_p999_and_requests_over_4x_the_slo():
    """Issue 22: p99 hides the ~500 ms holds when they are rarer than 1 in 100; p99.9 and the count over 4x the
    SLO show them (a failed request that took long counts too)."""
    recs = every(0, 100, step=0.05, lat=10.0)  # 2000 answers at 10 ms
    recs[100] = rec(recs[100].t_send, lat=510.0)
    recs[900] = rec(recs[900].t_send, lat=505.0)
    recs[1500] = rec(recs[1500].t_send, status="DEADLINE_EXCEEDED", lat=2000.0)
    w = window_stats(recs, 0.0, 100.0, SLO)
    assert w["p99_ms"] == 10.0 and w["p999_ms"] == 505.0 and w["over_4x_slo"] == 3
