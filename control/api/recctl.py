"""``recctl``: the operator's command line for the recserve fleet (talks to the control plane over gRPC).

Every command takes ``-o json|yaml|table`` (``--json`` is ``-o json``): json and yaml print one document on
stdout and nothing else there; errors, warnings and progress go to stderr. Commands that change the fleet take
``--dry-run`` (print what would be done, change nothing). ``recctl completion bash|zsh`` prints a completion
script; ``recctl --version`` the versions.

Exit codes: the table in control/api/cli_output.py (also at the end of ``recctl --help``), which maps every error to
one code in one place.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
from google.protobuf import json_format
from rich.markup import escape
from rich.table import Table

from recserve.control.api.cli_output import (
    EXIT_CODES_HELP,
    FAILED,
    OK,
    USAGE,
    OperationFailed,
    Output,
    Parser,
    Unreachable,
    UsageError,
    add_command,
    add_dry_run,
    add_output_flags,
    classify,
    dry_run_doc,
    existing_file,
    float_range,
    instance_id,
    int_range,
    model_name,
    nonempty,
    percent_list,
    positive_seconds,
)
from recserve.control.api.tls import control_channel
from recserve.control.backup import cli as backup_cli
from recserve.control.defaults import (
    CONTROL_PORT,
    DEFAULT_REPOSITORY,
    DEFAULT_ROOT,
    GRPC_PORT,
    HTTP_PORT,
    LIMIT_RULES,
    REPO_ROOT,
)
from recserve.control.fleet.config import FleetConfig
from recserve.control.monitoring.stack import read_endpoints
from recserve.control.runtime.procs import pid_alive
from recserve.control.settings import RECCTL_GLOBAL, SETTINGS_FILE, Settings, add_flags, from_args

#: The range the control plane accepts for ``recctl limits --knee-rps`` (control/routing/router.py, Router.set_knee).
KNEE_RPS_RANGE = (1.0, 1_000_000.0)


def _root(args: argparse.Namespace) -> Path:
    return Path(args.root).resolve()


def _endpoints(root: Path) -> dict:
    try:
        return json.loads((root / "endpoints.json").read_text())
    except (OSError, ValueError):
        return {}


def _control(args: argparse.Namespace) -> str:
    return args.control or _endpoints(_root(args)).get("control") or f"127.0.0.1:{CONTROL_PORT}"


def _tls(args: argparse.Namespace) -> tuple[bool, Path | None]:
    """TLS for the control API: --tls/--ca, else what the running control plane wrote to endpoints.json."""
    if args.tls or args.ca:
        return True, Path(args.ca) if args.ca else None
    ep = _endpoints(_root(args))
    return bool(ep.get("control_tls")), Path(ep["control_ca"]) if ep.get("control_ca") else None


def _stub(args: argparse.Namespace):
    """(ControlPlaneStub, channel): the one way recctl reaches the control plane (tests replace it)."""
    from recserve.control.api.proto import control_pb2_grpc as pbg

    channel = control_channel(_control(args), *_tls(args))
    return pbg.ControlPlaneStub(channel), channel


def _auth(args: argparse.Namespace) -> list[tuple[str, str]]:
    path = _root(args) / "token"
    try:
        token = path.read_text().strip()
    except OSError:
        raise Unreachable(f"cannot read the token file {path} (is the fleet up? are you its owner?)") from None
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


def _msg(m) -> dict:
    return json_format.MessageToDict(m, preserving_proto_field_name=True)


def _status(args: argparse.Namespace, stub, events: int = 0) -> dict:
    from recserve.control.api.proto import control_pb2 as pb

    return _status_dict(stub.GetStatus(pb.GetStatusRequest(events=events), timeout=min(args.timeout, 30)))


def _instance(d: dict, iid: str) -> dict:
    for i in d["instances"]:
        if i["id"] == iid:
            return i
    raise OperationFailed(f"no instance {iid!r} in the fleet (it has {', '.join(i['id'] for i in d['instances'])})")


# ---------------------------------------------------------------------- commands
def _up_settings(args: argparse.Namespace, root: Path) -> Settings:
    """The control plane's settings from ``recctl up``'s flags (the server's own, control/settings.py), with the
    root and every path made absolute: the server runs in another directory."""
    s = from_args(args, root=root, repository=Path(args.repository).resolve())
    for section in (s.control, s.frontdoor, s.backup):
        for name, value in vars(section).items():
            if isinstance(value, Path):
                setattr(section, name, value.resolve())
    s.spec = s.spec.resolve() if s.spec else None
    return s


def _up_command(settings_file: Path) -> list[str]:
    """The server reads the settings ``recctl up`` wrote, not a command line rebuilt from its flags."""
    return [sys.executable, "-m", "recserve.control.server", "--settings", str(settings_file)]


def _dial(host: str) -> str:
    """The address a local client dials for a server bound to ``host``: loopback for a wildcard bind."""
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host  # a name
    if addr.is_unspecified:
        return "127.0.0.1" if addr.version == 4 else "[::1]"
    return f"[{addr}]" if addr.version == 6 else str(addr)


def cmd_up(args: argparse.Namespace) -> int:
    """Start the control plane in the background (it starts HAProxy and the instances); idempotent."""
    from recserve.control.keys import check_private

    out: Output = args.out
    root = _root(args)
    address = f"{_dial(args.control_host)}:{args.control_port}"
    doc = {"root": str(root), "control": address, "grpc": f"127.0.0.1:{args.grpc_port}",
           "http": f"127.0.0.1:{args.http_port}", "log": str(root / "control.log")}
    pid = _control_pid(root)
    if pid is not None:
        doc |= {"control": _control(args), "pid": pid, "already_up": True, "started": False}
        if args.dry_run:
            doc = dry_run_doc("up", **doc, would="nothing: the fleet is already up")
        out.emit(doc, f"fleet already up: control plane pid {pid} at {_control(args)} (not starting a second one)")
        return OK
    for flag in ("tls_key", "client_tls_key"):  # refuse a readable key before anything starts
        if getattr(args, flag):
            check_private(Path(getattr(args, flag)))
    if args.spec:  # a bad spec is refused before anything starts, naming the file and the field
        from recserve.control.spec.repository import RepositoryReadError
        from recserve.control.spec.spec import SpecError, load_spec

        try:
            spec = load_spec(Path(args.spec), Path(args.repository) if args.repository else None)
        except (SpecError, RepositoryReadError) as exc:
            raise UsageError(f"--spec: {exc}") from None
        if not (args.max_grpc_body and args.max_http_body):  # the front door's limits come from the spec
            from recserve.control.routing.frontdoor import FrontDoorError, spec_body_limits

            try:
                spec_body_limits(spec)
            except FrontDoorError as exc:
                raise UsageError(f"--spec: {exc}") from None
        args.repository = args.repository or spec.repository
    args.repository = args.repository or DEFAULT_REPOSITORY
    settings = _up_settings(args, root)
    settings_file = root / SETTINGS_FILE
    cmd = _up_command(settings_file)
    if args.dry_run:
        out.emit(dry_run_doc("up", **doc, command=cmd, settings=settings.to_dict(), would="write the settings to "
                             f"{settings_file}, start the control plane, HAProxy and {args.instances} instance(s) "
                             f"({args.mode})"),
                 f"would write {settings_file} and start: {' '.join(cmd)}\n(clients: gRPC {doc['grpc']}, HTTP "
                 f"{doc['http']}; control {address}; logs {root})")
        return OK
    root.mkdir(parents=True, exist_ok=True)
    settings.write(settings_file)  # mode 0600: it may name the TLS key files
    ca_file = args.ca or args.tls_ca or args.tls_cert  # the readiness wait must trust what the server presents
    ca = Path(ca_file) if ca_file else None
    tls = args.tls or ca is not None
    with open(root / "control.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(REPO_ROOT))
    out.progress(f"control plane pid {proc.pid} started; waiting up to {args.timeout:.0f} s for it to answer at "
                 f"{address} (log {root / 'control.log'})")
    deadline = time.monotonic() + args.timeout
    with out.err.status("starting control plane, HAProxy and Triton instances..."):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (root / "control.log").read_text(errors="replace").splitlines()[-5:]
                raise OperationFailed(f"control plane exited (code {proc.returncode}): " + " | ".join(tail))
            if _healthy(address, tls=tls, ca=ca):
                doc |= {"pid": proc.pid, "already_up": False, "started": True}
                out.emit(doc, f"fleet up: clients use gRPC {doc['grpc']}, HTTP {doc['http']}; control {address} "
                              f"(pid {proc.pid}); logs {root}")
                return OK
            time.sleep(0.5)
    raise OperationFailed(f"fleet not ready after {args.timeout:.0f}s; see {root / 'control.log'}")


def _state_instances(root: Path) -> list[dict]:
    """The instances recorded in ``state.db`` (read-only: a dry run opens nothing for writing)."""
    try:
        db = sqlite3.connect(f"file:{root / 'state.db'}?mode=ro", uri=True)
        try:
            return [{"id": r[0], "pid": r[1]} for r in db.execute("SELECT id, pid FROM instances")]
        finally:
            db.close()
    except sqlite3.Error:
        return []


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the control plane, then every instance and HAProxy it started (by pid), nothing else."""
    out: Output = args.out
    root = _root(args)
    pid = _control_pid(root)
    has_state = (root / "state.db").exists()
    if args.dry_run:
        insts = _state_instances(root) if has_state else []
        doc = dry_run_doc("down", root=str(root), control_pid=pid, instances=insts,
                          would=(f"stop the control plane (pid {pid}), " if pid else "") +
                          (f"{len(insts)} instance(s) and HAProxy" if has_state else "nothing (no fleet state)"))
        out.emit(doc, f"would stop: {doc['would']} under {root}")
        return OK
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    if not has_state:
        out.emit({"root": str(root), "stopped": False, "control_pid": pid, "instances": 0},
                 f"no fleet state under {root}: nothing to stop")
        return OK
    from recserve.control.fleet.fleet import Fleet

    ep = _endpoints(root)
    fleet = Fleet(FleetConfig(root=root, repository=Path(args.repository),
                              grpc_port=int(ep.get("grpc", f":{GRPC_PORT}").rsplit(":", 1)[1]),
                              http_port=int(ep.get("http", f":{HTTP_PORT}").rsplit(":", 1)[1])))
    n = len(fleet.state.instances())
    fleet.down()
    fleet.state.close()
    (root / "control.pid").unlink(missing_ok=True)
    out.emit({"root": str(root), "stopped": True, "control_pid": pid, "instances": n},
             f"fleet down: control plane, {n} instance(s) and HAProxy stopped")
    return OK


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
    out: Output = args.out
    stub, ch = _stub(args)
    try:
        d = _status(args, stub, args.events)
    finally:
        ch.close()
    mon = read_endpoints(_root(args))
    for w in d.get("warnings", []):
        out.warn(w)

    def human(c) -> None:
        ep = d["endpoints"]
        c.print(f"fleet [bold]{d['health']}[/bold]  gRPC {ep['grpc']}  HTTP {ep['http']}  control {ep['control']}  "
                f"metrics {ep['metrics']}  route {d.get('route', '')}")
        c.print(f"mode {d.get('mode', '')}  actives wanted {d.get('active_target', 0)}  "
                f"shedding {'[red]yes[/red]' if d.get('shedding') else 'no'}")
        c.print(_limits_line(d))
        t = Table("id", "role", "state", "pid", "grpc", "http", "weight", "in flight", "limit", "restarts", "models",
                  "detail")
        for i in d["instances"]:
            models = ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in sorted(i["models"].items())
                               if k in d["desired"] and len(d["desired"]) and not k.endswith(("_pre", "_post")))
            t.add_row(i["id"], i["role"], i["state"], str(i["pid"]), str(i["grpc_port"]), str(i["http_port"]),
                      str(i["weight"]), f"{i.get('in_flight', 0)}+{i.get('queued', 0)}q", str(i.get("limit", 0)),
                      str(i.get("restarts", 0)), models, escape(i.get("detail", "")[:60]))
        c.print(t)
        c.print(f"/dev/shm: {d['shm']['regions']} regions, {d['shm']['bytes'] / 2**20:.1f} MiB held by this fleet's "
                "instances (removed when an instance stops or is replaced)")
        c.print(f"monitoring: Prometheus {mon['prometheus']}  Alertmanager {mon['alertmanager']}  "
                f"receiver {mon['receiver']}" if mon else "monitoring: not running (make monitor-up)")
        if d.get("active_rollout", {}).get("id"):
            r = d["active_rollout"]
            c.print(f"rollout {r['id']}: {r['model']} {r['from_version']} -> {r['to_version']} phase {r['phase']}")
        if args.events and d.get("events"):
            c.print("recent events:")
            for e in d["events"]:
                ts = time.strftime("%H:%M:%S", time.localtime(e["ts_unix"])) + f".{int(e['ts_unix'] % 1 * 1000):03d}"
                c.print(f"  {ts} {e['kind']:<12} {e.get('instance', ''):<4} {escape(e['message'])}")

    doc = {**d, "monitoring": mon}
    if args.html:  # the same document as one static page (control/htmlpage.py); the -o output is unchanged
        from recserve.control.api.statushtml import render

        page = render(doc, time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()))
        try:
            args.html.write_text(page, encoding="utf-8")
        except OSError as exc:
            raise OperationFailed(f"--html: cannot write {args.html}: {exc.strerror}") from None
        out.progress(f"status page written to {escape(str(args.html))} (open it in a browser)")
    out.emit(doc, human)
    return OK


