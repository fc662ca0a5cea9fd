"""perf-tune's pure parts: candidate grid, config override, winner choice, proposed config.pbtxt."""

from __future__ import annotations

from recserve.control.runtime.triton import DEFAULT_REPOSITORY
from recserve.perf import tune

COMMITTED = {
    "name": "ranker",
    "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
    "dynamic_batching": {
        "preferred_batch_size": [8, 16],
        "max_queue_delay_microseconds": 500,
        "default_queue_policy": {"max_queue_size": 64},
    },
}


def test_full_grid_keeps_the_queue_policy_unless_asked():
    cands = tune.candidates(tune.FULL_GRID)
    assert len(cands) == 18 and all(c.queue_policy for c in cands)
    assert len({c.label for c in cands}) == 18


def test_override_applies_the_candidate_and_leaves_the_input_alone():
    c = tune.Candidate(instances=1, delay_us=2000, preferred=(4, 8), queue_policy=False)
    cfg = tune.override(COMMITTED, c)
    assert cfg["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert "default_queue_policy" not in cfg["dynamic_batching"]
    assert COMMITTED["dynamic_batching"]["default_queue_policy"] == {"max_queue_size": 64}


def test_best_is_the_fastest_candidate_under_the_slo():
    results = [
        {"candidate": "a", "infer_per_sec": 900.0, "p99_ms": 80.0},
        {"candidate": "b", "infer_per_sec": 700.0, "p99_ms": 30.0},
        {"candidate": "c", "infer_per_sec": 650.0, "p99_ms": 10.0},
        {"candidate": "d", "infer_per_sec": 0.0, "p99_ms": None, "error": "load failed"},
    ]
    assert tune.best(results, slo_ms=50)["candidate"] == "b"
    assert tune.best(results, slo_ms=5) is None


def test_proposed_config_changes_only_scheduling():
    text = (DEFAULT_REPOSITORY / "ranker" / "config.pbtxt").read_text()
    # a model with a bounded queue (the shipped ones have none, docs/holds.md): tune keeps it unless asked
    bounded = "dynamic_batching {\n  default_queue_policy { max_queue_size: 64 }\n"
    text = text.replace("dynamic_batching {\n", bounded, 1)
    assert "max_queue_size: 64" in text
    c = tune.Candidate(instances=1, delay_us=2000, preferred=(4, 8))
    out = tune.proposed_pbtxt(text, c)
    assert "instance_group [ { count: 1, kind: KIND_CPU } ]" in out
    assert "max_queue_delay_microseconds: 2000" in out and "preferred_batch_size: [ 4, 8 ]" in out
    assert "max_queue_size: 64" in out and 'name: "ranker"' in out and "model_warmup" in out
    untouched = [ln for ln in text.splitlines() if "count:" not in ln and "preferred" not in ln and "delay" not in ln]
    assert all(ln in out for ln in untouched)
    none = tune.proposed_pbtxt(text, tune.Candidate(2, 0, (), queue_policy=False))
    assert "preferred_batch_size:" not in none and "default_queue_policy {" not in none and "dynamic_batching {" in none


def test_candidates_with_stalls_never_win():
    results = [
        {"candidate": "lucky", "infer_per_sec": 1100.0, "p99_ms": 24.0, "stalls": 3},
        {"candidate": "steady", "infer_per_sec": 700.0, "p99_ms": 30.0, "stalls": 0},
    ]
    assert tune.best(results, slo_ms=50)["candidate"] == "steady"


def test_once_leaders_are_remeasured_the_lower_figure_decides():
    results = [
        {"candidate": "a", "infer_per_sec": 1100.0, "p99_ms": 20.0, "stalls": 0, "score": 400.0},
        {"candidate": "b", "infer_per_sec": 800.0, "p99_ms": 20.0, "stalls": 0, "score": 750.0},
        {"candidate": "c", "infer_per_sec": 790.0, "p99_ms": 20.0, "stalls": 0},  # not re-measured: out
    ]
    assert tune.best(results, slo_ms=50)["candidate"] == "b"
    results[1]["score"] = 0.0  # b failed its re-measurement
    assert tune.best(results, slo_ms=50)["candidate"] == "a"
