"""Pass or fail: each expectation of a spec against the measured figures, with the miss spelled out.

Why separate: the verdict is the part people argue about, so it is small, pure and unit-tested, and
every check says target, measured value and by how much it was missed (the issue asks for that).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from recserve.drills.figures import DrillFigures
from recserve.drills.spec import EXPECT_FIGURES, Expect

#: expectation -> (figure of drills/figures.py DrillFigures, comparison); defined beside Expect (drills/spec.py),
#: where it is checked against the record's fields when the specs load
CHECKS: dict[str, tuple[str, str]] = EXPECT_FIGURES

#: Expectations whose outcome does not depend on how fast a shared host is: a lost request, a wrong answer,
#: inconsistent versions, a missing rollback or a leaked process is a defect on any machine. CI fails on these
#: (tests/test_drills_smoke.py); the timing ones (RTO, p99 ratios, goodput) are figures for the report.
DETERMINISTIC = frozenset({"failed_requests_max", "wrong_answers_max", "versions_consistent", "background_clean",
                           "instances_alive", "rolled_back", "bad_version_live", "rollout_succeeded",
                           "degraded_answers_max", "repaired", "orphaned_stubs_max",
                           "shm_growth_max", "failed_unshed_max", "restarts_max", "probes_shed_max",
                           "attacks_refused"})


def check(name: str, target: Any, measured: Any) -> dict:
    """One expectation; a figure that could not be measured (None) fails: unmeasured is not passed."""
    key, op = CHECKS[name]
    row: dict[str, Any] = {"expectation": name, "figure": key, "target": f"{op} {target}", "measured": measured,
                           "deterministic": name in DETERMINISTIC}
    if measured is None:
        row.update(ok=False, missed_by="not measured")
    elif op == "==":
        row.update(ok=measured == target, missed_by=None if measured == target else f"{measured} != {target}")
    elif op == "<=":
        ok = measured <= target
        row.update(ok=ok, missed_by=None if ok else _by(measured - target, target))
    else:
        ok = measured >= target
        row.update(ok=ok, missed_by=None if ok else _by(target - measured, target))
    return row


def _by(diff: float, target: float) -> str:
    rel = f" ({diff / target:+.0%} of target)" if target else ""
    return f"{round(diff, 3)}{rel}"


def evaluate(expect: Expect, figures: DrillFigures) -> tuple[bool, list[dict], str]:
    """All expectations that the spec sets, each against its figure; returns (passed, checks, reason)."""
    rows = []
    for f in fields(expect):
        target = getattr(expect, f.name)
        if target is None:
            continue
        if f.name == "rejected_p99_ms_max" and figures.rejected_requests == 0:  # no rejection, no p99 of them
            rows.append({"expectation": f.name, "figure": CHECKS[f.name][0], "target": f"<= {target}",
                         "measured": "no request was rejected", "ok": True, "missed_by": None,
                         "deterministic": False})
            continue
        rows.append(check(f.name, target, getattr(figures, CHECKS[f.name][0])))
    missed = [r for r in rows if not r["ok"]]
    if missed:
        reason = "; ".join(f"{r['figure']} {r['measured']} vs {r['target']} (missed by {r['missed_by']})"
                           for r in missed)
    else:
        reason = f"all {len(rows)} expectations met"
    return not missed, rows, reason