def _event_line(ev) -> str:
    gates = " ".join(f"{k}={v:.3g}" for k, v in sorted(ev.gates.items()))
    return (f"{time.strftime('%H:%M:%S', time.localtime(ev.ts_unix))} [bold]{ev.phase:<9}[/bold] "
            f"{ev.weight:>3}%  {escape(ev.message)}  {gates}")


def _check_steps(strategy: str, steps: list[int] | None) -> None:
    """The control plane's rule for canary steps, told before anything is sent."""
    if steps and strategy == "canary" and (steps != sorted(set(steps)) or steps[-1] != 100):
        raise UsageError(f"--steps: {','.join(map(str, steps))} must be increasing percentages ending at 100")


#: recctl rollover's gate flags (RolloverRequest.gates); unset: the serving spec's gates for the model, else
#: the control plane's defaults (the rollout's first event names which).
GATE_FLAGS = {
    "max_error_rate": (float_range(0.0001, 1), "largest share of failed or wrong probes (spec gates.errorRateMax; "
                                              "default 0.01)"),
    "min_p99_ms": (float_range(0.1, None, "ms"), "canary p99 under which latency never rolls back (spec "
                                                 "gates.p99Ms; default the SLO p99)"),
    "max_p99_ratio": (float_range(1, None), "above --min-p99-ms, the largest canary p99 / the old version's "
                                            "(default 3)"),
    "min_answer_overlap": (float_range(-1, 1), "least top-k overlap with the serving version's answers before any "
                                               "traffic moves (-1 disables, 0 keeps the default 0.3)"),
}


