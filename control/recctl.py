"""``recctl``: the operator's command line for the recserve fleet (talks to the control plane over gRPC)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from recserve.control import backup_cli
from recserve.control.fleet_config import FleetConfig
from recserve.control.keys import SecretFileError
from recserve.control.monitor import read_endpoints
from recserve.control.procs import pid_alive
from recserve.control.tls import control_channel
from recserve.control.triton import REPO_ROOT

#: Wide tables also when piped (rich would wrap at 80 columns).
console = Console(width=None if sys.stdout.isatty() else 160)


def _root(args: argparse.Namespace) -> Path:
    return Path(args.root).resolve()


def _endpoints(root: Path) -> dict:
    try:
        return json.loads((root / "endpoints.json").read_text())
    except (OSError, ValueError):
        return {}


def _control(args: argparse.Namespace) -> str:
    return args.control or _endpoints(_root(args)).get("control") or "127.0.0.1:50051"


def _tls(args: argparse.Namespace) -> tuple[bool, Path | None]:
    """TLS for the control API: --tls/--ca, else what the running control plane wrote to endpoints.json."""
    if args.tls or args.ca:
        return True, Path(args.ca) if args.ca else None
    ep = _endpoints(_root(args))
    return bool(ep.get("control_tls")), Path(ep["control_ca"]) if ep.get("control_ca") else None


def _stub(args: argparse.Namespace):
    from recserve.control.proto import control_pb2_grpc as pbg

    channel = control_channel(_control(args), *_tls(args))
    return pbg.ControlPlaneStub(channel), channel


def _auth(args: argparse.Namespace) -> list[tuple[str, str]]:
    path = _root(args) / "token"
    try:
        token = path.read_text().strip()
    except OSError:
        raise SystemExit(f"recctl: cannot read the token file {path} (is the fleet up? are you its owner?)") from None
    return [("authorization", f"Bearer {token}")]


def _control_pid(root: Path) -> int | None:
    try:
        pid = int((root / "control.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _healthy(address: str, timeout: float = 1.0, tls: bool = False, ca: Path | None = None) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with control_channel(address, tls, ca) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


# ---------------------------------------------------------------------- commands
def cmd_up(args: argparse.Namespace) -> int:
    """Start the control plane in the background (it starts HAProxy and the instances); idempotent."""
    root = _root(args)
    pid = _control_pid(root)
    if pid is not None:
        console.print(f"fleet already up: control plane pid {pid} at {_control(args)} (not starting a second one)")
        return 0
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "recserve.control.server", "--root", str(root), "--repository", str(args.repository),
           "--grpc-port", str(args.grpc_port), "--http-port", str(args.http_port),
           "--control-port", str(args.control_port), "--metrics-port", str(args.metrics_port),
           "--instances", str(args.instances), "--mode", args.mode, "--active", str(args.active),
           "--knee-rps", str(args.knee_rps), "--slo-p99-ms", str(args.slo_p99_ms),
           "--fallback-maxconn", str(args.fallback_maxconn), "--fallback-queue", str(args.fallback_queue),
           "--timeout-server-ms", str(args.timeout_server_ms)]
    cmd += ["--no-fallback"] if args.no_fallback else []
    cmd += ["--adaptive-limits"] if args.adaptive_limits else []
    for flag in ("tls_cert", "tls_key", "tls_ca", "client_tls_cert", "client_tls_key"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", str(Path(getattr(args, flag)).resolve())]
    if args.client_bind:
        cmd += ["--client-bind", args.client_bind]
    if args.client_allow_plaintext:
        cmd.append("--client-allow-plaintext")
    for flag in ("max_grpc_body", "max_http_body"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    ca_file = args.ca or args.tls_ca or args.tls_cert  # the readiness wait must trust what the server presents
    ca = Path(ca_file) if ca_file else None
    tls = args.tls or ca is not None
    if args.backup_policy:
        cmd += ["--backup-policy", str(Path(args.backup_policy).resolve())]
    log = open(root / "control.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO_ROOT))
    address = f"127.0.0.1:{args.control_port}"
    deadline = time.monotonic() + args.timeout
    with console.status("starting control plane, HAProxy and Triton instances..."):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (root / "control.log").read_text(errors="replace").splitlines()[-5:]
                console.print(f"[red]control plane exited (code {proc.returncode}):[/red] " + " | ".join(tail))
                return 1
            if _healthy(address, tls=tls, ca=ca):
                console.print(f"fleet up: clients use gRPC 127.0.0.1:{args.grpc_port}, "
                              f"HTTP 127.0.0.1:{args.http_port}; control {address} (pid {proc.pid}); logs {root}")
                return 0
            time.sleep(0.5)
    console.print(f"[red]fleet not ready after {args.timeout:.0f}s[/red]; see {root / 'control.log'}")
    return 1


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the control plane, then every instance and HAProxy it started (by pid), nothing else."""
    from recserve.control.fleet import Fleet, FleetConfig

    root = _root(args)
    pid = _control_pid(root)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    if not (root / "state.db").exists():
        console.print(f"no fleet state under {root}: nothing to stop")
        return 0
    ep = _endpoints(root)
    fleet = Fleet(FleetConfig(root=root, repository=args.repository,
                              grpc_port=int(ep.get("grpc", ":8001").rsplit(":", 1)[1]),
                              http_port=int(ep.get("http", ":8000").rsplit(":", 1)[1])))
    n = len(fleet.state.instances())
    fleet.down()
    fleet.state.close()
    (root / "control.pid").unlink(missing_ok=True)
    console.print(f"fleet down: control plane, {n} instance(s) and HAProxy stopped")
    return 0


