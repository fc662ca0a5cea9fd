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


@dataclass
class BackgroundLoad:
    process: subprocess.Popen
    command: list[str]
    log: Path
    started_at: float

    def finish(self, timeout_s: float = 60.0) -> dict:
        """Wait for perf_analyzer (it is sized to the drill); kill it if it overruns. Never raises."""
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(10)
        ended = time.time()
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        errors = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
        rate = [ln.strip() for ln in text.splitlines() if "Throughput:" in ln]
        request_errors = [ln for ln in errors if "had error" in ln]
        # perf_analyzer fetches the statistics of the composing models' versions at the end of its run; after a
        # rollover the old version is gone and it exits 99 although none of its requests failed.
        stats_only = code != 0 and not request_errors and bool(errors) and all(
            STATS_ARTIFACT in ln or "statistics" in ln.lower() for ln in errors)
        summary = f"exit {code}" + (f", {rate[-1]}" if rate else "") + (f", first error: {errors[0]}" if errors else "")
        if stats_only:
            summary += " (after the run, fetching statistics of a version the rollover unloaded; no request failed)"
        command = " ".join(re.sub(r"(admin-key:).*", r"\1<secret>", a) for a in self.command)  # no key in reports
        return {"exit_code": code, "started_at": self.started_at, "ended_at": ended, "errors": errors[:5],
                "request_errors": len(request_errors), "stats_only_failure": stats_only,
                "no_failed_request": code == 0 or stats_only, "summary": summary[:500], "log": str(self.log),
                "command": command}


def start_background(spec: BackgroundSpec, grpc_url: str, cases: list[Case], duration_s: float,
                     capacity: float | None, workdir: Path, headers: dict[str, str] | None = None) -> BackgroundLoad:
    """Start perf_analyzer for about ``duration_s`` (three measurement windows, stability not required)."""
    from recserve.perf.analyzer import binary, environment

    check_loopback(grpc_url)
    workdir.mkdir(parents=True, exist_ok=True)
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
    return BackgroundLoad(proc, cmd, log, time.time())