def cmd_rollover(args: argparse.Namespace) -> int:
    from recserve.control.api.proto import control_pb2 as pb

    out: Output = args.out
    _check_steps(args.strategy, args.steps)
    req = pb.RolloverRequest(model=args.model, version=args.version, strategy=args.strategy, steps=args.steps or [])
    if args.bake is not None:
        req.bake_seconds = args.bake
    for name in GATE_FLAGS:
        if getattr(args, name) is not None:
            setattr(req.gates, name, getattr(args, name))
    stub, ch = _stub(args)
    try:
        if args.dry_run:
            return _rollover_plan(args, stub, out)
        last, rollout = None, None
        for ev in stub.Rollover(req, metadata=_auth(args), timeout=args.timeout):
            last = ev
            out.progress(_event_line(ev))
        if last is None:
            raise OperationFailed("the control plane ended the rollover without a single event")
        try:
            rollout = stub.GetRollout(pb.GetRolloutRequest(id=last.rollout_id), timeout=10)
        except grpc.RpcError:
            rollout = None  # the verdict is in the last event already
    finally:
        ch.close()
    doc = _msg(rollout) if rollout is not None else _msg(last)
    verdict = (_rollout_line(rollout) if rollout is not None else f"rollout {last.rollout_id} [bold]{last.status}"
               "[/bold]") + f"\n{escape(last.message)}"
    out.emit(doc, verdict)
    return OK if last.status == "succeeded" else FAILED