def _status_dict(resp) -> dict:
    d = json_format.MessageToDict(resp, preserving_proto_field_name=True, including_default_value_fields=True)
    for inst in d.get("instances", []):
        inst["models"] = {k: [int(x) for x in v.get("versions", [])] for k, v in inst.get("models", {}).items()}
        inst["pid"] = int(inst.get("pid", 0))
        inst["shm_bytes"] = int(inst.get("shm_bytes", 0))
    d["shm"] = {"regions": sum(i.get("shm_regions", 0) for i in d.get("instances", [])),
                "bytes": sum(i["shm_bytes"] for i in d.get("instances", []))}
    d["desired"] = {k: [int(x) for x in v.get("versions", [])] for k, v in d.get("desired", {}).items()}
    return d


def cmd_status(args: argparse.Namespace) -> int:
    from recserve.control.proto import control_pb2 as pb

    stub, ch = _stub(args)
    resp = stub.GetStatus(pb.GetStatusRequest(events=args.events), timeout=10)
    d = _status_dict(resp)
    if args.json:
        print(json.dumps({**d, "monitoring": read_endpoints(_root(args))}, indent=2))
        return 0
    ep = d["endpoints"]
    console.print(f"fleet [bold]{d['health']}[/bold]  gRPC {ep['grpc']}  HTTP {ep['http']}  control {ep['control']}  "
                  f"metrics {ep['metrics']}  route {d.get('route', '')}")
    console.print(f"mode {d.get('mode', '')}  actives wanted {d.get('active_target', 0)}  "
                  f"shedding {'[red]yes[/red]' if d.get('shedding') else 'no'}")
    console.print(_limits_line(d))
    t = Table("id", "role", "state", "pid", "grpc", "http", "weight", "in flight", "limit", "restarts", "models",
              "detail")
    for i in d["instances"]:
        models = ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in sorted(i["models"].items())
                           if k in d["desired"] and len(d["desired"]) and not k.endswith(("_pre", "_post")))
        t.add_row(i["id"], i["role"], i["state"], str(i["pid"]), str(i["grpc_port"]), str(i["http_port"]),
                  str(i["weight"]), f"{i.get('in_flight', 0)}+{i.get('queued', 0)}q", str(i.get("limit", 0)),
                  str(i.get("restarts", 0)), models, i.get("detail", "")[:60])
    console.print(t)
    console.print(f"/dev/shm: {d['shm']['regions']} regions, {d['shm']['bytes'] / 2**20:.1f} MiB held by this fleet's "
                  "instances (removed when an instance stops or is replaced)")
    mon = read_endpoints(_root(args))
    console.print(f"monitoring: Prometheus {mon['prometheus']}  Alertmanager {mon['alertmanager']}  "
                  f"receiver {mon['receiver']}" if mon else "monitoring: not running (make monitor-up)")
    for w in d.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")
    if d.get("active_rollout", {}).get("id"):
        r = d["active_rollout"]
        console.print(f"rollout {r['id']}: {r['model']} {r['from_version']} -> {r['to_version']} phase {r['phase']}")
    if args.events and d.get("events"):
        console.print("recent events:")
        for e in d["events"]:
            ts = time.strftime("%H:%M:%S", time.localtime(e["ts_unix"])) + f".{int(e['ts_unix'] % 1 * 1000):03d}"
            console.print(f"  {ts} {e['kind']:<12} {e.get('instance', ''):<4} {e['message']}")
    ch.close()
    return 0


