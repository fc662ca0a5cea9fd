"""The knee of one Triton pod, measured in the cluster (issue 21 item 1): ``python -m recserve.control.kube.knee``,
what the Job in ``deploy/k8s/components/knee-job`` writes and the operator reads.

Why: the front door admits ``knee x latency`` requests in flight per Triton pod (Little's law, the Router's rule,
control/kube/frontdoor.py), and the committed render can only use the Router's conservative default knee (no perf
report of a cluster pod exists where it is rendered). The Job measures a pod where it runs, in two steps:

1. its initContainer ``knee`` runs recserve's own knee ladder against ONE Triton pod: ``python -m
   recserve.drills.capacity --target recserve-triton-ready:<grpc port> --spec ... --output /work/knee.json``
   (``knee_ladder``: open-loop rates rising until one misses the SLO twice, then bisected; the knee is the highest
   rate with nothing failed, p99 within the SLO and >= 95 % of the offer served; the spec's golden requests at its
   strictest ``sloP99Ms``). The headless Service's DNS answer is the pods whose golden gate is open; the ladder runs
   against the lowest of those addresses, so the figure is per pod whatever the Service balances. The drills
   measure, the control plane writes: the layering keeps ``recserve.control`` free of ``recserve.drills``;
2. its container ``write`` (this module: ``python -m recserve.control.kube.knee --from /work/knee.json``) puts the
   result on the ConfigMap ``recserve-knee``: the knee, the mean latency at it, the SLO, the pod measured and when
   (annotations ``recserve.io/knee-*``) and the ladder (``ladder.json``).

The pod keeps whatever other traffic it has: run the Job before clients arrive or in a quiet hour
(docs/kubernetes.md).

The operator reads the ConfigMap (``Operator._measured_knee``) and programs the front-door replicas with
``pod_limit(knee)`` instead of the rendered ``recserve.io/pod-limit``, re-divided by the replicas as before
(control/kube/frontdoor_runtime.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from recserve.control.defaults import LIMIT_RULE, SLO_P99_MS
from recserve.control.routing.admission import initial_limit
from recserve.control.routing.router import RouterConfig

log = logging.getLogger("recserve.knee")

#: The ConfigMap the Job writes and the operator reads (RBAC: the Job may get and patch this one only).
KNEE_CONFIGMAP = "recserve-knee"
KNEE_RPS_ANNOTATION = "recserve.io/knee-rps"
KNEE_MEAN_ANNOTATION = "recserve.io/knee-mean-ms"
KNEE_SLO_ANNOTATION = "recserve.io/knee-slo-ms"
KNEE_POD_ANNOTATION = "recserve.io/knee-pod"
KNEE_AT_ANNOTATION = "recserve.io/knee-measured-at"


@dataclass(frozen=True)
class Knee:
    """A measured knee: requests/s one pod serves within ``slo_ms``, the mean latency at that rate."""

    rps: float
    slo_ms: float
    mean_ms: float | None = None
    pod: str = ""
    measured_at: str = ""

    def annotations(self) -> dict[str, str]:
        return {KNEE_RPS_ANNOTATION: f"{self.rps:g}", KNEE_SLO_ANNOTATION: f"{self.slo_ms:g}",
                KNEE_MEAN_ANNOTATION: "" if self.mean_ms is None else f"{self.mean_ms:g}",
                KNEE_POD_ANNOTATION: self.pod, KNEE_AT_ANNOTATION: self.measured_at}

    @classmethod
    def from_annotations(cls, ann: dict[str, str] | None) -> Knee | None:
        """The knee a ConfigMap carries; None when it has none (not measured yet) or an unusable one."""
        if not ann or not ann.get(KNEE_RPS_ANNOTATION):
            return None
        try:
            rps = float(ann[KNEE_RPS_ANNOTATION])
            slo = float(ann.get(KNEE_SLO_ANNOTATION) or SLO_P99_MS)
            mean = float(ann[KNEE_MEAN_ANNOTATION]) if ann.get(KNEE_MEAN_ANNOTATION) else None
        except ValueError:
            return None
        if not (rps > 0 and math.isfinite(rps) and slo > 0 and (mean is None or mean >= 0)):
            return None
        return cls(rps, slo, mean, ann.get(KNEE_POD_ANNOTATION, ""), ann.get(KNEE_AT_ANNOTATION, ""))


def pod_limit(knee_rps: float, slo_ms: float, mean_ms: float | None = None,
              rule: str = LIMIT_RULE) -> tuple[int, str]:
    """(requests in flight one pod takes, why): the Router's rule for one host (``RouterConfig.limit_basis``:
    knee x SLO for ``p99``, knee x the mean latency at the knee for ``mean``) within its bounds; the same numbers
    ``ClusterFrontDoor.pod_limit`` renders for a ``--knee-rps``."""
    r = RouterConfig(workdir=Path("/"), knee_rps=knee_rps, slo_p99_ms=slo_ms, knee_mean_ms=mean_ms or 0.0,
                     limit_rule=rule)
    basis = r.limit_basis()
    return initial_limit(knee_rps, basis.latency_s, r.min_limit, r.max_limit), basis.why


def write(api_client, namespace: str, name: str, knee: Knee, ladder: list) -> None:
    """The knee onto the ConfigMap (patched; created when it does not exist and RBAC allows)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)
    body = {"metadata": {"annotations": knee.annotations()}, "data": {"ladder.json": json.dumps(ladder)}}
    try:
        core.patch_namespaced_config_map(name, namespace, body)
    except ApiException as exc:
        if exc.status != 404:
            raise
        core.create_namespaced_config_map(namespace, {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": name},
                         **body["metadata"]}, "data": body["data"]})


def main(argv: list[str] | None = None) -> int:
    from recserve.control.kube.api import api_client, now

    p = argparse.ArgumentParser(prog="python -m recserve.control.kube.knee", description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="src", type=Path, required=True,
                   help="the knee ladder's result (python -m recserve.drills.capacity --output)")
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "recserve"))
    p.add_argument("--configmap", default=KNEE_CONFIGMAP, help="where the knee is written")
    p.add_argument("--kubeconfig", help="outside a cluster: kubeconfig file (default: in-cluster)")
    p.add_argument("--context")
    p.add_argument("--limit-rule", default=LIMIT_RULE, help="only for the line printed: the operator's rule decides")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        doc = json.loads(a.src.read_text())
        knee = Knee.from_annotations({KNEE_RPS_ANNOTATION: str(doc.get("knee_rps") or ""),
                                      KNEE_SLO_ANNOTATION: str(doc["slo_ms"]),
                                      KNEE_MEAN_ANNOTATION: "" if doc.get("mean_ms") is None else str(doc["mean_ms"]),
                                      KNEE_POD_ANNOTATION: str(doc.get("pod") or ""), KNEE_AT_ANNOTATION: now()})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"knee not written: {a.src}: {exc}", file=sys.stderr, flush=True)
        return 2
    if knee is None:
        print(f"knee not written: {a.src} holds no knee; {a.configmap} left as it was", file=sys.stderr, flush=True)
        return 1
    write(api_client(a.kubeconfig, a.context), a.namespace, a.configmap, knee, doc.get("ladder") or [])
    limit, why = pod_limit(knee.rps, knee.slo_ms, knee.mean_ms, a.limit_rule)
    print(f"knee {knee.rps:g} rps at p99 <= {knee.slo_ms:g} ms on {doc.get('picked') or knee.pod} (mean "
          f"{knee.mean_ms} ms): pod limit {limit} ({why}); written to ConfigMap {a.namespace}/{a.configmap}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
