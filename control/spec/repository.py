"""A Triton model repository read as data: each model's config, tensors, ensemble steps and versions on disk.

The one reader of ``config.pbtxt`` for the serving spec, its reference and ``recctl init``: what Triton already
knows (names, datatypes, dims, ``max_batch_size``, ensemble wiring) is never asked of the user again. A model
recserve cannot guard yet is not dropped: it is read, and ``unsupported`` says why (sequence batching, decoupled
transactions), so the spec can refuse it by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

#: KServe v2 datatypes by numpy dtype name; BYTES is numpy's object arrays of bytes.
NUMPY_OF = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
            "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
            "FP32": "float32", "FP64": "float64", "BYTES": "object"}


class RepositoryReadError(ValueError):
    """A repository or config that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    """One input or output as the config declares it; ``dims`` exclude the batch dimension (-1: any size)."""

    name: str
    datatype: str  # KServe v2 name: FP32, INT64, BYTES, ...
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def numpy_dtype(self) -> str:
        return NUMPY_OF[self.datatype]


@dataclass(frozen=True)
class Step:
    """One ensemble step: ``input_map`` is step input -> ensemble tensor, ``output_map`` step output -> tensor."""

    model: str
    version: int  # -1: the latest version the server loaded
    input_map: dict[str, str]
    output_map: dict[str, str]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # "ensemble", "onnx", "python", "tensorrt" or the backend's own name
    max_batch_size: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    steps: tuple[Step, ...]
    versions: tuple[int, ...]  # numeric version directories on disk, ascending
    default_model_filename: str
    unsupported: tuple[str, ...]  # why recserve cannot guard this model yet; empty when it can
    config_path: Path

    def input(self, name: str) -> TensorInfo:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def output(self, name: str) -> TensorInfo:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def version_dir(self, version: int) -> Path:
        return self.config_path.parent / str(version)


def datatype(data_type: int) -> str:
    """``TYPE_FP32`` -> ``FP32``; Triton's ``TYPE_STRING`` is KServe's ``BYTES``."""
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    return {"STRING": "BYTES"}.get(name, name)


def _tensor(t) -> TensorInfo:
    # ``dims`` is the client-facing shape (a ``reshape`` is what the model sees)
    return TensorInfo(t.name, datatype(t.data_type), tuple(int(d) for d in t.dims), bool(getattr(t, "optional", False)))


def _kind(cfg) -> str:
    platform, backend = cfg.platform, cfg.backend
    if platform == "ensemble":
        return "ensemble"
    if backend == "onnxruntime" or platform == "onnxruntime_onnx":
        return "onnx"
    if backend == "tensorrt" or platform == "tensorrt_plan":
        return "tensorrt"
    return backend or platform or "unknown"


def _unsupported(cfg) -> tuple[str, ...]:
    why = []
    if cfg.HasField("sequence_batching"):
        why.append("sequence batching (stateful models): recserve's probes and golden requests are stateless")
    if cfg.HasField("model_transaction_policy") and cfg.model_transaction_policy.decoupled:
        why.append("decoupled transactions (zero or many responses per request): golden checks expect one answer")
    return tuple(why)


DEFAULT_FILENAMES = {"onnx": "model.onnx", "tensorrt": "model.plan", "python": "model.py"}


def read_model(config_path: Path) -> ModelInfo:
    """One model from its ``config.pbtxt``; the name defaults to the directory's, as in Triton."""
    try:
        cfg = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    except OSError as exc:
        raise RepositoryReadError(f"{config_path}: cannot read: {exc.strerror or exc}") from None
    except text_format.ParseError as exc:
        raise RepositoryReadError(f"{config_path}: not a Triton model config: {exc}") from None
    name = cfg.name or config_path.parent.name
    if name != config_path.parent.name:
        raise RepositoryReadError(f"{config_path}: name {name!r} differs from its directory "
                                  f"{config_path.parent.name!r} (Triton refuses that)")
    kind = _kind(cfg)
    steps = tuple(Step(s.model_name, int(s.model_version), dict(s.input_map), dict(s.output_map))
                  for s in cfg.ensemble_scheduling.step)
    versions = tuple(sorted(int(p.name) for p in config_path.parent.iterdir() if p.is_dir() and p.name.isdigit()))
    return ModelInfo(
        name=name, kind=kind, max_batch_size=int(cfg.max_batch_size),
        inputs=tuple(_tensor(t) for t in cfg.input), outputs=tuple(_tensor(t) for t in cfg.output),
        steps=steps, versions=versions,
        default_model_filename=cfg.default_model_filename or DEFAULT_FILENAMES.get(kind, ""),
        unsupported=_unsupported(cfg), config_path=config_path)


def read_repository(path: Path) -> dict[str, ModelInfo]:
    """Every model directory with a ``config.pbtxt`` under ``path``, by name."""
    path = Path(path)
    if not path.is_dir():
        raise RepositoryReadError(f"{path}: not a directory (a Triton model repository is a folder of models)")
    models = {p.parent.name: read_model(p) for p in sorted(path.glob("*/config.pbtxt"))}
    if not models:
        raise RepositoryReadError(f"{path}: no */config.pbtxt: not a Triton model repository")
    for m in models.values():
        for s in m.steps:
            if s.model not in models:
                raise RepositoryReadError(f"{m.config_path}: ensemble step names model {s.model!r}, "
                                          f"which is not in {path}")
    return models


def closure(models: dict[str, ModelInfo], name: str) -> list[str]:
    """``name`` and every model its ensemble steps use, transitively, in first-use order."""
    seen: list[str] = []

    def walk(n: str) -> None:
        if n in seen:
            return
        seen.append(n)
        for s in models[n].steps:
            walk(s.model)

    walk(name)
    return seen