def _rollover_plan(args: argparse.Namespace, stub, out: Output) -> int:
    """``rollover --dry-run``: the request, the version now desired and what the control plane would refuse."""
    from recserve.control.api.proto import control_pb2 as pb

    d = _status(args, stub)
    versions = stub.ListVersions(pb.ListVersionsRequest(model=args.model), timeout=30)
    info = next((v for v in versions.versions if v.version == args.version), None)
    current = d["desired"].get(args.model)
    problems = []
    if info is None:
        problems.append(f"{args.model} version {args.version} is not in the repository "
                        f"(built: {[int(v.version) for v in versions.versions]})")
    elif not info.verified:
        problems.append(f"{args.model} version {args.version} fails verification: {info.problem}")
    if current == [args.version]:
        problems.append(f"{args.model} is already at version {args.version}")
    running = d.get("active_rollout") or {}
    if running.get("id"):
        problems.append(f"rollout {running['id']} of {running.get('model')} is still running")
    steps = args.steps or ([10, 50, 100] if args.strategy == "canary" else [100])
    doc = dry_run_doc("rollover", model=args.model, from_versions=current, to_version=args.version,
                      strategy=args.strategy, steps=steps, bake_seconds=args.bake if args.bake is not None else 5.0,
                      refused=problems)
    shown = ",".join(map(str, current)) if current else "(none)"
    out.emit(doc, f"would roll {args.model} {shown} -> {args.version} ({args.strategy}, steps {steps}, bake "
                  f"{doc['bake_seconds']:g} s)" + "".join(f"\n[red]would be refused:[/red] {escape(p)}"
                                                          for p in problems))
    return FAILED if problems else OK


def _rollout_line(r) -> str:
    return (f"rollout {r.id}: {r.model} {r.from_version} -> {r.to_version} ({r.strategy}) "
            f"[bold]{r.status}[/bold] phase {r.phase}"
            + (f"; failed gate {r.failed_gate} = {r.failed_value:.4g} (threshold {r.threshold:.4g})"
               if r.failed_gate else ""))


def cmd_rollback(args: argparse.Namespace) -> int:
    from recserve.control.api.proto import control_pb2 as pb

    out: Output = args.out
    stub, ch = _stub(args)
    try:
        if args.dry_run:
            d = _status(args, stub)
            try:
                last = stub.GetRollout(pb.GetRolloutRequest(model=args.model), timeout=10)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                last = None  # no rollout of this model at all
            current = d["desired"].get(args.model)
            if last is not None and last.status == "running":
                would = f"abort rollout {last.id} ({last.from_version} -> {last.to_version}) and roll back to " \
                        f"{last.from_version}"
            elif last is not None and last.status == "succeeded" and current == [last.to_version]:
                would = f"return every instance from {args.model} {last.to_version} to {last.from_version}"
            else:
                raise OperationFailed(f"nothing to roll back for {args.model!r}: no running or completed rollout "
                                      f"to undo (desired {current})")
            out.emit(dry_run_doc("rollback", model=args.model, desired=current, rollout=_msg(last), would=would),
                     f"would {would}")
            return OK
        r = stub.Rollback(pb.RollbackRequest(model=args.model), metadata=_auth(args), timeout=args.timeout)
    finally:
        ch.close()
    out.emit(_msg(r), _rollout_line(r))
    return FAILED if r.status == "failed" else OK


def cmd_rollout(args: argparse.Namespace) -> int:
    from recserve.control.api.proto import control_pb2 as pb

    stub, ch = _stub(args)
    try:
        r = stub.GetRollout(pb.GetRolloutRequest(model=args.model or "", id=args.id or ""), timeout=10)
    finally:
        ch.close()
    args.out.emit(_msg(r), _rollout_line(r))
    return OK


def _instance_call(method: str):
    verb = {"AddInstance": "add", "RemoveInstance": "remove", "PromoteInstance": "promote",
            "DrainInstance": "drain"}[method]

    def run(args: argparse.Namespace) -> int:
        from recserve.control.api.proto import control_pb2 as pb

        out: Output = args.out
        stub, ch = _stub(args)
        try:
            if args.dry_run:
                if method == "AddInstance":
                    doc = dry_run_doc("instances add", role=args.role, would=f"start a new {args.role} instance")
                else:
                    inst = _instance(_status(args, stub), args.id)
                    doc = dry_run_doc(f"{verb} instance", instance=inst,
                                      would=f"{verb} {inst['id']} ({inst['role']}, {inst['state']})")
                out.emit(doc, f"would {doc['would']}")
                return OK
            req = pb.AddInstanceRequest(role=args.role) if method == "AddInstance" else pb.InstanceRequest(id=args.id)
            r = getattr(stub, method)(req, metadata=_auth(args), timeout=args.timeout)
        finally:
            ch.close()
        out.emit(_msg(r), f"{r.id}: role {r.role}, state {r.state}, pid {r.pid}, grpc {r.grpc_port}")
        return OK

    run.__name__ = f"cmd_{verb}"
    return run


