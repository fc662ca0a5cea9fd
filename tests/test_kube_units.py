"""Pure pieces of the Kubernetes driver: where a pod listens, and how rollout routing maps onto readiness gates."""

from __future__ import annotations

from recserve.control.kube.pool import PodEndpoint, ServiceTraffic, pod_endpoint
from recserve.control.state.store import InstanceRecord, State


def _pod(**over) -> dict:
    pod = {"metadata": {"name": "p1"},
           "spec": {"containers": [{"name": "triton", "ports": [{"name": "http", "containerPort": 8000},
                                                               {"name": "grpc", "containerPort": 8001},
                                                               {"name": "metrics", "containerPort": 8002}]}]},
           "status": {"phase": "Running", "podIP": "10.0.0.7"}}
    for k, v in over.items():
        pod[k] = {**pod[k], **v}
    return pod


def test_pod_endpoint_reads_ip_and_named_ports_and_skips_unreachable_pods():
    assert pod_endpoint(_pod()) == PodEndpoint("p1", "10.0.0.7", 8000, 8001, 8002)
    assert pod_endpoint(_pod(status={"phase": "Pending"})) is None
    assert pod_endpoint(_pod(status={"podIP": ""})) is None
    assert pod_endpoint(_pod(metadata={"deletionTimestamp": "2026-01-01T00:00:00Z"})) is None
    no_metrics = _pod()
    no_metrics["spec"]["containers"][0]["ports"].pop()
    assert pod_endpoint(no_metrics) is None


def test_service_traffic_admits_every_pod_unless_a_split_or_maintenance_says_otherwise(tmp_path):
    state = State(tmp_path / "s.db")
    for i, name in enumerate(("a", "b")):
        state.save_instance(InstanceRecord(id=name, slot=i, role="standby", state="healthy", grpc_port=1,
                                           http_port=2, metrics_port=3, workdir="pod://x"))
    changed: list[str] = []
    t = ServiceTraffic(state, changed.append)
    assert t.admitted("a") and t.admitted("b")
    t.set_weight(0, 100)
    t.set_weight(1, 0)
    assert t.admitted("b")  # weights mean nothing outside a split
    t.route("split")
    assert t.admitted("a") and not t.admitted("b")
    t.set_weight(1, 50)
    assert t.admitted("b") and changed[-1] == "b"
    t.set_state(0, "maint")
    assert not t.admitted("a")
    t.set_state(0, "ready")
    t.route("first", 0)
    assert t.admitted("a") and t.admitted("b")
    state.close()


def test_recctl_k8s_refuses_a_missing_kubeconfig_in_one_line(tmp_path, capsys):
    from recserve.control.api.recctl import main

    assert main(["k8s", "--kubeconfig", str(tmp_path / "nope"), "rollouts"]) == 2
    assert "kubeconfig" in capsys.readouterr().err
