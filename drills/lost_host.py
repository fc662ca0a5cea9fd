"""The ``lost-host`` fault: a whole machine is lost and the fleet is rebuilt from its backup target alone.

Why a fleet of its own: the fault deletes a runtime root and built model versions, so it never touches the fleet
the drills were given (which may be someone's ``make fleet-up``). ``prepare`` starts a private fleet (``recctl up``
with a backup policy whose target is a separate directory: the "other volume"), on a copy of the drills'
repository holding the versions the drills' fleet serves, so the probe's right answers are the same.

``inject``, under the probe's load: a verified backup (RunBackup), then a rollover done AFTER it (the change the
RPO must show as lost; the drill's policy has after_rollover off for that reason), then the loss: SIGKILL of
the control plane, every tritonserver and HAProxy, the runtime root and the built versions deleted. Then the
rebuild exactly as an operator does it on a new machine: ``recctl restore --from TARGET --root NEW --repository
NEW`` (no control plane), ``recctl up`` there (same client ports, fresh directories), and a golden check.

Figures: RTO is the runner's client-measured one from the stop (``Context.fault_started_at``); RPO is measured: the age
of the newest verified backup at the loss (``rpo_s``) and what was lost (desired versions before the loss vs
after the rebuild, control-plane events recorded after the backup that the rebuilt state does not have).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recserve.control.runtime.triton import REPO_ROOT, free_port
from recserve.control.state.snapshots import MANIFEST, write_manifest
from recserve.drills.fleet import FleetAPI, FleetError, read_token

UP_TIMEOUT_S = 300.0


def _recctl(root: Path, *args: str, timeout_s: float = UP_TIMEOUT_S) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "recserve.control.recctl", "--root", str(root), *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s,
                          env=dict(os.environ))


def _built(repository: Path, model: str) -> list[int]:
    d = repository / model
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit() and (p / MANIFEST).exists())


class HostFleet:
    """A private fleet on 'the host': its runtime root, repository copy and ports (kept for the rebuild)."""

    def __init__(self, base: Path, source_repo: Path, desired: dict[str, list[int]]):
        self.base = base
        self.root = base / "host" / "runtime"
        self.repository = base / "host" / "model_repository"
        self.target = base / "offhost-volume"
        self.policy = base / "backup-policy.yaml"
        self.ports = {k: free_port() for k in ("grpc", "http", "control", "metrics")}
        shutil.copytree(source_repo, self.repository, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        for model in [p.name for p in self.repository.iterdir() if p.is_dir()]:
            top = max(desired.get(model) or [0])
            for v in _built(self.repository, model):
                if top and v > top:  # serve what the drills' fleet serves, so right answers are the same
                    shutil.rmtree(self.repository / model / str(v))
        self.policy.write_text(json.dumps({"schedule": {"every_hours": 24, "after_rollover": False},
                                           "retention": {"keep_last": 3, "daily_days": 1},
                                           "target": {"path": str(self.target)}}))

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def up(self, root: Path, repository: Path) -> None:
        p = self.ports
        r = _recctl(root, "up", "--repository", str(repository), "--grpc-port", str(p["grpc"]), "--http-port",
                    str(p["http"]), "--control-port", str(p["control"]), "--metrics-port", str(p["metrics"]),
                    "--backup-policy", str(self.policy))
        if r.returncode != 0:
            raise FleetError(f"recctl up (root {root}) failed: {(r.stdout + r.stderr)[-600:]}")

    def api(self, root: Path) -> FleetAPI:
        return FleetAPI(f"127.0.0.1:{self.ports['control']}", read_token(root), timeout_s=10.0)

    def kill_all(self) -> list[int]:
        """The host dies: SIGKILL every process of this fleet (any root under ``base``), no clean shutdown. Its
        /dev/shm (a tmpfs) dies with it: the killed servers' stub regions are removed here, while their instance
        directories still name them (the drill deletes the root next, and nothing could find them after)."""
        from recserve.drills.session import kill_owned, processes_mentioning, remove_stub_regions

        killed = kill_owned(self.base, self.base)
        for pid in processes_mentioning(self.base):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        remove_stub_regions(self.base.glob("**/instances/*"))
        return killed


def golden_answers(url: str) -> dict[str, tuple[int, ...]]:
    from recserve.control.client import RecClient
    from recserve.drills.probe import golden_cases

    out = {}
    with RecClient(url, timeout_s=5.0) as c:
        for case in golden_cases():
            res = c.recommend(case.user_id or 0, list(case.history)) if case.model == "recommend" \
                else c.search(case.query or "", case.user_id)
            out[case.model] = tuple(int(x) for x in res.item_ids)
    return out


def instance_answers(fleet: FleetAPI) -> list[dict[str, tuple[int, ...]]]:
    return [golden_answers(f"127.0.0.1:{i.grpc_port}") for i in fleet.instances()]


@dataclass
class HostState:
    """lost-host's scratch: the private fleet, the rebuilt host's directories, the golden answers before the loss."""

    host: HostFleet | None = None
    new: tuple[Path, Path] | None = None
    answers_before_loss: dict[str, tuple[int, ...]] | None = None


class LostHost:
    name = "lost-host"
    rollback_label = "nothing-to-undo"  # the drills' own fleet is never touched; the private fleets stop in teardown
    simulation = ("a private fleet with a backup policy (target: a separate directory standing for another volume) "
                  "takes a verified backup under load, then rolls a model over; then SIGKILL of its control plane, "
                  "tritonservers and HAProxy, its runtime root and built versions deleted; rebuilt by 'recctl "
                  "restore --from TARGET' into fresh directories (no control plane) and 'recctl up' on the same "
                  "client ports")

    def check(self, ctx: Any) -> str | None:
        return None

    def prepare(self, ctx: Any) -> str | None:
        base = ctx.workdir / "lost-host"
        shutil.rmtree(base, ignore_errors=True)
        host = HostFleet(base, ctx.repository, ctx.fleet.desired())
        ctx.state(HostState).host = host
        host.up(host.root, host.repository)
        return host.grpc_url

    def inject(self, ctx: Any, action: Any) -> dict:
        st = ctx.state(HostState)
        host = st.host
        if host is None:
            raise FleetError("lost-host: its private fleet was not prepared")
        model = action.params["model"]
        old = host.api(host.root)
        try:
            backup = old.call("RunBackup", old.pb.RunBackupRequest(note="drill lost-host"), timeout_s=300)
            if not backup.verified:
                raise FleetError(f"the drill's backup {backup.id} failed verification: {backup.problem}")
            new_v = self._rerelease(host.repository, model, old.desired()[model])
            rolled = self._rollover(old, model, new_v)
            desired_at_loss = old.desired()
            st.answers_before_loss = golden_answers(host.grpc_url)
            events_at_loss = old.status(events=500).get("events", [])
            rollout_at_loss = old.rollout(model).get("id")
        finally:
            old.close()
        # ------------------------------------------------------------------ the loss
        t_stop = time.time()
        ctx.fault_started_at = t_stop
        killed = host.kill_all()
        deleted = [str(host.root)]
        shutil.rmtree(host.root)
        for m in [p.name for p in host.repository.iterdir() if p.is_dir()]:
            for v in _built(host.repository, m):
                shutil.rmtree(host.repository / m / str(v))
                deleted.append(f"{m}/{v}")
        # ------------------------------------------------------------------ the rebuild, as an operator does it
        new_root, new_repo = host.base / "new-host" / "runtime", host.base / "new-host" / "model_repository"
        t0 = time.time()
        r = _recctl(new_root, "restore", "--from", str(host.target), "--root", str(new_root), "--repository",
                    str(new_repo), "--json", timeout_s=300)
        if r.returncode != 0:
            raise FleetError(f"recctl restore failed: {(r.stdout + r.stderr)[-600:]}")
        restored = json.loads(r.stdout)
        t_restored = time.time()
        host.up(new_root, new_repo)
        t_up = time.time()
        st.new = (new_root, new_repo)
        first_good = self._first_good(host.grpc_url, st.answers_before_loss, deadline_s=120)
        rebuilt = host.api(new_root)
        try:
            desired_after = rebuilt.desired()
            consistent, detail = rebuilt.versions_consistent(new_repo)
            answers_after = instance_answers(rebuilt)
            events_after = rebuilt.status(events=500).get("events", [])
            try:
                rollout_after = rebuilt.rollout(model).get("id")
            except FleetError:  # NOT_FOUND: the rebuilt state knows no rollout of the model
                rollout_after = None
        finally:
            rebuilt.close()
        fig = ctx.figures
        before = st.answers_before_loss or {}
        fig.answers_same = bool(before) and all(a == before for a in answers_after)
        fig.restored_exact = consistent and desired_after == restored["desired"] == {
            m: list(v) for m, v in backup_desired(backup).items()}
        known = {(round(float(e["ts_unix"]), 3), e["kind"], e["message"]) for e in events_after}
        lost_events = [e for e in events_at_loss if float(e["ts_unix"]) > backup.created_unix
                       and (round(float(e["ts_unix"]), 3), e["kind"], e["message"]) not in known]
        lost = {m: {"at_loss": v, "rebuilt": desired_after.get(m)} for m, v in desired_at_loss.items()
                if desired_after.get(m) != v}
        fig.rpo_s = round(t_stop - backup.created_unix, 3)
        fig.rpo_lost = {"desired_versions": lost,
                        "rollouts": [rollout_at_loss] if rollout_at_loss != rollout_after else [],
                        "events": len(lost_events),
                        "event_kinds": sorted({e["kind"] for e in lost_events})}
        fig.rebuild = {"restore_s": round(t_restored - t0, 3), "fleet_up_s": round(t_up - t_restored, 3),
                       "first_good_answer_s": None if first_good is None else round(first_good - t_stop, 3)}
        return {"backup": {"id": backup.id, "created_unix": backup.created_unix, "bytes": backup.bytes,
                           "verified": backup.verified},
                "after_backup": {"model": model, "rollover": rolled},
                "killed_pids": sorted(set(killed)), "deleted": deleted, "restored": restored,
                "rebuilt": {"desired": desired_after, "versions_consistent": consistent, "detail": detail,
                            "answers_same": fig.answers_same},
                "rpo_s": fig.rpo_s, "rpo_lost": fig.rpo_lost, "rebuild": fig.rebuild}

    def end(self, ctx: Any, action: Any) -> dict:
        return {}

    def rollback(self, ctx: Any) -> dict:
        """Nothing to undo on the drills' own fleet (it was never touched); the private fleets stop in teardown."""
        return {"drills_fleet_touched": False}

    def teardown(self, ctx: Any) -> None:
        st = ctx.state(HostState)
        host, st.host = st.host, None
        if host is None:
            return
        for root in (host.root, *(st.new or ())[:1]):
            if (root / "state.db").exists():
                _recctl(root, "down", timeout_s=120)
        host.kill_all()
        shutil.rmtree(host.base, ignore_errors=True)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _rerelease(repository: Path, model: str, desired: list[int]) -> int:
        """A byte-identical re-release of the desired version (same answers; a real change of desired state)."""
        src = repository / model / str(max(desired))
        new_v = max(_built(repository, model)) + 1
        dst = repository / model / str(new_v)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(MANIFEST, "__pycache__"))
        write_manifest(dst, {"built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "note": f"drill lost-host: re-release of v{src.name} made after the backup"})
        return new_v

    @staticmethod
    def _rollover(fleet: FleetAPI, model: str, version: int) -> dict:
        """The change made after the backup. Gates on p99 are relaxed (this drill tests the loss, not the gates:
        a shared 2-core host under probe load can trip a p99 ratio); a rollover that still does not succeed
        means the RPO cannot be measured, so the fault fails loudly."""
        import grpc

        pb = fleet.pb
        req = pb.RolloverRequest(model=model, version=version, strategy="canary", steps=[100], bake_seconds=1.0,
                                 gates=pb.Gates(max_error_rate=0.01, max_p99_ratio=50.0, min_p99_ms=2000.0))
        try:
            events = list(fleet.stub.Rollover(req, metadata=fleet._meta(), timeout=300))
        except grpc.RpcError as exc:
            raise FleetError(f"rollover after the backup: {exc.code().name}: {exc.details()}") from exc
        last = events[-1] if events else None
        if last is None or last.status != "succeeded":
            rollout = fleet.rollout(model)
            raise FleetError(f"rollover of {model} to {version} after the backup did not succeed ("
                             f"{last.status if last else 'no events'}: {last.message if last else ''}; gate "
                             f"{rollout.get('failed_gate')} = {rollout.get('failed_value')}): no change to lose")
        return {"version": version, "status": last.status, "message": last.message}

    @staticmethod
    def _first_good(url: str, expected: dict | None, deadline_s: float) -> float | None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            try:
                got = golden_answers(url)
                if not expected or got == expected:
                    return time.time()
            except Exception:
                pass
            time.sleep(0.1)
        return None


def backup_desired(backup) -> dict[str, list[int]]:
    return {k: sorted(int(x) for x in v.versions) for k, v in backup.desired.items()}
