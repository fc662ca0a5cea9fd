"""``python -m recserve.drills``: list, validate and run drills; print the summary table and the report path.

Exit codes: 0 every drill that ran passed (skipped ones do not count), 1 a drill failed or aborted,
2 a spec is invalid (nothing was started) or a run directory cannot be rendered, 3 no fleet could be found
or started.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from recserve.drills import report
from recserve.drills.spec import SPECS_DIR, DrillSpec, SpecError, load_all, load_file

SMOKE = ("crash", "hang", "overload", "rollover-under-load", "bad-rollover")
#: Wide enough for the summary table in CI logs (rich assumes 80 columns without a terminal).
console = Console(width=None if sys.stdout.isatty() else 120)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recserve.drills", description="recserve disaster-recovery drills: run "
                                "declarative fault drills against a real fleet and report RTO, failed requests, p99.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the drill specs")
    rp = sub.add_parser("report", help="re-render report.json, report.md, report.html and the PNGs of a run from its "
                        "journals")
    rp.add_argument("dir", type=Path, help="a run directory (reports/drills/<timestamp>/ or reports/drills/latest)")
    v = sub.add_parser("validate", help="validate spec files (default: every spec in drills/specs)")
    v.add_argument("files", nargs="*", type=Path)
    for name, text in (("run", "run drills by name (default: all)"), ("smoke", f"run {', '.join(SMOKE)}"),
                       ("controls", "negative controls: each drill against a private fleet broken on purpose by a "
                        "test switch must fail, for its named reason (default: every control)")):
        r = sub.add_parser(name, help=text)
        if name in ("run", "controls"):
            r.add_argument("names", nargs="*", metavar="NAME")
        r.add_argument("--control", help="control plane host:port of a running fleet (default: find one with "
                       "recctl status, else start a private one)")
        r.add_argument("--private", action="store_true", help="always start a private fleet, even if one runs")
        r.add_argument("--repository", type=Path, help="model repository for a private fleet (default: "
                       "model_repository/, copied)")
        r.add_argument("--fixture-models", action="store_true", help="private fleet on small synthetic models "
                       "(for checking the drills before the training build has run)")
        r.add_argument("--reports", type=Path, default=report.REPORTS_ROOT, help="reports root (default %(default)s)")
        if name != "controls":  # each control names the mode its fleet runs in
            r.add_argument("--spec", type=Path, help="serving spec of a user's repository (recctl init writes one): "
                           "a private fleet serves a copy of its repository with --spec (a running fleet must "
                           "serve its models); the probe and perf_analyzer send its golden requests, answers are "
                           "judged by its rules against the reference, rolling drills roll one of its models")
            r.add_argument("--roll-model", metavar="MODEL", help="with --spec: the model the rollover drills roll "
                           "(default: the spec's first ONNX step behind a drift-gated model)")
            r.add_argument("--mode", choices=("active-active", "primary-standby"), help="a private fleet's mode "
                           "(default: the control plane's, active-active)")
    return p


def select(names: list[str]) -> list[DrillSpec]:
    specs = load_all(SPECS_DIR)  # validates every spec: one bad file stops everything before anything starts
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SpecError("drills", "names", f"unknown drill(s) {unknown} (known: {', '.join(sorted(specs))})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # a run keeps one journal, plot and request log per drill name
        raise SpecError("drills", "names", f"drill(s) {twice} named more than once: a run reports each drill once; "
                        "run the command again to repeat one")
    return [specs[n] for n in names] if names else list(specs.values())


def cmd_list() -> int:
    t = Table(title="drills", title_justify="left")
    for h in ("name", "fault", "duration", "expectations"):
        t.add_column(h)
    for s in load_all(SPECS_DIR).values():
        exp = ", ".join(f"{k}={v}" for k, v in vars(s.expect).items() if v is not None)
        t.add_row(s.name, ", ".join(a.fault for a in s.method), f"{s.load.duration_s:.0f}s", exp)
    console.print(t)
    return 0


def run_drill(spec: DrillSpec, session) -> tuple:
    """(the DrillRun, its result); an exception inside one drill becomes its failed result."""
    from recserve.drills.runner import DrillRun

    run = DrillRun(spec, session, log=console.print)
    try:
        result = run.run()
    except Exception as exc:  # one broken drill must not hide the others' results
        run.journal.finish("failed", f"{type(exc).__name__}: {exc}")
        result = run._result({}, status="failed", reason=f"{type(exc).__name__}: {exc}")
    return run, result


def _unfelt(result: dict) -> str | None:
    """The fault_effective check's reason when an overload drill's load was served whole, else None."""
    return next((c["missed_by"] for c in result.get("checks", []) if c["expectation"] == "fault_effective"), None)


def cmd_run(specs: list[DrillSpec], args: argparse.Namespace) -> int:
    from recserve.drills.fleet import FleetError
    from recserve.drills.session import FleetOwner

    results, journals, records = [], {}, {}
    meta = {"models": "synthetic fixture models (drills/fixture_models.py)" if args.fixture_models
            else str(args.repository or "model_repository (built)"), "fleet": "not found"}
    if args.spec:
        meta["models"] = f"serving spec {args.spec}" + (f" on {args.repository}" if args.repository else "")
    run_dir = report.new_run_dir(args.reports)
    try:
        with FleetOwner(args.control, args.repository, private=args.private, fixture_models=args.fixture_models,
                        log=console.print, monitor=any(s.alerts for s in specs), mode=args.mode,
                        spec=args.spec, roll_model=args.roll_model) as session:
            meta["fleet"] = "private (started and stopped by this run)" if session.control is not None and \
                type(session.control).__name__ == "ControlPlaneProcess" else f"running ({session.grpc_url})"
            for spec in specs:
                run, result = run_drill(spec, session)
                unfelt = _unfelt(result)
                if unfelt:
                    # the overload proved the session's knee too low: measure it again and run the drill once more;
                    # the report keeps why (first_attempt), and a second miss stands as the verdict
                    from recserve.drills import capacity

                    console.print(f"  overload not felt: {unfelt}; measuring the knee again")
                    capacity.forget(session.grpc_url)
                    first = {"reason": result["reason"], "capacity_rps": result.get("capacity_rps")}
                    run, result = run_drill(spec, session)
                    result["first_attempt"] = first
                log = Path((result.get("background") or {}).get("log", "/nonexistent"))
                if log.exists():
                    shutil.copy(log, run_dir / f"{spec.name}.perf_analyzer.log")
                    result["background"]["log"] = f"{spec.name}.perf_analyzer.log"
                results.append(result)
                journals[spec.name], records[spec.name] = run.journal, run.records
                verdict = "SKIP" if result["passed"] is None else ("PASS" if result["passed"] else "FAIL")
                console.print(f"  {verdict}: {result['reason']}")
    except FleetError as exc:
        console.print(f"[red]no fleet: {exc}[/red]")
        if not results:
            shutil.rmtree(run_dir, ignore_errors=True)
            return 3
    paths = report.write(run_dir, results, journals, records, meta)
    console.print(report.console_table(results))
    console.print(f"report: {paths['md']} (html: {paths['html']}, json: {paths['json']}, latest: {paths['latest']})")
    return 0 if all(r["passed"] is not False for r in results) and len(results) == len(specs) else 1


def cmd_report(run_dir: Path) -> int:
    """Re-render a run's report from its journals (the same path a run takes)."""
    try:
        paths = report.render(run_dir)
    except (OSError, ValueError) as exc:
        console.print(f"[red]cannot render {run_dir}: {exc}[/red]")
        return 2
    console.print(report.console_table(paths["drills"]))
    console.print(f"report: {paths['md']} (html: {paths['html']}, json: {paths['json']})")
    return 0 if all(d["passed"] is not False for d in paths["drills"]) else 1


