"""The recserve operator: the control plane with a Kubernetes driver (``python -m recserve.control.kube.operator``).

It reads one ``RecServeFleet``, discovers its Triton pods by label, loads the exact desired versions on a new pod
through its repository API, deep-checks every pod (live, versions, golden inference: the serving spec's golden
requests and comparison rules with ``--spec``, the ConfigMap ``recserve-spec``; else the demo's) and opens the pod's
``recserve.io/golden-ok`` readiness gate only while the pod answers right; a pod that keeps failing is deleted so
its Deployment replaces it. ``ModelRollout`` objects run through ``control.rollout.manager.RolloutManager``, the same
canary, gates and rollback as the local fleet, over ``KubePool``; progress and the decision with its numbers go
to the CR's status and to Kubernetes Events. Every reconcile also programs the front-door replicas through HAProxy's
runtime API (control/kube/frontdoor_runtime.py): the per-pod limit divided by the replicas there are, each pod's
drain and canary weight; ``status.frontDoor`` and the Degraded reason ``FrontDoorNotProgrammed`` say how it went.

The official ``kubernetes`` client (not kopf): the control plane is synchronous, threaded code (health monitor,
rollout threads), and a poll loop over list calls is all it needs; kopf would add an asyncio framework, its own
peering CRDs and finalizers for no behaviour we use.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kubernetes.client.exceptions import ApiException

from recserve.control.defaults import LIMIT_RULE, SLO_P99_MS
from recserve.control.fleet.fleet import FleetError
from recserve.control.fleet.golden import Golden
from recserve.control.fleet.health import HealthMonitor, Probe
from recserve.control.fleet.spec_golden import SpecGolden
from recserve.control.kube.api import GATE, GROUP, VERSION, KubeApi, api_client, now
from recserve.control.kube.frontdoor import CONFIGMAP as FRONTDOOR_CONFIGMAP
from recserve.control.kube.frontdoor import SPEC_ANNOTATION, spec_digest
from recserve.control.kube.frontdoor_runtime import (
    DEFAULT_WEIGHT,
    FALLBACK_LIMIT_ANNOTATION,
    FRONTDOOR_LABELS,
    POD_LIMIT_ANNOTATION,
    RUNTIME_PORT,
    RUNTIME_PORT_ANNOTATION,
    Plan,
    PodTraffic,
    ReplicaResult,
    frontdoor_replicas,
    program_all,
)
from recserve.control.kube.knee import KNEE_CONFIGMAP, Knee
from recserve.control.kube.knee import pod_limit as knee_pod_limit
from recserve.control.kube.pool import KubePool, pod_endpoint
from recserve.control.kube.trtgolden import TrtGolden, trt_models
from recserve.control.rollout.manager import RolloutManager
from recserve.control.spec.spec import ServingSpec, load_spec
from recserve.control.state.store import RolloutRecord

log = logging.getLogger("recserve.operator")

#: ModelRollout.status.result for each rollout journal status.
RESULTS = {"running": "Running", "succeeded": "Succeeded", "rolled_back": "RolledBack"}
#: CR gate names (camelCase) -> control.rollout.manager.Gates fields.
GATE_FIELDS = {"maxErrorRate": "max_error_rate", "maxP99Ratio": "max_p99_ratio", "minP99Ms": "min_p99_ms",
               "minAnswerOverlap": "min_answer_overlap"}
HISTORY = 30
#: Label of the ModelRollouts the operator creates for a change of the fleet's spec.desiredVersions.
SPEC_SOURCE_LABEL = "recserve.io/source"
SPEC_SOURCE = "spec.desiredVersions"
#: ModelRollout results after which a spec change is not being applied any more.
FAILED_RESULTS = ("RolledBack", "Refused")
#: How often the front door's ConfigMap is read to compare the spec it was rendered from with the operator's.
FRONTDOOR_CHECK_S = 30.0
#: Consecutive passes a front-door replica may fail to be programmed (a replica starting) before it is reported
#: (Event on its pod, Degraded/FrontDoorNotProgrammed).
FRONTDOOR_FAIL_PASSES = 2


@dataclass
class OperatorConfig:
    namespace: str
    fleet: str = "recserve"
    repository: Path = Path("/models")
    workdir: Path = Path("/var/lib/recserve")
    #: How often the fleet, its pods and the rollouts are listed.
    reconcile_interval_s: float = 1.0
    #: Overrides the fleet's spec.pool.checkIntervalSeconds when set (tests).
    check_interval_s: float | None = None
    kubeconfig: str | None = None
    context: str | None = None
    #: The serving spec (``spec.yaml`` of the mounted ConfigMap recserve-spec): golden requests and comparison
    #: rules; None: the demo's golden checks (control/fleet/golden.py).
    spec: Path | None = None
    #: How the pod limit follows from a measured knee (ConfigMap recserve-knee): ``p99`` (knee x SLO, the Router's
    #: default) or ``mean`` (knee x the mean latency measured at it): control/routing/admission.py limit_latency.
    limit_rule: str = LIMIT_RULE


def serving_spec(path: Path, repository: Path, fleet_models: list[str]) -> ServingSpec:
    """The serving spec, read against the pod's repository, and checked against the RecServeFleet's ``spec.models``:
    the fleet serves exactly the spec's models, plus the gpu overlay's ``*_trt`` ensembles (checked against the
    demo's reference by ``TrtGolden``). Raises FleetError naming both when they disagree."""
    spec = load_spec(path, repository)
    named, served = set(spec.model_names()), set(fleet_models)
    extra = sorted(served - named - set(trt_models(fleet_models)))
    missing = sorted(named - served)
    if extra or missing:
        raise FleetError(f"RecServeFleet spec.models {sorted(served)} and the serving spec {path} "
                         f"({sorted(named)}) disagree: " + "; ".join(
                             [f"not in the serving spec: {extra}"] * bool(extra)
                             + [f"not in spec.models: {missing}"] * bool(missing))
                         + " (every model the fleet serves is golden-checked by the spec's rules)",
                         "FAILED_PRECONDITION")
    return spec


class Operator:
    """Owns the reconcile thread, the health monitor and the rollout manager of one RecServeFleet."""

    def __init__(self, config: OperatorConfig, api: KubeApi | None = None):
        self.config = config
        self.api = api or KubeApi(api_client(config.kubeconfig, config.context), config.namespace)
        self.pool: KubePool | None = None
        self.rollouts: RolloutManager | None = None
        self.monitor: HealthMonitor | None = None
        self.trt: TrtGolden | None = None
        self.fails: dict[str, int] = {}
        self.gates: dict[str, bool] = {}
        self._gate_reasons: dict[str, str] = {}
        self.spec: dict = {}
        self._owned: dict[str, str] = {}  # ModelRollout name -> rollout id
        self._seen_seq: dict[str, int] = {}
        #: model -> the spec.desiredVersions pin the operator last acted on (kept in status.specDesiredVersions).
        self._spec_seen: dict[str, list[int]] = {}
        self._crs: list[dict] = []
        self.serving_spec: ServingSpec | None = None
        self.spec_sha256 = ""
        #: Why the front door's rules do not come from the spec this operator checks by ("" when they do).
        self.frontdoor_stale = ""
        self._frontdoor_checked = 0.0
        #: The front-door replicas programmed through the runtime API (control/kube/frontdoor_runtime.py): the
        #: ConfigMap's annotations (cached FRONTDOOR_CHECK_S), consecutive failures per replica, status.frontDoor.
        self._fd_ann: dict[str, str] | None = None
        self._fd_ann_at = 0.0
        self._fd_ann_error = ""
        self._fd_fails: dict[str, int] = {}
        self._fd_share: tuple[int, int] | None = None
        #: The knee the measurement Job wrote (ConfigMap recserve-knee, control/kube/knee.py; cached
        #: FRONTDOOR_CHECK_S): when there is one, the pod limit the replicas divide is computed from it.
        self._knee: Knee | None = None
        self._knee_at: float | None = None
        self.frontdoor_status: dict = {}
        #: Why some front-door replica is not programmed ("" when every one is).
        self.frontdoor_unprogrammed = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="operator", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Operator:
        fleet = self.api.fleet(self.config.fleet)
        self.spec = fleet["spec"]
        key = self.api.admin_key()
        if self.config.spec is not None:  # refused before any pod is touched: a spec that cannot work
            self.serving_spec = serving_spec(self.config.spec, self.config.repository, self.spec["models"])
            self.spec_sha256 = spec_digest(Path(self.config.spec).parent)
        self.pool = KubePool(self.config.repository, self.config.workdir, key, self.spec["models"],
                             delete_pod=self._delete_pod, on_traffic=self._apply_gate)
        demo_golden = self.pool.golden
        if self.serving_spec is not None:
            pool = self.pool
            self.pool.golden = SpecGolden(self.serving_spec, metrics=pool.metrics,
                                          event=lambda msg: pool.state.event("golden", msg))
        # a pod's models-sync sidecar brings a version (verified) before Triton is asked to load it
        from recserve.control.kube.modelsync import sync_pod_first

        self.pool.load_versions = sync_pod_first(self.pool.load_versions, lambda: getattr(self, "_pods", {}))
        from recserve.control.kube.metrics import register  # the pod and rollout series the cluster rules read

        register(self)
        self._init_desired(fleet)
        self._init_spec_seen(fleet)
        # the *_trt ensembles: the demo's requests against the reference of the ONNX versions their engines came from
        self.trt = TrtGolden(self.config.repository, demo_golden if isinstance(demo_golden, Golden) else
                             Golden(self.config.repository)) if trt_models(self.spec["models"]) else None
        self.rollouts = RolloutManager(self.pool)
        self.rollouts.recover_records()
        interval = self.config.check_interval_s or float(self.spec["pool"].get("checkIntervalSeconds", 2))
        self.monitor = HealthMonitor(self._checked_ids, self._check, self._on_probe, interval_s=interval)
        self.reconcile()
        self.monitor.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.monitor is not None:
            self.monitor.stop()
        if self._thread.is_alive():
            self._thread.join(10)
        if self.rollouts is not None:
            for rid in list(self.rollouts._threads):
                self.rollouts.wait(rid, 30)
        if self.pool is not None:
            self.pool.close()

    def _init_desired(self, fleet: dict) -> None:
        """The operator's last recorded truth (status) first, then the spec's pins, then the newest good version."""
        pool = self.pool
        assert pool is not None
        if pool.state.desired():
            return
        target = pool.initial_desired()
        recorded = (fleet.get("status") or {}).get("desiredVersions") or {}
        pinned = self.spec.get("desiredVersions") or {}
        for m in pool.model_closure():
            pick = recorded.get(m) or pinned.get(m)
            if pick:
                for v in pick:
                    pool.check_version(m, int(v))
                target[m] = sorted(int(v) for v in pick)
        for m, versions in target.items():
            pool.state.set_desired(m, versions, last_good=versions)

    def _init_spec_seen(self, fleet: dict) -> None:
        """The pins already acted on: the ones recorded in status, else the spec's own (the first start applied
        them through ``_init_desired``). Only a later CHANGE of a pin rolls out."""
        recorded = (fleet.get("status") or {}).get("specDesiredVersions")
        source = recorded if isinstance(recorded, dict) else (self.spec.get("desiredVersions") or {})
        self._spec_seen = {m: sorted(int(v) for v in vs) for m, vs in source.items()}

    def _loop(self) -> None:
        while not self._stop.wait(self.config.reconcile_interval_s):
            try:
                self.reconcile()
            except Exception as exc:  # the API can be briefly unavailable; say so and go on
                log.warning("reconcile failed: %r", exc)
                assert self.pool is not None
                self.pool.metrics.reconcile_errors.inc()

    # ------------------------------------------------------------------ reconcile
    def reconcile(self) -> None:
        pool = self.pool
        assert pool is not None
        fleet = self.api.fleet(self.config.fleet)
        self.spec = fleet["spec"]
        pods = self.api.pods(self.spec["pool"]["selector"])
        self._pods = {p["metadata"]["name"]: p for p in pods}
        eps = [e for e in (pod_endpoint(p) for p in pods) if e is not None]
        added, removed = pool.sync(eps)
        for name in added:
            self.fails[name] = 0
            self.gates.pop(name, None)
            self._gate_reasons.pop(name, None)
        for name in removed:
            self.fails.pop(name, None)
            self.gates.pop(name, None)
            self._gate_reasons.pop(name, None)
        pool.ensure_primary()
        self._check_frontdoor()
        self._program_frontdoor()
        self._reconcile_spec_versions(fleet)
        self._reconcile_rollouts()
        self._write_fleet_status(fleet)

    def _check_frontdoor(self) -> None:
        """The front door's rules (body limits, models without degraded answers, the SLO) are rendered from a spec
        (control/kube/frontdoor.py); its ConfigMap says which (``recserve.io/spec-sha256``). One that is not this
        operator's spec makes the fleet Degraded (``FrontDoorSpecStale``); no front-door ConfigMap: nothing to
        compare (a cluster without the front door)."""
        if self.serving_spec is None or time.monotonic() - self._frontdoor_checked < FRONTDOOR_CHECK_S:
            return
        ann = self.api.configmap_annotations(FRONTDOOR_CONFIGMAP)
        self._frontdoor_checked = time.monotonic()
        theirs = None if ann is None else ann.get(SPEC_ANNOTATION, "")
        if theirs is None or theirs == self.spec_sha256:
            self.frontdoor_stale = ""
        else:
            self.frontdoor_stale = (
                f"ConfigMap {FRONTDOOR_CONFIGMAP} was rendered "
                + (f"from another serving spec (sha256 {theirs[:12]})" if theirs else "without a serving spec")
                + f", not from {self.config.spec} (sha256 {self.spec_sha256[:12]}): its body limits and refusals are "
                "not this spec's; regenerate it (python -m recserve.control.kube.frontdoor -o "
                "deploy/k8s/base/frontdoor-config.yaml) and apply")

    # ------------------------------------------------------------------ the front-door replicas' runtime API
    def _frontdoor_annotations(self) -> dict[str, str] | None:
        if self._fd_ann is None or time.monotonic() - self._fd_ann_at >= FRONTDOOR_CHECK_S:
            try:
                self._fd_ann = self.api.configmap_annotations(FRONTDOOR_CONFIGMAP)
            except ApiException as exc:  # RBAC, the API server: reported on the replicas, the reconcile goes on
                log.warning("ConfigMap %s not read: %s", FRONTDOOR_CONFIGMAP, exc.reason)
                self._fd_ann = None
                self._fd_ann_error = f"ConfigMap {FRONTDOOR_CONFIGMAP} not read: {exc.status} {exc.reason}"
            else:
                self._fd_ann_error = ""
            self._fd_ann_at = time.monotonic()
        return self._fd_ann

    def _measured_knee(self) -> Knee | None:
        if self._knee_at is None or time.monotonic() - self._knee_at >= FRONTDOOR_CHECK_S:
            try:
                self._knee = Knee.from_annotations(self.api.configmap_annotations(KNEE_CONFIGMAP))
            except ApiException as exc:  # RBAC, the API server: the last knee read (or the rendered limit) holds
                log.warning("ConfigMap %s not read: %s", KNEE_CONFIGMAP, exc.reason)
            self._knee_at = time.monotonic()
        return self._knee

    def _pod_limit(self, rendered: int) -> tuple[int, str, dict]:
        """(the pod limit the replicas divide, where it comes from, status.frontDoor.knee): from the measured knee
        when the Job wrote one (at the spec's strictest SLO, the operator's limit rule), else the rendered one."""
        knee = self._measured_knee()
        if knee is None:
            return rendered, (f"rendered ({POD_LIMIT_ANNOTATION} of ConfigMap {FRONTDOOR_CONFIGMAP}; no measured "
                              f"knee in ConfigMap {KNEE_CONFIGMAP})"), {}
        slo = (min(m.slo_p99_ms for m in self.serving_spec.models.values()) if self.serving_spec is not None
               else SLO_P99_MS)
        limit, why = knee_pod_limit(knee.rps, slo, knee.mean_ms, self.config.limit_rule)
        info = {"rps": knee.rps, "sloMs": knee.slo_ms, "pod": knee.pod, "measuredAt": knee.measured_at}
        if knee.mean_ms is not None:
            info["meanMs"] = knee.mean_ms
        return limit, (f"measured knee {knee.rps:g} rps (ConfigMap {KNEE_CONFIGMAP}, pod {knee.pod or '?'}, "
                       f"{knee.measured_at or '?'}) x SLO {slo:g} ms: {why}"), info

    def _frontdoor_plan_pods(self) -> dict[str, PodTraffic]:
        """Every Triton pod with an IP: served with its weight while its gate is open (1; during a canary step the
        rollout's percentages), drained otherwise (gate closed, being deleted)."""
        pool = self.pool
        assert pool is not None
        split = pool.traffic.mode == "split"
        out: dict[str, PodTraffic] = {}
        for name, pod in getattr(self, "_pods", {}).items():
            ip = (pod.get("status") or {}).get("podIP")
            if not ip:
                continue
            serving = bool(self.gates.get(name)) and not (pod.get("metadata") or {}).get("deletionTimestamp")
            weight = int(pool.traffic.weights.get(name, 0)) if split else DEFAULT_WEIGHT
            out[ip] = PodTraffic(serving, weight if serving and weight > 0 else DEFAULT_WEIGHT)
        return out

    def _program_frontdoor(self) -> None:
        """Every front-door replica gets ``pod limit // replicas now`` per Triton pod and each pod's drain and weight
        (control/kube/frontdoor_runtime.py). No front-door pod: nothing to do (a cluster without the front door)."""
        replicas = frontdoor_replicas(self.api.pods(FRONTDOOR_LABELS))
        if not replicas:
            self.frontdoor_status, self.frontdoor_unprogrammed, self._fd_fails = {}, "", {}
            return
        ann = self._frontdoor_annotations() or {}
        live = [r for r in replicas if not r.terminating]
        try:
            rendered_limit = int(ann[POD_LIMIT_ANNOTATION])
            fallback_limit = int(ann.get(FALLBACK_LIMIT_ANNOTATION) or 0) or rendered_limit
            port = int(ann.get(RUNTIME_PORT_ANNOTATION) or RUNTIME_PORT)
        except (KeyError, ValueError):
            why = self._fd_ann_error or (f"ConfigMap {FRONTDOOR_CONFIGMAP} " + ("not found" if self._fd_ann is None else
                   f"has no {POD_LIMIT_ANNOTATION} annotation (rendered before the operator programmed the "
                   "replicas: regenerate it, python -m recserve.control.kube.frontdoor)"))
            results = [ReplicaResult(r, error=why) for r in live]
            plan = None
        else:
            if port == 0:
                why = f"ConfigMap {FRONTDOOR_CONFIGMAP} was rendered without the runtime API (--runtime-api-port 0)"
                results, plan = [ReplicaResult(r, error=why) for r in live], None
            else:
                pod_limit, self._limit_source, self._knee_info = self._pod_limit(rendered_limit)
                plan = Plan(pod_limit, fallback_limit, self._frontdoor_plan_pods(), replicas=len(replicas))
                results = program_all(replicas, plan, port)
        self._report_frontdoor(replicas, results, plan)

    def _report_frontdoor(self, replicas: list, results: list[ReplicaResult], plan: Plan | None) -> None:
        fleet_obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RecServeFleet",
                     "metadata": {"name": self.config.fleet}}
        if plan is not None and self._fd_share != (plan.replicas, plan.share()):
            self._fd_share = (plan.replicas, plan.share())
            try:
                self.api.event(fleet_obj, "FrontDoorLimits", f"{plan.replicas} front-door replicas: each admits "
                               f"{plan.share()} in flight per Triton pod (pod limit {plan.pod_limit}), the degraded-"
                               f"answer server {plan.fallback_share()} (of {plan.fallback_limit})")
            except ApiException as exc:
                log.warning("event FrontDoorLimits not written: %s", exc.reason)
        by_name = {r.name for r in replicas}
        ip_to_pod = {(p.get("status") or {}).get("podIP"): n for n, p in getattr(self, "_pods", {}).items()}
        failed = []
        for res in results:
            name = res.replica.name
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}}
            if res.ok:
                if self._fd_fails.pop(name, 0) >= FRONTDOOR_FAIL_PASSES:
                    self._fd_event(pod, "FrontDoorProgrammed", "the runtime API answers again; programmed", False)
                if res.sent:
                    log.info("front door %s: %s", name, "; ".join(res.sent))
                    self._fd_event(pod, "FrontDoorProgrammed", f"{len(res.sent)} runtime API commands: "
                                   + "; ".join(res.sent[:6]) + (" ..." if len(res.sent) > 6 else ""), False)
                continue
            n = self._fd_fails[name] = self._fd_fails.get(name, 0) + 1
            if n >= FRONTDOOR_FAIL_PASSES:
                failed.append(res)
            if n == FRONTDOOR_FAIL_PASSES:
                self._fd_event(pod, "FrontDoorNotProgrammed", f"front-door replica {name} ({res.replica.ip}) is not "
                               f"programmed: {res.error}", True)
        for name in [n for n in self._fd_fails if n not in by_name]:
            self._fd_fails.pop(name)
        self.frontdoor_unprogrammed = "; ".join(
            f"front-door replica {r.replica.name} ({r.replica.ip}): {r.error}" for r in failed)[:1000]
        self.frontdoor_status = {
            "replicas": len(replicas),
            "programmed": sorted(r.replica.name for r in results if r.ok),
            "notProgrammed": [{"replica": r.replica.name, "ip": r.replica.ip, "error": r.error} for r in failed],
            "slots": {r.replica.name: {ip_to_pod.get(ip, ip): srv for ip, srv in sorted(r.slots.items())}
                      for r in results if r.ok}}
        if plan is not None:
            self.frontdoor_status |= {"podLimit": plan.pod_limit, "perReplicaLimit": plan.share(),
                                      "fallbackPerReplicaLimit": plan.fallback_share(),
                                      "podLimitSource": getattr(self, "_limit_source", "")}
            if getattr(self, "_knee_info", None):
                self.frontdoor_status["knee"] = self._knee_info

    def _fd_event(self, pod: dict, reason: str, message: str, warning: bool) -> None:
        try:
            self.api.event(pod, reason, message, warning)
        except ApiException as exc:
            log.warning("event %s for %s not written: %s", reason, pod["metadata"]["name"], exc.reason)

    def _ready_ids(self) -> list[str]:
        assert self.pool is not None
        return [r.id for r in self.pool.state.instances() if r.state == "healthy" and self.gates.get(r.id)]

    def _write_fleet_status(self, fleet: dict) -> None:
        pool = self.pool
        assert pool is not None
        recs = pool.state.instances()
        desired = pool.desired()
        status = {
            "pods": len(recs), "readyPods": len(self._ready_ids()), "desiredVersions": desired,
            "versionsText": " ".join(f"{m}={','.join(map(str, v))}" for m, v in desired.items()
                                     if m in pool.versioned_models()),
            "instances": [{"pod": r.id, "role": r.role, "state": r.state, "goldenOk": bool(self.gates.get(r.id)),
                           "detail": r.detail} for r in recs]}
        status["specDesiredVersions"] = dict(self._spec_seen)
        if self.frontdoor_status:
            status["frontDoor"] = self.frontdoor_status
        status["observedGeneration"] = int((fleet.get("metadata") or {}).get("generation") or 0)
        previous = fleet.get("status") or {}
        status["conditions"] = self._conditions(previous.get("conditions") or [], status["observedGeneration"])
        old = {k: v for k, v in previous.items() if k != "observedAt"}
        if status != old:  # write on change only: one patch a second per fleet would load the API server
            self.api.patch_fleet_status(self.config.fleet, {**status, "observedAt": now()})

    # ------------------------------------------------------------------ conditions (kubectl wait, Argo CD health)
    def _conditions(self, previous: list[dict], generation: int) -> list[dict]:
        """Ready, Progressing and Degraded as Kubernetes conditions; lastTransitionTime moves only on a flip."""
        pool = self.pool
        assert pool is not None
        recs = pool.state.instances()
        ready, need = len(self._ready_ids()), int(self.spec["pool"]["minReady"])
        running = pool.state.running_rollouts()
        spec_running, spec_failed = self._spec_rollout_states()
        starting = [r.id for r in recs if r.state == "new"]
        failing = [r for r in recs if r.state not in ("healthy", "new", "deleting")]
        if ready >= need:
            cond_ready = (True, "MinReadyPods", f"{ready} pods pass the golden check (pool.minReady {need})")
        else:
            cond_ready = (False, "NotEnoughReadyPods", f"{ready} of pool.minReady={need} pods pass the golden check")
        if running:
            r = running[0]
            cond_prog = (True, "RolloutRunning", f"rollout {r.id}: {r.model} {r.from_version} -> {r.to_version} "
                         f"({r.phase})")
        elif spec_running:
            cond_prog = (True, "SpecRolloutPending", "; ".join(spec_running))
        elif starting:
            cond_prog = (True, "PodsStarting", f"loading the desired versions on {', '.join(sorted(starting))}")
        else:
            cond_prog = (False, "Stable", "no rollout running; every pod checked")
        if spec_failed:
            cond_deg = (True, "SpecVersionsNotApplied", "; ".join(spec_failed))
        elif failing:
            cond_deg = (True, "PodsFailing", "; ".join(f"{r.id}: {r.detail or r.state}" for r in failing)[:1000])
        elif self.frontdoor_unprogrammed:
            cond_deg = (True, "FrontDoorNotProgrammed", self.frontdoor_unprogrammed)
        elif self.frontdoor_stale:
            cond_deg = (True, "FrontDoorSpecStale", self.frontdoor_stale)
        else:
            cond_deg = (False, "AsExpected", "every pod answers right on the desired versions")
        old = {c.get("type"): c for c in previous}
        out = []
        for ctype, (ok, reason, message) in (("Ready", cond_ready), ("Progressing", cond_prog),
                                              ("Degraded", cond_deg)):
            status = "True" if ok else "False"
            before = old.get(ctype) or {}
            since = before.get("lastTransitionTime") if before.get("status") == status else None
            out.append({"type": ctype, "status": status, "reason": reason, "message": message[:1000],
                        "lastTransitionTime": since or now(), "observedGeneration": generation})
        return out

    # ------------------------------------------------------------------ spec.desiredVersions changes
    def _reconcile_spec_versions(self, fleet: dict) -> None:
        """A changed pin in spec.desiredVersions becomes a ModelRollout (the gates of ``recctl k8s rollover``):
        versions never move without the canary, the gates and the rollback. A pin of several versions cannot be
        one rollout and is reported (Degraded) instead; a removed pin changes nothing."""
        pool = self.pool
        assert pool is not None
        pinned = self.spec.get("desiredVersions") or {}
        for model, raw in sorted(pinned.items()):
            want = sorted(int(v) for v in raw)
            if self._spec_seen.get(model) == want:
                continue
            if len(want) == 1 and pool.desired().get(model) != want:
                self._create_spec_rollout(fleet, model, want[0])
            self._spec_seen[model] = want

    def _create_spec_rollout(self, fleet: dict, model: str, version: int) -> None:
        meta = fleet.get("metadata") or {}
        stamp = meta.get("generation") or time.strftime("%Y%m%d%H%M%S", time.gmtime())
        name = f"{self.config.fleet}-{model.replace('_', '-')}-v{version}-spec-g{stamp}"[:253]
        knobs = self.spec.get("rollout") or {}
        spec = {"fleet": self.config.fleet, "model": model, "version": version,
                "strategy": knobs.get("strategy", "canary")}
        if knobs.get("steps"):
            spec["steps"] = knobs["steps"]
        if "bakeSeconds" in knobs:
            spec["bakeSeconds"] = knobs["bakeSeconds"]
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRollout",
                "metadata": {"name": name, "namespace": self.config.namespace,
                             "labels": {SPEC_SOURCE_LABEL: SPEC_SOURCE, "recserve.io/fleet": self.config.fleet}},
                "spec": spec}
        if meta.get("uid"):
            body["metadata"]["ownerReferences"] = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "RecServeFleet",
                                                    "name": self.config.fleet, "uid": meta["uid"]}]
        try:
            self.api.create_rollout(body)
        except ApiException as exc:
            if exc.status != 409:  # 409: created by an earlier pass whose status write was lost
                raise
        self.api.event({"apiVersion": f"{GROUP}/{VERSION}", "kind": "RecServeFleet", "metadata": meta},
                       "SpecRollout", f"spec.desiredVersions.{model} is now [{version}]: ModelRollout {name} "
                       "moves it through the rollout gates")

    def _spec_rollout_states(self) -> tuple[list[str], list[str]]:
        """(pending or running, failed) spec pins: the newest ModelRollout the operator created for each pin the
        fleet does not serve yet, and what it says."""
        pool = self.pool
        assert pool is not None
        desired = pool.desired()
        running, failed = [], []
        pinned = self.spec.get("desiredVersions") or {}
        for model, raw in sorted(pinned.items()):
            want = sorted(int(v) for v in raw)
            if desired.get(model) == want:
                continue
            if len(want) != 1:
                failed.append(f"spec.desiredVersions.{model}={want}: a rollout moves one version; after the first "
                              "start pin exactly one")
                continue
            mine = [cr for cr in self._crs if (cr["metadata"].get("labels") or {}).get(SPEC_SOURCE_LABEL) == SPEC_SOURCE
                    and cr["spec"].get("model") == model and int(cr["spec"].get("version", 0)) == want[0]]
            if not mine:
                continue  # a pin older than this operator's record: ModelRollouts moved the model since
            cr = max(mine, key=lambda c: c["metadata"].get("creationTimestamp") or "")
            st = cr.get("status") or {}
            result = st.get("result") or "Pending"
            what = f"spec.desiredVersions.{model}=[{want[0]}] through ModelRollout {cr['metadata']['name']}: {result}"
            if result in FAILED_RESULTS:
                gate = f" (failed gate {st['failedGate']})" if st.get("failedGate") else ""
                failed.append(f"{what}{gate}: {st.get('message', '')}"[:400] + "; to retry: recctl k8s rollover "
                              f"{model} --version {want[0]}, or pin another version")
            elif result != "Succeeded":
                running.append(what)
        return running, failed

    # ------------------------------------------------------------------ health and the readiness gate
    def _checked_ids(self) -> list[str]:
        assert self.pool is not None
        return [r.id for r in self.pool.state.instances() if r.id not in self.pool.busy and r.state != "deleting"]

    def _check(self, iid: str) -> Probe:
        """A new pod first gets exactly its versions (the pod started with the newest), then the deep check."""
        pool = self.pool
        assert pool is not None
        rec = pool.state.instance(iid)
        if rec is not None and rec.state == "new":
            loaded = pool.loaded(iid)
            if loaded is None:
                return Probe(False, "starting", "repository API not answering yet", time.time())
            want = {m: v for m, v in rec.versions.items()}
            if any(sorted(loaded.get(m, [])) != v for m, v in want.items()):
                pool.busy.add(iid)
                try:
                    pool.load_versions(iid, want)
                    self._event_pod(iid, "VersionsLoaded", f"loaded {self._fmt_versions(want)} before opening the "
                                    f"{GATE} gate (the pod started with {self._fmt_versions(loaded)})")
                except Exception as exc:  # Triton's load error, quoted
                    return Probe(False, "load", str(exc)[:300], time.time())
                finally:
                    pool.busy.discard(iid)
        probe = pool.check(iid)
        if probe.ok and self.trt is not None and rec is not None and iid in pool.endpoints:
            ep = pool.endpoints[iid]  # the gpu overlay: the *_trt ensembles answer right too
            probe = self.trt.check(iid, f"{ep.ip}:{ep.grpc}", rec.versions, self.spec["models"])
        if probe.ok and rec is not None and rec.state == "new":  # warm before the gate first opens
            pool.busy.add(iid)
            try:
                pool.warm_up(iid)
            finally:
                pool.busy.discard(iid)
        return probe

    def _fmt_versions(self, v: dict[str, list[int]]) -> str:
        assert self.pool is not None
        return " ".join(f"{m}={','.join(map(str, v.get(m, [])))}" for m in self.pool.versioned_models())

    def _on_probe(self, iid: str, probe: Probe) -> None:
        pool = self.pool
        assert pool is not None
        rec = pool.state.instance(iid)
        if rec is None or iid in pool.busy or rec.state == "deleting":
            return
        if probe.ok:
            self.fails[iid] = 0
            pool.metrics.instance_healthy.labels(iid).set(1)
            if rec.state != "healthy":
                pool.state.update_instance(iid, state="healthy", detail="", last_healthy=probe.ts)
            self._apply_gate(iid)
            return
        if probe.stage == "starting":
            return  # a pod still starting is the startup probe's business, not a failure
        self.fails[iid] = self.fails.get(iid, 0) + 1
        threshold = int(self.spec["pool"].get("failThreshold", 2))
        if not probe.fatal and self.fails[iid] < threshold:
            return
        reason = f"{probe.stage}: {probe.reason}"
        pool.metrics.instance_healthy.labels(iid).set(0)
        pool.metrics.detections.labels(iid, probe.stage).inc()
        pool.state.update_instance(iid, state="broken", detail=reason[:500])
        self._apply_gate(iid)
        if rec.role == "canary":
            pool.canary_broken[iid] = reason  # the rollout rolls back; it owns this pod
            return
        pool.schedule_restart(iid, f"deep check failed {self.fails[iid]} times: {reason}")

    def _apply_gate(self, iid: str) -> None:
        """The gate is open only while the pod is healthy AND the rollout's routing admits it."""
        pool = self.pool
        assert pool is not None
        rec = pool.state.instance(iid)
        pod = getattr(self, "_pods", {}).get(iid)
        if rec is None or pod is None:
            return
        healthy = rec.state == "healthy"
        admitted = pool.traffic.admitted(iid)
        ok = healthy and admitted
        failed = rec.state not in ("healthy", "new", "deleting")  # a pod not yet checked has failed nothing
        if ok:
            reason, msg = "GoldenOk", "golden inference answered right on the desired versions"
        elif rec.state == "new":
            reason, msg = "Starting", "waiting for the first golden inference on the desired versions"
        elif rec.state == "deleting":
            reason, msg = "Deleting", rec.detail or "the operator is deleting this pod"
        elif failed:
            reason, msg = "GoldenFailed", rec.detail or f"state {rec.state}"
        else:
            reason, msg = "RolloutRouting", "the running rollout takes this pod out of the Service"
        if self.gates.get(iid) == ok and self._gate_reasons.get(iid) == reason:
            return  # a closed gate's reason may still change (Starting -> GoldenFailed): that is news
        try:
            fresh = self.api.core.read_namespaced_pod(iid, self.api.namespace)
            pod = self.api.core.api_client.sanitize_for_serialization(fresh)
            self.api.set_condition(pod, GATE, ok, reason, msg)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        self.gates[iid], self._gate_reasons[iid] = ok, reason
        self._event_pod(iid, reason, msg, warning=failed)

    def _delete_pod(self, iid: str, reason: str) -> None:
        self._event_pod(iid, "PodDeleted", f"deleting {iid} so its Deployment replaces it: {reason}", warning=True)
        self.api.delete_pod(iid)

    def _event_pod(self, iid: str, reason: str, message: str, warning: bool = False) -> None:
        pod = getattr(self, "_pods", {}).get(iid) or {"metadata": {"name": iid}}
        obj = {"apiVersion": "v1", "kind": "Pod", "metadata": pod.get("metadata", {})}
        try:
            self.api.event(obj, reason, message, warning)
        except ApiException as exc:
            log.warning("event %s for %s not written: %s", reason, iid, exc.reason)

    # ------------------------------------------------------------------ ModelRollouts
    def _reconcile_rollouts(self) -> None:
        mgr, pool = self.rollouts, self.pool
        assert mgr is not None and pool is not None
        crs = [cr for cr in self.api.rollouts() if cr.get("spec", {}).get("fleet") == self.config.fleet]
        self._crs = crs
        names = {cr["metadata"]["name"] for cr in crs}
        for name, rid in list(self._owned.items()):
            rec = pool.state.rollout(rid)
            if name not in names and rec is not None and rec.status == "running":
                threading.Thread(target=mgr.rollback, args=(rec.model,), daemon=True).start()  # deleted: abort
                self._owned.pop(name)
        for cr in sorted(crs, key=lambda c: c["metadata"].get("creationTimestamp") or ""):
            st = cr.get("status") or {}
            result = st.get("result")
            if result in (None, "Pending"):
                self._start_rollout(cr)
            elif result == "Running":
                rec = pool.state.rollout(st.get("rolloutId", ""))
                if rec is None:
                    self.api.patch_rollout_status(cr["metadata"]["name"], {
                        "result": "Refused", "finishedAt": now(),
                        "message": "the operator lost its rollout journal (state not kept); create it again"})
                else:
                    self._mirror(cr, rec)

    def _start_rollout(self, cr: dict) -> None:
        mgr, pool = self.rollouts, self.pool
        assert mgr is not None and pool is not None
        name, spec = cr["metadata"]["name"], cr["spec"]
        running = pool.state.running_rollouts()
        if running:
            self._status_if_changed(cr, {"result": "Pending", "message": f"waiting for rollout {running[0].id} "
                                         f"of {running[0].model}"})
            return
        ready, need = len(self._ready_ids()), int(self.spec["pool"]["minReady"])
        if ready < need:
            self._status_if_changed(cr, {"result": "Pending", "message": f"waiting: {ready} of the fleet's "
                                         f"pool.minReady={need} pods pass the golden check"})
            return
        gates = {GATE_FIELDS[k]: v for k, v in {**(self.spec.get("gates") or {}), **(spec.get("gates") or {})}.items()
                 if k in GATE_FIELDS}
        try:
            rid = mgr.start(spec["model"], int(spec["version"]), spec.get("strategy") or "canary",
                            spec.get("steps"), float(spec.get("bakeSeconds", 20)), gates)
        except FleetError as exc:
            self.api.patch_rollout_status(name, {"result": "Refused", "message": str(exc), "finishedAt": now()})
            self.api.event(cr, "Refused", str(exc), warning=True)
            return
        self._owned[name] = rid
        rec = pool.state.rollout(rid)
        self.api.patch_rollout_status(name, {"result": "Running", "rolloutId": rid, "phase": rec.phase,
                                             "fromVersion": rec.from_version, "startedAt": now()})
        self._mirror(cr, rec)

    def _status_if_changed(self, cr: dict, status: dict) -> None:
        st = cr.get("status") or {}
        if any(st.get(k) != v for k, v in status.items()):
            self.api.patch_rollout_status(cr["metadata"]["name"], status)

    def _mirror(self, cr: dict, rec: RolloutRecord) -> None:
        """The rollout journal -> the CR's status (phase, gates with their numbers, history) and Events."""
        pool = self.pool
        assert pool is not None
        events = pool.state.rollout_events(rec.id)
        gates: dict[str, float] = {}
        for e in events:
            gates.update({k: float(v) for k, v in (e.get("gates") or {}).items()})
        last = events[-1]["message"] if events else ""
        status = {"rolloutId": rec.id, "phase": rec.phase, "result": RESULTS.get(rec.status, rec.status),
                  "fromVersion": rec.from_version, "canary": rec.canary, "failedGate": rec.failed_gate,
                  "failedValue": rec.failed_value, "threshold": rec.threshold, "message": last, "gates": gates,
                  "history": [{"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e["ts"])),
                               "phase": e["phase"], "weight": int(e["weight"]), "message": e["message"][:500]}
                              for e in events[-HISTORY:]]}
        if rec.finished:
            status["finishedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.finished))
        self._status_if_changed(cr, status)
        seen = self._seen_seq.get(rec.id, 0)
        for e in events:
            if e["seq"] > seen:
                warn = e["phase"] == "rollback" or e["status"] == "rolled_back"
                self.api.event(cr, f"Rollout{e['phase'].capitalize()}", e["message"], warning=warn)
                self._seen_seq[rec.id] = e["seq"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m recserve.control.kube.operator", description=__doc__.splitlines()[0])
    p.add_argument("--namespace", required=True)
    p.add_argument("--fleet", default="recserve", help="name of the RecServeFleet to run")
    p.add_argument("--repository", type=Path, default=Path("/models"), help="the model repository (read-only)")
    p.add_argument("--workdir", type=Path, default=Path("/var/lib/recserve"), help="rollout journal (SQLite)")
    p.add_argument("--kubeconfig", help="outside a cluster: kubeconfig file (default: in-cluster, then ~/.kube)")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument("--metrics-port", type=int, default=9108, help="Prometheus metrics of the operator (0: off)")
    p.add_argument("--limit-rule", choices=("p99", "mean"), default=LIMIT_RULE,
                   help="pod limit from a measured knee (ConfigMap recserve-knee): knee x SLO (p99) or knee x the "
                   "mean latency at it (mean)")
    p.add_argument("--spec", type=Path, help="the serving spec (spec.yaml of the mounted ConfigMap recserve-spec): "
                   "golden requests and rules; without it, the demo's golden checks")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    op = Operator(OperatorConfig(namespace=a.namespace, fleet=a.fleet, repository=a.repository, workdir=a.workdir,
                                 kubeconfig=a.kubeconfig, context=a.context, spec=a.spec,
                                 limit_rule=a.limit_rule)).start()
    if a.metrics_port:
        assert op.pool is not None
        op.pool.metrics.serve(a.metrics_port, host="0.0.0.0")
    log.info("operator running for RecServeFleet %s/%s", a.namespace, a.fleet)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        op.stop()


if __name__ == "__main__":
    main()
