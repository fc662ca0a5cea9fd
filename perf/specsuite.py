"""Perf for a user's repository: a suite for a serving spec, and perf_analyzer inputs from the spec.

Why here: the demo's suites name ``recommend``/``search`` and draw payloads from the demo's generated data; a spec
(control/spec/spec.py) already says, per client-facing model, what a valid request is (its golden requests, checked
against ``config.pbtxt``), the model's p99 SLO and whether it batches. A template suite (``for_spec: true``,
``perf/suites/spec-*.yaml``) says how hard to measure; ``expand`` turns it into one target per spec model and
template, each judged against that model's ``sloP99Ms``.

Inputs are the golden requests' ``data`` only: perf_analyzer's own validation is exact, and the spec compares
outputs by its rules (close, topk) elsewhere. When a model has few golden requests and every input has a rule a
person confirmed (range or values, not ``guessed``), more requests are generated from those rules for variety.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from recserve.control.spec.spec import ModelSpec, ServingSpec
from recserve.perf.suite import Suite, SuiteError, load

#: Why each demo ratio is not measured for a spec, printed and reported (never left out silently).
DEMO_RATIOS = {
    "served_vs_inprocess": "demo-specific: compares the demo's ranker with its in-process onnxruntime reference "
    "on the demo's payloads",
    "haproxy_vs_direct": "demo-specific: its floors (perf/baseline.json) were measured on the demo's recommend "
    "ensemble; each spec model's direct and front-door points are in the load points",
    "dynamic_batching_gain": "demo-specific: reloads the demo's ranker with its committed batching turned off",
    "trt_vs_onnx": "demo-specific: needs the demo's *_trt models (and an NVIDIA GPU)",
}
#: Generated rows are added up to this many when golden requests are fewer (and the rules allow it).
MIN_ROWS = 64


def template_for(name_or_path: str) -> Suite:
    """The template suite for a spec run: ``smoke`` -> perf/suites/spec-smoke.yaml; a path must be a template."""
    name = str(name_or_path)
    candidate = name if Path(name).exists() or name.startswith("spec-") else f"spec-{name}"
    suite = load(candidate)
    if not suite.for_spec:
        raise SuiteError(f"{suite.path}: not a suite for a serving spec (for_spec: true); with --spec, name a "
                         "template such as spec-smoke or spec-full")
    return suite


def expand(template: Suite, spec: ServingSpec, models: list[str] | None = None) -> Suite:
    """One target per (spec model, template target), batch 1 for a model without batching, SLO per model."""
    if not template.for_spec:
        raise SuiteError(f"{template.path}: not a suite for a serving spec (for_spec: true)")
    names = list(models or spec.model_names())
    unknown = [m for m in names if m not in spec.models]
    if unknown:
        raise SuiteError(f"{spec.path}: no model {unknown[0]!r} in the spec (models: {', '.join(spec.models)})")
    targets = []
    for m in names:
        info = spec.models[m].info
        for t in template.targets:
            batch = 1 if info.max_batch_size == 0 else min(t.batch_size, info.max_batch_size)
            targets.append(replace(t, name=t.name.replace("{model}", m).replace("*", m), model=m, batch_size=batch))
    return replace(template, name=f"{template.name} ({spec.path.name})", targets=tuple(targets), ratios={},
                   model_slo_ms={m: spec.models[m].slo_p99_ms for m in names})


# ------------------------------------------------------------------------------------------------ inputs
def golden_rows(ms: ModelSpec) -> list[dict[str, np.ndarray]]:
    """The golden requests' inputs (no batch dimension), as the spec read and checked them."""
    return [dict(g.inputs) for g in ms.golden]


def _generatable(ms: ModelSpec) -> str | None:
    """None when every input can be generated from a confirmed rule; else why not (one line)."""
    for t in ms.info.inputs:
        rule = ms.inputs.get(t.name)
        if rule is None:
            if t.optional:
                continue
            return f"input {t.name} has no rule"
        if rule.guessed:
            return f"input {t.name}'s rule was guessed by recctl init (confirm it to generate requests)"
    return None


def rule_rows(ms: ModelSpec, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` requests drawn from the spec's input rules by ``recctl init``'s own generator (a variable dimension
    takes its ``length`` rule). Call only when ``_generatable`` says None."""
    from recserve.control.spec.init import make_requests

    by_name = {t.name: t for t in ms.info.inputs}
    out = []
    for req in make_requests(ms.info, ms.inputs, n, seed):
        row = {}
        for name, entry in req.items():
            t = by_name[name]
            if t.datatype == "BYTES":
                a = np.array([str(v).encode() for v in entry["content"]], dtype=object)
            else:
                a = np.array(entry["content"], dtype=t.numpy_dtype)
            row[name] = a.reshape(entry["shape"])
        out.append(row)
    return out


def _json_tensor(name: str, a: np.ndarray) -> dict:
    if a.dtype == object:
        try:
            content = [v.decode() if isinstance(v, bytes) else str(v) for v in a.reshape(-1)]
        except UnicodeDecodeError:
            raise ValueError(f"input {name}: a BYTES value is not UTF-8, which perf_analyzer's JSON cannot "
                             "carry as text") from None
    elif a.dtype == np.bool_:
        content = [bool(v) for v in a.reshape(-1)]
    else:
        content = a.reshape(-1).tolist()
    return {"content": content, "shape": list(a.shape)}


def write_input_data(rows: list[dict[str, np.ndarray]], path: Path) -> Path:
    """perf_analyzer ``--input-data`` JSON, data only (no validation_data), every tensor with its own shape (the
    full shape for a model without batching, the shape without the batch dimension otherwise)."""
    data = [{k: _json_tensor(k, v) for k, v in row.items()} for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": data}))
    return path


def payloads(ms: ModelSpec, path: Path, min_rows: int = MIN_ROWS) -> tuple[list[dict[str, np.ndarray]], dict]:
    """Write ``ms``'s perf inputs to ``path``; the rows and what the report says about them."""
    rows = golden_rows(ms)
    info = {"golden_rows": len(rows), "golden_file": str(ms.golden_file), "generated_rows": 0}
    if len(rows) < min_rows:
        why = _generatable(ms)
        if why is None:
            extra = rule_rows(ms, min_rows - len(rows))
            rows += extra
            info["generated_rows"] = len(extra)
        else:
            info["not_generated"] = why
    write_input_data(rows, path)
    info["file"] = str(path)
    return rows, info


def describe(spec: ServingSpec, models: list[str]) -> dict:
    """The report's ``spec`` entry: which spec, which repository, and per model what was measured against what."""
    return {
        "path": str(spec.path),
        "repository": str(spec.repository),
        "models": {m: {"slo_p99_ms": spec.models[m].slo_p99_ms, "max_batch_size": spec.models[m].info.max_batch_size,
                       "kind": spec.models[m].info.kind, "steps": list(spec.models[m].steps)} for m in models},
    }
