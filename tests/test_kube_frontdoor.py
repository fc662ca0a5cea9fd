"""Issue 21 item 1: the front door on the cluster.

The committed ConfigMap (deploy/k8s/base/frontdoor-config.yaml) is what the generator renders, HAProxy accepts it,
and the manifests agree with it (replicas, slots, Service names, drain timing). Then the cluster configuration runs
for real: REAL HAProxy from the same generator, REAL tritonservers as the "pods" (each on its own loopback address,
127.0.0.2 and 127.0.0.3, on the same ports, as pods share container ports), and a small fake DNS server (dnslib) in
place of the cluster DNS, answering the headless Service's name with the pods the test says are ready. Shown: with
no pod, fast refusals (RESOURCE_EXHAUSTED / 429); a pod added to the answer gets requests from a client connected
before it existed within a check interval (plus slack for the shared machine); a pod removed gets none; a full pool
gets fast refusals and nothing else fails. What this cannot show: scheduling, the real cluster DNS (CoreDNS caching,
EndpointSlice propagation), the haproxy:2.6 image and the NGC Triton image (docs/kubernetes.md).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from recserve.control.kube import frontdoor as kfd
from recserve.control.kube.manifests import K8S_DIR, OVERLAYS, find, render, validate
from recserve.control.routing.haproxy import HAProxy, render_config

pytestmark = pytest.mark.timeout(300)

COMMITTED = K8S_DIR / "base" / "frontdoor-config.yaml"


# ---------------------------------------------------------------------------------------------- the committed render
def test_the_committed_configmap_is_current():
    """Regenerate with: python -m recserve.control.kube.frontdoor -o deploy/k8s/base/frontdoor-config.yaml"""
    assert COMMITTED.read_text() == kfd.with_spec().render(), (
        f"{COMMITTED} is stale: python -m recserve.control.kube.frontdoor -o {COMMITTED}")


def test_haproxy_accepts_the_committed_config(tmp_path):
    """``haproxy -c`` on the committed files, with the pod's two directories moved under tmp_path."""
    data = yaml.safe_load(COMMITTED.read_text())["data"]
    for name, text in data.items():
        text = text.replace(str(kfd.CONFIG_DIR), str(tmp_path)).replace(str(kfd.RUN_DIR), str(tmp_path))
        (tmp_path / name).write_text(text)
    out = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_tls_and_limits_of_the_generator(tmp_path):
    gen = kfd.ClusterFrontDoor()
    assert gen.pod_limit() == 25 and gen.replica_limit() == 12  # 500 rps x 50 ms; / 2 replicas
    assert gen.replica_limit() * gen.replicas <= gen.pod_limit()
    for replicas in (1, 3, 4, 30):
        g = kfd.ClusterFrontDoor(replicas=replicas)
        assert 1 <= g.replica_limit() and (g.replica_limit() * replicas <= g.pod_limit() or g.replica_limit() == 1)
    cfg = render_config(kfd.ClusterFrontDoor(tls=True).haproxy_config())
    assert f"bind 0.0.0.0:8001 ssl crt {kfd.TLS_CRT} alpn h2" in cfg and f"ssl crt {kfd.TLS_CRT} alpn http/1.1" in cfg
    cfg = render_config(gen.haproxy_config())
    pods = [ln for ln in cfg.splitlines() if ln.startswith("  server pod")]
    assert len(pods) == 16  # 8 slots (the Triton HPA's maxReplicas) per protocol, one DNS name
    assert pods[0].startswith("  server pod1 recserve-triton-ready.recserve.svc.cluster.local:8001 proto h2 ")
    assert all("init-addr none" in ln and "check-proto h1 port 8000" in ln for ln in pods)
    assert "parse-resolv-conf" in cfg and "maxconn 12 " in cfg and "hard-stop-after 30s" in cfg


@pytest.fixture(scope="module")
def rendered():
    return {o: render(o) for o in OVERLAYS} | {"drills": render(K8S_DIR / "overlays" / "drills")}