def cmd_scale(args: argparse.Namespace) -> int:
    """Active-active: keep N actives (new ones start, load, warm and pass a golden inference first;
    removed ones drain their in-flight requests before they stop)."""
    from recserve.control.api.proto import control_pb2 as pb

    out: Output = args.out
    stub, ch = _stub(args)
    try:
        if args.dry_run:
            d = _status(args, stub)
            actives = [i["id"] for i in d["instances"] if i["role"] in ("primary", "active")]
            n = len(actives)
            would = (f"start {args.active - n} active(s) (each warms up first)" if args.active > n else
                     f"drain and stop {n - args.active} active(s)" if args.active < n else "nothing: already there")
            out.emit(dry_run_doc("scale", mode=d.get("mode"), actives=actives, active_from=n, active_to=args.active,
                                 would=would), f"{n} actives -> {args.active}: would {would}")
            return OK
        d = _status_dict(stub.Scale(pb.ScaleRequest(active=args.active), metadata=_auth(args), timeout=args.timeout))
    finally:
        ch.close()
    actives = [i["id"] for i in d["instances"] if i["role"] in ("primary", "active")]
    out.emit(d, f"{len(actives)} actives: {', '.join(actives)} (wanted {d.get('active_target', 0)})")
    return OK


def cmd_limits(args: argparse.Namespace) -> int:
    """Show the knee the in-flight limits come from, or set a measured one (the limits follow at once)."""
    from recserve.control.api.proto import control_pb2 as pb

    out: Output = args.out
    lo, hi = KNEE_RPS_RANGE
    if args.knee_rps is not None and not lo <= args.knee_rps <= hi:
        raise UsageError(f"--knee-rps: knee_rps must be within {lo:g}..{hi:.0f} requests/s, got {args.knee_rps:g}")
    if args.knee_rps is None and (args.knee_mean_ms or args.limit_rule):
        raise UsageError("--knee-mean-ms and --limit-rule go with the knee they belong to: give --knee-rps too")
    if args.dry_run and args.knee_rps is None:
        raise UsageError("--dry-run: only setting a knee (--knee-rps) changes anything")
    stub, ch = _stub(args)
    try:
        if args.knee_rps is None or args.dry_run:
            d = _status(args, stub, 1)
        else:
            req = pb.SetKneeRequest(knee_rps=args.knee_rps, knee_mean_ms=args.knee_mean_ms or 0.0,
                                    limit_rule=args.limit_rule or "")
            d = _status_dict(stub.SetKnee(req, metadata=_auth(args), timeout=args.timeout))
    finally:
        ch.close()
    doc = {k: d.get(k) for k in ("knee_rps", "knee_source", "host_limit", "limit_rule")} | {
        "limits": {i["id"]: i.get("limit", 0) for i in d["instances"]}}
    if args.dry_run:
        out.emit(dry_run_doc("limits set", knee_rps_from=d.get("knee_rps"), knee_rps_to=args.knee_rps, now=doc),
                 f"would set the knee {d.get('knee_rps', 0):g} -> {args.knee_rps:g} rps (now: {_limits_line(d)})")
        return OK

    def human(c) -> None:
        c.print(_limits_line(d))
        for i in d["instances"]:
            c.print(f"  {i['id']} ({i['role']}): limit {i.get('limit', 0)}, in flight {i.get('in_flight', 0)}")

    out.emit(doc, human)
    return OK


def _limits_line(d: dict) -> str:
    return (f"knee {d.get('knee_rps', 0):g} rps ({d.get('knee_source', '')}): host limit {d.get('host_limit', 0)} "
            f"in flight ({d.get('limit_rule') or 'p99: knee x SLO p99'}), shared by the servers taking traffic")


def cmd_versions(args: argparse.Namespace) -> int:
    from recserve.control.api.proto import control_pb2 as pb

    stub, ch = _stub(args)
    try:
        r = stub.ListVersions(pb.ListVersionsRequest(model=args.model), timeout=30)
    finally:
        ch.close()
    t = Table("version", "verified", "desired", "files", "built", "problem")
    for v in r.versions:
        t.add_row(str(v.version), "yes" if v.verified else "[red]no[/red]", "*" if v.desired else "", str(v.files),
                  v.built_at, escape(v.problem))
    args.out.emit(_msg(r), lambda c: c.print(t))
    return OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    from recserve.control.api.proto import control_pb2 as pb

    if args.dry_run:
        args.out.emit(dry_run_doc("snapshot", note=args.note, would="snapshot the model repository (content-"
                                  "addressed, sha256-verified) through the control plane"),
                      "would snapshot the model repository" + (f" (note {args.note!r})" if args.note else ""))
        return OK
    stub, ch = _stub(args)
    try:
        s = stub.CreateSnapshot(pb.CreateSnapshotRequest(note=args.note or ""), metadata=_auth(args), timeout=300)
    finally:
        ch.close()
    args.out.emit(_msg(s), f"snapshot {s.id}: {s.files} files, {s.bytes / 1e6:.1f} MB")
    return OK


def cmd_snapshots(args: argparse.Namespace) -> int:
    from recserve.control.api.proto import control_pb2 as pb

    if args.source:
        return _list_from_target(args)
    stub, ch = _stub(args)
    try:
        r = stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=30)
        policy = stub.GetBackupPolicy(pb.GetBackupPolicyRequest(), timeout=10)
        backups = stub.ListBackups(pb.ListBackupsRequest(), timeout=60) if policy.configured else None
    finally:
        ch.close()
    rows = [backup_cli.pb_row(b) for b in backups.backups] if backups is not None else None
    doc = _msg(r) | {"backups": rows}

    def human(c) -> None:
        t = Table("id", "created", "files", "MB", "models", "note")
        for s in r.snapshots:
            models = ", ".join(f"{k}:{','.join(map(str, v.versions))}" for k, v in sorted(s.models.items()))
            t.add_row(s.id, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_unix)), str(s.files),
                      f"{s.bytes / 1e6:.1f}", models, escape(s.note))
        c.print(t)
        if backups is not None:
            c.print(backup_cli.backups_table(rows, f"backups (policy) at {backups.target}"))
        else:
            c.print("no backup policy: the snapshots above are local only (see 'recctl backup policy')")

    args.out.emit(doc, human)
    return OK


