"""``make perf-check``: judge a run's ratios against their own CPU ceilings; fail clearly on a regression.

Why ceilings, not fixed baselines: on a shared 2-core host a throughput ratio swings with the neighbours
(served_vs_inprocess moved 0.46..2.24 between runs of the same code), while CPU milliseconds per request
hold steady. Each ratio's report entry carries its CPU-bound value (what the ratio would be if only CPU
limited it). A change that costs CPU moves that ceiling below its floor; a change that idles (a stall, a
lock, a batcher waiting) leaves the ceiling alone but drops the measured ratio far below it. Both are
regressions; noise moves neither far enough.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from recserve.perf.report import REPORTS_DIR

BASELINE = Path(__file__).resolve().parent / "baseline.json"


@dataclass(frozen=True)
class Verdict:
    name: str
    ok: bool
    message: str


@dataclass(frozen=True)
class Rule:
    """How one ratio is judged (an entry of baseline.json's ``ratios``)."""

    ceiling: str  # report field with the ratio's CPU-bound value
    ceiling_min: float  # floor of that steady CPU figure: below it, serving costs more CPU than it may
    of_ceiling_min: float  # the measured ratio must reach this share of its ceiling

    @classmethod
    def parse(cls, name: str, raw: dict) -> Rule:
        """A rule from baseline.json, refused with the field and the rule when malformed."""
        try:
            rule = cls(str(raw["ceiling"]), float(raw["ceiling_min"]), float(raw["of_ceiling_min"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"baseline ratios.{name}: needs ceiling (a report field), ceiling_min and "
                             f"of_ceiling_min (numbers): {exc!r}") from exc
        if not 0 < rule.of_ceiling_min <= 1 or rule.ceiling_min <= 0:
            raise ValueError(f"baseline ratios.{name}: of_ceiling_min must be in (0, 1] and ceiling_min > 0")
        return rule


def judge(name: str, got: dict | None, rule: Rule) -> Verdict:
    """One ratio of a report against its rule. Missing, skipped or unmeasured data fails: the baseline
    names the ratios CI needs, and a check that passes on no data proves nothing."""
    if got is None:
        return Verdict(name, False, f"{name}: not in the report (did the suite measure it?)")
    if got.get("skipped"):
        return Verdict(name, False, f"{name}: skipped ({got['skipped']}), but the baseline requires it")
    value, ceiling = got.get("value"), got.get(rule.ceiling)
    if value is None:
        return Verdict(name, False, f"{name}: no value (a side of the comparison failed; see the report's errors)")
    if not ceiling:
        return Verdict(name, False, f"{name}: {value:.3f} but no CPU ceiling '{rule.ceiling}' in the report, so "
                       "a regression cannot be told from noise")
    if ceiling < rule.ceiling_min:
        return Verdict(name, False, f"{name}: CPU ceiling {rule.ceiling} {ceiling:.3f} is below its floor "
                       f"{rule.ceiling_min} (CPU per request grew: a regression, not noise)")
    share = value / ceiling
    if share < rule.of_ceiling_min:
        return Verdict(name, False, f"{name}: {value:.3f} is {share:.0%} of its CPU ceiling {ceiling:.3f}, "
                       f"below the floor {rule.of_ceiling_min:.0%} (throughput lost without a CPU cause: a stall, "
                       "a lock, a batcher waiting)")
    return Verdict(name, True, f"{name}: {value:.3f} = {share:.0%} of CPU ceiling {ceiling:.3f} "
                   f"(floors: ceiling >= {rule.ceiling_min}, share >= {rule.of_ceiling_min:.0%})")


def compare(report: dict, baseline: dict) -> list[Verdict]:
    """One verdict per baseline ratio, per GPU-only ratio, per ratio the report holds beyond those (measured but
    unjudged fails), per capacity ladder (no rate within the SLO fails), per baseline capacity figure, and one for
    the points that failed (perf_analyzer errors): nothing the suite measured passes unjudged."""
    if report.get("spec"):
        return compare_spec(report)
    ratios = report.get("ratios", {})
    rules = baseline.get("ratios", {})
    gpu_only = baseline.get("gpu_only", {})
    out = [judge(name, ratios.get(name), Rule.parse(name, raw)) for name, raw in rules.items()]
    for name, raw in gpu_only.items():
        if name in ratios:
            out.append(judge_gpu_only(name, ratios[name], float(raw["value_min"])))
    for name in sorted(set(ratios) - set(rules) - set(gpu_only)):
        out.append(Verdict(name, False, f"{name}: measured, but {BASELINE.name} has no rule for it (add one under "
                           "'ratios' or 'gpu_only')"))
    for target, cap in sorted(report.get("capacity", {}).items()):
        name = f"capacity[{target}]"
        ok = bool(cap.get("capacity_rps"))
        out.append(Verdict(name, ok, f"{name}: {cap.get('capacity_rps')} rps within the {report.get('slo_ms')} ms "
                           f"SLO ({cap.get('reason', '')})" if ok else f"{name}: no rate met the SLO "
                           f"({cap.get('reason', 'no reason recorded')})"))
    for model, spec in baseline.get("capacity_rps", {}).items():
        got = report.get("capacity_rps", {}).get(model)
        base = float(spec["baseline"])
        allowed = base * (1.0 - float(spec.get("tolerance", 0.3)))
        name = f"capacity_rps[{model}]"
        if got is None:
            out.append(Verdict(name, False, f"{name}: not in the report"))
        else:
            word = "ok" if got >= allowed else "below"
            out.append(Verdict(name, got >= allowed,
                               f"{name}: {got:g} {word} (baseline {base:g}, allowed >= {allowed:.0f})"))
    errors = report.get("errors") or []
    out.append(Verdict("points", not errors, "points: every measured point succeeded" if not errors else
                       f"points: {len(errors)} failed; first: {errors[0]}"))
    return out


def compare_spec(report: dict) -> list[Verdict]:
    """A run for a serving spec: the baseline's ratios and capacities are the demo's, so they are not judged (each
    says so on its own line); every spec model needs a knee within its own SLO, and every point must have passed."""
    out = []
    for name, r in sorted(report.get("ratios", {}).items()):
        if r.get("skipped"):
            out.append(Verdict(name, True, f"{name}: not judged for a spec run ({r['skipped']})"))
        else:
            out.append(Verdict(name, False, f"{name}: measured in a spec run, where no floor applies"))
    caps = report.get("capacity", {})
    for target, cap in sorted(caps.items()):
        name = f"capacity[{target}]"
        ok = bool(cap.get("capacity_rps"))
        out.append(Verdict(name, ok, f"{name}: {cap.get('capacity_rps')} rps within {cap.get('slo_ms')} ms p99 "
                           f"({cap.get('reason', '')})" if ok else f"{name}: no rate met the {cap.get('slo_ms')} ms "
                           f"SLO ({cap.get('reason', 'no reason recorded')})"))
    for model in report["spec"].get("models", {}):
        name = f"capacity_rps[{model}]"
        got = report.get("capacity_rps", {}).get(model)
        out.append(Verdict(name, bool(got), f"{name}: {got:g} rps (spec {report['spec']['path']})" if got else
                           f"{name}: the report holds no capacity for spec model {model}"))
    errors = report.get("errors") or []
    out.append(Verdict("points", not errors, "points: every measured point succeeded" if not errors else
                       f"points: {len(errors)} failed; first: {errors[0]}"))
    return out


def judge_gpu_only(name: str, got: dict, value_min: float) -> Verdict:
    """A ratio only a GPU host can measure: a skip that names the missing GPU/TensorRT passes (said as a skip);
    any other skip, or a measured value under ``value_min``, fails."""
    why = got.get("skipped")
    if why:
        gpu = any(w in why for w in ("GPU", "TensorRT", "tensorrt", "_trt"))
        return Verdict(name, gpu, f"{name}: skipped ({why})" + ("" if gpu else ": not a missing GPU, so a failure"))
    value = got.get("value")
    if value is None:
        return Verdict(name, False, f"{name}: no value (a side of the comparison failed)")
    return Verdict(name, value >= value_min, f"{name}: {value:.3f} (floor {value_min})")


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
        verdicts = compare(report, baseline)
    except (OSError, ValueError) as exc:
        print(f"perf-check: error: {exc}")
        return 2
    for v in verdicts:
        print(("  ok    " if v.ok else "  FAIL  ") + v.message)
    failed = [v for v in verdicts if not v.ok]
    if failed:
        print(f"perf-check: {len(failed)} regression(s) against {args.baseline or BASELINE} in {report_path}")
        return 1
    print(f"perf-check: {len(verdicts)} figure(s) within their floors ({report_path})")
    return 0
