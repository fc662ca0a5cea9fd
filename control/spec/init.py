"""``recctl init``: a starter serving spec read from a repository's configs, with golden requests and answers.

What init decides and how it says so: client-facing models are those no ensemble uses as a step; input ranges are
read from an ONNX ``Gather``'s table size where an input indexes one (marked ``guessed``: a person confirms
them), else a small default (also ``guessed``); comparison rules follow the datatype (floats ``close``, integers
and strings ``exact``, an integer list beside a float list of the same width ``topk`` with ties). Golden requests
come from ``--golden MODEL=FILE`` or are made from the input rules; expected answers are computed by the reference
outside Triton. Golden requests too weak to tell a perturbed model (every ONNX weight of the model's steps moved by
a seeded 5% noise) from the real one are refused; where no ONNX step exists to perturb, init says it could not
decide. Models recserve cannot guard, or whose answers the reference cannot compute, are left out with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from recserve.control.spec.compare import compare_answer
from recserve.control.spec.repository import ModelInfo, TensorInfo, closure, read_repository
from recserve.control.spec.spec import (
    DEFAULT_SLO_P99_MS,
    SCHEMA_VERSION,
    InputRule,
    OutputRule,
    SpecError,
    load_spec,
    read_golden,
)

#: Golden requests init makes per model when no file is given.
DEFAULT_REQUESTS = 8
#: The perturbation golden requests must notice: every float ONNX weight times (1 + N(0, PERTURB_SIGMA)).
PERTURB_SIGMA = 0.05
FLOAT_RULE = OutputRule("close", atol=1e-5, rtol=1e-4)
#: Drift gates init proposes: a new version must keep its scores this correlated with the serving version's on the
#: golden requests, or this share of its top-k ids.
DRIFT_MIN_CORRELATION = 0.9
DRIFT_MIN_OVERLAP = 0.5


@dataclass
class InitResult:
    spec_path: Path
    models: list[str]
    notes: list[str] = field(default_factory=list)  # what init guessed, left out or could not decide


def client_facing(models: dict[str, ModelInfo]) -> list[str]:
    """Models no ensemble uses as a step, in name order."""
    used = {s.model for m in models.values() for s in m.steps}
    return sorted(n for n in models if n not in used)


def _gather_rows(models: dict[str, ModelInfo], model: str, tensor: str) -> int | None:
    """Rows of the ONNX Gather table that ``tensor`` of ``model`` indexes, following ensemble input maps."""
    info = models[model]
    if info.kind == "ensemble":
        for s in info.steps:
            for step_in, ens in s.input_map.items():
                if ens == tensor:
                    rows = _gather_rows(models, s.model, step_in)
                    if rows:
                        return rows
        return None
    if info.kind != "onnx" or not info.versions:
        return None
    import onnx

    path = info.version_dir(info.versions[-1]) / info.default_model_filename
    try:
        g = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - an unreadable model only means no guess
        return None
    tables = {i.name: list(i.dims) for i in g.initializer}
    for node in g.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor and node.input[0] in tables:
            dims = tables[node.input[0]]
            return int(dims[0]) if dims else None
    return None


def guess_input(models: dict[str, ModelInfo], model: str, t: TensorInfo) -> tuple[InputRule, str]:
    """An input rule and where it came from (always marked guessed)."""
    length = (1, 8) if -1 in t.dims else None
    if t.datatype == "BYTES":
        return InputRule(values=("example", "another example", "a third one"), length=length, guessed=True), \
            "a few example strings"
    if t.datatype == "BOOL":
        return InputRule(values=(True, False), length=length, guessed=True), "true/false"
    if t.datatype.startswith(("INT", "UINT")):
        rows = _gather_rows(models, model, t.name)
        if rows:
            return InputRule(range=(0, rows - 1), length=length, guessed=True), f"indexes a Gather table of {rows} rows"
        return InputRule(range=(0, 9), length=length, guessed=True), "no table found: a small default range"
    return InputRule(range=(-1.0, 1.0), length=length, guessed=True), "a default float range"


def propose_outputs(info: ModelInfo) -> dict[str, OutputRule]:
    floats = {o.name: o for o in info.outputs if o.datatype in ("FP16", "FP32", "FP64")}
    out = {}
    for o in info.outputs:
        if o.name in floats:
            out[o.name] = FLOAT_RULE
            continue
        twin = next((f for f in floats.values() if f.dims == o.dims and o.dims and o.dims[-1] > 1), None)
        if twin is not None and o.datatype.startswith(("INT", "UINT")):
            out[o.name] = OutputRule("topk", k=o.dims[-1], min_overlap=1.0, scores=twin.name)
        else:
            out[o.name] = OutputRule("exact")
    return out


def propose_drift(info: ModelInfo, rules: Mapping[str, OutputRule]) -> dict | None:
    """The drift gate init proposes: score correlation on the first float output, else top-k overlap on the
    first ranked id list; None when the model has neither (its rules then judge a new version's answers)."""
    for o in info.outputs:
        if o.datatype in ("FP16", "FP32", "FP64"):
            return {"output": o.name, "compare": "correlation", "min": DRIFT_MIN_CORRELATION}
    for name, r in rules.items():
        if r.compare == "topk":
            return {"output": name, "compare": "topk", "k": r.k, "min": DRIFT_MIN_OVERLAP}
    return None


def make_requests(info: ModelInfo, rules: Mapping[str, InputRule], n: int, seed: int = 0) -> list[dict]:
    """``n`` requests (tensors without the batch dimension) drawn from the input rules."""
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(n):
        req = {}
        for t in info.inputs:
            if t.optional and t.name not in rules:
                continue
            r = rules[t.name]
            shape = [(int(rng.integers(r.length[0], r.length[1] + 1)) if r.length else 1) if d == -1 else d
                     for d in t.dims]
            size = int(np.prod(shape)) if shape else 1
            if r.values is not None:
                vals = [r.values[int(i)] for i in rng.integers(0, len(r.values), size)]
            elif r.file is not None:
                lines = [ln for ln in Path(r.file).read_text().splitlines() if ln.strip()]
                vals = [lines[int(i)] for i in rng.integers(0, len(lines), size)]
            elif t.datatype.startswith(("INT", "UINT")):
                vals = rng.integers(int(r.range[0]), int(r.range[1]) + 1, size).tolist()
            else:
                vals = rng.uniform(r.range[0], r.range[1], size).astype(t.numpy_dtype).tolist()
            req[t.name] = {"content": vals, "shape": shape}
        reqs.append(req)
    return reqs


def _array(t: TensorInfo, entry: dict) -> np.ndarray:
    if t.datatype == "BYTES":
        a = np.array([str(v).encode() for v in entry["content"]], dtype=object)
    else:
        a = np.array(entry["content"], dtype=t.numpy_dtype)
    return a.reshape(entry["shape"])


def _batched(info: ModelInfo, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[None, ...] for k, v in arrays.items()} if info.max_batch_size > 0 else arrays


def _unbatched(info: ModelInfo, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in arrays.items()} if info.max_batch_size > 0 else arrays


def _json_tensor(a: np.ndarray) -> dict:
    a = np.asarray(a)
    if a.dtype == object:
        content = [bytes(x).decode("utf-8", errors="replace") for x in a.reshape(-1)]
    else:
        content = a.reshape(-1).tolist()
    return {"content": content, "shape": list(a.shape)}


def answers(reference, info: ModelInfo, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return [_unbatched(info, reference.infer(info.name, _batched(info, r))) for r in requests]


def _perturbed_copy(repository: Path, models: dict[str, ModelInfo], names: list[str], dest: Path,
                    seed: int) -> int:
    """Copy ``repository`` to ``dest`` with every float initializer of the ONNX models in ``names`` perturbed;
    returns how many ONNX models were perturbed."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(repository, dest, symlinks=True)
    rng = np.random.default_rng(seed)
    n = 0
    for name in names:
        info = models[name]
        if info.kind != "onnx" or not info.versions:
            continue
        path = dest / name / str(info.versions[-1]) / info.default_model_filename
        m = onnx.load(str(path))
        changed = False
        for init in m.graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.dtype.kind != "f" or arr.size == 0:
                continue
            noisy = (arr * (1 + rng.normal(0, PERTURB_SIGMA, arr.shape))).astype(arr.dtype)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
            changed = True
        if changed:
            onnx.save(m, str(path))
            n += 1
    return n


def weak_golden(repository: Path, models: dict[str, ModelInfo], info: ModelInfo, rules: dict[str, OutputRule],
                requests: list[dict[str, np.ndarray]], expected: list[dict[str, np.ndarray]],
                reference_cls) -> str | None:
    """None when a perturbed model fails the golden check; else why the requests cannot be trusted (or could not
    be judged: the message says which)."""
    names = closure(models, info.name)
    with tempfile.TemporaryDirectory(prefix="recserve-init-") as tmp:
        dest = Path(tmp) / "repo"
        if _perturbed_copy(repository, models, names, dest, seed=1) == 0:
            return "undecided: no ONNX step with float weights to perturb, so init cannot tell whether these " \
                   "golden requests would notice a wrong model"
        ref = reference_cls(dest)
        got = answers(ref, info, requests)
    if any(compare_answer(rules, g, e) for g, e in zip(got, expected, strict=True)):
        return None
    return (f"too weak: a copy whose ONNX weights moved by {PERTURB_SIGMA:.0%} noise passes every golden request "
            "under these rules; give requests that exercise the model (--golden) or tighter rules")


def _rule_yaml(r: OutputRule) -> dict:
    if r.compare == "close":
        return {"compare": "close", "atol": r.atol, "rtol": r.rtol}
    if r.compare == "topk":
        d = {"compare": "topk", "k": r.k, "minOverlap": r.min_overlap}
        return d | ({"scores": r.scores} if r.scores else {})
    return {"compare": "exact"}


def _input_yaml(r: InputRule) -> dict:
    d: dict = {}
    if r.range is not None:
        d["range"] = list(r.range)
    elif r.values is not None:
        d["values"] = list(r.values)
    else:
        d["file"] = str(r.file)
    if r.length:
        d["length"] = list(r.length)
    if r.guessed:
        d["guessed"] = True
    return d


def init_spec(repository: Path, out: Path, golden: Mapping[str, Path] | None = None, n_requests: int =
              DEFAULT_REQUESTS, seed: int = 0, reference_cls=None) -> InitResult:
    """Write ``out`` (and ``golden/<model>.json`` beside it); refuse (SpecError) when nothing can be guarded or a
    given golden file is wrong or too weak."""
    if reference_cls is None:
        from recserve.control.spec.reference import Reference as reference_cls
    repository, out = Path(repository).resolve(), Path(out).resolve()
    golden = dict(golden or {})
    models = read_repository(repository)
    unknown = sorted(set(golden) - set(models))
    if unknown:
        raise SpecError(f"--golden {unknown[0]}=...: no model {unknown[0]!r} in {repository}")
    reference = reference_cls(repository)
    result = InitResult(out, [])
    doc_models: dict[str, dict] = {}
    gdir = out.parent / "golden"
    for name in client_facing(models):
        info = models[name]
        bad = [f"{s}: {'; '.join(models[s].unsupported)}" for s in closure(models, name) if models[s].unsupported]
        why = "; ".join(bad) or reference.why_not(name)
        if why:
            result.notes.append(f"{name}: left out: {why}")
            continue
        inputs = {}
        for t in info.inputs:
            rule, source = guess_input(models, name, t)
            inputs[t.name] = rule
            result.notes.append(f"{name}.inputs.{t.name}: guessed {_input_yaml(rule)} ({source})")
        rules = propose_outputs(info)
        if name in golden:
            reqs = [g.inputs for g in read_golden(Path(golden[name]), info)]
        else:
            reqs = [{t.name: _array(t, e[t.name]) for t in info.inputs if t.name in e}
                    for e in make_requests(info, inputs, n_requests, seed)]
        expected = answers(reference, info, reqs)
        verdict = weak_golden(repository, models, info, rules, reqs, expected, reference_cls)
        if verdict and not verdict.startswith("undecided"):
            raise SpecError(f"{name}: golden requests {verdict}")
        if verdict:
            result.notes.append(f"{name}: {verdict}")
        gdir.mkdir(parents=True, exist_ok=True)
        gfile = gdir / f"{name}.json"
        gfile.write_text(json.dumps({
            "data": [{k: _json_tensor(v) for k, v in r.items()} for r in reqs],
            "validation_data": [{k: _json_tensor(e[k]) for k in rules} for e in expected]}, indent=1) + "\n")
        doc_models[name] = {
            "sloP99Ms": DEFAULT_SLO_P99_MS,
            "inputs": {k: _input_yaml(v) for k, v in inputs.items()},
            "outputs": {k: _rule_yaml(v) for k, v in rules.items()},
            "golden": str(gfile.relative_to(out.parent)),
            "expected": "reference",
        }
        drift = propose_drift(info, rules)
        if drift:
            doc_models[name]["gates"] = {"drift": drift}
            result.notes.append(f"{name}: drift gate {drift} (a new version whose golden answers move further "
                                "from the serving version's is rolled back)")
        result.models.append(name)
    if not doc_models:
        raise SpecError(f"{repository}: no client-facing model recserve can guard: " + "; ".join(result.notes))
    header = (f"# recserve serving spec, written by recctl init from {repository}.\n"
              "# Inputs marked 'guessed: true' are init's guesses: confirm each (and remove the mark).\n"
              "# Every field: docs/bring-your-own-models.md. Check with: recctl spec validate " + out.name + "\n")
    repo_field = os.path.relpath(repository, out.parent)
    body = yaml.safe_dump({"schemaVersion": SCHEMA_VERSION, "repository": repo_field, "models": doc_models},
                          sort_keys=False, width=110)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + body)
    load_spec(out)  # what init writes must be what validate accepts
    return result
