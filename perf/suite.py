"""Perf suites as YAML data (``perf/suites/*.yaml``), validated before anything starts.

Why strict: a typo in a suite (``concurency``) would otherwise silently measure nothing and a green
report would lie; every error names the file and the key path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from recserve.control.defaults import SLO_P99_MS

SUITES_DIR = Path(__file__).resolve().parent / "suites"
VIAS = ("direct", "haproxy", "fleet")
#: In a suite for a serving spec (``for_spec: true``), the model of a template target: every model of the spec.
EVERY_SPEC_MODEL = "*"


class SuiteError(ValueError):
    """A suite file is missing, unreadable or breaks the schema; the message says where."""


@dataclass(frozen=True)
class Target:
    """One model measured one way: a concurrency sweep and/or a request-rate sweep."""

    name: str
    model: str
    via: str = "direct"
    batch_size: int = 1
    concurrency: tuple[int, ...] = ()
    rate: tuple[float, ...] = ()
    #: Fractions of the concurrency sweep's saturation to probe as request rates (finds capacity_rps).
    capacity: tuple[float, ...] = ()


@dataclass(frozen=True)
class RatioSpec:
    """How one side-by-side ratio is measured."""

    model: str
    batch_size: int = 1
    concurrency: tuple[int, ...] = (4,)
    rounds: int = 1


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str = ""
    slo_ms: float = SLO_P99_MS
    seconds_per_point: float = 2.0
    payload_rows: int = 256
    targets: tuple[Target, ...] = ()
    ratios: dict[str, RatioSpec] = field(default_factory=dict)
    inprocess_seconds: float = 3.0
    #: A template for a serving spec (perf/specsuite.py expands it: its targets' model is ``*``, every spec model).
    for_spec: bool = False
    #: Per-model p99 SLO (a spec's ``sloP99Ms``); models not named here are judged by ``slo_ms``.
    model_slo_ms: dict[str, float] = field(default_factory=dict)

    def slo_for(self, model: str) -> float:
        """The p99 SLO ``model``'s points and capacity are judged by."""
        return self.model_slo_ms.get(model, self.slo_ms)

    def models(self) -> list[str]:
        """Every model the suite sends requests to (what the embedded server must load)."""
        names = [t.model for t in self.targets] + [r.model for r in self.ratios.values()]
        if "trt_vs_onnx" in self.ratios:
            names.append(self.ratios["trt_vs_onnx"].model + "_trt")
        return list(dict.fromkeys(names))


RATIO_NAMES = ("served_vs_inprocess", "haproxy_vs_direct", "dynamic_batching_gain", "trt_vs_onnx")
_SUITE_KEYS = {
    "name",
    "description",
    "slo_ms",
    "seconds_per_point",
    "payload_rows",
    "targets",
    "ratios",
    "inprocess_seconds",
    "for_spec",
}
_TARGET_KEYS = {"name", "model", "via", "batch_size", "concurrency", "rate", "capacity"}
_RATIO_KEYS = {"model", "batch_size", "concurrency", "rounds"}


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def _unknown(path: Path, where: str, got: dict, allowed: set[str]) -> None:
    extra = sorted(set(got) - allowed)
    if extra:
        raise SuiteError(f"{_where(path, where)}: unknown key(s) {extra}; allowed: {sorted(allowed)}")


