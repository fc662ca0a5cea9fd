"""Issue 21 item 1: the operator programs every front-door replica through HAProxy's runtime API.

Real parts: THREE (then four) real HAProxy processes, each run from the files of the committed generator
(``ClusterFrontDoor.files``: the same haproxy.cfg with its TCP runtime API) on its own loopback address with the same
ports, as front-door pods share container ports; TWO real tritonservers as the Triton pods (127.0.0.2, 127.0.0.3,
same ports), started with the rendered Deployment's args; the operator itself (``Operator``) against kmock's
in-memory Kubernetes API, which holds the Pod objects of both Deployments and the front door's ConfigMap. The test
plays the Deployment controllers and the cluster DNS: a small dnslib server answers the headless Service's name with
the Triton pods whose golden gate is open in the API (what the Endpoints controller and CoreDNS do).

Shown: two replicas -> every pod slot of both has ``maxconn`` = pod limit / 2; a third replica -> all three re-divided
to / 3; a canary split (the rollout manager's calls on the pool's traffic) reaches every replica as per-pod weights
on the slot that holds that pod's IP there; a pod whose gate closes is drained on every replica before the DNS answer
drops it; an unreachable replica is reported (status.frontDoor, Degraded/FrontDoorNotProgrammed, a Warning Event on
its pod) and still counted in the division. Not shown: the real cluster DNS, the NetworkPolicy being enforced, the
haproxy:2.6 image (docs/kubernetes.md).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import threading
import time

import pytest

from recserve.control.kube import frontdoor as kfd
from recserve.control.kube.api import GATE, GROUP, VERSION
from recserve.control.kube.frontdoor_runtime import (
    ADMF_FDRAIN,
    ADMF_RMAINT,
    FRONTDOOR_LABELS,
    RUNTIME_PORT,
    _table,
    runtime_command,
)
from recserve.control.kube.manifests import find, render
from recserve.control.kube.operator import Operator, OperatorConfig
from recserve.control.runtime.triton import TritonConfig
from tests.fleet_fixtures import fleet_repository
from tests.kube_fixtures import NAMESPACE, DeploymentController, KubeEmulator
from tests.test_kube_frontdoor import FakeClusterDNS, _common_free_port

pytestmark = pytest.mark.timeout(600)

TRITON_IPS = ("127.0.0.2", "127.0.0.3")
FRONTDOOR_IPS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
DEAD_IP = "127.0.0.14"
#: knee 96 rps x SLO 250 ms = 24 in flight per Triton pod: 12 per replica at 2, 8 at 3, 6 at 4
GEN = kfd.ClusterFrontDoor(knee_rps=96, slo_p99_ms=250)


def wait_for(pred, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class _Emulator(KubeEmulator):
    RESOURCES = {**KubeEmulator.RESOURCES, "v1/configmaps": ("ConfigMap", [])}


class PinnedPods(DeploymentController):
    """The Triton Deployment's pods on their own addresses (127.0.0.2, .3) with the same ports, as pods are."""

    def __init__(self, *a, ports: tuple[int, int, int], **kw):
        super().__init__(*a, **kw)
        self.ports = ports
        self.ips: dict[str, str] = {}

    def pod_config(self, name: str, models: list[str]) -> TritonConfig:
        """Pod ``name`` on the next free address, with the ports every pod has."""
        ip = next(i for i in TRITON_IPS if i not in self.ips.values())
        self.ips[name] = ip
        http, grpc, metrics = self.ports
        return TritonConfig(model_repository=self.repository, workdir=self.workdir / name, host=ip,
                            http_port=http, grpc_port=grpc, metrics_port=metrics, models=models,
                            admin_key=self.admin_key, name=name)

    def _create_pod(self, name: str, srv) -> None:
        spec = copy.deepcopy(self.template["spec"])
        local = {"http": srv.config.http_port, "grpc": srv.config.grpc_port, "metrics": srv.config.metrics_port}
        for p in spec["containers"][0]["ports"]:
            p["containerPort"] = local[p["name"]]
        for c in spec["containers"][1:]:  # the models-sync sidecar
            for p in c.get("ports") or []:
                if p["name"] == "modelsync":
                    p["containerPort"] = self.sidecar_port()
        self.core.create_namespaced_pod(NAMESPACE, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": dict(self.template["metadata"]["labels"]),
                         "uid": f"uid-{name}"},
            "spec": spec, "status": {"phase": "Running", "podIP": self.ips[name], "conditions": []}})


