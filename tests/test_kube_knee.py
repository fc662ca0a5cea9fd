"""Issue 21 item 1: the knee per Triton pod measured in the cluster by a Job (deploy/k8s/components/knee-job).

Offline: the component renders with the cpu overlay and validates strictly; its pod meets the restricted Pod
Security Standard; it mounts the spec ConfigMap by its generated name; it may read and patch recserve-knee only, and
the operator may read it; a NetworkPolicy lets it reach the Triton pods' gRPC port. Then the Job's two commands as
rendered, run here: the drills' knee ladder (``python -m recserve.drills.capacity``) against a REAL tritonserver on
loopback (a pod started with the Triton Deployment's own args), sending the spec's golden requests, then
``python -m recserve.control.kube.knee`` writing the knee onto the ConfigMap in kmock's in-memory API. That the
operator follows a written knee is tests/test_kube_frontdoor_runtime.py's last test (real HAProxy replicas).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recserve.control.kube import frontdoor as kfd
from recserve.control.kube.knee import KNEE_CONFIGMAP, Knee, pod_limit
from recserve.control.kube.manifests import K8S_DIR, find, pss_violations, render, validate
from recserve.control.runtime.triton import REPO_ROOT

pytestmark = pytest.mark.timeout(400)
COMPONENT = K8S_DIR / "components" / "knee-job"


@pytest.fixture(scope="module")
def objs(tmp_path_factory):
    """The cpu overlay with the knee-job component, as a user's overlay would add it."""
    d = tmp_path_factory.mktemp("knee-overlay")
    (d / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S_DIR / "overlays" / "cpu", d)],
        "components": [os.path.relpath(COMPONENT, d)]}))
    return render(d)


def _pod(objs: list[dict]) -> dict:
    return find(objs, "Job", "recserve-knee")["spec"]["template"]["spec"]


def _container(objs: list[dict], name: str) -> dict:
    pod = _pod(objs)
    return next(c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name)


