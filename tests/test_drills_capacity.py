"""The knee ladder's rule on a simulated fleet (no server: the probe is replaced by a queueing model).

The real ladder runs in every overload drill against a real fleet; this pins down the rule: a rung passes with
0 failed, p99 under the SLO and >= 95% of the offer served; a miss counts only when the same rate misses again;
the knee is the highest rate that passed.
"""

from __future__ import annotations

import pytest

from recserve.drills import capacity
from recserve.drills.probe import Record


class FakeProbe:
    """Answers ``rate`` requests a second; past ``knee`` rps latency explodes and the excess fails."""

    knee = 300.0
    hiccup_at: float | None = None  # one rate whose first try misses (a busy host), the repeat passes
    hiccups = 1  # how many first tries at that rate miss
    calls: list[float] = []

    def __init__(self, url, cases, rate, duration_s, **_kw):
        self.rate, self.duration_s, self.t0 = rate(0.0), duration_s, 1000.0

    def start(self):
        FakeProbe.calls.append(self.rate)
        return self

    def join(self):
        n = int(self.rate * self.duration_s)
        over = self.rate > self.knee
        hiccup = self.hiccup_at == round(self.rate, 1) and FakeProbe.calls.count(self.rate) <= self.hiccups
        lat = 400.0 if over or hiccup else 10.0 + 30.0 * self.rate / self.knee
        served = int(self.knee * self.duration_s) if over else n
        return [Record(i, "recommend", self.t0 + i / self.rate, lat, "OK" if i < served else "UNAVAILABLE")
                for i in range(n)]


@pytest.fixture
def fake(monkeypatch):
    from recserve.drills import probe

    FakeProbe.calls, FakeProbe.hiccup_at, FakeProbe.knee, FakeProbe.hiccups = [], None, 300.0, 1
    monkeypatch.setattr(probe, "OpenLoopProbe", FakeProbe)
    return FakeProbe


def test_the_knee_is_the_highest_rate_that_passed_and_a_miss_must_repeat(fake):
    knee, ladder = capacity.knee_ladder("127.0.0.1:1", "recommend", slo_ms=50, start_rps=100, factor=1.3,
                                        refine=0)
    assert knee == pytest.approx(100 * 1.3 ** 4)  # 285.6 passes, 371.3 is over the simulated knee of 300
    assert ladder[-1].repeated and not ladder[-1].within(50) and not ladder[-2].within(50)
    assert all(s.within(50) for s in ladder[:-2])


def test_bisection_rungs_narrow_the_knee_between_the_last_pass_and_the_first_miss(fake):
    fake.knee = 340.0
    knee, ladder = capacity.knee_ladder("127.0.0.1:1", "recommend", slo_ms=50, start_rps=100, factor=1.3)
    refined = [s for s in ladder if s.refined and not s.repeated]
    assert [s.offered_rps for s in refined] == [325.6, 347.7]  # sqrt(285.6 x 371.3) passes, then 347.7 misses
    assert knee == pytest.approx((285.61 * 371.293) ** 0.5) and knee <= fake.knee


def test_a_hiccup_that_does_not_repeat_does_not_end_the_ladder(fake):
    fake.hiccup_at = 169.0
    knee, ladder = capacity.knee_ladder("127.0.0.1:1", "recommend", slo_ms=50, start_rps=100, factor=1.3,
                                        refine=0)
    assert knee == pytest.approx(100 * 1.3 ** 4)
    missed = [s for s in ladder if not s.within(50)]
    assert missed[0].offered_rps == 169.0 and not missed[0].repeated


def test_the_ladder_is_bounded(fake):
    fake.knee = 1e9
    knee, ladder = capacity.knee_ladder("127.0.0.1:1", "recommend", slo_ms=50, start_rps=100, max_steps=5)
    assert ladder[0].warmup and len(ladder) == 1 + 5 and knee == pytest.approx(100 * 1.3 ** 4)
    assert capacity.never_missed(ladder, 50)