class FrontDoorReplicas:
    """The front-door Deployment: real HAProxy processes from the generator's files, and their Pod objects."""

    def __init__(self, emu: KubeEmulator, dns: FakeClusterDNS, base, pod_ports: tuple[int, int]):
        self.emu, self.dns, self.base, self.pod_ports = emu, dns, base, pod_ports
        self.ports = tuple(_common_free_port(FRONTDOOR_IPS + (DEAD_IP,)) for _ in range(3))
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, ip: str) -> str:
        d = self.base / f"fd-{ip}"
        d.mkdir(parents=True, exist_ok=True)
        grpc, http, metrics = self.ports
        cfg = GEN.haproxy_config(config_dir=d, run_dir=d, nameservers=(self.dns.address,), grpc_port=grpc,
                                 http_port=http, pod_ports=self.pod_ports, bind=ip, metrics_port=metrics)
        for name, text in GEN.files(cfg).items():
            (d / name).write_text(text)
        self.procs[ip] = subprocess.Popen(["haproxy", "-W", "-db", "-f", str(d / "haproxy.cfg")],
                                          stdout=subprocess.DEVNULL, stderr=(d / "haproxy.log").open("w"))
        wait_for(lambda: _answers(ip), 15, f"haproxy on {ip}")
        return self.add_pod(ip)

    def add_pod(self, ip: str) -> str:
        name = f"recserve-frontdoor-{ip.rsplit('.', 1)[1]}"
        self.emu.core.create_namespaced_pod(NAMESPACE, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {**FRONTDOOR_LABELS, "app.kubernetes.io/component": "frontdoor"}},
            "spec": {"containers": [{"name": "haproxy", "image": "haproxy:2.6"}]},
            "status": {"phase": "Running", "podIP": ip}})
        return name

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _answers(ip: str) -> bool:
    try:
        runtime_command(ip, RUNTIME_PORT, "show info", 1.0, check=False)
        return True
    except Exception:  # noqa: BLE001 - not listening yet
        return False


def servers(ip: str) -> dict[str, dict]:
    """``backend/server`` -> addr (None when none), drained, weight, maxconn, as the replica's runtime API says."""
    state = _table(runtime_command(ip, RUNTIME_PORT, "show servers state", check=False), "# be_id")
    slim = {f"{r['pxname']}/{r['svname']}": r["slim"]
            for r in _table(runtime_command(ip, RUNTIME_PORT, "show stat", check=False), "# pxname")}
    out = {}
    for r in state:
        admin = int(r["srv_admin_state"])
        key = f"{r['be_name']}/{r['srv_name']}"
        out[key] = {"addr": None if admin & ADMF_RMAINT or r["srv_addr"] == "-" else r["srv_addr"],
                    "drained": bool(admin & ADMF_FDRAIN), "weight": int(r["srv_uweight"]), "maxconn": slim[key]}
    return out


def pod_slots(ip: str) -> dict[str, dict]:
    """The pod servers of both pool backends."""
    return {k: v for k, v in servers(ip).items() if k.startswith(("be_grpc_pool/", "be_http_pool/"))}


