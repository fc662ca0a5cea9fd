"""Verdicts, journal and report rendering: report.json fields, report.md table, PNG, latest link."""

from __future__ import annotations

import json

import pytest

from recserve.drills.figures import DrillFigures
from recserve.drills.journal import Journal
from recserve.drills.probe import Record
from recserve.drills.report import REQUIRED, console_table, markdown, new_run_dir, plot, summary_rows, write
from recserve.drills.spec import Expect
from recserve.drills.timeline import per_second
from recserve.drills.verdict import evaluate


def result(name: str = "crash", passed: bool = True, **kw) -> dict:
    d = {"name": name, "passed": passed, "status": "completed", "reason": "ok", "rto_ms": 400.0,
         "detection_ms": 350.0, "failed_requests": 0, "total_requests": 320, "wrong_answers": 0,
         "p99_ms": {"before": 12.5, "during": 240.0, "after": 13.0}, "versions_consistent": True}
    d.update(kw)
    return d


def test_verdict_passes_and_fails_with_the_miss_spelled_out():
    expect = Expect(failed_requests_max=0, rto_ms_max=1000, goodput_ratio_min=0.9, versions_consistent=True)
    ok, rows, reason = evaluate(expect, DrillFigures(failed_requests=0, rto_ms=400, goodput_ratio=0.95,
                                                     versions_consistent=True))
    assert ok and len(rows) == 4 and reason == "all 4 expectations met"
    ok, rows, reason = evaluate(expect, DrillFigures(failed_requests=3, rto_ms=1500, goodput_ratio=0.8,
                                                     versions_consistent=False))
    assert not ok
    by = {r["figure"]: r["missed_by"] for r in rows}
    assert by["failed_requests"] == "3" and by["rto_ms"] == "500 (+50% of target)"
    assert by["goodput_ratio"].startswith("0.1") and by["versions_consistent"] == "False != True"
    assert "rto_ms 1500 vs <= 1000" in reason


def test_deterministic_expectations_are_marked_apart_from_timing_ones():
    """CI fails on the deterministic rows only (a leaked stub, a lost request), never on a slow host's RTO."""
    expect = Expect(failed_requests_max=0, rto_ms_max=1000, orphaned_stubs_max=0)
    ok, rows, reason = evaluate(expect, DrillFigures(failed_requests=0, rto_ms=1500, orphaned_stubs=2))
    det = {r["expectation"]: r["deterministic"] for r in rows}
    assert det == {"failed_requests_max": True, "rto_ms_max": False, "orphaned_stubs_max": True}
    assert not ok and [r["figure"] for r in rows if r["deterministic"] and not r["ok"]] == ["orphaned_stubs"]


def test_unmeasured_figure_fails_the_expectation():
    ok, rows, _ = evaluate(Expect(detection_ms_max=2000), DrillFigures(detection_ms=None))
    assert not ok and rows[0]["missed_by"] == "not measured"


def test_journal_records_actions_and_failures(tmp_path):
    j = Journal("hang")
    with j.action("gpu-hang", "method") as a:
        a.detail["pid"] = 42
    with pytest.raises(RuntimeError), j.action("sigcont", "rollback"):
        raise RuntimeError("no such process")
    j.steady_state("before", {"p99_ms": 10}, True)
    j.steady_state("after", {"p99_ms": 900}, False)
    j.finish("completed")
    back = Journal.read(j.write(tmp_path / "j.json"))
    assert [(a.name, a.status) for a in back.actions] == [("gpu-hang", "succeeded"), ("sigcont", "failed")]
    assert "no such process" in back.actions[1].detail["error"] and back.actions[0].detail == {"pid": 42}
    assert back.deviated and back.status == "completed" and back.ended_at >= back.started_at
    with pytest.raises(ValueError):
        j.finish("exploded")


def test_summary_rows_and_markdown():
    drills = [result(), result("hang", False, rto_ms=None, failed_requests=2, reason="failed_requests 2 vs <= 0",
                               checks=[{"ok": False, "figure": "failed_requests", "measured": 2, "target": "<= 0",
                                        "missed_by": "2"}]),
              result("network-partition", False, status="skipped")]
    drills[0]["tail"] = {"p999_ms": 512.3, "over_4x_slo": 2, "limit_ms": 1000.0, "requests": 320}
    rows = summary_rows(drills)
    assert rows[0] == ["crash", "PASS", "400 ms", "0/320", "12.5 / 240 / 13.0", "512 / 2"]
    assert rows[1][5] == "- / -"  # no tail figures: said, not invented
    assert rows[1][1] == "FAIL" and rows[1][2] == "-" and rows[2][1] == "SKIP"
    assert summary_rows([result(wrong_answers=7)])[0][3] == "0/320 (7 wrong)"
    md = markdown(drills, {"run": "r1", "host": "h"})
    assert "| crash | PASS | 400 ms | 0/320 | 12.5 / 240 / 13.0 | 512 / 2 |" in md
    assert "missed: `failed_requests` measured 2, target <= 0, by 2" in md
    failing = result("hang", False, served_requests=318, failures=[
        {"status": "INTERNAL", "detail": "failed to find the requested model version", "count": 2,
         "first_at_s": 7.25, "first_after_fault_s": 1.25, "first_latency_ms": 3.1}])
    assert ("| INTERNAL | failed to find the requested model version | 2 | 7.25 (1.25) | 3.1 |"
            in markdown([failing], {"run": "r1", "host": "h"}))
    assert console_table(drills).row_count == 3


