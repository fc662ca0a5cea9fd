"""perf for a user's repository: a suite from a serving spec, inputs from its golden requests, a knee per spec model.

The repository is tests/byo_repository.py's (nothing shared with the demo) and its spec is what ``recctl init``
writes. The unit tests need no server; the last one is a very short real run (embedded tritonserver, real
perf_analyzer, our HAProxy front door) on a BYTES model and a model without batching.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from recserve.control.spec.init import init_spec
from recserve.control.spec.spec import load_spec
from recserve.perf import __main__ as cli
from recserve.perf import check, report, specsuite, suite
from tests.byo_repository import make_repository

TINY = """
name: spec-tiny
for_spec: true
seconds_per_point: 0.5
payload_rows: 16
targets:
  - {name: "{model}", model: "*", concurrency: [1], capacity: [0.3, 0.6]}
  - {name: "{model}-frontdoor", model: "*", via: haproxy, concurrency: [1]}
"""


@pytest.fixture(scope="module")
def byo(tmp_path_factory) -> Path:
    """A user's repository and the spec recctl init writes for it (query_norm, rank_page, similar_items)."""
    base = tmp_path_factory.mktemp("perfbyo")
    make_repository(base / "repo")
    init_spec(base / "repo", base / "spec.yaml", n_requests=4)
    return base / "spec.yaml"


def _edit(spec_path: Path, dest: Path, change) -> Path:
    raw = yaml.safe_load(spec_path.read_text())
    change(raw)
    raw["repository"] = str((spec_path.parent / raw["repository"]).resolve())
    for m in raw["models"].values():
        m["golden"] = str((spec_path.parent / m["golden"]).resolve())
    dest.write_text(yaml.safe_dump(raw))
    return dest


def test_a_spec_suite_has_one_target_per_model_and_template_each_judged_by_its_own_slo(byo, tmp_path):
    def slo(raw):
        raw["models"]["similar_items"]["sloP99Ms"] = 20.0

    spec = load_spec(_edit(byo, tmp_path / "spec.yaml", slo))
    s = specsuite.expand(specsuite.template_for("smoke"), spec)
    assert s.for_spec and not s.ratios and s.path.name == "spec-smoke.yaml"
    names = {t.name: t for t in s.targets}
    assert set(names) == {f"{m}{suffix}" for m in spec.models for suffix in ("", "-frontdoor")}
    assert names["similar_items"].capacity and names["similar_items-frontdoor"].via == "haproxy"
    assert all(t.batch_size == 1 for t in s.targets)  # similar_items has max_batch_size 0
    assert s.slo_for("similar_items") == 20.0 and s.slo_for("rank_page") == 50.0
    only = specsuite.expand(specsuite.template_for("full"), spec, ["query_norm"])
    assert {t.model for t in only.targets} == {"query_norm"} and only.slo_for("query_norm") == 50.0
    with pytest.raises(suite.SuiteError, match="no model 'recommend' in the spec"):
        specsuite.expand(specsuite.template_for("smoke"), spec, ["recommend"])
    with pytest.raises(suite.SuiteError, match="not a suite for a serving spec"):
        specsuite.template_for("perf/suites/smoke.yaml")