@pytest.mark.parametrize("overlay", [*OVERLAYS, "drills"])
def test_every_overlay_renders_the_front_door_and_validates(rendered, overlay):
    objs = rendered[overlay]
    rep = validate(objs)
    for name in ("Deployment/recserve-frontdoor", "Deployment/recserve-fallback", "ConfigMap/recserve-frontdoor",
                 "PodDisruptionBudget/recserve-frontdoor", "HorizontalPodAutoscaler/recserve-frontdoor",
                 "Service/recserve", "Service/recserve-triton-ready", "Service/recserve-fallback",
                 "NetworkPolicy/recserve-fallback-ingress"):
        assert name in rep.builtin, (overlay, name)


def test_the_manifests_agree_with_the_rendered_config(rendered):
    objs = rendered["cpu"]
    cm = find(objs, "ConfigMap", kfd.CONFIGMAP)
    assert cm["data"] == yaml.safe_load(COMMITTED.read_text())["data"]
    ann = cm["metadata"]["annotations"]
    dep = find(objs, "Deployment", "recserve-frontdoor")
    pod = dep["spec"]["template"]
    # a changed config rolls the front door
    assert pod["metadata"]["annotations"][kfd.HASH_ANNOTATION] == ann[kfd.HASH_ANNOTATION]
    # the per-replica limits were divided by the replicas the HPA keeps at least; every Triton pod has a slot
    assert find(objs, "HorizontalPodAutoscaler", "recserve-frontdoor")["spec"]["minReplicas"] == int(
        ann["recserve.io/replicas"]) >= 2
    triton_hpa = find(objs, "HorizontalPodAutoscaler", "recserve-triton")["spec"]
    assert triton_hpa["maxReplicas"] == int(ann["recserve.io/slots"])
    assert "replicas" not in dep["spec"]
    # clients: the front door's Service; the Triton pods' discovery Service lists only pods whose gate is open
    assert find(objs, "Service", "recserve")["spec"]["selector"] == {"app.kubernetes.io/name": "recserve-frontdoor"}
    ready = find(objs, "Service", "recserve-triton-ready")["spec"]
    assert ready["clusterIP"] == "None" and not ready.get("publishNotReadyAddresses")
    assert ready["selector"] == {"app.kubernetes.io/name": "recserve-triton"}
    cfg = cm["data"]["haproxy.cfg"]
    ns = find(objs, "Namespace", "recserve")["metadata"]["name"]
    assert f" recserve-triton-ready.{ns}.svc.cluster.local:8001 " in cfg
    assert f" recserve-fallback.{ns}.svc.cluster.local:8001 " in cfg
    fb = find(objs, "Service", "recserve-fallback")["spec"]
    assert fb["clusterIP"] == "None"
    # graceful drain: keep accepting, then HAProxy's soft stop (SIGUSR1), then at most hard-stop-after
    spec = pod["spec"]
    (c,) = spec["containers"]
    pre = c["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert "kill -USR1 1" in pre
    first_sleep = int(pre.split(";")[0].split()[-1])
    hard = int(next(ln.split()[-1] for ln in cfg.splitlines() if "hard-stop-after" in ln).rstrip("s"))
    assert spec["terminationGracePeriodSeconds"] >= first_sleep + hard
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert str(kfd.CONFIG_DIR) in mounts and str(kfd.RUN_DIR) in mounts
    assert c["command"][-1] == f"{kfd.CONFIG_DIR}/haproxy.cfg"
    assert {p["containerPort"] for p in c["ports"]} == {8001, 8000, kfd.METRICS_PORT, kfd.RUNTIME_PORT}


# ---------------------------------------------------------------------------------------------- real HAProxy + Triton
POD_IPS = ("127.0.0.2", "127.0.0.3")
PODS_FQDN = kfd.ClusterFrontDoor().fqdn("recserve-triton-ready")


class FakeClusterDNS:
    """The cluster DNS as the front door sees it: the headless Service's name answers the pods the test marks
    ready (A records, TTL 1); every other name (the degraded-answer Service here) is NXDOMAIN."""

    def __init__(self) -> None:
        from dnslib import QTYPE, RCODE, RR, A
        from dnslib.server import BaseResolver, DNSLogger, DNSServer

        self.ready: list[str] = []
        outer = self

        class Resolver(BaseResolver):
            def resolve(self, request, handler):
                reply = request.reply()
                q = request.q
                if str(q.qname).rstrip(".") == PODS_FQDN and outer.ready:
                    if q.qtype == QTYPE.A:
                        for ip in list(outer.ready):
                            reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(ip), ttl=1))
                else:
                    reply.header.rcode = RCODE.NXDOMAIN
                return reply

        self.server = DNSServer(Resolver(), port=0, address="127.0.0.1", tcp=False,
                                logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data"))
        self.server.start_thread()
        self.address = f"127.0.0.1:{self.server.server.server_address[1]}"

    def stop(self) -> None:
        self.server.stop()


def _common_free_port(ips: tuple[str, ...]) -> int:
    from recserve.control.runtime.procs import free_port, port_in_use

    for _ in range(50):
        port = free_port(ips[0])
        if not any(port_in_use(port, ip) for ip in ips):
            return port
    raise RuntimeError("no port free on every pod address")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from recserve.control.runtime.procs import free_port
    from recserve.control.runtime.triton import TritonConfig, TritonServer

    base = tmp_path_factory.mktemp("frontdoor")
    grpc_port, http_port = _common_free_port(POD_IPS), 0
    while not http_port or http_port == grpc_port:
        http_port = _common_free_port(POD_IPS)
    pods = {ip: TritonServer(TritonConfig(host=ip, grpc_port=grpc_port, http_port=http_port, models=["recommend"],
                                          workdir=base / ip, name=f"pod-{ip}")) for ip in POD_IPS}
    dns = FakeClusterDNS()
    proxy = None
    try:
        for srv in pods.values():
            srv.start(wait=False)
        for srv in pods.values():
            srv.wait_ready()
        # the committed rules, with a tiny knee so that a few threads fill a pod: knee 8 rps x SLO 250 ms = 2 in
        # flight per pod, 1 per front-door replica (2 replicas); the SLO also gives timeout server 1 s (4 x SLO),
        # which a shared 2-core machine needs
        gen = kfd.ClusterFrontDoor(knee_rps=8, slo_p99_ms=250)
        assert gen.replica_limit() == 1
        cfg = gen.haproxy_config(config_dir=base / "haproxy", run_dir=base / "haproxy", nameservers=(dns.address,),
                                 grpc_port=free_port(), http_port=free_port(), pod_ports=(grpc_port, http_port),
                                 bind="127.0.0.1", metrics_port=free_port())
        proxy = HAProxy(cfg).start()
        yield {"pods": pods, "dns": dns, "proxy": proxy, "gen": gen}
    finally:
        if proxy is not None:
            proxy.stop()
        dns.stop()
        for srv in pods.values():
            srv.stop()


def _served(srv) -> float:
    from recserve.control.monitoring.metrics import triton_request_counts

    counts = triton_request_counts(srv.metrics_url, models=("recommend",))
    assert counts is not None, srv.config.name
    return counts[0]


def _client(proxy: HAProxy):
    from recserve.control.client import RecClient

    return RecClient(f"127.0.0.1:{proxy.config.grpc_port}", timeout_s=5.0)


def _status(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    return str(status() if callable(status) else exc)


def _wait_served(client, srv, timeout_s: float) -> float:
    """Send requests one after another on ``client``'s connection until ``srv`` counts one more; seconds taken."""
    before = _served(srv)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            client.recommend(7, [1, 2, 3])
        except Exception:  # noqa: BLE001 - a refusal while no pod is listed; the count below decides
            pass
        if _served(srv) > before:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"{srv.config.name} got no request within {timeout_s} s")


def test_pods_come_and_go_with_the_dns_answer_and_a_full_pool_is_refused_fast(cluster):
    proxy, dns, pods, gen = cluster["proxy"], cluster["dns"], cluster["pods"], cluster["gen"]
    a, b = (pods[ip] for ip in POD_IPS)
    interval = gen.check_inter_ms / 1000
    slack = 1.5  # the shared 2-core machine: a resolution and a check may each run late
    client = _client(proxy)  # ONE long-lived HTTP/2 connection, opened before any pod exists

    # no pod listed: admission refuses at once (no 503 that gRPC clients would retry), over both protocols
    t0 = time.monotonic()
    with pytest.raises(Exception) as exc:
        client.recommend(7, [1, 2, 3])
    assert "RESOURCE_EXHAUSTED" in _status(exc.value) and time.monotonic() - t0 < 1.0
    body = json.dumps({"inputs": [{"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [7]},
                                  {"name": "history", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}]})
    req = urllib.request.Request(f"http://127.0.0.1:{proxy.config.http_port}/v2/models/recommend/infer",
                                 data=body.encode(), headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http_exc:
        urllib.request.urlopen(req, timeout=5)
    assert http_exc.value.code == 429

    # pod A becomes ready (its gate opens: the headless Service lists it)
    dns.ready.append(POD_IPS[0])
    took_a = _wait_served(client, a, interval + slack)
    # pod B: the client connected before B existed gets B's requests on the same connection
    dns.ready.append(POD_IPS[1])
    took_b = _wait_served(client, b, interval + slack)
    print(f"pod A served after {took_a:.2f} s, pod B after {took_b:.2f} s (check interval {interval:g} s)")
    before = {ip: _served(pods[ip]) for ip in POD_IPS}
    for _ in range(20):
        client.recommend(7, [1, 2, 3])
    assert all(_served(pods[ip]) > before[ip] for ip in POD_IPS), "both listed pods share the requests"

    # pod A leaves the answer (gate closed, or terminating): within an interval it gets no request
    dns.ready.remove(POD_IPS[0])
    time.sleep(interval + slack)
    seen_a, seen_b = _served(a), _served(b)
    for _ in range(20):
        client.recommend(7, [1, 2, 3])  # every one answered: B takes them all
    assert _served(a) == seen_a and _served(b) == seen_b + 20

    # a full pool (B only, 1 in flight per pod per replica): concurrent clients get answers or fast refusals
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()

    def hammer(n: int) -> None:
        c = _client(proxy)
        for _ in range(n):
            t = time.monotonic()
            try:
                c.recommend(7, list(range(1, 200)))
                what = "ok"
            except Exception as e:  # noqa: BLE001 - classified below
                what = _status(e)
            with lock:
                outcomes.append((what, time.monotonic() - t))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(hammer, [15] * 8))
    kinds = {w for w, _ in outcomes}
    refused = [t for w, t in outcomes if "RESOURCE_EXHAUSTED" in w]
    print(f"full pool: {len(outcomes)} requests, {len(outcomes) - len(refused)} answered, {len(refused)} refused, "
          f"refusal median {statistics.median(refused) * 1000:.1f} ms" if refused else "no refusal")
    assert refused and kinds <= {"ok", *{w for w in kinds if "RESOURCE_EXHAUSTED" in w}}, kinds
    assert "ok" in kinds
    assert statistics.median(refused) < 0.25  # refused at once, not after a queue or a timeout
    log = proxy.config.access_log_path.read_text()
    assert "be_grpc_shed/<NOSRV>" in log and "be_grpc_pool/pod" in log


def test_soft_stop_finishes_in_flight_requests_and_stops_listening(cluster):
    """The preStop's SIGUSR1 (HAProxy's soft stop): the listener closes at once, a request already in flight is
    answered, then HAProxy exits. Runs last: it stops the module's HAProxy."""
    proxy, dns = cluster["proxy"], cluster["dns"]
    if POD_IPS[1] not in dns.ready:
        dns.ready.append(POD_IPS[1])
        time.sleep(2.5)
    client = _client(proxy)
    client.recommend(7, [1, 2, 3])
    results: list[object] = []

    def slow() -> None:  # the largest history the door allows keeps a request in flight a little longer
        try:
            results.append(client.recommend(7, list(range(1, 1001))))
        except Exception as e:  # noqa: BLE001 - asserted below
            results.append(e)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.005)
    os.kill(proxy.pid, signal.SIGUSR1)
    t.join(10)
    assert results and not isinstance(results[0], Exception), results
    deadline = time.monotonic() + 10
    while proxy.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not proxy.is_alive(), "haproxy did not exit after its soft stop"
    from recserve.control.runtime.procs import port_listening

    assert not port_listening(proxy.config.grpc_port, "127.0.0.1")
