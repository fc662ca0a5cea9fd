"""The few Kubernetes API calls the operator makes, over the official client (sync, like the control plane).

Every write the operator does is here, so RBAC (deploy/k8s/base/operator-rbac.yaml) can be read against it:
pods get/list/delete, pods/status patch, events create, one Secret get/create, recserve CRs get/list and their
status patch, ModelRollouts create (a change of the fleet's spec.desiredVersions becomes one), one ConfigMap get
(the front door's, by name: the serving spec it was rendered from).
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

GROUP = "recserve.io"
VERSION = "v1alpha1"
FLEETS = "recservefleets"
ROLLOUTS = "modelrollouts"
#: The pod readiness gate only the operator sets, after a golden inference answered right.
GATE = "recserve.io/golden-ok"
ADMIN_SECRET = "recserve-triton-admin"
ADMIN_SECRET_KEY = "admin-key"


def api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (and context) given or the default."""
    if kubeconfig is None and context is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    return client.ApiClient(cfg)


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def selector_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class KubeApi:
    """One namespace of one cluster."""

    def __init__(self, api: client.ApiClient, namespace: str):
        self.namespace = namespace
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    # ------------------------------------------------------------------ pods
    def pods(self, labels: dict[str, str]) -> list[dict]:
        res = self.core.list_namespaced_pod(self.namespace, label_selector=selector_text(labels))
        return [self.core.api_client.sanitize_for_serialization(p) for p in res.items]

    def set_condition(self, pod: dict, ctype: str, ok: bool, reason: str, message: str) -> None:
        """Set one pod condition; the whole list is sent, so merge and strategic-merge patches agree."""
        conds = [c for c in (pod.get("status", {}).get("conditions") or []) if c.get("type") != ctype]
        conds.append({"type": ctype, "status": "True" if ok else "False", "reason": reason,
                      "message": message[:1000], "lastTransitionTime": now()})
        self.core.patch_namespaced_pod_status(pod["metadata"]["name"], self.namespace,
                                              {"status": {"conditions": conds}})

    def delete_pod(self, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # ------------------------------------------------------------------ secrets
    def admin_key(self) -> str:
        """The Triton admin key from its Secret, created once with a random key when it does not exist."""
        try:
            sec = self.core.read_namespaced_secret(ADMIN_SECRET, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
        else:
            if not sec.data or ADMIN_SECRET_KEY not in sec.data:
                raise RuntimeError(f"Secret {ADMIN_SECRET} has no key {ADMIN_SECRET_KEY!r}")
            return base64.b64decode(sec.data[ADMIN_SECRET_KEY]).decode()
        key = secrets.token_urlsafe(32)
        self.core.create_namespaced_secret(self.namespace, {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": ADMIN_SECRET, "namespace": self.namespace,
                         "labels": {"app.kubernetes.io/part-of": "recserve"}},
            "data": {ADMIN_SECRET_KEY: base64.b64encode(key.encode()).decode()}})
        return key

    # ------------------------------------------------------------------ configmaps
    def configmap_annotations(self, name: str) -> dict[str, str] | None:
        """One ConfigMap's annotations; None when it does not exist."""
        try:
            cm = self.core.read_namespaced_config_map(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(cm.metadata.annotations or {})

    # ------------------------------------------------------------------ custom resources
    def fleet(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, FLEETS, name)

    def patch_fleet_status(self, name: str, status: dict) -> None:
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, FLEETS, name,
                                                          {"status": status})

    def rollouts(self) -> list[dict]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, ROLLOUTS)["items"]

    def create_rollout(self, body: dict) -> dict:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, ROLLOUTS, body)

    def patch_rollout_status(self, name: str, status: dict) -> None:
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, ROLLOUTS, name,
                                                          {"status": status})

    # ------------------------------------------------------------------ events
    def event(self, obj: dict, reason: str, message: str, warning: bool = False) -> None:
        meta = obj.get("metadata", {})
        self.core.create_namespaced_event(self.namespace, {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta.get('name', 'recserve')}.{secrets.token_hex(6)}", "namespace": self.namespace},
            "involvedObject": {"apiVersion": obj.get("apiVersion", "v1"), "kind": obj.get("kind", ""),
                               "name": meta.get("name", ""), "namespace": self.namespace,
                               "uid": meta.get("uid", "")},
            "reason": reason, "message": message[:1024], "type": "Warning" if warning else "Normal",
            "source": {"component": "recserve-operator"}, "firstTimestamp": now(), "lastTimestamp": now(),
            "count": 1})