def _target(args: argparse.Namespace):
    from recserve.control.backup.targets import parse_target

    return parse_target(args.source, args.endpoint_url or os.environ.get(backup_cli.ENDPOINT_ENV))


def _list_from_target(args: argparse.Namespace) -> int:
    """Backups at a target, read directly (no control plane needed)."""
    from recserve.control.backup.manager import list_backups
    from recserve.control.backup.targets import open_store

    rows = [backup_cli.record_row(r) for r in list_backups(open_store(_target(args)))]
    args.out.emit(rows, lambda c: c.print(backup_cli.backups_table(rows, f"backups at {args.source}")))
    return OK


def _restore_from(args: argparse.Namespace) -> int:
    """Rebuild ``--root`` and ``--repository`` from a backup target with no control plane running."""
    from recserve.control.backup.manager import STATE_FILE, get_backup, restore
    from recserve.control.backup.policy import BackupError
    from recserve.control.backup.targets import TargetError, open_store, refuse_inside

    if not args.restore_root or not args.repository:
        raise UsageError("restore --from: --root DIR and --repository DIR are required (the new runtime root and "
                         "model repository)")
    backup_id = args.backup_id or args.id
    if args.dry_run:  # restore()'s checks, and the backup it would take, without writing anything
        root, repository = Path(args.restore_root).resolve(), Path(args.repository).resolve()
        if (root / STATE_FILE).exists():
            raise OperationFailed(f"--root {root} already holds {STATE_FILE}: restore rebuilds a clean runtime root")
        try:
            refuse_inside(_target(args), "--from", runtime_root=root, model_repository=repository)
        except TargetError as exc:
            raise BackupError(str(exc)) from exc
        rec = get_backup(open_store(_target(args)), backup_id)
        if rec.verified is False:
            raise OperationFailed(f"backup {rec.id} failed its verification ({rec.problem}); choose another with --id")
        row = backup_cli.record_row(rec)
        args.out.emit(dry_run_doc("restore", source=args.source, backup=row, root=str(root),
                                  repository=str(repository)),
                      f"would restore backup {rec.id} ({row['files']} files, {rec.bytes / 1e6:.1f} MB) from "
                      f"{args.source} into {repository} and {root}")
        return OK
    out = restore(_target(args), backup_id, Path(args.restore_root), Path(args.repository))
    desired = ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in sorted(out["desired"].items()))
    spec = (f"; serving spec {out['spec']} ({out['spec_files']} files)" if out["spec"] else "")
    args.out.emit(out, f"restored backup {out['id']} ({out['files']} files, {out['bytes'] / 1e6:.1f} MB, every sha256 "
                       f"checked) into {out['repository']} and {out['root']}; desired {desired}{spec}\n"
                       f"next: recctl --root {out['root']} up --repository {out['repository']}"
                       + (f" --spec {out['spec']}" if out["spec"] else ""))
    return OK


def cmd_restore(args: argparse.Namespace) -> int:
    from recserve.control.api.proto import control_pb2 as pb

    if args.source:  # a new machine: straight from the backup target, no control plane
        return _restore_from(args)
    if not args.id:
        raise UsageError("restore: give a snapshot ID, or --from TARGET [--id ID] --root DIR --repository DIR")
    for flag, value in (("--id", args.backup_id), ("--root", args.restore_root), ("--repository", args.repository),
                        ("--endpoint-url", args.endpoint_url)):
        if value:
            raise UsageError(f"restore: {flag} goes with --from TARGET (restoring snapshot {args.id} takes none)")
    stub, ch = _stub(args)
    try:
        if args.dry_run:
            snaps = stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=30).snapshots
            s = next((s for s in snaps if s.id == args.id), None)
            if s is None:
                raise OperationFailed(f"no snapshot {args.id!r} (recctl snapshots lists them)")
            args.out.emit(dry_run_doc("restore", snapshot=_msg(s), would=f"rewrite the model repository to snapshot "
                                      f"{s.id} ({s.files} files)"),
                          f"would restore snapshot {s.id}: {s.files} files, {s.bytes / 1e6:.1f} MB")
            return OK
        r = stub.RestoreSnapshot(pb.RestoreSnapshotRequest(id=args.id), metadata=_auth(args), timeout=300)
    finally:
        ch.close()
    args.out.emit(_msg(r), f"restored snapshot {r.id}: {r.restored_files} files rewritten, {r.verified_files} "
                           "verified" + (f"; repaired {list(r.repaired)}" if r.repaired else ""))
    return OK


