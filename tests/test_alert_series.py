"""Alerts that can fire where they ship: every series a shipped rule reads is one its platform exports.

One test over both platforms. Single host: the rule files of deploy/monitoring/rules/, read against what the control
plane (ControlMetrics + FleetCollector), Triton and HAProxy export. Cluster: the PrometheusRules of the Kustomize
base (deploy/k8s/base/monitoring.yaml and the generated monitoring-rules.yaml), read against what the operator
(ControlMetrics + KubeFleetCollector) and Triton export, and HAProxy's exporter only because the base scrapes the
front door (its PodMonitor, job "haproxy", on the port where the front door's config serves the exporter). Every
alert of both platforms has severity critical/warning/info and a runbook_url whose anchor is a heading of its doc.
Metric names come from a small PromQL tokenizer (strings, label matchers, grouping clauses and ranges removed;
identifiers not followed by "(" and not keywords).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from recserve.control.kube.metrics import KubeFleetCollector
from recserve.control.monitoring.config import DEPLOY_DIR, rule_files
from recserve.control.monitoring.metrics import ControlMetrics
from recserve.control.monitoring.targets import FleetCollector

REPO = Path(__file__).resolve().parent.parent
K8S_BASE = REPO / "deploy" / "k8s" / "base"
#: Prometheus adds these to every target.
PROMETHEUS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
#: Triton 2.51's /metrics (tests/data/perf/metrics.txt) plus the summaries of --metrics-config summary_latencies=true.
TRITON = {re.match(r"[a-z_:]+", line).group(0) for line in (REPO / "tests/data/perf/metrics.txt").read_text()
          .splitlines() if re.match(r"[a-z_]", line)} | {
    f"nv_inference_{k}_summary_us{s}" for k in ("request", "queue", "compute_input", "compute_infer",
                                                "compute_output") for s in ("", "_sum", "_count")}
#: HAProxy 2.x's built-in exporter (the names the single-host rules read; the front end "fe_metrics").
HAPROXY = {"haproxy_frontend_http_requests_total", "haproxy_frontend_http_responses_total",
           "haproxy_backend_sessions_total", "haproxy_backend_http_responses_total", "haproxy_process_uptime_seconds"}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "inf", "nan"}


def series_read(expr: str) -> set[str]:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                      # strings
    e = re.sub(r"\{[^}]*\}", " ", e)                                  # label matchers
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)                                 # ranges and subqueries
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        if m.group(2) or m.group(1) in KEYWORDS or m.group(1).startswith("$"):
            continue
        names.add(m.group(1))
    return names


def test_the_tokenizer():
    assert series_read('sum by (fleet, model) (rate(nv_x{model=~"a|b", r!="OTHER"}[5m])) / on (fleet) '
                       'group_left () clamp_min(rec:y:rate1m, 1e-9) > (14.4 * 0.001)') == {"nv_x", "rec:y:rate1m"}
    assert series_read('up{job="triton"} == 0 or absent(up{job="x"}) and time() - z > 5') == {"up", "z"}


def _exported(registry_collectors) -> set[str]:
    names = set()
    for c in registry_collectors:
        for fam in c.collect():
            names.add(fam.name)
            names |= {s.name for s in fam.samples}
    return names


def single_host_exports() -> set[str]:
    recs = [SimpleNamespace(id="t1", role="primary", state="healthy")]
    fleet = SimpleNamespace(state=SimpleNamespace(instances=lambda: recs, latest_rollout=lambda m: None),
                            last_probe=lambda iid: None, versioned_models=lambda: [],
                            config=SimpleNamespace(mode="active-active"))
    fleet.last_probe.get = lambda iid: None  # either form of Fleet.last_probe
    return PROMETHEUS | TRITON | HAPROXY | _exported([ControlMetrics().registry, FleetCollector(fleet)])


def _base_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S_BASE / name).read_text()) if d]


def frontdoor_scraped() -> bool:
    """The base scrapes every front-door replica's HAProxy exporter as job "haproxy": a PodMonitor selecting the
    front-door pods on a port of their container that is the port the front door's haproxy.cfg serves /metrics on."""
    (dep,) = [d for d in _base_docs("frontdoor.yaml") if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports") or []}
    cfg = yaml.safe_load((K8S_BASE / "frontdoor-config.yaml").read_text())["data"]["haproxy.cfg"]
    exporter = re.search(r"^frontend fe_metrics\n  bind \S+:(\d+)\n(?:  .*\n)*?  http-request use-service "
                         r"prometheus-exporter", cfg, re.M)
    for mon in _base_docs("monitoring.yaml"):
        if mon["kind"] != "PodMonitor":
            continue
        sel = mon["spec"]["selector"]["matchLabels"]
        if not sel.items() <= pod["metadata"]["labels"].items():
            continue
        for ep in mon["spec"]["podMetricsEndpoints"]:
            jobs = {r.get("replacement") for r in ep.get("relabelings") or [] if r.get("targetLabel") == "job"}
            if jobs == {"haproxy"} and exporter and ports.get(ep["port"]) == int(exporter.group(1)) \
                    and ep.get("path", "/metrics") == "/metrics":
                return True
    return False


def cluster_exports(frontdoor: bool | None = None) -> set[str]:
    recs = [SimpleNamespace(id="p1", role="primary", state="healthy", detail="")]
    pool = SimpleNamespace(state=SimpleNamespace(instances=lambda: recs, latest_rollout=lambda m: None),
                           versioned_models=lambda: [])
    op = SimpleNamespace(pool=pool, gates={"p1": True})
    haproxy = HAPROXY if (frontdoor_scraped() if frontdoor is None else frontdoor) else set()
    return PROMETHEUS | TRITON | haproxy | _exported([ControlMetrics().registry, KubeFleetCollector(op)])


def single_host_rules() -> list[dict]:
    return [r for f in rule_files() for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]


def cluster_rules() -> list[dict]:
    out = []
    for f in ("monitoring.yaml", "monitoring-rules.yaml"):
        for doc in yaml.safe_load_all((K8S_BASE / f).read_text()):
            if doc and doc.get("kind") == "PrometheusRule":
                out += [r for g in doc["spec"]["groups"] for r in g["rules"]]
    return out


PLATFORMS = {"single-host": (single_host_rules, single_host_exports, {"critical", "warning", "info"}),
             "cluster": (cluster_rules, cluster_exports, {"critical", "warning", "info"})}


def _anchors(doc: Path) -> set[str]:
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", doc.read_text(), re.M)}


@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_every_shipped_rule_reads_series_its_platform_exports(platform):
    rules_of, exports_of, severities = PLATFORMS[platform]
    rules, exported = rules_of(), exports_of()
    records = [r["record"] for r in rules if "record" in r]
    assert len(records) == len(set(records)), f"{platform}: recorded twice: " \
        f"{sorted({n for n in records if records.count(n) > 1})}"
    available = exported | set(records)
    missing = {(r.get("alert") or r.get("record")): sorted(series_read(r["expr"]) - available) for r in rules}
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"{platform}: rules read series nothing on this platform exports: {missing}"
    for r in rules:
        if "alert" not in r:
            continue
        assert r["labels"]["severity"] in severities, (platform, r["alert"])
        assert r["annotations"].get("runbook"), (platform, r["alert"])
        if platform == "cluster":
            assert "fleet-up" not in str(r["annotations"]) and "make " not in r["annotations"]["runbook"], r["alert"]
        url = r["annotations"].get("runbook_url")
        assert url, f"{platform}: {r['alert']}: no runbook_url"
        doc, _, anchor = url.partition("#")
        assert (REPO / doc).is_file() and anchor in _anchors(REPO / doc), f"{r['alert']}: {url}: no such heading"


def test_the_cluster_scrapes_the_front_door_and_its_rules_read_it():
    """The front door's series are exported on the cluster only through its PodMonitor; the cluster rules read them
    (the shed rule's degraded and refused requests, HAProxy down, the data path's rates), so without that scrape the
    series check above would fail them."""
    assert frontdoor_scraped()
    rules = cluster_rules()
    reads = {r.get("alert") or r["record"] for r in rules if series_read(r["expr"]) & HAPROXY}
    assert {"recserve:shed:rate1m", "recserve:haproxy_requests:rate1m", "recserve:haproxy_5xx_ratio:rate5m"} <= reads
    haproxy_down = next(r for r in rules if r.get("alert") == "RecserveHAProxyDown")
    assert 'up{job="haproxy"}' in haproxy_down["expr"]
    without = cluster_exports(frontdoor=False) | {r["record"] for r in rules if "record" in r}
    assert reads <= {r.get("alert") or r["record"] for r in rules if series_read(r["expr"]) - without}


def test_every_single_host_alert_routes_by_its_severity():
    routes = yaml.safe_load((DEPLOY_DIR / "alertmanager.yml").read_text())["route"]["routes"]
    routed = {m.split('"')[1] for r in routes for m in r["matchers"] if m.startswith("severity=")}
    assert routed == {"critical", "warning", "info"}


def test_the_check_catches_a_single_host_series_on_the_cluster():
    """The unadapted single-host rules (what the cluster shipped before) read series the cluster does not export.
    A name check cannot see a selector: the backup alerts read series ControlMetrics registers everywhere (0 on the
    operator); the cluster rule set leaves them out by name (control/kube/promrule.py SINGLE_HOST_ONLY)."""
    rules = single_host_rules()
    exported = cluster_exports() | {r["record"] for r in rules if "record" in r}
    unreadable = {r.get("alert") or r["record"] for r in rules if series_read(r["expr"]) - exported}
    assert "RecserveNoHealthyStandby" in unreadable
    assert DEPLOY_DIR.is_dir()
