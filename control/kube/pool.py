"""The Triton pods of one Kubernetes Deployment as a ``ServingPool``: what RolloutManager and the operator act on.

A pod is an instance (id = pod name) reached at its pod IP on the ports its container declares (``http``,
``grpc``, ``metrics``); its repository API takes the admin key. Client traffic is decided by pod readiness: the
ClusterIP Service sends requests to a pod only while its ``recserve.io/golden-ok`` gate is open, so the traffic
object here (``ServiceTraffic``) maps the rollout's routing calls onto that gate. A Service cannot split by
percent: during a canary step every admitted pod takes an equal share (1/N of requests per pod).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recserve.control.client import RecClient
from recserve.control.fleet.config import FleetError
from recserve.control.fleet.golden import Golden
from recserve.control.fleet.health import INFER_TIMEOUT_S, Probe, deep_check, ready_versions
from recserve.control.fleet.versions import Catalog
from recserve.control.fleet.warmup import REQUEST_TIMEOUT_S, Endpoint, WarmupConfig, WarmupResult, warm_up_instance
from recserve.control.monitoring.metrics import ControlMetrics
from recserve.control.runtime.triton import TritonConfig, TritonServer
from recserve.control.state.store import InstanceRecord, State

#: How long one model load through a pod's repository API may take.
LOAD_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class PodEndpoint:
    name: str
    ip: str
    http: int
    grpc: int
    metrics: int


def pod_endpoint(pod: dict, container: str = "triton") -> PodEndpoint | None:
    """Where a running pod's Triton listens, from its status and container ports; None while not reachable."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
        return None
    conts = spec.get("containers") or []
    c = next((c for c in conts if c.get("name") == container), conts[0] if conts else {})
    ports = {p.get("name"): int(p["containerPort"]) for p in c.get("ports") or [] if p.get("containerPort")}
    if not all(k in ports for k in ("http", "grpc", "metrics")):
        return None
    return PodEndpoint(meta["name"], status["podIP"], ports["http"], ports["grpc"], ports["metrics"])


class ServiceTraffic:
    """Rollout routing on Kubernetes: a pod is admitted to the client Service or not (its readiness gate).

    ``first`` mode (no rollout): every healthy pod serves. ``split`` mode (canary steps): pods with weight > 0
    serve. ``maint`` takes one pod out. ``on_change(iid)`` re-applies that pod's gate at once.
    """

    def __init__(self, state: State, on_change: Callable[[str], None]):
        self.state = state
        self.on_change = on_change
        self.mode = "first"
        self.weights: dict[str, int] = {}
        self.out: set[str] = set()
        self._lock = threading.Lock()

    def _iid(self, slot: int) -> str | None:
        return next((r.id for r in self.state.instances() if r.slot == slot), None)

    def admitted(self, iid: str) -> bool:
        with self._lock:
            return iid not in self.out and (self.mode != "split" or self.weights.get(iid, 0) > 0)

    def set_weight(self, slot: int, weight: int) -> None:
        iid = self._iid(slot)
        if iid is not None:
            with self._lock:
                self.weights[iid] = int(weight)
            self.on_change(iid)

    def set_state(self, slot: int, state: str) -> None:
        iid = self._iid(slot)
        if iid is not None:
            with self._lock:
                (self.out.add if state == "maint" else self.out.discard)(iid)
            self.on_change(iid)

    def splitting(self) -> bool:
        """The split route (a rollout's canary step) is in force."""
        return self.state.get("route") == "split"

    def route(self, mode: str, slot: int | None = None) -> None:
        with self._lock:
            self.mode = "split" if mode == "split" else "first"
        self.state.put("route", "split" if mode == "split" else f"first:{slot or 0}")
        for r in self.state.instances():
            self.on_change(r.id)


