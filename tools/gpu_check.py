"""tools/gpu-check: the first real run of recserve's TensorRT path, on a user's GPU host (under 10 minutes).

Why: the TensorRT path (build/trt.py, control/backends/tensorrt/, the *_trt configs) has never run on a GPU in
this project; the machines it was written on have none, and the GPU machine sometimes lent cannot install
TensorRT. This script is what a user with one NVIDIA GPU runs on the host, after ``make setup`` and
``.venv/bin/pip install -e '.[gpu]'`` (tensorrt-cu12==10.5.0, the TensorRT of ``tritonserver:24.10-py3``, so the
engines it builds load in that container). Inside the container itself it needs a Python 3.11 environment with
recserve installed (recserve requires 3.11; check the container's own Python first). It

1. builds the models and the TensorRT engines (``python -m recserve.build.pipeline``: a failed engine fails the build),
2. reads each engine's check against onnxruntime from its manifest (precision really built, top-10 overlap),
3. serves recommend/search and recommend_trt/search_trt on one embedded tritonserver and compares the served
   TensorRT answers with the ONNX ones for every golden request,
4. runs the perf suite ``gpu`` (trt_vs_onnx, the *_trt ensembles' concurrency ladder),
5. measures the *_trt scheduling guesses with ``perf tune ranker_trt --quick`` (a proposed config),

and writes every figure to ONE file (``reports/gpu-check/<UTC time>.json``, or ``--out``). Each step is
bounded; a failed step is recorded with its reason, and the exit code is non-zero when any step failed.
Without a GPU or TensorRT it stops with one line saying which (exit 2); ``--dry-run`` lists the steps.
"""

from __future__ import annotations

import sys

if sys.version_info[:2] != (3, 11):  # before anything newer is imported: one clear line, not a traceback
    print(f"gpu-check: needs Python 3.11 (recserve's), this is {sys.version.split()[0]}: run it from the "
          "project's .venv (make setup)", file=sys.stderr)
    sys.exit(2)

import argparse
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TRT_MODELS = ("retrieval_trt", "ranker_trt", "search_model_trt")
#: The whole check must stay under 10 minutes on one GPU; each step has its own share.
STEP_TIMEOUT_S = {"build": 200, "engine-checks": 10, "serve-parity": 120, "perf": 150, "tune": 100}
#: Served TensorRT answers must share at least this much of the ONNX answers' top 10 (the build's bar).
SERVED_TOP10_MIN = 0.99
EXIT_NO_GPU = 2


@dataclass
class Ctx:
    repository: Path
    python: str
    figures: dict


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    run: Callable[[Ctx], dict]


def preflight() -> str:
    """'' when this host can run the check, else one line saying what is missing."""
    try:
        from recserve.build import trt as trt_mod
    except ImportError as exc:
        return f"gpu-check: recserve's dependencies are missing in {sys.executable} ({exc}): run make setup"
    ok, why = trt_mod.availability()
    if not ok:
        return (f"gpu-check: cannot run here: {why} (needs an NVIDIA GPU and tensorrt-cu12==10.5.0: "
                "pip install -e '.[gpu]')")
    import tensorrt

    if not tensorrt.__version__.startswith("10.5."):
        return (f"gpu-check: TensorRT {tensorrt.__version__} found; engines must be built by 10.5 (the NGC 24.10 "
                f"container's) to load there: pip install 'tensorrt-cu12==10.5.0'")
    return ""


