"""Monitoring a spec fleet: the runtime rule files and dashboard select the models the control plane published
(``<root>/monitoring/models.json``), pass ``promtool check rules``, and the committed files keep the demo's.

Files only: no fleet, no Prometheus process (``MonitorStack.runtime_rules`` is what ``up`` feeds prometheus.yml)."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from recserve.control.monitoring.config import (
    DEMO_SELECTOR,
    DEPLOY_DIR,
    model_selector,
    models_path,
    publish_models,
    published_models,
    render_dashboard,
    render_prometheus,
    render_rules,
    rule_files,
    write_runtime_rules,
)
from recserve.control.monitoring.stack import MonitorConfig, MonitorStack
from recserve.control.runtime.promstack import MonitorError, binary

PROMTOOL = binary("promtool")
MODELS = ["ctr_ranker", "rank_page", "query.norm"]
SELECTOR = 'model=~"ctr_ranker|rank_page|query\\\\.norm"'  # as written in PromQL: the dot escaped


def _exprs(cfgs: dict) -> list[str]:
    return [r["expr"] for cfg in cfgs.values() for g in cfg["groups"] for r in g["rules"]]


def test_the_rules_select_the_published_models_and_only_the_selector_changes():
    assert model_selector(MODELS) == SELECTOR
    committed = {f.name: yaml.safe_load(f.read_text()) for f in rule_files()}
    rendered = render_rules(MODELS)
    assert rendered.keys() == committed.keys()
    named = [e for e in _exprs(committed) if DEMO_SELECTOR in e]
    assert len(named) >= 10  # the SLO recording rules and the instance-errors alert
    assert all("recommend" not in e and "search" not in e for e in _exprs(rendered))
    assert sum(SELECTOR in e for e in _exprs(rendered)) == len(named)
    for before, after in zip(_exprs(committed), _exprs(rendered), strict=True):
        assert after == before.replace(DEMO_SELECTOR, SELECTOR)
    # the committed files are untouched: the demo keeps its defaults
    assert all(DEMO_SELECTOR in f.read_text() for f in rule_files())
    dash = render_dashboard(MODELS)
    queries = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert any(SELECTOR in q for q in queries) and not any(DEMO_SELECTOR in q for q in queries)


def test_a_name_promql_cannot_select_is_refused():
    with pytest.raises(ValueError, match="cannot be selected"):
        model_selector(["rank page"])
    with pytest.raises(ValueError, match="at least one"):
        model_selector([])


@pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: 'make setup' installs prometheus")
def test_runtime_rules_of_a_spec_fleet_pass_promtool(tmp_path):
    paths = write_runtime_rules(tmp_path / "rules", MODELS)
    assert [p.name for p in paths] == [f.name for f in rule_files()]
    r = subprocess.run([PROMTOOL, "check", "rules", *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all("ctr_ranker|rank_page" in p.read_text() for p in paths)


def test_monitor_up_renders_rules_for_the_models_the_control_plane_published(tmp_path):
    root = tmp_path / "root"
    stack = MonitorStack(MonitorConfig(root=root))
    assert stack.runtime_rules() is None  # nothing published: the committed rules (the demo's)
    assert render_prometheus(tmp_path / "t", "127.0.0.1:1", rules=None)["rule_files"] == [
        str(p) for p in rule_files(DEPLOY_DIR)]
    publish_models(root, ["ctr_ranker", "rank_page"], tmp_path / "spec.yaml")
    assert published_models(root) == ["ctr_ranker", "rank_page"]
    paths = stack.runtime_rules()
    assert paths and all(p.is_relative_to(root / "monitoring") for p in paths)
    cfg = render_prometheus(tmp_path / "t", "127.0.0.1:1", rules=paths)
    assert cfg["rule_files"] == [str(p) for p in paths]
    assert all('model=~"ctr_ranker|rank_page"' in p.read_text() for p in paths)
    dash = json.loads((root / "monitoring" / "grafana-dashboard.json").read_text())
    assert any('model=~"ctr_ranker|rank_page"' in t["expr"] for p in dash["panels"] for t in p["targets"])
    # the same root serving the demo again: the file goes, and so do the runtime copies
    publish_models(root, None)
    assert not models_path(root).exists() and stack.runtime_rules() is None
    assert not any(p.exists() for p in paths) and not (root / "monitoring" / "grafana-dashboard.json").exists()
    models_path(root).write_text("{not json")
    with pytest.raises(MonitorError, match="models.json"):
        stack.runtime_rules()
