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


def test_haproxy_timers_per_route_from_the_access_log(tmp_path):
    """The access log read back (control/routing/accesslog.py, shared with the Router's adaptive limits): a line still
    being written is left for the next read; -1 timers (never started) stay out of the percentiles."""
    from datetime import datetime

    from recserve.control.routing.accesslog import read_from
    from recserve.drills.breakdown import haproxy_timers

    def line(sec: int, backend: str, timers: str, status: int, rc: str = "0", tsc: str = "") -> str:
        return (f"id 127.0.0.1:1 [01/Dec/2026:15:16:{sec:02d}.500] fe_grpc {backend} {timers} {status} 484 {rc} "
                + (f"{tsc} " if tsc else "") + '1/1/1/1 0/0 "POST /inference.GRPCInferenceService/ModelInfer"\n')

    log = tmp_path / "access.log"
    partial = "id 127.0.0.1:1 [01/Dec/2026:15:16:09.900] fe_grpc be_grp"
    log.write_text(line(1, "be_grpc_pool/s0", "0/0/0/5/5/5", 200) + line(2, "be_grpc_pool/s1", "0/1/0/40/45", 200, "+1")
                   + line(2, "be_grpc_fallback/fb", "0/80/0/2/82/82", 200)
                   + line(2, "be_grpc_shed/<NOSRV>", "300/-1/-1/-1/300/0", 200)
                   + line(3, "fe_grpc/<NOSRV>", "0/-1/-1/-1/0/0", 403) + line(9, "be_grpc_pool/s0", "0/0/0/1/1/1", 200)
                   + line(4, "be_grpc_fallback/<NOSRV>", "0/100/-1/-1/100/100", 503, tsc="sQ--") + partial)
    entries, offset = read_from(log, 0)
    assert len(entries) == 7 and offset == log.stat().st_size - len(partial)
    assert entries[6].termination == "sQ--" and entries[0].termination == ""  # older lines: no %tsc
    assert entries[1].slot == 1 and entries[1].retries == 1 and entries[1].redispatched and entries[2].slot is None
    t0 = datetime(2026, 12, 1, 15, 16, 0).timestamp()
    timers = haproxy_timers(entries, t0, t0 + 5)  # the line at :09 is outside
    assert timers["instances"] == {"requests": 2, "tw_p50_ms": 0, "tw_p99_ms": 1, "tr_p50_ms": 5, "tr_p99_ms": 40,
                                   "ta_p50_ms": 5, "ta_p99_ms": 45, "retried": 1, "redispatched": 1, "statuses": {}}
    assert timers["degraded"]["tw_p99_ms"] == 80 and timers["refused"]["requests"] == 1
    assert timers["refused"]["tr_p99_ms"] is None and timers["front door"]["statuses"] == {"403": 1}
    assert timers["refused"]["ta_p99_ms"] == 0  # Ta, not Tt: the 300 ms idle before it is not HAProxy's time
    assert timers["refused after waiting"] == {**timers["refused after waiting"], "requests": 1, "tw_p99_ms": 100,
                                               "statuses": {"503 sQ": 1}}
    more, _ = read_from(log.parent / "missing.log", 0)
    assert more == []
