"""``make perf-check``: compare a run's ratios with ``perf/baseline.json``; fail clearly on a regression.

Ratios, not absolute infer/s: on a shared 2-core machine absolute numbers move with the neighbours,
while ratios measured side by side in one run are what a code change actually moves.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from perf.report import REPORTS_DIR

BASELINE = Path(__file__).resolve().parent / "baseline.json"


@dataclass(frozen=True)
class Verdict:
    name: str
    ok: bool
    message: str


def compare(report: dict, baseline: dict, tolerance: float | None = None) -> list[Verdict]:
    """One verdict per baseline ratio: ok when value >= baseline x (1 - tolerance) and >= its floor.

    A ratio the report skipped for a stated reason (no GPU) passes with that reason; one that is
    missing or failed without a reason is a failure: a check that silently passes on no data lies.
    """
    tol = baseline.get("tolerance", 0.2) if tolerance is None else tolerance
    out = []
    for name, spec in baseline.get("ratios", {}).items():
        got = report.get("ratios", {}).get(name)
        if got is None:
            out.append(Verdict(name, False, f"{name}: not in the report (did the suite measure it?)"))
            continue
        if got.get("skipped"):
            out.append(Verdict(name, True, f"{name}: skipped in this run ({got['skipped']})"))
            continue
        value = got.get("value")
        if value is None:
            out.append(
                Verdict(name, False, f"{name}: no value (a side of the comparison failed; see the report's errors)")
            )
            continue
        base = float(spec["baseline"])
        allowed = base * (1.0 - tol)
        floor = spec.get("min")
        if value < allowed:
            out.append(
                Verdict(name, False, f"{name}: {value:.3f} is below baseline {base:.3f} - {tol:.0%} = {allowed:.3f}")
            )
        elif floor is not None and value < floor:
            out.append(Verdict(name, False, f"{name}: {value:.3f} is below the floor {floor}"))
        else:
            out.append(Verdict(name, True, f"{name}: {value:.3f} (baseline {base:.3f}, allowed >= {allowed:.3f})"))
    for model, spec in baseline.get("capacity_rps", {}).items():
        got = report.get("capacity_rps", {}).get(model)
        base = float(spec["baseline"])
        allowed = base * (1.0 - spec.get("tolerance", tol))
        if got is None:
            out.append(Verdict(f"capacity_rps[{model}]", False, f"capacity_rps[{model}]: not in the report"))
        else:
            ok = got >= allowed
            word = "ok" if ok else "below"
            out.append(
                Verdict(
                    f"capacity_rps[{model}]",
                    ok,
                    f"capacity_rps[{model}]: {got:g} {word} (baseline {base:g}, allowed >= {allowed:.0f})",
                )
            )
    return out


def resolve_report(path: Path | None) -> Path:
    """report.json from a path, a run dir, or reports/perf/latest."""
    path = path or (REPORTS_DIR / "latest")
    if path.is_dir():
        path = path / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"no report at {path}: run 'make perf' or 'make perf-smoke' first")
    return path


def main(args: argparse.Namespace) -> int:
    try:
        report_path = resolve_report(args.report)
        report = json.loads(report_path.read_text())
        baseline = json.loads((args.baseline or BASELINE).read_text())
    except (OSError, ValueError) as exc:
        print(f"perf-check: error: {exc}")
        return 2
    verdicts = compare(report, baseline, args.tolerance)
    for v in verdicts:
        print(("  ok    " if v.ok else "  FAIL  ") + v.message)
    failed = [v for v in verdicts if not v.ok]
    if failed:
        print(f"perf-check: {len(failed)} regression(s) against {args.baseline or BASELINE} in {report_path}")
        return 1
    print(f"perf-check: {len(verdicts)} figure(s) within tolerance of the baseline ({report_path})")
    return 0
