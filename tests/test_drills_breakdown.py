"""Where the time goes: per-step Triton figures from counter deltas, and the load generator's lag."""

from __future__ import annotations

from recserve.drills.breakdown import client_lag, triton_steps


def _c(success, queue_us, infer_us, execs, failure=0.0):
    return {"nv_inference_request_success": success, "nv_inference_request_failure": failure,
            "nv_inference_queue_duration_us": queue_us, "nv_inference_compute_input_duration_us": 0.0,
            "nv_inference_compute_infer_duration_us": infer_us, "nv_inference_compute_output_duration_us": 0.0,
            "nv_inference_exec_count": execs}


def test_per_request_means_are_taken_from_deltas_summed_over_instances():
    before = {"t1": {"ranker": _c(100, 1e5, 2e5, 100)}, "t2": {"ranker": _c(0, 0, 0, 0)}}
    after = {"t1": {"ranker": _c(300, 5e5, 6e5, 150, failure=4)}, "t2": {"ranker": _c(200, 2e5, 4e5, 100)}}
    r = triton_steps(before, after)["ranker"]
    # 400 requests: queue (4e5 + 2e5) us -> 1.5 ms each, infer (4e5 + 4e5) us -> 2 ms, 150 executions -> batch 2.67
    assert r == {"requests": 400, "failures": 4, "queue_ms": 1.5, "compute_ms": 2.0, "infer_ms": 2.0,
                 "mean_batch": 2.67, "instances_counted": 2}


def test_a_restarted_instance_is_left_out_not_counted_negative():
    before = {"t1": {"ranker": _c(100, 1e5, 2e5, 100)}, "t2": {"ranker": _c(500, 1e5, 1e5, 500)}}
    after = {"t1": {"ranker": _c(200, 2e5, 3e5, 200)}, "t2": {"ranker": _c(10, 1e3, 1e3, 10)}, "t3": {}}
    r = triton_steps(before, after)["ranker"]
    assert r["requests"] == 100 and r["instances_counted"] == 1


def test_client_lag_percentiles():
    assert client_lag([0.0] * 98 + [5.0, 50.0]) == {"p50_ms": 0.0, "p99_ms": 5.0, "max_ms": 50.0}
    assert client_lag([]) == {"p50_ms": None, "p99_ms": None, "max_ms": None}
