"""The served ensembles' request contract, for servers other than Triton that answer in their place.

Why: the fallback server (``control/fallback/app.py``) must refuse exactly what the real ``recommend`` and
``search`` ensembles refuse, with the same status and the same words, so a client cannot tell a refusal by the
fallback from one by Triton. Two sources, neither copied:

- the ensembles' ``config.pbtxt`` (inputs, data types, dims, optional inputs, max batch), parsed with Triton's own
  ``ModelConfig`` protobuf; the checks on them reproduce the texts Triton 2.51 writes;
- the model repository's numpy rule modules that the served Python steps import (``recommend_pre/1/shaping.py``,
  ``search_pre/1/tokenizer.py``), imported here by path: this is the ONE place outside the model repository that
  imports them.

One deliberate difference: a ``search`` request without ``query`` gets Triton's "missing required input(s)" text
here, where Triton 2.51 answers "unexpected deadlock" from inside the ensemble (both INVALID_ARGUMENT).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from recserve.control.runtime.triton import DEFAULT_REPOSITORY

__all__ = ["CONTRACT_MODELS", "EnsembleSpec", "InputSpec", "RequestError", "load_specs", "rules", "spec_of", "validate"]

#: The ensembles whose contract this module serves, and the kind of answer each wants (the TensorRT twins take
#: the same requests as the ONNX ensembles).
CONTRACT_MODELS = {"recommend": "recommend", "search": "search", "recommend_trt": "recommend", "search_trt": "search"}
#: The rule module beside each served Python step (the very files ``model.py`` imports).
RULE_FILES = {"shaping": ("recommend_pre", "shaping.py"), "tokenizer": ("search_pre", "tokenizer.py")}
_SHAPE_NOTE = (
    " NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to be prepended to "
    "each input shape. If you want to specify the full shape including the batch dim in your input dims config, "
    "try setting max_batch_size to zero. See the model configuration docs for more info on max_batch_size."
)


class RequestError(ValueError):
    """A refused request: ``code`` is the gRPC status name (INVALID_ARGUMENT, NOT_FOUND), the message Triton's."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return {"NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429}.get(self.code, 400)


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str  # KServe name: INT64, BYTES, ...
    dims: tuple[int, ...]  # without the batch dimension
    optional: bool


@dataclass(frozen=True)
class EnsembleSpec:
    """What a request to one model (an ensemble, or any model a serving spec names) must look like, from its
    config.pbtxt; ``max_batch_size`` 0: the dims are the whole shape, no batch dimension."""

    name: str
    max_batch_size: int
    inputs: tuple[InputSpec, ...]
    outputs: tuple[InputSpec, ...]
    platform: str = "ensemble"

    def metadata(self) -> dict:
        """KServe v2 model metadata, as Triton writes it."""

        def tensor(t: InputSpec) -> dict:
            return {
                "name": t.name,
                "datatype": t.datatype,
                "shape": [-1, *t.dims] if self.max_batch_size > 0 else list(t.dims),
            }

        return {
            "name": self.name,
            "versions": ["1"],
            "platform": self.platform,
            "inputs": [tensor(t) for t in self.inputs],
            "outputs": [tensor(t) for t in self.outputs],
        }


def _kserve_type(data_type: int) -> str:
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    return {"STRING": "BYTES"}.get(name, name)


def _tensor_spec(t) -> InputSpec:
    return InputSpec(t.name, _kserve_type(t.data_type), tuple(int(d) for d in t.dims), bool(getattr(t, "optional", 0)))


@functools.cache
def load_specs(repository: Path = DEFAULT_REPOSITORY) -> dict[str, EnsembleSpec]:
    """The contract of every model of CONTRACT_MODELS the repository has, parsed from its config.pbtxt."""
    specs = {}
    for name in CONTRACT_MODELS:
        path = Path(repository) / name / "config.pbtxt"
        if not path.is_file():
            continue
        cfg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        specs[name] = EnsembleSpec(
            name=cfg.name,
            max_batch_size=int(cfg.max_batch_size),
            inputs=tuple(_tensor_spec(t) for t in cfg.input),
            outputs=tuple(_tensor_spec(t) for t in cfg.output),
        )
    return specs


