"""Rebuild a lost fleet from its backup target alone, with real processes: control plane, tritonservers, HAProxy.

A fleet with a backup policy backs up when it starts (no verified backup yet) and again after a rollover; then
the runtime root and the whole repository are deleted, ``recctl restore --from TARGET`` rebuilds both in new
directories with no control plane running, and ``recctl up`` there serves exactly the desired versions, with the
same answers as before.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request

import pytest

from recserve.control.api.proto import control_pb2 as pb
from recserve.control.client import RecClient
from tests.fleet_fixtures import FleetProcess, all_healthy_exact, fleet_repository, make_version

pytestmark = pytest.mark.timeout(900)


def _answers(url: str) -> tuple:
    with RecClient(url, "grpc") as c:
        return tuple(c.recommend(7, [11, 12, 13]).item_ids), tuple(c.search("red running shoes").item_ids)


def _up(f: FleetProcess, policy) -> None:
    p = f.ports
    f.recctl("up", "--repository", str(f.repository), "--grpc-port", str(p["grpc"]), "--http-port", str(p["http"]),
             "--control-port", str(p["control"]), "--metrics-port", str(p["metrics"]), "--instances", "2",
             "--backup-policy", str(policy))


def _backups(f: FleetProcess) -> list[dict]:
    return json.loads(f.recctl("backup", "list", "--json").stdout)


def test_lost_host_rebuilt_from_the_backup_target_serves_the_same_versions_and_answers(tmp_path):
    base = tmp_path
    repo = fleet_repository(base / "host" / "model_repository")
    target = base / "offhost"  # another volume in real life: never inside the runtime root or repository
    policy = base / "policy.yaml"
    policy.write_text(f"schedule: {{every_hours: 24, after_rollover: true}}\ntarget: {{path: '{target}'}}\n")
    old = FleetProcess(base / "host" / "runtime", repo)
    new = None
    try:
        _up(old, policy)
        old.wait(all_healthy_exact, what="two healthy instances")
        first = old.wait(lambda st: True, what="status")
        deadline = time.monotonic() + 120
        while not [b for b in _backups(old) if b["verified"]] and time.monotonic() < deadline:
            time.sleep(0.5)  # the scheduler's first backup: the target had none
        start_backups = [b for b in _backups(old) if b["verified"]]
        assert start_backups and start_backups[0]["trigger"].startswith("schedule"), _backups(old)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{old.ports['metrics']}/metrics", timeout=5).read().decode()
        last_ts = next(float(line.split()[1]) for line in metrics.splitlines()
                       if line.startswith("recserve_backup_last_success_timestamp_seconds "))
        assert last_ts >= start_backups[0]["created_unix"]
        assert "recserve_backup_max_age_seconds 88200.0" in metrics  # 24 h + 30 min default slack

        # a rollover changes the desired versions; the policy backs that up right after it
        v = make_version(repo, "ranker")
        events = list(old.stub.Rollover(pb.RolloverRequest(model="ranker", version=v, strategy="canary",
                                                           steps=[100], bake_seconds=1.0), metadata=old.auth,
                                        timeout=300))
        assert events[-1].status == "succeeded", events[-1]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            after = [b for b in _backups(old) if b["verified"] and "rollout" in b["trigger"]]
            if after:
                break
            time.sleep(0.5)
        assert after and after[-1]["desired"]["ranker"] == [v], _backups(old)
        listing = old.recctl("snapshots").stdout
        assert after[-1]["id"] in listing and "yes" in listing  # recctl snapshots shows verified backups
        desired = old.status()["desired"]
        answers = _answers(old.grpc_url)

        # the host is lost: every process, the runtime root and the repository with its built versions
        old.close()
        shutil.rmtree(base / "host")
        assert not (base / "host").exists()

        # a new machine: restore straight from the target, no control plane anywhere
        r = old.recctl("restore", "--from", str(target), "--root", str(base / "new" / "runtime"), "--repository",
                       str(base / "new" / "model_repository"), "--json")
        restored = json.loads(r.stdout)
        assert restored["id"] == after[-1]["id"] and restored["desired"] == desired
        new = FleetProcess(base / "new" / "runtime", base / "new" / "model_repository")
        _up(new, policy)
        st = new.wait(all_healthy_exact, what="the rebuilt fleet healthy on the desired versions")
        assert st["desired"] == desired and st["desired"]["ranker"] == [v]
        assert _answers(new.grpc_url) == answers
        kinds = [e.kind for e in new.stub.GetStatus(pb.GetStatusRequest(events=200)).events]
        assert "restore" in kinds, kinds
        rollout = new.stub.GetRollout(pb.GetRolloutRequest(model="ranker"))  # history came with the state
        assert rollout.to_version == v and rollout.status == "succeeded"
        assert first["endpoints"]["grpc"] != st["endpoints"]["grpc"]  # really a different fleet
    finally:
        old.close()
        if new is not None:
            new.close()
