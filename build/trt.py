"""TensorRT FP16 engines from the ONNX graphs (GPU hosts only), checked against onnxruntime.

Why optional: TensorRT needs an NVIDIA GPU, and an engine only loads in the TensorRT version that built
it (tensorrt-cu12==10.5.0 = the NGC 24.10 container). Where ``import tensorrt`` or a CUDA GPU is missing,
the pipeline prints one line and builds the ONNX models only.

Written against the TensorRT 10.5 Python API (explicit batch networks, named I/O tensors,
``execute_async_v3``). Device memory comes from libcudart through ctypes, so no pycuda/cuda-python
version has to match the driver.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 8, 64
TOP10_OVERLAP_MIN = 0.99
WORKSPACE_BYTES = 2 << 30


# ------------------------------------------------------------------------------------------ availability


def _libcuda() -> ctypes.CDLL | None:
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_gpus() -> list[str]:
    """Names of the CUDA GPUs the driver sees ([] without a driver or GPU)."""
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


def availability() -> tuple[bool, str]:
    """(usable, reason): TensorRT needs both the module and a CUDA GPU."""
    missing = []
    try:
        import tensorrt  # type: ignore[import-not-found]  # noqa: F401
    except Exception:  # noqa: BLE001 - an import that fails for any reason means no TensorRT
        missing.append("no tensorrt module")
    gpus = cuda_gpus()
    if not gpus:
        missing.append("no CUDA GPU")
    if missing:
        return False, " / ".join(missing)
    import tensorrt

    return True, f"TensorRT {tensorrt.__version__} on {gpus[0]}"


# ------------------------------------------------------------------------------------------------ cudart


class _Cudart:
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
        self.lib.cudaFree(ctypes.c_void_p(ptr))

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
        self.lib.cudaStreamDestroy(ctypes.c_void_p(stream))


# ------------------------------------------------------------------------------------------ build / run


def build_engine(onnx_path: Path, plan_path: Path, timing_cache: Path, fp16: bool = True) -> Path:
    """Parse the ONNX file and build a serialized engine with one profile over batch 1..64 (opt 8)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (MIN_BATCH, *dims), (OPT_BATCH, *dims), (MAX_BATCH, *dims))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT engine build failed for {onnx_path}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path


def run_engine(plan_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the engine on ``feeds`` in chunks of MAX_BATCH rows; outputs by tensor name."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"cannot deserialize {plan_path}")
    ctx = engine.create_execution_context()
    cuda = _Cudart()
    stream = cuda.stream()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]
    n_rows = len(feeds[inputs[0]])
    parts: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    try:
        for s in range(0, n_rows, MAX_BATCH):
            ptrs = []
            try:
                for n in inputs:
                    arr = np.ascontiguousarray(
                        feeds[n][s : s + MAX_BATCH], dtype=trt.nptype(engine.get_tensor_dtype(n))
                    )
                    ctx.set_input_shape(n, arr.shape)
                    ptr = cuda.malloc(arr.nbytes)
                    ptrs.append(ptr)
                    cuda.h2d(ptr, arr)
                    ctx.set_tensor_address(n, ptr)
                host = {}
                for n in outputs:
                    arr = np.empty(tuple(ctx.get_tensor_shape(n)), dtype=trt.nptype(engine.get_tensor_dtype(n)))
                    ptr = cuda.malloc(arr.nbytes)
                    ptrs.append(ptr)
                    ctx.set_tensor_address(n, ptr)
                    host[n] = (arr, ptr)
                if not ctx.execute_async_v3(stream):
                    raise RuntimeError(f"TensorRT execution failed for {plan_path}")
                cuda.sync(stream)
                for n, (arr, ptr) in host.items():
                    cuda.d2h(arr, ptr)
                    parts[n].append(arr)
            finally:
                for p in ptrs:
                    cuda.free(p)
    finally:
        cuda.destroy(stream)
    return {n: np.concatenate(v) for n, v in parts.items()}


def top10_overlap(name: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """Mean overlap of the top-10 item sets (ids for retrieval/search, candidates by score for ranker)."""
    if name == "ranker":
        a = np.argsort(-ref["scores"], axis=1, kind="stable")[:, :10]
        b = np.argsort(-got["scores"].astype(np.float32), axis=1, kind="stable")[:, :10]
    else:
        key = "cand_ids" if name == "retrieval" else "item_ids"
        a, b = ref[key][:, :10], got[key][:, :10].astype(np.int64)
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / 10.0 for x, y in zip(a, b, strict=True)]))


def build_and_check(
    name: str,
    onnx_path: Path,
    out_dir: Path,
    timing_cache: Path,
    feeds: dict[str, np.ndarray],
    ort_outputs: dict[str, np.ndarray],
    log: Callable[[str], None] = print,
) -> tuple[Path, dict]:
    """FP16 engine checked against onnxruntime; if FP16 misses the top-10 bar, an FP32 engine is tried
    (recorded in the result) before giving up."""
    result: dict = {
        "tensorrt": None,
        "precision": None,
        "top10_overlap_vs_onnxruntime": None,
        "threshold": TOP10_OVERLAP_MIN,
        "profile_batch": [MIN_BATCH, OPT_BATCH, MAX_BATCH],
    }
    import tensorrt as trt

    result["tensorrt"] = trt.__version__
    plan = out_dir / name / "model.plan"
    for fp16 in (True, False):
        build_engine(onnx_path, plan, timing_cache, fp16=fp16)
        overlap = top10_overlap(name, ort_outputs, run_engine(plan, feeds))
        result.update(precision="fp16" if fp16 else "fp32", top10_overlap_vs_onnxruntime=round(overlap, 4))
        if overlap >= TOP10_OVERLAP_MIN:
            result["passed"] = True
            return plan, result
        log(f"TensorRT {name}: {'FP16' if fp16 else 'FP32'} top-10 overlap {overlap:.4f} < {TOP10_OVERLAP_MIN}")
    result["passed"] = False
    return plan, result
