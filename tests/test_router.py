"""Issue 9: the Router, the active-active pool and admission control, on a real fleet (tritonserver x2, HAProxy,
the degraded-answer server, control plane) in the default active-active mode, plus the pure rules.

The fleet runs with a deliberately low knee (40 rps -> 2 requests in flight per server) and a fallback limit of
2, so a dozen client threads overload it far beyond its limits without needing a fast machine. Outcomes are
asserted (no failed request in failover/scale/rollover, overload answered by degraded answers or fast refusals,
never timeouts, no restart); latencies are only printed: on the shared 2-core host they are noise.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from recserve.control.api.proto import control_pb2 as pb
from recserve.control.fleet.health import Probe
from recserve.control.fleet.supervision import classify
from recserve.control.monitoring.metrics import triton_request_counts
from recserve.control.routing.haproxy import OVERLOADED
from recserve.control.routing.router import RouterConfig, RouterError
from tests.fleet_fixtures import make_version, running_fleet

pytestmark = pytest.mark.timeout(600)


# ---------------------------------------------------------------------------------------------- pure rules
def test_busy_is_told_from_hung_and_broken():
    """A slow or queue-full golden answer on an instance HAProxy shows at its limit is busy (never restarted);
    the same failure without the limit, a silent live endpoint, or a wrong answer is failing."""
    slow = Probe(False, "golden", "golden inference failed: [StatusCode.DEADLINE_EXCEEDED] Deadline Exceeded", 0)
    full = Probe(False, "golden", "golden inference failed: Exceeds maximum queue size", 0)
    wrong = Probe(False, "golden", "wrong answer: recommend item_ids differ", 0)
    hung = Probe(False, "live", "no answer on the HTTP port (hung or not listening)", 0)
    dead = Probe(False, "process", "process is gone", 0, fatal=True)
    assert classify(slow, at_limit=True) == "busy" and classify(full, at_limit=True) == "busy"
    assert classify(slow, at_limit=False) == "failing"
    for p in (wrong, hung, dead):
        assert classify(p, at_limit=True) == "failing", p
    assert classify(Probe(True, "ok", "", 0), at_limit=True) == "ok"


def test_router_config_refuses_bad_values_and_derives_timeouts(tmp_path):
    for kw, words in ((dict(mode="round-robin"), "mode must be one of"), (dict(knee_rps=-1), "knee_rps must be"),
                      (dict(slo_p99_ms=0), "slo_p99_ms must be"), (dict(min_limit=5, max_limit=2), "min_limit"),
                      (dict(fallback_maxconn=0), "fallback_maxconn must be"),
                      (dict(fallback_queue=-1), "fallback_queue must be within")):
        with pytest.raises(RouterError) as exc:
            RouterConfig(workdir=tmp_path, **kw).validate()
        assert words in str(exc.value) and exc.value.code == "INVALID_ARGUMENT"
    c = RouterConfig(workdir=tmp_path, knee_rps=1000, slo_p99_ms=50)
    assert c.timeout_server_ms() == 200 and c.host_limit() == 50  # 4 x SLO; knee x SLO (Little's law)
    assert c.fallback_wait_ms() == 100 and c.haproxy_config().fallback_timeout_queue_ms == 100  # 2 x SLO
    assert RouterConfig(workdir=tmp_path, slo_p99_ms=1000).timeout_server_ms() == 1000
    assert c.haproxy_config().retries == 1 and c.haproxy_config().timeout_server_ms == 200


def test_adaptive_controller_reads_per_server_p99_and_queue_full_from_the_access_log(tmp_path):
    from recserve.control.routing.router import Router
    from recserve.control.state.store import State

    router = Router(RouterConfig(workdir=tmp_path, fallback=False), State(tmp_path / "state.db"))
    line = ('id 127.0.0.1:1 [01/Dec/2026:15:16:34.302] fe_grpc be_grpc_pool/s{slot} 0/0/0/{tr}/{tr} {st} 484 0 '
            '1/1/1/1 0/0 "POST /inference.GRPCInferenceService/ModelInfer HTTP/2.0"\n')
    lines = [line.format(slot=0, tr=t, st=200) for t in range(1, 101)] + [line.format(slot=1, tr=-1, st=503)] * 3
    lines.append('id 127.0.0.1:1 [x] fe_grpc be_grpc_fallback/fb 0/0/0/1/1 200 10 0 1/1/1/1 0/0 "POST /"\n')
    router.proxy.config.access_log_path.write_text("".join(lines))
    p99, full = router.interval_samples()
    assert p99 == {0: 0.099} and full == {1: 3}  # nearest-rank 99th of 1..100 ms; 503s per server; no fallback
    assert router.interval_samples() == ({}, {})  # only lines written since the last interval
    log = router.proxy.config.access_log_path
    size = log.stat().st_size
    assert not router.rotate_access_log(max_bytes=size) and router.rotate_access_log(max_bytes=size - 1)
    assert log.stat().st_size == 0 and log.with_name("access.log.1").stat().st_size == size


def test_a_router_that_adopted_a_running_haproxy_keeps_its_server_states_in_the_pool(tmp_path):
    """After a control-plane restart the new Router did not set the states itself: set_pool reads them from
    HAProxy, so a standby promoted into the pool serves and a drained slot stays drained (real HAProxy)."""
    from recserve.control.routing.router import Router
    from recserve.control.runtime.procs import free_port
    from recserve.control.state.store import State

    cfg = RouterConfig(workdir=tmp_path / "haproxy", grpc_port=free_port(), http_port=free_port(), slots=3,
                       fallback=False, knee_rps=100)
    first = Router(cfg, State(tmp_path / "state.db"))
    first.start()
    try:
        for slot in (0, 1):
            first.bind(slot, 1111 + slot, 2222 + slot)
        first.set_state(0, "ready")
        first.set_state(1, "drain")
        second = Router(cfg, first.state)
        assert not second.start()  # adopted, not restarted
        second.set_pool({0, 1})
        rows = second.proxy.servers()
        assert rows["be_grpc_pool/s0"]["srv_admin_state"] == "0"  # ready: takes traffic
        assert int(rows["be_grpc_pool/s1"]["srv_admin_state"]) & 0x18  # drain: no new requests
        assert int(rows["be_grpc_pool/s2"]["srv_admin_state"]) & 0x03  # never bound: maintenance
    finally:
        first.stop()
    assert not first.proxy.is_alive()


def test_a_measured_knee_sets_the_limits_at_once_shared_by_the_servers_the_route_sends_to(tmp_path):
    """``recctl limits --knee-rps`` (Router.set_knee): every fixed per-server limit follows the new knee x SLO
    at once, shared by the servers taking traffic (pool members; one primary; canary weights > 0); a bad knee is
    refused by name; the knee outlives a control-plane restart unless that restart names ``--knee-rps``."""
    from recserve.control.routing.router import KNEE_SET_BY, Router
    from tests.fleet_fixtures import pool_router

    def limits(router: Router) -> dict[int, int]:
        return {s: ld.limit for s, ld in router.load().items() if s in (0, 1)}  # slot 2: never bound

    with pool_router(tmp_path, slots=3) as (router, cfg, state):
        assert limits(router) == {0: 10, 1: 10}  # 400 rps x 50 ms = 20 in flight, two members
        router.set_knee(800)
        assert cfg.host_limit() == 40 and limits(router) == {0: 20, 1: 20}
        assert cfg.knee() == 800 and cfg.knee_source == KNEE_SET_BY
        assert router.serving_slots() == {0, 1}
        router.route("first", 0)  # primary-standby / blue-green: the primary takes the whole host limit
        assert limits(router)[0] == 40 and router.serving_slots() == {0}
        router.set_weight(0, 80)
        router.set_weight(1, 20)
        router.route("split")  # a canary: both weighted servers share it
        assert limits(router) == {0: 20, 1: 20} and router.serving_slots() == {0, 1}
        router.set_weight(0, 0)  # the canary at 100%: the old primary is still a pool member but serves nothing
        assert router.serving_slots() == {1} and limits(router)[1] == 40
        router.set_weight(0, 80)
        with pytest.raises(RouterError) as bad:
            router.set_knee(0)
        assert "knee_rps must be within" in str(bad.value) and bad.value.code == "INVALID_ARGUMENT"
        assert cfg.knee() == 800
        restarted = Router(RouterConfig(workdir=cfg.workdir, grpc_port=cfg.grpc_port, http_port=cfg.http_port,
                                        slots=3, fallback=False), state)
        restarted.start()  # adopts the running HAProxy; no --knee-rps: the measured knee stays
        assert restarted.config.knee() == 800 and restarted.config.knee_source == KNEE_SET_BY
        named = Router(RouterConfig(workdir=cfg.workdir, grpc_port=cfg.grpc_port, http_port=cfg.http_port,
                                    slots=3, fallback=False, knee_rps=300), state)
        named.start()  # --knee-rps on the command line wins, and forgets the stored one
        assert named.config.knee() == 300 and state.get("knee", "") == ""



def test_the_pools_room_never_dips_when_a_member_leaves_or_joins(tmp_path):
    """A shrinking pool raises the limits of the members left before one leaves (a dead active's load lands on
    them at once), a growing one lowers them only after the new member takes traffic; each step is one runtime
    API exchange, and a command that could split one is refused (real HAProxy)."""
    from recserve.control.routing.haproxy import HAProxyError
    from tests.fleet_fixtures import pool_router

    with pool_router(tmp_path) as (router, cfg, _):
        for slot in (0, 1):
            router.set_state(slot, "ready")
        router.set_pool({0, 1})
        sent: list[str] = []
        real = router.proxy.command
        router.proxy.command = lambda cmd, *a, **k: (sent.append(cmd), real(cmd, *a, **k))[1]

        def first(prefix: str) -> int:
            return next(i for i, c in enumerate(sent) if prefix in c)

        router.set_pool({0})
        assert {s: ld.limit for s, ld in router.load().items()}[0] == 20  # the whole host limit
        assert first("set maxconn server be_grpc_pool/s0 20") < first("set server be_grpc_pool/s1 state drain")
        sent.clear()
        router.set_pool({0, 1})
        assert first("set server be_grpc_pool/s1 state ready") < first("set maxconn server be_grpc_pool/s0 10")
        assert {s: ld.limit for s, ld in router.load().items()} == {0: 10, 1: 10}
        backends = 2 * (cfg.slots + 2)  # per protocol: a first backend per slot, the split and the pool
        assert all(c.count("set maxconn") in (0, backends) for c in sent)  # one exchange per slot
        with pytest.raises(HAProxyError, match="must not contain"):
            router.proxy.commands(["show info; shutdown frontend fe_grpc"])



def test_a_rollout_pauses_its_traffic_steps_while_the_pool_sheds_and_gives_up_after_the_bound(tmp_path):
    """Issue 9: rollouts pause while the pool is shedding (before shifting more traffic), resume when it
    stops, and roll back when it sheds past the bound (a unit on the real state store and metrics; the
    fleet is a stand-in whose shedding is scripted)."""
    from recserve.control.monitoring.metrics import ControlMetrics
    from recserve.control.rollout.manager import GateFailure, RolloutManager
    from recserve.control.state.store import RolloutRecord, State

    class Pool:
        def __init__(self, shedding: list[bool]):
            self.state, self.metrics, self.script = State(tmp_path / f"{len(shedding)}.db"), ControlMetrics(), shedding

        def shedding(self) -> bool:
            return self.script.pop(0) if self.script else False

    pool = Pool([True, True, True, False])
    manager = RolloutManager(pool)
    rec = RolloutRecord("r1", "ranker", 1, 2, "canary", [50, 100], 1.0, {}, "shift", "running", time.time())
    pool.state.save_rollout(rec)
    manager._wait_not_shedding(rec)
    assert [e["message"] for e in pool.state.rollout_events("r1")] == [
        "paused: the pool is shedding load", "resumed: the pool no longer sheds"]
    endless = Pool([True] * 1000)
    manager = RolloutManager(endless)
    endless.state.save_rollout(rec)
    with pytest.raises(GateFailure) as gave_up:
        manager._wait_not_shedding(rec, max_wait_s=0.3)
    assert gave_up.value.gate == "shedding" and "kept shedding" in str(gave_up.value)


# ---------------------------------------------------------------------------------------------- the fleet
@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    # --timeout-server-ms 1000: on the shared CI host a rollover's latency tail passes the derived 4 x SLO
    with running_fleet(tmp_path_factory.mktemp("router"), lambda s: _pool(s) == 2 and _healthy(s),
                       "two healthy actives in the pool",
                       up_args=("--knee-rps", "40", "--fallback-maxconn", "2", "--fallback-queue", "0",
                                "--timeout-server-ms", "1000")) as f:
        yield f


def _pool(st: dict) -> int:
    return sum(1 for i in st["instances"] if i["in_pool"] and i["state"] == "healthy")


def _healthy(st: dict) -> bool:
    return all(i["state"] == "healthy" and {m: i["models"].get(m) for m in st["desired"]} == st["desired"]
               for i in st["instances"])


@dataclass
class Outcome:
    kind: str  # ok, degraded, or the error's status (gRPC code name / HTTP status) and message
    latency_s: float


class Load:
    """Bounded closed-loop clients without retries, recording every outcome (answers, degraded, errors)."""

    def __init__(self, url: str, http_url: str = "", threads: int = 2, http_threads: int = 0):
        self.url, self.http_url = url, http_url
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=("grpc",), daemon=True) for _ in range(threads)]
        self._threads += [threading.Thread(target=self._run, args=("http",), daemon=True)
                          for _ in range(http_threads)]

    def _run(self, protocol: str) -> None:
        from recserve.control.client import RecClient

        client = RecClient(self.url if protocol == "grpc" else self.http_url, protocol, retry_policy=None)
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                kind = "degraded" if client.recommend(7, [11, 12, 13]).degraded else "ok"
            except Exception as exc:  # every failure is data here
                status = exc.status() if hasattr(exc, "status") else type(exc).__name__
                message = exc.message() if hasattr(exc, "message") else str(exc)
                kind = f"{status}: {message}"[:160]
            with self._lock:
                self.outcomes.append(Outcome(kind, time.monotonic() - t0))
        client.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def kinds(self) -> Counter:
        with self._lock:
            return Counter(o.kind for o in self.outcomes)


def _failed(kinds: Counter) -> dict:
    return {k: n for k, n in kinds.items() if k not in ("ok", "degraded")}


def test_active_active_spreads_requests_across_both_actives(fleet):
    st = fleet.status()
    assert st["mode"] == "active-active" and st["route"] == "pool" and st["active_target"] == 2
    assert sorted(i["role"] for i in st["instances"]) == ["active", "primary"]
    assert all(i["in_pool"] and i["limit"] == 2 for i in st["instances"])  # max(2, ceil(40 x 0.05 / 2))
    urls = {i["id"]: f"http://127.0.0.1:{i['metrics_port']}/metrics" for i in st["instances"]}
    before = {iid: triton_request_counts(u)[0] for iid, u in urls.items()}
    with Load(fleet.grpc_url, threads=2) as load:
        time.sleep(3)
    served = {iid: triton_request_counts(u)[0] - before[iid] for iid, u in urls.items()}
    assert not _failed(load.kinds()), load.kinds()
    shown = " ".join(fleet.recctl("status").stdout.split())
    assert "mode active-active" in shown and "in flight" in shown and "limit" in shown, shown
    # Triton's own counters (an independent witness): both actives served a real share of the requests
    assert all(n >= 0.2 * sum(served.values()) for n in served.values()), served
    log = (fleet.root / "haproxy" / "access.log").read_text().splitlines()
    line = next(ln for ln in reversed(log) if "be_grpc_pool/" in ln)
    timers = line.split()[5].split("/")
    assert len(timers) == 6 and all(t.lstrip("-").isdigit() for t in timers), line  # Tq/Tw/Tc/Tr/Tt/Ta


def test_overload_is_answered_at_once_by_degraded_answers_or_refusals_never_timeouts(fleet):
    st = fleet.status()
    pids = {i["id"]: (i["pid"], i["restarts"]) for i in st["instances"]}
    events_before = fleet.stub.GetStatus(pb.GetStatusRequest(events=1)).events
    with Load(fleet.grpc_url, fleet.http_url, threads=10, http_threads=4) as load:
        time.sleep(1.5)
        new = make_version(fleet.repository, "retrieval", "copy")
        with pytest.raises(grpc.RpcError) as refused:  # no rollout starts while the pool sheds
            next(iter(fleet.stub.Rollover(pb.RolloverRequest(model="retrieval", version=new), metadata=fleet.auth,
                                          timeout=30)))
        shedding = fleet.status()
        time.sleep(2)
    kinds = load.kinds()
    grpc_refusal = f"StatusCode.RESOURCE_EXHAUSTED: {OVERLOADED}"
    http_refusal = f"429: {OVERLOADED}"
    assert kinds["ok"] and kinds["degraded"] and kinds[grpc_refusal], kinds
    unexpected = {k: n for k, n in kinds.items() if k not in ("ok", "degraded", grpc_refusal, http_refusal)}
    assert not unexpected, f"timeouts or other errors under overload: {unexpected} of {kinds}"
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shedding" in refused.value.details()
    assert shedding["shedding"] and any("shedding" in w for w in shedding["warnings"])
    refusals = sorted(o.latency_s for o in load.outcomes if o.kind in (grpc_refusal, http_refusal))
    print(f"overload: {dict(kinds)}; refusal p50 {refusals[len(refusals) // 2] * 1000:.1f} ms (shared host)")
    after = fleet.wait(lambda s: not s["shedding"] and _healthy(s), timeout=60, what="calm after the burst")
    # the control plane's shed count (HAProxy's fallback and refusal backends) covers what this client saw shed
    shed_seen = kinds["degraded"] + kinds[grpc_refusal] + kinds[http_refusal]
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.ports['metrics']}/metrics", timeout=5) as r:
        counted = next(float(ln.split()[-1]) for ln in r.read().decode().splitlines()
                       if ln.startswith("recserve_shed_requests "))
    assert counted >= shed_seen, (counted, shed_seen)
    assert {i["id"]: (i["pid"], i["restarts"]) for i in after["instances"]} == pids  # nobody restarted
    events = fleet.stub.GetStatus(pb.GetStatusRequest(events=200)).events
    last = events_before[-1].ts_unix if events_before else 0
    assert not [e.message for e in events if e.ts_unix > last and e.kind in ("detected", "restart")]
    shutil.rmtree(fleet.repository / "retrieval" / str(new))


def test_failed_active_leaves_rotation_a_standby_takes_its_place_no_request_fails(fleet):
    r = fleet.stub.AddInstance(pb.AddInstanceRequest(role="standby"), metadata=fleet.auth, timeout=300)
    assert r.role == "standby" and r.state == "healthy" and not r.in_pool
    st = fleet.status()
    victim = next(i for i in st["instances"] if i["role"] == "active")
    with Load(fleet.grpc_url, threads=2) as load:
        time.sleep(1)
        import os

        os.killpg(victim["pid"], signal.SIGKILL)
        st = fleet.wait(lambda s: _pool(s) == 2 and any(i["id"] == victim["id"] and i["state"] == "healthy"
                                                       and i["role"] == "standby" for i in s["instances"]),
                        timeout=180, what="the standby in the pool, the killed active back as a standby")
        time.sleep(0.5)
    assert not _failed(load.kinds()), load.kinds()
    assert next(i for i in st["instances"] if i["id"] == r.id)["in_pool"]  # the standby took its place
    assert next(i for i in st["instances"] if i["id"] == victim["id"])["restarts"] == victim["restarts"] + 1


def test_scale_out_then_in_costs_no_request_and_drains_first(fleet):
    with Load(fleet.grpc_url, threads=2) as load:
        time.sleep(0.5)
        out = fleet.stub.Scale(pb.ScaleRequest(active=3), metadata=fleet.auth, timeout=300)
        assert out.active_target == 3 and sum(1 for i in out.instances if i.in_pool) == 3
        time.sleep(1)
        back = fleet.stub.Scale(pb.ScaleRequest(active=2), metadata=fleet.auth, timeout=120)
        time.sleep(0.5)
    assert not _failed(load.kinds()), load.kinds()
    assert back.active_target == 2 and sum(1 for i in back.instances if i.in_pool) == 2
    events = [e.message for e in fleet.stub.GetStatus(pb.GetStatusRequest(events=60)).events]
    assert any("has no request in flight" in m for m in events), events  # drained before it stopped
    with pytest.raises(grpc.RpcError) as exc:
        fleet.stub.Scale(pb.ScaleRequest(active=0), metadata=fleet.auth, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "active must be" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        fleet.stub.Scale(pb.ScaleRequest(active=3), timeout=10)  # no token
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_rollover_in_active_active_costs_no_request(fleet):
    new = make_version(fleet.repository, "retrieval", "copy")
    with Load(fleet.grpc_url, threads=2) as load:
        time.sleep(0.5)
        events = list(fleet.stub.Rollover(pb.RolloverRequest(model="retrieval", version=new, steps=[50, 100],
                                                             bake_seconds=1), metadata=fleet.auth, timeout=300))
        time.sleep(0.5)
    assert events[-1].status == "succeeded", [e.message for e in events]
    assert not _failed(load.kinds()), load.kinds()
    st = fleet.wait(lambda s: _pool(s) == 2 and _healthy(s), what="pool back at two on the new version")
    assert all(i["models"]["retrieval"] == [new] for i in st["instances"])
    msgs = [e.message for e in fleet.stub.GetStatus(pb.GetStatusRequest(events=80)).events]
    assert any("out of rotation while it loads" in m for m in msgs), msgs
    assert not [m for m in msgs if "could not set nice" in m]


def test_a_killed_haproxy_comes_back_with_the_pool_limits_and_fallback_restored(fleet):
    import os

    before = fleet.status()
    pid = int((Path(fleet.root) / "haproxy" / "haproxy.pid").read_text().split()[0])
    os.killpg(pid, signal.SIGKILL)
    st = fleet.wait(lambda s: _pool(s) == 2 and s["route"] == "pool" and all(i["limit"] for i in s["instances"]),
                    timeout=60, what="HAProxy restarted with the pool restored")
    assert int((Path(fleet.root) / "haproxy" / "haproxy.pid").read_text().split()[0]) != pid
    assert [(i["id"], i["in_pool"], i["limit"]) for i in st["instances"]] == \
        [(i["id"], i["in_pool"], i["limit"]) for i in before["instances"]]
    with Load(fleet.grpc_url, threads=10) as load:  # admission and the fallback backend work again
        time.sleep(2)
    kinds = load.kinds()
    assert kinds["ok"] and kinds["degraded"] and not {k for k in kinds if "UNAVAILABLE" in k or "DEADLINE" in k}


def test_recctl_limits_applies_a_measured_knee_to_the_running_fleet(fleet):
    """``recctl limits --knee-rps N`` on the running fleet: the actives' limits follow knee x SLO at once,
    status shows where the knee came from; a bad knee is refused by name and changes nothing."""
    import json

    shown = json.loads(fleet.recctl("limits", "--json").stdout)
    assert shown["knee_rps"] == 40 and shown["host_limit"] == 2, shown  # --knee-rps 40 x 50 ms
    try:
        set_ = json.loads(fleet.recctl("limits", "--knee-rps", "160", "--json").stdout)
        assert set_["knee_rps"] == 160 and set_["host_limit"] == 8 and "recctl limits" in set_["knee_source"]
        actives = {i["id"] for i in fleet.status()["instances"] if i["in_pool"]}
        assert {set_["limits"][i] for i in actives} == {4}, set_  # 8 shared by the two pool members
        bad = fleet.recctl("limits", "--knee-rps", "0", check=False)
        assert bad.returncode != 0 and "knee_rps must be within" in bad.stdout + bad.stderr, bad
        assert json.loads(fleet.recctl("limits", "--json").stdout)["knee_rps"] == 160
    finally:
        fleet.recctl("limits", "--knee-rps", "40")
    assert {i["limit"] for i in fleet.status()["instances"] if i["in_pool"]} == {2}


def test_fleet_down_stops_the_fallback_too(fleet):
    pid = int((Path(fleet.root) / "haproxy" / "fallback.pid").read_text())
    fleet.recctl("down", "--repository", str(fleet.repository), timeout=120)
    deadline = time.monotonic() + 10
    import os

    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"fallback pid {pid} still running after recctl down")


def _metrics(executions: dict[str, int], pending: dict[str, int]) -> str:
    """Triton's /metrics text for the two series the progress signal reads."""
    lines = ["# TYPE nv_inference_exec_count counter", "# TYPE nv_inference_pending_request_count gauge"]
    lines += [f'nv_inference_exec_count{{model="{m}",version="1"}} {n}' for m, n in executions.items()]
    lines += [f'nv_inference_pending_request_count{{model="{m}",version="1"}} {n}' for m, n in pending.items()]
    return "\n".join(lines) + "\n"


