"""The adaptive limit controller on a simulated server (no processes: the controller is pure and clock-injected).

The simulation is a queueing model of one server: below its knee (K requests in flight) the latency p99 is flat;
past it requests queue and the p99 grows exponentially with the excess, with seeded multiplicative noise. Clients
offer more concurrency than the server can take, so the limit binds and the rest is shed at the front door.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from recserve.control.routing.admission import AdaptiveLimit, IntervalSample, LimitConfig, initial_limit

SLO = 0.050
BASE_P99 = 0.020  # flat part of the curve, well under the SLO


class SimServer:
    """Latency curve with a knee at ``knee`` in flight; a server queue of ``queue`` beyond which it rejects."""

    def __init__(self, knee: int, queue: int = 10_000, noise: float = 0.05, seed: int = 1):
        self.knee = knee
        self.queue = queue
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    def p99(self, in_flight: int) -> float:
        excess = max(0, in_flight - self.knee) / self.knee
        return BASE_P99 * math.exp(3.0 * excess) * float(self.rng.lognormal(0.0, self.noise))

    def interval(self, limit: int, demand: int) -> IntervalSample:
        in_flight = min(limit, demand)
        return IntervalSample(
            p99_s=self.p99(in_flight),
            shed=max(0, demand - limit),
            queue_full=max(0, in_flight - self.knee - self.queue),
            in_flight=in_flight,
        )


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def run(ctl: AdaptiveLimit, clock: FakeClock, server: SimServer, intervals: int, demand: int) -> list[int]:
    limits = []
    for _ in range(intervals):
        clock.t += 0.5  # the control interval
        ctl.update(server.interval(ctl.limit, demand))
        limits.append(ctl.limit)
    return limits


# The p99 reaches headroom x SLO at K(1 + ln 2 / 3) ~ 1.23 K and the SLO at K(1 + ln 2.5 / 3) ~ 1.31 K.
def test_converges_near_the_knee_from_below_and_from_above():
    knee = 40
    for start in (4, 200):
        clock = FakeClock()
        ctl = AdaptiveLimit(LimitConfig(slo_p99_s=SLO, max_limit=400), start, clock)
        limits = run(ctl, clock, SimServer(knee), 400, demand=300)
        steady = limits[-200:]
        print(f"start {start}: steady limit {min(steady)}..{max(steady)} (knee {knee})")
        assert 0.8 * knee <= min(steady) and max(steady) <= 1.35 * knee, (start, min(steady), max(steady))


def test_backs_off_when_the_server_slows_down_under_overload():
    clock = FakeClock()
    ctl = AdaptiveLimit(LimitConfig(slo_p99_s=SLO, max_limit=400), 40, clock)
    server = SimServer(knee=40)
    run(ctl, clock, server, 200, demand=300)
    server.knee = 20  # the same demand now overloads a server half as fast
    limits = run(ctl, clock, server, 200, demand=300)
    assert max(limits[-100:]) <= 1.35 * 20 and min(limits[-100:]) >= 0.8 * 20, limits[-100:]
    # it got there quickly: overload is cut multiplicatively, within ~10 intervals
    assert limits[10] <= 1.35 * 20, limits[:12]


def test_queue_full_from_the_server_cuts_the_limit_even_when_latency_looks_fine():
    clock = FakeClock()
    ctl = AdaptiveLimit(LimitConfig(slo_p99_s=SLO, max_limit=400, cooldown_s=1.0), 100, clock)
    clock.t = 10.0
    d = ctl.update(IntervalSample(p99_s=0.001, queue_full=3, in_flight=100))
    assert (d.action, d.limit) == ("decrease", 80) and "queue-full" in d.reason
    clock.t += 0.5  # within the cooldown: the first cut has not shown its effect yet
    assert ctl.update(IntervalSample(p99_s=0.2, in_flight=80)).action == "hold"
    clock.t += 1.0
    assert ctl.update(IntervalSample(p99_s=0.2, in_flight=80)).limit == 64


def test_no_flapping_steady_state_sawtooth_is_slow():
    """AIMD probes, so the limit moves; hysteresis and patience keep moves rare and never back-to-back."""
    clock = FakeClock()
    ctl = AdaptiveLimit(LimitConfig(slo_p99_s=SLO, max_limit=400), 40, clock)
    limits = run(ctl, clock, SimServer(knee=40, noise=0.10, seed=7), 600, demand=300)
    steady = np.asarray(limits[-400:])
    moves = np.sign(np.diff(steady))
    nonzero = moves[moves != 0]
    reversals = int(np.count_nonzero(np.diff(nonzero) != 0)) if len(nonzero) > 1 else 0
    decreases = int(np.count_nonzero(moves < 0))
    print(f"steady 400 intervals: {int(np.count_nonzero(moves))} changes, {decreases} decreases, {reversals} reversals")
    assert decreases <= 400 / 8, decreases  # at most one cut per ~8 intervals
    # after a cut the limit holds for the cooldown (1 s = 2 intervals) before it probes upwards again
    cuts = np.flatnonzero(moves < 0)
    assert not any((moves[i + 1 : i + 3] > 0).any() for i in cuts)
    assert 0.8 * 40 <= steady.min() and steady.max() <= 1.35 * 40


def test_noise_inside_the_hysteresis_band_changes_nothing():
    """p99 hovering at 0.9 x SLO with noise: no increase (above the band) and no decrease (below the SLO)."""
    clock = FakeClock()
    ctl = AdaptiveLimit(LimitConfig(slo_p99_s=SLO, max_limit=400), 30, clock)
    rng = np.random.default_rng(3)
    for _ in range(500):
        clock.t += 0.5
        p99 = 0.9 * SLO * float(rng.uniform(0.92, 1.08))
        ctl.update(IntervalSample(p99_s=p99, shed=50, in_flight=30))
    assert ctl.limit == 30 and ctl.changes == 0
    # without the band the same noise moves the limit (what the band is for)
    flappy = AdaptiveLimit(LimitConfig(slo_p99_s=SLO, max_limit=400, headroom=1.0, patience=1, cooldown_s=0), 30, clock)
    rng = np.random.default_rng(3)
    for _ in range(500):
        clock.t += 0.5
        flappy.update(IntervalSample(p99_s=0.97 * SLO * float(rng.uniform(0.92, 1.08)), shed=50, in_flight=30))
    assert flappy.changes > 50


def test_unused_limit_is_not_raised_and_bounds_hold():
    clock = FakeClock()
    ctl = AdaptiveLimit(LimitConfig(slo_p99_s=SLO, min_limit=5, max_limit=12, patience=1, cooldown_s=0), 10, clock)
    for _ in range(20):
        d = ctl.update(IntervalSample(p99_s=0.001, in_flight=2))  # idle: fast, but nothing presses on the limit
    assert ctl.limit == 10 and d.reason == "limit not binding"
    for _ in range(20):
        ctl.update(IntervalSample(p99_s=0.001, shed=5, in_flight=ctl.limit))
    assert ctl.limit == 12
    for _ in range(20):
        ctl.update(IntervalSample(p99_s=1.0, in_flight=ctl.limit))
    assert ctl.limit == 5
    assert ctl.update(IntervalSample(p99_s=None)).reason == "no latency measured"


def test_initial_limit_is_littles_law_with_bounds():
    assert initial_limit(1000, 0.050) == 50
    assert initial_limit(1000, 0.0501) == 51  # rounded up
    assert initial_limit(10, 0.01) == 1 and initial_limit(10, 0.01, min_limit=4) == 4
    assert initial_limit(1e6, 1.0, max_limit=256) == 256


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: initial_limit(0, 0.05), "knee_rps must be a finite number > 0"),
        (lambda: initial_limit(100, float("nan")), "target_latency_s must be a finite number > 0"),
        (lambda: initial_limit(100, 0.05, min_limit=0), "min_limit must be an integer >= 1"),
        (lambda: initial_limit(100, 0.05, min_limit=8, max_limit=4), r"max_limit must be an integer >= min_limit"),
        (lambda: LimitConfig(slo_p99_s=-1), "slo_p99_s must be"),
        (lambda: LimitConfig(slo_p99_s=0.05, backoff=1.0), r"backoff must be in \(0, 1\)"),
        (lambda: LimitConfig(slo_p99_s=0.05, headroom=0), r"headroom must be in \(0, 1\]"),
        (lambda: LimitConfig(slo_p99_s=0.05, patience=0), "patience must be an integer >= 1"),
        (lambda: AdaptiveLimit(LimitConfig(slo_p99_s=0.05, max_limit=10), 11), r"initial must be an integer in"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(call, match):
    with pytest.raises(ValueError, match=match):
        call()
