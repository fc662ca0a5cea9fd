"""``python -m recserve.perf``: run a suite, tune one model, or check a report against the baseline."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from recserve.control.runtime.triton import DEFAULT_REPOSITORY


def _run(args: argparse.Namespace) -> int:
    from recserve.perf import report, runner
    from recserve.perf.suite import SuiteError, load

    try:
        suite = load(args.suite)
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.slo_ms:
        suite = type(suite)(**{**suite.__dict__, "slo_ms": args.slo_ms})
    out = report.new_run_dir(args.reports)
    doc = runner.run_suite(suite, out, args.repository.resolve(), args.data)
    report.link_latest(out)
    print(f"report: {out}/report.md (html: {out}/report.html)")
    for name, r in doc["ratios"].items():
        print(f"  {name:<22} {r.get('value') if r.get('value') is not None else r.get('skipped', 'n/a')}")
    for model, cap in doc["capacity_rps"].items():
        print(f"  capacity_rps[{model}] = {cap:g}")
    if doc["errors"]:
        print(f"{len(doc['errors'])} error(s); first: {doc['errors'][0]}", file=sys.stderr)
        return 1
    return 0


def _tune(args: argparse.Namespace) -> int:
    from recserve.perf import tune

    return tune.main(args)


def _check(args: argparse.Namespace) -> int:
    from recserve.perf import check

    return check.main(args)


def _sigterm_as_interrupt() -> None:
    """SIGTERM (CI timeouts, kill) unwinds like Ctrl-C, so servers and HAProxy we started are stopped."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    from recserve.perf import inputs, report

    _sigterm_as_interrupt()
    p = argparse.ArgumentParser(prog="python -m recserve.perf", description=__doc__)
    p.add_argument(
        "--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository (default: %(default)s)"
    )
    p.add_argument(
        "--data", type=Path, default=inputs.DEFAULT_DATA, help="events.csv/catalog.csv dir (default: %(default)s)"
    )
    p.add_argument("--reports", type=Path, default=report.REPORTS_DIR, help="reports base dir (default: %(default)s)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a suite (perf/suites/<name>.yaml or a path)")
    r.add_argument("suite", nargs="?", default="full")
    r.add_argument("--slo-ms", type=float, default=None, help="p99 SLO for capacity (default: the suite's)")
    r.set_defaults(func=_run)
    t = sub.add_parser("tune", help="search instance count / queue delay / preferred batch sizes for one model")
    t.add_argument("model")
    t.add_argument("--slo-ms", type=float, default=50.0)
    t.add_argument("--quick", action="store_true", help="a small grid (tests, CI)")
    t.add_argument(
        "--try-without-queue-policy", action="store_true", help="also try candidates without default_queue_policy"
    )
    t.set_defaults(func=_tune)
    c = sub.add_parser("check", help="compare a report's ratios with perf/baseline.json")
    c.add_argument("report", nargs="?", type=Path, default=None, help="report.json or its dir (default: latest)")
    c.add_argument("--baseline", type=Path, default=None)
    c.set_defaults(func=_check)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
