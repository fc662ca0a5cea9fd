"""The serving spec: every refusal names the file and the field before anything starts; comparison rules.

Configs only (copied from model_repository/): no model files, no process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from recserve.control.spec.compare import compare_output
from recserve.control.spec.spec import OutputRule, SpecError, load_spec

DEMO = Path(__file__).resolve().parent.parent / "model_repository"


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    dest = tmp_path / "repo"
    for cfg in DEMO.glob("*/config.pbtxt"):
        (dest / cfg.parent.name / "1").mkdir(parents=True)
        shutil.copy(cfg, dest / cfg.parent.name / "config.pbtxt")
    return dest


def golden(tmp_path: Path, data: list, validation: list | None = None) -> str:
    doc = {"data": data} | ({"validation_data": validation} if validation is not None else {})
    (tmp_path / "g.json").write_text(json.dumps(doc))
    return "g.json"


REQ = {"user_id": {"content": [7], "shape": [1]}, "history": {"content": [11, 12, 13], "shape": [3]}}
OUT = {"item_ids": {"content": list(range(20)), "shape": [20]}, "scores": {"content": [0.5] * 20, "shape": [20]}}


def write(tmp_path: Path, model: dict, name: str = "recommend", top: dict | None = None) -> Path:
    import yaml

    doc = {"schemaVersion": 1, "repository": "repo", "models": {name: model}} | (top or {})
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def base(tmp_path: Path, **over) -> dict:
    return {"golden": over.pop("golden", None) or golden(tmp_path, [REQ], [OUT]),
            "outputs": {"item_ids": {"compare": "topk", "k": 10, "scores": "scores"},
                        "scores": {"compare": "close", "atol": 1e-5}}} | over


def refused(path: Path, *words: str) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    assert str(path) in msg or "g.json" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_a_good_spec_loads_with_what_triton_knows_from_the_config(repo, tmp_path):
    spec = load_spec(write(tmp_path, base(tmp_path)))
    m = spec.models["recommend"]
    assert m.steps == ("recommend", "recommend_pre", "retrieval", "ranker", "recommend_post")
    assert m.golden[0].inputs["history"].tolist() == [11, 12, 13] and m.golden[0].inputs["history"].dtype == np.int64
    assert m.outputs["item_ids"].compare == "topk" and m.gates.p99_ms == m.slo_p99_ms == 50.0


def test_a_model_not_in_the_repository_is_refused_by_name(repo, tmp_path):
    refused(write(tmp_path, base(tmp_path), name="ctr_ranker"), "models.ctr_ranker", "no model 'ctr_ranker'")


def test_a_golden_request_whose_dtype_does_not_fit_the_config_is_refused(repo, tmp_path):
    bad = REQ | {"user_id": {"content": ["seven"], "shape": [1]}}
    refused(write(tmp_path, base(tmp_path, golden=golden(tmp_path, [bad], [OUT]))),
            "data.0.user_id.content.0", "integer")


def test_a_golden_request_whose_dims_do_not_fit_the_config_is_refused(repo, tmp_path):
    bad = REQ | {"user_id": {"content": [7, 8], "shape": [2]}}
    refused(write(tmp_path, base(tmp_path, golden=golden(tmp_path, [bad], [OUT]))), "data.0.user_id.shape",
            "does not fit")


def test_a_missing_input_and_an_unknown_input_are_refused(repo, tmp_path):
    refused(write(tmp_path, base(tmp_path, golden=golden(tmp_path, [{"user_id": REQ["user_id"]}], [OUT]))),
            "data.0.history", "required input")
    refused(write(tmp_path, base(tmp_path, golden=golden(tmp_path, [REQ | {"usr": REQ["user_id"]}], [OUT]))),
            "data.0.usr", "not an input")


def test_an_unknown_rule_and_a_rule_that_does_not_fit_the_dtype_are_refused(repo, tmp_path):
    refused(write(tmp_path, base(tmp_path, outputs={"scores": {"compare": "fuzzy"}})), "outputs.scores.compare",
            "one of exact, close, topk")
    refused(write(tmp_path, base(tmp_path, outputs={"item_ids": {"compare": "close", "atol": 1}})),
            "outputs.item_ids.compare", "close is for floats")
    refused(write(tmp_path, base(tmp_path, outputs={"item_ids": {"compare": "topk", "k": 21}})),
            "outputs.item_ids.k", "holds 20 ids")


def test_an_unreadable_or_missing_file_is_refused(repo, tmp_path):
    refused(write(tmp_path, base(tmp_path, golden="nope.json")), "models.recommend.golden", "no such file")
    (tmp_path / "g.json").write_text("{not json")
    refused(write(tmp_path, {"golden": "g.json", "outputs": {"scores": {"compare": "exact"}}}), "not JSON")
    p = tmp_path / "spec.yaml"
    p.write_text("models: [\n")
    refused(p, "not YAML")


def test_unknown_fields_a_wrong_schema_version_and_refused_fields_are_refused_with_the_reason(repo, tmp_path):
    refused(write(tmp_path, base(tmp_path) | {"slo": 50}),
            "models.recommend.slo", "unknown field")
    refused(write(tmp_path, base(tmp_path), top={"schemaVersion": 2}), "schemaVersion", "reads schemaVersion 1")
    refused(write(tmp_path, base(tmp_path) | {"priority": 2}), "models.recommend.priority",
            "not a serving-spec field", "straight to each instance", "docs/holds.md")


def test_rollout_gates_are_the_strictest_of_the_models_that_use_the_step(repo, tmp_path):
    import yaml

    from recserve.control.rollout.manager import Gates as RolloutGates

    doc = {"schemaVersion": 1, "repository": "repo", "models": {
        "recommend": base(tmp_path, gates={"p99Ms": 80, "errorRateMax": 0.02}),
        "recommend_post": {"golden": "post.json", "outputs": {"item_ids": {"compare": "exact"}},
                           "gates": {"p99Ms": 120, "errorRateMax": 0.005}}}}
    post = {"cand_ids": {"content": list(range(100)), "shape": [100]},
            "rank_scores": {"content": [0.5] * 100, "shape": [100]}}
    (tmp_path / "post.json").write_text(json.dumps({"data": [post]}))
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(doc))
    spec = load_spec(p)
    shared = spec.rollout_gates("recommend_post")  # a step of recommend and a client-facing model itself
    assert (shared.p99_ms, shared.error_rate_max) == (80, 0.005)
    only = spec.rollout_gates("ranker")
    assert (only.p99_ms, only.error_rate_max) == (80, 0.02)
    assert spec.rollout_gates("search") is None  # no spec model uses it: recserve's defaults apply
    # a rollover request's own values win over the spec's; its unset (zero) values keep them
    g = RolloutGates.from_dict({"max_error_rate": 0.1, "min_p99_ms": 0},
                               RolloutGates(max_error_rate=only.error_rate_max, min_p99_ms=only.p99_ms))
    assert (g.max_error_rate, g.min_p99_ms, g.max_p99_ratio) == (0.1, 80, RolloutGates().max_p99_ratio)


def test_validation_data_must_hold_exactly_the_compared_outputs(repo, tmp_path):
    refused(write(tmp_path, base(tmp_path, golden=golden(tmp_path, [REQ], [{"scores": OUT["scores"]}]))),
            "validation_data.0", "item_ids")


def test_a_model_recserve_cannot_guard_is_refused_with_the_reason(repo, tmp_path):
    cfg = repo / "ranker" / "config.pbtxt"
    cfg.write_text(cfg.read_text() + "\nmodel_transaction_policy { decoupled: true }\n")
    refused(write(tmp_path, base(tmp_path)), "cannot guard ranker", "decoupled")


def test_exact_close_and_topk_with_ties():
    assert compare_output(OutputRule("exact"), np.array([1, 2]), np.array([1, 2])) == ""
    assert "1 of 2" in compare_output(OutputRule("exact"), np.array([1, 3]), np.array([1, 2]))
    assert compare_output(OutputRule("exact"), np.array([b"a"], dtype=object), np.array([b"a"], dtype=object)) == ""
    close = OutputRule("close", atol=1e-3)
    assert compare_output(close, np.array([1.0005]), np.array([1.0])) == ""
    assert "outside" in compare_output(close, np.array([1.01]), np.array([1.0]))
    top = OutputRule("topk", k=2, min_overlap=1.0, scores="s")
    # ids 2 and 3 tie on the 2nd score: either may be served second
    exp_ids, exp_s = np.array([1, 2, 3, 4]), np.array([0.9, 0.5, 0.5, 0.1])
    assert compare_output(top, np.array([1, 3, 2, 4]), exp_ids, None, exp_s) == ""
    assert "overlap 0.50" in compare_output(top, np.array([1, 4, 2, 3]), exp_ids, None, exp_s)
    assert "overlap 0.50" in compare_output(OutputRule("topk", k=2), np.array([1, 3]), exp_ids)


SPECS = Path(__file__).resolve().parent.parent / "specs"


def test_the_demo_spec_validates_and_its_expected_answers_are_the_demo_references():
    """specs/demo.yaml reads the build's golden requests; the reference outside Triton gives the answers
    build.reference gives (the demo's own checks), so a fleet run from the spec judges as the built-in checks do."""
    from recserve.build.reference import Reference as DemoReference
    from recserve.control.fleet.spec_golden import SpecGolden

    spec = load_spec(SPECS / "demo.yaml")
    assert set(spec.models) == {"recommend", "search"} and not spec.warnings
    golden = SpecGolden(spec)
    versions = {s: [_latest(spec.repository, s)] for m in spec.models.values() for s in m.steps}
    exp = golden.expected(versions)
    assert exp is not None, golden.problem(versions)
    demo = DemoReference(spec.repository, {m: v[0] for m, v in versions.items()})
    r = spec.models["recommend"].golden[0].inputs
    ids, scores = demo.recommend(int(r["user_id"][0]), [int(x) for x in r["history"]])
    assert list(exp.answers["recommend"]["item_ids"]) == list(ids)
    assert np.allclose(exp.answers["recommend"]["scores"], scores, atol=1e-6)
    s = spec.models["search"].golden[0].inputs
    uid = int(s["user_id"][0]) if "user_id" in s else None
    ids, scores = demo.search(bytes(s["query"][0]).decode(), uid)
    assert list(exp.answers["search"]["item_ids"]) == list(ids)


def _latest(repository: Path, model: str) -> int:
    return max(int(p.name) for p in (repository / model).iterdir() if p.is_dir() and p.name.isdigit())
