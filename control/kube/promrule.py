"""Wrap Prometheus rule files (``deploy/monitoring/rules/*.yml``) as PrometheusRules, one per file (the Prometheus
Operator renders each into one rule file, where group names must be unique), adapted to the cluster: a cluster
evaluates the rules the one-machine stack tests with promtool, less the ones that read series only the single-host
control plane exports, with kube-prometheus severities and runbooks that say what to do on a cluster. HAProxy's
series are the front door's on a cluster (the PodMonitor ``recserve-frontdoor`` in deploy/k8s/base/monitoring.yaml
scrapes every replica as ``job="haproxy"``; the proxies have the one-host names ``fe_grpc``, ``be_*_fallback``,
``be_*_shed``), so the HAProxy rules stay, summed over the replicas by ``fleet``.

    python -m recserve.control.kube.promrule deploy/monitoring/rules/*.yml -o deploy/k8s/base/monitoring-rules.yaml

What changes for the cluster (``cluster_groups``), and why:

- dropped: alerts and recording rules that read series no cluster exports (``SINGLE_HOST_ONLY``: the serving mode
  and standbys, the primary, failovers, backups); a group left empty is dropped;
- rewritten (``CLUSTER_EXPR``): an instance still loading is not down; HAProxy is down when no front-door replica
  answers (one replica down is the Deployment's to replace, clients use the others);
- severities: ``critical``/``warning``/``info`` as on one host (what kube-prometheus-stack's Alertmanager routes
  on; the older ``page``/``ticket`` map to the first two);
- annotations: ``runbook`` says what to run on a cluster (``CLUSTER_RUNBOOKS``; never ``make fleet-up``) and
  ``runbook_url`` points at the alert's section of docs/monitoring.md (``--runbook-base`` makes it absolute);
- ``--release NAME``: the ``release`` label kube-prometheus-stack's default ruleSelector matches.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from recserve.control.kube.manifests import write_rendered

#: Rules of the single-host files that read series only the single-host control plane exports.
SINGLE_HOST_ONLY = {
    "RecserveNoHealthyStandby": "recserve_fleet_healthy_standbys / recserve_fleet_mode (no standby role on a cluster)",
    "RecservePrimaryUnhealthy": "the primary's state (a Service balances over every ready pod: no primary)",
    "RecserveFailover": "recserve_failovers_total (no failover on a cluster: a failing pod leaves the Service)",
    "RecserveBackupStale": "the backup series (the operator runs no backups)",
    "RecserveBackupFailing": "the backup series (the operator runs no backups)",
}
#: Rules whose cluster form reads other series.
CLUSTER_EXPR = {
    # A pod the operator is still loading (new) or deleting is not out of service: an HPA scale-out or a replaced pod
    # would open a ticket every time (the single host counts its own starting instances in on purpose).
    "RecserveInstanceDown": ("max by (fleet, instance) (up{job=\"triton\"} == 0)\n"
                             "or max by (fleet, instance)"
                             " (recserve_instance_state{state!~\"healthy|drained|new|deleting\"} == 1)\n"),
    # Every front-door replica down (or none scraped): clients reach nothing. One replica down is not an outage.
    "RecserveHAProxyDown": ("sum by (fleet) (up{job=\"haproxy\"}) == 0\n"
                            "or absent(up{job=\"haproxy\"})\n"),
}
#: Descriptions that say what happens on a cluster, where the single-host text names its control plane's reaction.
CLUSTER_DESCRIPTIONS = {
    "RecserveHAProxyDown": "No front-door replica answers (or none is scraped): clients reach no Triton pod. The "
                           "kubelet restarts a replica whose /healthz fails; the front door's HPA keeps minReplicas.",
}
#: The single-host files use kube-prometheus' names already; page/ticket (their earlier names) still map.
SEVERITY = {"critical": "critical", "warning": "warning", "info": "info", "page": "critical", "ticket": "warning"}
#: What to run on a cluster, per alert the cluster keeps (the single-host texts name recctl and make targets).
CLUSTER_RUNBOOKS = {
    "RecserveInstanceDown": "kubectl -n recserve get pods; "
                            "kubectl -n recserve get events | grep -E 'GoldenFailed|PodDeleted'",
    "RecservePoolBelowSize": "kubectl -n recserve get recservefleet recserve -o yaml (status.instances detail); "
                             "kubectl -n recserve describe pod POD",
    "RecserveInstanceErrors": "kubectl -n recserve logs POD -c triton; recctl k8s status",
    "RecserveGoldenMismatch": "recctl k8s status; recctl k8s rollouts; recctl k8s rollback MODEL",
    "RecserveGoldenReferenceDown": "kubectl -n recserve logs deploy/recserve-operator -c operator",
    "RecserveVersionSkew": "recctl k8s status (versions); recctl k8s rollouts; recctl k8s rollback {{ $labels.model }}",
    "RecserveRolloutRolledBack": "kubectl -n recserve get modelrollouts -o wide (failed gate and value)",
    "RecserveControlPlaneDown": "kubectl -n recserve get pods -l app.kubernetes.io/name=recserve-operator; "
                                "kubectl -n recserve logs deploy/recserve-operator -c operator --previous",
    "RecserveErrorBudgetBurnFast": "recctl k8s rollouts (a bad version?); recctl k8s rollback {{ $labels.model }}",
    "RecserveErrorBudgetBurnSlow": "recctl k8s status; kubectl -n recserve get events --sort-by=.lastTimestamp",
    "RecserveP99OverSLO": "kubectl -n recserve describe hpa recserve-triton (at its maximum?); raise maxReplicas",
    "RecserveLoadShedding": "kubectl -n recserve describe hpa recserve-triton (at its maximum?); raise maxReplicas",
    "RecserveHAProxyDown": "kubectl -n recserve get pods -l app.kubernetes.io/name=recserve-frontdoor; "
                           "kubectl -n recserve describe deployment recserve-frontdoor; "
                           "kubectl -n recserve logs deploy/recserve-frontdoor",
}
RUNBOOK_DOC = "docs/monitoring.md"


def runbook_url(alert: str, base: str = "") -> str:
    """``<base>docs/monitoring.md#<alert in lower case>`` (the anchor of the alert's heading there)."""
    return f"{base}{RUNBOOK_DOC}#{alert.lower()}"