def cmd_backup(args: argparse.Namespace) -> int:
    """``backup policy [--check FILE]`` / ``backup now [--dry-run]`` / ``backup list [--from TARGET]``."""
    from recserve.control.api.proto import control_pb2 as pb
    from recserve.control.backup.policy import BackupError, load_policy

    out: Output = args.out
    misplaced = [(flag, action) for flag, action, given in (
        ("--check", "policy", args.check), ("--note", "now", args.note), ("--dry-run", "now", args.dry_run),
        ("--from", "list", args.source), ("--endpoint-url", "list", args.endpoint_url)) if given and
        action != args.action]
    if misplaced:
        flag, action = misplaced[0]
        raise UsageError(f"backup {args.action}: {flag} goes with 'backup {action}'")
    if args.action == "policy" and args.check:
        try:
            p = load_policy(Path(args.check))
        except BackupError as exc:
            raise OperationFailed(f"invalid backup policy: {exc}") from None
        out.emit(p.describe(), f"ok: {p.describe()}")
        return OK
    if args.action == "list" and args.source:
        return _list_from_target(args)
    stub, ch = _stub(args)
    try:
        if args.action == "policy":
            r = stub.GetBackupPolicy(pb.GetBackupPolicyRequest(), timeout=10)
            out.emit(_msg(r), "no backup policy: nothing is backed up on a schedule (start the fleet with "
                              "--backup-policy FILE)" if not r.configured else
                     f"policy {r.source}: every {r.every_hours:g} h (+{r.slack_minutes:g} min slack, stale after "
                     f"{r.max_age_seconds:.0f} s), after rollover: {r.after_rollover}; keep the last {r.keep_last} "
                     f"and one per day for {r.daily_days} days; target {r.target}")
        elif args.action == "now":
            if args.dry_run:
                r = stub.GetBackupPolicy(pb.GetBackupPolicyRequest(), timeout=10)
                if not r.configured:
                    raise OperationFailed("no backup policy: 'backup now' would be refused (start the fleet with "
                                          "--backup-policy FILE)")
                out.emit(dry_run_doc("backup now", target=r.target, note=args.note,
                                     would=f"back up the repository and state.db to {r.target} and verify it"),
                         f"would back up the repository and state.db to {r.target}, then verify it")
                return OK
            r = stub.RunBackup(pb.RunBackupRequest(note=args.note or ""), metadata=_auth(args), timeout=args.timeout)
            out.emit(backup_cli.pb_row(r) | {"uploaded_bytes": r.uploaded_bytes},
                     f"backup {r.id}: {r.files} files, {r.bytes / 1e6:.1f} MB ({r.uploaded_bytes / 1e6:.1f} MB new), "
                     f"verified: {r.verified} {escape(r.problem)}")
            return OK if r.verified else FAILED
        else:
            r = stub.ListBackups(pb.ListBackupsRequest(), timeout=60)
            rows = [backup_cli.pb_row(b) for b in r.backups]
            out.emit(rows, lambda c: c.print(backup_cli.backups_table(rows, f"backups at {r.target}")))
    finally:
        ch.close()
    return OK


def cmd_completion(args: argparse.Namespace) -> int:
    from recserve.control.api.completion import script

    sys.stdout.write(script(build_parser(), args.shell))
    return OK