def _sub(ctx: Ctx, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([ctx.python, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def step_build(ctx: Ctx) -> dict:
    """Build data, models, ONNX and the TensorRT engines (new versions)."""
    p = _sub(ctx, ["-m", "recserve.build.pipeline", "--repository", str(ctx.repository)], STEP_TIMEOUT_S["build"])
    if p.returncode != 0:
        raise RuntimeError(f"build.pipeline exited {p.returncode}:\n{_tail(p.stdout + p.stderr)}")
    return {"exit_code": 0, "log_tail": _tail(p.stdout, 8)}


def latest_manifest(repository: Path, model: str) -> dict:
    from recserve.build.reference import latest_version_dir

    return json.loads((latest_version_dir(repository, model) / "manifest.json").read_text())


def step_engine_checks(ctx: Ctx) -> dict:
    """Each engine's check against onnxruntime, as its manifest recorded it."""
    out = {}
    for m in TRT_MODELS:
        man = latest_manifest(ctx.repository, m)
        chk = man["tensorrt_check"]
        out[m] = {k: chk.get(k) for k in ("tensorrt", "precision_requested", "precision", "fp32_fallback",
                                          "top10_overlap_vs_onnxruntime", "threshold", "layer_output_types")}
        out[m].update(version=man["version"], gpu=man.get("gpu"))
    return out


def overlap10(a: list[int], b: list[int]) -> float:
    """Share of ``a``'s top 10 that ``b``'s top 10 also holds."""
    return len(set(a[:10]) & set(b[:10])) / max(1, len(set(a[:10])))


def step_serve_parity(ctx: Ctx) -> dict:
    """Serve both ensembles and their TensorRT twins; compare every golden request's answers."""
    import tempfile

    from recserve.control.client import RecClient
    from recserve.control.fleet.golden import ask, golden_json_path, load_request_set
    from recserve.control.runtime.triton import TritonConfig, TritonServer

    workdir = Path(tempfile.mkdtemp(prefix="recserve-gpu-check-"))
    server = TritonServer(TritonConfig(model_repository=ctx.repository, workdir=workdir,
                                       models=["recommend", "search", "recommend_trt", "search_trt"],
                                       startup_timeout_s=STEP_TIMEOUT_S["serve-parity"] - 30))
    overlaps: dict[str, list[float]] = {"recommend": [], "search": []}
    latency: dict[str, list[float]] = {"onnx": [], "trt": []}
    try:
        server.start()
        with RecClient(server.grpc_url) as onnx, RecClient(server.grpc_url, model_suffix="_trt") as trt:
            for reqs in load_request_set(golden_json_path(ctx.repository)):
                t0 = time.perf_counter()
                a = ask(onnx, reqs)
                t1 = time.perf_counter()
                b = ask(trt, reqs)
                latency["onnx"].append(t1 - t0)
                latency["trt"].append(time.perf_counter() - t1)
                for model in overlaps:
                    overlaps[model].append(overlap10(a[model].item_ids, b[model].item_ids))
    finally:
        server.stop()
    worst = {m: min(v) for m, v in overlaps.items()}
    result = {"requests": len(overlaps["recommend"]), "worst_top10_overlap": worst, "threshold": SERVED_TOP10_MIN,
              "mean_pair_seconds": {k: round(sum(v) / len(v), 4) for k, v in latency.items()}}
    if min(worst.values()) < SERVED_TOP10_MIN:
        raise RuntimeError(f"served TensorRT answers differ from ONNX: {result}")
    return result


def _latest_report(base: Path) -> dict:
    latest = base / "latest" / "report.json"
    return json.loads(latest.read_text())


def step_perf(ctx: Ctx) -> dict:
    """perf suite 'gpu': trt_vs_onnx and the *_trt ensembles' concurrency ladder."""
    reports = REPO_ROOT / "reports" / "perf"
    p = _sub(ctx, ["-m", "recserve.perf", "--repository", str(ctx.repository), "--reports", str(reports), "run", "gpu"],
             STEP_TIMEOUT_S["perf"])
    if p.returncode != 0:
        raise RuntimeError(f"perf run gpu exited {p.returncode}:\n{_tail(p.stdout + p.stderr)}")
    rep = _latest_report(reports)
    return {"report": str((reports / "latest").resolve()),
            **{k: rep.get(k) for k in ("versions", "ratios", "capacity_rps", "runs", "skipped", "errors")}}


def step_tune(ctx: Ctx) -> dict:
    """perf tune ranker_trt --quick: measures the guessed instance count / queue delay / preferred batches."""
    reports = REPO_ROOT / "reports" / "perf"
    p = _sub(ctx, ["-m", "recserve.perf", "--repository", str(ctx.repository), "--reports", str(reports), "tune",
                   "ranker_trt", "--quick"], STEP_TIMEOUT_S["tune"])
    if p.returncode != 0:
        raise RuntimeError(f"perf tune ranker_trt exited {p.returncode}:\n{_tail(p.stdout + p.stderr)}")
    return {"output_tail": _tail(p.stdout, 20)}


STEPS = (
    Step("build", "build data, models, ONNX and TensorRT engines (python -m recserve.build.pipeline; engine failure = "
         "failed build)", step_build),
    Step("engine-checks", "read each engine's check vs onnxruntime from its manifest (precision built, top-10 "
         "overlap)", step_engine_checks),
    Step("serve-parity", "serve recommend/search and recommend_trt/search_trt; served TensorRT answers vs ONNX "
         f"for every golden request (top-10 overlap >= {SERVED_TOP10_MIN})", step_serve_parity),
    Step("perf", "perf suite 'gpu' (perf/suites/gpu.yaml): trt_vs_onnx, *_trt ensembles at concurrency "
         "1..32", step_perf),
    Step("tune", "perf tune ranker_trt --quick: measure the *_trt scheduling guesses, propose a config", step_tune),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="list the steps and exit; needs no GPU")
    p.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--out", type=Path, default=None, help="figures file (default: reports/gpu-check/<UTC>.json)")
    args = p.parse_args(argv)
    if args.dry_run:
        for i, s in enumerate(STEPS, 1):
            print(f"{i}. {s.name} (<= {STEP_TIMEOUT_S[s.name]} s): {s.what}")
        print(f"figures -> {args.out or REPO_ROOT / 'reports' / 'gpu-check' / '<UTC time>.json'}")
        return 0
    problem = preflight()
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_NO_GPU
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO_ROOT / "reports" / "gpu-check" / f"{stamp}.json"
    ctx = Ctx(args.repository.resolve(), sys.executable, {})
    doc: dict = {"started_utc": stamp, "host": os.uname().nodename, "steps": {}}
    from recserve.build import trt as trt_mod

    doc["tensorrt"] = trt_mod.availability()[1]
    failed = False
    t_all = time.monotonic()
    for s in STEPS:
        print(f"gpu-check: {s.name}: {s.what}", flush=True)
        t0 = time.monotonic()
        try:
            figures = s.run(ctx)
            entry = {"ok": True, "seconds": round(time.monotonic() - t0, 1), "figures": figures}
        except (RuntimeError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
            failed = True
            entry = {"ok": False, "seconds": round(time.monotonic() - t0, 1), "error": f"{type(exc).__name__}: {exc}"}
            print(f"gpu-check: {s.name} FAILED: {entry['error']}", file=sys.stderr)
        doc["steps"][s.name] = entry
        if s.name == "build" and not entry["ok"]:
            break  # nothing to check without engines
    doc["seconds"] = round(time.monotonic() - t_all, 1)
    doc["passed"] = not failed
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"gpu-check: {'passed' if not failed else 'FAILED'} in {doc['seconds']} s; figures: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