#: Triton's metadata ``platform`` by the kind control/spec/repository.py reads from a config.
_PLATFORMS = {"ensemble": "ensemble", "onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "python": "python"}


def spec_of(info) -> EnsembleSpec:
    """The request contract of any model, from control/spec/repository.py's ``ModelInfo`` (same config.pbtxt)."""

    def tensor(t) -> InputSpec:
        return InputSpec(t.name, t.datatype, tuple(t.dims), bool(t.optional))

    return EnsembleSpec(
        name=info.name,
        max_batch_size=int(info.max_batch_size),
        inputs=tuple(tensor(t) for t in info.inputs),
        outputs=tuple(tensor(t) for t in info.outputs),
        platform=_PLATFORMS.get(info.kind, info.kind),
    )


@functools.cache
def rules(repository: Path = DEFAULT_REPOSITORY) -> dict[str, ModuleType]:
    """The model repository's rule modules by short name ("shaping", "tokenizer"), imported from their files."""
    out = {}
    for short, (step, filename) in RULE_FILES.items():
        path = Path(repository) / step / "1" / filename
        spec = importlib.util.spec_from_file_location(f"recserve_served_{step}_{short}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out[short] = mod
    return out


#: A decoded request input: (KServe datatype, full shape with the batch dimension, numpy array of that shape).
Tensor = tuple[str, tuple[int, ...], np.ndarray]


def _names(names) -> str:
    return "[" + ",".join(f"'{n}'" for n in names) + "]"


def validate(spec: EnsembleSpec, tensors: dict[str, Tensor], request_id: str = "") -> int:
    """Refuse (RequestError) what Triton would refuse before the ensemble runs; return the batch size.

    Order and texts follow Triton 2.51's request validation: input count, unknown inputs, batch size, data type,
    shape (inputs in name order)."""
    rid = f"[request id: {request_id or '<id_unknown>'}] "
    expected = {t.name: t for t in spec.inputs}
    required = [t.name for t in spec.inputs if not t.optional]
    got = sorted(tensors)
    missing = [n for n in required if n not in tensors]
    if len(got) > len(expected) or len(got) < len(required) or missing:
        raise RequestError(
            "INVALID_ARGUMENT",
            f"{rid}expected {len(expected)} inputs but got {len(got)} inputs for model '{spec.name}'. "
            f"Got input(s) {_names(got)}, but missing required input(s) {_names(missing) if missing else ']'}. "
            "Please provide all required input(s).",
        )
    batch = None
    batching = spec.max_batch_size > 0
    for name in got:
        if name not in expected:
            raise RequestError("INVALID_ARGUMENT", f"{rid}unexpected inference input '{name}' for model '{spec.name}'")
        if not batching:  # no batch dimension: the dims are the whole shape
            continue
        shape = tensors[name][1]
        if not shape:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"{rid}input '{name}' has no shape but model requires batch dimension for '{spec.name}'",
            )
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise RequestError(
                "INVALID_ARGUMENT", f"{rid}input '{name}' batch size does not match other inputs for '{spec.name}'"
            )
    if batch is not None and batch > spec.max_batch_size:
        raise RequestError(
            "INVALID_ARGUMENT", f"{rid}inference request batch-size must be <= {spec.max_batch_size} for '{spec.name}'"
        )
    for name in got:
        want, (datatype, shape, _) = expected[name], tensors[name]
        if datatype != want.datatype:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"{rid}inference input '{name}' data-type is '{datatype}', but model '{spec.name}' "
                f"expects '{want.datatype}'",
            )
        dims = shape[1:] if batching else shape
        if len(dims) != len(want.dims) or any(w != -1 and w != d for w, d in zip(want.dims, dims, strict=True)):
            exp = ",".join(str(d) for d in ((-1, *want.dims) if batching else want.dims))
            raise RequestError(
                "INVALID_ARGUMENT",
                f"{rid}unexpected shape for input '{name}' for model '{spec.name}'. "
                f"Expected [{exp}], got [{','.join(str(d) for d in shape)}].{_SHAPE_NOTE if batching else ''}",
            )
    return int(batch or 0)


def recommend_rows(
    tensors: dict[str, Tensor], repository: Path = DEFAULT_REPOSITORY, ensemble: str = "recommend"
) -> np.ndarray:
    """The history rows of a validated recommend request, after recommend_pre's own rules (RequestError)."""
    user_id, history = tensors["user_id"][2], tensors["history"][2]
    problem = rules(repository)["shaping"].check(user_id, history)
    if problem:
        raise RequestError("INVALID_ARGUMENT", f"in ensemble '{ensemble}', {problem}")
    return history


def search_queries(
    tensors: dict[str, Tensor], repository: Path = DEFAULT_REPOSITORY, ensemble: str = "search"
) -> list[list[str]]:
    """The words of each query of a validated search request, after search_pre's own rules (RequestError)."""
    tok = rules(repository)["tokenizer"]
    raw = [q if isinstance(q, bytes) else str(q).encode() for q in tensors["query"][2].reshape(-1)]
    users = tensors["user_id"][2].reshape(-1).tolist() if "user_id" in tensors else None
    try:
        tok.search_inputs(raw, users)
    except ValueError as exc:
        raise RequestError("INVALID_ARGUMENT", f"in ensemble '{ensemble}', {exc}") from None
    return [tok.tokenize(q.decode("utf-8")) for q in raw]