def by_addr(ip: str, pod_ip: str) -> list[dict]:
    return [v for v in pod_slots(ip).values() if v["addr"] == pod_ip]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("fdrt")
    repo = fleet_repository(base / "model_repository")
    objects = render("cpu")
    emu = _Emulator().start()
    dns = FakeClusterDNS()
    ctl = op = fds = None
    follow = threading.Event()
    follow.set()
    done = threading.Event()

    def dns_follows_gates() -> None:  # the Endpoints controller + CoreDNS: gate open -> in the headless Service
        while not done.wait(0.3):
            if not follow.is_set():
                continue
            try:
                pods = emu.core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/name=recserve-triton")
            except Exception:  # noqa: BLE001 - the emulator stopping
                continue
            ready = [p.status.pod_ip for p in pods.items if p.status and p.status.pod_ip
                     and any(c.type == GATE and c.status == "True" for c in p.status.conditions or [])]
            dns.ready[:] = sorted(ready)

    syncer = threading.Thread(target=dns_follows_gates, daemon=True)
    try:
        assert GEN.pod_limit() == 24
        fleet = find(objects, "RecServeFleet", "recserve")
        fleet["spec"]["pool"]["checkIntervalSeconds"] = 0.5
        fleet["metadata"]["generation"] = 1
        emu.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "recservefleets", fleet)
        cm = GEN.configmap()
        cm["metadata"]["namespace"] = NAMESPACE
        emu.core.create_namespaced_config_map(NAMESPACE, cm)
        ports = tuple(_common_free_port(TRITON_IPS) for _ in range(3))
        assert len(set(ports)) == 3
        fds = FrontDoorReplicas(emu, dns, base, (ports[1], ports[0]))
        names = [fds.start(ip) for ip in FRONTDOOR_IPS[:2]]
        from recserve.control.kube.api import KubeApi

        op = Operator(OperatorConfig(namespace=NAMESPACE, repository=repo, workdir=base / "operator",
                                     reconcile_interval_s=0.5), api=KubeApi(emu.api, NAMESPACE))
        op.start()
        ctl = PinnedPods(emu.core, find(objects, "Deployment", "recserve-triton"), repo, base / "pods",
                         op.pool.admin_key, ports=ports)
        ctl.reconcile()
        syncer.start()
        yield {"emu": emu, "dns": dns, "op": op, "ctl": ctl, "fds": fds, "names": names, "follow": follow}
    finally:
        done.set()
        if op is not None:
            op.stop()
        if fds is not None:
            fds.stop()
        if ctl is not None:
            ctl.close()
        dns.stop()
        emu.stop()
        shutil.rmtree(base, ignore_errors=True)


def fleet_status(cl) -> dict:
    return cl["emu"].custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "recservefleets",
                                                         "recserve").get("status") or {}


def degraded(cl) -> dict:
    return next((c for c in fleet_status(cl).get("conditions") or [] if c["type"] == "Degraded"), {})


def limits_are(ips, share: int, fallback: int):
    def check():
        for ip in ips:
            for key, v in servers(ip).items():
                want = fallback if "_fallback/" in key else share
                if "_pool/" in key or "_fallback/" in key:
                    if v["maxconn"] != str(want):
                        return False
        return True
    return check


def both_pods_listed(ips):
    return lambda: all(len(by_addr(ip, pod)) == 2 for ip in ips for pod in TRITON_IPS)


def test_two_replicas_get_half_the_pod_limit_each(cluster):
    op, ctl = cluster["op"], cluster["ctl"]
    two = FRONTDOOR_IPS[:2]
    wait_for(lambda: len(op._ready_ids()) == 2, 180, "both Triton pods' gates to open")
    wait_for(both_pods_listed(two), 30, "both Triton pods in every replica's pool (DNS)")
    wait_for(limits_are(two, 12, 16), 15, "maxconn 24 / 2 = 12 per pod slot, fallback 32 / 2 = 16, on both")
    for ip in two:
        assert all(not v["drained"] and v["weight"] == 1 for v in pod_slots(ip).values())
    # which slot holds which Triton pod, per replica (the status is written by the pass after the DNS answer)
    st = wait_for(lambda: (s := fleet_status(cluster).get("frontDoor")) and s["replicas"] == 2
                  and all(set(s["slots"].get(n) or ()) == set(ctl.ips) for n in cluster["names"]) and s, 10,
                  "status.frontDoor with both replicas' slots")
    assert st["podLimit"] == 24 and st["perReplicaLimit"] == 12 and st["notProgrammed"] == []
    assert sorted(st["programmed"]) == sorted(cluster["names"])
    events = [e for e in cluster["emu"].core.list_namespaced_event(NAMESPACE).items if e.reason == "FrontDoorLimits"]
    assert any("2 front-door replicas: each admits 12" in e.message for e in events)


