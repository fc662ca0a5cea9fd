"""The probe client without a server: loopback-only, bounded, error-tolerant, and its rate schedule.
(Its answers against a real fleet are checked by the smoke drill test.)"""

from __future__ import annotations

import asyncio

import pytest

from recserve.control.runtime.triton import free_port
from recserve.drills.probe import Case, OpenLoopProbe, check_loopback, schedule, status_name


def test_only_loopback_targets_are_accepted():
    check_loopback("127.0.0.1:8001")
    check_loopback("localhost:8001")
    for url in ("10.0.0.1:8001", "8.8.8.8:53", "192.168.1.2:80"):
        with pytest.raises(ValueError, match="loopback only"):
            check_loopback(url)
    with pytest.raises(ValueError, match="loopback only"):
        OpenLoopProbe("10.1.2.3:8001", [Case("recommend", 1, (2,))], lambda t: 1.0, 1.0)


def test_schedule_ramps_holds_and_returns():
    rate = schedule(10, [(5.0, 13.0, 50.0, 2.0)])
    assert [rate(t) for t in (0, 5, 6, 7, 12.9, 13)] == [10, 10, 30, 50, 50, 10]


def test_status_name_of_plain_errors():
    assert status_name(TimeoutError()) == "DEADLINE_EXCEEDED"
    assert status_name(OSError("x")) == "OSERROR"


def test_failures_are_recorded_not_raised_and_the_count_is_bounded():
    """A real closed loopback port: every request fails with UNAVAILABLE and is recorded."""
    port = free_port()
    cases = [Case("recommend", 1, (3, 4)), Case("search", None, (), "red shoes")]
    probe = OpenLoopProbe(f"127.0.0.1:{port}", cases, lambda t: 40.0, duration_s=0.5, timeout_s=0.5, max_requests=12)
    records = asyncio.run(probe.run_async())
    assert len(records) == 12, "max_requests bounds the run"
    assert {r.status for r in records} == {"UNAVAILABLE"}
    assert {r.model for r in records} == {"recommend", "search"}
    assert all(not r.ok and r.matched is None for r in records)
    assert [r.seq for r in records] == sorted(r.seq for r in records)


def test_duration_bounds_the_run_in_a_thread():
    probe = OpenLoopProbe(f"127.0.0.1:{free_port()}", [Case("recommend", 1)], lambda t: 20.0, duration_s=0.5,
                  timeout_s=0.3).start()
    records = probe.join(10)
    assert 5 <= len(records) <= 11, len(records)  # 20 rps for 0.5 s
