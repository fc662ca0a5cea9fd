"""The in-flight limit rule (issue 22 item 3): knee x SLO p99 (``p99``) or knee x the mean latency at the knee
(``mean``), its arithmetic, where the knee's mean comes from, and the setting. No fleet, no wall clock."""

from __future__ import annotations

import json

import pytest

from recserve.control import defaults as d
from recserve.control.routing.admission import initial_limit, limit_latency
from recserve.control.routing.router import RouterConfig, RouterError, _knee_from_report
from recserve.control.settings import Settings, flags
from recserve.drills.capacity import knee_mean_ms
from recserve.perf import report_reader
from recserve.perf.analyzer import Row
from recserve.perf.figures import capacity


def test_p99_rule_is_knee_times_slo():
    b = limit_latency("p99", 0.050)
    assert (b.rule, b.latency_s) == ("p99", 0.050)
    assert initial_limit(390, b.latency_s) == 20  # the example: 390 rps x 50 ms


def test_mean_rule_uses_the_measured_mean():
    b = limit_latency("mean", 0.050, knee_mean_s=0.020)
    assert b.latency_s == pytest.approx(0.020)
    assert "20.0 ms" in b.why
    assert initial_limit(390, b.latency_s) == 8  # ceil(7.8): the concurrency the knee ran at


def test_mean_rule_without_a_mean_divides_the_slo_by_the_documented_factor():
    for unknown in (None, 0.0):
        b = limit_latency("mean", 0.050, knee_mean_s=unknown, p99_to_mean=2.5)
        assert b.latency_s == pytest.approx(0.020)
        assert "2.5" in b.why and "no mean latency measured" in b.why
    assert d.P99_TO_MEAN == 2.5


def test_mean_above_the_slo_is_capped_at_the_slo():
    b = limit_latency("mean", 0.050, knee_mean_s=0.080)
    assert b.latency_s == pytest.approx(0.050)
    assert "capped" in b.why


def test_sqrt_rule_adds_beta_standard_deviations_to_the_mean_concurrency():
    """The quiet-host knee of docs/peak-traffic.md: 786 rps at a mean of 11.25 ms is L = 8.8 in flight; the mean
    rule caps there (9), the sqrt rule at L + 2 x sqrt(L) = 14.8 (15), the p99 rule at 40."""
    b = limit_latency("sqrt", 0.050, knee_mean_s=0.01125, knee_rps=786, beta=2.0)
    assert b.rule == "sqrt" and "8.8 in flight" in b.why and "11.2 ms" in b.why
    assert initial_limit(786, b.latency_s) == 15
    assert initial_limit(786, limit_latency("mean", 0.050, knee_mean_s=0.01125).latency_s) == 9
    assert initial_limit(786, limit_latency("sqrt", 0.050, knee_mean_s=0.01125, knee_rps=786, beta=0).latency_s) == 9
    unknown = limit_latency("sqrt", 0.050, knee_rps=390)  # no mean: SLO / 2.5 = 20 ms, L = 7.8
    assert initial_limit(390, unknown.latency_s) == 14 and "no mean latency measured" in unknown.why  # 7.8 + 5.6


def test_router_sqrt_rule_uses_the_knee_and_sqrt_beta(tmp_path):
    cfg = RouterConfig(workdir=tmp_path, knee_rps=786, slo_p99_ms=50, slots=4, limit_rule="sqrt", knee_mean_ms=11.25)
    assert d.SQRT_BETA == 2.0 and (cfg.host_limit(), cfg.limit_basis().rule) == (15, "sqrt")


@pytest.mark.parametrize("kw, word", [({"rule": "median"}, "limit rule"), ({"slo_p99_s": 0}, "slo_p99_s"),
                                      ({"knee_mean_s": -1}, "knee_mean_s"), ({"p99_to_mean": 0.5}, "p99_to_mean"),
                                      ({"rule": "sqrt"}, "knee_rps"),
                                      ({"rule": "sqrt", "knee_rps": 100, "beta": -1}, "beta")])
def test_refusals_name_the_argument(kw, word):
    args = {"rule": "mean", "slo_p99_s": 0.05} | kw
    with pytest.raises(ValueError, match=word):
        limit_latency(**args)


def test_router_host_limit_follows_the_rule(tmp_path):
    cfg = RouterConfig(workdir=tmp_path, knee_rps=390, slo_p99_ms=50, slots=4)
    assert cfg.limit_rule == d.LIMIT_RULE
    assert (cfg.host_limit(), cfg.limit_basis().rule) == (20, "p99")
    cfg.limit_rule, cfg.knee_mean_ms = "mean", 21.0
    assert cfg.host_limit() == 9  # ceil(390 x 0.021) = ceil(8.19)
    cfg.knee_mean_ms = 0.0
    assert cfg.host_limit() == 8  # 390 x 50 ms / 2.5
    cfg.knee_rps = 20  # floors still hold: min_limit
    assert cfg.host_limit() == cfg.min_limit


