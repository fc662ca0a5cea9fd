"""The operator against an in-memory Kubernetes API whose Pod objects are backed by REAL tritonserver processes.

kmock's emulator speaks the Kubernetes REST protocol to the official client but runs no controllers: the test
plays the Deployment controller (tests/kube_fixtures.py), starting each pod's tritonserver with the rendered
Deployment's own args and replacing pods the operator deletes. Two pods; one replacement.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import yaml

from recserve.control.kube.api import GATE, GROUP, VERSION
from recserve.control.kube.manifests import find, render
from recserve.control.kube.operator import Operator, OperatorConfig
from recserve.control.runtime.triton import TritonConfig, TritonServer
from tests.fleet_fixtures import fleet_repository, make_version
from tests.kube_fixtures import NAMESPACE, DeploymentController, KubeEmulator

pytestmark = pytest.mark.timeout(600)


def wait_for(pred, timeout: float = 90.0, what: str = "condition", tick=None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        last = pred()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class Cluster:
    def __init__(self, emu: KubeEmulator, ctl: DeploymentController, op: Operator, repo, key: str):
        self.emu, self.ctl, self.op, self.repo, self.key = emu, ctl, op, repo, key

    def pod(self, name: str) -> dict:
        return self.emu.api.sanitize_for_serialization(self.emu.core.read_namespaced_pod(name, NAMESPACE))

    def gate(self, name: str) -> str | None:
        conds = self.pod(name).get("status", {}).get("conditions") or []
        return next((c["status"] for c in conds if c["type"] == GATE), None)

    def loaded(self, name: str) -> dict[str, list[int]]:
        """What the pod's Triton really serves, asked through its admin-keyed repository API."""
        srv = self.ctl.servers[name]
        h = TritonServer(TritonConfig(host="127.0.0.1", http_port=srv.config.http_port, admin_key=self.key))
        return h.loaded_versions()

    def all_open(self) -> bool:
        names = list(self.ctl.servers)
        return len(names) == 2 and all(self.gate(n) == "True" for n in names)

    def rollout(self, name: str, **spec) -> None:
        self.emu.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "modelrollouts", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRollout",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": {"fleet": "recserve", **spec}})

    def rollout_status(self, name: str) -> dict:
        return self.emu.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "modelrollouts",
                                                            name).get("status") or {}

    def finished(self, name: str, timeout: float = 150.0) -> dict:
        return wait_for(lambda: (s := self.rollout_status(name)).get("result") not in (None, "Pending", "Running")
                        and s, timeout, f"ModelRollout {name} to finish")

    def fleet_status(self) -> dict:
        return self.emu.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "recservefleets",
                                                            "recserve").get("status") or {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("kube")
    repo = fleet_repository(base / "model_repository")
    v2 = make_version(repo, "ranker", "copy")  # on disk before any pod starts: Triton alone would serve it
    objects = render("cpu")
    emu = KubeEmulator().start()
    ctl = op = None
    try:
        fleet = find(objects, "RecServeFleet", "recserve")
        fleet["spec"]["desiredVersions"] = {"ranker": [v2 - 1]}
        fleet["spec"]["pool"]["checkIntervalSeconds"] = 0.5
        fleet["metadata"]["generation"] = 1  # the API server's; kmock keeps what it is given
        emu.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "recservefleets", fleet)
        op = Operator(OperatorConfig(namespace=NAMESPACE, repository=repo, workdir=base / "operator",
                                     reconcile_interval_s=0.5), api=_api(emu))
        op.start()  # creates the admin-key Secret the pods' args need
        key = op.pool.admin_key
        ctl = DeploymentController(emu.core, find(objects, "Deployment", "recserve-triton"), repo, base / "pods", key)
        ctl.reconcile()
        cl = Cluster(emu, ctl, op, repo, key)
        yield cl
        op = cl.op  # a test may have replaced the operator
    finally:
        if op is not None:
            op.stop()
        if ctl is not None:
            ctl.close()
        emu.stop()
        shutil.rmtree(base, ignore_errors=True)


def _api(emu: KubeEmulator):
    from recserve.control.kube.api import KubeApi

    return KubeApi(emu.api, NAMESPACE)