def test_the_knee_job_renders_validates_and_is_restricted(objs):
    rep = validate(objs)
    assert {"Job/recserve-knee", "ConfigMap/recserve-knee", "Role/recserve-knee", "RoleBinding/recserve-knee",
            "ServiceAccount/recserve-knee", "NetworkPolicy/recserve-knee-to-triton"} <= set(rep.builtin)
    assert pss_violations(objs) == []
    assert all(o["metadata"].get("namespace") == "recserve" for o in objs if "knee" in o["metadata"]["name"])
    pod = _pod(objs)
    (spec_cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(kfd.SPEC_CONFIGMAP)]
    vol = next(v for v in pod["volumes"] if v["name"] == "spec")
    assert vol["configMap"]["name"] == spec_cm["metadata"]["name"]  # the generated (hashed) name
    knee = _container(objs, "knee")
    assert knee["command"] == ["python", "-m", "recserve.drills.capacity"]
    target = next(a.split("=", 1)[1] for a in knee["args"] if a.startswith("--target="))
    svc = find(objs, "Service", target.split(":")[0])["spec"]
    assert svc["clusterIP"] == "None" and not svc.get("publishNotReadyAddresses")  # gate-open pods only
    assert f"--spec={kfd.SPEC_MOUNT}/{kfd.SPEC_FILE}" in knee["args"]
    assert _container(objs, "write")["command"] == ["python", "-m", "recserve.control.kube.knee"]
    # least privilege: the Job reads and patches its ConfigMap only; the operator may read it
    (rule,) = find(objs, "Role", "recserve-knee")["rules"]
    assert rule["resourceNames"] == [KNEE_CONFIGMAP] and sorted(rule["verbs"]) == ["get", "patch"]
    op_rules = find(objs, "Role", "recserve-operator")["rules"]
    assert any(KNEE_CONFIGMAP in (r.get("resourceNames") or []) and r["verbs"] == ["get"] for r in op_rules)
    assert "data" not in find(objs, "ConfigMap", KNEE_CONFIGMAP)  # applying again keeps what the Job wrote
    np_ = find(objs, "NetworkPolicy", "recserve-knee-to-triton")["spec"]
    assert np_["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "recserve-triton"}
    assert np_["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "recserve-knee"}
    assert np_["ingress"][0]["ports"] == [{"port": "grpc"}]


def test_without_the_component_no_overlay_has_the_job():
    for overlay in ("cpu", "gpu"):
        assert not [o for o in render(overlay) if o["kind"] == "Job"]


def test_a_knee_from_annotations_and_the_pod_limit_rules():
    k = Knee(612.5, 50.0, 18.0, "10.1.2.3", "2026-01-01T00:00:00Z")
    assert Knee.from_annotations(k.annotations()) == k
    assert Knee.from_annotations({}) is None and Knee.from_annotations(None) is None
    assert Knee.from_annotations({**k.annotations(), "recserve.io/knee-rps": "nan"}) is None
    assert Knee.from_annotations({**k.annotations(), "recserve.io/knee-rps": "-3"}) is None
    assert pod_limit(600.0, 50.0, 20.0)[0] == 30  # p99: knee x SLO, as ClusterFrontDoor renders for --knee-rps
    assert pod_limit(600.0, 50.0, 20.0, "mean")[0] == 12  # mean: knee x the mean latency at the knee
    assert pod_limit(500.0, 50.0)[0] == kfd.ClusterFrontDoor(knee_rps=500, slo_p99_ms=50).pod_limit()


def _local(container: dict, paths: dict[str, Path], subst: dict[str, str]) -> list[str]:
    """A rendered container's command line run here: mount paths by the local directories standing for them,
    ``$(VAR)`` and whole argument values by ``subst``."""
    mounts = {m["mountPath"]: paths[m["name"]] for m in container.get("volumeMounts", [])}
    out = []
    for arg in container.get("args", []):
        key, _, value = arg.partition("=")
        for var, val in subst.items():
            value = value.replace(var, val)
        for mount, here in mounts.items():
            if value == mount or value.startswith(mount + "/"):
                value = str(here) + value[len(mount):]
                break
        out.append(f"{key}={subst.get(key, value)}")
    assert container["command"][0] == "python"
    return [sys.executable, *container["command"][1:], *out]


def test_the_jobs_commands_measure_a_real_triton_pod_and_write_the_knee(objs, tmp_path):
    from kubernetes import client

    from tests.fleet_fixtures import fleet_repository
    from tests.kube_fixtures import NAMESPACE, DeploymentController, KubeEmulator
    from tests.test_kube_spec import _as_mounted

    class Emulator(KubeEmulator):
        RESOURCES = {**KubeEmulator.RESOURCES, "v1/configmaps": ("ConfigMap", [])}

    repo = fleet_repository(tmp_path / "model_repository")
    (spec_cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(kfd.SPEC_CONFIGMAP)]
    data = dict(spec_cm["data"])
    doc = yaml.safe_load(data[kfd.SPEC_FILE])
    for m in doc["models"].values():  # a shared 2-core test machine: a lenient SLO, so some rate holds it
        m["sloP99Ms"] = 1000
    data[kfd.SPEC_FILE] = yaml.safe_dump(doc)
    spec_dir = _as_mounted(data, tmp_path / "spec")
    work = tmp_path / "work"
    work.mkdir()
    emu = Emulator().start()
    ctl = None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", ""))
                                                       if p)}
    try:
        cm = find(objs, "ConfigMap", KNEE_CONFIGMAP)
        emu.core.create_namespaced_config_map(NAMESPACE, {**cm, "metadata": {**cm["metadata"], "namespace": NAMESPACE}})
        ctl = DeploymentController(emu.core, find(objs, "Deployment", "recserve-triton"), repo, tmp_path / "pods",
                                   "test-admin-key", replicas=1)
        (name,) = ctl.start_pods(1)
        port = ctl.servers[name].config.grpc_port
        paths = {"models": repo, "spec": spec_dir, "work": work, "tmp": tmp_path}
        measure = _local(_container(objs, "knee"), paths, {"--target": f"localhost:{port}"})
        measure += ["--start-rps=10", "--warm-s=1", "--step-s=1.5", "--max-steps=2", "--refine=0"]
        proc = subprocess.run(measure, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        result = json.loads((work / "knee.json").read_text())
        assert result["knee_rps"] and result["pod"] == "127.0.0.1" and result["slo_ms"] == 1000
        assert result["mean_ms"] is not None and result["mean_ms"] > 0
        assert "1 of 1 addresses of localhost" in result["picked"]
        assert [r["offered_rps"] for r in result["ladder"] if not r["warmup"]][:2] == [10.0, 13.0]

        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": emu.url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u", "namespace": NAMESPACE}}]}))
        write = _local(_container(objs, "write"), paths, {"$(POD_NAMESPACE)": NAMESPACE})
        write += [f"--kubeconfig={kubeconfig}", "--context=emu"]
        proc = subprocess.run(write, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"written to ConfigMap {NAMESPACE}/{KNEE_CONFIGMAP}" in proc.stdout
        got = emu.core.read_namespaced_config_map(KNEE_CONFIGMAP, NAMESPACE)
        knee = Knee.from_annotations(got.metadata.annotations)
        assert knee is not None and knee.rps == result["knee_rps"] and knee.pod == "127.0.0.1"
        assert knee.mean_ms == result["mean_ms"] and knee.slo_ms == 1000 and knee.measured_at
        assert json.loads(got.data["ladder.json"]) == result["ladder"]

        # no knee measured: the writer leaves the ConfigMap as it was and fails (the Job fails)
        (work / "knee.json").write_text(json.dumps({**result, "knee_rps": None}))
        proc = subprocess.run(write, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 1 and "holds no knee" in proc.stderr
        again = emu.core.read_namespaced_config_map(KNEE_CONFIGMAP, NAMESPACE)
        assert Knee.from_annotations(again.metadata.annotations) == knee
        assert isinstance(again, client.V1ConfigMap)
    finally:
        if ctl is not None:
            ctl.close()
        emu.stop()
