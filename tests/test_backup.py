"""Backup policy units on real files and real SQLite (no fleet): policy checks, retention with a fake clock,
verification that catches a flipped byte, the online-backup copy of state.db while writers write, restore."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from recserve.control.backup.manager import (
    DAY_S,
    BackupManager,
    BackupRecord,
    copy_state,
    list_backups,
    restore,
    schedule_due,
    select_keep,
    verify,
)
from recserve.control.backup.policy import BackupError, load_policy
from recserve.control.backup.targets import PathStore, TargetSpec
from recserve.control.monitoring.metrics import ControlMetrics
from recserve.control.state.snapshots import write_manifest
from recserve.control.state.store import RolloutRecord, State


class FakeClock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_repo(repo: Path) -> Path:
    """Two built versions of 'ranker' (with manifests) and one committed Python model."""
    for v in (1, 2, 3):
        d = repo / "ranker" / str(v)
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(bytes([v]) * 4096)
        write_manifest(d, {"built_at": f"v{v}"})
    (repo / "ranker" / "config.pbtxt").write_text('name: "ranker"\nbackend: "onnxruntime"\n')
    (repo / "pre" / "1").mkdir(parents=True)
    (repo / "pre" / "1" / "model.py").write_text("# python step\n")
    (repo / "pre" / "config.pbtxt").write_text('name: "pre"\nbackend: "python"\n')
    return repo


def write_policy(path: Path, target: Path, **kw) -> Path:
    doc = {"schedule": {"every_hours": kw.get("every_hours", 6), "slack_minutes": 30,
                        "after_rollover": kw.get("after_rollover", True)},
           "retention": {"keep_last": kw.get("keep_last", 3), "daily_days": kw.get("daily_days", 5)},
           "target": {"path": str(target)}}
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


@pytest.fixture
def env(tmp_path):
    repo = make_repo(tmp_path / "repo")
    root = tmp_path / "runtime"
    state = State(root / "state.db")
    state.set_desired("ranker", [2])
    state.set_desired("pre", [1])
    policy = load_policy(write_policy(tmp_path / "policy.yaml", tmp_path / "offhost"), root, repo)
    yield repo, root, state, policy
    state.close()


# ---------------------------------------------------------------------------------------------- policy
def test_policy_refuses_a_target_inside_the_runtime_root_naming_the_field(tmp_path):
    root = tmp_path / "runtime"
    with pytest.raises(BackupError, match=r"target\.path: .* inside .* runtime root"):
        load_policy(write_policy(tmp_path / "p.yaml", root / "backups"), root, tmp_path / "repo")
    with pytest.raises(BackupError, match=r"target\.path: .* model repository"):
        load_policy(write_policy(tmp_path / "p.yaml", tmp_path / "repo" / "b"), root, tmp_path / "repo")
    (tmp_path / "bad.yaml").write_text("target: {path: /x}\nretention: {keep_last: 0}\n")
    with pytest.raises(BackupError, match=r"retention\.keep_last: must be an integer >= 1"):
        load_policy(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("target: {path: /x, s3: 's3://b'}\n")
    with pytest.raises(BackupError, match="exactly one of target.path and target.s3"):
        load_policy(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("target: {path: /x}\nschedule: {every_hour: 1}\n")
    with pytest.raises(BackupError, match=r"schedule\.every_hour: unknown field"):
        load_policy(tmp_path / "bad.yaml")
    p = load_policy(write_policy(tmp_path / "ok.yaml", tmp_path / "off", every_hours=2), root, tmp_path / "repo")
    assert p.max_age_s == 2 * 3600 + 30 * 60


def test_schedule_due_rules():
    assert schedule_due(1000, None, 0, 3600, 300).due
    assert not schedule_due(1000, None, 900, 3600, 300).due  # failed 100 s ago: retry later
    assert not schedule_due(5000, 2000, 2000, 3600, 300).due
    assert schedule_due(6000, 2000, 2000, 3600, 300).due


# ---------------------------------------------------------------------------------------------- content
def test_backup_holds_desired_and_window_versions_and_verifies(env):
    repo, root, state, policy = env
    metrics = ControlMetrics()
    events = []
    mgr = BackupManager(policy, repo, root / "state.db", metrics, event=lambda k, m: events.append((k, m)))
    rec = mgr.run("manual")
    assert rec.verified, rec.problem
    # desired 2, last good 2; version 1 and 3 were never desired: left out; committed Python model in
    assert rec.models() == {"pre": [1], "ranker": [2]}
    assert "ranker/config.pbtxt" in rec.files and "ranker/2/manifest.json" in rec.files
    assert rec.desired == {"pre": [1], "ranker": [2]}
    reg = metrics.registry
    assert reg.get_sample_value("recserve_backup_last_success_timestamp_seconds") == pytest.approx(rec.verified_at)
    assert reg.get_sample_value("recserve_backup_last_size_bytes") == rec.bytes > 4096
    assert reg.get_sample_value("recserve_backup_max_age_seconds") == policy.max_age_s
    assert reg.get_sample_value("recserve_backup_failures_total") == 0
    assert events[-1][0] == "backup"
    # a rollout to 3 within the window: both ends are kept in the next backup
    state.save_rollout(RolloutRecord(id="r1", model="ranker", from_version=2, to_version=3, strategy="canary",
                                     steps=[100], bake_seconds=1, gates={}, phase="done", status="succeeded",
                                     started=time.time()))
    state.set_desired("ranker", [3], last_good=[3])
    rec2 = mgr.run("after rollover")
    assert rec2.models()["ranker"] == [2, 3] and rec2.desired["ranker"] == [3]
    assert rec2.uploaded_bytes < rec2.bytes  # content-addressed: unchanged files are not uploaded again


def test_verification_catches_a_flipped_byte_in_an_object_and_in_the_state_copy(env):
    repo, root, state, policy = env
    mgr = BackupManager(policy, repo, root / "state.db", ControlMetrics())
    rec = mgr.run("manual")
    store = PathStore(policy.target.path)
    obj = policy.target.path / "objects" / rec.files["ranker/2/model.onnx"][:2] / rec.files["ranker/2/model.onnx"]
    data = bytearray(obj.read_bytes())
    data[100] ^= 0x01
    obj.write_bytes(bytes(data))
    bad = verify(store, rec)
    assert bad.verified is False and "ranker/2/model.onnx" in bad.problem and "sha256" in bad.problem
    assert list_backups(store)[-1].verified is False  # recorded on the target, shown by recctl snapshots
    data[100] ^= 0x01
    obj.write_bytes(bytes(data))
    assert verify(store, rec).verified
    sobj = policy.target.path / "objects" / rec.state_sha256[:2] / rec.state_sha256
    sdata = bytearray(sobj.read_bytes())
    sdata[-10] ^= 0xFF
    sobj.write_bytes(bytes(sdata))
    bad = verify(store, rec)
    assert bad.verified is False and "state.db" in bad.problem


def test_a_repository_file_that_fails_its_manifest_makes_the_backup_unverified_and_counts(env):
    repo, root, state, policy = env
    metrics = ControlMetrics()
    p = repo / "ranker" / "2" / "model.onnx"
    p.write_bytes(b"\x00" + p.read_bytes()[1:])
    rec = BackupManager(policy, repo, root / "state.db", metrics).run("manual")
    assert rec.verified is False and "does not match manifest" in rec.problem
    assert metrics.registry.get_sample_value("recserve_backup_failures_total") == 1
    assert metrics.registry.get_sample_value("recserve_backup_last_success_timestamp_seconds") == 0


# ---------------------------------------------------------------------------------------------- retention
def test_retention_keeps_last_k_and_one_per_day_with_a_fake_clock(env):
    repo, root, state, policy = env  # keep_last 3, daily_days 5
    clock = FakeClock(1_700_000_000.0 - 1_700_000_000.0 % DAY_S + 3600)  # 01:00 UTC of some day
    mgr = BackupManager(policy, repo, root / "state.db", ControlMetrics(), clock=clock)
    made = []
    for day in range(8):
        for hour in (0, 6, 12):
            clock.t = 1_700_000_000.0 - 1_700_000_000.0 % DAY_S + 3600 + day * DAY_S + hour * 3600
            state.event("tick", f"{day}/{hour}")  # the state changes, so each backup is distinct
            made.append(mgr.run("schedule"))
    kept = list_backups(PathStore(policy.target.path))
    kept_ids = {b.id for b in kept}
    last3 = {b.id for b in made[-3:]}
    daily = {made[d * 3 + 2].id for d in range(3, 8)}  # newest of each of the last 5 days
    assert kept_ids == last3 | daily
    # objects of deleted backups are gone, those of kept ones all verify
    store = PathStore(policy.target.path)
    live = {d for b in kept for d in [*b.files.values(), b.state_sha256]}
    on_disk = {k.rsplit("/", 1)[1] for k in store.list("objects/")}
    assert on_disk == live
    assert all(verify(store, b).verified for b in kept)


def test_select_keep_keeps_the_newest_unverified_for_inspection():
    def rec(i: int, verified: bool) -> BackupRecord:
        return BackupRecord(id=f"b{i}", created=i * 3600.0, trigger="t", files={}, state_sha256="", desired={},
                            bytes=0, verified=verified)

    backups = [rec(i, True) for i in range(5)] + [rec(5, False)]
    assert select_keep(backups, 6 * 3600.0, keep_last=2, daily_days=0) == {"b3", "b4", "b5"}
    backups[-1].verified = True
    assert select_keep(backups, 6 * 3600.0, keep_last=2, daily_days=0) == {"b4", "b5"}


# ---------------------------------------------------------------------------------------------- SQLite copy
def test_state_copy_is_consistent_while_writers_write(tmp_path):
    """Each writer transaction inserts an event AND bumps a counter; every copy taken mid-write must agree."""
    state = State(tmp_path / "state.db")
    state.put("n", "0")
    stop = threading.Event()
    errors: list[Exception] = []

    def writer(tag: str) -> None:
        db = State(tmp_path / "state.db")  # its own connection, like a second process
        try:
            i = 0
            while not stop.is_set() and i < 20000:
                with db.transaction():
                    db.event("w", f"{tag}{i}")
                    db.put("n", str(int(db.get("n")) + 1))
                i += 1
        except Exception as exc:
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    counts = []
    try:
        deadline = time.monotonic() + 20
        while len(counts) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
            dest = tmp_path / f"copy{len(counts)}.db"
            copy_state(tmp_path / "state.db", dest)
            db = sqlite3.connect(str(dest))
            n = int(db.execute("SELECT value FROM kv WHERE key='n'").fetchone()[0])
            events = db.execute("SELECT count(*) FROM events WHERE kind='w'").fetchone()[0]
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            db.close()
            assert n == events, f"copy {len(counts)}: counter {n} but {events} events: torn copy"
            assert mode == "delete"  # one self-contained file, no -wal needed
            counts.append(n)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        state.close()
    assert not errors, errors
    assert counts[-1] > counts[0] > 0, counts  # the copies really were taken while writers wrote


# ---------------------------------------------------------------------------------------------- restore
def test_restore_rebuilds_a_clean_root_and_repository_without_membership(env, tmp_path):
    repo, root, state, policy = env
    from recserve.control.state.store import InstanceRecord

    state.save_instance(InstanceRecord(id="t1", slot=0, role="primary", state="healthy", grpc_port=1, http_port=2,
                                       metrics_port=3, workdir=str(root / "instances/t1"), pid=4242))
    state.put("route", "first:0")
    rec = BackupManager(policy, repo, root / "state.db", ControlMetrics()).run("manual")
    new_root, new_repo = tmp_path / "new" / "runtime", tmp_path / "new" / "repo"
    out = restore(policy.target, None, new_root, new_repo)
    assert out["id"] == rec.id and out["desired"] == {"pre": [1], "ranker": [2]}
    assert (new_repo / "ranker" / "2" / "model.onnx").read_bytes() == (repo / "ranker/2/model.onnx").read_bytes()
    assert not (new_repo / "ranker" / "3").exists()
    restored = State(new_root / "state.db")
    try:
        assert restored.desired() == {"pre": [1], "ranker": [2]}
        assert restored.instances() == [] and not restored.get("route")
        assert restored.events(5)[-1]["kind"] == "restore"
    finally:
        restored.close()
    with pytest.raises(BackupError, match="already holds state.db"):
        restore(policy.target, None, new_root, new_repo)
    with pytest.raises(BackupError, match="unknown backup 'nope'"):
        restore(policy.target, "nope", tmp_path / "r2", tmp_path / "repo2")
    with pytest.raises(BackupError, match="--from: .* inside"):
        restore(TargetSpec(path=tmp_path / "r3" / "b"), None, tmp_path / "r3", tmp_path / "repo3")


def test_control_plane_refuses_to_start_with_a_target_inside_its_runtime_root(tmp_path):
    """Nothing is started (no HAProxy, no instance): the refusal comes before the fleet, naming the field."""
    import os
    import subprocess
    import sys

    from recserve.control.runtime.triton import free_port

    root = tmp_path / "runtime"
    policy = write_policy(tmp_path / "p.yaml", root / "backups")
    r = subprocess.run([sys.executable, "-m", "recserve.control.server", "--root", str(root), "--repository",
                        str(make_repo(tmp_path / "repo")), "--grpc-port", str(free_port()), "--http-port",
                        str(free_port()), "--control-port", str(free_port()), "--metrics-port", str(free_port()),
                        "--backup-policy", str(policy)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 2, r.stderr
    assert "backup policy refused: target.path:" in r.stderr and "runtime root" in r.stderr
    assert not (root / "haproxy" / "haproxy.pid").exists()


def test_scheduler_backs_up_at_start_and_after_a_successful_rollover_only(env, tmp_path):
    from recserve.control.backup.scheduler import BackupScheduler

    repo, root, state, policy = env
    mgr = BackupManager(policy, repo, root / "state.db", ControlMetrics())
    sched = BackupScheduler(mgr, check_s=0.1).start()
    try:
        def wait_for(n: int) -> list[BackupRecord]:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                got = list_backups(mgr.store)
                if len(got) >= n:
                    return got
                time.sleep(0.05)
            raise AssertionError(f"{n} backups expected, got {list_backups(mgr.store)}")

        assert wait_for(1)[0].trigger.startswith("schedule: no verified backup")
        rec = RolloutRecord(id="r9", model="ranker", from_version=2, to_version=3, strategy="canary", steps=[100],
                            bake_seconds=1, gates={}, phase="done", status="rolled_back", started=time.time())
        sched.on_rollout_finished(rec)  # rolled back: nothing changed, no backup
        time.sleep(0.5)
        assert len(list_backups(mgr.store)) == 1
        state.set_desired("ranker", [3])
        rec.status = "succeeded"
        sched.on_rollout_finished(rec)
        assert wait_for(2)[-1].trigger == "after rollout r9 (ranker -> 3)"
    finally:
        sched.stop()
