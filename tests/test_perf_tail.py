"""perf/tail.py's verdict and refusals (the measuring run itself needs a fleet: docs/holds.md has its figures)."""

from __future__ import annotations

import pytest

from recserve.perf import tail


def _leg(round_: int, via: str, over: int, p999: float) -> dict:
    return {"round": round_, "via": via, "over_4x_slo": over, "p999_ms": p999}


def test_the_front_door_is_judged_against_direct_in_the_same_round():
    legs = [_leg(1, "front door", 0, 30.0), _leg(1, "direct to t1", 0, 35.0),
            _leg(2, "front door", 2, 250.0), _leg(2, "direct to t1", 0, 40.0)]
    v = tail.verdict(legs + [_leg(2, "direct to each instance", 3, 300.0)])
    assert v["round 1 vs direct to t1"]["over_4x_no_worse"] and v["round 1 vs direct to t1"]["p999_no_worse"]
    two = v["round 2 vs direct to t1"]
    assert not two["over_4x_no_worse"] and not two["p999_no_worse"]
    every = v["round 2 vs direct to each instance"]  # the same host load: there the front door was no worse
    assert every["over_4x_no_worse"] and every["p999_no_worse"] and set(v) == {
        "round 1 vs direct to t1", "round 2 vs direct to t1", "round 2 vs direct to each instance"}


@pytest.mark.parametrize("argv, field", [(["--x-knee", "0"], "--x-knee"), (["--x-knee", "1.5"], "--x-knee"),
                                         (["--seconds", "5"], "--seconds"), (["--rounds", "0"], "--rounds")])
def test_bad_arguments_are_refused_before_any_fleet_starts(argv, field, capsys):
    with pytest.raises(SystemExit) as exc:
        tail.main(argv)
    assert exc.value.code == 2 and field in capsys.readouterr().err


def test_a_leg_counts_every_request_and_the_tail_by_the_drills_rule(monkeypatch):
    """A leg's figures are the drills' window_stats over all its requests (a failed one counts in the tail too)."""
    import time

    from recserve.drills.probe import Record
    from recserve.drills.timeline import TAIL_SLO_FACTOR

    now = time.time()
    recs = [Record(i, "recommend", now + 1 + i * 0.01, 5.0 if i < 95 else 250.0, "OK") for i in range(100)]
    recs.append(Record(100, "recommend", now + 2, 3000.0, "UNAVAILABLE"))
    monkeypatch.setattr(tail, "_send", lambda urls, cases, rps, seconds: recs if seconds > 10 else [])
    row = tail.leg(["127.0.0.1:1"], [], 10.0, 20.0, 50.0, None)
    assert TAIL_SLO_FACTOR == 4.0 and (row["requests"], row["failed"], row["over_4x_slo"]) == (101, 1, 6)
    assert row["p99_ms"] == 250.0 and row["max_ms"] == 250.0 and "haproxy" not in row


def test_cores_used_are_cpu_seconds_over_the_leg_per_group_of_processes():
    """The cores each group used: CPU seconds spent during the leg over its length; this process is the load
    generator, and a fleet root that is gone leaves only it."""
    import os

    before = {1: ("load generator", 1.0), 2: ("haproxy", 2.0), 3: ("python stubs", 1.0)}
    after = {1: ("load generator", 3.0), 2: ("haproxy", 2.5), 4: ("tritonserver", 4.0), 5: ("python stubs", 0.5)}
    # stub 3 was replaced by stub 5 during the leg: 0.5 s, not 0.5 - 1.0
    assert tail.cores_used(before, after, 10.0) == {"haproxy": 0.05, "load generator": 0.2, "python stubs": 0.05,
                                                    "tritonserver": 0.4}
    mine = tail.cpu_reading(None)
    assert list(mine) == [os.getpid()] and mine[os.getpid()][0] == "load generator" and mine[os.getpid()][1] > 0
    import subprocess

    fleet = subprocess.Popen(["sleep", "30"])  # a stand-in root: any process tree reads the same way
    try:
        groups = {g for g, _ in tail.cpu_reading(fleet.pid).values()}
        assert groups == {"load generator", "other fleet processes"}
    finally:
        fleet.kill()
        fleet.wait(5)


def test_connections_to_the_instances_are_counted_over_the_grpc_servers_only():
    text = ("# pxname,svname,stot,connect,reuse,\n"
            "be_grpc_pool,s0,100,3,97,\nbe_grpc_pool,s1,50,2,48,\nbe_grpc_pool,BACKEND,150,5,145,\n"
            "be_http_pool,s0,9,9,0,\nbe_grpc_fallback,fb,7,7,0,\nchk,s0,0,0,0,\n")
    assert tail.count_connections(text) == {"new": 5, "reused": 145}
    assert tail.count_connections("") == {"new": 0, "reused": 0}