def test_router_config_refuses_an_unknown_rule(tmp_path):
    with pytest.raises(RouterError, match="limit_rule"):
        RouterConfig(workdir=tmp_path, limit_rule="p50").validate()
    with pytest.raises(RouterError, match="knee_mean_ms"):
        RouterConfig(workdir=tmp_path, knee_mean_ms=-3).validate()


def test_knee_from_the_perf_report_carries_its_mean(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"capacity_rps": {"recommend": 400},
                                  "capacity": {"recommend": {"model": "recommend", "via": "direct",
                                                             "capacity_rps": 400, "mean_ms_at_capacity": 18.5}}}))
    assert report_reader.knee_mean_ms("recommend", report) == 18.5
    assert report_reader.knee_mean_ms("search", report) is None
    assert _knee_from_report("recommend", report, 1)[2] == 18.5
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"capacity_rps": {"recommend": 400}}))
    assert report_reader.knee_mean_ms("recommend", old) is None


def test_perf_capacity_keeps_the_mean_at_capacity():
    rows = [Row(request_rate=r, infer_per_sec=r, p50_us=0, p90_us=0, p95_us=0, p99_us=p * 1000, avg_us=a * 1000)
            for r, p, a in ((100, 20, 8), (200, 40, 15), (300, 70, 30))]
    cap = capacity(rows, slo_ms=50)
    assert (cap.capacity_rps, cap.mean_ms_at_capacity) == (200, 15.0)


def _rung(rate, p99, mean, **kw):
    return {"offered_rps": rate, "sent": 3 * rate, "ok": 3 * rate, "failed": 0, "achieved_rps": rate,
            "p99_ms": p99, "mean_ms": mean} | kw


def test_knee_mean_from_the_ladder_is_the_passing_rung_at_the_knee():
    ladder = [_rung(300.0, 30, 99, warmup=True), _rung(300.0, 30, 12), _rung(390.0, 48, 19.5),
              _rung(507.0, 80, 40), _rung(507.0, 85, 41, repeated=True), _rung(444.6, 60, 30, refined=True),
              _rung(444.6, 61, 31, refined=True, repeated=True)]
    assert knee_mean_ms(390.0, ladder) == 19.5
    assert knee_mean_ms(300.0, ladder) == 12  # the warm-up rung is never the figure
    assert knee_mean_ms(444.6, ladder) is None  # that rate missed
    assert knee_mean_ms(None, ladder) is None
    assert knee_mean_ms(390.0, [_rung(390.0, 48, None)]) is None  # an older ladder without means


def test_the_rule_is_a_setting_with_one_default():
    names = {f.name: f for f in flags()}
    assert names["--limit-rule"].field.metadata["choices"] == d.LIMIT_RULES
    assert Settings().routing.limit_rule == d.LIMIT_RULE
    assert Settings().routing.knee_mean_ms == d.KNEE_MEAN_MS
    doc = Settings().to_dict()
    assert Settings.from_dict(doc).routing.limit_rule == d.LIMIT_RULE


def test_router_keys_include_the_rule_and_mean():
    from recserve.control.routing.router import ROUTER_KEYS_SQL

    assert "'knee_mean'" in ROUTER_KEYS_SQL and "'limit_rule'" in ROUTER_KEYS_SQL



def test_set_knee_switches_the_rule_at_runtime_and_keeps_it_with_the_knee(tmp_path):
    """``recctl limits --knee-rps K --knee-mean-ms M --limit-rule R`` (Router.set_knee): the per-server limits
    follow at once; the mean and the rule come back with the knee after a control-plane restart, and a restart
    that names its own --knee-rps drops all three. Real HAProxy, no traffic."""
    from recserve.control.routing.router import Router
    from tests.fleet_fixtures import pool_router

    with pool_router(tmp_path) as (router, cfg, state):
        def limits() -> dict[int, int]:
            return {s: ld.limit for s, ld in router.load().items()}

        assert limits() == {0: 10, 1: 10}  # p99: 400 x 50 ms = 20, two members
        router.set_knee(400, 20.0, "mean")
        assert cfg.host_limit() == 8 and limits() == {0: 4, 1: 4}
        router.set_knee(400)  # "" keeps the rule in force; the mean is the new knee's (unknown: SLO / 2.5)
        assert cfg.limit_rule == "mean" and cfg.host_limit() == 8
        router.set_knee(400, 25.0)
        assert cfg.host_limit() == 10 and limits() == {0: 5, 1: 5}
        with pytest.raises(RouterError, match="limit_rule"):
            router.set_knee(400, 20.0, "p50")
        restarted = Router(RouterConfig(workdir=cfg.workdir, grpc_port=cfg.grpc_port, http_port=cfg.http_port,
                                        slots=2, fallback=False), state)
        restarted.start()
        assert (restarted.config.limit_rule, restarted.config.knee_mean_ms) == ("mean", 25.0)
        assert restarted.config.host_limit() == 10
        named = Router(RouterConfig(workdir=cfg.workdir, grpc_port=cfg.grpc_port, http_port=cfg.http_port,
                                    slots=2, fallback=False, knee_rps=300), state)
        named.start()
        assert named.config.limit_rule == d.LIMIT_RULE and named.config.host_limit() == 15
        assert not state.get("limit_rule", "") and not state.get("knee_mean", "")