def version_text() -> str:
    """recserve's version, and the Triton it is built for (the pinned wheels: no constant names it in code)."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"recctl (recserve) {v('recserve')}\n"
            f"Triton: server from nvidia-pytriton {v('nvidia-pytriton')}, tritonclient {v('tritonclient')} "
            "(pinned to the server's version)")


class _Version(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(version_text() + "\n")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="recctl", description=__doc__.split("\n\n")[0],
               epilog=EXIT_CODES_HELP + "\n\nshell completion: source <(recctl completion bash)   (or zsh)",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_Version, help="print recserve's version and the Triton it is built for")
    p.add_argument("--root", default=os.environ.get("RECSERVE_ROOT", str(DEFAULT_ROOT)),
                   help="runtime directory of the fleet (state, token, logs)")
    p.add_argument("--control", type=nonempty("host:port"), default=os.environ.get("RECSERVE_CONTROL"),
                   help="control plane host:port")
    p.add_argument("--timeout", type=positive_seconds, default=600.0, help="seconds to wait for a call")
    p.add_argument("--tls", action="store_true", help="the control API speaks TLS (default: as endpoints.json says)")
    p.add_argument("--ca", type=existing_file, default=os.environ.get("RECSERVE_CONTROL_CA"),
                   help="PEM CA (or self-signed certificate) to trust for the control API; implies --tls")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn, help_: str, changes: bool = False) -> argparse.ArgumentParser:
        return add_command(sub, name, fn, help_, changes)

    up = add("up", cmd_up, "start the fleet in the background (no-op when it is up)", changes=True)
    down = add("down", cmd_down, "stop the control plane, instances and HAProxy of this root", changes=True)
    add_flags(up, cli=True, skip=RECCTL_GLOBAL)  # every setting of the control plane (control/settings.py)
    down.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY,
                      help="model repository of the fleet")
    st = add("status", cmd_status, "fleet, instances, versions, warnings")
    st.add_argument("--events", type=int_range(0, 1000), default=10, help="recent events to show")
    st.add_argument("--html", type=_page_file, metavar="FILE", help="also write the status as one static HTML page "
                    "(health, warnings, instances, versions, rollout, events; nothing loaded from elsewhere) to FILE")
    ro = add("rollover", cmd_rollover, "roll a model to a new version with metric gates (progress on stderr; "
             "exit 1 unless it succeeds)", changes=True)
    ro.add_argument("model", type=model_name)
    ro.add_argument("--version", type=int_range(1), required=True, help="the version to roll to")
    ro.add_argument("--strategy", choices=("canary", "blue-green"), default="canary")
    ro.add_argument("--steps", type=percent_list, default=None,
                    help="canary traffic percentages, increasing and ending at 100, e.g. 10,50,100")
    ro.add_argument("--bake", type=float_range(0, 3600, "seconds"), default=None, help="seconds per step (default 5)")
    for name, (kind, helptext) in GATE_FLAGS.items():
        ro.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=helptext)
    rb = add("rollback", cmd_rollback, "abort a running rollout or return to the previous version", changes=True)
    rb.add_argument("model", type=model_name)
    rs = add("rollout", cmd_rollout, "show the latest rollout (of MODEL) or one by --id")
    rs.add_argument("model", nargs="?", type=model_name)
    rs.add_argument("--id", type=nonempty("a rollout id"))
    for name, method in (("promote", "PromoteInstance"), ("drain", "DrainInstance")):
        sp = add(name, _instance_call(method), f"{name} an instance", changes=True)
        sp.add_argument("id", type=instance_id)
    sc = add("scale", cmd_scale, "active-active: set the number of active instances", changes=True)
    sc.add_argument("--active", type=int_range(1), required=True, help="actives to keep (1..slots)")
    lm = add("limits", cmd_limits, "show the knee the in-flight limits come from, or set a measured one",
             changes=True)
    lm.add_argument("--knee-rps", type=float_range(), help="requests/s the host serves within the SLO p99 (for "
                    "example the drills' fresh ladder); limits = knee x SLO (or x --knee-mean-ms with --limit-rule "
                    "mean), shared by the servers taking traffic")
    lm.add_argument("--knee-mean-ms", type=float_range(0, 10000, "ms"), help="mean latency measured at that knee "
                    "(the ladder's rung), for the mean and sqrt rules")
    lm.add_argument("--limit-rule", choices=LIMIT_RULES, help="p99: knee x SLO p99; mean: knee x the mean latency "
                    "at the knee (L); sqrt: L + 2 x sqrt(L) (default: the rule in force)")
    inst = sub.add_parser("instances", help="add or remove instances", description="add or remove instances")
    isub = inst.add_subparsers(dest="action", required=True, metavar="ACTION")
    ia = isub.add_parser("add", help="start a new instance", description="start a new instance")
    ia.add_argument("--role", default="standby", choices=("standby", "primary", "active"))
    ir = isub.add_parser("remove", help="stop and remove an instance", description="stop and remove an instance")
    ir.add_argument("id", type=instance_id)
    for sp, method in ((ia, "AddInstance"), (ir, "RemoveInstance")):
        add_output_flags(sp)
        add_dry_run(sp)
        sp.set_defaults(fn=_instance_call(method))
    vs = add("versions", cmd_versions, "versions of a model with their manifest check")
    vs.add_argument("model", type=model_name)
    sn = add("snapshot", cmd_snapshot, "back up the model repository (content-addressed)", changes=True)
    sn.add_argument("--note", default="")
    sns = add("snapshots", cmd_snapshots, "list local snapshots and the policy's verified backups")
    _target_options(sns)
    re_ = add("restore", cmd_restore, "restore the model repository from a snapshot, or rebuild a runtime root "
              "and repository from a backup target (--from; no control plane needed)", changes=True)
    re_.add_argument("id", nargs="?", type=nonempty("a snapshot id"), help="snapshot id (through the control plane)")
    _target_options(re_)
    re_.add_argument("--id", dest="backup_id", type=nonempty("a backup id"),
                     help="backup id at the target (default: the newest verified)")
    re_.add_argument("--root", dest="restore_root", help="new runtime root (must not hold a state.db)")
    re_.add_argument("--repository", help="model repository to rebuild")
    bk = add("backup", cmd_backup, "backup policy: show it, back up now (--dry-run), list backups (also straight "
             "from a target)", changes=True)
    bk.add_argument("action", choices=("policy", "now", "list"))
    bk.add_argument("--check", metavar="FILE", help="policy: validate a policy file offline")
    bk.add_argument("--note", default="", help="now: a note kept with the backup")
    _target_options(bk)
    from recserve.control.api.spec_cli import add_commands as add_spec_commands

    add_spec_commands(add)
    from recserve.control.kube.ctl import add_parser as add_k8s

    add_k8s(sub)
    comp = sub.add_parser("completion", help="print a bash or zsh completion script (no -o: it prints a script)",
                          description="print a completion script: source <(recctl completion bash)")
    comp.add_argument("shell", choices=("bash", "zsh"))
    comp.set_defaults(fn=cmd_completion)
    return p


def _page_file(text: str) -> Path:
    """A file to write: its folder exists and it is not a folder itself (told at parse time, naming the flag)."""
    p = Path(text).expanduser()
    if not text.strip() or p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file to write")
    if not p.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: no such directory {str(p.parent)!r}")
    return p


_page_file.__name__ = "a file to write"


def _target_options(p: argparse.ArgumentParser) -> None:
    """``--from TARGET`` (checked at parse time) and ``--endpoint-url``."""

    def target(text: str) -> str:
        from recserve.control.backup.targets import TargetError, parse_target

        try:
            parse_target(text, None)
        except TargetError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    target.__name__ = "backup target"
    p.add_argument("--from", dest="source", metavar="TARGET", type=target, help="a backup target: DIR or "
                   "s3://BUCKET/PREFIX (read directly; no control plane needed)")
    p.add_argument("--endpoint-url", default=None,
                   help=f"S3-compatible endpoint (default ${backup_cli.ENDPOINT_ENV})")


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (control/api/cli_output.py's table), never raises for a known error."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else (OK if exc.code is None else USAGE)
    out = Output(getattr(args, "output", "table"))
    args.out = out
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        out.error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 (classify maps every error to its exit code, in one place)
        if os.environ.get("RECCTL_TRACEBACK"):
            raise
        code, message = classify(exc, _control(args) if hasattr(args, "control") else "the control plane")
        prefix = "k8s: " if args.command == "k8s" else ""
        out.error(prefix + message)
        return code


if __name__ == "__main__":
    sys.exit(main())
