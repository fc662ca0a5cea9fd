"""Run a serialized TensorRT engine from numpy: the one engine runner of recserve (UNTESTED ON A GPU).

Used by the Python-based ``tensorrt`` backend beside this file (copied with it into Triton's backend directory)
and by ``build/trt.py`` (engine checks against onnxruntime), so serving and the build feed engines alike.
Device memory comes from libcudart through ctypes (``nvidia-cuda-runtime-cu12``, already a recserve
dependency), so neither torch nor pycuda has to match the driver. Written against the TensorRT 10.5 Python API
(named I/O tensors, ``execute_async_v3``); it has never run on a GPU: ``tools/gpu-check`` is its first test.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

import numpy as np


def _libcuda() -> ctypes.CDLL | None:
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_gpus() -> list[str]:
    """Names of the CUDA GPUs the driver sees ([] without a driver or GPU); no CUDA toolkit needed."""
    lib = _libcuda()
    if lib is None or lib.cuInit(0) != 0:
        return []
    n = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(n)) != 0:
        return []
    names = []
    for i in range(n.value):
        dev = ctypes.c_int(0)
        buf = ctypes.create_string_buffer(256)
        if lib.cuDeviceGet(ctypes.byref(dev), i) == 0 and lib.cuDeviceGetName(buf, 256, dev) == 0:
            names.append(buf.value.decode(errors="replace"))
        else:
            names.append(f"cuda:{i}")
    return names


class Cudart:
    """The handful of CUDA runtime calls needed to feed an engine (libcudart.so.12 via ctypes)."""

    H2D, D2H = 1, 2

    def __init__(self) -> None:
        candidates = ["libcudart.so.12", "libcudart.so"]
        for site in sys.path:
            candidates += sorted(glob.glob(os.path.join(site, "nvidia", "cuda_runtime", "lib", "libcudart.so*")))
        for name in candidates:
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise RuntimeError("libcudart.so.12 not found (pip install nvidia-cuda-runtime-cu12)")
        self.lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        self.lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.lib.cudaFree.argtypes = [ctypes.c_void_p]
        self.lib.cudaStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        self.lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        self.lib.cudaStreamDestroy.argtypes = [ctypes.c_void_p]

    def _ok(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what} failed with CUDA error {rc}")

    def malloc(self, nbytes: int) -> int:
        p = ctypes.c_void_p()
        self._ok(self.lib.cudaMalloc(ctypes.byref(p), max(nbytes, 1)), "cudaMalloc")
        return int(p.value or 0)

    def free(self, ptr: int) -> None:
        self._ok(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def h2d(self, ptr: int, arr: np.ndarray) -> None:
        self._ok(self.lib.cudaMemcpy(ctypes.c_void_p(ptr), arr.ctypes.data, arr.nbytes, self.H2D), "cudaMemcpy H2D")

    def d2h(self, arr: np.ndarray, ptr: int) -> None:
        self._ok(self.lib.cudaMemcpy(arr.ctypes.data, ctypes.c_void_p(ptr), arr.nbytes, self.D2H), "cudaMemcpy D2H")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self._ok(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return int(s.value or 0)

    def sync(self, stream: int) -> None:
        self._ok(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def destroy(self, stream: int) -> None:
        self._ok(self.lib.cudaStreamDestroy(ctypes.c_void_p(stream)), "cudaStreamDestroy")


class Engine:
    """One deserialized engine with one execution context and stream; ``run`` is not thread-safe (Triton
    calls a model instance's ``execute`` one batch at a time)."""

    def __init__(self, plan: bytes, max_batch: int) -> None:
        import tensorrt as trt  # the gpu extra: tensorrt-cu12==10.5.0

        self.trt = trt
        self.max_batch = max_batch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.cuda = Cudart()
        self.stream = self.cuda.stream()

    def close(self) -> None:
        self.cuda.destroy(self.stream)

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by tensor name for ``feeds`` (any number of rows, run in chunks of ``max_batch``)."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"engine inputs {missing} not fed (got {sorted(feeds)})")
        n_rows = len(feeds[self.inputs[0]])
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.outputs}
        for s in range(0, n_rows, self.max_batch):
            for n, arr in self._chunk({k: v[s : s + self.max_batch] for k, v in feeds.items()}).items():
                parts[n].append(arr)
        return {n: np.concatenate(v) for n, v in parts.items()}

    def _chunk(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ptrs: list[int] = []
        try:
            for n in self.inputs:
                arr = np.ascontiguousarray(feeds[n], dtype=self._dtype(n))
                self.context.set_input_shape(n, arr.shape)
                ptr = self.cuda.malloc(arr.nbytes)
                ptrs.append(ptr)
                self.cuda.h2d(ptr, arr)
                self.context.set_tensor_address(n, ptr)
            host: dict[str, tuple[np.ndarray, int]] = {}
            for n in self.outputs:
                arr = np.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtype(n))
                ptr = self.cuda.malloc(arr.nbytes)
                ptrs.append(ptr)
                self.context.set_tensor_address(n, ptr)
                host[n] = (arr, ptr)
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            self.cuda.sync(self.stream)
            for arr, ptr in host.values():
                self.cuda.d2h(arr, ptr)
            return {n: arr for n, (arr, _) in host.items()}
        finally:
            for p in ptrs:
                self.cuda.free(p)