def test_templates_and_demo_suites_do_not_mix(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("targets:\n  - {model: '*', concurrency: [1]}\n")
    with pytest.raises(suite.SuiteError, match=r"targets\[0\]\.model.*only for a suite with for_spec"):
        suite.load(p)
    p.write_text("for_spec: true\ntargets:\n  - {model: ranker, concurrency: [1]}\n")
    with pytest.raises(suite.SuiteError, match=r"targets\[0\]\.model.*must be '\*'"):
        suite.load(p)
    p.write_text("for_spec: true\ntargets:\n  - {model: '*', concurrency: [1]}\n"
                 "ratios:\n  haproxy_vs_direct: {model: x}\n")
    with pytest.raises(suite.SuiteError, match="a suite for a serving spec has none"):
        suite.load(p)


def test_cli_refuses_a_template_without_a_spec_and_models_without_a_spec(capsys):
    assert cli.main(["run", "spec-smoke"]) == 2
    assert "give --spec SPEC" in capsys.readouterr().err
    assert cli.main(["run", "smoke", "--models", "rank_page"]) == 2
    assert "give --spec too" in capsys.readouterr().err


def test_inputs_are_golden_data_only_with_bytes_as_text_and_unbatched_shapes(byo, tmp_path):
    spec = load_spec(byo)
    rows, info = specsuite.payloads(spec.models["query_norm"], tmp_path / "q.json")
    doc = json.loads((tmp_path / "q.json").read_text())
    assert set(doc) == {"data"}, "no validation_data: perf_analyzer's validation is exact"
    assert len(doc["data"]) == len(spec.models["query_norm"].golden) == info["golden_rows"]
    first = doc["data"][0]["text"]
    assert first["shape"] == [1] and isinstance(first["content"][0], str)
    assert info["generated_rows"] == 0 and "guessed by recctl init" in info["not_generated"]
    specsuite.payloads(spec.models["similar_items"], tmp_path / "s.json")
    entry = json.loads((tmp_path / "s.json").read_text())["data"][0]["item_id"]
    assert entry["shape"] == [1] and isinstance(entry["content"][0], int)  # full shape: the model has no batch dim


def test_confirmed_input_rules_add_generated_requests(byo, tmp_path):
    def confirm(raw):
        for rule in raw["models"]["rank_page"]["inputs"].values():
            rule.pop("guessed", None)

    spec = load_spec(_edit(byo, tmp_path / "spec.yaml", confirm))
    rows, info = specsuite.payloads(spec.models["rank_page"], tmp_path / "r.json", min_rows=20)
    assert len(rows) == 20 and info["generated_rows"] == 20 - info["golden_rows"] > 0
    data = json.loads((tmp_path / "r.json").read_text())["data"]
    for entry in data[info["golden_rows"]:]:
        assert entry["raw"]["shape"] == [8] and all(-1.0 <= v <= 1.0 for v in entry["raw"]["content"])
        assert entry["item_ids"]["shape"] == [4] and all(0 <= v <= 9 for v in entry["item_ids"]["content"])


def test_check_judges_a_spec_report_by_its_knees_not_the_demo_baseline():
    doc = {"spec": {"path": "spec.yaml", "models": {"a": {}, "b": {}}},
           "ratios": {n: {"value": None, "skipped": why} for n, why in specsuite.DEMO_RATIOS.items()},
           "capacity": {"a": {"model": "a", "via": "direct", "capacity_rps": 120.0, "slo_ms": 20.0, "reason": "x"}},
           "capacity_rps": {"a": 120.0}, "errors": []}
    verdicts = {v.name: v for v in check.compare(doc, json.loads(check.BASELINE.read_text()))}
    assert all(verdicts[n].ok and "not judged for a spec run" in verdicts[n].message for n in specsuite.DEMO_RATIOS)
    assert verdicts["capacity_rps[a]"].ok and not verdicts["capacity_rps[b]"].ok
    assert "capacity_rps[recommend]" not in verdicts and verdicts["points"].ok


@pytest.mark.timeout(240)
def test_a_short_spec_run_reports_a_knee_for_each_model_measured(byo, tmp_path):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed (make setup installs it)")
    (tmp_path / "tiny.yaml").write_text(TINY)
    models = ["query_norm", "similar_items"]  # BYTES input; max_batch_size 0
    # a short reports path: HAProxy's stats socket lives under it, and its path may not pass 97 characters
    reports = Path(tempfile.mkdtemp(prefix="perfbyo-", dir="/tmp"))
    try:
        rc = cli.main(["--reports", str(reports), "run", str(tmp_path / "tiny.yaml"), "--spec", str(byo),
                       "--models", ",".join(models)])
        doc = json.loads((reports / "latest" / "report.json").read_text())
        md = (reports / "latest" / "report.md").read_text()
    finally:
        shutil.rmtree(reports, ignore_errors=True)
    assert rc == 0, doc["errors"]
    assert doc["spec"]["path"] == str(byo) and set(doc["spec"]["models"]) == set(models)
    assert doc["spec"]["models"]["similar_items"]["max_batch_size"] == 0
    for m in models:
        assert doc["capacity_rps"][m] > 0, doc["capacity"]
        assert doc["capacity"][m]["slo_ms"] == load_spec(byo).models[m].slo_p99_ms
        vias = {r["via"] for r in doc["runs"] if r["model"] == m and not r["error"]}
        assert vias == {"direct", "haproxy"}
    assert {n for n, r in doc["ratios"].items() if r.get("skipped", "").startswith("demo-specific")} == set(
        specsuite.DEMO_RATIOS)
    assert "## Serving spec: capacity per model" in md and str(byo) in md
    assert "none (batch 1)" in md and "demo-specific" in md
    assert report.REPORTS_DIR != reports  # the run did not touch the demo's reports/perf/latest
    assert all(v.ok for v in check.compare(doc, {})), [v.message for v in check.compare(doc, {}) if not v.ok]