def test_new_pods_get_the_desired_versions_before_their_gate_opens(cluster):
    wait_for(cluster.all_open, 120, "both pods' golden-ok gates to open")
    for name in cluster.ctl.servers:
        # Triton alone loads the newest ranker (2); the fleet pins 1 and the operator loaded it before the gate.
        assert cluster.loaded(name)["ranker"] == [1], name
    loaded_events = cluster.emu.events("VersionsLoaded")
    assert {e.involved_object.name for e in loaded_events} == set(cluster.ctl.servers)
    st = wait_for(lambda: (s := cluster.fleet_status()).get("readyPods") == 2 and s, 10, "fleet status")
    assert st["desiredVersions"]["ranker"] == [1] and st["pods"] == 2
    secret = cluster.emu.core.read_namespaced_secret("recserve-triton-admin", NAMESPACE)
    assert secret.metadata.name == "recserve-triton-admin"


def conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status.get("conditions") or []}


def test_fleet_status_has_the_conditions_kubectl_wait_and_argo_cd_read(cluster):
    """`kubectl wait --for=condition=Ready recservefleet/recserve` reads status.conditions[type=Ready].status."""
    st = wait_for(lambda: (s := cluster.fleet_status()) and conditions(s).get("Ready", {}).get("status") == "True"
                  and conditions(s)["Progressing"]["status"] == "False" and s, 30, "Ready and not Progressing")
    conds = conditions(st)
    assert set(conds) == {"Ready", "Progressing", "Degraded"}
    assert conds["Degraded"]["status"] == "False" and conds["Ready"]["reason"] == "MinReadyPods"
    for c in conds.values():
        assert c["observedGeneration"] == st["observedGeneration"] == 1
        assert c["reason"] and c["message"] and c["lastTransitionTime"].endswith("Z")
    from recserve.control.kube.manifests import render_crds, validate

    fleet = cluster.emu.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "recservefleets", "recserve")
    validate([fleet], crds=render_crds())  # the status the operator writes fits the CRD's schema
    before = conds["Ready"]["lastTransitionTime"]
    time.sleep(1.5)
    assert conditions(cluster.fleet_status())["Ready"]["lastTransitionTime"] == before  # moves only on a flip


def test_both_drivers_provide_the_pool_interface_the_rollouts_use(cluster, tmp_path):
    from recserve.control.fleet.fleet import Fleet, FleetConfig
    from recserve.control.fleet.pool import ServingPool

    assert isinstance(cluster.op.pool, ServingPool)
    fleet = Fleet(FleetConfig(root=tmp_path / "fleet", repository=cluster.repo))  # starts no process
    try:
        assert isinstance(fleet, ServingPool)
    finally:
        fleet.state.close()


def test_repository_api_of_a_pod_is_locked_by_the_manifest_args(cluster):
    name = next(iter(cluster.ctl.servers))
    port = cluster.ctl.servers[name].config.http_port
    anon = TritonServer(TritonConfig(host="127.0.0.1", http_port=port))
    for method, path in (("POST", "/v2/repository/index"), ("GET", "/v2/logging"), ("GET", "/v2/trace/setting"),
                         ("GET", "/v2/systemsharedmemory/status")):
        status, _ = anon._request(method, path, {} if method == "POST" else None)
        assert status == 403, (path, status)


def test_a_bad_rollout_request_is_refused_with_the_field_named(cluster):
    cluster.rollout("ranker-v99", model="ranker", version=99)
    st = cluster.finished("ranker-v99", 30)
    assert st["result"] == "Refused" and "unknown version 99" in st["message"]


def test_canary_modelrollout_loads_gates_and_promotes_for_real(cluster):
    # The default gates, p99 included (issue 22): they were loose (10x, 500 ms) while Triton held requests ~0.5 s.
    cluster.rollout("ranker-v2", model="ranker", version=2, strategy="canary", steps=[50, 100], bakeSeconds=2)
    st = cluster.finished("ranker-v2")
    assert st["result"] == "Succeeded", (st["failedGate"], st["failedValue"], st["threshold"], st["history"][-4:])
    assert st["fromVersion"] == 1 and st["canary"] in cluster.ctl.servers
    for g in ("answer_overlap", "error_rate", "p99_ratio", "baseline_p99_ms"):
        assert g in st["gates"], g
    assert st["gates"]["answer_overlap"] == 1.0 and st["gates"]["error_rate"] == 0.0
    assert [h["weight"] for h in st["history"] if h["phase"] == "shift"] == [50, 100]
    # 100% on the canary: the Service loses the other pod (its gate closed for routing), then gets it back.
    other = next(n for n in cluster.ctl.servers if n != st["canary"])
    assert [e for e in cluster.emu.events("RolloutRouting") if e.involved_object.name == other]
    for name in cluster.ctl.servers:
        assert cluster.loaded(name)["ranker"] == [2], name
    wait_for(cluster.all_open, 30, "both gates open after the promotion")
    assert cluster.emu.events("RolloutPromote")
    wait_for(lambda: cluster.fleet_status()["desiredVersions"]["ranker"] == [2], 10, "fleet desired ranker [2]")