def _num(path: Path, where: str, value: object, kind: type, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise SuiteError(f"{_where(path, where)}: expected {kind.__name__}, got {value!r}")
    if value < minimum:
        raise SuiteError(f"{_where(path, where)}: must be >= {minimum}, got {value!r}")
    return value


def _list(path: Path, where: str, value: object, kind: type, minimum: float) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise SuiteError(f"{_where(path, where)}: expected a non-empty list, got {value!r}")
    return tuple(_num(path, f"{where}[{i}]", v, kind, minimum) for i, v in enumerate(value))


def _target(path: Path, i: int, raw: object, for_spec: bool = False) -> Target:
    where = f"targets[{i}]"
    if not isinstance(raw, dict):
        raise SuiteError(f"{_where(path, where)}: expected a mapping, got {raw!r}")
    _unknown(path, where, raw, _TARGET_KEYS)
    if not isinstance(raw.get("model"), str) or not raw["model"]:
        raise SuiteError(f"{_where(path, where + '.model')}: required (a model or ensemble name)")
    if for_spec != (raw["model"] == EVERY_SPEC_MODEL):
        rule = (f"a suite for a serving spec (for_spec: true) measures every spec model: model must be "
                f"'{EVERY_SPEC_MODEL}'" if for_spec else
                f"'{EVERY_SPEC_MODEL}' (every spec model) is only for a suite with for_spec: true")
        raise SuiteError(f"{_where(path, where + '.model')}: {rule}, got {raw['model']!r}")
    via = raw.get("via", "direct")
    if via not in VIAS:
        raise SuiteError(f"{_where(path, where + '.via')}: must be one of {VIAS}, got {via!r}")
    t = Target(
        name=str(raw.get("name") or f"{raw['model']}-{via}"),
        model=raw["model"],
        via=via,
        batch_size=int(_num(path, where + ".batch_size", raw.get("batch_size", 1), int, 1)),
        concurrency=_list(path, where + ".concurrency", raw.get("concurrency"), int, 1),
        rate=_list(path, where + ".rate", raw.get("rate"), float, 0.1),
        capacity=_list(path, where + ".capacity", raw.get("capacity"), float, 0.01),
    )
    if not t.concurrency and not t.rate:
        raise SuiteError(f"{_where(path, where)}: needs 'concurrency' and/or 'rate' load points")
    if t.capacity and not t.concurrency:
        raise SuiteError(f"{_where(path, where + '.capacity')}: fractions of saturation need a 'concurrency' sweep")
    return t


def _ratio(path: Path, name: str, raw: object) -> RatioSpec:
    where = f"ratios.{name}"
    if name not in RATIO_NAMES:
        raise SuiteError(f"{_where(path, where)}: unknown ratio; known: {RATIO_NAMES}")
    if not isinstance(raw, dict):
        raise SuiteError(f"{_where(path, where)}: expected a mapping, got {raw!r}")
    _unknown(path, where, raw, _RATIO_KEYS)
    if not isinstance(raw.get("model"), str):
        raise SuiteError(f"{_where(path, where + '.model')}: required")
    return RatioSpec(
        model=raw["model"],
        batch_size=int(_num(path, where + ".batch_size", raw.get("batch_size", 1), int, 1)),
        concurrency=_list(path, where + ".concurrency", raw.get("concurrency", [4]), int, 1),
        rounds=int(_num(path, where + ".rounds", raw.get("rounds", 1), int, 1)),
    )


def parse(raw: object, path: Path) -> Suite:
    """Validate a loaded YAML document into a Suite."""
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    _unknown(path, "top level", raw, _SUITE_KEYS)
    targets = raw.get("targets") or []
    if not isinstance(targets, list):
        raise SuiteError(f"{_where(path, 'targets')}: expected a list")
    ratios = raw.get("ratios") or {}
    if not isinstance(ratios, dict):
        raise SuiteError(f"{_where(path, 'ratios')}: expected a mapping")
    if not targets and not ratios:
        raise SuiteError(f"{path}: nothing to measure (no 'targets' and no 'ratios')")
    for_spec = raw.get("for_spec", False)
    if not isinstance(for_spec, bool):
        raise SuiteError(f"{_where(path, 'for_spec')}: expected true or false, got {for_spec!r}")
    if for_spec and ratios:
        raise SuiteError(f"{_where(path, 'ratios')}: the ratios measure the demo's models; a suite for a serving "
                         "spec has none")
    if for_spec and not targets:
        raise SuiteError(f"{_where(path, 'targets')}: a suite for a serving spec needs target templates")
    parsed = [_target(path, i, t, for_spec) for i, t in enumerate(targets)]
    names = [t.name for t in parsed]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SuiteError(f"{_where(path, 'targets')}: duplicate target names {dup}")
    return Suite(
        name=str(raw.get("name") or path.stem),
        path=path,
        description=str(raw.get("description", "")),
        slo_ms=float(_num(path, "slo_ms", raw.get("slo_ms", SLO_P99_MS), float, 0.1)),
        seconds_per_point=float(_num(path, "seconds_per_point", raw.get("seconds_per_point", 2.0), float, 0.2)),
        payload_rows=int(_num(path, "payload_rows", raw.get("payload_rows", 256), int, 1)),
        inprocess_seconds=float(_num(path, "inprocess_seconds", raw.get("inprocess_seconds", 3.0), float, 0.2)),
        targets=tuple(parsed),
        ratios={k: _ratio(path, k, v) for k, v in ratios.items()},
        for_spec=for_spec,
    )


def load(name_or_path: str | Path) -> Suite:
    """A suite by file path or by name in perf/suites/ (``smoke`` -> perf/suites/smoke.yaml)."""
    path = Path(name_or_path)
    if not path.exists() and not path.suffix:
        path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
        raise SuiteError(f"suite '{name_or_path}' not found (looked at {path}; known suites: {known})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML: {exc}") from exc
    return parse(raw, path)
