"""Run the real ``perf_analyzer`` binary for ONE load point and parse its CSV.

Why one point per process: perf_analyzer aborts the whole sweep on the first failed request or an
unstable measurement, so a sweep of N points run as N processes keeps the points that finished
(partial results) and lets the caller stop early once p99 has passed the SLO.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import site
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from recserve.control.stats import percentile

#: perf_analyzer's CSV header -> our field name (latencies and times are microseconds).
CSV_FIELDS: dict[str, str] = {
    "Concurrency": "concurrency",
    "Request Rate": "request_rate",
    "Inferences/Second": "infer_per_sec",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us",
    "Client Recv": "client_recv_us",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p95 latency": "p95_us",
    "p99 latency": "p99_us",
    "Avg latency": "avg_us",
}


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer failed; the message quotes what it said (it reports errors on stdout and stderr)."""

    def __init__(self, message: str, output: str = "", returncode: int | None = None):
        super().__init__(message)
        self.output = output
        self.returncode = returncode


@dataclass(frozen=True)
class Row:
    """One measured load point from perf_analyzer's CSV."""

    infer_per_sec: float
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float
    concurrency: float | None = None
    request_rate: float | None = None
    server_queue_us: float = 0.0
    server_compute_infer_us: float = 0.0
    server_compute_input_us: float = 0.0
    server_compute_output_us: float = 0.0
    client_send_us: float = 0.0
    client_recv_us: float = 0.0
    network_us: float = 0.0
    avg_us: float = 0.0
    #: Requests measured and their span (from the profile export; 0 when only the CSV was parsed).
    requests: int = 0
    duration_s: float = 0.0
    #: Requests slower than STALL_US: the ~500 ms stalls of Triton 2.51's dynamic batcher with a queue
    #: policy (see docs/performance.md) show up here before they move p99.
    stalls: int = 0
    #: p99.9 and the requests slower than the point's ``slow_ms`` (from the profile export; 0 without it)
    p999_us: float = 0.0
    slow: int = 0

    @property
    def p50_ms(self) -> float:
        return self.p50_us / 1000.0

    @property
    def p99_ms(self) -> float:
        return self.p99_us / 1000.0


def parse_csv(text: str) -> list[Row]:
    """Rows of a perf_analyzer ``-f`` CSV; raises ValueError naming the missing column on odd input."""
    reader = csv.DictReader(io.StringIO(text.strip()))
    if not reader.fieldnames:
        raise ValueError("perf_analyzer CSV is empty")
    header = [h.strip() for h in reader.fieldnames]
    for need in ("Inferences/Second", "p50 latency", "p90 latency", "p95 latency", "p99 latency"):
        if need not in header:
            raise ValueError(f"perf_analyzer CSV has no '{need}' column (header: {', '.join(header)})")
    if "Concurrency" not in header and "Request Rate" not in header:
        raise ValueError("perf_analyzer CSV has neither a 'Concurrency' nor a 'Request Rate' column")
    rows = []
    for raw in reader:
        values = {CSV_FIELDS[k.strip()]: float(v) for k, v in raw.items() if k and k.strip() in CSV_FIELDS and v}
        rows.append(Row(**values))
    return rows


STALL_US = 400_000.0


def parse_profile(doc: dict, batch_size: int = 1, slow_ms: float | None = None) -> dict[str, float]:
    """Throughput and latency percentiles from a ``--profile-export-file`` document.

    Why: with ``--request-count`` perf_analyzer's CSV throughput divides by whole seconds (2000 requests
    in 1.04 s read 1995/s, in 2.06 s read 999/s); per-request timestamps give the exact figure.
    """
    sends, lats, last = [], [], 0
    for exp in doc.get("experiments", []):
        for req in exp.get("requests", []):
            responses = req.get("response_timestamps") or []
            if not responses:
                continue
            sends.append(req["timestamp"])
            lats.append((responses[-1] - req["timestamp"]) / 1000.0)  # ns -> us
            last = max(last, responses[-1])
    if not sends:
        raise ValueError("profile export holds no completed requests")
    span_s = max(1e-9, (last - min(sends)) / 1e9)

    def pct(q: float) -> float:
        return percentile(lats, q) or 0.0

    return {
        "infer_per_sec": len(sends) * batch_size / span_s,
        "p50_us": pct(50),
        "p90_us": pct(90),
        "p95_us": pct(95),
        "p99_us": pct(99),
        "avg_us": sum(lats) / len(lats),
        "requests": len(sends),
        "duration_s": span_s,
        "stalls": sum(1 for x in lats if x >= STALL_US),
        "p999_us": pct(99.9),
        "slow": sum(1 for x in lats if x > slow_ms * 1000.0) if slow_ms else 0,
    }


def site_packages() -> Path:
    """The virtualenv's site-packages (where tritonclient and nvidia-cuda-runtime live)."""
    for p in site.getsitepackages():
        if (Path(p) / "tritonclient").is_dir():
            return Path(p)
    return Path(site.getsitepackages()[0])


def binary() -> Path:
    """``perf_analyzer`` of tritonclient[all]==2.51.0 in this virtualenv."""
    path = Path(sys.executable).parent / "perf_analyzer"
    if not path.exists():
        raise PerfAnalyzerError(f"perf_analyzer not found at {path}: run 'make setup' (tritonclient[all]==2.51.0)")
    return path


