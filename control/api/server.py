"""The control-plane process: ``python -m recserve.control.server``.

Serves ``recserve.control.v1.ControlPlane`` (plus grpc.health.v1 and reflection), supervises the fleet, and
exports Prometheus metrics. One per runtime root (an exclusive lock on ``<root>/control.lock``); it leaves
HAProxy and the instances running when it exits or dies, and adopts them when it starts again.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recserve.control import testswitch
from recserve.control.api import errors
from recserve.control.api.audit import ApiGuard
from recserve.control.api.proto import control_pb2 as pb
from recserve.control.api.proto import control_pb2_grpc as pbg
from recserve.control.api.tls import TlsConfigError, is_loopback, server_tls
from recserve.control.backup.api import BackupApi, make_scheduler, policy_path
from recserve.control.backup.policy import BackupError
from recserve.control.errors import ErrorCode
from recserve.control.fleet.fleet import Fleet
from recserve.control.fleet.status import InstanceStatus
from recserve.control.keys import SecretFileError, check_private, read_secret
from recserve.control.monitoring.config import publish_models
from recserve.control.monitoring.metrics import ControlMetrics
from recserve.control.monitoring.targets import FleetCollector, remembered_port
from recserve.control.rollout.manager import RolloutManager
from recserve.control.routing.frontdoor import (
    GRPC_MAX_BODY,
    HTTP_MAX_BODY,
    FrontDoorConfig,
    FrontDoorError,
    SpecLimits,
    spec_body_limits,
)
from recserve.control.settings import (
    SETTINGS_FILE,
    Settings,
    SettingsError,
    add_flags,
    fleet_config,
    from_args,
    to_args,
)
from recserve.control.spec.repository import RepositoryReadError
from recserve.control.spec.spec import SpecError, load_spec
from recserve.control.state.snapshots import SnapshotStore, list_versions

SERVICE = "recserve.control.v1.ControlPlane"


def _versions(d: dict[str, list[int]]) -> dict[str, pb.Versions]:
    return {k: pb.Versions(versions=v) for k, v in d.items()}


def instance_pb(i: InstanceStatus) -> pb.Instance:
    return pb.Instance(id=i.id, role=i.role, state=i.state, pid=i.pid, grpc_port=i.grpc_port,
                       http_port=i.http_port, metrics_port=i.metrics_port, weight=i.weight,
                       models=_versions(i.models), detail=i.detail, restarts=i.restarts,
                       last_healthy_unix=i.last_healthy_unix, slot=i.slot,
                       shm_regions=i.shm_regions, shm_bytes=i.shm_bytes, in_pool=i.in_pool,
                       in_flight=i.in_flight, queued=i.queued, limit=i.limit,
                       limit_decision=i.limit_decision)


def rollout_pb(r, events: list[dict]) -> pb.Rollout:
    return pb.Rollout(
        id=r.id, model=r.model, from_version=r.from_version, to_version=r.to_version, strategy=r.strategy,
        phase=r.phase, status=r.status, failed_gate=r.failed_gate, failed_value=r.failed_value, threshold=r.threshold,
        started_unix=r.started, finished_unix=r.finished, canary=r.canary,
        events=[event_pb(r.id, e) for e in events])


def event_pb(rid: str, e: dict) -> pb.RolloutEvent:
    return pb.RolloutEvent(rollout_id=rid, phase=e["phase"], message=e["message"], weight=e["weight"],
                           gates=e["gates"], status=e["status"], done=e["status"] != "running", ts_unix=e["ts"])


class ControlPlane(BackupApi, pbg.ControlPlaneServicer):
    def __init__(self, fleet: Fleet, rollouts: RolloutManager, snapshots: SnapshotStore, guard: ApiGuard,
                 endpoints: dict[str, str]):
        self.fleet = fleet
        self.rollouts = rollouts
        self.snapshots = snapshots
        self.guard = guard
        self.endpoints = endpoints
        self.ready = threading.Event()

    # ------------------------------------------------------------------ helpers
    def _auth(self, context: grpc.ServicerContext) -> None:
        """Every mutating RPC calls this first: constant-time token check; the call is then audited (audit.py)."""
        self.guard.authorize(context)

    def _ready(self, context: grpc.ServicerContext) -> None:
        if not self.ready.is_set():
            errors.refuse(context, ErrorCode.UNAVAILABLE, "control plane is still bringing the fleet up")

    def _call(self, context: grpc.ServicerContext, fn, *args):
        """``fn(*args)``; a RecserveError from it answers with its code's status (control/api/errors.py)."""
        return errors.call(context, fn, *args)

    def _instance(self, iid: str) -> pb.Instance:
        i = self.fleet.status().instance(iid)
        return instance_pb(i) if i is not None else pb.Instance(id=iid, state="removed")

    # ------------------------------------------------------------------ fleet
    def GetStatus(self, request, context):
        st = self.fleet.status()
        running = self.fleet.state.running_rollouts()
        active = rollout_pb(running[0], []) if running else None
        events = [pb.Event(ts_unix=e["ts"], kind=e["kind"], instance=e["instance"], message=e["message"])
                  for e in self.fleet.state.events(request.events or 20)]
        return pb.FleetStatus(endpoints=pb.Endpoints(**self.endpoints), instances=[instance_pb(i) for i in
                              st.instances], desired=_versions(st.desired), health=st.health,
                              warnings=st.warnings, active_rollout=active, events=events, route=st.route,
                              mode=st.mode, active_target=st.active_target, shedding=st.shedding,
                              knee_rps=st.knee_rps, knee_source=st.knee_source, host_limit=st.host_limit,
                              limit_rule=self.fleet.router.config.limit_basis().why)

    def AddInstance(self, request, context):
        self._auth(context)
        self._ready(context)
        rec = self._call(context, self.fleet.add_instance, request.role or "standby")
        return self._instance(rec.id)

    def RemoveInstance(self, request, context):
        self._auth(context)
        self._ready(context)
        rec = self._call(context, self.fleet.remove_instance, request.id)
        return pb.Instance(id=rec.id, role=rec.role, state="removed", slot=rec.slot)

    def Scale(self, request, context):
        self._auth(context)
        self._ready(context)
        self._call(context, self.fleet.scale, request.active)
        return self.GetStatus(pb.GetStatusRequest(), context)

    def SetKnee(self, request, context):
        self._auth(context)
        self._ready(context)
        self._call(context, self.fleet.router.set_knee, request.knee_rps, request.knee_mean_ms, request.limit_rule)
        return self.GetStatus(pb.GetStatusRequest(), context)

    def DrainInstance(self, request, context):
        self._auth(context)
        self._ready(context)
        rec = self._call(context, self.fleet.drain, request.id)
        return self._instance(rec.id)

    def PromoteInstance(self, request, context):
        self._auth(context)
        self._ready(context)
        rec = self._call(context, self.fleet.promote, request.id)
        return self._instance(rec.id)

    # ------------------------------------------------------------------ models
    def ListVersions(self, request, context):
        f = self.fleet
        served = self._call(context, f.model_closure)
        if request.model not in served:
            errors.refuse(context, ErrorCode.NOT_FOUND, f"unknown model {request.model!r}: the fleet serves {served}")
        desired = f.desired().get(request.model, [])
        infos = self._call(context, list_versions, f.repository, request.model)
        return pb.ListVersionsResponse(model=request.model, versions=[
            pb.VersionInfo(version=i.version, verified=i.verified, problem=i.problem, desired=i.version in desired,
                           files=i.files, built_at=i.built_at, metrics_json=json.dumps(i.metrics, default=str))
            for i in infos])

    def Rollover(self, request, context):
        self._auth(context)
        self._ready(context)
        gates = {"max_error_rate": request.gates.max_error_rate, "max_p99_ratio": request.gates.max_p99_ratio,
                 "min_p99_ms": request.gates.min_p99_ms, "min_answer_overlap": request.gates.min_answer_overlap}
        bake = request.bake_seconds if request.HasField("bake_seconds") else 5.0
        rid = self._call(context, self.rollouts.start, request.model, int(request.version),
                         request.strategy or "canary", list(request.steps), bake, gates)
        # The stream ends with the rollout's terminal event. The manager saves the record before it writes that
        # event, so a finished record alone does not end the stream (that ended it one event early); only when
        # no terminal event follows a finished record for a few seconds does the stream end without one.
        seq, finished_since = 0, None
        while True:
            for e in self.fleet.state.rollout_events(rid, seq):
                seq = e["seq"]
                yield event_pb(rid, e)
                if e["status"] != "running":
                    return
            if self.fleet.state.rollout(rid).status != "running":
                finished_since = finished_since or time.monotonic()
                if time.monotonic() - finished_since > 5.0:
                    return
            if not context.is_active():
                return  # the client went away; the rollout carries on
            time.sleep(0.2)

    def GetRollout(self, request, context):
        st = self.fleet.state
        r = st.rollout(request.id) if request.id else st.latest_rollout(request.model or None)
        if r is None:
            errors.refuse(context, ErrorCode.NOT_FOUND,
                          f"no rollout {request.id or 'for ' + (request.model or 'any')}")
        return rollout_pb(r, st.rollout_events(r.id))

    def Rollback(self, request, context):
        self._auth(context)
        self._ready(context)
        r = self._call(context, self.rollouts.rollback, request.model)
        return rollout_pb(r, self.fleet.state.rollout_events(r.id))

    # ------------------------------------------------------------------ snapshots
    def CreateSnapshot(self, request, context):
        self._auth(context)
        s = self._call(context, self.snapshots.create, request.note)
        self.fleet.state.event("snapshot", f"snapshot {s.id}: {len(s.files)} files")
        return _snapshot_pb(s)

    def ListSnapshots(self, request, context):
        return pb.ListSnapshotsResponse(snapshots=[_snapshot_pb(s) for s in self.snapshots.list()])

    def RestoreSnapshot(self, request, context):
        self._auth(context)
        restored, verified, repaired = self._call(context, self.snapshots.restore, request.id)
        self.fleet.state.event("restore", f"snapshot {request.id}: {restored} files rewritten")
        return pb.RestoreSnapshotResponse(id=request.id, restored_files=restored, verified_files=verified,
                                          repaired=repaired)


