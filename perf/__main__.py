"""``python -m recserve.perf``: run a suite, tune one model, or check a report against the baseline."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from recserve.control.defaults import SLO_P99_MS
from recserve.control.runtime.triton import DEFAULT_REPOSITORY


def _run(args: argparse.Namespace) -> int:
    from recserve.perf import report, runner
    from recserve.perf.suite import SuiteError, load

    spec = None
    try:
        if args.spec is not None:
            from recserve.control.spec.spec import SpecError, load_spec
            from recserve.perf import specsuite

            try:
                spec = load_spec(args.spec, args.repository)
            except SpecError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            models = [m for m in (args.models or "").split(",") if m] or None
            suite = specsuite.expand(specsuite.template_for(args.suite), spec, models)
        else:
            if args.models:
                print("error: --models picks models of a serving spec: give --spec too", file=sys.stderr)
                return 2
            suite = load(args.suite)
            if suite.for_spec:
                raise SuiteError(f"{suite.path}: a suite for a serving spec: give --spec SPEC")
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.slo_ms:  # one SLO for every model, a spec's own included
        suite = type(suite)(**{**suite.__dict__, "slo_ms": args.slo_ms, "model_slo_ms": {}})
    repository = spec.repository if spec is not None else (args.repository or DEFAULT_REPOSITORY).resolve()
    out = report.new_run_dir(args.reports)
    if spec is not None:
        print(f"serving spec {spec.path}: {', '.join(dict.fromkeys(t.model for t in suite.targets))} "
              f"from {repository}")
    doc = runner.run_suite(suite, out, repository, args.data, spec)
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
        "--repository", type=Path, default=None,
        help=f"model repository (default: the spec's with --spec, else {DEFAULT_REPOSITORY})",
    )
    p.add_argument(
        "--data", type=Path, default=inputs.DEFAULT_DATA, help="events.csv/catalog.csv dir (default: %(default)s)"
    )
    p.add_argument("--reports", type=Path, default=report.REPORTS_DIR, help="reports base dir (default: %(default)s)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a suite (perf/suites/<name>.yaml or a path)")
    r.add_argument("suite", nargs="?", default="full")
    r.add_argument("--slo-ms", type=float, default=None,
                   help="p99 SLO for capacity (default: the suite's; with --spec, each model's sloP99Ms)")
    r.add_argument("--spec", type=Path, default=None,
                   help="measure a serving spec's models (recctl init writes one): the suite's spec- template "
                        "(smoke -> perf/suites/spec-smoke.yaml), inputs from the spec's golden requests")
    r.add_argument("--models", default=None, help="with --spec: only these spec models (comma-separated)")
    r.set_defaults(func=_run)
    t = sub.add_parser("tune", help="search instance count / queue delay / preferred batch sizes for one model")
    t.add_argument("model")
    t.add_argument("--slo-ms", type=float, default=SLO_P99_MS)
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
