"""The warm-up's judgement and plan as pure functions (control/fleet/warmup.py); no server."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.control import defaults as d
from recserve.control.fleet import warmup as w
from recserve.control.fleet.config import FleetConfig, FleetError
from recserve.control.fleet.golden import DEFAULT_SET


def counters(batches: dict[int, tuple[int, float]], requests: int = 0) -> w.Counters:
    """batch size -> (executions, ms per execution)."""
    return w.Counters(requests=requests, executions=sum(n for n, _ in batches.values()),
                      batches={b: (n, int(n * ms * 1e6)) for b, (n, ms) in batches.items()})


def test_stats_answer_is_parsed_and_subtracted():
    doc = {"model_stats": [{"name": "ranker", "version": "1", "execution_count": 3, "inference_stats": {
        "success": {"count": 17, "ns": 9}, "queue": {"count": 17, "ns": 1700},
        "compute_infer": {"count": 17, "ns": 34000}},
        "batch_stats": [{"batch_size": 1, "compute_infer": {"count": 1, "ns": 2000}},
                        {"batch_size": 8, "compute_infer": {"count": 2, "ns": 16000}}]}]}
    c = w.parse_stats(doc)
    assert (c.requests, c.queue_ns, c.compute_ns, c.executions) == (17, 1700, 34000, 3)
    assert c.batches == {1: (1, 2000), 8: (2, 16000)}
    assert c.per_execution_us(8) == 8.0 and c.per_execution_us(16) is None
    assert c.per_request_us() == (0.1, 2.0)
    later = w.Counters(20, 2000, 40000, 4, {1: (2, 5000), 8: (2, 16000)})
    delta = later - c
    assert delta.batches == {1: (1, 3000)}  # batch 8 did not run in between
    assert w.deltas({"ranker": later}, {"ranker": c})["ranker"] == delta
    assert w.parse_stats({"model_stats": []}) == w.Counters()


def test_warm_when_every_model_is_within_the_ratio_of_the_serving_instance_at_its_batch_sizes():
    ref = {"ranker": counters({1: (100, 2.0)}), "retrieval": counters({1: (100, 1.0), 8: (10, 4.0)})}
    new = {"ranker": counters({1: (8, 2.5), 8: (8, 9.0)}), "retrieval": counters({1: (8, 1.2), 8: (8, 5.0)})}
    j = w.judge(new, ref, 1.5, ["ranker", "retrieval"])
    assert j.warm, j.text()
    by = {f.model: f for f in j.figures}
    # the ranker's batch-8 executions have no serving figure: judged on batch 1 only
    assert by["ranker"].batches == (1,) and by["ranker"].ratio == pytest.approx(1.25)
    assert by["retrieval"].batches == (1, 8)
    assert by["retrieval"].ratio == pytest.approx((8 * 1.2 + 8 * 5.0) / (8 * 1.0 + 8 * 4.0))
    assert "x1.25" in j.text()


def test_one_slow_model_is_not_warm_and_the_figures_say_which():
    ref = {"ranker": counters({1: (100, 2.0)}), "retrieval": counters({1: (100, 1.0)})}
    new = {"ranker": counters({1: (8, 6.0)}), "retrieval": counters({1: (8, 1.0)})}
    j = w.judge(new, ref, 1.5, ["ranker", "retrieval"])
    assert not j.warm
    assert "ranker 6.00 vs 2.00 ms serving at batch 1 (x3.00, slow)" in j.text()


def test_a_reference_with_too_few_executions_gives_no_figure_and_the_own_best_round_is_the_yardstick():
    ref = {"ranker": counters({1: (w.MIN_REF_EXECUTIONS - 1, 1.0)})}
    new = {"ranker": counters({1: (8, 3.0)})}
    first = w.judge(new, ref, 1.5, ["ranker"])
    assert not first.warm and first.figures[0].source == "none"  # round 1 without a serving figure: no yardstick
    settled = w.judge(new, ref, 1.5, ["ranker"], own_best={"ranker": 2.5e3})
    assert settled.warm and settled.figures[0].source == "own"
    still = w.judge(new, ref, 1.5, ["ranker"], own_best={"ranker": 1.5e3})
    assert not still.warm


def test_a_model_the_round_did_not_reach_is_not_warm():
    j = w.judge({"ranker": counters({})}, {"ranker": counters({1: (100, 1.0)})}, 1.5, ["ranker", "retrieval"])
    assert not j.warm and [f.text() for f in j.figures] == ["ranker: no execution", "retrieval: no execution"]
    assert not w.judge({}, {}, 1.5, []).warm


def test_the_reference_is_its_executions_during_the_warm_up_else_all_of_them():
    total = {"ranker": counters({1: (1000, 2.0), 8: (6, 9.0)})}
    window = {"ranker": counters({1: (50, 3.0), 8: (1, 20.0)})}
    ref = w.reference_counters(window, total)["ranker"]
    assert ref.per_execution_us(1) == pytest.approx(3000)  # same moment, same host: the window
    assert ref.per_execution_us(8) == pytest.approx(9000)  # one execution in the window is no figure


def test_batch_sizes_are_one_and_the_preferred_sizes_within_every_max_batch_size():
    configs = {
        "recommend": {"max_batch_size": 64, "ensemble_scheduling": {"step": [{"model_name": "pre"},
                                                                            {"model_name": "ranker"}]}},
        "pre": {"max_batch_size": 64, "dynamic_batching": {"preferred_batch_size": [64]}},  # Triton's fill-in
        "ranker": {"max_batch_size": 64, "dynamic_batching": {"preferred_batch_size": [8, 16]},
                   "instance_group": [{"count": 2}]},
        "small": {"max_batch_size": 4, "dynamic_batching": {"preferred_batch_size": [2, 8]}},
        "plain": {"max_batch_size": 0},
    }
    steps = w.step_closure(configs, "recommend")
    assert steps == ("pre", "ranker")
    assert w.batch_sizes(configs, "recommend", steps) == (1, 8, 16)
    assert w.batch_sizes(configs, "small", ("small",)) == (1, 2)
    assert w.batch_sizes(configs, "plain", ("plain",)) == (1,)
    assert w.instance_count(configs["ranker"]) == 2 and w.instance_count(configs["pre"]) == 1


class _Golden:
    request_set = [{k: dict(v) for k, v in pair.items()} for pair in DEFAULT_SET[:2]]


class _Client:
    def __init__(self):
        self.calls = []

    def infer(self, model, inputs, types, outputs):
        self.calls.append((model, {k: np.asarray(v).shape for k, v in inputs.items()}, types, outputs))
        return {}


def test_the_demo_golden_requests_become_batches_of_real_requests():
    configs = {"recommend": {"max_batch_size": 64, "ensemble_scheduling": {"step": [{"model_name": "ranker"}]}},
               "search": {"max_batch_size": 64, "ensemble_scheduling": {"step": [{"model_name": "search_model"}]}},
               "ranker": {"max_batch_size": 64, "dynamic_batching": {"preferred_batch_size": [8]}},
               "search_model": {"max_batch_size": 64}}
    targets = {t.model: t for t in w.golden_targets(_Golden(), configs)}
    assert targets["recommend"].batches == (1, 8) and targets["search"].batches == (1,)
    client = _Client()
    for call in targets["recommend"].requests(8) + targets["search"].requests(1):
        call(client)
    rec = [c for c in client.calls if c[0] == "recommend"]
    assert [c[1] for c in rec] == [{"user_id": (8, 1), "history": (8, 3)}] * 2
    srch = [c for c in client.calls if c[0] == "search"]
    assert srch[0][1] == {"query": (1, 1)} and srch[0][2] == {"query": "BYTES"}


def test_switched_off_sends_nothing():
    r = w.warm_up(None, w.Endpoint("127.0.0.1:1", None, {}), None, {}, _Golden(), w.WarmupConfig(rounds=0))
    assert r.warm and r.rounds == 0 and "switched off" in r.text()


def test_settings_reach_the_fleet_config_with_their_defaults_from_one_place():
    from recserve.control import settings as s

    cfg = s.Settings()
    assert (cfg.fleet.warmup_rounds, cfg.fleet.warmup_ratio, cfg.fleet.warmup_deadline_s) == (
        d.WARMUP_ROUNDS, d.WARMUP_RATIO, d.WARMUP_DEADLINE_S)
    assert w.WarmupConfig() == w.WarmupConfig(d.WARMUP_ROUNDS, d.WARMUP_RATIO, d.WARMUP_DEADLINE_S)
    import argparse

    p = argparse.ArgumentParser()
    s.add_flags(p, cli=True)
    ns = p.parse_args(["--warmup-rounds", "3", "--warmup-ratio", "2", "--warmup-deadline", "5"])
    fc = s.fleet_config(s.from_args(ns), frontdoor=FleetConfig().frontdoor)
    assert (fc.warmup_rounds, fc.warmup_ratio, fc.warmup_deadline_s) == (3, 2.0, 5.0)
    with pytest.raises(SystemExit):
        p.parse_args(["--warmup-ratio", "0.5"])
    with pytest.raises(FleetError, match="warm-up"):
        FleetConfig(warmup_ratio=0.9).validate()
