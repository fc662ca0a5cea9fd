"""An overload drill whose load the fleet served whole proves nothing: its verdict says so, and the run measures
the knee again (drills/runner.py ``overload_not_felt``, drills/cli.py). A clean-clone CI run saw it: 2x an
under-measured knee was admitted whole, nothing was shed, and only the shedding alert's silence failed the drill."""

from __future__ import annotations

from recserve.drills import cli
from recserve.drills.figures import DrillFigures
from recserve.drills.runner import overload_not_felt
from recserve.drills.spec import load_all

SPECS = load_all()


def hold(total=1000, rejected=0, degraded=0, failed=0, p99_ms=12.0) -> dict:
    return {"total": total, "rejected": rejected, "degraded": degraded, "failed": failed, "p99_ms": p99_ms}


def figures(**hold_kw) -> DrillFigures:
    f = DrillFigures()
    f.update(hold_window=hold(**hold_kw), capacity_rps=150.0, offered_rps=300.0,
             client_lag={"p50_ms": 1.0, "p99_ms": 4.0, "max_ms": 9.0})
    return f


def test_a_load_served_whole_within_the_slo_was_not_felt():
    why = overload_not_felt(SPECS["overload"], figures())
    assert why and "2x a knee of 150.0 rps" in why and "300.0 rps offered" in why and "lag p99 4.0 ms" in why


def test_any_sign_of_overload_counts_as_felt():
    spec = SPECS["overload"]
    for sign in ({"rejected": 1}, {"degraded": 1}, {"failed": 1}, {"p99_ms": 51.0}):
        assert overload_not_felt(spec, figures(**sign)) is None, sign


def test_drills_without_an_overload_or_without_a_hold_are_not_judged():
    assert overload_not_felt(SPECS["crash"], figures()) is None
    assert overload_not_felt(SPECS["overload"], DrillFigures()) is None
    assert overload_not_felt(SPECS["overload"], figures(total=0)) is None


def test_the_cli_reads_the_reason_from_the_check():
    row = {"expectation": "fault_effective", "missed_by": "served whole", "ok": False}
    assert cli._unfelt({"checks": [{"expectation": "goodput_ratio", "missed_by": "x"}, row]}) == "served whole"
    assert cli._unfelt({"checks": []}) is None and cli._unfelt({}) is None
