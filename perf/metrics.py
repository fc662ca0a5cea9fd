"""Server-side figures for a run: Triton metric deltas (queue/compute per model) and peak RSS.

Why deltas: Triton's counters are cumulative since start, so a run's own queue and compute time is the
difference of two scrapes divided by the requests that succeeded in between. Why sampling RSS: the
Python backend runs every model instance in its own stub process, so tritonserver's RSS alone hides
most of the memory; we sample the whole process tree during the run and keep the peaks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psutil

from recserve.control.monitoring import promtext

COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """model -> counter -> value (summed over versions and failure reasons)."""
    return promtext.model_sums(text, COUNTERS)


def scrape(url: str, timeout_s: float = 2.0) -> dict[str, dict[str, float]]:
    """One scrape of Triton's Prometheus endpoint; empty when it is unreachable (figures then read 0)."""
    text = promtext.fetch(url, timeout_s)
    return parse_metrics(text) if text is not None else {}


@dataclass
class ModelServerFigures:
    """Per-model server-side figures over one run."""

    requests: float
    failures: float
    executions: float
    inferences: float
    queue_us: float
    compute_infer_us: float
    compute_input_us: float
    compute_output_us: float

    @property
    def avg_batch(self) -> float:
        """Inferences per model execution: how much dynamic batching actually batched."""
        return self.inferences / self.executions if self.executions else 0.0


def deltas(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, ModelServerFigures]:
    """Per-model averages between two scrapes (per successful request; 0 when none)."""
    out = {}
    for model, now in after.items():
        then = before.get(model, {})

        def d(key: str, now: dict[str, float] = now, then: dict[str, float] = then) -> float:
            return max(0.0, now.get(key, 0.0) - then.get(key, 0.0))

        ok = d("nv_inference_request_success")
        if ok == 0 and d("nv_inference_request_failure") == 0:
            continue
        per = ok or 1.0
        out[model] = ModelServerFigures(
            requests=ok,
            failures=d("nv_inference_request_failure"),
            executions=d("nv_inference_exec_count"),
            inferences=d("nv_inference_count"),
            queue_us=d("nv_inference_queue_duration_us") / per,
            compute_infer_us=d("nv_inference_compute_infer_duration_us") / per,
            compute_input_us=d("nv_inference_compute_input_duration_us") / per,
            compute_output_us=d("nv_inference_compute_output_duration_us") / per,
        )
    return out


def _is_stub(proc: psutil.Process) -> bool:
    """Python backend stub (its comm is truncated to 'triton_python_b', so look at argv[0] too)."""
    try:
        argv0 = (proc.cmdline() or [""])[0]
    except (psutil.AccessDenied, psutil.ZombieProcess, psutil.NoSuchProcess):
        argv0 = ""
    return "stub" in argv0 or proc.name().startswith("triton_python")


def process_cpu_s(proc: psutil.Process) -> float:
    """CPU seconds (user + system) ``proc`` has used so far."""
    t = proc.cpu_times()
    return t.user + t.system


def tree_cpu_s(pids: list[int]) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) per process of the servers' trees: pid -> ("server" | "stubs", s).

    Why per pid: a model reload replaces stub processes mid-run, and a plain sum would then go down.
    Why at all: on a 2-core host the serving path competes with the load generator for the same cores,
    and CPU per request per process says which layer costs what; latency alone cannot.
    """
    out: dict[int, tuple[str, float]] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            out[pid] = ("server", process_cpu_s(root))
            for c in root.children(recursive=True):
                if _is_stub(c):
                    out[c.pid] = ("stubs", process_cpu_s(c))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def fleet_group(proc: psutil.Process) -> str:
    """Which part of a fleet a process is: ``haproxy``, ``tritonserver``, ``python stubs`` or ``other fleet
    processes`` (the control plane, the degraded-answer server, monitoring)."""
    if _is_stub(proc):
        return "python stubs"
    name = proc.name()
    return name if name in ("haproxy", "tritonserver") else "other fleet processes"


def fleet_cpu_s(root_pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds per process of the tree under ``root_pid`` (a control plane): pid -> (``fleet_group``, s),
    read per pid for the reason ``tree_cpu_s`` gives; {} when the root is gone."""
    try:
        procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out: dict[int, tuple[str, float]] = {}
    for p in procs:
        try:
            out[p.pid] = (fleet_group(p), process_cpu_s(p))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
              kinds: tuple[str, ...] = ("server", "stubs")) -> dict[str, float]:
    """CPU seconds spent between two per-pid readings (``tree_cpu_s``, ``fleet_cpu_s``), per kind: each of
    ``kinds`` (0 when none ran) and any other kind seen; new processes count from 0."""
    out = dict.fromkeys(kinds, 0.0)
    for pid, (kind, now) in after.items():
        then = before.get(pid, (kind, 0.0))[1]
        out[kind] = out.get(kind, 0.0) + max(0.0, now - then)
    return out


def cpu_s(pids: list[int]) -> float:
    """Cumulative CPU seconds of whole process trees (HAProxy master + workers)."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                total += process_cpu_s(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


def children_cpu_s() -> float:
    """CPU seconds of this process's exited children (perf_analyzer runs as one and has exited)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class RssPeaks:
    """Peak resident memory (MiB) of the server process and of its Python backend stubs."""

    server_mib: float = 0.0
    stubs_mib: float = 0.0
    stub_count: int = 0
    total_mib: float = 0.0


@dataclass
class RssSampler:
    """Samples process trees' RSS (one per tritonserver) in a background thread; keeps the peaks."""

    pids: list[int]
    interval_s: float = 0.2
    peaks: RssPeaks = field(default_factory=RssPeaks)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        server = stub_rss = 0
        stubs: list[psutil.Process] = []
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                server += root.memory_info().rss
                mine = [c for c in root.children(recursive=True) if _is_stub(c)]
                stub_rss += sum(c.memory_info().rss for c in mine)
                stubs += mine
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if server == 0:
            return
        mib = 1024 * 1024
        p = self.peaks
        p.server_mib = max(p.server_mib, server / mib)
        p.stubs_mib = max(p.stubs_mib, stub_rss / mib)
        p.stub_count = max(p.stub_count, len(stubs))
        p.total_mib = max(p.total_mib, (server + stub_rss) / mib)

    def reset(self) -> RssPeaks:
        """Start a new peak window (per load point); returns the window that ended."""
        ended, self.peaks = self.peaks, RssPeaks()
        self.sample()
        return ended

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        self.sample()