def test_a_third_replica_re_divides_the_limits_on_all_three(cluster):
    cluster["names"].append(cluster["fds"].start(FRONTDOOR_IPS[2]))
    t0 = time.monotonic()
    wait_for(limits_are(FRONTDOOR_IPS, 8, 10), 20, "24 / 3 = 8 per pod slot, fallback 32 / 3 = 10, on all three")
    print(f"re-divided on 3 replicas {time.monotonic() - t0:.1f} s after the third one's pod appeared")
    wait_for(lambda: fleet_status(cluster)["frontDoor"]["perReplicaLimit"] == 8, 10, "status.frontDoor says 8")
    wait_for(both_pods_listed(FRONTDOOR_IPS), 30, "the third replica resolved both Triton pods")


def _slot(op, name: str) -> int:
    return next(r.slot for r in op.pool.state.instances() if r.id == name)


def test_a_canary_split_reaches_every_replica_as_per_pod_weights(cluster):
    op, ctl = cluster["op"], cluster["ctl"]
    canary, primary = sorted(ctl.ips)
    traffic = op.pool.traffic
    # what RolloutManager does for a 10 % canary step (control/rollout/manager.py)
    traffic.route("split")
    traffic.set_weight(_slot(op, primary), 90)
    traffic.set_weight(_slot(op, canary), 10)
    try:
        def weighted():
            return all([v["weight"] for v in by_addr(ip, ctl.ips[canary])] == [10, 10]
                       and [v["weight"] for v in by_addr(ip, ctl.ips[primary])] == [90, 90] for ip in FRONTDOOR_IPS)
        wait_for(weighted, 15, "canary weight 10 and primary 90 on every replica, on the slot holding each pod")
        slots = [{v: k for k, v in (fleet_status(cluster)["frontDoor"]["slots"].get(n) or {}).items()}
                 for n in cluster["names"]]
        print(f"the canary's slot per replica: {[s for s in slots]}")
    finally:
        traffic.route("first")
    wait_for(lambda: all(v["weight"] == 1 for ip in FRONTDOOR_IPS for v in pod_slots(ip).values()), 15,
             "weights back to 1 after the split")


def test_a_closed_gate_drains_the_pod_on_every_replica_before_dns_drops_it(cluster):
    op, ctl = cluster["op"], cluster["ctl"]
    name = sorted(ctl.ips)[0]
    pod_ip = ctl.ips[name]
    cluster["follow"].clear()  # the DNS answer stays as it is: the drain must come from the operator
    try:
        op.pool.traffic.set_state(_slot(op, name), "maint")  # a rollout taking the pod out
        wait_for(lambda: all(len(s := by_addr(ip, pod_ip)) == 2 and all(v["drained"] for v in s)
                             for ip in FRONTDOOR_IPS), 15, f"{name} drained on every replica")
        other = ctl.ips[sorted(ctl.ips)[1]]
        assert all(not v["drained"] for ip in FRONTDOOR_IPS for v in by_addr(ip, other))
        op.pool.traffic.set_state(_slot(op, name), "ready")
        wait_for(lambda: all(not v["drained"] for ip in FRONTDOOR_IPS for v in by_addr(ip, pod_ip)), 15,
                 f"{name} served again on every replica")
    finally:
        cluster["follow"].set()


