"""The drills' view of a running fleet, through the control plane's public gRPC API only.

Why an adapter: drills must not reach into the control plane's internals (they test it), and the same
few questions recur in every fault: who is primary and with which pid, what does the control plane say
happened since a moment (detection), which versions are desired and which does each instance really
serve (checked against each Triton's own model-ready endpoint, not only the control plane's word).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from recserve.control.defaults import DEFAULT_ROOT, REPO_ROOT

#: The runtime root of `make fleet-up` (recctl and the control plane honour RECSERVE_ROOT the same way).
RUNTIME = Path(os.environ.get("RECSERVE_ROOT", DEFAULT_ROOT))


class FleetError(RuntimeError):
    """No fleet reachable, or a control-plane call failed (the message quotes it; ``code`` is its gRPC status
    name, empty when no call failed)."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code

    @classmethod
    def from_rpc(cls, method: str, exc) -> FleetError:
        """A failed control-plane call, with the status the control plane answered."""
        return cls(f"control plane {method}: {exc.code().name}: {exc.details()}", exc.code().name)


def _stubs():
    try:
        from recserve.control.api.proto import control_pb2, control_pb2_grpc
    except ImportError as exc:  # generated at build time
        raise FleetError("control/api/proto/*_pb2.py missing: run 'make setup' (it generates them)") from exc
    return control_pb2, control_pb2_grpc


def _to_dict(msg) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True, including_default_value_fields=True)


@dataclass
class Instance:
    id: str
    role: str
    state: str
    pid: int
    grpc_port: int
    http_port: int
    models: dict[str, list[int]]
    #: Python backend IPC regions this instance holds in /dev/shm (``recctl status``)
    shm_regions: int = 0
    metrics_port: int = 0

    @classmethod
    def from_status(cls, d: dict) -> Instance:
        models = {m: sorted(int(v) for v in (vs.get("versions") or [])) for m, vs in (d.get("models") or {}).items()}
        return cls(d["id"], d.get("role", ""), d.get("state", ""), int(d.get("pid") or 0),
                   int(d.get("grpc_port") or 0), int(d.get("http_port") or 0), models, int(d.get("shm_regions") or 0),
                   int(d.get("metrics_port") or 0))