def _snapshot_pb(s) -> pb.Snapshot:
    return pb.Snapshot(id=s.id, created_unix=s.created, files=len(s.files), bytes=s.bytes,
                       models=_versions(s.models()), note=s.note)


def build_parser() -> argparse.ArgumentParser:
    """The flags of control/settings.py (``recctl up`` takes the same ones), and ``--settings FILE``."""
    p = argparse.ArgumentParser(prog="python -m recserve.control.server", description=__doc__.splitlines()[0])
    p.add_argument("--settings", type=Path, default=None, help="settings file (recctl up writes "
                   f"<root>/{SETTINGS_FILE}): the defaults of every flag here")
    add_flags(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """With ``--settings FILE`` (what ``recctl up`` writes) the file's values are the flags' defaults, and flags
    given beside it still win."""
    p = build_parser()
    first, _ = p.parse_known_args(argv)
    if first.settings is not None:
        try:
            p.set_defaults(**to_args(Settings.read(first.settings)))
        except SettingsError as exc:
            p.error(str(exc))
    return p.parse_args(argv)


def _stop_failed_up(fleet: Fleet, server: grpc.Server, root: Path) -> int:
    """A bring-up that failed stops everything it started or adopted (instances, HAProxy, the fallback server)
    and says so, so the next ``recctl up`` finds the fleet's ports free; returns the exit code (1)."""
    try:
        stopped = fleet.stop_processes()
        what = ", ".join(stopped) if stopped else "nothing was running"
        fleet.state.event("up-failed", f"stopped what the bring-up started: {what}"[:500])
        print(f"stopped what the bring-up started: {what}", file=sys.stderr, flush=True)
    except Exception as exc:  # say it: the next ``recctl up`` may find ports taken (``recctl down`` stops them)
        print(f"stopping what the bring-up started failed: {exc}; run 'recctl down'", file=sys.stderr, flush=True)
    server.stop(0)
    (root / "control.pid").unlink(missing_ok=True)
    return 1


def front_door(args: argparse.Namespace, spec) -> tuple[FrontDoorConfig, SpecLimits | None]:
    """The client front door's settings, validated. Body limits: ``--max-grpc-body``/``--max-http-body`` when
    given; else, with a serving spec, its models' largest requests (``spec_body_limits``, returned too: what it
    assumed is in its warnings); else the demo's contract (``GRPC_MAX_BODY``/``HTTP_MAX_BODY``)."""
    limits = None
    grpc_body, http_body = args.max_grpc_body, args.max_http_body
    if spec is not None and (grpc_body is None or http_body is None):
        limits = spec_body_limits(spec)
        grpc_body = limits.grpc if grpc_body is None else grpc_body
        http_body = limits.http if http_body is None else http_body
    front = FrontDoorConfig(bind=args.client_bind, tls_cert=args.client_tls_cert, tls_key=args.client_tls_key,
                            allow_plaintext=args.client_allow_plaintext,
                            max_grpc_body=GRPC_MAX_BODY if grpc_body is None else grpc_body,
                            max_http_body=HTTP_MAX_BODY if http_body is None else http_body)
    front.validate()
    return front, limits


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    lock = open(root / "control.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = (root / "control.pid").read_text().strip() if (root / "control.pid").exists() else "?"
        print(f"control plane already running for {root} (pid {pid}); not starting a second one", file=sys.stderr)
        return 3
    if args.instances < 1:
        print(f"--instances must be >= 1, got {args.instances}", file=sys.stderr)
        return 2
    try:  # refused before anything starts: a token others can read, a TLS file that cannot work
        token = read_secret(root / "token")
        for name in ("admin.key", "stats.key"):  # Triton keys follow the token's rule (the fleet-wide admin.key is
            if (root / name).exists():          # only there for instances an older control plane started)
                check_private(root / name)
        tls = server_tls(args.tls_cert, args.tls_key, args.tls_ca)
        testswitch.active()  # an unknown test switch in the environment is refused before anything starts
        spec = load_spec(args.spec, args.repository) if args.spec is not None else None
        front, limits = front_door(args, spec)
        if tls is None and not is_loopback(args.control_host):
            raise TlsConfigError(f"--control-host {args.control_host} is not loopback: the control API leaves this "
                                 "host only with TLS (--tls-cert/--tls-key)")
    except (SecretFileError, TlsConfigError, FrontDoorError, testswitch.SwitchError, SpecError,
            RepositoryReadError) as exc:
        print(f"control plane not started: {exc}", file=sys.stderr)
        return 2
    (root / "control.pid").write_text(f"{os.getpid()}\n")
    host = front.dial_host()
    endpoints = {"grpc": f"{host}:{args.grpc_port}", "http": f"{host}:{args.http_port}",
                 "control": f"{args.control_host}:{args.control_port}",
                 "metrics": f"http://127.0.0.1:{args.metrics_port}/metrics"}
    tls_info = {"control_tls": True, "control_ca": str(tls.ca)} if tls else {}
    if front.tls:  # the client ports speak only TLS: local tools (drills, perf) need plaintext loopback ports
        tls_info["client_tls"] = True
    (root / "endpoints.json").write_text(json.dumps({**endpoints, **tls_info}, indent=2))
    # the models `make monitor-up`'s runtime rules and dashboard select (none: the committed ones, the demo's)
    try:
        publish_models(root, spec.model_names() if spec is not None else None, spec.path if spec is not None else None)
    except ValueError as exc:  # a name PromQL cannot select (the front door refuses it too): said, not fatal
        print(f"warning: monitoring rules keep the demo's models: {exc}", file=sys.stderr, flush=True)

    # a spec model has a degraded answer when its `degraded` says so; HAProxy refuses the others' shed requests at
    # once, per model (HTTP: the path; gRPC: the model name at the head of the body), so the fallback runs when any
    # model has one
    no_degraded = tuple(n for n, m in spec.models.items() if m.degraded is None) if spec is not None else ()
    degraded_ok = spec is None or len(no_degraded) < len(spec.models)
    if no_degraded and not args.no_fallback:  # said, not silent: shed requests of these models get 429
        print(f"note: no degraded answers for {sorted(no_degraded)} (no `degraded` in the spec): their shed requests "
              "get RESOURCE_EXHAUSTED / 429", file=sys.stderr, flush=True)
    metrics = ControlMetrics()
    settings = from_args(args, root=root)
    fleet = Fleet(fleet_config(settings, front, fallback=not args.no_fallback and degraded_ok,
                               haproxy_metrics_port=args.haproxy_metrics_port
                               or remembered_port(root / "monitoring" / "haproxy.port")), metrics)
    # the limit rule reaches the Router here (FleetConfig does not carry it), before the fleet applies any limit
    fleet.router.set_limit_rule(settings.routing.limit_rule, settings.routing.knee_mean_ms)
    if spec is not None:
        fleet.router.set_degraded(spec.path, no_degraded)
    for w in fleet.host_warnings:  # also an event and a ``recctl status`` warning (control/runtime/hostcheck.py)
        print(f"warning: {w}", file=sys.stderr, flush=True)
    if limits is not None:  # the spec's request sizes: what the front door admits, and what it had to assume
        fleet.state.event("frontdoor", f"body limits from the spec: gRPC {front.max_grpc_body:,} bytes, HTTP "
                          f"{front.max_http_body:,} bytes (computed: {limits.describe()})"[:500])
        for w in limits.warnings:
            print(f"warning: {w}", file=sys.stderr, flush=True)
            fleet.state.event("frontdoor", w[:500])
    metrics.registry.register(FleetCollector(fleet))  # series the alert rules need (control/monitoring/targets.py)
    fleet.targets.set_static("control", f"127.0.0.1:{args.metrics_port}", "control")
    fleet.targets.set_static("haproxy", f"127.0.0.1:{fleet.config.haproxy_metrics_port}", "haproxy")
    rollouts = RolloutManager(fleet)
    store = SnapshotStore(fleet.repository, args.backup_root or root / "backups")
    guard = ApiGuard(token, root / "token", record=lambda message: fleet.state.event("audit", message))
    servicer = ControlPlane(fleet, rollouts, store, guard, endpoints)
    try:
        backups = make_scheduler(policy_path(args.backup_policy), root, fleet.repository, metrics, fleet.state.event,
                                 spec=spec.path if spec is not None else None)
    except BackupError as exc:
        print(f"backup policy refused: {exc}", file=sys.stderr)
        return 2

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), interceptors=[guard])
    pbg.add_ControlPlaneServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{args.control_host}:{args.control_port}"
    if (server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)) == 0:
        print(f"control port {args.control_port} is already in use", file=sys.stderr)
        return 2
    server.start()
    metrics.serve(args.metrics_port)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        fleet.up(recover=rollouts.recover_records)
    except Exception as exc:
        print(f"fleet did not come up: {exc}", file=sys.stderr, flush=True)
        fleet.state.event("up-failed", str(exc)[:500])
        return _stop_failed_up(fleet, server, root)
    if backups is not None:
        rollouts.listeners.append(backups.on_rollout_finished)
        servicer.backups = backups.start()
    servicer.ready.set()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f"control plane ready: {json.dumps(endpoints)}", flush=True)
    stop.wait()
    if backups is not None:
        backups.stop()
    fleet.detach()  # the data path keeps serving; `recctl down` stops it
    server.stop(2)
    (root / "control.pid").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
