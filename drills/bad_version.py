"""A wrong version of one ONNX step of a user's repository, for the bad-rollover drill on a serving spec.

The demo's bad version (drills/faults.py ``release_copy(wrong=True)``) appends a Neg to the ranker's float
outputs: its scores, hence its rankings, come out reversed. A user's step may have no float output (a top-k of
ids), or a wrong version that the spec's own gates cannot tell from the serving one would prove nothing. So the
generator tries, in order:

1. ``negate-last-float-initializer``: the graph's last non-zero float initializer (a table or weight of the
   model, ``onnx.numpy_helper``) negated, everything else copied;
2. ``negate-float-outputs``: the demo's method on any ONNX file name (Neg appended to every float output);

and keeps the first one whose golden answers (computed by the reference outside Triton, on the spec's golden
requests) the spec's drift rule rolls back: the same ``SpecGolden.drift`` the control plane's rollout gate runs,
with the rollout's default minimum where a model has no drift gate. When neither is caught, it refuses, saying
why, rather than roll out a version the drill could not judge.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from recserve.control.spec.spec import ServingSpec

STRATEGIES = ("negate-last-float-initializer", "negate-float-outputs")
#: The rollout's answer-overlap minimum for models without a drift gate (control/rollout/manager.py's default).
DEFAULT_MIN_OVERLAP = 0.3


class BadVersionError(RuntimeError):
    """No wrong version of this model that the spec's gates would catch can be written."""


def _negate_last_initializer(path: Path) -> str:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    for init in reversed(m.graph.initializer):
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and arr.size and np.any(arr != 0):
            init.CopyFrom(numpy_helper.from_array((-arr).astype(arr.dtype), init.name))
            onnx.save(m, str(path))
            return init.name
    raise BadVersionError(f"{path}: no non-zero float initializer to negate")


def _negate_outputs(path: Path) -> str:
    import onnx
    from onnx import helper

    m = onnx.load(str(path))
    g = m.graph
    done = []
    for out in g.output:
        if out.type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                                  onnx.TensorProto.FLOAT16):
            continue
        inner = out.name + "__drill_orig"
        for node in g.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
        g.node.append(helper.make_node("Neg", [inner], [out.name], name=out.name + "__drill_neg"))
        done.append(out.name)
    if not done:
        raise BadVersionError(f"{path}: no float output to negate")
    onnx.save(m, str(path))
    return ", ".join(done)


def caught(spec: ServingSpec, model: str, old_v: int, new_v: int, desired: dict[str, list[int]],
           reference_cls=None) -> tuple[bool, dict]:
    """Would the rollout's drift gate roll ``model`` back from ``old_v`` to ``new_v``? Judged on the reference's
    answers to every golden request of each spec model that uses ``model``; also whether the answers differ at
    all under the spec's comparison rules (else the canary could not be told apart)."""
    from recserve.control.fleet.spec_golden import SpecGolden, batched, unbatched

    if reference_cls is None:
        from recserve.control.spec.reference import Reference as reference_cls
    latest = {m: max(v) for m, v in desired.items() if v}
    old = reference_cls(spec.repository, {**latest, model: old_v})
    new = reference_cls(spec.repository, {**latest, model: new_v})
    golden = SpecGolden(spec, reference_cls=reference_cls)
    pairs = []
    for reqs in golden.request_set:
        a, b = {}, {}
        for name, m in spec.models.items():
            if model in m.steps:
                a[name] = unbatched(m, old.infer(name, batched(m, reqs[name])))
                b[name] = unbatched(m, new.infer(name, batched(m, reqs[name])))
        pairs.append((a, b))
    users = [n for n, m in spec.models.items() if model in m.steps]
    sub = ServingSpec(spec.path, spec.repository, {n: spec.models[n] for n in users}, spec.warnings)
    drift = SpecGolden(sub, reference_cls=reference_cls).drift(pairs, DEFAULT_MIN_OVERLAP)
    differs = any(golden.compare(b, _expected(a)) for a, b in pairs)
    rolled_back = any(agree < minimum for agree, minimum in drift.values())
    return rolled_back and differs, {"drift": {n: {"agreement": round(a, 4), "min": mn} for n, (a, mn) in
                                               drift.items()}, "answers_differ": differs}


def _expected(answers):
    from recserve.control.fleet.golden import SOURCE_REFERENCE, Expected

    return Expected(answers, SOURCE_REFERENCE)


def write_bad_version(spec: ServingSpec, model: str, src_v: int, new_v: int, desired: dict[str, list[int]],
                      note: str = "", reference_cls=None) -> dict:
    """Write ``model``/``new_v`` as a wrong copy of ``src_v`` (see the module's docstring); returns what was done.
    Raises BadVersionError (the directory removed) when the model is not ONNX or no strategy is caught."""
    from recserve.control.spec.repository import read_repository
    from recserve.control.state.snapshots import write_manifest

    info = read_repository(spec.repository).get(model)
    if info is None or info.kind != "onnx":
        raise BadVersionError(f"{model} is {'not in the repository' if info is None else info.kind + ' backend'}: "
                              "the bad-version generator writes wrong copies of ONNX models only")
    src, dst = spec.repository / model / str(src_v), spec.repository / model / str(new_v)
    tried = {}
    for how in STRATEGIES:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        (dst / "manifest.json").unlink(missing_ok=True)
        try:
            what = (_negate_last_initializer if how == STRATEGIES[0] else _negate_outputs)(
                dst / info.default_model_filename)
            write_manifest(dst, {"built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "note": f"{note}: {how} ({what}) of v{src_v}"})
            ok, detail = caught(spec, model, src_v, new_v, desired, reference_cls)
        except BadVersionError as exc:
            tried[how] = str(exc)
            continue
        if ok:
            return {"strategy": how, "changed": what, "predicted": detail, "tried": tried}
        tried[how] = f"not caught by the spec's gates: {detail}"
    shutil.rmtree(dst, ignore_errors=True)
    raise BadVersionError(f"no wrong version of {model} that the spec's gates would roll back: {tried}")