def cmd_rollover(args: argparse.Namespace) -> int:
    from recserve.control.proto import control_pb2 as pb

    stub, ch = _stub(args)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else []
    req = pb.RolloverRequest(model=args.model, version=args.version, strategy=args.strategy, steps=steps)
    if args.bake is not None:
        req.bake_seconds = args.bake
    last = None
    for ev in stub.Rollover(req, metadata=_auth(args), timeout=args.timeout):
        last = ev
        if args.json:
            print(json.dumps(json_format.MessageToDict(ev, preserving_proto_field_name=True)), flush=True)
        else:
            gates = " ".join(f"{k}={v:.3g}" for k, v in sorted(ev.gates.items()))
            console.print(f"{time.strftime('%H:%M:%S', time.localtime(ev.ts_unix))} [bold]{ev.phase:<9}[/bold] "
                          f"{ev.weight:>3}%  {ev.message}  {gates}")
    ch.close()
    return 0 if last is not None and last.status == "succeeded" else 1


def _print_rollout(r, as_json: bool) -> None:
    if as_json:
        print(json.dumps(json_format.MessageToDict(r, preserving_proto_field_name=True), indent=2))
        return
    console.print(f"rollout {r.id}: {r.model} {r.from_version} -> {r.to_version} ({r.strategy}) "
                  f"[bold]{r.status}[/bold] phase {r.phase}"
                  + (f"; failed gate {r.failed_gate} = {r.failed_value:.4g} (threshold {r.threshold:.4g})"
                     if r.failed_gate else ""))


def cmd_rollback(args: argparse.Namespace) -> int:
    from recserve.control.proto import control_pb2 as pb

    stub, ch = _stub(args)
    r = stub.Rollback(pb.RollbackRequest(model=args.model), metadata=_auth(args), timeout=args.timeout)
    _print_rollout(r, args.json)
    ch.close()
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from recserve.control.proto import control_pb2 as pb

    stub, ch = _stub(args)
    r = stub.GetRollout(pb.GetRolloutRequest(model=args.model or "", id=args.id or ""), timeout=10)
    _print_rollout(r, args.json)
    ch.close()
    return 0


def _instance_call(method: str):
    def run(args: argparse.Namespace) -> int:
        from recserve.control.proto import control_pb2 as pb

        stub, ch = _stub(args)
        if method == "AddInstance":
            req = pb.AddInstanceRequest(role=args.role)
        else:
            req = pb.InstanceRequest(id=args.id)
        r = getattr(stub, method)(req, metadata=_auth(args), timeout=args.timeout)
        if args.json:
            print(json.dumps(json_format.MessageToDict(r, preserving_proto_field_name=True), indent=2))
        else:
            console.print(f"{r.id}: role {r.role}, state {r.state}, pid {r.pid}, grpc {r.grpc_port}")
        ch.close()
        return 0

    return run


def cmd_scale(args: argparse.Namespace) -> int:
    """Active-active: keep N actives (new ones start, load, warm and pass a golden inference first;
    removed ones drain their in-flight requests before they stop)."""
    from recserve.control.proto import control_pb2 as pb

    stub, ch = _stub(args)
    resp = stub.Scale(pb.ScaleRequest(active=args.active), metadata=_auth(args), timeout=args.timeout)
    d = _status_dict(resp)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        actives = [i["id"] for i in d["instances"] if i["role"] in ("primary", "active")]
        console.print(f"{len(actives)} actives: {', '.join(actives)} (wanted {d.get('active_target', 0)})")
    ch.close()
    return 0


