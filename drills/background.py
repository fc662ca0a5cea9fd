"""perf_analyzer as background load where a drill expects zero failures.

Why perf_analyzer and not only the probe: it is the load tool people trust, and since it aborts the
whole run on the first failed request, its exit code is itself a signal: exit 0 over a window that
covered the fault means not one of its requests failed.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from recserve.drills.probe import Case, check_loopback
from recserve.drills.spec import BackgroundSpec


def input_data(cases: list[Case], model: str, path: Path) -> Path:
    """perf_analyzer ``--input-data`` JSON with the golden request of ``model`` (real ids, not zeros)."""
    case = next(c for c in cases if c.model == model)
    if model == "recommend":
        hist = list(case.history) or [0]
        row = {"user_id": [case.user_id or 0], "history": {"content": hist, "shape": [len(hist)]}}
    else:
        row = {"query": {"content": [case.query or ""], "shape": [1]}}
        if case.user_id is not None:
            row["user_id"] = [case.user_id]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": [row]}))
    return path


STATS_ARTIFACT = "failed to find the requested model version"
#: perf_analyzer's exit when its windows' throughput/latency differ by more than ``--stability-percentage``
#: (a fault inside a window does exactly that); every request may still have succeeded.
UNSTABLE = "failed to obtain stable measurement"


def judge(code: int, text: str) -> dict:
    """What perf_analyzer's exit code and log say about its requests. A non-zero exit counts as a failed request
    unless every error line is one that is not about a request: the statistics call for a version a rollover
    unloaded (``STATS_ARTIFACT`` exactly), or a measurement it would not call stable. Any other line that mentions
    statistics is not excused: it may hide a request that failed with it."""
    lines = text.splitlines()
    errors = [ln.strip() for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    request_errors = [ln for ln in errors if "had error" in ln]
    stats = [ln for ln in errors if STATS_ARTIFACT in ln.lower() and ln not in request_errors]
    unstable = [ln for ln in errors if UNSTABLE in ln.lower()]
    not_requests = code != 0 and not request_errors and bool(errors) and len(stats) + len(unstable) == len(errors)
    return {"errors": errors, "request_errors": request_errors, "not_requests": not_requests,
            "unstable": bool(unstable), "stats": bool(stats)}


@dataclass
class BackgroundLoad:
    process: subprocess.Popen
    command: list[str]
    log: Path
    started_at: float
    #: when the process exited (set by a watcher thread): its requests covered a fault only up to here
    exited_at: float | None = None

    def watch(self) -> BackgroundLoad:
        """Record the exit time as it happens; ``finish`` is called after the drill and must not stand in for it."""
        def wait() -> None:
            self.process.wait()
            self.exited_at = time.time()

        threading.Thread(target=wait, name="perf-analyzer-exit", daemon=True).start()
        return self

    def finish(self, timeout_s: float = 60.0) -> dict:
        """Wait for perf_analyzer (it is sized to the drill); kill it if it overruns. Never raises."""
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(10)
        deadline = time.time() + 5  # the watcher sets the exit time right after wait() returns
        while self.exited_at is None and time.time() < deadline:
            time.sleep(0.01)
        ended = self.exited_at if self.exited_at is not None else time.time()
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        rate = [ln.strip() for ln in text.splitlines() if "Throughput:" in ln]
        j = judge(code, text)
        errors, request_errors, stats_only = j["errors"], j["request_errors"], j["not_requests"]
        summary = f"exit {code}" + (f", {rate[-1]}" if rate else "") + (f", first error: {errors[0]}" if errors else "")
        if stats_only:
            why = [w for w, on in (("fetching statistics of a version the rollover unloaded", j["stats"]),
                                   ("windows too unlike to call stable", j["unstable"])) if on]
            summary += f" ({'; '.join(why)}; no request failed)"
        command = " ".join(re.sub(r"(admin-key:).*", r"\1<secret>", a) for a in self.command)  # no key in reports
        return {"exit_code": code, "started_at": self.started_at, "ended_at": ended, "errors": errors[:5],
                "request_errors": len(request_errors), "stats_only_failure": stats_only,
                "no_failed_request": code == 0 or stats_only, "summary": summary[:500], "log": str(self.log),
                "command": command}


def start_background(spec: BackgroundSpec, grpc_url: str, cases: list[Case], duration_s: float,
                     capacity: float | None, workdir: Path, headers: dict[str, str] | None = None,
                     serving=None) -> BackgroundLoad:
    """Start perf_analyzer for about ``duration_s`` (three measurement windows, stability not required).
    ``serving``: a serving spec; then ``spec.model`` is one of its models and perf_analyzer sends that model's
    golden requests (a data-only copy of its golden file: recserve judges answers itself, by the spec's rules)."""
    from recserve.perf.analyzer import binary, environment

    check_loopback(grpc_url)
    workdir.mkdir(parents=True, exist_ok=True)
    if serving is not None:
        from recserve.drills.serving import data_only

        data = data_only(serving, spec.model, workdir / "perf_input.json")
    else:
        data = input_data(cases, spec.model, workdir / "perf_input.json")
    window_ms = max(1000, math.floor((duration_s - 2) * 1000 / 3))  # it adds ~2 s of its own
    cmd = [str(binary()), "-m", spec.model, "-u", grpc_url, "-i", "grpc", "--input-data", str(data),
           "--measurement-interval", str(window_ms), "--stability-percentage", "1000", "--max-trials", "3",
           "-f", str(workdir / "perf.csv")]
    if spec.concurrency is not None:
        cmd += ["--concurrency-range", f"{spec.concurrency}:{spec.concurrency}:1"]
    else:
        rate = max(1.0, round((spec.rate_x_capacity or 0.5) * (capacity or 10), 1))
        cmd += ["--request-rate-range", f"{rate}:{rate}:1", "--max-threads", "8"]
    for name, value in (headers or {}).items():  # the admin key: the front door passes statistics only with it
        cmd += ["-H", f"{name}:{value}"]
    log = workdir / "perf_analyzer.log"
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=environment(), start_new_session=True)
    fh.close()
    return BackgroundLoad(proc, cmd, log, time.time()).watch()
