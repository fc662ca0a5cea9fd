"""The TensorRT path's CPU-testable parts: tools/gpu-check's refusal and dry run, build/trt.py's honesty rules.

TensorRT and a GPU cannot run here, so ``build_and_check`` is replaced by stand-ins where a test needs an engine
result (said at each such test); the real path is exercised only by tools/gpu-check on a GPU host.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from recserve.build import trt as trt_mod
from recserve.control.runtime.triton import REPO_ROOT, tensorrt_available

GPU_CHECK = REPO_ROOT / "tools" / "gpu-check"
HAVE_TRT = trt_mod.availability()[0]


def test_dry_run_lists_every_step_within_ten_minutes():
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import gpu_check

    out = subprocess.run([str(GPU_CHECK), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [ln.split(" ")[1] for ln in lines[:-1]] == [s.name for s in gpu_check.STEPS]
    assert "figures ->" in lines[-1]
    assert sum(gpu_check.STEP_TIMEOUT_S.values()) < 600


@pytest.mark.skipif(HAVE_TRT, reason="this host has TensorRT and a GPU: run tools/gpu-check itself")
def test_without_gpu_or_tensorrt_it_stops_with_one_clear_line(tmp_path):
    out = subprocess.run([str(GPU_CHECK), "--out", str(tmp_path / "f.json")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("gpu-check: cannot run here:") and "tensorrt" in out.stderr.lower()
    assert not (tmp_path / "f.json").exists()


@pytest.mark.skipif(HAVE_TRT, reason="this host has TensorRT and a GPU")
def test_no_tensorrt_models_are_servable_here_and_torch_is_not_asked():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from recserve.control.runtime.triton import tensorrt_available\nprint(tensorrt_available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    assert tensorrt_available() is False and trt_mod.cuda_gpus() == []


def test_precision_is_what_the_engine_runs_not_what_was_asked():
    fp32_only = {"Row major linear FP32 format": 12, "Row major linear Int64 format": 2}
    mixed = {"Row major linear FP16 format": 9, "Row major linear FP32 format": 3}
    assert trt_mod.precision_used(True, fp32_only) == "fp32"  # FP16 allowed, no layer took it
    assert trt_mod.precision_used(True, mixed) == "fp16"
    assert trt_mod.precision_used(False, mixed) == "fp32"


def test_a_failed_engine_is_a_problem_not_a_skip(monkeypatch, tmp_path):
    """Stand-ins for build_and_check (TensorRT cannot run here): a raising build and a failed check."""
    def raises(*_a, **_k):
        raise RuntimeError("TensorRT engine build failed for x.onnx")

    monkeypatch.setattr(trt_mod, "build_and_check", raises)
    plan, check, problem = trt_mod.build_checked("ranker", tmp_path / "x.onnx", tmp_path, tmp_path / "c", {}, {})
    assert plan is None and "engine build failed" in problem

    failed = {"passed": False, "top10_overlap_vs_onnxruntime": 0.8}
    monkeypatch.setattr(trt_mod, "build_and_check", lambda *_a, **_k: (tmp_path / "p", failed))
    _, _, problem = trt_mod.build_checked("ranker", tmp_path / "x.onnx", tmp_path, tmp_path / "c", {}, {})
    assert "0.8" in problem and "FP32" in problem


@pytest.mark.skipif(HAVE_TRT, reason="this host has TensorRT and a GPU")
def test_tensorrt_shim_refuses_to_load_with_a_clear_reason(tmp_path):
    """The real shim in a real tritonserver: without TensorRT a *_trt model fails to load and says why (the
    instance group is moved to CPU here, else Triton refuses KIND_GPU before the shim runs)."""
    from recserve.control.runtime.triton import TritonConfig, TritonError, TritonServer

    repo = tmp_path / "repo"
    (repo / "ranker_trt" / "1").mkdir(parents=True)
    (repo / "ranker_trt" / "config.pbtxt").write_text(
        (REPO_ROOT / "model_repository" / "ranker_trt" / "config.pbtxt").read_text().split("model_warmup")[0]
        .replace("KIND_GPU", "KIND_CPU")
    )
    (repo / "ranker_trt" / "1" / "model.plan").write_bytes(b"not an engine")
    srv = TritonServer(TritonConfig(model_repository=repo, workdir=tmp_path / "w", models=["ranker_trt"],
                                    startup_timeout_s=60))
    try:
        with pytest.raises(TritonError) as err:
            srv.start()
    finally:
        srv.stop()
    assert "ranker_trt" in str(err.value) and "needs the 'tensorrt' package" in str(err.value), str(err.value)
