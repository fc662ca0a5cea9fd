"""Drill specs: YAML -> validated dataclasses, with errors that name the field and the broken rule.

Why strict: a drill that starts with a typo in its spec injects a real fault (SIGKILL, a cut link) and
then measures the wrong thing. Everything is checked before any process is touched: unknown keys,
unknown faults, missing fields, types, ranges, and timings that cannot fit in the load's duration.

Shape (Chaos-Toolkit-like): ``targets`` the ensembles the probe sends, ``steady_state`` the hypothesis
checked before/during/after, ``method`` the timed fault actions (each fault's own rollback always runs at
the end: drills/faults.py), ``abort`` when to stop early, ``expect`` what decides pass or fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from recserve.drills.figures import check_names

SPECS_DIR = Path(__file__).resolve().parent / "specs"

#: Fault name -> {parameter: (type, required, default)}; faults.py implements exactly these.
FAULT_PARAMS: dict[str, dict[str, tuple[type | tuple[type, ...], bool, Any]]] = {
    "gpu-xid-crash": {"target": (str, False, "primary")},
    "gpu-hang": {"target": (str, False, "primary"), "then": (str, False, "cont")},
    "gpu-lost": {
        "target": (str, False, "primary"),
        "mode": (str, False, "fail"),
        "models": (list, False, ["retrieval", "ranker", "search_model"]),
    },
    "overload": {"factor": ((int, float), False, 2.0), "ramp_s": ((int, float), False, 2.0)},
    "proxy-crash": {},
    "scale": {"active": (int, True, None)},
    "rollover-under-load": {
        "model": (str, True, None),
        "version": ((int, str), False, "latest"),
        "strategy": (str, False, "canary"),
        "steps": (list, False, [50, 100]),
        "bake_s": ((int, float), False, 2.0),
    },
    "bad-rollover": {
        "model": (str, True, None),
        "steps": (list, False, [10, 100]),
        "bake_s": ((int, float), False, 3.0),
    },
    "artifact-corruption": {"model": (str, True, None), "flip_bytes": (int, False, 64)},
    "control-plane-crash": {
        "model": (str, False, "ranker"),
        "kill_after_s": ((int, float), False, 1.0),
        "restart_after_s": ((int, float), False, 1.0),
    },
    # always the primary: the drill's own data path puts it in the namespace (drills/partition.py)
    "network-partition": {},
    "lost-host": {"model": (str, False, "ranker")},
    # drills/attacks.py's catalogue against the fleet's front door; [] = every attack
    "security-attacks": {"attacks": (list, False, [])},  # rolled over after the backup: the change RPO must show lost
}
#: Faults that last ``duration_s`` (then their rollback ends them); the others are instantaneous.
WINDOWED = {"gpu-hang", "gpu-lost", "overload", "network-partition"}
TARGETS = {"primary", "standby"}
ENSEMBLES = {"recommend", "search"}
CHOICES = {("gpu-hang", "then"): {"cont", "kill"}, ("gpu-lost", "mode"): {"fail", "wrong", "hang"},
           ("rollover-under-load", "strategy"): {"canary", "blue-green"}}


class SpecError(ValueError):
    """A spec is invalid; ``field`` is the dotted path, the message says which rule broke."""

    def __init__(self, source: str, field_path: str, rule: str):
        super().__init__(f"{source}: {field_path}: {rule}")
        self.source, self.field, self.rule = source, field_path, rule


@dataclass(frozen=True)
class BackgroundSpec:
    """perf_analyzer load where zero failures are expected; its exit code is a drill signal."""

    concurrency: int | None = None
    rate_x_capacity: float | None = None
    model: str = "recommend"


@dataclass(frozen=True)
class Load:
    duration_s: float
    probe_rps: float
    background: BackgroundSpec | None = None
    #: the probe's rate as a multiple of the knee measured in the drill session (instead of probe_rps)
    probe_x_knee: float | None = None
    #: the probe's channel carries the documented client retry policy (docs/peak-traffic.md "Client retry policy")
    client_retry: bool = False


@dataclass(frozen=True)
class SteadyState:
    slo_p99_ms: float
    error_rate_max: float
    before_s: float = 3.0
    after_s: float = 3.0
    #: What "recovered" means for the RTO: ``all-good`` (a full second in which every request got a good answer)
    #: or ``before`` (for drills above the knee, where shedding is the steady state: a full second with no
    #: unshed failure, no wrong answer, and good answers at >= RTO_GOOD_SHARE of the before-phase's rate).
    rto: str = "all-good"


RTO_BASES = ("all-good", "before")


@dataclass(frozen=True)
class Abort:
    error_budget: float = 1.0  # failed fraction of the requests sent so far that stops the drill
    p99_ceiling_ms: float = 10_000.0
    p99_over_for_s: float = 5.0
    min_requests: int = 20  # no verdict on tiny samples


@dataclass(frozen=True)
class Action:
    fault: str
    at_s: float
    duration_s: float = 0.0
    observe_s: float = 3.0  # window after an instantaneous fault that counts as "during"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def end_s(self) -> float:
        return self.at_s + (self.duration_s if self.fault in WINDOWED else self.observe_s)


@dataclass(frozen=True)
class Expect:
    failed_requests_max: int | None = None
    wrong_answers_max: int | None = None
    bad_after_detection_max: int | None = None
    rto_ms_max: float | None = None
    detection_ms_max: float | None = None
    p99_during_ratio_max: float | None = None
    p99_during_ms_max: float | None = None
    goodput_ratio_min: float | None = None
    rejected_p99_ms_max: float | None = None
    accepted_p99_ms_max: float | None = None
    recover_within_s: float | None = None
    rejoin_within_s: float | None = None
    bad_share_max: float | None = None
    versions_consistent: bool | None = None
    background_clean: bool | None = None
    instances_alive: bool | None = None
    rolled_back: bool | None = None
    #: the canary, asked directly while the rollout ran, answered differently from the primary (bad-rollover)
    bad_version_live: bool | None = None
    #: the rollover drill's own rollout ended ``succeeded`` (a canary the gates rolled back is a failed drill)
    rollout_succeeded: bool | None = None
    #: answers from the degraded-answer server (served, never good): none where the fleet has capacity left
    degraded_answers_max: int | None = None
    repaired: bool | None = None
    restored_exact: bool | None = None
    answers_same: bool | None = None
    rpo_s_max: float | None = None
    orphaned_stubs_max: int | None = None
    #: /dev/shm regions the fleet holds after recovery minus before the fault (a killed server's are removed)
    shm_growth_max: int | None = None
    #: failed requests other than admission's refusals (RESOURCE_EXHAUSTED "overloaded, retry later") over the drill
    failed_unshed_max: int | None = None
    #: instance restarts during the drill (a saturated but correct fleet is never restarted)
    restarts_max: int | None = None
    #: deep checks failed by a full Triton queue during the drill (health probes are never shed)
    probes_shed_max: int | None = None
    attacks_refused: bool | None = None


#: Expectation -> (the figure it reads, drills/figures.py ``DrillFigures``; comparison): what drills/verdict.py
#: judges. Checked when this module loads: every expectation has an entry, and every figure a field.
EXPECT_FIGURES: dict[str, tuple[str, str]] = {
    "failed_requests_max": ("failed_requests", "<="),
    "wrong_answers_max": ("wrong_answers", "<="),
    "bad_after_detection_max": ("bad_after_detection", "<="),
    "rto_ms_max": ("rto_ms", "<="),
    "detection_ms_max": ("detection_ms", "<="),
    "p99_during_ratio_max": ("p99_during_ratio", "<="),
    "p99_during_ms_max": ("p99_during_ms", "<="),
    "goodput_ratio_min": ("goodput_ratio", ">="),
    "rejected_p99_ms_max": ("rejected_p99_ms", "<="),
    "accepted_p99_ms_max": ("accepted_p99_ms", "<="),
    "recover_within_s": ("recovered_after_s", "<="),
    "rejoin_within_s": ("rejoined_after_s", "<="),
    "bad_share_max": ("bad_share", "<="),
    "versions_consistent": ("versions_consistent", "=="),
    "background_clean": ("background_clean", "=="),
    "instances_alive": ("instances_alive", "=="),
    "rolled_back": ("rolled_back", "=="),
    "bad_version_live": ("bad_version_live", "=="),
    "rollout_succeeded": ("rollout_succeeded", "=="),
    "degraded_answers_max": ("degraded_answers", "<="),
    "repaired": ("repaired", "=="),
    "restored_exact": ("restored_exact", "=="),
    "answers_same": ("answers_same", "=="),
    "rpo_s_max": ("rpo_s", "<="),
    "orphaned_stubs_max": ("orphaned_stubs", "<="),
    "shm_growth_max": ("shm_growth", "<="),
    "failed_unshed_max": ("failed_unshed", "<="),
    "restarts_max": ("restarts", "<="),
    "probes_shed_max": ("probes_shed", "<="),
    "attacks_refused": ("attacks_refused", "=="),
}
COMPARISONS = ("<=", ">=", "==")


def check_expect_figures(table: dict[str, tuple[str, str]], source: str = __file__) -> None:
    """Every ``Expect`` field reads a figure through ``table``, each figure is a ``DrillFigures`` field and each
    comparison one of ``COMPARISONS``; else a SpecError naming ``source``, the entry and what is known."""
    expectations = [f.name for f in fields(Expect)]
    for name in expectations:
        if name not in table:
            raise SpecError(source, f"EXPECT_FIGURES[{name!r}]", "missing: expectation Expect."
                            f"{name} reads no figure (entries: {', '.join(sorted(table))})")
    for name, (_figure, op) in table.items():
        if name not in expectations:
            raise SpecError(source, f"EXPECT_FIGURES[{name!r}]", f"not an expectation of Expect (known: "
                            f"{', '.join(expectations)})")
        if op not in COMPARISONS:
            raise SpecError(source, f"EXPECT_FIGURES[{name!r}]", f"comparison {op!r} is not one of {COMPARISONS}")
    check_names(((f"EXPECT_FIGURES[{name!r}]", figure) for name, (figure, _) in table.items()), source)


check_expect_figures(EXPECT_FIGURES)


@dataclass(frozen=True)
class AlertExpect:
    """An alert (from deploy/monitoring/rules) that must reach the webhook receiver within ``within_s`` of the
    fault and, when ``resolve_within_s`` is set, be resolved within that many seconds of the fault."""

    alert: str
    within_s: float
    resolve_within_s: float | None = None


@dataclass(frozen=True)
class DrillSpec:
    name: str
    purpose: str
    targets: tuple[str, ...]
    load: Load
    steady_state: SteadyState
    method: tuple[Action, ...]
    abort: Abort
    expect: Expect
    source: str = ""
    alerts: tuple[AlertExpect, ...] = ()

    @property
    def fault_start_s(self) -> float:
        return min(a.at_s for a in self.method)

    @property
    def fault_end_s(self) -> float:
        return max(a.end_s for a in self.method)

    @property
    def sized_by_knee(self) -> bool:
        """The drill's load is a multiple of the knee (an overload fault, ``probe_x_knee``, ``rate_x_capacity``)."""
        bg = self.load.background
        return any(a.fault == "overload" for a in self.method) or bool(self.load.probe_x_knee) or bool(
            bg and bg.rate_x_capacity)


