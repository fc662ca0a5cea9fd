"""Every Kustomize overlay renders offline (kubectl's built-in kustomize) and every object validates: built-in
kinds strictly against Kubernetes 1.37 schemas, custom resources against their CRD's openAPIV3Schema, and the
pieces that must agree (gate name, restricted APIs, HPA metric, adapter rule, operator RBAC) do."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from recserve.control.kube import api as kapi
from recserve.control.kube.manifests import K8S_DIR, OVERLAYS, ManifestError, crd_schemas, find, render, validate


@pytest.fixture(scope="module")
def rendered():
    return {o: render(o) for o in OVERLAYS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(rendered, overlay):
    rep = validate(rendered[overlay])
    assert {"Deployment/recserve-triton", "Deployment/recserve-operator", "HorizontalPodAutoscaler/recserve-triton",
            "PodDisruptionBudget/recserve-triton", "Role/recserve-operator",
            "CustomResourceDefinition/modelrollouts.recserve.io"} <= set(rep.builtin)
    assert rep.custom == ["RecServeFleet/recserve"]
    assert {"PrometheusRule/recserve-triton", "ServiceMonitor/recserve-operator",
            "ServiceMonitor/recserve-triton"} <= set(rep.foreign)


def test_examples_validate_against_the_crd_schema(rendered):
    schemas = crd_schemas(rendered["cpu"])
    examples = [d for p in sorted((K8S_DIR / "examples").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    assert examples
    validate([o for o in rendered["cpu"] if o["kind"] == "CustomResourceDefinition"] + examples)
    assert all((e["apiVersion"], e["kind"]) in schemas for e in examples)


def test_validation_rejects_bad_objects_naming_the_field(rendered):
    objs = rendered["cpu"]
    crds = [o for o in objs if o["kind"] == "CustomResourceDefinition"]
    bad_dep = copy.deepcopy(find(objs, "Deployment", "recserve-triton"))
    bad_dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = "http"
    with pytest.raises(ManifestError, match="Deployment/recserve-triton"):
        validate([bad_dep])
    bad_ro = {"apiVersion": "recserve.io/v1alpha1", "kind": "ModelRollout", "metadata": {"name": "x"},
              "spec": {"fleet": "recserve", "model": "ranker", "version": 2, "strategy": "yolo"}}
    with pytest.raises(ManifestError, match="spec.strategy"):
        validate(crds + [bad_ro])
    bad_fleet = copy.deepcopy(find(objs, "RecServeFleet", "recserve"))
    bad_fleet["spec"]["pool"]["minReady"] = 0
    with pytest.raises(ManifestError, match="spec.pool.minReady"):
        validate(crds + [bad_fleet])


def test_triton_pod_args_probes_gate_and_shutdown(rendered):
    dep = find(rendered["cpu"], "Deployment", "recserve-triton")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    args = c["args"]
    assert "--model-control-mode=explicit" in args and "--metrics-config=summary_latencies=true" in args
    for flag in ("--http-restricted-api=", "--grpc-restricted-protocol="):
        (arg,) = [a for a in args if a.startswith(flag)]
        cats, key = arg[len(flag):].split(":", 1)
        assert set(cats.split(",")) == {"model-repository", "shared-memory", "logging", "trace"}
        assert key == "admin-key=$(TRITON_ADMIN_KEY)"
    ref = c["env"][0]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (kapi.ADMIN_SECRET, kapi.ADMIN_SECRET_KEY)
    assert pod["readinessGates"] == [{"conditionType": kapi.GATE}]
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1].split()[-1])
    exit_timeout = int(next(a for a in args if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert pod["terminationGracePeriodSeconds"] >= sleep + exit_timeout  # drain, then in-flight requests finish
    assert {p["name"] for p in c["ports"]} == {"http", "grpc", "metrics"}


def test_gpu_only_in_the_gpu_overlay(rendered):
    def res(o):
        return find(rendered[o], "Deployment", "recserve-triton")["spec"]["template"]["spec"]["containers"][0][
            "resources"]
    assert "nvidia.com/gpu" not in str(res("cpu"))
    assert res("gpu")["limits"]["nvidia.com/gpu"] == 1
    assert "recommend_trt" in find(rendered["gpu"], "RecServeFleet", "recserve")["spec"]["models"]


def test_hpa_metric_is_the_one_the_adapter_serves_from_the_recording_rule(rendered):
    objs = rendered["cpu"]
    hpa = find(objs, "HorizontalPodAutoscaler", "recserve-triton")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    values = yaml.safe_load((K8S_DIR / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == metric
    recorded = {r.get("record") for g in find(objs, "PrometheusRule", "recserve-triton")["spec"]["groups"]
                for r in g["rules"]}
    assert rule["seriesQuery"].split("{")[0] in recorded
    sel = find(objs, "ServiceMonitor", "recserve-triton")["spec"]["selector"]["matchLabels"]
    svc = find(objs, "Service", "recserve-triton-metrics")
    assert sel.items() <= svc["metadata"]["labels"].items()


def test_operator_is_single_recreate_and_rbac_is_namespaced_least_privilege(rendered):
    objs = rendered["cpu"]
    op = find(objs, "Deployment", "recserve-operator")
    assert op["spec"]["replicas"] == 1 and op["spec"]["strategy"]["type"] == "Recreate"
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    rules = find(objs, "Role", "recserve-operator")["rules"]
    verbs = {(g, r): set(rule["verbs"]) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert verbs[("", "pods")] == {"get", "list", "watch", "delete"}
    assert verbs[("", "pods/status")] <= {"get", "patch"}
    assert not any("*" in v for v in verbs.values()) and ("", "secrets") in verbs
    get_secret = next(r for r in rules if "secrets" in r["resources"] and "get" in r["verbs"])
    assert get_secret["resourceNames"] == [kapi.ADMIN_SECRET]


def test_crds_have_status_subresource_and_printer_columns(rendered):
    for crd in [o for o in rendered["cpu"] if o["kind"] == "CustomResourceDefinition"]:
        (v,) = crd["spec"]["versions"]
        assert v["subresources"] == {"status": {}} and v["additionalPrinterColumns"]
        assert v["schema"]["openAPIV3Schema"]["properties"]["spec"]["required"]


def test_rule_files_wrap_as_one_prometheusrule_each(tmp_path):
    from recserve.control.kube.promrule import render as wrap_rules

    f = tmp_path / "recording.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "a:b", "expr": "sum(up)"}]}]}))
    (doc,) = yaml.safe_load_all(wrap_rules([f]))
    assert doc["metadata"]["name"] == "recserve-recording" and doc["spec"]["groups"][0]["rules"][0]["record"] == "a:b"
    validate([doc])
    f.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": []}, {"name": "g", "rules": []}]}))
    with pytest.raises(ValueError, match="repeat"):
        wrap_rules([f])


def test_monitoring_rules_of_the_repository_ship_as_prometheusrules(rendered):
    """The monitoring issue's rule files, when present, must reach the cluster unchanged (regenerate with
    ``python -m recserve.control.kube.promrule deploy/monitoring/rules/*.yml -o deploy/k8s/base/monitoring-rules.yaml``
    and list that file in deploy/k8s/base/kustomization.yaml)."""
    files = sorted((K8S_DIR.parent / "monitoring" / "rules").glob("*.yml"))
    if not files:
        pytest.skip("deploy/monitoring/rules/ is not in this tree (the monitoring issue's branch is not merged)")
    for f in files:
        pr = find(rendered["cpu"], "PrometheusRule", f"recserve-{f.stem}")
        assert pr["spec"]["groups"] == yaml.safe_load(f.read_text())["groups"], f


def _pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    """(kind/name, pod spec) of every object that makes pods."""
    out = []
    for o in objs:
        spec = o.get("spec") or {}
        if o["kind"] == "Pod":
            pod = spec
        elif o["kind"] == "CronJob":
            pod = spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
        else:
            pod = spec.get("template", {}).get("spec") if isinstance(spec.get("template"), dict) else None
        if pod and pod.get("containers"):
            out.append((f"{o['kind']}/{o['metadata']['name']}", pod))
    return out


def _keys_on_command_lines(pod: dict) -> list[str]:
    """Arguments of the pod's containers that carry a secret: a ``$(VAR)`` of an env var fed by a Secret, or a
    literal ``...key=<value>``."""
    found = []
    for c in pod.get("initContainers", []) + pod["containers"]:
        secret_env = {e["name"] for e in c.get("env", []) if "secretKeyRef" in (e.get("valueFrom") or {})}
        for arg in list(c.get("command", [])) + list(c.get("args", [])):
            if any(f"$({name})" in arg for name in secret_env) or re.search(r"key=(?!\$\()[^\s,]+", arg):
                found.append(f"{c['name']}: {arg}")
    return found


@pytest.mark.parametrize("where", ["base", *OVERLAYS])
def test_no_pod_shares_its_process_namespace_while_a_key_is_on_a_command_line(rendered, where):
    """Triton 2.51 takes its admin key only on its command line; a shared process namespace shows that command line
    (/proc/<pid>/cmdline) to every other container of the pod. The hang drill's shareProcessNamespace lives in
    overlays/drills only."""
    objs = render(K8S_DIR / "base") if where == "base" else rendered[where]
    specs = dict(_pod_specs(objs))
    assert _keys_on_command_lines(specs["Deployment/recserve-triton"]), "the check must see Triton's key argument"
    offenders = {name: _keys_on_command_lines(pod) for name, pod in specs.items()
                 if pod.get("shareProcessNamespace") and _keys_on_command_lines(pod)}
    assert not offenders, offenders


def test_the_drills_overlay_shares_the_process_namespace_for_the_hang_drill():
    objs = render(K8S_DIR / "overlays" / "drills")  # by path: "drills" alone is also the repository's drills/
    validate(objs)
    pod = find(objs, "Deployment", "recserve-triton")["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True  # kill -STOP through kubectl exec reaches tritonserver
    assert _keys_on_command_lines(pod)  # which is why it is a drills-only overlay (the test above would refuse it)
