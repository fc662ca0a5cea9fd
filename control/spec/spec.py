"""The serving spec: one YAML file saying what recserve needs to guard a Triton repository.

Triton already knows each model's inputs, outputs, datatypes and dims (``config.pbtxt``); the spec says the rest:
which models clients call (with their p99 SLO, priority and the largest batch the front door admits), how to make
valid requests, the golden requests and how each output is compared, where the expected answers of a NEW version
come from, the degraded answer and the rollout gates. Every field is checked here, before any process starts, and a
refusal names the file and the field (``spec.yaml: models.ctr_ranker.outputs.score.atol: must be >= 0``).

Golden files use perf_analyzer's ``--input-data`` layout: ``{"data": [{input: {"content": [...], "shape": [...]}}],
"validation_data": [{output: {"content": [...]}}]}``, one request per entry, without the batch dimension.
recserve compares ``validation_data`` itself, by the rules below; what is fed to perf_analyzer carries no
tolerance-judged outputs (its own validation is exact).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from recserve.control.defaults import SLO_P99_MS
from recserve.control.spec.repository import (
    NUMPY_OF,
    ModelInfo,
    RepositoryReadError,
    TensorInfo,
    closure,
    read_repository,
)

SCHEMA_VERSION = 1
#: The rules an output can be compared by; ``exact`` is the only one for integers and strings unless ``topk``.
RULES = ("exact", "close", "topk")
#: Where a NEW version's expected answers come from: computed outside Triton, or recorded for named versions only.
EXPECTED_SOURCES = ("reference", "recorded")
DRIFT_COMPARES = ("correlation", "topk")
#: Degraded-answer providers the fallback server has (the demo's popular items and lexical title search).
DEGRADED_PROVIDERS = ("popular_items", "lexical_search")
#: Fields recserve refuses by name, with the reason, rather than accept and ignore.
REFUSED_FIELDS = {
    "priority": "probes are never shed without it: they go straight to each instance, past the front door's limits, "
                "and recserve sets no Triton priority levels (with a queue policy they held requests ~500 ms, "
                "docs/holds.md)",
}
DEFAULT_SLO_P99_MS = SLO_P99_MS  # the control plane's default SLO (control/defaults.py)
DEFAULT_MAX_BATCH = 8


class SpecError(ValueError):
    """A spec that recserve refuses; the message names the file and the field, and says the rule."""


@dataclass(frozen=True)
class InputRule:
    """How to make valid values for one input: a [lo, hi] range, a value list, or a sample file."""

    range: tuple[float, float] | None = None
    values: tuple[Any, ...] | None = None
    file: Path | None = None
    #: For a variable dimension (-1): how many elements, [lo, hi].
    length: tuple[int, int] | None = None
    #: True when ``recctl init`` guessed it (say so until a person confirms it).
    guessed: bool = False


@dataclass(frozen=True)
class OutputRule:
    """How a served output is compared with the expected one."""

    compare: str  # exact | close | topk
    atol: float = 0.0
    rtol: float = 0.0
    k: int = 0  # topk: the first k ids
    min_overlap: float = 1.0  # topk: the share of the expected top k that must be in the served top k
    scores: str = ""  # topk: the output whose scores break ties (ids tied on score are interchangeable)


@dataclass(frozen=True)
class DriftGate:
    output: str
    compare: str  # correlation | topk
    min: float
    k: int = 0


@dataclass(frozen=True)
class Gates:
    """A model's rollout gates: the drift rule, the p99 a canary may reach before its latency is compared with the
    old version's (above it, ``max_p99_ratio`` x the old version's p99 rolls back), the largest error rate."""

    drift: DriftGate | None
    p99_ms: float
    error_rate_max: float


@dataclass(frozen=True)
class Degraded:
    file: Path | None = None
    provider: str = ""


@dataclass(frozen=True)
class GoldenRequest:
    """One request (tensors without the batch dimension) and its recorded expected outputs, if any."""

    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    info: ModelInfo
    slo_p99_ms: float
    max_batch: int
    inputs: dict[str, InputRule]
    outputs: dict[str, OutputRule]
    golden_file: Path
    golden: tuple[GoldenRequest, ...]
    expected: str  # reference | recorded
    recorded_versions: dict[str, int]
    degraded: Degraded | None
    gates: Gates
    steps: tuple[str, ...]  # the model and every model it uses


@dataclass(frozen=True)
class ServingSpec:
    path: Path
    repository: Path
    models: dict[str, ModelSpec]
    warnings: tuple[str, ...] = field(default=())

    def model_names(self) -> list[str]:
        return list(self.models)

    def rollout_gates(self, model: str) -> Gates | None:
        """The gates a rollout of ``model`` (a client-facing model or one of its steps) meets: the strictest p99 and
        error rate of the client-facing models that use it; None when no spec model does."""
        users = [m.gates for m in self.models.values() if model in m.steps]
        if not users:
            return None
        return Gates(None, min(g.p99_ms for g in users), min(g.error_rate_max for g in users))


# ---------------------------------------------------------------------------------------------------------------
# field checks: each raises SpecError naming ``where`` (file: dotted.field)


class _At:
    def __init__(self, path: Path, dotted: str = ""):
        self.path, self.dotted = path, dotted

    def __truediv__(self, key: str) -> _At:
        return _At(self.path, f"{self.dotted}.{key}" if self.dotted else key)

    def fail(self, rule: str) -> SpecError:
        return SpecError(f"{self.path}: {self.dotted or '(top level)'}: {rule}")


def _mapping(at: _At, value: Any, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise at.fail(f"must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise (at / unknown[0]).fail(f"unknown field (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(value))
    if missing:
        raise (at / missing[0]).fail("required")
    return value


def _number(at: _At, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise at.fail(f"must be a finite number, got {value!r}")
    if lo is not None and value < lo:
        raise at.fail(f"must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise at.fail(f"must be <= {hi}, got {value!r}")
    return float(value)


def _integer(at: _At, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise at.fail(f"must be an integer, got {value!r}")
    _number(at, value, lo, hi)
    return int(value)


def _choice(at: _At, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise at.fail(f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _file(at: _At, base: Path, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise at.fail("must be a file path (relative to the spec file)")
    p = (base / value).resolve()
    if not p.is_file():
        raise at.fail(f"{value}: no such file (looked at {p})")
    return p


def _pair(at: _At, value: Any, integer: bool) -> tuple:
    if not (isinstance(value, list) and len(value) == 2):
        raise at.fail(f"must be [low, high], got {value!r}")
    conv = _integer if integer else _number
    lo, hi = conv(at, value[0]), conv(at, value[1])
    if lo > hi:
        raise at.fail(f"low {lo} is above high {hi}")
    return lo, hi


# ---------------------------------------------------------------------------------------------------------------
# parts


def _input_rule(at: _At, base: Path, raw: Any, tensor: TensorInfo) -> InputRule:
    raw = _mapping(at, raw, {"range", "values", "file", "length", "guessed"})
    given = [k for k in ("range", "values", "file") if k in raw]
    if len(given) != 1:
        raise at.fail("needs exactly one of range, values, file")
    integer = tensor.datatype.startswith(("INT", "UINT"))
    rng = vals = fil = None
    if "range" in raw:
        if tensor.datatype in ("BYTES", "BOOL"):
            raise (at / "range").fail(f"a range needs a numeric input; {tensor.name} is {tensor.datatype}: use values")
        rng = _pair(at / "range", raw["range"], integer)
    elif "values" in raw:
        if not isinstance(raw["values"], list) or not raw["values"]:
            raise (at / "values").fail("must be a non-empty list")
        vals = tuple(raw["values"])
        for i, v in enumerate(vals):
            _check_value(at / "values" / str(i), v, tensor)
    else:
        fil = _file(at / "file", base, raw["file"])
    length = None
    if "length" in raw:
        if -1 not in tensor.dims:
            raise (at / "length").fail(f"only for an input with a variable dimension; {tensor.name} has dims "
                                       f"{list(tensor.dims)}")
        length = _pair(at / "length", raw["length"], True)
        if length[0] < 1:
            raise (at / "length").fail("must be at least 1")
    return InputRule(rng, vals, fil, length, bool(raw.get("guessed", False)))


def _check_value(at: _At, v: Any, tensor: TensorInfo) -> None:
    if tensor.datatype == "BYTES":
        if not isinstance(v, str):
            raise at.fail(f"{tensor.name} is BYTES: values must be strings, got {v!r}")
    elif tensor.datatype == "BOOL":
        if not isinstance(v, bool):
            raise at.fail(f"{tensor.name} is BOOL: values must be true/false, got {v!r}")
    elif tensor.datatype.startswith(("INT", "UINT")):
        _integer(at, v)
    else:
        _number(at, v)


def _output_rule(at: _At, raw: Any, tensor: TensorInfo, outputs: tuple[TensorInfo, ...]) -> OutputRule:
    raw = _mapping(at, raw, {"compare", "atol", "rtol", "k", "minOverlap", "scores"}, {"compare"})
    rule = _choice(at / "compare", raw["compare"], RULES)
    is_float = tensor.datatype in ("FP16", "FP32", "FP64")
    if rule == "close":
        if not is_float:
            raise (at / "compare").fail(f"close is for floats; {tensor.name} is {tensor.datatype}: use exact or topk")
        atol = _number(at / "atol", raw.get("atol", 0.0), 0)
        rtol = _number(at / "rtol", raw.get("rtol", 0.0), 0)
        if atol == 0 and rtol == 0:
            raise at.fail("close needs atol or rtol above 0 (use exact for bit equality)")
        return OutputRule("close", atol=atol, rtol=rtol)
    if rule == "topk":
        if is_float or tensor.datatype == "BYTES":
            raise (at / "compare").fail(f"topk compares ranked id lists (integers); {tensor.name} is "
                                        f"{tensor.datatype}")
        k = _integer(at / "k", raw.get("k"), 1)
        width = tensor.dims[-1] if tensor.dims else 1
        if width > 0 and k > width:
            raise (at / "k").fail(f"{tensor.name} holds {width} ids per request; k {k} is more")
        scores = raw.get("scores", "")
        if scores:
            names = [o.name for o in outputs]
            if scores not in names:
                raise (at / "scores").fail(f"not an output of the model (outputs: {', '.join(names)})")
        return OutputRule("topk", k=k, min_overlap=_number(at / "minOverlap", raw.get("minOverlap", 1.0), 0, 1),
                          scores=scores)
    extra = sorted(set(raw) - {"compare"})
    if extra:
        raise (at / extra[0]).fail("only for close or topk")
    return OutputRule("exact")


def _gates(at: _At, raw: Any, info: ModelInfo, slo: float) -> Gates:
    raw = _mapping(at, raw or {}, {"drift", "p99Ms", "errorRateMax"})
    drift = None
    if raw.get("drift") is not None:
        d = _mapping(at / "drift", raw["drift"], {"output", "compare", "min", "k"}, {"output", "compare", "min"})
        names = [o.name for o in info.outputs]
        if d["output"] not in names:
            raise (at / "drift" / "output").fail(f"not an output of {info.name} (outputs: {', '.join(names)})")
        cmp = _choice(at / "drift" / "compare", d["compare"], DRIFT_COMPARES)
        k = _integer(at / "drift" / "k", d.get("k", 0), 0)
        if cmp == "topk" and k < 1:
            raise (at / "drift" / "k").fail("topk needs k >= 1")
        drift = DriftGate(d["output"], cmp, _number(at / "drift" / "min", d["min"], -1, 1), k)
    return Gates(drift, _number(at / "p99Ms", raw.get("p99Ms", slo), 0.1),
                 _number(at / "errorRateMax", raw.get("errorRateMax", 0.01), 0, 1))


def _degraded(at: _At, base: Path, raw: Any, info: ModelInfo) -> Degraded | None:
    if raw is None:
        return None
    raw = _mapping(at, raw, {"file", "provider"})
    if len(raw) != 1:
        raise at.fail("needs exactly one of file, provider")
    if "file" in raw:
        path = _file(at / "file", base, raw["file"])
        read_degraded_answer(path, info)  # refused now, naming the file and the field, not at the first shed request
        return Degraded(file=path)
    provider = _choice(at / "provider", raw["provider"], DEGRADED_PROVIDERS)
    outs = {t.name: t for t in info.outputs}
    ids, scores = outs.get("item_ids"), outs.get("scores")
    what = (f"{provider} answers item_ids INT64 [N] and scores FP32 [N] (no other outputs); {info.name} has "
            + ", ".join(f"{t.name} {t.datatype} {list(t.dims)}" for t in info.outputs))
    if (set(outs) != {"item_ids", "scores"} or ids.datatype != "INT64" or scores.datatype != "FP32"
            or len(ids.dims) != 1 or ids.dims != scores.dims or ids.dims[0] == 0):
        raise (at / "provider").fail(what)
    if provider == "lexical_search" and not any(t.datatype == "BYTES" for t in info.inputs):
        raise (at / "provider").fail(f"lexical_search matches a BYTES query input; {info.name} has none")
    return Degraded(provider=provider)


def read_degraded_answer(path: Path, info: ModelInfo) -> dict[str, np.ndarray]:
    """A degraded-answer file: ``{output: {"content": [...], "shape": [...]}}`` for every output of the model,
    without the batch dimension (the whole shape for ``max_batch_size: 0``), checked against its config."""
    at = _At(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise at.fail(f"cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise at.fail(f"not JSON: {exc}") from None
    outs = {t.name: t for t in info.outputs}
    raw = _mapping(at, raw, set(outs), set(outs))
    return {n: tensor_from_json(at / n, v, outs[n]) for n, v in raw.items()}


def tensor_from_json(at: _At, entry: Any, tensor: TensorInfo) -> np.ndarray:
    """A perf_analyzer ``--input-data`` tensor (``content`` + ``shape``, or a bare list) checked against the config."""
    if isinstance(entry, dict):
        entry = _mapping(at, entry, {"content", "shape", "b64"}, {"content"})
        if "b64" in entry:
            raise (at / "b64").fail("base64 content is not read by recserve; give content")
        content, shape = entry["content"], entry.get("shape")
    else:
        content, shape = entry, None
    if not isinstance(content, list):
        content = [content]
    flat = _flatten(content)
    dtype = NUMPY_OF[tensor.datatype]
    for i, v in enumerate(flat):
        _check_value(at / "content" / str(i), v, tensor)
    arr = np.array([v.encode() for v in flat], dtype=object) if dtype == "object" else np.array(flat, dtype=dtype)
    if shape is None:
        shape = [len(flat)] if len(tensor.dims) == 1 else list(tensor.dims)
        if -1 in shape and len(tensor.dims) > 1:
            raise at.fail(f"{tensor.name} has a variable dimension in {list(tensor.dims)}: give shape")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise (at / "shape").fail(f"must be a list of non-negative integers, got {shape!r}")
    if math.prod(shape) != arr.size:
        raise (at / "shape").fail(f"{shape} holds {math.prod(shape)} values, content has {arr.size}")
    if len(shape) != len(tensor.dims) or any(d not in (-1, s) for d, s in zip(tensor.dims, shape, strict=True)):
        raise (at / "shape").fail(f"{shape} does not fit {tensor.name}'s dims {list(tensor.dims)} in config.pbtxt "
                                  "(without the batch dimension)")
    return arr.reshape(shape)


def _flatten(v: list) -> list:
    out = []
    for x in v:
        out.extend(_flatten(x) if isinstance(x, list) else [x])
    return out


def read_golden(path: Path, info: ModelInfo) -> tuple[GoldenRequest, ...]:
    """A golden file in perf_analyzer's layout, every tensor checked against the model's config."""
    at = _At(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise at.fail(f"cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise at.fail(f"not JSON: {exc}") from None
    raw = _mapping(at, raw, {"data", "validation_data"}, {"data"})
    data, valid = raw["data"], raw.get("validation_data")
    if not isinstance(data, list) or not data:
        raise (at / "data").fail("must be a non-empty list of requests")
    if valid is not None and (not isinstance(valid, list) or len(valid) != len(data)):
        raise (at / "validation_data").fail(f"must list one entry per request ({len(data)})")
    ins = {t.name: t for t in info.inputs}
    outs = {t.name: t for t in info.outputs}
    out = []
    for i, req in enumerate(data):
        rat = at / "data" / str(i)
        if not isinstance(req, dict):
            raise rat.fail("must be a mapping of input name to tensor")
        unknown = sorted(set(req) - set(ins))
        if unknown:
            raise (rat / unknown[0]).fail(f"not an input of {info.name} (inputs: {', '.join(ins)})")
        missing = sorted(n for n, t in ins.items() if n not in req and not t.optional)
        if missing:
            raise (rat / missing[0]).fail(f"required input of {info.name} is missing")
        inputs = {n: tensor_from_json(rat / n, v, ins[n]) for n, v in req.items()}
        expected = {}
        if valid is not None:
            vat = at / "validation_data" / str(i)
            if not isinstance(valid[i], dict):
                raise vat.fail("must be a mapping of output name to tensor")
            for n, v in valid[i].items():
                if n not in outs:
                    raise (vat / n).fail(f"not an output of {info.name} (outputs: {', '.join(outs)})")
                expected[n] = tensor_from_json(vat / n, v, outs[n])
        out.append(GoldenRequest(inputs, expected))
    return tuple(out)


def _model(at: _At, base: Path, name: str, raw: Any, models: dict[str, ModelInfo]) -> ModelSpec:
    if name not in models:
        raise at.fail(f"no model {name!r} in the repository (models: {', '.join(sorted(models))})")
    info = models[name]
    steps = tuple(closure(models, name))
    for s in steps:
        if models[s].unsupported:
            raise at.fail(f"recserve cannot guard {s} yet: {'; '.join(models[s].unsupported)}")
    raw = _mapping(at, raw, {"sloP99Ms", *REFUSED_FIELDS, "maxBatch", "inputs", "outputs", "golden", "expected",
                             "recordedVersions", "degraded", "gates"}, {"golden", "outputs"})
    for key, why in REFUSED_FIELDS.items():
        if key in raw:
            raise (at / key).fail(f"not a serving-spec field: {why}; remove it")
    slo = _number(at / "sloP99Ms", raw.get("sloP99Ms", DEFAULT_SLO_P99_MS), 0.1)
    cap = info.max_batch_size if info.max_batch_size > 0 else 1
    max_batch = _integer(at / "maxBatch", raw.get("maxBatch", min(DEFAULT_MAX_BATCH, cap)), 1, cap)
    ins = {t.name: t for t in info.inputs}
    raw_inputs = _mapping(at / "inputs", raw.get("inputs") or {}, set(ins))
    inputs = {n: _input_rule(at / "inputs" / n, base, r, ins[n]) for n, r in raw_inputs.items()}
    outs = {t.name: t for t in info.outputs}
    raw_outputs = _mapping(at / "outputs", raw["outputs"], set(outs))
    if not raw_outputs:
        raise (at / "outputs").fail("name at least one output to compare")
    outputs = {n: _output_rule(at / "outputs" / n, r, outs[n], info.outputs) for n, r in raw_outputs.items()}
    golden_file = _file(at / "golden", base, raw["golden"])
    golden = read_golden(golden_file, info)
    expected = _choice(at / "expected", raw.get("expected", "reference"), EXPECTED_SOURCES)
    recorded = {}
    if expected == "recorded":
        rv = _mapping(at / "recordedVersions", raw.get("recordedVersions"), set(steps), set())
        if not rv:
            raise (at / "recordedVersions").fail("recorded answers hold only for named versions: name them")
        recorded = {m: _integer(at / "recordedVersions" / m, v, 1) for m, v in rv.items()}
        if any(not g.expected for g in golden):
            raise (at / "golden").fail("expected: recorded needs validation_data for every golden request")
    for i, g in enumerate(golden):
        missing = sorted(set(g.expected) ^ set(outputs)) if g.expected else []
        if missing:
            raise (_At(golden_file) / "validation_data" / str(i)).fail(
                f"outputs {missing}: validation_data must hold exactly the outputs the spec compares "
                f"({', '.join(outputs)})")
    return ModelSpec(name, info, slo, max_batch, inputs, outputs, golden_file, golden, expected, recorded,
                     _degraded(at / "degraded", base, raw.get("degraded"), info),
                     _gates(at / "gates", raw.get("gates"), info, slo), steps)


def load_spec(path: Path, repository: Path | None = None) -> ServingSpec:
    """Read and check a serving spec; ``repository`` overrides the spec's own (relative to the spec file)."""
    path = Path(path).resolve()
    at = _At(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise at.fail(f"cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise at.fail(f"not YAML: {exc}") from None
    raw = _mapping(at, raw, {"schemaVersion", "repository", "models"}, {"schemaVersion", "models"})
    if raw["schemaVersion"] != SCHEMA_VERSION:
        raise (at / "schemaVersion").fail(f"this recserve reads schemaVersion {SCHEMA_VERSION}, "
                                          f"got {raw['schemaVersion']!r}")
    base = path.parent
    if repository is None:
        if not isinstance(raw.get("repository"), str):
            raise (at / "repository").fail("required (or pass --repository)")
        repository = base / raw["repository"]
    repository = Path(repository).resolve()
    try:
        models = read_repository(repository)
    except RepositoryReadError as exc:
        raise (at / "repository").fail(str(exc)) from None
    if not isinstance(raw["models"], dict) or not raw["models"]:
        raise (at / "models").fail("must name at least one client-facing model")
    specs = {n: _model(at / "models" / n, base, n, m, models) for n, m in raw["models"].items()}
    warnings = tuple(f"{path}: models.{n}.inputs.{i}: guessed by recctl init; confirm it"
                     for n, s in specs.items() for i, r in s.inputs.items() if r.guessed)
    return ServingSpec(path, repository, specs, warnings)