# ------------------------------------------------------------------ checking helpers
class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, rule: str) -> SpecError:
        return SpecError(self.source, path, rule)

    def mapping(self, value: Any, path: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a mapping, got {type(value).__name__}")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(f"{path}.{unknown[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
        for key in sorted(required):
            if key not in value:
                raise self.fail(f"{path}.{key}", "missing required field")
        return value

    def number(self, d: dict, key: str, path: str, default: Any = None, lo: float | None = None,
               hi: float | None = None, strict_lo: bool = False, integer: bool = False) -> Any:
        if key not in d or d[key] is None:
            return default
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not isinstance(v, int)):
            raise self.fail(f"{path}.{key}", f"must be {'an integer' if integer else 'a number'}, got {v!r}")
        if lo is not None and (v <= lo if strict_lo else v < lo):
            raise self.fail(f"{path}.{key}", f"must be {'>' if strict_lo else '>='} {lo}, got {v}")
        if hi is not None and v > hi:
            raise self.fail(f"{path}.{key}", f"must be <= {hi}, got {v}")
        return v

    def boolean(self, d: dict, key: str, path: str) -> bool | None:
        if key not in d or d[key] is None:
            return None
        if not isinstance(d[key], bool):
            raise self.fail(f"{path}.{key}", f"must be true or false, got {d[key]!r}")
        return d[key]

    def text(self, d: dict, key: str, path: str, required: bool = True) -> str:
        v = d.get(key)
        if v is None and not required:
            return ""
        if not isinstance(v, str) or not v.strip():
            raise self.fail(f"{path}.{key}", "must be a non-empty string")
        return v


# ------------------------------------------------------------------ sections
def _load(c: _Checker, raw: Any) -> Load:
    d = c.mapping(raw, "load", {"duration_s", "probe_rps", "probe_x_knee", "background", "client_retry"},
                  {"duration_s"})
    duration = c.number(d, "duration_s", "load", lo=0, strict_lo=True, hi=3600)
    rps = c.number(d, "probe_rps", "load", lo=0, strict_lo=True, hi=2000)
    x_knee = c.number(d, "probe_x_knee", "load", lo=0, strict_lo=True, hi=10)
    if (rps is None) == (x_knee is None):
        raise c.fail("load", "give exactly one of probe_rps (requests/s) or probe_x_knee (a multiple of the knee)")
    retry = d.get("client_retry", False)
    if not isinstance(retry, bool):
        raise c.fail("load.client_retry", f"must be true or false, got {retry!r}")
    bg = None
    if d.get("background") is not None:
        b = c.mapping(d["background"], "load.background", {"concurrency", "rate_x_capacity", "model"})
        conc = c.number(b, "concurrency", "load.background", lo=1, hi=64, integer=True)
        rate = c.number(b, "rate_x_capacity", "load.background", lo=0, strict_lo=True, hi=1.0)
        if (conc is None) == (rate is None):
            raise c.fail("load.background", "give exactly one of concurrency or rate_x_capacity")
        model = b.get("model", "recommend")
        if model not in ENSEMBLES:
            raise c.fail("load.background.model", f"must be one of {sorted(ENSEMBLES)}, got {model!r}")
        bg = BackgroundSpec(conc, rate, model)
    return Load(duration, rps or 0.0, bg, x_knee, retry)


def _steady(c: _Checker, raw: Any) -> SteadyState:
    path = "steady_state"
    d = c.mapping(raw, path, {"slo_p99_ms", "error_rate_max", "before_s", "after_s", "rto"},
                  {"slo_p99_ms", "error_rate_max"})
    rto = d.get("rto", "all-good")
    if rto not in RTO_BASES:
        raise c.fail(f"{path}.rto", f"must be one of {list(RTO_BASES)}, got {rto!r}")
    return SteadyState(
        slo_p99_ms=c.number(d, "slo_p99_ms", path, lo=0, strict_lo=True),
        error_rate_max=c.number(d, "error_rate_max", path, lo=0, hi=1),
        before_s=c.number(d, "before_s", path, 3.0, lo=1),
        after_s=c.number(d, "after_s", path, 3.0, lo=1),
        rto=rto,
    )


def _abort(c: _Checker, raw: Any) -> Abort:
    if raw is None:
        return Abort()
    d = c.mapping(raw, "abort", {"error_budget", "p99_ceiling_ms", "p99_over_for_s", "min_requests"})
    return Abort(
        error_budget=c.number(d, "error_budget", "abort", 1.0, lo=0, hi=1, strict_lo=True),
        p99_ceiling_ms=c.number(d, "p99_ceiling_ms", "abort", 10_000.0, lo=0, strict_lo=True),
        p99_over_for_s=c.number(d, "p99_over_for_s", "abort", 5.0, lo=1),
        min_requests=c.number(d, "min_requests", "abort", 20, lo=1, integer=True),
    )


def _params(c: _Checker, fault: str, raw: Any, path: str) -> dict[str, Any]:
    schema = FAULT_PARAMS[fault]
    d = c.mapping(raw if raw is not None else {}, path, set(schema))
    out: dict[str, Any] = {}
    for key, (typ, required, default) in schema.items():
        if key not in d:
            if required:
                raise c.fail(f"{path}.{key}", f"missing required parameter of fault '{fault}'")
            out[key] = default
            continue
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, typ):
            names = "/".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
            raise c.fail(f"{path}.{key}", f"must be {names}, got {v!r}")
        out[key] = v
    if "target" in out and out["target"] not in TARGETS:
        raise c.fail(f"{path}.target", f"must be one of {sorted(TARGETS)}, got {out['target']!r}")
    for (f, key), allowed in CHOICES.items():
        if f == fault and out[key] not in allowed:
            raise c.fail(f"{path}.{key}", f"must be one of {sorted(allowed)}, got {out[key]!r}")
    if fault == "overload" and not 1.0 <= out["factor"] <= 10.0:
        raise c.fail(f"{path}.factor", f"must be between 1 and 10 (x capacity), got {out['factor']}")
    if "steps" in out:
        steps = out["steps"]
        if not steps or any(not isinstance(s, int) or not 0 < s <= 100 for s in steps) or steps != sorted(steps) \
                or steps[-1] != 100:
            raise c.fail(f"{path}.steps", f"must be increasing percentages in (0, 100] ending at 100, got {steps}")
    if fault == "gpu-lost" and (not out["models"] or not all(isinstance(m, str) for m in out["models"])):
        raise c.fail(f"{path}.models", "must be a non-empty list of model names")
    return out


def _action(c: _Checker, raw: Any, path: str) -> Action:
    d = c.mapping(raw, path, {"fault", "at_s", "duration_s", "observe_s", "params"}, {"fault", "at_s"})
    fault = d["fault"]
    if fault not in FAULT_PARAMS:
        raise c.fail(f"{path}.fault", f"unknown fault {fault!r} (known: {', '.join(sorted(FAULT_PARAMS))})")
    at = c.number(d, "at_s", path, lo=0)
    duration = c.number(d, "duration_s", path, 0.0, lo=0)
    if fault in WINDOWED and not duration:
        raise c.fail(f"{path}.duration_s", f"fault '{fault}' lasts a while: duration_s must be > 0")
    if fault not in WINDOWED and duration:
        raise c.fail(f"{path}.duration_s", f"fault '{fault}' is instantaneous: use observe_s for its window")
    observe = c.number(d, "observe_s", path, 3.0, lo=0.5)
    params = _params(c, fault, d.get("params"), f"{path}.params")
    return Action(fault, float(at), float(duration), float(observe), params)


def _expect(c: _Checker, raw: Any) -> Expect:
    path = "expect"
    ints = {"failed_requests_max", "wrong_answers_max", "bad_after_detection_max", "orphaned_stubs_max",
            "shm_growth_max", "failed_unshed_max", "restarts_max", "probes_shed_max", "degraded_answers_max"}
    floats = {"rto_ms_max", "detection_ms_max", "p99_during_ratio_max", "p99_during_ms_max", "goodput_ratio_min",
              "rejected_p99_ms_max",
              "accepted_p99_ms_max", "recover_within_s", "rejoin_within_s", "bad_share_max", "rpo_s_max"}
    bools = {"versions_consistent", "background_clean", "instances_alive", "rolled_back", "bad_version_live",
             "rollout_succeeded", "repaired", "restored_exact", "answers_same", "attacks_refused"}
    d = c.mapping(raw, path, ints | floats | bools)
    if not d:
        raise c.fail(path, "at least one expectation is needed to decide pass or fail")
    kw: dict[str, Any] = {k: c.number(d, k, path, lo=0, integer=True) for k in ints}
    kw |= {k: c.number(d, k, path, lo=0) for k in floats}
    kw |= {k: c.boolean(d, k, path) for k in bools}
    for k in ("goodput_ratio_min", "bad_share_max"):
        if kw[k] is not None and kw[k] > 1:
            raise c.fail(f"{path}.{k}", f"is a fraction: must be <= 1, got {kw[k]}")
    return Expect(**kw)


def _alerts(c: _Checker, raw: Any) -> tuple[AlertExpect, ...]:
    """``alerts``: a list of {alert, within_s[, resolve_within_s]}; names must exist in the committed rules."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise c.fail("spec.alerts", "must be a non-empty list of {alert, within_s[, resolve_within_s]}")
    from recserve.control.monitoring.config import alert_names

    known = alert_names()
    out = []
    for i, item in enumerate(raw):
        path = f"alerts[{i}]"
        d = c.mapping(item, path, {"alert", "within_s", "resolve_within_s"}, {"alert", "within_s"})
        name = c.text(d, "alert", path)
        if name not in known:
            raise c.fail(f"{path}.alert", f"unknown alert {name!r} (deploy/monitoring/rules defines: "
                         f"{', '.join(sorted(known))})")
        within = c.number(d, "within_s", path, lo=0, strict_lo=True, hi=600)
        resolve = c.number(d, "resolve_within_s", path, lo=0, strict_lo=True, hi=1800)
        if resolve is not None and resolve <= within:
            raise c.fail(f"{path}.resolve_within_s", f"must be > within_s ({within}), got {resolve}")
        out.append(AlertExpect(name, float(within), None if resolve is None else float(resolve)))
    return tuple(out)


def _timing(c: _Checker, spec: DrillSpec) -> None:
    """Impossible timings: faults must leave a before and an after window inside the load's duration."""
    ss, dur = spec.steady_state, spec.load.duration_s
    for i, a in enumerate(spec.method):
        p = f"method[{i}]"
        if a.at_s < ss.before_s:
            raise c.fail(f"{p}.at_s", f"fault at {a.at_s}s leaves no steady-state before window ({ss.before_s}s)")
        if a.end_s + ss.after_s > dur:
            raise c.fail(f"{p}.at_s", f"fault window ends at {a.end_s}s; with after window {ss.after_s}s it needs "
                         f"load.duration_s >= {a.end_s + ss.after_s}, got {dur}")
    if spec.abort.p99_ceiling_ms < ss.slo_p99_ms:
        raise c.fail("abort.p99_ceiling_ms", f"ceiling {spec.abort.p99_ceiling_ms} is below the SLO {ss.slo_p99_ms}")
    if spec.abort.p99_over_for_s > dur:
        raise c.fail("abort.p99_over_for_s", f"{spec.abort.p99_over_for_s}s is longer than the drill ({dur}s)")


def parse(raw: Any, source: str = "<spec>") -> DrillSpec:
    """Validate one spec document; raise SpecError naming the field and the rule."""
    c = _Checker(source)
    top = {"name", "purpose", "targets", "load", "steady_state", "method", "abort", "expect", "alerts"}
    d = c.mapping(raw, "spec", top, {"name", "targets", "load", "steady_state", "method", "expect"})
    name = c.text(d, "name", "spec")
    targets = d["targets"]
    if not isinstance(targets, list) or not targets or any(t not in ENSEMBLES for t in targets):
        raise c.fail("spec.targets", f"must be a non-empty list of {sorted(ENSEMBLES)}, got {targets!r}")
    method = d["method"]
    if not isinstance(method, list) or not method:
        raise c.fail("spec.method", "must be a non-empty list of fault actions")
    actions = tuple(_action(c, a, f"method[{i}]") for i, a in enumerate(method))
    spec = DrillSpec(
        name=name,
        purpose=c.text(d, "purpose", "spec", required=False),
        targets=tuple(targets),
        load=_load(c, d["load"]),
        steady_state=_steady(c, d["steady_state"]),
        method=actions,
        abort=_abort(c, d.get("abort")),
        expect=_expect(c, d["expect"]),
        source=source,
        alerts=_alerts(c, d.get("alerts")),
    )
    _timing(c, spec)
    return spec


def load_file(path: Path) -> DrillSpec:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise SpecError(str(path), "spec", f"not valid YAML: {exc}") from exc
    except OSError as exc:
        raise SpecError(str(path), "spec", f"cannot read: {exc.strerror}") from exc
    spec = parse(raw, str(path))
    if spec.name != Path(path).stem:
        raise SpecError(str(path), "spec.name", f"must match the file name '{Path(path).stem}', got {spec.name!r}")
    return spec


def load_all(directory: Path = SPECS_DIR) -> dict[str, DrillSpec]:
    """Every spec in ``directory`` by name, all validated (the first error stops everything)."""
    return {s.name: s for s in (load_file(p) for p in sorted(directory.glob("*.yaml")))}
