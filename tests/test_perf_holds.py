"""The holds experiment's model-config variants (perf/holds.py): each changes exactly what it names."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from recserve.control.runtime.triton import DEFAULT_REPOSITORY
from recserve.perf.holds import variant_repository

BATCHED = {"ranker", "retrieval", "search_model", "recommend_pre", "recommend_post", "search_pre"}


def _cfg(repo, model):
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_shipped_configs_let_triton_prefetch_no_priority_levels_no_queue_policy(tmp_path):
    """Triton 2.51 turns prefetching off (and dispatches through a consumer count with a 500 ms wait) when a model has
    priority levels or a default queue policy with a timeout, an override or a size (scheduler_utils.cc)."""
    assert variant_repository(DEFAULT_REPOSITORY, tmp_path / "c", "committed") == []
    for model in BATCHED:
        db = _cfg(tmp_path / "c", model).dynamic_batching
        assert db.priority_levels == 0 and not db.priority_queue_policy, model
        assert not db.HasField("default_queue_policy"), model


def test_variants_add_exactly_the_queue_settings_they_name(tmp_path):
    changed = variant_repository(DEFAULT_REPOSITORY, tmp_path / "q", "queue-policy")
    assert BATCHED <= set(changed)
    q = _cfg(tmp_path / "q", "ranker")
    db = q.dynamic_batching
    assert db.priority_levels == 2 and db.default_priority_level == 2
    assert db.priority_queue_policy[1].max_queue_size == 8 and db.default_queue_policy.max_queue_size == 64
    assert db.default_queue_policy.default_timeout_microseconds == 1_000_000
    shipped = _cfg(DEFAULT_REPOSITORY, "ranker")
    assert list(db.preferred_batch_size) == list(shipped.dynamic_batching.preferred_batch_size)  # batching unchanged
    assert q.instance_group == shipped.instance_group

    variant_repository(DEFAULT_REPOSITORY, tmp_path / "t", "no-timeout")
    nt = _cfg(tmp_path / "t", "ranker").dynamic_batching
    assert nt.priority_levels == 2 and nt.default_queue_policy.default_timeout_microseconds == 0
    assert not nt.default_queue_policy.allow_timeout_override and nt.default_queue_policy.max_queue_size == 64
    with pytest.raises(ValueError, match="unknown variant"):
        variant_repository(DEFAULT_REPOSITORY, tmp_path / "x", "faster")