def cmd_limits(args: argparse.Namespace) -> int:
    """Show the knee the in-flight limits come from, or set a measured one (the limits follow at once)."""
    from recserve.control.proto import control_pb2 as pb

    stub, ch = _stub(args)
    try:
        if args.knee_rps is None:
            resp = stub.GetStatus(pb.GetStatusRequest(events=1), timeout=args.timeout)
        else:
            resp = stub.SetKnee(pb.SetKneeRequest(knee_rps=args.knee_rps), metadata=_auth(args), timeout=args.timeout)
    finally:
        ch.close()
    d = _status_dict(resp)
    if args.json:
        print(json.dumps({k: d.get(k) for k in ("knee_rps", "knee_source", "host_limit")}
                         | {"limits": {i["id"]: i.get("limit", 0) for i in d["instances"]}}, indent=2))
        return 0
    console.print(_limits_line(d))
    for i in d["instances"]:
        console.print(f"  {i['id']} ({i['role']}): limit {i.get('limit', 0)}, in flight {i.get('in_flight', 0)}")
    return 0


def _limits_line(d: dict) -> str:
    return (f"knee {d.get('knee_rps', 0):g} rps ({d.get('knee_source', '')}): host limit {d.get('host_limit', 0)} "
            f"in flight, shared by the servers taking traffic")


