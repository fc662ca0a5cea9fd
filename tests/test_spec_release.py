"""recctl release: a new ONNX version checked against its config and the golden requests before it exists;
what a rollout's drift gate would say, said at release time. Generated user repository, no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from recserve.control.spec.init import init_spec
from recserve.control.spec.release import release
from recserve.control.spec.spec import SpecError, load_spec
from recserve.control.state.snapshots import verify_version
from tests.byo_repository import VARIED_MODEL, _save, ctr_graph, features_graph, make_repository


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    base = tmp_path_factory.mktemp("release")
    repo = make_repository(base / "repo")
    init_spec(repo, base / "spec.yaml", n_requests=4)
    for variant in ("perturbed", "reversed"):
        _save(ctr_graph(variant), base / f"{variant}.onnx")
    _save(features_graph(), base / "features.onnx")
    return base, repo, load_spec(base / "spec.yaml")


def test_a_slightly_changed_model_is_released_verified_and_within_its_drift_gate(user):
    base, repo, spec = user
    rel = release(repo, VARIED_MODEL, base / "perturbed.onnx", spec)
    assert verify_version(repo, VARIED_MODEL, rel.version).verified
    gated = [d for d in rel.drift.values()]
    assert gated and all(d["passes"] for d in gated), rel.drift


def test_reversed_scores_are_released_but_reported_beyond_the_drift_gate(user):
    base, repo, spec = user
    rel = release(repo, VARIED_MODEL, base / "reversed.onnx", spec)
    assert any(not d["passes"] and d["value"] < 0 for d in rel.drift.values()), rel.drift


def test_a_file_that_does_not_fit_the_config_is_refused_and_nothing_is_written(user):
    base, repo, spec = user
    before = sorted(p.name for p in (repo / VARIED_MODEL).iterdir())
    with pytest.raises(SpecError, match="'dense' is not in the graph"):
        release(repo, VARIED_MODEL, base / "features.onnx", spec)
    (base / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(SpecError, match="onnxruntime cannot load it"):
        release(repo, VARIED_MODEL, base / "junk.onnx", spec)
    assert sorted(p.name for p in (repo / VARIED_MODEL).iterdir()) == before


def test_only_onnx_models_are_released(user):
    base, repo, spec = user
    python_step = next(n for n, m in spec.models.items() if m.info.kind == "python")
    with pytest.raises(SpecError, match="recctl release writes ONNX versions"):
        release(repo, python_step, base / "perturbed.onnx", spec)
    with pytest.raises(SpecError, match="no model 'nope'"):
        release(repo, "nope", Path(base / "perturbed.onnx"), spec)