def test_a_ladder_that_never_missed_reports_a_lower_bound_not_a_knee(fake, monkeypatch, tmp_path):
    """A user's small models outran the ladder's 14 rungs (1514 rps, p99 8 ms): calling that "the knee" let an
    overload drill claim 2x a capacity nobody had measured. The figure keeps its value and says what it is."""
    monkeypatch.setattr(capacity, "_MEASURED", {})
    fake.knee = 1e9
    knee, source, rows = capacity.capacity_rps("127.0.0.1:1", "recommend", 50, tmp_path, use_report=False)
    assert knee and source.startswith("a lower bound, not the knee") and f"{knee:.0f} rps" in source
    fake.knee, fake.calls = 300.0, []
    monkeypatch.setattr(capacity, "_MEASURED", {})
    knee, source, rows = capacity.capacity_rps("127.0.0.1:1", "recommend", 50, tmp_path, use_report=False)
    assert knee <= 300 and source.startswith("knee measured fresh")
    assert not capacity.never_missed([capacity.Step(**r) for r in rows], 50)


def test_a_slow_warm_up_is_shown_but_never_judged(fake):
    """A freshly started fleet answers a few of its first requests ~0.5 s late; the ladder warms it up first
    at the start rate (reported, not judged), so those cannot read as a missed SLO at the first rung."""
    fake.hiccup_at, fake.hiccups = 100.0, 2  # the first two tries at 100 rps miss (the CI run: 50 rps, twice)
    no_warm, _ = capacity.knee_ladder("127.0.0.1:1", "recommend", slo_ms=50, start_rps=100, refine=0, warm_s=0)
    assert no_warm < 100  # without the warm-up: the first rung and its repeat miss, the knee lands below it
    fake.calls = []
    knee, ladder = capacity.knee_ladder("127.0.0.1:1", "recommend", slo_ms=50, start_rps=100, factor=1.3,
                                        refine=0)
    assert ladder[0].warmup and not ladder[0].within(50) and ladder[0].sent == 100 * 15  # 15 s at 100 rps
    assert ladder[1].offered_rps == 100.0 and not ladder[1].within(50) and ladder[2].within(50)
    assert knee == pytest.approx(100 * 1.3 ** 4)


def test_the_knee_is_measured_once_per_session(fake, monkeypatch, tmp_path):
    monkeypatch.setattr(capacity, "_MEASURED", {})
    first = capacity.capacity_rps("127.0.0.1:1", "recommend", 50, tmp_path, use_report=False)
    n = len(fake.calls)
    assert capacity.capacity_rps("127.0.0.1:1", "recommend", 50, tmp_path, use_report=False) == first
    assert len(fake.calls) == n and first[0] and first[2][0]["offered_rps"] == 50.0


def test_forget_drops_only_that_fleets_knees(fake, monkeypatch, tmp_path):
    """A knee an overload proved wrong is forgotten, and the next drill at that fleet runs the ladder again."""
    monkeypatch.setattr(capacity, "_MEASURED", {})
    capacity.capacity_rps("127.0.0.1:1", "recommend", 50, tmp_path, use_report=False)
    capacity.capacity_rps("127.0.0.1:2", "recommend", 50, tmp_path, use_report=False)
    n = len(fake.calls)
    assert capacity.forget("127.0.0.1:1") == 1 and capacity.forget("127.0.0.1:1") == 0
    capacity.capacity_rps("127.0.0.1:2", "recommend", 50, tmp_path, use_report=False)
    assert len(fake.calls) == n  # the other fleet's knee stands
    capacity.capacity_rps("127.0.0.1:1", "recommend", 50, tmp_path, use_report=False)
    assert len(fake.calls) > n


def test_a_start_past_the_knee_steps_down_until_a_rate_passes(fake):
    """A start taken from a perf report (perf_analyzer direct to one instance) can lie past the front door's knee:
    a reference run started at 549 rps, missed, and measured no knee at all, so 13 drills could not size their
    load. The ladder now steps down by ``factor`` and bisects between the rate that passed and the last miss."""
    knee, ladder = capacity.knee_ladder("127.0.0.1:1", "recommend", slo_ms=50, start_rps=500, factor=1.3)
    judged = [s for s in ladder if not s.warmup and not s.repeated]
    assert [s.offered_rps for s in judged][:3] == [500.0, 384.6, 295.9]  # 500 and 384.6 miss, 295.9 passes
    assert knee == pytest.approx(500 / 1.3 ** 2) and knee <= fake.knee
    assert [s.offered_rps for s in judged if s.refined] == [337.3, 315.9]  # both past 300: they miss
    fake.knee, fake.calls = 5.0, []
    none, ladder = capacity.knee_ladder("127.0.0.1:1", "recommend", slo_ms=50, start_rps=50, factor=1.3)
    assert none == 0.0 and min(s.offered_rps for s in ladder) >= 10.0  # bounded below by min_rps