def test_an_unreachable_replica_is_reported_and_counted(cluster):
    emu, fds = cluster["emu"], cluster["fds"]
    dead = fds.add_pod(DEAD_IP)  # a Running front-door pod whose runtime API nobody answers
    try:
        deg = wait_for(lambda: (d := degraded(cluster)).get("reason") == "FrontDoorNotProgrammed" and d, 20,
                       "Degraded/FrontDoorNotProgrammed")
        assert deg["status"] == "True" and dead in deg["message"] and DEAD_IP in deg["message"]
        st = fleet_status(cluster)["frontDoor"]
        assert st["replicas"] == 4 and [f["replica"] for f in st["notProgrammed"]] == [dead]
        assert "refused" in st["notProgrammed"][0]["error"].lower()
        events = wait_for(lambda: [e for e in emu.core.list_namespaced_event(NAMESPACE).items
                                   if e.reason == "FrontDoorNotProgrammed" and e.involved_object.name == dead], 10,
                          "a Warning Event on the unreachable replica's pod")
        assert events[0].type == "Warning"
        # it still counts: it may hold requests, so the others admit 24 / 4 = 6 per pod
        wait_for(limits_are(FRONTDOOR_IPS, 6, 8), 15, "24 / 4 = 6 on the three that answer")
    finally:
        emu.core.delete_namespaced_pod(dead, NAMESPACE)
    wait_for(lambda: degraded(cluster).get("reason") != "FrontDoorNotProgrammed", 15, "Degraded to clear")
    wait_for(limits_are(FRONTDOOR_IPS, 8, 10), 15, "back to 24 / 3 = 8")


def test_a_measured_knee_sets_the_pod_limit_the_replicas_divide(cluster, monkeypatch):
    """The knee Job's ConfigMap (recserve-knee, written by python -m recserve.control.kube.knee): the operator
    computes the pod limit from it (knee x SLO, the Router's rule) instead of the rendered one and re-divides it on
    every replica; the ConfigMap gone, the rendered limit is back."""
    from kubernetes import client

    from recserve.control.kube import operator as kop
    from recserve.control.kube.knee import KNEE_CONFIGMAP, Knee, pod_limit

    monkeypatch.setattr(kop, "FRONTDOOR_CHECK_S", 0.5)
    emu = cluster["emu"]
    knee = Knee(800.0, 50.0, 21.5, "10.0.0.7", "2026-01-01T00:00:00Z")
    limit, _ = pod_limit(knee.rps, 50.0, knee.mean_ms)  # the fixture's operator runs without a spec: SLO 50 ms
    assert limit == 40 and limit != GEN.pod_limit()
    emu.core.create_namespaced_config_map(NAMESPACE, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=KNEE_CONFIGMAP, namespace=NAMESPACE, annotations=knee.annotations())))
    try:
        wait_for(limits_are(FRONTDOOR_IPS, limit // 3, 10), 20, f"the measured limit {limit} / 3 on all three")
        st = wait_for(lambda: (s := fleet_status(cluster)["frontDoor"]).get("podLimit") == limit and s, 10,
                      "status.frontDoor.podLimit from the knee")
        assert st["perReplicaLimit"] == limit // 3 and "measured knee 800 rps" in st["podLimitSource"]
        assert st["knee"] == {"rps": 800.0, "sloMs": 50.0, "meanMs": 21.5, "pod": "10.0.0.7",
                              "measuredAt": "2026-01-01T00:00:00Z"}
    finally:
        emu.core.delete_namespaced_config_map(KNEE_CONFIGMAP, NAMESPACE)
    wait_for(limits_are(FRONTDOOR_IPS, 8, 10), 20, "the rendered 24 / 3 = 8 again")
    assert "rendered" in wait_for(lambda: (s := fleet_status(cluster)["frontDoor"]).get("podLimit") == 24 and s,
                                  10, "status back to the rendered limit")["podLimitSource"]