def test_write_run_files_and_latest_link(tmp_path):
    root = tmp_path / "drills"
    first = new_run_dir(root)
    recs = [Record(i, "recommend", 100.0 + i * 0.1, 10.0, "OK", True) for i in range(50)]
    png = plot(first / "x.png", "crash", per_second(recs, 100.0, 105.0), 2.0, 3.0, [(2.4, "detected")], 100.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    j = Journal("crash")
    j.finish("completed")
    timed = result(seconds=per_second(recs, 100.0, 105.0), fault_at_s=2.0, fault_end_s=3.0, marks=[(2.4, "detected")],
                   slo_p99_ms=100.0)
    paths = write(first, [timed], {"crash": j}, {"crash": recs})
    report = json.loads(paths["json"].read_text())
    entry = report["drills"][0]
    assert set(REQUIRED) <= set(entry) and set(entry["p99_ms"]) == {"before", "during", "after"}
    assert entry["plot"] == "crash.png" and (first / "crash.png").stat().st_size > 10_000
    assert "seconds" not in entry, "the per-second series lives in the journal, not in report.json"
    assert (first / "crash.journal.json").exists()
    assert len((first / "crash.requests.jsonl").read_text().splitlines()) == 50
    assert (root / "latest").resolve() == first.resolve()
    second = new_run_dir(root)
    write(second, [result()], {}, {})
    assert (root / "latest").resolve() == second.resolve() and first != second
    with pytest.raises(ValueError, match="lacks report fields"):
        write(second, [{"name": "x", "passed": True}], {}, {})


def test_report_is_rendered_from_the_journals_alone(tmp_path):
    """python -m recserve.drills report DIR: delete every rendered file, keep the journals, get the same report back;
    a change in a journal shows up in the re-render (the report is a view of the journals)."""
    from recserve.drills.cli import main

    run = new_run_dir(tmp_path)
    recs = [Record(i, "recommend", 100.0 + i * 0.1, 10.0, "OK", True) for i in range(30)]
    hang = result("hang", seconds=per_second(recs, 100.0, 103.0), fault_at_s=1.0, fault_end_s=2.0, marks=[],
                  slo_p99_ms=250.0)
    write(run, [result("crash"), hang], {"crash": Journal("crash", started_at=1.0),
                                         "hang": Journal("hang", started_at=2.0)}, {})
    md = (run / "report.md").read_text()
    for f in ("report.md", "report.json", "hang.png"):
        (run / f).unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == md and (run / "hang.png").exists()
    assert [d["name"] for d in json.loads((run / "report.json").read_text())["drills"]] == ["crash", "hang"]
    j = Journal.read(run / "crash.journal.json")
    j.result["rto_ms"] = 1234.0
    j.write(run / "crash.journal.json")
    assert main(["report", str(run)]) == 0 and "| crash | PASS | 1234 ms |" in (run / "report.md").read_text()
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_skipped_drill_counts_as_skipped_not_passed():
    md = markdown([result(), result("network-partition", None, status="skipped", reason="no netns")], {"run": "r"})
    assert "1/2 passed, 1 skipped" in md and "**SKIP** (skipped): no netns" in md


def test_no_rejection_meets_the_rejection_latency_target_but_accepted_p99_is_checked():
    expect = Expect(rejected_p99_ms_max=10, accepted_p99_ms_max=250)
    ok, rows, reason = evaluate(expect, DrillFigures(rejected_requests=0, rejected_p99_ms=None, accepted_p99_ms=546.0))
    assert not ok and rows[0]["ok"] and rows[0]["measured"] == "no request was rejected"
    assert "accepted_p99_ms 546.0 vs <= 250" in reason


def test_a_drill_whose_fault_was_not_injected_fails_whatever_its_figures(tmp_path):
    """A rollover the control plane refused (say, the pool was shedding) leaves a clean timeline: without this
    check the drill passed although nothing was tested."""
    from types import SimpleNamespace

    from recserve.drills.runner import DrillRun
    from recserve.drills.spec import SPECS_DIR, load_file

    spec = load_file(SPECS_DIR / "rollover-under-load.yaml")
    run = DrillRun(spec, SimpleNamespace(fleet=None, repository=tmp_path, workdir=tmp_path, control=None),
                   log=lambda *_: None)
    clean = {"failed_requests": 0, "total_requests": 900, "wrong_answers": 0, "p99_during_ratio": 1.0,
             "background_clean": True, "versions_consistent": True, "rollout_succeeded": True}
    assert run._result(DrillFigures(**clean), status="completed")["passed"] is True
    with pytest.raises(RuntimeError), run.journal.action("rollover-under-load", "method"):
        raise RuntimeError("control plane Rollover: UNAVAILABLE: the pool is shedding load")
    got = run._result(DrillFigures(**clean), status="completed")
    assert got["passed"] is False and "fault not injected" in got["reason"]
    row = got["checks"][0]
    assert row["figure"] == "fault_injected" and row["deterministic"] and not row["ok"]
    assert "the pool is shedding load" in row["missed_by"]
