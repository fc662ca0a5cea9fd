"""In-process onnxruntime reference: the ceiling that serving overhead is measured against.

Same ONNX file, same session options as our Triton shim (intra/inter-op threads from the model's
config parameters), same number of sessions as the config's instances (each in its own thread, as each
instance has its own stub process), same batch size, same payload rows, ``session.run`` back to back:
whatever the served figure loses against this is the cost of serving.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.control.stats import percentile
from recserve.perf.inputs import batch


@dataclass(frozen=True)
class InProcessResult:
    model: str
    batch_size: int
    threads: int
    infer_per_sec: float
    p50_ms: float
    p99_ms: float
    runs: int
    workers: int = 1
    #: CPU (all threads of this process) per session.run: what one batch costs without serving around it.
    cpu_ms_per_run: float = 0.0


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


def config_instances(config_text: str) -> int:
    """Instance count of the model's ``instance_group`` (Triton runs that many sessions in parallel)."""
    m = re.search(r"instance_group\s*\[\s*\{[^}]*count:\s*(\d+)", config_text)
    return int(m.group(1)) if m else 1


def _worker(sess, outputs: list[str], feeds: list[dict], offset: int, stop_at: float, lat: list[float]) -> None:
    """One session looping back to back; onnxruntime releases the GIL inside run(), as in a stub process."""
    i = offset
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        sess.run(outputs, feeds[i % len(feeds)])
        lat.append(time.perf_counter() - t0)
        i += 1


def measure(
    model_dir: Path,
    rows: list[dict[str, np.ndarray]],
    batch_size: int,
    duration_s: float = 3.0,
    threads: int | None = None,
    workers: int | None = None,
    warmup: int = 20,
) -> InProcessResult:
    """``workers`` sessions (default: the config's instance count, like the served model) running back to
    back for ``duration_s``; inferences/s counts batch rows like perf_analyzer."""
    text = (model_dir / "config.pbtxt").read_text()
    threads = threads or config_threads(text)
    workers = workers or config_instances(text)
    path = latest_version_file(model_dir)
    sessions = [session(path, threads) for _ in range(workers)]
    outputs = [o.name for o in sessions[0].get_outputs()]
    feeds = [batch(rows, i * batch_size, batch_size) for i in range(max(1, len(rows) // batch_size))]
    for sess in sessions:
        for i in range(warmup):
            sess.run(outputs, feeds[i % len(feeds)])
    lats: list[list[float]] = [[] for _ in sessions]
    cpu0 = time.process_time()
    start = time.perf_counter()
    pool = [
        threading.Thread(target=_worker, args=(sess, outputs, feeds, k * 7, start + duration_s, lats[k]))
        for k, sess in enumerate(sessions)
    ]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    arr = np.array([x for lat in lats for x in lat]) * 1000.0
    return InProcessResult(
        model=model_dir.name,
        batch_size=batch_size,
        threads=threads,
        infer_per_sec=len(arr) * batch_size / elapsed,
        p50_ms=percentile(arr.tolist(), 50) or 0.0,
        p99_ms=percentile(arr.tolist(), 99) or 0.0,
        runs=len(arr),
        workers=workers,
        cpu_ms_per_run=1000.0 * cpu / max(1, len(arr)),
    )