def test_modelrollout_with_wrong_answers_is_rolled_back_for_real(cluster):
    bad = make_version(cluster.repo, "ranker", "negate-scores", base=2)  # reversed answers
    cluster.rollout("ranker-bad", model="ranker", version=bad, steps=[50, 100], bakeSeconds=2)
    st = cluster.finished("ranker-bad")
    assert st["result"] == "RolledBack", st
    assert st["failedGate"] == "answer_overlap" and st["failedValue"] < st["threshold"]
    for name in cluster.ctl.servers:
        assert cluster.loaded(name)["ranker"] == [bad - 1], name
    assert any(e.type == "Warning" for e in cluster.emu.events("RolloutRollback"))
    wait_for(cluster.all_open, 60, "both gates open again after the rollback")


def test_recctl_reads_rollouts_and_aborts_one_through_a_kubeconfig(cluster, tmp_path, capsys):
    from recserve.control.api.recctl import main

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": cluster.emu.url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u", "namespace": NAMESPACE}}]}))
    k8s = ["k8s", "--kubeconfig", str(kubeconfig), "--context", "emu"]
    assert main(k8s + ["rollouts", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["ranker-v2"]["result"] == "Succeeded" and rows["ranker-bad"]["gate"] == "answer_overlap"
    good = make_version(cluster.repo, "ranker", "copy", base=2)
    slow = ["rollover", "ranker", "--version", str(good), "--steps", "100", "--bake", "60", "--name", "slow"]
    assert main(k8s + slow) == 0
    wait_for(lambda: cluster.rollout_status("slow").get("phase") in ("shift", "bake"), 60, "slow rollout baking")
    assert main(k8s + ["rollback", "ranker"]) == 0  # deletes the CR: the operator aborts and rolls back
    rec = wait_for(lambda: (r := cluster.op.pool.state.latest_rollout("ranker")).status != "running" and r, 60,
                   "the aborted rollout to finish")
    assert rec.status == "rolled_back" and rec.failed_gate == "operator"
    wait_for(cluster.all_open, 60, "both gates open after the abort")
    for name in cluster.ctl.servers:
        assert cluster.loaded(name)["ranker"] == [2], name


def test_pod_whose_golden_inference_fails_loses_its_gate_and_is_replaced_on_desired_versions(cluster):
    before = set(cluster.ctl.servers)
    victim = sorted(before)[0]
    (cluster.ctl.fault_dir(victim) / "ranker").write_text("fail")  # the model errors; Triton stays "ready"
    wait_for(lambda: victim in cluster.ctl.stopped, 60, f"{victim} deleted by the operator",
             tick=cluster.ctl.reconcile)  # the test replaces deleted pods, as the Deployment controller would
    gate_events = [e for e in cluster.emu.events("GoldenFailed") if e.involved_object.name == victim]
    assert gate_events and "golden" in gate_events[0].message
    assert [e for e in cluster.emu.events("PodDeleted") if e.involved_object.name == victim]
    (new,) = set(cluster.ctl.servers) - before
    wait_for(cluster.all_open, 120, "the replacement pod's gate to open", tick=cluster.ctl.reconcile)
    desired = cluster.fleet_status()["desiredVersions"]
    for name in cluster.ctl.servers:  # newest ranker on disk: 4 (its rollout was aborted); desired: 2
        got = cluster.loaded(name)
        assert got["ranker"] == desired["ranker"] == [2], name
    assert [e for e in cluster.emu.events("VersionsLoaded") if e.involved_object.name == new]
    # a pod that has not had its first golden check is "Starting", never "GoldenFailed" (that pages people)
    assert not [e for e in cluster.emu.events("GoldenFailed") if e.involved_object.name == new]


def test_operator_rescheduled_without_its_state_keeps_the_versions_it_had_moved_to(cluster, tmp_path):
    """A new operator pod (fresh emptyDir) takes the versions from the fleet's status, not the spec's old pin."""
    assert find_spec_pin(cluster) == [1] and cluster.fleet_status()["desiredVersions"]["ranker"] == [2]
    cluster.op.stop()
    cluster.op = Operator(OperatorConfig(namespace=NAMESPACE, repository=cluster.repo, workdir=tmp_path / "op2",
                                         reconcile_interval_s=0.5), api=_api(cluster.emu)).start()
    assert cluster.op.pool.desired()["ranker"] == [2]
    time.sleep(2)  # several checks: nothing gets reloaded to the spec's ranker 1
    wait_for(cluster.all_open, 60, "both gates open under the new operator")
    for name in cluster.ctl.servers:
        assert cluster.loaded(name)["ranker"] == [2], name


def find_spec_pin(cluster) -> list[int]:
    fleet = cluster.emu.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "recservefleets", "recserve")
    return fleet["spec"]["desiredVersions"]["ranker"]


def _patch_fleet_spec(cluster, generation: int, **spec) -> None:
    cluster.emu.custom.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "recservefleets", "recserve",
                                                      {"metadata": {"generation": generation}, "spec": spec})


