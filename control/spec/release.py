"""``recctl release MODEL --onnx PATH``: a NEW version of a user's ONNX model, checked before it exists.

What is checked before the version is written (a refusal names the file and the rule, and writes nothing):
onnxruntime loads the file; every input and output the model's ``config.pbtxt`` declares is in the graph with the
same element type and compatible dims (the batch dimension first when the model batches). Then the version is
published atomically with a manifest (sha256 per file, the source path, the checks), and the reference outside
Triton answers every golden request of every spec model that uses it, on the new version: a model that loads but
cannot answer is refused and its version removed. The drift of those answers from the current version's is
reported by the spec's drift gate, as the rollout will judge it.

TensorRT engines are not built here: they need the GPU and the TensorRT version that serve them (``make
build-engines`` on a GPU host); a release never marks one tested.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recserve.control.spec.repository import ModelInfo, read_repository
from recserve.control.spec.spec import ServingSpec, SpecError

#: onnxruntime's type strings for the config's datatypes.
ORT_TYPES = {"BOOL": "tensor(bool)", "UINT8": "tensor(uint8)", "INT8": "tensor(int8)", "INT16": "tensor(int16)",
             "INT32": "tensor(int32)", "INT64": "tensor(int64)", "FP16": "tensor(float16)",
             "FP32": "tensor(float)", "FP64": "tensor(double)", "BYTES": "tensor(string)"}


@dataclass
class Release:
    model: str
    version: int
    path: Path
    checked: list[str] = field(default_factory=list)
    drift: dict[str, dict] = field(default_factory=dict)  # spec model -> {value, min, compare, passes}


def check_onnx(onnx_path: Path, info: ModelInfo) -> list[str]:
    """What was checked, one line each; raises SpecError naming the mismatch."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        raise SpecError(f"{onnx_path}: onnxruntime cannot load it: {str(exc)[:300]}") from None
    lead = 1 if info.max_batch_size > 0 else 0
    checked = [f"{onnx_path.name} loads in onnxruntime {ort.__version__}"]
    for kind, declared, actual in (("input", info.inputs, sess.get_inputs()), ("output", info.outputs,
                                                                             sess.get_outputs())):
        graph = {a.name: a for a in actual}
        for t in declared:
            a = graph.get(t.name)
            if a is None:
                raise SpecError(f"{onnx_path}: the config's {kind} {t.name!r} is not in the graph "
                                f"({kind}s: {', '.join(graph)})")
            if a.type != ORT_TYPES.get(t.datatype):
                raise SpecError(f"{onnx_path}: {kind} {t.name!r} is {a.type}, the config says {t.datatype}")
            dims = list(a.shape)[lead:]
            if len(dims) != len(t.dims) or any(isinstance(g, int) and c != -1 and g != c
                                               for g, c in zip(dims, t.dims, strict=True)):
                raise SpecError(f"{onnx_path}: {kind} {t.name!r} has dims {list(a.shape)}, the config says "
                                f"{list(t.dims)}" + (" after the batch dimension" if lead else ""))
        checked.append(f"{len(declared)} {kind}(s) match config.pbtxt: {', '.join(t.name for t in declared)}")
    return checked


def release(repository: Path, model: str, onnx_path: Path, spec: ServingSpec | None = None,
            reference_cls=None) -> Release:
    """Publish ``onnx_path`` as the next version of ``model``; see the module docstring for the checks."""
    from recserve.build.manifest import publish_version

    if reference_cls is None:
        from recserve.control.spec.reference import Reference as reference_cls
    repository = Path(repository).resolve()
    models = read_repository(repository)
    if model not in models:
        raise SpecError(f"no model {model!r} in {repository} (models: {', '.join(sorted(models))})")
    info = models[model]
    if info.kind != "onnx":
        raise SpecError(f"{model} is a {info.kind} model: recctl release writes ONNX versions (TensorRT engines are "
                        "built on a GPU host by make build-engines)")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise SpecError(f"--onnx {onnx_path}: no such file")
    checked = check_onnx(onnx_path, info)
    current = max(info.versions) if info.versions else None
    vdir = publish_version(repository, model, {info.default_model_filename: onnx_path},
                           {"source": str(onnx_path.resolve()), "released_by": "recctl release",
                            "checks": checked, "tensorrt": "not built (needs a GPU host)"})
    version = int(vdir.name)
    rel = Release(model, version, vdir, checked)
    if spec is None:
        return rel
    try:
        for name, m in spec.models.items():
            if model not in m.steps:
                continue
            _golden_on(rel, name, m, repository, current, reference_cls)
    except SpecError:
        shutil.rmtree(vdir, ignore_errors=True)
        raise
    return rel


def _golden_on(rel: Release, name: str, m, repository: Path, current: int | None, reference_cls) -> None:
    """The reference answers every golden request of ``name`` on the new version; drift from the current one."""
    from recserve.control.spec.compare import batched, drift_of, unbatched

    new_ref = reference_cls(repository, {rel.model: rel.version})
    try:
        new = [unbatched(m, new_ref.infer(name, batched(m, g.inputs))) for g in m.golden]
    except Exception as exc:  # noqa: BLE001 - any failure means the version cannot answer
        raise SpecError(f"{rel.model} version {rel.version} cannot answer {name}'s golden requests through the "
                        f"reference: {str(exc)[:300]}") from None
    rel.checked.append(f"the reference answers {len(new)} golden request(s) of {name} on version {rel.version}")
    if current is None:
        return
    old_ref = reference_cls(repository, {rel.model: current})
    old = [unbatched(m, old_ref.infer(name, batched(m, g.inputs))) for g in m.golden]
    value, minimum = drift_of(m, list(zip(old, new, strict=True)), 0.0)
    rule = m.gates.drift.compare if m.gates.drift else "comparison rules"
    rel.drift[name] = {"from_version": current, "value": round(float(value), 4), "min": minimum, "by": rule,
                       "passes": bool(np.isfinite(value) and value >= minimum)}
