"""The holds experiment's model-config variants (perf/holds.py): each changes exactly what it names."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from recserve.control.triton import DEFAULT_REPOSITORY
from recserve.perf.holds import variant_repository


def _cfg(repo, model):
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_variants_change_only_the_queue_settings_they_name(tmp_path):
    assert variant_repository(DEFAULT_REPOSITORY, tmp_path / "c", "committed") == []
    committed = _cfg(tmp_path / "c", "ranker").dynamic_batching
    assert committed.priority_levels == 2 and committed.default_queue_policy.default_timeout_microseconds > 0

    changed = variant_repository(DEFAULT_REPOSITORY, tmp_path / "p", "plain")
    assert {"ranker", "retrieval", "search_model", "recommend_pre", "recommend_post", "search_pre"} <= set(changed)
    plain = _cfg(tmp_path / "p", "ranker").dynamic_batching
    # what Triton 2.51 needs for prefetching: no priority levels, no timeout, no override, no queue size
    assert plain.priority_levels == 0 and not plain.HasField("default_queue_policy") and not plain.priority_queue_policy
    assert list(plain.preferred_batch_size) == list(committed.preferred_batch_size)  # batching itself unchanged
    assert _cfg(tmp_path / "p", "ranker").instance_group == _cfg(tmp_path / "c", "ranker").instance_group

    variant_repository(DEFAULT_REPOSITORY, tmp_path / "t", "no-timeout")
    nt = _cfg(tmp_path / "t", "ranker").dynamic_batching
    assert nt.priority_levels == 2 and nt.default_queue_policy.default_timeout_microseconds == 0
    assert not nt.default_queue_policy.allow_timeout_override and nt.default_queue_policy.max_queue_size == 64
    with pytest.raises(ValueError, match="unknown variant"):
        variant_repository(DEFAULT_REPOSITORY, tmp_path / "x", "faster")
