"""The answers any Triton repository's models should give, computed outside Triton (issue 18's golden checks).

Why: a golden check compares an instance's answer with an expected one; the expected answer must never be an
instance's own (a wrong model would then agree with itself). ``Reference`` computes it from the repository's
files alone, for any user's repository, as Triton would run them:

- ONNX models: onnxruntime on CPU over ``<model>/<version>/<default_model_filename>``, with the session settings of
  recserve's embedded ONNX backend (``control/backends/onnxruntime``), outputs cast to the config's datatypes;
- Python models: the user's own ``model.py`` (``TritonPythonModel``: ``initialize``, ``execute`` with one request,
  ``finalize`` on ``close``), with ``pbstub`` standing in for ``triton_python_backend_utils``;
- ensembles: their steps in dependency order through the input/output maps, recursively.

What cannot run here is named, not guessed: ``why_not(model)`` says why (TensorRT needs a GPU, BLS calls other
models inside Triton, a backend nobody taught the reference, an ensemble step that is one of these), and
``infer`` raises ``ReferenceError`` with that reason. A request the model itself refuses (an error response,
an exception in ``execute``, an onnxruntime error) raises ``InferenceError``, as Triton answers an error.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import itertools
import json
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import model_config_pb2

from recserve.control.spec import pbstub
from recserve.control.spec.repository import ModelInfo, Step, TensorInfo, read_repository

__all__ = ["InferenceError", "Reference", "ReferenceError", "model_config_json"]

PB_UTILS = "triton_python_backend_utils"
#: sys.modules juggling (the stand-in, a model's sibling modules, sys.path) is process-wide: one model at a time.
_LOCK = threading.RLock()
_SERIAL = itertools.count()


class ReferenceError(Exception):  # noqa: A001 - the name the serving spec uses; shadows only here
    """The reference cannot compute this model's answers; ``why`` says why (and names the step of an ensemble)."""

    def __init__(self, model: str, why: str) -> None:
        super().__init__(f"no reference answer for model {model!r}: {why}")
        self.model = model
        self.why = why


class InferenceError(ValueError):
    """The model refused the request, as Triton would answer an error; ``code`` is Triton's name for it
    (INVALID_ARG, INTERNAL, ...)."""

    def __init__(self, model: str, message: str, code: str = "INVALID_ARG") -> None:
        super().__init__(f"model {model!r}: {message}")
        self.model = model
        self.message = message
        self.code = code


# ---------------------------------------------------------------------------------------------- config as Triton
def _fix_int64(descriptor: Any, value: Any) -> Any:
    """protobuf's JSON writes int64 fields as strings; Triton's model_config JSON writes numbers (dims: [16])."""
    if isinstance(value, dict) and descriptor is not None:
        out = {}
        for key, v in value.items():
            field = descriptor.fields_by_name.get(key)
            if field is None:
                out[key] = v
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                if field.message_type.GetOptions().map_entry:
                    vf = field.message_type.fields_by_name["value"]
                    out[key] = {k: _fix_int64(vf.message_type, x) if vf.message_type else _num(vf, x)
                                for k, x in v.items()}
                elif isinstance(v, list):
                    out[key] = [_fix_int64(field.message_type, x) for x in v]
                else:
                    out[key] = _fix_int64(field.message_type, v)
            else:
                out[key] = [_num(field, x) for x in v] if isinstance(v, list) else _num(field, v)
        return out
    return value


def _num(field: Any, v: Any) -> Any:
    int64 = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
             FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64)
    return int(v) if field.type in int64 and isinstance(v, str) else v


def model_config_json(cfg: model_config_pb2.ModelConfig) -> str:
    """``args["model_config"]`` as Triton's Python backend passes it: the config as JSON with proto field names,
    default fields included, int64 fields as numbers."""
    as_dict = json_format.MessageToDict(cfg, preserving_proto_field_name=True,
                                        including_default_value_fields=True)
    return json.dumps(_fix_int64(cfg.DESCRIPTOR, as_dict))