def cmd_versions(args: argparse.Namespace) -> int:
    from recserve.control.proto import control_pb2 as pb

    stub, ch = _stub(args)
    r = stub.ListVersions(pb.ListVersionsRequest(model=args.model), timeout=30)
    if args.json:
        print(json.dumps(json_format.MessageToDict(r, preserving_proto_field_name=True), indent=2))
        return 0
    t = Table("version", "verified", "desired", "files", "built", "problem")
    for v in r.versions:
        t.add_row(str(v.version), "yes" if v.verified else "[red]no[/red]", "*" if v.desired else "", str(v.files),
                  v.built_at, v.problem)
    console.print(t)
    ch.close()
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from recserve.control.proto import control_pb2 as pb

    stub, ch = _stub(args)
    s = stub.CreateSnapshot(pb.CreateSnapshotRequest(note=args.note or ""), metadata=_auth(args), timeout=300)
    if args.json:
        print(json.dumps(json_format.MessageToDict(s, preserving_proto_field_name=True), indent=2))
    else:
        console.print(f"snapshot {s.id}: {s.files} files, {s.bytes / 1e6:.1f} MB")
    ch.close()
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    from recserve.control.proto import control_pb2 as pb

    if args.source:
        return backup_cli.list_from_target(args, console)
    stub, ch = _stub(args)
    r = stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=30)
    policy = stub.GetBackupPolicy(pb.GetBackupPolicyRequest(), timeout=10)
    backups = stub.ListBackups(pb.ListBackupsRequest(), timeout=60) if policy.configured else None
    if args.json:
        d = json_format.MessageToDict(r, preserving_proto_field_name=True)
        d["backups"] = [backup_cli.pb_row(b) for b in backups.backups] if backups is not None else None
        print(json.dumps(d, indent=2))
        return 0
    t = Table("id", "created", "files", "MB", "models", "note")
    for s in r.snapshots:
        models = ", ".join(f"{k}:{','.join(map(str, v.versions))}" for k, v in sorted(s.models.items()))
        t.add_row(s.id, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_unix)), str(s.files),
                  f"{s.bytes / 1e6:.1f}", models, s.note)
    console.print(t)
    if backups is not None:
        console.print(backup_cli.backups_table([backup_cli.pb_row(b) for b in backups.backups],
                                               f"backups (policy) at {backups.target}"))
    else:
        console.print("no backup policy: the snapshots above are local only (see 'recctl backup policy')")
    ch.close()
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from recserve.control.proto import control_pb2 as pb

    if args.source:  # a new machine: straight from the backup target, no control plane
        args.backup_id = args.backup_id or args.id
        return backup_cli.cmd_restore_from(args, console)
    if not args.id:
        console.print("[red]recctl restore:[/red] give a snapshot ID, or --from TARGET [--id ID] --root DIR "
                      "--repository DIR")
        return 2
    stub, ch = _stub(args)
    r = stub.RestoreSnapshot(pb.RestoreSnapshotRequest(id=args.id), metadata=_auth(args), timeout=300)
    if args.json:
        print(json.dumps(json_format.MessageToDict(r, preserving_proto_field_name=True), indent=2))
    else:
        console.print(f"restored snapshot {r.id}: {r.restored_files} files rewritten, {r.verified_files} verified"
                      + (f"; repaired {list(r.repaired)}" if r.repaired else ""))
    ch.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recctl", description=__doc__)
    p.add_argument("--root", default=os.environ.get("RECSERVE_ROOT", str(REPO_ROOT / ".recserve")),
                   help="runtime directory of the fleet (state, token, logs)")
    p.add_argument("--control", default=os.environ.get("RECSERVE_CONTROL"), help="control plane host:port")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a call")
    p.add_argument("--tls", action="store_true", help="the control API speaks TLS (default: as endpoints.json says)")
    p.add_argument("--ca", default=os.environ.get("RECSERVE_CONTROL_CA"),
                   help="PEM CA (or self-signed certificate) to trust for the control API; implies --tls")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(fn=fn)
        return sp

    up = add("up", cmd_up, "start the fleet in the background (no-op when it is up)")
    down = add("down", cmd_down, "stop the control plane, instances and HAProxy of this root")
    for sp in (up, down):
        sp.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    up.add_argument("--grpc-port", type=int, default=int(os.environ.get("PORT_GRPC", 8001)))
    up.add_argument("--http-port", type=int, default=int(os.environ.get("PORT_HTTP", 8000)))
    up.add_argument("--control-port", type=int, default=int(os.environ.get("PORT_CONTROL", 50051)))
    up.add_argument("--metrics-port", type=int, default=int(os.environ.get("PORT_CONTROL_METRICS", 9108)))
    up.add_argument("--instances", type=int, default=2)
    up.add_argument("--mode", choices=("active-active", "primary-standby"), default="active-active",
                    help="active-active: --active instances share traffic (leastconn), the rest are hot standbys")
    up.add_argument("--active", type=int, default=2, help="actives at first start (later: recctl scale)")
    up.add_argument("--knee-rps", type=float, default=0.0, help="host knee for the in-flight limits "
                    "(0: reports/perf/latest, else 500)")
    up.add_argument("--slo-p99-ms", type=float, default=50.0, help="p99 target of admitted requests")
    up.add_argument("--no-fallback", action="store_true", help="no degraded answers: shed = 429/RESOURCE_EXHAUSTED")
    up.add_argument("--fallback-maxconn", type=int, default=FleetConfig.fallback_maxconn,
                    help="in-flight limit of the degraded answers")
    up.add_argument("--fallback-queue", type=int, default=FleetConfig.fallback_queue,
                    help="shed requests that may wait (2 x SLO at most) for a degraded answer in a burst; 0: refuse "
                    "at once")
    up.add_argument("--timeout-server-ms", type=int, default=0, help="HAProxy timeout server (0: from the SLO)")
    up.add_argument("--adaptive-limits", action="store_true", help="AIMD controller moves the limits")
    up.add_argument("--tls-cert", help="PEM server certificate: the control API speaks TLS")
    up.add_argument("--tls-key", help="PEM private key of --tls-cert (mode 0600)")
    up.add_argument("--tls-ca", help="CA clients trust (default: --tls-cert itself, for a self-signed one)")
    up.add_argument("--client-bind", help="address of the client ports (default 127.0.0.1; others need TLS)")
    up.add_argument("--client-tls-cert", help="PEM certificate: HAProxy's client ports speak TLS")
    up.add_argument("--client-tls-key", help="PEM private key of --client-tls-cert (mode 0600)")
    up.add_argument("--client-allow-plaintext", action="store_true",
                    help="allow a non-loopback --client-bind without TLS")
    up.add_argument("--max-grpc-body", type=int, default=0, help="largest gRPC request body in bytes (default: "
                    "batch 8 of 1000-item histories, 88,272; larger limits cost HAProxy CPU)")
    up.add_argument("--max-http-body", type=int, default=0, help="largest HTTP request body in bytes (default: "
                    "batch 4 of 1000-item histories as JSON, 92,276)")
    up.add_argument("--backup-policy", default=os.environ.get("RECSERVE_BACKUP_POLICY"),
                    help="backup policy file (README 'Backup and recovery'); none: no scheduled backups")
    st = add("status", cmd_status, "fleet, instances, versions, warnings")
    st.add_argument("--events", type=int, default=10)
    ro = add("rollover", cmd_rollover, "roll a model to a new version with metric gates")
    ro.add_argument("model")
    ro.add_argument("--version", type=int, required=True)
    ro.add_argument("--strategy", choices=("canary", "blue-green"), default="canary")
    ro.add_argument("--steps", default="", help="canary traffic percentages, e.g. 10,50,100")
    ro.add_argument("--bake", type=float, default=None, help="seconds per step (default 5)")
    rb = add("rollback", cmd_rollback, "abort a running rollout or return to the previous version")
    rb.add_argument("model")
    rs = add("rollout", cmd_rollout, "show the latest rollout (of MODEL) or one by --id")
    rs.add_argument("model", nargs="?")
    rs.add_argument("--id")
    for name, method in (("promote", "PromoteInstance"), ("drain", "DrainInstance")):
        sp = add(name, _instance_call(method), f"{name} an instance")
        sp.add_argument("id")
    sc = add("scale", cmd_scale, "active-active: set the number of active instances")
    sc.add_argument("--active", type=int, required=True, help="actives to keep (1..slots)")
    lm = add("limits", cmd_limits, "show the knee the in-flight limits come from, or set a measured one")
    lm.add_argument("--knee-rps", type=float, help="requests/s the host serves within the SLO p99 (for example "
                    "the drills' fresh ladder); limits = knee x SLO, shared by the servers taking traffic")
    inst = sub.add_parser("instances", help="add or remove instances")
    isub = inst.add_subparsers(dest="action", required=True)
    ia = isub.add_parser("add", help="start a new instance")
    ia.add_argument("--role", default="standby", choices=("standby", "primary", "active"))
    ia.add_argument("--json", action="store_true")
    ia.set_defaults(fn=_instance_call("AddInstance"))
    ir = isub.add_parser("remove", help="stop and remove an instance")
    ir.add_argument("id")
    ir.add_argument("--json", action="store_true")
    ir.set_defaults(fn=_instance_call("RemoveInstance"))
    vs = add("versions", cmd_versions, "versions of a model with their manifest check")
    vs.add_argument("model")
    sn = add("snapshot", cmd_snapshot, "back up the model repository (content-addressed)")
    sn.add_argument("--note", default="")
    sns = add("snapshots", cmd_snapshots, "list local snapshots and the policy's verified backups")
    backup_cli.target_options(sns)
    re_ = add("restore", cmd_restore, "restore the model repository from a snapshot, or rebuild a runtime root "
              "and repository from a backup target (--from; no control plane needed)")
    re_.add_argument("id", nargs="?", help="snapshot id (through the control plane)")
    backup_cli.target_options(re_)
    re_.add_argument("--id", dest="backup_id", help="backup id at the target (default: the newest verified)")
    re_.add_argument("--root", dest="restore_root", help="new runtime root (must not hold a state.db)")
    re_.add_argument("--repository", help="model repository to rebuild")
    backup_cli.add_commands(sub, add)
    from recserve.control.kube.ctl import add_parser as add_k8s

    add_k8s(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "backup":
            return backup_cli.cmd_backup(args, console, lambda: (*_stub(args), lambda: _auth(args)))
        return args.fn(args)
    except SecretFileError as exc:
        console.print(f"[red]recctl:[/red] {exc}")
        return 2
    except grpc.RpcError as exc:
        code = exc.code()
        details = (exc.details() or "").lower()
        if code == grpc.StatusCode.UNAVAILABLE and ("ssl" in details or "handshake" in details):
            console.print(f"[red]recctl:[/red] TLS handshake with the control plane at {_control(args)} failed: "
                          "is --ca (or endpoints.json's control_ca) the CA of its certificate? "
                          f"({exc.details()})")
        elif code == grpc.StatusCode.UNAVAILABLE and "connect" in details:
            console.print(f"[red]recctl:[/red] no control plane at {_control(args)} (run 'make fleet-up')")
        else:
            console.print(f"[red]recctl: {code.name}:[/red] {exc.details()}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
