"""The typed record of drill figures (drills/figures.py): the JSON keys it writes, reading older journals back,
the expectations' figure names checked when the specs load, and faults keeping their scratch out of it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest

from recserve.drills import faults
from recserve.drills.faults import Context, CrashState, HangState, process_state
from recserve.drills.figures import FIGURE_NAMES, DrillFigures, UnknownFigure, check_names
from recserve.drills.journal import Journal
from recserve.drills.report import render
from recserve.drills.spec import EXPECT_FIGURES, Expect, SpecError, check_expect_figures


def test_to_dict_writes_assigned_figures_only_none_included():
    f = DrillFigures(rto_ms=400.0)
    f.wrong_answers = None  # measured, came out unknown: the old dict had the key with null
    f.update(instance_back_s=1.5, orphaned_stubs=0)
    assert f.to_dict() == {"rto_ms": 400.0, "wrong_answers": None, "instance_back_s": 1.5, "orphaned_stubs": 0}
    assert f.measured("wrong_answers") and not f.measured("rejoined_after_s")
    assert json.loads(json.dumps(f.to_dict())) == f.to_dict()


def test_an_unknown_figure_cannot_be_written():
    f = DrillFigures()
    with pytest.raises(AttributeError, match="rollout_sucess"):
        f.rollout_sucess = True  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        f.update(_partition=object())
    with pytest.raises(UnknownFigure):
        f.measured("target")


def test_from_dict_reads_a_result_and_keeps_an_older_journals_keys():
    old = {"name": "crash", "passed": True, "status": "completed", "checks": [], "reason": "ok",
           "rto_ms": None, "failed_requests": 0, "p99_ms": {"before": 1.0}, "a_figure_since_removed": [1, 2]}
    f = DrillFigures.from_dict(old)
    assert f.rto_ms is None and f.measured("rto_ms") and f.failed_requests == 0
    assert f.unknown == {"a_figure_since_removed": [1, 2]}
    # the result's own keys are not figures; every figure and unknown key is written back as it was
    assert f.to_dict() == {"rto_ms": None, "failed_requests": 0, "p99_ms": {"before": 1.0},
                           "a_figure_since_removed": [1, 2]}
    assert DrillFigures.from_journal({"result": old}).to_dict() == f.to_dict()


def test_every_expectation_reads_a_figure_of_the_record():
    from dataclasses import fields

    assert set(EXPECT_FIGURES) == {f.name for f in fields(Expect)}
    assert {fig for fig, _ in EXPECT_FIGURES.values()} <= set(FIGURE_NAMES)


def test_an_expectation_naming_an_unknown_figure_is_refused_at_load():
    bad = dict(EXPECT_FIGURES, rto_ms_max=("rto_msec", "<="))
    with pytest.raises(UnknownFigure) as exc:
        check_expect_figures(bad, "drills/spec.py")
    msg = str(exc.value)
    assert msg.startswith("drills/spec.py: EXPECT_FIGURES['rto_ms_max']: unknown figure 'rto_msec'")
    assert "DrillFigures defines:" in msg and "rto_ms," in msg
    missing = {k: v for k, v in EXPECT_FIGURES.items() if k != "repaired"}
    with pytest.raises(SpecError, match="EXPECT_FIGURES\\['repaired'\\]: missing"):
        check_expect_figures(missing, "drills/spec.py")
    with pytest.raises(SpecError, match="not an expectation"):
        check_expect_figures(dict(EXPECT_FIGURES, rto_max=("rto_ms", "<=")), "drills/spec.py")
    check_names([("x", "rto_ms")], "here")  # a known name passes


def test_a_journal_from_before_the_record_still_renders(tmp_path):
    """Re-rendering an older run: its journals' results are read through the record, unknown keys kept."""
    result = {"name": "crash", "passed": True, "status": "completed", "reason": "ok", "rto_ms": 400.0,
              "detection_ms": 350.0, "failed_requests": 0, "total_requests": 320, "wrong_answers": 0,
              "p99_ms": {"before": 12.5, "during": 240.0, "after": 13.0}, "versions_consistent": True,
              "instance_back_s": 3.2, "a_figure_since_removed": 7}
    j = Journal("crash")
    j.result, j.meta = result, {"run": "old"}
    j.write(tmp_path / "crash.journal.json")
    out = render(tmp_path)
    drill = json.loads(out["json"].read_text())["drills"][0]
    assert drill["a_figure_since_removed"] == 7 and drill["instance_back_s"] == 3.2
    assert "RTO: 400 ms" in out["md"].read_text()
    assert Journal.read(tmp_path / "crash.journal.json").figures().unknown == {"a_figure_since_removed": 7}