class FleetAPI:
    """A control plane at ``control`` (host:port); ``token`` for mutating calls."""

    def __init__(self, control: str, token: str | None = None, timeout_s: float = 5.0):
        import grpc

        pb, pbg = _stubs()
        self.pb, self.control, self.token, self.timeout_s = pb, control, token, timeout_s
        self._channel = grpc.insecure_channel(control)
        self.stub = pbg.ControlPlaneStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _meta(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def call(self, method: str, request, timeout_s: float | None = None):
        import grpc

        try:
            return getattr(self.stub, method)(request, metadata=self._meta(), timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            raise FleetError.from_rpc(method, exc) from exc

    # ------------------------------------------------------------------ reading
    def status(self, events: int = 100) -> dict:
        return _to_dict(self.call("GetStatus", self.pb.GetStatusRequest(events=events)))

    def reachable(self) -> bool:
        try:
            self.status(events=1)
            return True
        except FleetError:
            return False

    def instances(self, status: dict | None = None) -> list[Instance]:
        return [Instance.from_status(d) for d in (status or self.status()).get("instances", [])]

    def instance(self, role: str) -> Instance:
        found = [i for i in self.instances() if i.role == role]
        if not found:
            raise FleetError(f"no {role} instance in the fleet (status: {[(i.id, i.role) for i in self.instances()]})")
        return found[0]

    def desired(self, status: dict | None = None) -> dict[str, list[int]]:
        d = (status or self.status()).get("desired") or {}
        return {m: sorted(int(v) for v in (vs.get("versions") or [])) for m, vs in d.items()}

    def events_since(self, t: float, instance: str | None = None) -> list[dict]:
        evs = [e for e in self.status(events=200).get("events", []) if float(e.get("ts_unix", 0)) >= t]
        if instance is not None:
            evs = [e for e in evs if e.get("instance") == instance]
        return sorted(evs, key=lambda e: float(e["ts_unix"]))

    def endpoint(self, name: str = "grpc") -> str:
        return self.status(events=1)["endpoints"][name]

    def list_versions(self, model: str) -> list[dict]:
        return _to_dict(self.call("ListVersions", self.pb.ListVersionsRequest(model=model))).get("versions", [])

    def rollout(self, model: str) -> dict:
        return _to_dict(self.call("GetRollout", self.pb.GetRolloutRequest(model=model)))

    # ------------------------------------------------------------------ mutating
    def scale(self, active: int, timeout_s: float = 300.0) -> dict:
        """``recctl scale --active N``: scale-out returns once the new actives serve, scale-in once drained."""
        return _to_dict(self.call("Scale", self.pb.ScaleRequest(active=active), timeout_s=timeout_s))

    def set_knee(self, knee_rps: float, knee_mean_ms: float | None = None, limit_rule: str = "") -> dict:
        """``recctl limits --knee-rps [--knee-mean-ms] [--limit-rule]``: the fleet's in-flight limits follow this
        knee at once (``limit_rule`` "": the rule in force)."""
        return _to_dict(self.call("SetKnee", self.pb.SetKneeRequest(knee_rps=knee_rps, knee_mean_ms=knee_mean_ms or 0.0,
                                                                    limit_rule=limit_rule)))

    def rollover(self, model: str, version: int, strategy: str, steps: list[int], bake_s: float,
                 timeout_s: float = 300.0) -> list[dict]:
        """Stream a rollover to its end; returns every progress event (a broken stream raises)."""
        req = self.pb.RolloverRequest(model=model, version=version, strategy=strategy, steps=steps,
                                      bake_seconds=bake_s)
        import grpc

        events = []
        try:
            for ev in self.stub.Rollover(req, metadata=self._meta(), timeout=timeout_s):
                events.append(_to_dict(ev))
        except grpc.RpcError as exc:
            raise FleetError.from_rpc("Rollover", exc) from exc
        return events

    def rollback(self, model: str) -> dict:
        return _to_dict(self.call("Rollback", self.pb.RollbackRequest(model=model), timeout_s=120))

    def snapshot(self, note: str) -> dict:
        return _to_dict(self.call("CreateSnapshot", self.pb.CreateSnapshotRequest(note=note), timeout_s=120))

    def restore(self, snapshot_id: str) -> dict:
        return _to_dict(self.call("RestoreSnapshot", self.pb.RestoreSnapshotRequest(id=snapshot_id), timeout_s=120))

    # ------------------------------------------------------------------ checks that do not trust the control plane
    def wait(self, what: str, predicate, timeout_s: float, interval_s: float = 0.2) -> float | None:
        """Seconds until ``predicate()`` held (errors count as not yet), or None after ``timeout_s``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            try:
                if predicate():
                    return time.monotonic() - start
            except (FleetError, OSError):
                pass
            time.sleep(interval_s)
        return None

    def versions_consistent(self, repository: Path | None = None) -> tuple[bool, str]:
        """Every instance serves exactly the desired versions, asked of each Triton itself (RPO 0)."""
        status = self.status(events=1)
        desired = self.desired(status)
        problems = []
        for inst in self.instances(status):
            if inst.state != "healthy":
                problems.append(f"{inst.id}: {inst.state}, not back with the desired versions")
                continue
            for model, versions in desired.items():
                for v in versions:
                    if not triton_model_ready(inst.http_port, model, v):
                        problems.append(f"{inst.id}: {model} v{v} not ready")
                if inst.models.get(model) and sorted(inst.models[model]) != versions:
                    problems.append(f"{inst.id}: {model} serves {inst.models[model]}, desired {versions}")
                if repository is not None:
                    for other in _versions_on_disk(repository, model):
                        if other not in versions and triton_model_ready(inst.http_port, model, other):
                            problems.append(f"{inst.id}: {model} v{other} ready but not desired")
        if not desired:
            problems.append("control plane reports no desired versions")
        if not status.get("instances"):
            problems.append("no instances")
        return not problems, "; ".join(problems) or f"{len(status['instances'])} instances on {desired}"


def _versions_on_disk(repository: Path, model: str) -> list[int]:
    d = Path(repository) / model
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def triton_model_ready(http_port: int, model: str, version: int | None = None, timeout_s: float = 1.0) -> bool:
    """Triton's own model-ready endpoint (not part of the locked repository API)."""
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/ready"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def read_token(runtime: Path = RUNTIME) -> str | None:
    for name in ("token", "control.token", "admin.token"):
        p = runtime / name
        if p.exists():
            return p.read_text().strip()
    return None


def read_stats_key(runtime: Path = RUNTIME) -> str | None:
    """The fleet's Triton statistics key: HAProxy's front door (and each instance) lets perf_analyzer's statistics
    calls through with it, and it opens nothing else. The admin keys are per instance and stay with the control
    plane."""
    p = runtime / "stats.key"
    return p.read_text().strip() if p.exists() else None


def recctl_status(timeout_s: float = 20.0) -> dict | None:
    """``recctl status --json`` (the documented way to find a running fleet); None when none answers."""
    try:
        p = subprocess.run([sys.executable, "-m", "recserve.control.recctl", "status", "--json"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return None
    if p.returncode != 0:
        return None
    try:
        return json.loads(p.stdout)
    except ValueError:
        return None