def version() -> str:
    """The version perf_analyzer itself reports (``--version``), not its wheel's: the two can differ."""
    try:
        out = subprocess.run([str(binary()), "--version"], capture_output=True, text=True, timeout=30,
                             env=environment())
    except (PerfAnalyzerError, OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    m = re.search(r"Perf Analyzer Version (\S+)", out.stdout + out.stderr)
    return m.group(1) if m else f"unknown (--version said {(out.stdout + out.stderr).strip()[:120]!r})"


def environment() -> dict[str, str]:
    """perf_analyzer links libcudart.so.12 even on CPU hosts: take it from nvidia-cuda-runtime-cu12."""
    env = dict(os.environ)
    cudart = site_packages() / "nvidia" / "cuda_runtime" / "lib"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(cudart), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


@dataclass
class LoadPoint:
    """Everything one perf_analyzer invocation needs."""

    model: str
    url: str
    mode: str  # "concurrency" | "rate"
    value: float
    protocol: str = "grpc"
    batch_size: int = 1
    input_data: Path | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    measurement_ms: int = 2000
    stability_pct: int = 30
    max_trials: int = 8
    max_threads: int = 16
    timeout_s: float = 120.0
    #: When set, measure exactly this many requests in one window (no stability loop). On a shared 2-core
    #: host stabilisation often never converges and perf_analyzer then exits without a result.
    request_count: int | None = None
    #: gRPC headers for every call (``-H name:value``), e.g. the statistics key Triton and the front door want for
    #: model statistics (never an admin key: this command line is readable where /proc has no hidepid).
    headers: dict[str, str] = field(default_factory=dict)
    #: Requests slower than this are counted (``Row.slow``; the suites set 4x their SLO); None: not counted.
    slow_ms: float | None = None

    def command(self, csv_path: Path) -> list[str]:
        if self.mode not in ("concurrency", "rate"):
            raise ValueError(f"mode must be 'concurrency' or 'rate', got {self.mode!r}")
        v = int(self.value) if self.mode == "concurrency" else self.value
        cmd = [
            str(binary()),
            "-m",
            self.model,
            "-u",
            self.url,
            "-i",
            self.protocol,
            "-b",
            str(self.batch_size),
            "-f",
            str(csv_path),
            "--measurement-interval",
            str(self.measurement_ms),
            "--stability-percentage",
            str(self.stability_pct),
            "--max-trials",
            str(self.max_trials),
        ]
        if self.request_count:
            cmd += ["--request-count", str(int(self.request_count))]
            cmd += ["--profile-export-file", str(csv_path.with_suffix(".profile.json"))]
        if self.mode == "concurrency":
            cmd += ["--concurrency-range", f"{v}:{v}:1"]
        else:
            cmd += ["--request-rate-range", f"{v}:{v}:1", "--max-threads", str(self.max_threads)]
        if self.input_data is not None:
            cmd += ["--input-data", str(self.input_data)]
        for name, dims in self.shapes.items():
            cmd += ["--shape", f"{name}:{','.join(str(d) for d in dims)}"]
        for name, value in self.headers.items():
            cmd += ["-H", f"{name}:{value}"]
        return cmd


def quote_output(stdout: str, stderr: str, limit: int = 1200) -> str:
    """The lines of perf_analyzer's output that explain a failure (it prints errors on both streams)."""
    text = "\n".join(s for s in (stderr.strip(), stdout.strip()) if s)
    keys = ("error", "failed", "unable", "not found", "unknown", "invalid", "unavailable", "refused")
    lines = [ln.strip() for ln in text.splitlines() if any(k in ln.lower() for k in keys)]
    quoted = " | ".join(dict.fromkeys(lines)) or " | ".join(text.splitlines()[-5:])
    return quoted[:limit]


def run(point: LoadPoint, csv_path: Path) -> Row:
    """Measure one load point; raise PerfAnalyzerError quoting perf_analyzer on any failure."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = point.command(csv_path)
    try:
        proc = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=point.timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise PerfAnalyzerError(
            f"perf_analyzer on '{point.model}' ({point.mode} {point.value}) ran past {point.timeout_s:.0f}s",
            out,
        ) from exc
    log = csv_path.with_suffix(".log")
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n")
    if proc.returncode != 0 or not csv_path.exists():
        raise PerfAnalyzerError(
            f"perf_analyzer on '{point.model}' at {point.url} ({point.mode} {point.value}) failed "
            f"(exit {proc.returncode}): {quote_output(proc.stdout, proc.stderr)}",
            proc.stdout + proc.stderr,
            proc.returncode,
        )
    rows = parse_csv(csv_path.read_text())
    if not rows:
        raise PerfAnalyzerError(f"perf_analyzer on '{point.model}' wrote an empty CSV ({csv_path})", proc.stdout)
    profile = csv_path.with_suffix(".profile.json")
    if not profile.exists():
        return rows[0]
    exact = parse_profile(json.loads(profile.read_text()), point.batch_size, point.slow_ms)
    profile.unlink()  # per-request timestamps are large; the CSV and the log stay with the report
    return replace(rows[0], **exact)