class _Fleet:
    """One instance backed by a real process; the control plane 'restarts' it at once."""

    def __init__(self, pid: int):
        self.inst = SimpleNamespace(id="i1", pid=pid, state="healthy", shm_regions=2, role="primary")

    def instance(self, target: str):
        return self.inst

    def instances(self, *_):
        return [self.inst]

    def wait(self, what, ok, timeout_s, interval_s=0.1):
        assert ok()
        return 0.25


def test_process_faults_write_figures_and_keep_their_scratch_apart(tmp_path):
    """The keys crash writes are the ones its figures dict had in the journal; pids live in the fault's scratch."""
    action = SimpleNamespace(params={"target": "primary", "then": "cont"})
    hung = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        ctx = Context(_Fleet(hung.pid), None, None, tmp_path, tmp_path)
        faults.Hang().inject(ctx, action)
        assert ctx.target == "i1" and ctx.state(HangState).stopped_pid == hung.pid
        deadline = time.monotonic() + 5  # the stop is delivered asynchronously
        while process_state(hung.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_state(hung.pid) == "T"
        assert faults.Hang().rollback(ctx)["was_stopped"] is True
        assert ctx.figures.to_dict() == {}  # a hang measures nothing itself: no scratch in the record
    finally:
        hung.send_signal(signal.SIGKILL)
        hung.wait()
    killed = subprocess.Popen(["sleep", "30"], start_new_session=True)
    ctx = Context(_Fleet(killed.pid), None, None, tmp_path, tmp_path)
    faults.Crash().inject(ctx, action)
    killed.wait()
    assert ctx.state(CrashState).killed_pid == killed.pid and ctx.state(CrashState).shm_regions_before == 2
    faults.Crash().rollback(ctx)
    assert ctx.figures.to_dict() == {"instance_back_s": 0.25, "orphaned_stubs": 0, "shm_growth": 0}


class _DrillFleet:
    """What the runner asks of the fleet after a drill: versions, events (a detection 0.4 s after the fault)."""

    def __init__(self, fault_t: float):
        self.fault_t = fault_t

    def versions_consistent(self, repository):
        return True, "every instance serves the desired versions"

    def events_since(self, t: float, instance: str | None = None):
        return [{"kind": "detected", "ts_unix": self.fault_t + 0.4, "instance": "i1"}]


def test_a_crash_drills_result_has_the_keys_its_figures_dict_had(tmp_path):
    """The runner's figures of a crash drill, from hand-made requests: the result document (journal, report.json)
    has exactly the keys the dict of string keys gave it, and the verdict reads the typed figures."""
    from recserve.drills.probe import Record
    from recserve.drills.runner import DrillRun
    from recserve.drills.spec import SPECS_DIR, load_file

    spec = load_file(SPECS_DIR / "crash.yaml")
    t0 = 1_000.0
    fault_t = t0 + spec.method[0].at_s
    session = SimpleNamespace(fleet=_DrillFleet(fault_t), repository=tmp_path, workdir=tmp_path, control=None,
                              access_log=None, monitor=None)
    run = DrillRun(spec, session, log=lambda *_: None)
    run.journal.add("gpu-xid-crash", "method", "succeeded", started_at=fault_t, ended_at=fault_t + 0.01)
    run.records = [Record(i, "recommend", t0 + i * 0.05, 10.0, "OK", True) for i in range(int(spec.load.duration_s
                                                                                               * 20))]
    run.ctx.target = "i1"
    run.ctx.figures.update(instance_back_s=2.5, orphaned_stubs=0, shm_growth=0)
    fig = run._figures(t0, None, 1.0)
    fig.answers_notes, fig.answers_source = [], "golden reference (control.fleet.golden)"
    got = run._result(fig, status="completed")
    assert set(got) == {
        "name", "purpose", "status", "fault", "simulation", "slo_p99_ms", "rto_ms", "detection_ms",
        "failed_requests", "total_requests", "wrong_answers", "p99_ms", "versions_consistent",
        "fault_at_s", "fault_end_s", "rto_basis", "served_requests", "degraded_answers", "shed_requests",
        "failed_unshed", "error_budget_used", "p50_ms", "tail", "throughput_rps", "phases", "settled_after_s",
        "statuses", "failures", "client_lag", "haproxy_timers", "p99_during_ratio", "p99_during_ms",
        "bad_after_detection", "bad_share", "instance_back_s", "orphaned_stubs", "shm_growth", "versions_detail",
        "seconds", "marks", "answers_notes", "answers_source", "passed", "checks", "reason", "deviated"}
    assert got["detection_ms"] == 400.0 and got["failed_requests"] == 0 and got["orphaned_stubs"] == 0
    assert {c["figure"]: c["ok"] for c in got["checks"]}["orphaned_stubs"] is True
    assert json.loads(json.dumps(got, default=str))["instance_back_s"] == 2.5