def _terminate(signum: int, _frame) -> None:
    """SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so rollbacks run and a private fleet is stopped."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "list":
            return cmd_list()
        if args.command == "report":
            return cmd_report(args.dir)
        if args.command == "validate":
            for f in args.files or sorted(SPECS_DIR.glob("*.yaml")):
                load_file(f)
                console.print(f"ok {f}")
            return 0
        if args.command == "controls":
            return cmd_controls(args)
        specs = select(list(SMOKE) if args.command == "smoke" else args.names)
        if args.roll_model and not args.spec:
            console.print("[red]--roll-model names a model of a serving spec: add --spec (the demo's drills name "
                          "their model in drills/specs)[/red]")
            return 2
        if args.spec and args.fixture_models:
            console.print("[red]--spec and --fixture-models: the fixture models are the demo's; give one[/red]")
            return 2
        if args.mode and not (args.private or args.fixture_models):
            console.print("[red]--mode sets a private fleet's mode: add --private (a running fleet keeps "
                          "its own)[/red]")
            return 2
    except SpecError as exc:
        console.print(f"[red]invalid spec: {exc}[/red]")
        return 2
    return cmd_run(specs, args)


def cmd_controls(args: argparse.Namespace) -> int:
    """``controls``: exit 0 only when every control's drill failed for its expected reason."""
    from recserve.drills import controls

    try:
        chosen = controls.select(args.names)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    if args.control:
        console.print("[red]controls break a fleet on purpose: they only run on private fleets (no --control)[/red]")
        return 2
    reports = args.reports if args.reports != report.REPORTS_ROOT else report.REPORTS_ROOT.parent / "drill-controls"
    ok, rows = controls.run(chosen, reports, args.repository, args.fixture_models, log=console.print)
    console.print(controls.table(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
