"""A stand-in for ``triton_python_backend_utils`` so a user's ``model.py`` runs outside Triton.

Why: the serving spec's reference (``reference.py``) computes the answers a Python step should give by running the
user's own ``model.py``, not a copy of its logic. Inside Triton, ``triton_python_backend_utils`` is a module the
backend stub fills with C++ types; outside it, this module offers the same names with plain Python behind them.
``reference.py`` puts it in ``sys.modules["triton_python_backend_utils"]`` only while it imports or runs a model.

What a step that runs here may use: ``Tensor`` (``as_numpy``, ``name``), ``get_input_tensor_by_name``,
``get_output_tensor_by_name``, ``InferenceResponse`` (with ``error``), ``TritonError`` and its codes,
``TritonModelException``, ``get_input_config_by_name``/``get_output_config_by_name``, the type converters,
``Logger`` (no-op) and custom metrics (no-op). What it may not: BLS (``InferenceRequest(...)``, ``exec``) and
decoupled responses (``get_response_sender``): those raise ``NotSupportedOutsideTriton``, and the reference's
``why_not`` names them before anything runs.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

__all__ = [
    "BLS_UNSUPPORTED", "InferenceRequest", "InferenceResponse", "Logger", "NotSupportedOutsideTriton", "Tensor",
    "TritonError", "TritonModelException", "get_input_config_by_name", "get_input_tensor_by_name",
    "get_output_config_by_name", "get_output_tensor_by_name", "make_request", "numpy_to_triton_type",
    "triton_string_to_numpy", "triton_to_numpy_type",
]

BLS_UNSUPPORTED = ("BLS is not supported by the reference: pb_utils.InferenceRequest calls another model inside "
                   "Triton, which the reference outside Triton cannot reproduce")

TRITON_STRING_TO_NUMPY = {
    "TYPE_BOOL": bool, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}
#: Triton's DataType enum values (model_config.proto) in numpy.
_NUMPY_OF_ENUM = {1: np.bool_, 2: np.uint8, 3: np.uint16, 4: np.uint32, 5: np.uint64, 6: np.int8, 7: np.int16,
                  8: np.int32, 9: np.int64, 10: np.float16, 11: np.float32, 12: np.float64, 13: np.object_}

TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2


class NotSupportedOutsideTriton(RuntimeError):
    """A Triton feature a model used that the reference cannot reproduce (BLS, decoupled responses)."""


class TritonModelException(Exception):
    """What a model raises in ``initialize``/``execute`` to fail (Triton's own name)."""


class TritonError:
    """An error a model puts in an ``InferenceResponse``; ``code`` as Triton's Python backend numbers them."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7
    CODE_NAMES = {0: "UNKNOWN", 1: "INTERNAL", 2: "NOT_FOUND", 3: "INVALID_ARG", 4: "UNAVAILABLE",
                  5: "UNSUPPORTED", 6: "ALREADY_EXISTS", 7: "CANCELLED"}

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = str(message)
        self._code = int(code)

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, {self.CODE_NAMES.get(self._code, self._code)})"


class Tensor:
    """A named numpy array, as ``pb_utils.Tensor`` (CPU only)."""

    def __init__(self, name: str, array: Any) -> None:
        if not isinstance(array, np.ndarray):
            raise TritonModelException(f"Tensor {name!r}: expected a numpy array, got {type(array).__name__}")
        self._name = str(name)
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={self._array.shape}, dtype={self._array.dtype})"


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None,
                 parameters: Any = None) -> None:
        self._tensors = list(output_tensors or [])
        self._error = error
        self._parameters = parameters

    def output_tensors(self) -> list[Tensor]:
        return self._tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return json.dumps(self._parameters or {})


class InferenceRequest:
    """Constructing one is BLS (a call to another model inside Triton): refused. The requests handed to a
    model's ``execute`` are instances of a subclass (isinstance checks still hold)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotSupportedOutsideTriton(BLS_UNSUPPORTED)

    def exec(self, *args: Any, **kwargs: Any) -> Any:
        raise NotSupportedOutsideTriton(BLS_UNSUPPORTED)

    async def async_exec(self, *args: Any, **kwargs: Any) -> Any:
        raise NotSupportedOutsideTriton(BLS_UNSUPPORTED)


class _Request(InferenceRequest):
    """One request handed to ``execute``: the inputs the caller (or the ensemble) gave, with the batch dim."""

    def __init__(self, inputs: list[Tensor], requested_output_names: list[str], request_id: str = "",
                 model_name: str = "") -> None:  # no super().__init__: that is the BLS constructor
        self._inputs = inputs
        self._outputs = requested_output_names
        self._id = request_id
        self._model = model_name

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return list(self._outputs)

    def request_id(self) -> str:
        return self._id

    def correlation_id(self) -> int:
        return 0

    def flags(self) -> int:
        return 0

    def timeout(self) -> int:
        return 0

    def parameters(self) -> str:
        return "{}"

    def is_cancelled(self) -> bool:
        return False

    def model_name(self) -> str:
        return self._model

    def get_response_sender(self) -> Any:
        raise NotSupportedOutsideTriton("decoupled responses (get_response_sender) are not supported by the "
                                        "reference: it expects one response per request")


def make_request(inputs: dict[str, np.ndarray], outputs: list[str], request_id: str = "", model: str = "") -> _Request:
    """The request object ``execute`` receives for ``inputs`` (used by the reference)."""
    return _Request([Tensor(n, a) for n, a in inputs.items()], outputs, request_id, model)


def get_input_tensor_by_name(inference_request: Any, name: str) -> Tensor | None:
    for t in inference_request.inputs():
        if t.name() == name:
            return t
    return None


def get_output_tensor_by_name(inference_response: Any, name: str) -> Tensor | None:
    for t in inference_response.output_tensors():
        if t.name() == name:
            return t
    return None


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((t for t in model_config.get("input", []) if t["name"] == name), None)


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((t for t in model_config.get("output", []) if t["name"] == name), None)


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


def triton_string_to_numpy(triton_type_string: str) -> Any:
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def triton_to_numpy_type(data_type: int) -> Any:
    return _NUMPY_OF_ENUM.get(int(data_type))


def numpy_to_triton_type(data_type: Any) -> int | None:
    if data_type == np.bytes_:
        return 13
    for code, np_type in _NUMPY_OF_ENUM.items():
        if data_type == np_type:
            return code
    return None


def serialize_byte_tensor(input_tensor: np.ndarray) -> bytes:
    """Length-prefixed bytes, as Triton's own helper (non-bytes elements are written as UTF-8 str)."""
    import struct

    out = []
    for obj in input_tensor.reshape(-1):
        s = obj if isinstance(obj, bytes) else str(obj).encode("utf-8")
        out += [struct.pack("<I", len(s)), s]
    return b"".join(out)


def deserialize_bytes_tensor(encoded_tensor: bytes) -> np.ndarray:
    import struct

    strs, offset = [], 0
    while offset < len(encoded_tensor):
        (n,) = struct.unpack_from("<I", encoded_tensor, offset)
        offset += 4
        strs.append(bytes(encoded_tensor[offset:offset + n]))
        offset += n
    return np.array(strs, dtype=np.object_)


class Logger:
    """``pb_utils.Logger``: the reference keeps model logs quiet."""

    class LogLevel:
        INFO, WARNING, ERROR, VERBOSE = 0, 1, 2, 3

    @staticmethod
    def log(message: str, level: int = 0) -> None:
        return None

    @staticmethod
    def log_info(message: str) -> None:
        return None

    @staticmethod
    def log_warn(message: str) -> None:
        return None

    @staticmethod
    def log_error(message: str) -> None:
        return None

    @staticmethod
    def log_verbose(message: str) -> None:
        return None


class Metric:
    """A custom metric of a ``MetricFamily``: kept in memory, never exported."""

    def __init__(self, labels: dict | None = None, buckets: list | None = None) -> None:
        self._value = 0.0

    def increment(self, value: float) -> None:
        self._value += value

    def set(self, value: float) -> None:
        self._value = value

    def observe(self, value: float) -> None:
        self._value = value

    def value(self) -> float:
        return self._value


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2

    def __init__(self, name: str, description: str, kind: int) -> None:
        self.name = name

    def Metric(self, labels: dict | None = None, buckets: list | None = None) -> Metric:  # Triton's name
        return Metric(labels, buckets)