def _read_config(info: ModelInfo) -> model_config_pb2.ModelConfig:
    cfg = text_format.Parse(info.config_path.read_text(), model_config_pb2.ModelConfig())
    if not cfg.name:
        cfg.name = info.name
    return cfg


# ---------------------------------------------------------------------------------------------- tensors
def _as_datatype(array: Any, t: TensorInfo) -> np.ndarray:
    """``array`` in ``t``'s datatype; BYTES as an object array of bytes (str written as UTF-8, as Triton does)."""
    if t.datatype == "BYTES":
        a = np.asarray(array, dtype=object)
        flat = [x if isinstance(x, bytes) else x.encode("utf-8") if isinstance(x, str) else str(x).encode("utf-8")
                for x in a.reshape(-1)]
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(a.shape)
    return np.asarray(array).astype(t.numpy_dtype, copy=False)


def _check_shape(model: str, t: TensorInfo, array: np.ndarray, batched: bool, max_batch: int) -> None:
    shape = array.shape[1:] if batched else array.shape
    if batched and (array.ndim == 0 or not 1 <= array.shape[0] <= max_batch):
        raise InferenceError(model, f"input {t.name!r}: batch size {array.shape[0] if array.ndim else 0} "
                                    f"outside 1..{max_batch} (shape {list(array.shape)})")
    if len(shape) != len(t.dims) or any(d != -1 and d != s for d, s in zip(t.dims, shape, strict=True)):
        want = ([-1] if batched else []) + list(t.dims)
        raise InferenceError(model, f"input {t.name!r}: shape {list(array.shape)} does not match {want}")


# ---------------------------------------------------------------------------------------------- python steps
def _sibling_names(vdir: Path) -> set[str]:
    """Module names a model.py could import from beside itself (and would clash with another version's)."""
    return {p.stem for p in vdir.glob("*.py")} | {p.name for p in vdir.iterdir() if (p / "__init__.py").is_file()}


def _bls_or_decoupled(vdir: Path, model: str, version: int) -> str | None:
    """A reason when a .py file of the version calls other models (BLS) or sends decoupled responses."""
    for path in sorted(vdir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, OSError) as exc:
            return f"{model}/{version}/{path.relative_to(vdir)} cannot be read as Python: {exc}"
        for node in ast.walk(tree):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            where = f"{model}/{version}/{path.relative_to(vdir)} line {getattr(node, 'lineno', '?')}"
            if name == "InferenceRequest":
                return (f"{where} calls another model through pb_utils.InferenceRequest (BLS), which runs only "
                        f"inside Triton; the reference cannot reproduce it")
            if name == "get_response_sender":
                return f"{where} sends decoupled responses (get_response_sender); the reference expects one answer"
    return None


