"""TensorRT engines from the ONNX graphs (GPU hosts only), checked against onnxruntime. UNTESTED ON A GPU.

Why optional: TensorRT needs an NVIDIA GPU, and an engine only loads in the TensorRT version that built
it (tensorrt-cu12==10.5.0 = the NGC 24.10 container). Where ``import tensorrt`` or a CUDA GPU is missing,
the pipeline prints one line and builds the ONNX models only. Where both exist, a failed engine is a failed
build: the pipeline writes the ONNX versions and exits with ``EXIT_TRT_FAILED``.

Written against the TensorRT 10.5 Python API (explicit batch networks, named I/O tensors) and never run on a
GPU in this project: ``tools/gpu-check`` is its first test. Engines are run by the serving shim's own runner
(``control/backends/tensorrt/engine.py``), so the check feeds an engine exactly as serving does.

Precision: FP16 is requested (``BuilderFlag.FP16`` only *allows* FP16 kernels; TensorRT may still pick FP32
for every layer). If the FP16 engine misses the top-10 bar, an FP32 engine is built instead. The result
records what was requested, what was built, and the per-layer output types the engine inspector reports, so a
manifest never claims FP16 for an engine that runs in FP32.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from recserve.build.reference import served_module
from recserve.control.defaults import REPO_ROOT

ENGINE_PY = REPO_ROOT / "control" / "backends" / "tensorrt" / "engine.py"
#: The serving shim's engine runner and GPU probe (one implementation for build and serving).
engine_mod = served_module(ENGINE_PY)
cuda_gpus = engine_mod.cuda_gpus

MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 8, 64
TOP10_OVERLAP_MIN = 0.99
WORKSPACE_BYTES = 2 << 30
#: Exit code of ``python -m recserve.build.pipeline`` when TensorRT was available and an engine failed.
EXIT_TRT_FAILED = 3


def availability() -> tuple[bool, str]:
    """(usable, reason): TensorRT needs both the module and a CUDA GPU."""
    missing = []
    try:
        import tensorrt  # type: ignore[import-not-found]  # noqa: F401
    except ImportError as exc:
        missing.append(f"no tensorrt module ({exc})")
    gpus = cuda_gpus()
    if not gpus:
        missing.append("no CUDA GPU")
    if missing:
        return False, " / ".join(missing)
    import tensorrt

    return True, f"TensorRT {tensorrt.__version__} on {gpus[0]}"


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
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector then reports layer types
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


def layer_output_types(plan_path: Path) -> dict[str, int]:
    """How many layer outputs of each format/datatype the engine inspector reports (e.g. FP16 vs FP32)."""
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan_path.read_bytes())
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    counts: Counter[str] = Counter()
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            raise ValueError("the inspector reports layer names only (engine built without DETAILED verbosity)")
        for out in layer.get("Outputs", []):
            counts[str(out.get("Format/Datatype", "unknown"))] += 1
    return dict(counts)


def precision_used(fp16_requested: bool, types: dict[str, int]) -> str:
    """``fp16`` only when FP16 was allowed AND some layer really outputs half precision; else ``fp32``."""
    half = sum(n for t, n in types.items() if "fp16" in t.lower() or "half" in t.lower())
    return "fp16" if fp16_requested and half else "fp32"


def run_engine(plan_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by tensor name, through the serving shim's runner in chunks of MAX_BATCH rows."""
    engine = engine_mod.Engine(plan_path.read_bytes(), MAX_BATCH)
    try:
        return engine.run(feeds)
    finally:
        engine.close()


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
    """FP16-allowed engine checked against onnxruntime; if it misses the top-10 bar, an FP32 engine is tried
    (``fp32_fallback`` in the result) before giving up (``passed`` False)."""
    import tensorrt as trt

    result: dict = {
        "tensorrt": trt.__version__,
        "precision_requested": "fp16",
        "precision": None,
        "fp32_fallback": False,
        "layer_output_types": None,
        "top10_overlap_vs_onnxruntime": None,
        "threshold": TOP10_OVERLAP_MIN,
        "profile_batch": [MIN_BATCH, OPT_BATCH, MAX_BATCH],
        "passed": False,
    }
    plan = out_dir / name / "model.plan"
    for fp16 in (True, False):
        build_engine(onnx_path, plan, timing_cache, fp16=fp16)
        types = layer_output_types(plan)
        overlap = top10_overlap(name, ort_outputs, run_engine(plan, feeds))
        result.update(precision=precision_used(fp16, types), fp32_fallback=not fp16, layer_output_types=types,
                      top10_overlap_vs_onnxruntime=round(overlap, 4))
        if overlap >= TOP10_OVERLAP_MIN:
            result["passed"] = True
            return plan, result
        log(f"TensorRT {name}: {'FP16' if fp16 else 'FP32'} top-10 overlap {overlap:.4f} < {TOP10_OVERLAP_MIN}")
    return plan, result


def build_checked(
    name: str,
    onnx_path: Path,
    out_dir: Path,
    timing_cache: Path,
    feeds: dict[str, np.ndarray],
    ort_outputs: dict[str, np.ndarray],
    log: Callable[[str], None] = print,
) -> tuple[Path | None, dict | None, str]:
    """(plan, check, problem): ``problem`` is '' for an engine that passed, else why there is none."""
    try:
        plan, check = build_and_check(name, onnx_path, out_dir, timing_cache, feeds, ort_outputs, log)
    except (RuntimeError, ValueError, OSError) as exc:  # anything else propagates: a traceback, also non-zero
        return None, None, f"engine build or run failed: {exc}"
    if not check["passed"]:
        return plan, check, (f"top-10 overlap vs onnxruntime {check['top10_overlap_vs_onnxruntime']} "
                             f"< {TOP10_OVERLAP_MIN} even in FP32")
    return plan, check, ""
