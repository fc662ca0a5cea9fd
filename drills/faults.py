"""Faults: each one an action that injects it and a rollback that always undoes it (idempotent).

How each fault is made (written into the report, so nobody mistakes a simulation for the real thing):
- gpu-xid-crash: SIGKILL of the tritonserver process of the instance (what a fatal Xid does to it);
- gpu-hang: SIGSTOP of that process for the window, then SIGCONT (or SIGKILL);
- gpu-lost: the drill fault switch of recserve's own onnxruntime backend (a file per model saying
  "fail" or "wrong" in that instance's RECSERVE_FAULT_DIR; off unless a drill sets it). The process
  stays alive and Triton keeps saying ready: only deep health (a golden inference) can see it;
- overload: the probe's own open-loop rate ramps to factor x capacity_rps (see runner);
- rollover-under-load / bad-rollover / artifact-corruption / control-plane-crash: through the control
  plane's gRPC API, on model versions the drill creates (a byte-identical re-release, or a copy whose
  graph negates its scores) and removes again afterwards;
- network-partition: needs an instance inside a network namespace; see NetworkPartition.check.
- security-attacks: drills/attacks.py's catalogue (the same functions tests/test_front_door.py runs) against the
  fleet's HAProxy client ports and control API, while the probe keeps sending legitimate requests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from recserve.drills.figures import DrillFigures
from recserve.drills.fleet import FleetAPI, FleetError
from recserve.drills.journal import Journal
from recserve.drills.lost_host import LostHost
from recserve.drills.spec import Action, DrillSpec

FAULT_DIR_ENV = "RECSERVE_FAULT_DIR"
#: Longest wait for a shedding pool before a rollover drill gives up (the control plane refuses to start then).
SHED_WAIT_S = 10.0

T = TypeVar("T")


@dataclass
class Context:
    """What a fault may touch: the fleet (through its API), its repository, a scratch dir, the journal; where it
    writes what it measured (``figures``, drills/figures.py) and keeps its own scratch (``state``)."""

    fleet: FleetAPI
    spec: DrillSpec
    journal: Journal
    repository: Path
    workdir: Path
    control: Any = None  # drills.session.ControlPlaneProcess when the drill owns the control plane
    capacity_rps: float | None = None
    #: what the drill measured: faults write their figures here, the runner adds its own
    figures: DrillFigures = field(default_factory=DrillFigures)
    created_versions: list[tuple[str, int]] = field(default_factory=list)
    #: the serving spec (control/spec) when the drills guard a user's repository; None for the demo
    serving: Any = None
    #: the versions desired before the drill (set by the runner, else by the first rollover-type fault),
    #: restored afterwards (``restore_desired``)
    desired_before: dict[str, list[int]] | None = None
    #: the instance a process fault was injected into: the runner times its detection from the control plane's
    #: events for it
    target: str | None = None
    #: wall-clock start of a fault that prepares first (lost-host): the fault window starts there, not at the
    #: method action's start
    fault_started_at: float | None = None
    #: overload: instance id -> pid when the overload began (the runner's ``instances_alive`` compares after)
    pids_before: dict[str, int] | None = None
    #: each fault's private scratch, by its state class (``state``)
    scratch: dict[type, Any] = field(default_factory=dict)

    def state(self, kind: type[T]) -> T:
        """A fault's private scratch for this drill (the pid it signalled, the files it wrote, its namespace):
        one ``kind()`` per drill, made on first use; never a figure and never in the journal."""
        return self.scratch.setdefault(kind, kind())


class Fault:
    name = ""
    simulation = ""
    rollback_label = ""  # what ``rollback`` does, as the journal names it

    def check(self, ctx: Context) -> str | None:
        """Why this fault cannot run here (the drill is then skipped with that line), or None."""
        return None

    def inject(self, ctx: Context, action: Action) -> dict:
        raise NotImplementedError

    def end(self, ctx: Context, action: Action) -> dict:
        """End of a windowed fault (the method's own step, not the safety-net rollback)."""
        return {}

    def rollback(self, ctx: Context) -> dict:
        return {}

    def prepare(self, ctx: Context) -> str | None:
        """Set up what the fault needs before the probe starts; may return the client endpoint to load."""
        return None

    def teardown(self, ctx: Context) -> None:
        """Remove what ``prepare`` made (always runs)."""


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def process_state(pid: int) -> str:
    """'R', 'S', 'T' (stopped), ... from /proc; '' when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (from /proc; the group outlives a killed leader)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def fault_dir_of(pid: int) -> Path | None:
    """The instance's fault-switch directory, read from its own environment (no guessing of layouts)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(FAULT_DIR_ENV.encode() + b"="):
            return Path(item.split(b"=", 1)[1].decode())
    return None


# ---------------------------------------------------------------------- process faults
@dataclass
class CrashState:
    """gpu-xid-crash: the killed server (its pid is its process group's id) and the fleet's shm regions before."""

    killed_pid: int | None = None
    shm_regions_before: int | None = None


class Crash(Fault):
    name = "gpu-xid-crash"
    rollback_label = "restart-killed"
    simulation = "SIGKILL of the instance's tritonserver process (a fatal Xid kills the process holding the GPU)"

    def inject(self, ctx: Context, action: Action) -> dict:
        inst = ctx.fleet.instance(action.params["target"])
        st = ctx.state(CrashState)
        ctx.target, st.killed_pid = inst.id, inst.pid
        st.shm_regions_before = sum(i.shm_regions for i in ctx.fleet.instances())
        _signal(inst.pid, signal.SIGKILL)
        return {"instance": inst.id, "pid": inst.pid, "signal": "SIGKILL"}

    def rollback(self, ctx: Context) -> dict:
        """The control plane restarts what was killed; the drill waits for it, it never restarts behind its back."""
        iid, st = ctx.target, ctx.state(CrashState)
        if not iid:
            return {}
        waited = ctx.fleet.wait("instance back", lambda: any(
            i.id == iid and i.state == "healthy" for i in ctx.fleet.instances()), timeout_s=120)
        ctx.figures.instance_back_s = waited
        # The control plane reaps the killed server's process group (its Python backend stubs) when it restarts
        # the instance. A stub still alive now is an orphan it missed: counted for the crash drill's
        # orphaned_stubs_max expectation, then removed so the drill leaves nothing behind.
        pgid = st.killed_pid
        orphans = group_members(pgid) if pgid else []
        for pid in orphans:
            _signal(pid, signal.SIGKILL)
        ctx.figures.orphaned_stubs = len(orphans)
        # A SIGKILLed server leaves its stubs' /dev/shm regions; the control plane removes exactly that
        # instance's when it replaces it, so the fleet holds as many regions after recovery as before.
        after = sum(i.shm_regions for i in ctx.fleet.instances())
        before = st.shm_regions_before
        ctx.figures.shm_growth = after - (after if before is None else before)
        return {"instance": iid, "back_healthy_after_s": waited, "orphaned_stubs_killed": orphans,
                "shm_regions": {"before": before, "after": after}}


@dataclass
class HangState:
    """gpu-hang: the stopped server's pid."""

    stopped_pid: int | None = None


class Hang(Fault):
    name = "gpu-hang"
    rollback_label = "sigcont"
    simulation = "SIGSTOP of the instance's tritonserver process for the window (a hung kernel), then SIGCONT/SIGKILL"

    def inject(self, ctx: Context, action: Action) -> dict:
        inst = ctx.fleet.instance(action.params["target"])
        ctx.target, ctx.state(HangState).stopped_pid = inst.id, inst.pid
        _signal(inst.pid, signal.SIGSTOP)
        return {"instance": inst.id, "pid": inst.pid, "signal": "SIGSTOP", "state": process_state(inst.pid)}

    def end(self, ctx: Context, action: Action) -> dict:
        pid = ctx.state(HangState).stopped_pid
        sig = signal.SIGKILL if action.params["then"] == "kill" else signal.SIGCONT
        delivered = bool(pid) and _signal(pid, sig)
        return {"pid": pid, "signal": sig.name, "delivered": delivered}

    def rollback(self, ctx: Context) -> dict:
        pid = ctx.state(HangState).stopped_pid
        if pid and process_state(pid) == "T":
            _signal(pid, signal.SIGCONT)
            return {"pid": pid, "signal": "SIGCONT", "was_stopped": True}
        return {"pid": pid, "was_stopped": False}


@dataclass
class GpuLostState:
    """gpu-lost: the fault-switch files written (removed by ``end`` and ``rollback``)."""

    fault_files: list[str] = field(default_factory=list)


class GpuLost(Fault):
    name = "gpu-lost"
    rollback_label = "clear-fault-switch"
    simulation = ("drill fault switch in recserve's onnxruntime backend: a file per GPU model in the instance's "
                  "RECSERVE_FAULT_DIR makes those models fail (or answer wrongly) on every request while the "
                  "process stays alive and Triton stays ready")

    def check(self, ctx: Context) -> str | None:
        try:
            inst = ctx.fleet.instance("primary")
        except FleetError as exc:
            return str(exc)
        if fault_dir_of(inst.pid) is None:
            return f"instance {inst.id} was started without {FAULT_DIR_ENV}: the fleet has no fault switch"
        return None

    def inject(self, ctx: Context, action: Action) -> dict:
        inst = ctx.fleet.instance(action.params["target"])
        d = fault_dir_of(inst.pid)
        if d is None:
            raise FleetError(f"{inst.id} has no {FAULT_DIR_ENV}")
        d.mkdir(parents=True, exist_ok=True)
        written = []
        for model in action.params["models"]:
            (d / model).write_text(action.params["mode"])
            written.append(str(d / model))
        ctx.target, ctx.state(GpuLostState).fault_files = inst.id, written
        return {"instance": inst.id, "pid": inst.pid, "files": written, "mode": action.params["mode"]}

    def end(self, ctx: Context, action: Action) -> dict:
        return self.rollback(ctx)

    def rollback(self, ctx: Context) -> dict:
        removed = []
        for f in ctx.state(GpuLostState).fault_files:
            if Path(f).exists():
                Path(f).unlink()
                removed.append(f)
        return {"removed": removed}


class Overload(Fault):
    name = "overload"
    rollback_label = "stop-load"
    simulation = "the probe's open-loop request rate ramps to factor x capacity_rps (error-tolerant client)"

    def inject(self, ctx: Context, action: Action) -> dict:
        ctx.pids_before = {i.id: i.pid for i in ctx.fleet.instances()}
        peak = action.params["factor"] * (ctx.capacity_rps or 0)
        return {"peak_rps": peak, "capacity_rps": ctx.capacity_rps, "factor": action.params["factor"]}

    def end(self, ctx: Context, action: Action) -> dict:
        return {"ramp": "ended"}


# ---------------------------------------------------------------------- versions the drills create
def _next_version(repository: Path, model: str) -> int:
    d = repository / model
    nums = [int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(nums, default=0) + 1


def release_copy(ctx: Context, model: str, wrong: bool = False) -> int:
    """A new version of ``model``: a byte-identical re-release of the desired one, or (``wrong``) the same
    graph with its float outputs negated, so rankings come out reversed. Its manifest is written fresh."""
    from recserve.control.state.snapshots import write_manifest

    src_v = max(ctx.fleet.desired()[model])
    new_v = _next_version(ctx.repository, model)
    src, dst = ctx.repository / model / str(src_v), ctx.repository / model / str(new_v)
    shutil.copytree(src, dst)
    ctx.created_versions.append((model, new_v))
    (dst / "manifest.json").unlink(missing_ok=True)
    if wrong:
        _negate_outputs(dst / "model.onnx")
    kind = "negated-score copy" if wrong else "re-release"
    write_manifest(dst, {"built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "note": f"drill {ctx.spec.name}: {kind} of v{src_v}"})
    return new_v


def _negate_outputs(path: Path) -> None:
    import onnx
    from onnx import helper

    m = onnx.load(str(path))
    g = m.graph
    for out in g.output:
        if out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            continue
        inner = out.name + "__drill_orig"
        for node in g.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
        g.node.append(helper.make_node("Neg", [inner], [out.name], name=out.name + "__drill_neg"))
    onnx.save(m, str(path))


def remove_created(ctx: Context) -> list[str]:
    """Delete versions this drill created, only once nothing desires or serves them."""
    removed = []
    try:
        desired = ctx.fleet.desired()
        served = [i.models for i in ctx.fleet.instances()]
    except FleetError:
        return removed
    for model, v in list(ctx.created_versions):
        if v in desired.get(model, []) or any(v in m.get(model, []) for m in served):
            continue
        shutil.rmtree(ctx.repository / model / str(v), ignore_errors=True)
        ctx.created_versions.remove((model, v))
        removed.append(f"{model}/{v}")
    return removed


def _remember_desired(ctx: Context) -> None:
    """The versions desired before this fault, unless the runner already recorded the drill's."""
    if ctx.desired_before is None:
        ctx.desired_before = ctx.fleet.desired()


def restore_desired(ctx: Context, model: str) -> dict:
    """Return ``model`` to the version desired before the drill (the control plane's Rollback)."""
    before = (ctx.desired_before or {}).get(model)
    now = ctx.fleet.desired().get(model)
    out: dict[str, Any] = {"model": model, "before": before, "now": now}
    if before and now != before:
        out["rollback"] = ctx.fleet.rollback(model).get("status")
        out["after"] = ctx.fleet.desired().get(model)
    out["removed_versions"] = remove_created(ctx)
    return out


# ---------------------------------------------------------------------- control-plane faults
class Rollover(Fault):
    name = "rollover-under-load"
    rollback_label = "rollback-model"
    simulation = "canary rollover through the control plane's Rollover API to a byte-identical re-release"

    def inject(self, ctx: Context, action: Action) -> dict:
        p = action.params
        _remember_desired(ctx)
        version = release_copy(ctx, p["model"]) if p["version"] == "latest" else int(p["version"])
        t = attempt = time.monotonic()
        while True:  # the control plane refuses to start a rollout while the pool sheds: wait for the peak to pass
            try:
                events = ctx.fleet.rollover(p["model"], version, p["strategy"], p["steps"], p["bake_s"])
                break
            except FleetError as exc:
                if exc.code != "UNAVAILABLE" or time.monotonic() - t > SHED_WAIT_S:
                    raise
                time.sleep(0.5)
                attempt = time.monotonic()
        final = events[-1] if events else {}
        ctx.figures.rollout_status = final.get("status")
        ctx.figures.rollout_succeeded = final.get("status") == "succeeded"  # rolled back by a gate: not a pass
        return {"model": p["model"], "version": version, "status": final.get("status"),
                "waited_for_the_pool_to_stop_shedding_s": round(attempt - t, 2),
                "events": [{k: e.get(k) for k in ("phase", "weight", "status", "ts_unix", "message")} for e in events]}

    def rollback(self, ctx: Context) -> dict:
        return restore_desired(ctx, ctx.spec.method[0].params["model"])


class BadRollover(Fault):
    name = "bad-rollover"
    rollback_label = "rollback-model"
    simulation = ("canary rollover of a version whose ONNX graph negates its scores (answers reversed: wrong), "
                  "created by the drill; the control plane's gates must roll it back")

    def inject(self, ctx: Context, action: Action) -> dict:
        """Roll the wrong version out and read the outcome from the control plane's record of THIS rollout.

        A rollover the control plane would not start (the pool sheds, another rollout runs, not ready, a broken
        stream) raises: the fault was not injected and the drill fails on ``fault_injected``. Rolled back means
        the record for this version says ``rolled_back`` with the gate that fired; the canary answered wrongly
        when asked directly (``bad_version_live``) is the proof that there was something to roll back."""
        p = action.params
        _remember_desired(ctx)
        made = {}
        if ctx.serving is not None:
            version, made = spec_bad_copy(ctx, p["model"])
        else:
            version = release_copy(ctx, p["model"], wrong=True)
        box: dict[str, Any] = {}

        def roll() -> None:
            try:
                box["events"] = ctx.fleet.rollover(p["model"], version, "canary", p["steps"], p["bake_s"])
            except FleetError as exc:
                box["error"] = exc

        t = threading.Thread(target=roll, daemon=True)
        t.start()
        canary = _watch_canary(ctx, t)
        t.join(5)
        if "error" in box:
            raise box["error"]
        events = box.get("events") or []
        rollout = ctx.fleet.rollout(p["model"])
        this = int(rollout.get("to_version") or 0) == version
        gate = rollout.get("failed_gate")
        ctx.figures.rolled_back = this and rollout.get("status") == "rolled_back" and bool(gate)
        ctx.figures.failed_gate = rollout.get("failed_gate") if this else None
        ctx.figures.canary_direct = canary
        ctx.figures.bad_version_live = canary["differs"] > 0
        return {"model": p["model"], "version": version, "canary_direct": canary, **made,
                "rollout": {k: rollout.get(k) for k in ("id", "to_version", "status", "failed_gate", "failed_value",
                                                         "threshold", "canary")},
                "events": [{k: e.get(k) for k in ("phase", "weight", "status", "ts_unix", "message")} for e in events]}

    def rollback(self, ctx: Context) -> dict:
        return restore_desired(ctx, ctx.spec.method[0].params["model"])


def spec_bad_copy(ctx: Context, model: str) -> tuple[int, dict]:
    """A serving spec's bad version: a wrong copy of the desired version of ONNX step ``model`` that the spec's
    own gates must roll back (drills/bad_version.py); registered as a version this drill created."""
    from recserve.drills.bad_version import write_bad_version

    desired = ctx.fleet.desired()
    src_v, new_v = max(desired[model]), _next_version(ctx.repository, model)
    ctx.created_versions.append((model, new_v))
    made = write_bad_version(ctx.serving, model, src_v, new_v, desired, note=f"drill {ctx.spec.name}")
    return new_v, {"bad_version": made}


def _ask_spec(ctx: Context, port: int) -> dict:
    """The first golden request of every target model of a serving spec, asked of one instance directly."""
    from recserve.control.client import RecClient
    from recserve.drills.serving import ask

    with RecClient(f"127.0.0.1:{port}", timeout_s=2.0, retry_policy=None) as c:
        return {m: ask(c, ctx.serving, m) for m in ctx.spec.targets}


def _spec_differs(ctx: Context, got: dict, baseline: dict) -> bool:
    from recserve.drills.serving import differs

    return any(differs(ctx.serving, m, got[m], baseline[m]) for m in baseline)


def _watch_canary(ctx: Context, rollout: threading.Thread, timeout_s: float = 180.0) -> dict:
    """While the rollout runs, ask the canary instance directly (not through HAProxy) for the golden
    recommendation (a serving spec's: the first golden request of each target model, compared by the spec's
    rules): proof that the bad version really was live, independent of what clients happened to see."""
    from recserve.control.client import RecClient
    from recserve.drills.probe import golden_cases

    case = next(c for c in golden_cases() if c.model == "recommend") if ctx.serving is None else None
    baseline = None
    seen = {"asked": 0, "differs": 0, "errors": 0, "canary": None}
    deadline = time.monotonic() + timeout_s
    while rollout.is_alive() and time.monotonic() < deadline:
        try:
            insts = ctx.fleet.instances()
        except FleetError:
            time.sleep(0.2)
            continue
        if baseline is None:
            prim = next((i for i in insts if i.role == "primary"), None)
            if prim and ctx.serving is not None:
                baseline = _ask_spec(ctx, prim.grpc_port)
            elif prim:
                with RecClient(f"127.0.0.1:{prim.grpc_port}", timeout_s=2.0) as c:
                    baseline = c.recommend(case.user_id or 0, list(case.history)).item_ids
        can = next((i for i in insts if i.role == "canary" and i.state == "healthy"), None)
        if can and baseline is not None:
            seen["canary"] = can.id
            try:
                if ctx.serving is not None:
                    differs = _spec_differs(ctx, _ask_spec(ctx, can.grpc_port), baseline)
                else:
                    with RecClient(f"127.0.0.1:{can.grpc_port}", timeout_s=2.0) as c:
                        differs = c.recommend(case.user_id or 0, list(case.history)).item_ids != baseline
                seen["asked"] += 1
                seen["differs"] += differs
            except Exception:
                seen["errors"] += 1
        time.sleep(0.2)
    return seen


class ArtifactCorruption(Fault):
    name = "artifact-corruption"
    rollback_label = "restore-snapshot"
    simulation = ("a re-release of the model is snapshotted, then bytes of its model file are flipped on disk; "
                  "the rollover to it must be refused by the sha256 check and RestoreSnapshot must repair it")

    def inject(self, ctx: Context, action: Action) -> dict:
        p = action.params
        _remember_desired(ctx)
        version = release_copy(ctx, p["model"])
        snap = ctx.fleet.snapshot(f"drill {ctx.spec.name}")
        target = ctx.repository / p["model"] / str(version) / "model.onnx"
        data = bytearray(target.read_bytes())
        mid = len(data) // 2
        for k in range(min(p["flip_bytes"], len(data) - mid)):
            data[mid + k] ^= 0xFF
        target.write_bytes(bytes(data))
        refused, why = False, ""
        try:
            events = ctx.fleet.rollover(p["model"], version, "canary", [100], 1.0)
            why = f"rollover ran: {events[-1].get('status') if events else 'no events'}"
            refused = bool(events) and events[-1].get("status") in ("failed", "rolled_back")
        except FleetError as exc:
            refused, why = "sha256" in str(exc).lower() or "verif" in str(exc).lower(), str(exc)
        restore = ctx.fleet.restore(snap["id"])
        verified = [v for v in ctx.fleet.list_versions(p["model"]) if int(v["version"]) == version]
        ok_now = bool(verified) and bool(verified[0].get("verified"))
        ctx.figures.repaired = refused and ok_now and any(str(target.name) in r for r in restore.get("repaired", []))
        return {"model": p["model"], "version": version, "snapshot": snap.get("id"), "refused": refused,
                "refusal": why[:300], "restore": restore, "verified_after_restore": ok_now}

    def rollback(self, ctx: Context) -> dict:
        return restore_desired(ctx, ctx.spec.method[0].params["model"])


class ControlPlaneCrash(Fault):
    name = "control-plane-crash"
    rollback_label = "restart-control-plane"
    simulation = ("SIGKILL of the control-plane process in the middle of a canary rollover (to a re-release), "
                  "then a restart that must adopt the data path and finish or roll back the rollout")

    def check(self, ctx: Context) -> str | None:
        if ctx.control is None:
            return ("the control plane's runtime root is unknown (--control given): it cannot be killed and "
                    "restarted the way recctl up starts it")
        return None

    def inject(self, ctx: Context, action: Action) -> dict:
        p = action.params
        _remember_desired(ctx)
        version = release_copy(ctx, p["model"])
        box: dict[str, Any] = {}

        def roll() -> None:
            try:
                box["events"] = ctx.fleet.rollover(p["model"], version, "canary", [50, 100], 3.0)
            except FleetError as exc:
                box["error"] = str(exc)

        t = threading.Thread(target=roll, daemon=True)
        t.start()
        time.sleep(p["kill_after_s"])
        killed_pid = ctx.control.kill()
        t.join(10)
        time.sleep(p["restart_after_s"])
        ctx.control.start()
        ctx.fleet.wait("rollout settled", lambda: ctx.fleet.rollout(p["model"]).get("status") not in ("running", ""),
                       timeout_s=120)
        rollout = ctx.fleet.rollout(p["model"])
        return {"model": p["model"], "version": version, "killed_pid": killed_pid,
                "stream": box.get("error", "completed before the kill"), "rollout_after_restart": rollout.get("status")}

    def rollback(self, ctx: Context) -> dict:
        out = {}
        if ctx.control is not None and not ctx.control.alive():
            ctx.control.start()
            out["restarted"] = True
        out.update(restore_desired(ctx, ctx.spec.method[0].params["model"]))
        return out


@dataclass
class PartitionState:
    """network-partition: the drill's own data path (drills/partition.py ``PartitionedPath``) and when it was cut."""

    path: Any = None
    cut_at: float | None = None


class NetworkPartition(Fault):
    name = "network-partition"
    rollback_label = "restore-links"
    simulation = ("the drill's own data path (drills/partition.py): the primary tritonserver inside a network "
                  "namespace reached over a veth pair, a standby on loopback, HAProxy with the fleet's check and "
                  "retry settings; the partition is 'ip link set <veth> down' inside the namespace (no tc netem "
                  "or iptables here); the control plane cannot place instances in namespaces, so it is not involved")

    def check(self, ctx: Context) -> str | None:
        probe = f"rsdchk{os.getpid() % 100000}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            return f"network namespaces cannot be made here ({made.stderr.strip() or 'ip netns add failed'})"
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
        return None

    def prepare(self, ctx: Context) -> str | None:
        from recserve.drills.partition import PartitionedPath

        path = PartitionedPath(ctx.repository, ctx.workdir / "partition")
        ctx.state(PartitionState).path = path
        path.start()
        return path.url

    def inject(self, ctx: Context, action: Action) -> dict:
        st = ctx.state(PartitionState)
        path = st.path
        t = time.time()
        path.watch("inside", "DOWN", t, action.duration_s + 10)
        path.cut()
        st.cut_at = t
        return {"netns": path.netns, "link": path.ns_if, "state": "down",
                "haproxy_status": path.server_status("inside")}

    def end(self, ctx: Context, action: Action) -> dict:
        st = ctx.state(PartitionState)
        path = st.path
        t = time.time()
        watcher = path.watch("inside", "UP", t, 15)
        restored = path.restore()
        watcher.join(15)
        up = path.seen.get("UP")
        down = path.seen.get("DOWN")
        cut = st.cut_at
        if down and cut:
            ctx.figures.detection_ms = round((down - cut) * 1000.0, 1)
        ctx.figures.rejoined_after_s = round(up - t, 3) if up else None
        return {"link": "up" if restored else "still down", "rejoined_after_s": ctx.figures.rejoined_after_s,
                "detection_ms": ctx.figures.detection_ms}

    def rollback(self, ctx: Context) -> dict:
        path = ctx.state(PartitionState).path
        return {"link_restored": path.restore()} if path is not None else {}

    def teardown(self, ctx: Context) -> None:
        st = ctx.state(PartitionState)
        path, st.path = st.path, None
        if path is not None:
            path.close()


@dataclass
class ProxyState:
    """proxy-crash: the killed HAProxy's pid (the rollback waits for another one)."""

    pid: int | None = None


class ProxyCrash(Fault):
    name = "proxy-crash"
    rollback_label = "wait-proxy-back"
    simulation = ("SIGKILL of HAProxy (master and worker), the fleet's single data path on one host: the control "
                  "plane's supervisor starts it again with the current routing; clients with the documented retry "
                  "policy ride out the gap")

    def check(self, ctx: Context) -> str | None:
        if ctx.control is None:
            return "the fleet's runtime root is unknown (--control given): HAProxy's pid file cannot be found"
        return None

    @staticmethod
    def _pid(ctx: Context) -> int | None:
        try:
            return int((Path(ctx.control.root) / "haproxy" / "haproxy.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def inject(self, ctx: Context, action: Action) -> dict:
        pid = self._pid(ctx)
        if pid is None:
            raise FleetError("no HAProxy pid file under the fleet's runtime root")
        port = int(ctx.fleet.status(events=1)["endpoints"]["grpc"].rsplit(":", 1)[1])
        ctx.state(ProxyState).pid = pid
        t_kill = time.time()
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            _signal(pid, signal.SIGKILL)
        # The restart gap: from the kill to a new HAProxy process accepting client connections again.
        from recserve.control.runtime.procs import pid_alive, port_listening

        deadline = t_kill + 60
        while time.time() < deadline:
            new = self._pid(ctx)
            if new and new != pid and pid_alive(new) and port_listening(port):
                ctx.figures.proxy_restart_gap_s = round(time.time() - t_kill, 3)
                break
            time.sleep(0.02)
        return {"killed_pid": pid, "new_pid": self._pid(ctx), "restart_gap_s": ctx.figures.proxy_restart_gap_s}

    def rollback(self, ctx: Context) -> dict:
        """The supervisor restarts HAProxy; the drill waits for it and never starts one behind its back."""
        pid = ctx.state(ProxyState).pid
        if pid is None:
            return {}
        from recserve.control.runtime.procs import pid_alive

        waited = ctx.fleet.wait("HAProxy back", lambda: (self._pid(ctx) or pid) != pid and
                                pid_alive(self._pid(ctx) or 0), timeout_s=60)
        return {"back_after_s": waited}


@dataclass
class ScaleState:
    """scale: the pool size the drill found (the rollback returns to it)."""

    active_before: int | None = None


class Scale(Fault):
    name = "scale"
    rollback_label = "scale-back"
    simulation = ("recctl scale --active N through the control plane: scale-out starts an instance that joins "
                  "the pool only after loading the desired versions, warming up and a golden inference; scale-in "
                  "drains one (no new requests, in-flight ones finish) before stopping it")

    def inject(self, ctx: Context, action: Action) -> dict:
        st = ctx.state(ScaleState)
        if st.active_before is None:
            st.active_before = sum(1 for i in ctx.fleet.instances() if i.role in ("active", "primary"))
        t = time.monotonic()
        st = ctx.fleet.scale(action.params["active"])
        insts = st.get("instances", [])
        return {"active": action.params["active"], "took_s": round(time.monotonic() - t, 2),
                "instances": [(i.get("id"), i.get("role"), i.get("state")) for i in insts]}

    def rollback(self, ctx: Context) -> dict:
        """Back to the pool size the drill found (a no-op when the spec already scaled back)."""
        before = ctx.state(ScaleState).active_before
        if not before:
            return {}
        now = sum(1 for i in ctx.fleet.instances() if i.role in ("active", "primary"))
        if now != before:
            ctx.fleet.scale(before)
        return {"active": before}


class SecurityAttacks(Fault):
    name = "security-attacks"
    rollback_label = "none: every attack closes its own sockets and changes nothing (asserted by the drill)"
    simulation = ("the attack catalogue of drills/attacks.py (admin APIs, statistics, oversized, slow, malformed and "
                  "idle clients, a wrong bearer token) sent to the fleet's own HAProxy ports and control API")

    def inject(self, ctx: Context, action: Action) -> dict:
        from recserve.drills.attacks import Target, run_catalogue

        st = ctx.fleet.status(events=1)
        ep = st["endpoints"]
        before = {i.id: i.pid for i in ctx.fleet.instances(st)}
        target = Target(ep["grpc"].split("://")[-1], ep["http"].split("://")[-1], ctx.fleet.control)
        outcomes = run_catalogue(target, action.params["attacks"] or None)
        now = {i.id: i.pid for i in ctx.fleet.instances()}
        ctx.figures.instances_alive = before == now and all(process_state(p) for p in now.values())
        ctx.figures.attacks_refused = all(o.refused for o in outcomes)
        ctx.figures.attacks = {o.attack: {"refused": o.refused, "status": o.status, "ms": round(o.seconds * 1000, 1)}
                                  for o in outcomes}
        return {"attacks": len(outcomes), "refused": sum(o.refused for o in outcomes),
                "not_refused": [o.line() for o in outcomes if not o.refused]}


FAULTS: dict[str, Fault] = {f.name: f for f in (Crash(), Hang(), GpuLost(), Overload(), Rollover(), BadRollover(),
                                                  ArtifactCorruption(), ControlPlaneCrash(), NetworkPartition(),
                                                  ProxyCrash(), Scale(), SecurityAttacks())}
FAULTS[LostHost.name] = LostHost()  # drills/lost_host.py: the whole host lost, rebuilt from backup
