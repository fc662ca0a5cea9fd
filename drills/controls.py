"""Negative controls: each drill CI trusts, run against a fleet broken on purpose, must fail, and for its reason.

A verdict that passes when the thing it guards did not happen is worse than none. So every such drill has a
control: a private fleet whose control plane runs with a test-only switch (``control/testswitch.py``,
environment only) chosen so that the drill's verdict must flip, and the expectation that must then fail. A
control passes only when the drill failed on that expectation; a drill that still passes, or fails for another
reason alone, fails its control. Controls whose switches cannot affect each other's drills share one fleet. The
knee is measured once, on an unbroken private fleet, before the first control that sizes its load by it: a broken
fleet cannot be trusted to measure it (without HAProxy's retries, one of Triton's ~500 ms holds is a failed request
and the ladder finds no rate at all), and every control then loads the same rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recserve.control.testswitch import ENV, SWITCHES
from recserve.drills import report


@dataclass(frozen=True)
class Control:
    name: str  # the drill whose verdict is being tested
    drill: str  # the spec that runs (hang: its variant with a server that still answers health)
    switch: str  # the test switch that breaks the fleet
    expected: str  # the expectation that must fail
    fleet: int  # controls with the same number share one private fleet (their switches are independent)
    mode: str | None = None  # that fleet's --mode (default: the server's, active-active)


CONTROLS: tuple[Control, ...] = (
    # no retry, no redispatch: requests in flight on the killed instance are lost
    Control("crash", "crash", "no-retries", "failed_requests_max", 1),
    # no gates: the wrong version is promoted, nothing rolls it back
    Control("bad-rollover", "bad-rollover", "no-gates", "rolled_back", 1),
    # no admission: 2x the knee reaches the instances, whose queues fill and time out (failures, not shed)
    Control("overload", "overload", "no-admission", "failed_unshed_max", 2),
    # health keeps answering while inference hangs, and the progress signal is off: nothing detects it. In
    # primary-standby mode (balance first) the hung primary fills to its in-flight limit, so its timed-out golden
    # checks read busy; in active-active, leastconn keeps a hung server below its limit and the failing-probe
    # threshold catches it anyway (a hang-live pass there does not depend on progress)
    Control("hang", "hang-live", "no-progress", "detection_ms_max", 3, mode="primary-standby"),
)
#: What CI runs (tests/test_drills_controls.py); the rest run from ``make drill-controls``.
CI_CONTROLS = ("crash", "bad-rollover")


def select(names: list[str] | None) -> list[Control]:
    """Controls by drill name, in table order; all when ``names`` is empty. Unknown names raise ValueError."""
    known = {c.name: c for c in CONTROLS}
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise ValueError(f"no control for {unknown} (controls: {', '.join(known)})")
    return [c for c in CONTROLS if not names or c.name in names]


def judge(control: Control, result: dict) -> tuple[bool, str]:
    """(the control failed as it must, why): the drill failed, and its ``expected`` check is among the misses."""
    if result.get("status") in ("skipped", "failed") and not result.get("checks"):
        return False, f"the drill did not run to a verdict: {result.get('reason')}"
    missed = [c for c in result.get("checks", []) if not c["ok"]]
    names = [c["expectation"] for c in missed]
    if result.get("passed"):
        return False, f"the drill PASSED against a fleet broken by {control.switch}: its verdict cannot fail"
    hit = next((c for c in missed if c["expectation"] == control.expected), None)
    if hit is None:
        return False, f"failed, but not on {control.expected} (missed: {', '.join(names) or 'none'})"
    others = [n for n in names if n != control.expected]
    return True, (f"{control.expected}: {hit['measured']} vs {hit['target']}"
                  + (f" (also missed: {', '.join(others)})" if others else ""))


def run(controls: list[Control], reports: Path | None, repository: Path | None, fixture_models: bool,
        log=print) -> tuple[bool, list[dict]]:
    """Run ``controls`` on private fleets (one per fleet number); (every control failed for its expected reason,
    the table's rows). The report (``reports``) holds each control's drill as ``control-<name>``."""
    from recserve.drills.runner import DrillRun
    from recserve.drills.session import FleetOwner
    from recserve.drills.spec import load_all

    specs = load_all()
    rows: list[dict] = []
    results, journals, records = [], {}, {}
    knee: tuple[float, str] | None = None
    run_dir = report.new_run_dir(reports) if reports else None
    if any(specs[c.drill].sized_by_knee for c in controls):
        knee = measure_knee(repository, fixture_models, log)
        if knee is None:
            return False, [_row(c, False, "the knee could not be measured on an unbroken fleet") for c in controls]
    for number in dict.fromkeys(c.fleet for c in controls):
        group = [c for c in controls if c.fleet == number]
        switches = ",".join(dict.fromkeys(c.switch for c in group))
        mode = group[0].mode
        log(f"fleet {number}: {ENV}={switches}" + (f", --mode {mode}" if mode else ""))
        with FleetOwner(private=True, repository=repository, fixture_models=fixture_models, log=log,
                        env={ENV: switches}, mode=mode) as session:
            # the control plane says which switches it runs with (recctl status warns while any is on)
            said = [w for w in session.fleet.status(events=1).get("warnings", []) if ENV in w]
            for c in group:
                if not any(c.switch in w for w in said):
                    rows.append(_row(c, False, f"the fleet does not report switch {c.switch} on: {said}"))
                    continue
                drill = DrillRun(specs[c.drill], session, log=log, knee=knee)
                try:
                    result = drill.run()
                except Exception as exc:  # a broken control must not hide the others
                    result = drill._result({}, status="failed", reason=f"{type(exc).__name__}: {exc}")
                ok, why = judge(c, result)
                rows.append(_row(c, ok, why, result))
                result = dict(result, name=f"control-{c.name}", control={"switch": c.switch,
                                                                           "expected": c.expected, "ok": ok})
                results.append(result)
                journals[result["name"]], records[result["name"]] = drill.journal, drill.records
                log(f"  control {c.name}: {'failed as it must' if ok else 'NOT AS EXPECTED'}: {why}")
    if run_dir is not None and results:
        report.write(run_dir, results, journals, records, {"controls": rows})
    return bool(rows) and all(r["ok"] for r in rows) and len(rows) == len(controls), rows


def measure_knee(repository: Path | None, fixture_models: bool, log=print) -> tuple[float, str] | None:
    """The knee (rps, source) of an unbroken private fleet, by the drills' own ladder; None when none was found."""
    from recserve.drills.capacity import KNEE_SLO_MS, capacity_rps
    from recserve.drills.session import FleetOwner

    log("knee: measured on an unbroken private fleet first (a broken one cannot be trusted to measure it)")
    with FleetOwner(private=True, repository=repository, fixture_models=fixture_models, log=log) as session:
        knee, source, _ = capacity_rps(session.grpc_url, "recommend", KNEE_SLO_MS, session.workdir,
                                       use_report=not fixture_models, headers=session.stats_headers)
    log(f"knee: {knee} rps ({source})")
    return (knee, f"{source}; on an unbroken private fleet before the controls") if knee else None


def _row(c: Control, ok: bool, why: str, result: dict | None = None) -> dict:
    return {"control": c.name, "drill": c.drill, "broken": f"{c.switch}: {SWITCHES[c.switch]}",
            "expected": c.expected, "verdict": None if result is None else
            ("PASS" if result.get("passed") else "FAIL"), "ok": ok, "reason": why}


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="recserve drill controls (each drill against a fleet broken on purpose)", title_justify="left")
    for h in ("control", "drill", "what was broken", "verdict", "as expected", "reason"):
        t.add_column(h)
    for r in rows:
        t.add_row(r["control"], r["drill"], r["broken"], r["verdict"] or "-", "yes" if r["ok"] else "NO", r["reason"])
    return t