def cluster_groups(groups: list[dict], runbook_base: str = "") -> list[dict]:
    """The cluster's form of a rule file's groups (see the module's docstring)."""
    out = []
    for g in groups:
        rules = []
        for rule in g.get("rules") or []:
            name = rule.get("alert") or rule.get("record")
            if name in SINGLE_HOST_ONLY:
                continue
            rule = dict(rule)
            if name in CLUSTER_EXPR:
                rule["expr"] = CLUSTER_EXPR[name]
            if "alert" in rule:
                labels = dict(rule.get("labels") or {})
                labels["severity"] = SEVERITY[labels.get("severity", "")]
                annotations = dict(rule.get("annotations") or {})
                if name not in CLUSTER_RUNBOOKS:
                    raise ValueError(f"alert {name}: no cluster runbook (promrule.CLUSTER_RUNBOOKS) and not "
                                     "single-host only (promrule.SINGLE_HOST_ONLY): say which")
                annotations["runbook"] = CLUSTER_RUNBOOKS[name]  # runbook_url: the same anchor, --runbook-base
                if name in CLUSTER_DESCRIPTIONS:
                    annotations["description"] = CLUSTER_DESCRIPTIONS[name]
                annotations["runbook_url"] = runbook_url(name, runbook_base)
                rule["labels"], rule["annotations"] = labels, annotations
            rules.append(rule)
        if rules:
            out.append({**g, "rules": rules})
    return out


def wrap(path: Path, runbook_base: str = "", release: str = "") -> dict:
    """One PrometheusRule ``recserve-<file stem>`` with the cluster's form of the file's groups."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    groups = doc.get("groups")
    if not isinstance(groups, list) or not groups:
        raise ValueError(f"{path}: a Prometheus rule file needs a non-empty top-level 'groups' list")
    names = [g.get("name") for g in groups]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: group names repeat within the file: {dup}")
    labels = {"app.kubernetes.io/part-of": "recserve", **({"release": release} if release else {})}
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": f"recserve-{Path(path).stem}", "labels": labels},
            "spec": {"groups": cluster_groups(groups, runbook_base)}}


def render(files: list[Path], runbook_base: str = "", release: str = "") -> str:
    head = ("# Generated by python -m recserve.control.kube.promrule from " + " ".join(map(str, files))
            + "; regenerate.\n")
    return head + yaml.safe_dump_all([wrap(f, runbook_base, release) for f in files], sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m recserve.control.kube.promrule", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, help="write here (default: stdout)")
    p.add_argument("--runbook-base", default="", help="prefix of runbook_url, e.g. https://git.example/recserve/"
                   "blob/main/ (default: repository-relative docs/monitoring.md#...)")
    p.add_argument("--release", default="", help="add the label release=NAME (kube-prometheus-stack's selector)")
    a = p.parse_args(argv)
    write_rendered(render(a.files, a.runbook_base, a.release), a.output)


if __name__ == "__main__":
    main()