class _PythonModel:
    """One loaded ``model.py``: its module, the sibling modules it imported and its ``TritonPythonModel``."""

    def __init__(self, info: ModelInfo, version: int, cfg: model_config_pb2.ModelConfig) -> None:
        self.info = info
        self.version = version
        self.vdir = info.version_dir(version)
        self.own: dict[str, ModuleType] = {}
        path = self.vdir / (info.default_model_filename or "model.py")
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        safe = "".join(c if c.isalnum() else "_" for c in f"{info.name}_{version}")
        self.module_name = f"recserve_spec_ref_{safe}_{next(_SERIAL)}"
        spec = importlib.util.spec_from_file_location(self.module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        with self.context():
            sys.modules[self.module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(self.module_name, None)
                raise
            if not hasattr(module, "TritonPythonModel"):
                raise ImportError(f"{path} defines no TritonPythonModel")
            self.instance = module.TritonPythonModel()
            if hasattr(self.instance, "initialize"):
                self.instance.initialize({
                    "model_config": model_config_json(cfg),
                    "model_instance_kind": "CPU",
                    "model_instance_name": f"{info.name}_0_0",
                    "model_instance_device_id": "0",
                    "model_repository": str(info.config_path.parent),
                    "model_version": str(version),
                    "model_name": info.name,
                })
        self.module = module

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The stand-in as ``triton_python_backend_utils``, the version dir on sys.path, and this model's own
        sibling modules under their bare names (``import shaping``) - all put back afterwards, so two models or
        two versions with a ``shaping.py`` each never see each other's."""
        with _LOCK:
            names = _sibling_names(self.vdir) | set(self.own) | {PB_UTILS}
            saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
            sys.modules[PB_UTILS] = pbstub  # type: ignore[assignment]
            sys.modules.update(self.own)
            path_before = list(sys.path)
            sys.path.insert(0, str(self.vdir))
            before = set(sys.modules)
            try:
                yield
            finally:
                root = str(self.vdir.resolve())
                for n in set(sys.modules) - before:
                    f = getattr(sys.modules[n], "__file__", None) or ""
                    if n != self.module_name and f and str(Path(f).resolve()).startswith(root):
                        self.own[n] = sys.modules[n]
                for n in set(self.own) | {PB_UTILS}:
                    sys.modules.pop(n, None)
                sys.modules.update(saved)
                sys.path[:] = path_before

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = self.info.name
        request = pbstub.make_request(inputs, [t.name for t in self.info.outputs], model=name)
        try:
            with self.context():
                responses = self.instance.execute([request])
        except pbstub.NotSupportedOutsideTriton as exc:
            raise ReferenceError(name, str(exc)) from None
        except Exception as exc:  # Triton answers every request of the batch with this error
            raise InferenceError(name, f"execute raised {type(exc).__name__}: {exc}", "INTERNAL") from exc
        if not isinstance(responses, list | tuple) or len(responses) != 1:
            n = len(responses) if isinstance(responses, list | tuple) else type(responses).__name__
            raise InferenceError(name, f"execute returned {n} responses for 1 request", "INTERNAL")
        (response,) = responses
        if response.has_error():
            err = response.error()
            raise InferenceError(name, err.message(), pbstub.TritonError.CODE_NAMES.get(err.code(), "UNKNOWN"))
        return {t.name(): t.as_numpy() for t in response.output_tensors()}

    def finalize(self) -> None:
        if hasattr(self.instance, "finalize"):
            with self.context():
                self.instance.finalize()


# ---------------------------------------------------------------------------------------------- the reference
class Reference:
    """Expected answers of a repository's models on given versions, computed outside Triton.

    ``versions``: model -> version; models not named (or ``versions`` None) use their latest version on disk, as
    Triton serves by default. An ensemble step with an explicit ``model_version`` uses that version.
    ``threads``: onnxruntime intra-op threads where the config sets no ``intra_op_thread_count``.
    """

    def __init__(self, repository: Path, versions: Mapping[str, int] | None = None, threads: int = 1) -> None:
        self.repository = Path(repository)
        self.models = read_repository(self.repository)
        unknown = sorted(set(versions or {}) - set(self.models))
        if unknown:
            raise ValueError(f"versions name models not in {self.repository}: {unknown}")
        self._pinned = {m: int(v) for m, v in (versions or {}).items()}
        self.threads = threads
        self._configs: dict[str, model_config_pb2.ModelConfig] = {}
        self._sessions: dict[tuple[str, int], Any] = {}
        self._python: dict[tuple[str, int], _PythonModel] = {}
        self._why: dict[tuple[str, int], str | None] = {}

    # -------------------------------------------------------------------------------- versions
    def version(self, model: str) -> int:
        """The version the reference runs of ``model``: pinned, else the latest on disk (-1: none on disk)."""
        if model in self._pinned:
            return self._pinned[model]
        on_disk = self.models[model].versions
        return on_disk[-1] if on_disk else -1

    @property
    def versions(self) -> dict[str, int]:
        """The version of every non-ensemble model that has one, as the reference runs them."""
        return {m: self.version(m) for m, i in self.models.items() if i.kind != "ensemble" and self.version(m) >= 0}

    def _step_version(self, step: Step) -> int:
        return step.version if step.version >= 0 else self.version(step.model)

    def config(self, model: str) -> model_config_pb2.ModelConfig:
        if model not in self._configs:
            self._configs[model] = _read_config(self.models[model])
        return self._configs[model]

    # -------------------------------------------------------------------------------- what can run
    def why_not(self, model: str) -> str | None:
        """None when the reference can compute ``model``'s answers, else why not (in words)."""
        if model not in self.models:
            return f"no model {model!r} in {self.repository}"
        return self._why_not(model, self.version(model), ())

    def reasons(self) -> dict[str, str | None]:
        """``why_not`` of every model of the repository."""
        return {m: self.why_not(m) for m in self.models}

    def _why_not(self, model: str, version: int, seen: tuple[str, ...]) -> str | None:
        key = (model, version)
        if key not in self._why:
            self._why[key] = self._find_why_not(model, version, seen)
        return self._why[key]

    def _find_why_not(self, model: str, version: int, seen: tuple[str, ...]) -> str | None:
        info = self.models[model]
        if info.unsupported:
            return "; ".join(info.unsupported)
        if info.kind == "ensemble":
            if model in seen:
                return f"ensemble {model!r} contains itself ({' -> '.join((*seen, model))})"
            for step in info.steps:
                why = self._why_not(step.model, self._step_version(step), (*seen, model))
                if why:
                    return f"step {step.model!r}: {why}"
            return None
        if info.kind == "tensorrt":
            return "a TensorRT engine (model.plan) needs a GPU and runs only where it was built; no CPU reference"
        if info.kind not in ("onnx", "python"):
            return f"backend {info.kind!r}: the reference runs onnxruntime, python and ensemble models only"
        if version not in info.versions:
            return f"version {version} of {model!r} is not on disk (on disk: {list(info.versions)})"
        path = info.version_dir(version) / info.default_model_filename
        if not path.is_file():
            return f"{model}/{version}/{info.default_model_filename} does not exist"
        if info.kind == "python":
            static = _bls_or_decoupled(info.version_dir(version), model, version)
            if static:
                return static
        try:  # loading is the last check: an import that fails outside Triton, an ONNX file onnxruntime refuses
            self._session(model, version) if info.kind == "onnx" else self._python_model(model, version)
        except ReferenceError as exc:
            return exc.why
        except Exception as exc:
            what = "onnxruntime cannot load it" if info.kind == "onnx" else "model.py cannot run outside Triton"
            return f"{what}: {type(exc).__name__}: {exc}"
        return None

    # -------------------------------------------------------------------------------- loading
    def _session(self, model: str, version: int) -> Any:
        key = (model, version)
        if key not in self._sessions:
            import onnxruntime as ort

            info = self.models[model]
            params = self.config(model).parameters

            def param(name: str, default: str) -> str:
                return params[name].string_value if name in params else default

            # the settings of recserve's embedded ONNX backend (control/backends/onnxruntime/model.py)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = int(param("intra_op_thread_count", str(self.threads)))
            opts.inter_op_num_threads = int(param("inter_op_thread_count", "1"))
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            path = info.version_dir(version) / info.default_model_filename
            session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            graph_in = {i.name for i in session.get_inputs()}
            graph_out = {o.name for o in session.get_outputs()}
            cfg_in, cfg_out = {t.name for t in info.inputs}, {t.name for t in info.outputs}
            if not cfg_in <= graph_in or not cfg_out <= graph_out:
                raise ReferenceError(model, f"config inputs {sorted(cfg_in)} / outputs {sorted(cfg_out)} do not "
                                            f"match {path.name}: inputs {sorted(graph_in)} / outputs "
                                            f"{sorted(graph_out)}")
            self._sessions[key] = session
        return self._sessions[key]

    def _python_model(self, model: str, version: int) -> _PythonModel:
        key = (model, version)
        if key not in self._python:
            self._python[key] = _PythonModel(self.models[model], version, self.config(model))
        return self._python[key]

    # -------------------------------------------------------------------------------- answers
    def infer(self, model: str, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``model``'s outputs (every output of its config) for ``inputs``: with the batch dimension first when
        its ``max_batch_size`` > 0, without when 0. ReferenceError when the reference cannot run it,
        InferenceError when the model refuses the request."""
        if model not in self.models:
            raise ReferenceError(model, f"no model {model!r} in {self.repository}")
        return self._infer(model, self.version(model), dict(inputs), ())

    def _infer(self, model: str, version: int, inputs: dict[str, Any], seen: tuple[str, ...]) -> dict[str, np.ndarray]:
        why = self._why_not(model, version, seen)
        if why:
            raise ReferenceError(model, why)
        info = self.models[model]
        feeds = self._inputs(info, inputs)
        if info.kind == "ensemble":
            raw = self._ensemble(info, feeds, (*seen, model))
        elif info.kind == "onnx":
            raw = self._onnx(info, version, feeds)
        else:
            raw = self._python_model(model, version).execute(feeds)
        missing = [t.name for t in info.outputs if t.name not in raw]
        if missing:
            raise InferenceError(model, f"gave no output {missing} (its config declares them)", "INTERNAL")
        return {t.name: _as_datatype(raw[t.name], t) for t in info.outputs}

    def _inputs(self, info: ModelInfo, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """The request checked as Triton checks it (names, required inputs, shapes) and in the config's types;
        a config ``reshape`` applied to what a non-ensemble model sees."""
        known = {t.name: t for t in info.inputs}
        unknown = sorted(set(inputs) - set(known))
        if unknown:
            raise InferenceError(info.name, f"unexpected inputs {unknown} (the model takes {sorted(known)})")
        missing = sorted(n for n, t in known.items() if not t.optional and n not in inputs)
        if missing:
            raise InferenceError(info.name, f"missing required inputs {missing}")
        batched = info.max_batch_size > 0
        reshape = {t.name: tuple(t.reshape.shape) for t in self.config(info.name).input if t.HasField("reshape")}
        out = {}
        for name, value in inputs.items():
            t = known[name]
            array = _as_datatype(value, t)
            _check_shape(info.name, t, array, batched, info.max_batch_size)
            if name in reshape and info.kind != "ensemble":
                array = array.reshape(((array.shape[0],) if batched else ()) + reshape[name])
            out[name] = array
        return out

    def _onnx(self, info: ModelInfo, version: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [t.name for t in info.outputs]
        try:
            outputs = self._session(info.name, version).run(names, feeds)
        except Exception as exc:  # onnxruntime raises its own types, as the served backend answers them
            raise InferenceError(info.name, f"onnxruntime: {exc}") from exc
        return dict(zip(names, outputs, strict=True))

    def _ensemble(self, info: ModelInfo, feeds: dict[str, np.ndarray], seen: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Each step once all its mapped tensors exist (an optional ensemble input the request left out counts as
        there, and the step gets no such input), in the config's order among the ready ones."""
        tensors = dict(feeds)
        absent = {t.name for t in info.inputs if t.optional and t.name not in feeds}
        pending = list(info.steps)
        while pending:
            step = next((s for s in pending if all(v in tensors or v in absent for v in s.input_map.values())), None)
            if step is None:
                waits = {s.model: sorted(v for v in s.input_map.values() if v not in tensors) for s in pending}
                raise InferenceError(info.name, f"unexpected deadlock: steps wait for tensors no step produces: "
                                                f"{waits}")
            pending.remove(step)
            step_in = {k: tensors[v] for k, v in step.input_map.items() if v in tensors}
            out = self._infer(step.model, self._step_version(step), step_in, seen)
            for k, v in step.output_map.items():
                if k not in out:
                    raise InferenceError(info.name, f"step {step.model!r} has no output {k!r}", "INTERNAL")
                tensors[v] = out[k]
        return {t.name: tensors[t.name] for t in info.outputs}

    # -------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """``finalize`` every Python model loaded (errors in one do not stop the others)."""
        models, self._python = list(self._python.values()), {}
        self._why = {k: v for k, v in self._why.items() if self.models[k[0]].kind != "python"}
        for m in models:
            with contextlib.suppress(Exception):
                m.finalize()

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