class KubePool:
    """Instances = pods; versions are loaded through each pod's repository API; restart = delete the pod.

    The repository rules (which models a fleet serves, which versions are verified, the newest good one) are a
    ``Catalog`` (control/fleet/versions.py), the local fleet's own kind, so both drivers apply exactly the same rules.
    """

    def __init__(self, repository: Path, workdir: Path, admin_key: str, models: list[str],
                 delete_pod: Callable[[str, str], None], on_traffic: Callable[[str], None],
                 metrics: ControlMetrics | None = None):
        self.repository = Path(repository).resolve()
        self.models = list(models)
        missing = [m for m in self.models if not (self.repository / m / "config.pbtxt").exists()]
        if missing:
            raise FleetError(f"spec.models: {missing} not in the model repository {self.repository}", "NOT_FOUND")
        Path(workdir).mkdir(parents=True, exist_ok=True)
        self.state = State(Path(workdir) / "state.db")
        self.catalog = Catalog(self.repository, self.state, self.models, host_checks=False)
        self.metrics = metrics or ControlMetrics()
        self.golden = Golden(self.repository)  # expected answers from the build's reference, per version set
        self.admin_key = admin_key
        self.lock = threading.RLock()
        self.canary_broken: dict[str, str] = {}
        self.busy: set[str] = set()
        self.endpoints: dict[str, PodEndpoint] = {}
        self.traffic = ServiceTraffic(self.state, on_traffic)
        self._delete_pod = delete_pod
        self._clients: dict[str, tuple[PodEndpoint, RecClient]] = {}
        #: The warm-up before a pod's gate first opens and after each reload (control/fleet/warmup.py).
        self.warmup = WarmupConfig()

    # ------------------------------------------------------------------ ServingPool
    def top_models(self) -> list[str]:
        return self.catalog.top_models()

    def model_closure(self) -> list[str]:
        return self.catalog.model_closure()

    def versioned_models(self) -> list[str]:
        return self.catalog.versioned_models()

    def initial_desired(self) -> dict[str, list[int]]:
        return self.catalog.initial_desired()

    def check_version(self, model: str, version: int) -> None:
        self.catalog.check_version(model, version)

    def desired(self) -> dict[str, list[int]]:
        return self.catalog.desired()

    def client(self, iid: str) -> RecClient:
        ep = self.endpoints[iid]
        cached = self._clients.get(iid)
        if cached is None or cached[0] != ep:
            cached = (ep, RecClient(f"{ep.ip}:{ep.grpc}", timeout_s=INFER_TIMEOUT_S, retry_policy=None))
            self._clients[iid] = cached
        return cached[1]

    def metrics_url(self, iid: str) -> str:
        ep = self.endpoints[iid]
        return f"http://{ep.ip}:{ep.metrics}/metrics"

    def reload(self, iid: str, versions: dict[str, list[int]], only: list[str] | None = None) -> None:
        """Record, then load, new versions on one pod; raises when the pod then fails its deep check."""
        with self.lock:
            self.state.update_instance(iid, versions=versions)
        self.busy.add(iid)
        try:
            self.load_versions(iid, versions, only=only)
            probe = self.settle(iid)
            if not probe.ok:
                raise FleetError(f"{iid} failed its deep check after loading {versions}: {probe.stage}: "
                                 f"{probe.reason}", "ABORTED")
            self.warm_up(iid, only)
        finally:
            self.busy.discard(iid)

    def warm_up(self, iid: str, only: list[str] | None = None) -> WarmupResult | None:
        """The local fleet's warm-up (``Instances.warm_up``) on a pod that loaded ``only`` (None: everything) and
        passed its golden check, judged against a pod the Service sends clients to; never raises (events say how
        it went). Pods serve statistics without a key (deploy/k8s restricts only the admin APIs)."""
        rec = self.state.instance(iid)
        if rec is None or iid not in self.endpoints or self.warmup.rounds <= 0:
            return None
        ref = next((r for r in self.state.instances() if r.id != iid and r.state == "healthy"
                    and r.id in self.endpoints and self.traffic.admitted(r.id)), None)
        reference = None if ref is None else Endpoint(
            self.server(ref.id).http_url, None, {m: max(v) for m, v in ref.versions.items() if v})
        ep = self.endpoints[iid]
        try:
            client = RecClient(f"{ep.ip}:{ep.grpc}", timeout_s=REQUEST_TIMEOUT_S, retry_policy=None)
            try:
                result = warm_up_instance(self.server(iid), client, None, rec.versions, reference, self.golden,
                                          self.warmup, only,
                                          progress=lambda msg: self.state.event("warmup", f"{iid}: {msg}", iid))
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - the warm-up never fails the load it follows
            self.state.event("warmup", f"{iid}: warm-up failed: {type(exc).__name__}: {str(exc)[:300]}", iid)
            return None
        self.state.event("warmup", f"{iid}: {result.text()}", iid)
        return result

    def route_first(self, slot: int) -> None:
        self.traffic.route("first", slot)

    def route_serving(self, slot: int) -> None:
        """Every admitted pod serves; ``slot`` is the rollouts' reference."""
        self.route_first(slot)

    def shedding(self) -> bool:
        """Admission is the cluster's ingress's job here: nothing this pool can see."""
        return False

    def ensure_canary_out(self, slot: int) -> None:
        """A canary pod's share is set by the split weights (``ServiceTraffic``): nothing else to take out."""

    def schedule_restart(self, iid: str, reason: str) -> None:
        """Kubernetes restarts by replacement: delete the pod, its Deployment creates a fresh one."""
        if self.state.instance(iid) is None:
            return
        self.state.update_instance(iid, state="deleting", detail=reason[:500])
        self.metrics.restarts.labels(iid).inc()
        self._delete_pod(iid, reason)

    def ensure_primary(self) -> None:
        """One healthy pod is the rollouts' baseline reference (``primary``); it has no traffic meaning here."""
        with self.lock:
            recs = self.state.instances()
            if any(r.role == "canary" for r in recs) or self.traffic.splitting():
                return
            prim = next((r for r in recs if r.role == "primary"), None)
            if prim is not None and prim.state == "healthy":
                return
            choice = next((r for r in recs if r.state == "healthy"), None)
            if choice is None:
                return
            if prim is not None:
                self.state.update_instance(prim.id, role="standby")
                self.metrics.set_role(prim.id, "standby")
            self.state.update_instance(choice.id, role="primary")
            self.metrics.set_role(choice.id, "primary")
            self.route_first(choice.slot)

    # ------------------------------------------------------------------ pods
    def sync(self, endpoints: list[PodEndpoint]) -> tuple[list[str], list[str]]:
        """Make the instance records match the running pods; returns (added, removed) pod names."""
        added, removed = [], []
        with self.lock:
            current = {e.name: e for e in endpoints}
            for rec in self.state.instances():
                if rec.id in current:
                    continue
                if rec.role == "canary":  # the rollout owns it: it rolls back, then the record goes
                    self.canary_broken.setdefault(rec.id, "pod is gone")
                    continue
                self.state.delete_instance(rec.id)
                self.endpoints.pop(rec.id, None)
                self._clients.pop(rec.id, None)
                removed.append(rec.id)
            used = {r.slot for r in self.state.instances()}
            for name, ep in current.items():
                self.endpoints[name] = ep
                if self.state.instance(name) is not None:
                    continue
                slot = next(s for s in range(len(used) + 1) if s not in used)
                used.add(slot)
                self.state.save_instance(InstanceRecord(
                    id=name, slot=slot, role="standby", state="new", grpc_port=ep.grpc, http_port=ep.http,
                    metrics_port=ep.metrics, workdir=f"pod://{ep.ip}", versions=self.desired()))
                added.append(name)
        return added, removed

    def server(self, iid: str) -> TritonServer:
        """A handle on the pod's Triton HTTP API (no process of ours): health, repository index, loads."""
        ep = self.endpoints[iid]
        return TritonServer(TritonConfig(model_repository=self.repository, host=ep.ip, http_port=ep.http,
                                         grpc_port=ep.grpc, metrics_port=ep.metrics, admin_key=self.admin_key,
                                         name=iid))

    def load_versions(self, iid: str, versions: dict[str, list[int]], only: list[str] | None = None) -> None:
        """Load exactly ``versions`` (leaves first, then ensembles), each pinned by a config override."""
        self.catalog.load_versions(self.server(iid), versions, LOAD_TIMEOUT_S, only=only)

    def loaded(self, iid: str) -> dict[str, list[int]] | None:
        return ready_versions(self.server(iid))

    def check(self, iid: str) -> Probe:
        rec = self.state.instance(iid)
        if rec is None or iid not in self.endpoints:
            return Probe(False, "membership", "pod is gone", time.time(), fatal=True)
        probe = deep_check(self.server(iid), True, rec.versions, self.golden, self.client(iid))
        self.metrics.check_seconds.labels(iid).set(probe.latency_s)
        return probe

    def settle(self, iid: str, timeout_s: float = 30.0) -> Probe:
        """Deep-check until green, a wrong answer, or ``timeout_s`` (ensembles reload in the background)."""
        deadline = time.monotonic() + timeout_s
        while True:
            probe = self.check(iid)
            if probe.ok or probe.fatal or probe.stage == "golden" or time.monotonic() > deadline:
                return probe
            time.sleep(0.2)

    def close(self) -> None:
        self.state.close()