def test_hung_is_told_from_busy_by_progress_while_requests_wait():
    """At its limit and timing out, a busy instance still executes; a hung one (health answering, inference never
    returning) has a model with requests pending and a flat execution count across two checks >= 1 s apart."""
    from recserve.control.fleet.progress import Progress, sample

    p = Progress(min_flat_s=1.0)
    busy = [({"ranker": 100 + 40 * k, "recommend": 90 + 40 * k}, {"ranker": 12, "recommend": 30}) for k in range(4)]
    for k, (ex, pend) in enumerate(busy):
        assert p.observe("t1", sample(_metrics(ex, pend), 10.0 + 1.3 * k)) is None
    hung = ({"ranker": 500, "recommend_pre": 700}, {"ranker": 16, "recommend": 40})
    assert p.observe("t2", sample(_metrics(*hung), 20.0)) is None  # first sample of the stretch
    assert p.observe("t2", sample(_metrics(*hung), 20.6)) is None  # flat, but shorter than one check's timeout
    why = p.observe("t2", sample(_metrics({"ranker": 500, "recommend_pre": 760}, hung[1]), 21.3))
    assert why is not None and "ranker (16 pending)" in why and "1.3s" in why  # other models' progress is no alibi
    p.reset("t2")  # it answered a check: the stretch is over
    assert p.observe("t2", sample(_metrics(*hung), 22.0)) is None
    idle = ({"ranker": 500}, {"ranker": 0})  # nothing waiting: flat is idle, not hung
    assert p.observe("t3", sample(_metrics(*idle), 0.0)) is None
    assert p.observe("t3", sample(_metrics(*idle), 5.0)) is None


def test_a_deep_check_that_load_kept_from_its_answer_is_a_shed_probe_busy_or_not():
    """recserve_probes_shed counts every timed-out or queue-full golden inference, also those judged failing (not at
    the limit): the drills' probes_shed read only 'detected' events that named a full queue and missed the rest."""
    from recserve.control.fleet.supervision import shed_probe

    timed_out = Probe(False, "golden", "golden inference failed: [StatusCode.DEADLINE_EXCEEDED] Deadline Exceeded", 0)
    full = Probe(False, "golden", "golden inference failed: Exceeds maximum queue size", 0)
    assert shed_probe(timed_out) and shed_probe(full)
    assert classify(timed_out, at_limit=False) == "failing"  # not busy, and still a shed probe
    for p in (Probe(False, "golden", "wrong answer: recommend item_ids differ", 0),
              Probe(False, "live", "no answer on the HTTP port (hung or not listening)", 0), Probe(True, "ok", "", 0)):
        assert not shed_probe(p), p
