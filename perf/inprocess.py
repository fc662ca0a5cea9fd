"""In-process onnxruntime reference: the ceiling that serving overhead is measured against.

Same ONNX file, same session options as our Triton shim (intra/inter-op threads from the model's
config parameters), same batch size, same payload rows, one Python loop calling ``session.run``
back to back: whatever the served figure loses against this is the cost of serving.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perf.inputs import batch


@dataclass(frozen=True)
class InProcessResult:
    model: str
    batch_size: int
    threads: int
    infer_per_sec: float
    p50_ms: float
    p99_ms: float
    runs: int


def config_threads(config_text: str) -> int:
    """``intra_op_thread_count`` from a config.pbtxt (the shim's default is 1)."""
    m = re.search(r'key:\s*"intra_op_thread_count",\s*value:\s*\{\s*string_value:\s*"(\d+)"', config_text)
    return int(m.group(1)) if m else 1


def latest_version_file(model_dir: Path, filename: str = "model.onnx") -> Path:
    """The highest numbered version's file (what ``model_version: -1`` serves)."""
    versions = sorted(
        (int(p.name), p) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and (p / filename).exists()
    )
    if not versions:
        raise FileNotFoundError(f"no built version with {filename} under {model_dir}: run 'make models'")
    return versions[-1][1] / filename


def session(path: Path, threads: int):
    """A session configured exactly like control/backends/onnxruntime/model.py configures its own."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def measure(
    model_dir: Path,
    rows: list[dict[str, np.ndarray]],
    batch_size: int,
    duration_s: float = 3.0,
    threads: int | None = None,
    warmup: int = 20,
) -> InProcessResult:
    """Back-to-back ``session.run`` for ``duration_s``; inferences/s counts batch rows like perf_analyzer."""
    threads = threads or config_threads((model_dir / "config.pbtxt").read_text())
    sess = session(latest_version_file(model_dir), threads)
    outputs = [o.name for o in sess.get_outputs()]
    feeds = [batch(rows, i * batch_size, batch_size) for i in range(max(1, len(rows) // batch_size))]
    for i in range(warmup):
        sess.run(outputs, feeds[i % len(feeds)])
    lat = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < duration_s:
        t0 = time.perf_counter()
        sess.run(outputs, feeds[i % len(feeds)])
        lat.append(time.perf_counter() - t0)
        i += 1
    elapsed = time.perf_counter() - start
    arr = np.array(lat) * 1000.0
    return InProcessResult(
        model=model_dir.name,
        batch_size=batch_size,
        threads=threads,
        infer_per_sec=i * batch_size / elapsed,
        p50_ms=float(np.percentile(arr, 50)),
        p99_ms=float(np.percentile(arr, 99)),
        runs=i,
    )