def _spec_rollouts(cluster, version: int) -> list[dict]:
    items = cluster.emu.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "modelrollouts")["items"]
    return [cr for cr in items if (cr["metadata"].get("labels") or {}).get("recserve.io/source")
            == "spec.desiredVersions" and cr["spec"]["version"] == version]


def test_a_changed_spec_pin_rolls_out_through_the_gates(cluster):
    """After the first start, editing spec.desiredVersions (GitOps) creates a ModelRollout: canary, gates, then
    promotion; the fleet's Progressing condition says so while it runs."""
    good = make_version(cluster.repo, "ranker", "copy", base=2)
    _patch_fleet_spec(cluster, 2, desiredVersions={"ranker": [good]}, rollout={"steps": [100], "bakeSeconds": 1})
    (cr,) = wait_for(lambda: _spec_rollouts(cluster, good), 30, "the operator to create a ModelRollout")
    assert cr["spec"]["steps"] == [100] and cr["spec"]["model"] == "ranker"
    st = cluster.finished(cr["metadata"]["name"])
    assert st["result"] == "Succeeded", st
    assert st["gates"]["answer_overlap"] == 1.0  # the same gates as any rollout
    for name in cluster.ctl.servers:
        assert cluster.loaded(name)["ranker"] == [good], name
    assert cluster.emu.events("SpecRollout")
    fs = wait_for(lambda: (s := cluster.fleet_status()) and conditions(s)["Progressing"]["status"] == "False"
                  and s["desiredVersions"]["ranker"] == [good] and s, 30, "the fleet to settle")
    assert conditions(fs)["Ready"]["status"] == "True" and conditions(fs)["Degraded"]["status"] == "False"
    assert fs["observedGeneration"] == 2 and fs["specDesiredVersions"]["ranker"] == [good]
    time.sleep(1.5)
    assert len(_spec_rollouts(cluster, good)) == 1  # one pin change, one rollout


def test_a_spec_pin_whose_rollout_fails_its_gates_leaves_the_fleet_degraded(cluster):
    serving = cluster.fleet_status()["desiredVersions"]["ranker"]
    bad = make_version(cluster.repo, "ranker", "negate-scores", base=2)
    _patch_fleet_spec(cluster, 3, desiredVersions={"ranker": [bad]})
    (cr,) = wait_for(lambda: _spec_rollouts(cluster, bad), 30, "the operator to create a ModelRollout")
    st = cluster.finished(cr["metadata"]["name"])
    assert st["result"] == "RolledBack" and st["failedGate"] == "answer_overlap", st
    fs = wait_for(lambda: (s := cluster.fleet_status()) and conditions(s)["Degraded"]["status"] == "True" and s, 30,
                  "Degraded")
    deg = conditions(fs)["Degraded"]
    assert deg["reason"] == "SpecVersionsNotApplied" and "answer_overlap" in deg["message"], deg
    assert conditions(fs)["Ready"]["status"] == "True"  # still serving the old version, right
    assert fs["desiredVersions"]["ranker"] == serving
    for name in cluster.ctl.servers:
        assert cluster.loaded(name)["ranker"] == serving, name
