"""Every Kustomize overlay renders offline (kubectl's built-in kustomize) and every object validates: built-in
kinds strictly against Kubernetes 1.37 schemas, custom resources against their CRD's openAPIV3Schema, and the
pieces that must agree (gate name, restricted APIs, HPA metric, adapter rule, operator RBAC) do."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from recserve.control.kube import api as kapi
from recserve.control.kube.manifests import (
    CRDS_DIR,
    K8S_DIR,
    OVERLAYS,
    ManifestError,
    crd_schemas,
    find,
    pss_violations,
    render,
    render_crds,
    validate,
)

#: Every kustomization a cluster may get: the overlays, the drills overlay (by path: "drills" alone is also the
#: repository's drills/), and the base itself.
ALL_KUSTOMIZATIONS = {**{o: o for o in OVERLAYS}, "drills": K8S_DIR / "overlays" / "drills", "base": K8S_DIR / "base"}


@pytest.fixture(scope="module")
def rendered():
    return {o: render(o) for o in OVERLAYS}


@pytest.fixture(scope="module")
def crds():
    return render_crds()


@pytest.fixture(scope="module")
def everything():
    return {name: render(path) for name, path in ALL_KUSTOMIZATIONS.items()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(rendered, overlay):
    rep = validate(rendered[overlay])
    assert {"Deployment/recserve-triton", "Deployment/recserve-operator", "HorizontalPodAutoscaler/recserve-triton",
            "PodDisruptionBudget/recserve-triton", "Role/recserve-operator",
            "NetworkPolicy/recserve-triton-ingress"} <= set(rep.builtin)
    assert rep.custom == ["RecServeFleet/recserve"]
    assert {"PrometheusRule/recserve-triton", "ServiceMonitor/recserve-operator",
            "ServiceMonitor/recserve-triton"} <= set(rep.foreign)


def test_crds_are_their_own_kustomization_applied_before_the_overlays(everything, crds):
    """One `kubectl apply -k` of a CRD and an object of its kind fails ("ensure CRDs are installed first"): the
    CRDs render alone from deploy/k8s/crds, validate strictly, and no overlay carries one."""
    assert sorted(o["metadata"]["name"] for o in crds) == ["modelrollouts.recserve.io", "recservefleets.recserve.io"]
    assert {o["kind"] for o in crds} == {"CustomResourceDefinition"}
    rep = validate(crds, crds=[])
    assert len(rep.builtin) == 2 and not rep.custom
    for name, objs in everything.items():
        assert not [o for o in objs if o["kind"] == "CustomResourceDefinition"], name
        served = set(crd_schemas(crds))
        assert all((o["apiVersion"], o["kind"]) in served for o in objs if o["apiVersion"].startswith("recserve.io/"))
    # what the docs tell people to wait for is what the CRDs kustomization creates
    text = (CRDS_DIR / "kustomization.yaml").read_text()
    assert all(f"crd/{o['metadata']['name']}" in text for o in crds)
    docs = (K8S_DIR.parents[1] / "docs" / "kubernetes.md").read_text()
    assert "kubectl apply -k deploy/k8s/crds" in docs and "--for condition=established" in docs


def test_examples_validate_against_the_crd_schema(crds):
    schemas = crd_schemas(crds)
    examples = [d for p in sorted((K8S_DIR / "examples").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    assert examples
    validate(examples, crds=crds)
    assert all((e["apiVersion"], e["kind"]) in schemas for e in examples)


def test_validation_rejects_bad_objects_naming_the_field(rendered, crds):
    objs = rendered["cpu"]
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
    ref = next(e for e in c["env"] if e["name"] == "TRITON_ADMIN_KEY")["valueFrom"]["secretKeyRef"]
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


def test_crds_have_status_subresource_and_printer_columns(crds):
    for crd in crds:
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
    """The monitoring rule files reach the cluster in their cluster form: less the single-host-only rules, with
    kube-prometheus severities and cluster runbooks (regenerate with
    ``python -m recserve.control.kube.promrule deploy/monitoring/rules/*.yml -o deploy/k8s/base/monitoring-rules.yaml``
    and list that file in deploy/k8s/base/kustomization.yaml)."""
    from recserve.control.kube.promrule import cluster_groups

    files = sorted((K8S_DIR.parent / "monitoring" / "rules").glob("*.yml"))
    if not files:
        pytest.skip("deploy/monitoring/rules/ is not in this tree (the monitoring issue's branch is not merged)")
    for f in files:
        pr = find(rendered["cpu"], "PrometheusRule", f"recserve-{f.stem}")
        assert pr["spec"]["groups"] == cluster_groups(yaml.safe_load(f.read_text())["groups"]), f


def _pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    """(kind/name, pod spec) of every object that makes pods."""
    from recserve.control.kube.manifests import pod_templates

    return pod_templates(objs)


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


# ---------------------------------------------------------------------------------------- production pods
@pytest.mark.parametrize("where", list(ALL_KUSTOMIZATIONS))
def test_every_container_meets_the_restricted_pod_security_standard(everything, where):
    """Every rendered container of every kustomization: runAsNonRoot, no privilege escalation, capabilities drop
    ALL, seccomp RuntimeDefault, a read-only root filesystem, its own securityContext; the namespace enforces it."""
    objs = everything[where]
    specs = dict(_pod_specs(objs))
    assert {"Deployment/recserve-triton", "Deployment/recserve-operator"} <= set(specs)
    assert pss_violations(objs) == []
    ns = find(objs, "Namespace", "recserve")["metadata"]["labels"]
    assert ns["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, pod in specs.items():  # writable paths are emptyDirs, mounted where the container writes
        for c in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            vols = {v["name"]: v for v in pod.get("volumes", [])}
            assert "emptyDir" in vols[mounts["/tmp"]], (name, c["name"])


@pytest.mark.parametrize("plant", ["root", "escalation", "caps", "seccomp", "rw-root", "no-container-sc", "hostpath"])
def test_the_pod_security_check_fails_on_a_planted_violation(rendered, plant):
    objs = copy.deepcopy(rendered["cpu"])
    dep = find(objs, "Deployment", "recserve-triton")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    if plant == "root":
        c["securityContext"]["runAsNonRoot"] = False
        c["securityContext"]["runAsUser"] = 0
    elif plant == "escalation":
        del c["securityContext"]["allowPrivilegeEscalation"]
    elif plant == "caps":
        c["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}
    elif plant == "seccomp":
        pod["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    elif plant == "rw-root":
        c["securityContext"]["readOnlyRootFilesystem"] = False
    elif plant == "no-container-sc":
        del c["securityContext"]
    elif plant == "hostpath":
        pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    found = pss_violations(objs)
    assert found and all(f.startswith("Deployment/recserve-triton") for f in found), found


def test_drill_only_settings_stay_in_the_drills_overlay(everything):
    for where in ("base", *OVERLAYS):
        for name, pod in _pod_specs(everything[where]):
            assert not pod.get("shareProcessNamespace"), (where, name)
            assert "recserve.io/role" not in str(everything[where]), where  # the drill probe's NetworkPolicy
    assert find(everything["drills"], "NetworkPolicy", "recserve-drill-probe-to-triton")


def test_triton_pods_spread_across_nodes_and_probes_fit_triton_load_times(rendered):
    from recserve.control.kube.pool import LOAD_TIMEOUT_S

    for o in OVERLAYS:
        pod = find(rendered[o], "Deployment", "recserve-triton")["spec"]["template"]["spec"]
        spread = {t["topologyKey"]: t for t in pod["topologySpreadConstraints"]}
        host = spread["kubernetes.io/hostname"]
        assert host["maxSkew"] == 1 and host["whenUnsatisfiable"] == "DoNotSchedule"
        assert host["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "recserve-triton"}
        c = pod["containers"][0]
        start, live, ready = c["startupProbe"], c["livenessProbe"], c["readinessProbe"]
        # the startup probe covers loading every model (liveness and readiness wait for it)
        assert start["periodSeconds"] * start["failureThreshold"] >= LOAD_TIMEOUT_S
        assert live["timeoutSeconds"] > 1 and ready["timeoutSeconds"] > 1 and start["timeoutSeconds"] > 1
        assert live["periodSeconds"] * live["failureThreshold"] >= 30  # a GC pause or a long batch is not death


def test_no_replicas_on_a_deployment_an_hpa_owns(everything):
    """GitOps tools and `kubectl apply` would reset the HPA's count to the manifest's at every sync."""
    for where, objs in everything.items():
        owned = {h["spec"]["scaleTargetRef"]["name"] for h in objs if h["kind"] == "HorizontalPodAutoscaler"}
        assert owned, where
        for name in owned:
            assert "replicas" not in find(objs, "Deployment", name)["spec"], (where, name)


def test_network_policies_let_clients_reach_only_the_front_door(rendered):
    objs = rendered["cpu"]
    pols = [o for o in objs if o["kind"] == "NetworkPolicy"]
    deny = [p for p in pols if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"]  # everything else: no ingress at all
    frontdoor = {"app.kubernetes.io/component": "frontdoor"}
    open_to_all = [p for p in pols if any(rule == {} or "from" not in rule for rule in p["spec"].get("ingress", []))]
    assert [p["spec"]["podSelector"]["matchLabels"] for p in open_to_all] == [frontdoor]
    triton = find(objs, "NetworkPolicy", "recserve-triton-ingress")["spec"]
    sources = [f.get("podSelector", {}).get("matchLabels") for r in triton["ingress"] for f in r["from"]]
    assert frontdoor in sources and {"app.kubernetes.io/name": "recserve-operator"} in sources
    ports = {p["port"] for r in triton["ingress"] for p in r["ports"]}
    assert ports == {"http", "grpc", "metrics", "modelsync"}  # port names the Triton pod's containers declare
    sync_from = [f for r in triton["ingress"] if {"port": "modelsync"} in r["ports"] for f in r["from"]]
    assert sync_from == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "recserve-operator"}}}]


def test_the_gpu_overlay_golden_checks_and_alerts_on_the_trt_ensembles_it_serves(rendered):
    from recserve.control.kube import gpurules
    from recserve.control.kube.trtgolden import trt_models
    from recserve.control.monitoring.config import DEMO_SELECTOR, model_selector

    gpu, cpu = rendered["gpu"], rendered["cpu"]
    served = find(gpu, "RecServeFleet", "recserve")["spec"]["models"]
    loaded = [a.split("=", 1)[1] for a in find(gpu, "Deployment", "recserve-triton")["spec"]["template"]["spec"][
        "containers"][0]["args"] if a.startswith("--load-model=")]
    assert sorted(served) == sorted(loaded) == sorted(gpurules.GPU_MODELS)
    assert trt_models(served) == ["recommend_trt", "search_trt"]  # the operator golden-checks them
    assert not trt_models(find(cpu, "RecServeFleet", "recserve")["spec"]["models"])
    assert gpurules.OUTPUT.read_text() == gpurules.render(), \
        "regenerate: python -m recserve.control.kube.gpurules -o deploy/k8s/overlays/gpu/monitoring-rules-trt.yaml"

    def exprs(objs):
        return {(o["metadata"]["name"], g["name"], r.get("record") or r.get("alert")): r["expr"]
                for o in objs if o["kind"] == "PrometheusRule" for g in o["spec"]["groups"] for r in g["rules"]}

    base, wide = exprs(cpu), exprs(gpu)
    assert base.keys() == wide.keys()  # the same rules, none lost by the patch
    demo = [k for k, e in base.items() if DEMO_SELECTOR in e]
    assert demo, "the base's rules name the demo's models"
    for k in demo:  # SLO rules and alerts select the *_trt ensembles on GPU pods
        assert model_selector(gpurules.GPU_MODELS) in wide[k] and DEMO_SELECTOR not in wide[k], k
    assert all(wide[k] == e for k, e in base.items() if k not in demo)
