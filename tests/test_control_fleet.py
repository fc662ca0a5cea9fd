"""The control plane for real: one control-plane process, two tritonserver instances and HAProxy per module.

Tests run in file order against the same fleet and each leaves it healthy for the next (that is checked too).
Clients only ever talk to HAProxy; a bounded recording client counts every failed request.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from recserve.control.procs import pid_alive
from recserve.control.proto import control_pb2 as pb
from tests.fleet_fixtures import (
    BAD_USER_FROM,
    FleetProcess,
    LoadClient,
    all_healthy_exact,
    by_role,
    fleet_repository,
    make_version,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    base = tmp_path_factory.mktemp("fleet")
    repo = fleet_repository(base / "model_repository")
    f = FleetProcess(base / "runtime", repo)
    try:
        f.up()
        f.wait(all_healthy_exact, what="two healthy instances on the desired versions")
        yield f
    finally:
        f.close()
        shutil.rmtree(base, ignore_errors=True)


def _load(fleet: FleetProcess, **kw) -> LoadClient:
    return LoadClient(fleet.grpc_url, threads=2, max_seconds=240, **kw).start()


# ---------------------------------------------------------------------------------------------- fleet basics
def test_status_reports_endpoints_roles_and_exact_versions(fleet):
    st = fleet.status()
    assert st["endpoints"]["grpc"] == fleet.grpc_url and st["endpoints"]["http"] == fleet.http_url
    assert st["endpoints"]["control"].endswith(str(fleet.ports["control"]))
    assert "metrics" in st["endpoints"]
    roles = sorted(i["role"] for i in st["instances"])
    assert roles == ["primary", "standby"]
    for i in st["instances"]:
        for key in ("id", "role", "state", "pid", "grpc_port", "http_port", "weight", "models"):
            assert key in i, key
        assert pid_alive(i["pid"])
        assert {m: i["models"][m] for m in st["desired"]} == st["desired"]
    assert by_role(st, "primary")[0]["weight"] == 100 and by_role(st, "standby")[0]["weight"] == 0
    assert st["health"] == "ok" and not st["warnings"]
    events = fleet.stub.GetStatus(pb.GetStatusRequest(events=50)).events
    golden = [e.message for e in events if e.kind == "golden"]
    assert golden and "build.reference" in golden[-1], golden  # expectations from the build, not the servers


def test_clients_get_answers_over_haproxy_grpc_and_http(fleet):
    from recserve.control.client import RecClient

    with RecClient(fleet.grpc_url, "grpc") as g, RecClient(fleet.http_url, "http") as h:
        a, b = g.recommend(7, [11, 12, 13]), h.recommend(7, [11, 12, 13])
        assert len(a.item_ids) == 20 and a.item_ids == b.item_ids
        assert g.search("red running shoes").item_ids == h.search("red running shoes").item_ids


def test_second_fleet_up_does_not_start_a_second_fleet(fleet):
    before = fleet.all_pids()
    r = fleet.up()
    assert "already up" in r.stdout
    import subprocess
    import sys

    direct = subprocess.run([sys.executable, "-m", "recserve.control.server", "--root", str(fleet.root), "--repository",
                             str(fleet.repository), "--control-port", str(fleet.ports["control"])],
                            capture_output=True, text=True, timeout=60)
    assert direct.returncode == 3 and "already running" in direct.stderr
    assert fleet.all_pids() == before
    assert len(fleet.status()["instances"]) == 2


def test_health_and_reflection_services(fleet):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{fleet.ports['control']}") as ch:
        req = health_pb2.HealthCheckRequest(service="recserve.control.v1.ControlPlane")
        r = health_pb2_grpc.HealthStub(ch).Check(req)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert "recserve.control.v1.ControlPlane" in names and "grpc.health.v1.Health" in names


def test_control_plane_metrics_are_exported(fleet):
    text = urllib.request.urlopen(f"http://127.0.0.1:{fleet.ports['metrics']}/metrics", timeout=5).read().decode()
    for name in ("recserve_instance_healthy", "recserve_failovers_total", "recserve_instance_restarts",
                 "recserve_rollout_results", "recserve_reconcile_errors_total"):
        assert name in text, name


# ---------------------------------------------------------------------------------------------- security
def test_mutating_calls_need_the_token_and_change_nothing_without_it(fleet):
    before = fleet.status()
    standby = by_role(before, "standby")[0]["id"]
    s = fleet.stub
    calls = [
        lambda md: s.PromoteInstance(pb.InstanceRequest(id=standby), metadata=md),
        lambda md: s.DrainInstance(pb.InstanceRequest(id=standby), metadata=md),
        lambda md: s.RemoveInstance(pb.InstanceRequest(id=standby), metadata=md),
        lambda md: s.AddInstance(pb.AddInstanceRequest(role="standby"), metadata=md),
        lambda md: s.Rollback(pb.RollbackRequest(model="retrieval"), metadata=md),
        lambda md: s.CreateSnapshot(pb.CreateSnapshotRequest(), metadata=md),
        lambda md: s.RestoreSnapshot(pb.RestoreSnapshotRequest(id="x"), metadata=md),
        lambda md: next(iter(s.Rollover(pb.RolloverRequest(model="retrieval", version=1), metadata=md))),
    ]
    for md in ([], [("authorization", "Bearer wrong")], [("authorization", "token")]):
        for call in calls:
            with pytest.raises(grpc.RpcError) as exc:
                call(md)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    after = fleet.status()
    assert [(i["id"], i["role"], i["state"]) for i in after["instances"]] == \
        [(i["id"], i["role"], i["state"]) for i in before["instances"]]
    assert oct((fleet.root / "token").stat().st_mode & 0o777) == "0o600"


def test_repository_api_is_closed_to_clients(fleet):
    c = grpcclient.InferenceServerClient(fleet.grpc_url)
    for call in (lambda: c.get_model_repository_index(), lambda: c.unload_model("recommend"),
                 lambda: c.load_model("recommend")):
        with pytest.raises(InferenceServerException) as exc:
            call()
        assert "PERMISSION_DENIED" in str(exc.value.status()) or "403" in str(exc.value)
    c.close()
    for path in ("/v2/repository/index", "/v2/repository/models/recommend/unload"):
        req = urllib.request.Request(f"http://{fleet.http_url}{path}", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=5)
        assert exc.value.code == 403
    # straight to an instance, without the control plane's admin key: refused by Triton itself
    inst = fleet.status()["instances"][0]
    req = urllib.request.Request(f"http://127.0.0.1:{inst['http_port']}/v2/repository/index", data=b"{}",
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=5)
    assert exc.value.code == 403
    assert all_healthy_exact(fleet.status())


def test_bad_arguments_get_clear_errors_and_change_nothing(fleet):
    good = make_version(fleet.repository, "retrieval", "copy")
    bad_sha = make_version(fleet.repository, "retrieval", "corrupt")
    before = fleet.status()
    cases = [
        (pb.RolloverRequest(model="nope", version=1), grpc.StatusCode.NOT_FOUND, "unknown model"),
        (pb.RolloverRequest(model="retrieval", version=99), grpc.StatusCode.NOT_FOUND, "unknown version"),
        (pb.RolloverRequest(model="retrieval", version=bad_sha), grpc.StatusCode.FAILED_PRECONDITION, "sha256"),
        (pb.RolloverRequest(model="retrieval", version=before["desired"]["retrieval"][0]),
         grpc.StatusCode.ALREADY_EXISTS, "already"),
        (pb.RolloverRequest(model="recommend_pre", version=1), grpc.StatusCode.INVALID_ARGUMENT, "manifest"),
        (pb.RolloverRequest(model="retrieval", version=good, strategy="yolo"), grpc.StatusCode.INVALID_ARGUMENT,
         "strategy"),
        (pb.RolloverRequest(model="retrieval", version=good, steps=[50, 10]), grpc.StatusCode.INVALID_ARGUMENT,
         "steps"),
        (pb.RolloverRequest(model="retrieval", version=good, steps=[10, 50]), grpc.StatusCode.INVALID_ARGUMENT,
         "steps"),
    ]
    for req, code, words in cases:
        with pytest.raises(grpc.RpcError) as exc:
            next(iter(fleet.stub.Rollover(req, metadata=fleet.auth)))
        assert exc.value.code() == code, (req, exc.value.details())
        assert words in exc.value.details(), exc.value.details()
    for call, code in (
        (lambda: fleet.stub.PromoteInstance(pb.InstanceRequest(id="t99"), metadata=fleet.auth),
         grpc.StatusCode.NOT_FOUND),
        (lambda: fleet.stub.DrainInstance(pb.InstanceRequest(id="t99"), metadata=fleet.auth),
         grpc.StatusCode.NOT_FOUND),
        (lambda: fleet.stub.RemoveInstance(pb.InstanceRequest(id="t99"), metadata=fleet.auth),
         grpc.StatusCode.NOT_FOUND),
        (lambda: fleet.stub.RestoreSnapshot(pb.RestoreSnapshotRequest(id="nope"), metadata=fleet.auth),
         grpc.StatusCode.NOT_FOUND),
        (lambda: fleet.stub.ListVersions(pb.ListVersionsRequest(model="nope")), grpc.StatusCode.NOT_FOUND),
        (lambda: fleet.stub.Rollback(pb.RollbackRequest(model="retrieval"), metadata=fleet.auth),
         grpc.StatusCode.FAILED_PRECONDITION),
        (lambda: fleet.stub.AddInstance(pb.AddInstanceRequest(role="canary"), metadata=fleet.auth),
         grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() == code, exc.value.details()
        assert exc.value.details()
    versions = {v.version: v for v in fleet.stub.ListVersions(pb.ListVersionsRequest(model="retrieval")).versions}
    assert not versions[bad_sha].verified and "sha256" in versions[bad_sha].problem
    after = fleet.status()
    assert after["desired"] == before["desired"] and all_healthy_exact(after)


# ---------------------------------------------------------------------------------------------- failover
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_primary_failure_costs_no_request_and_returns_as_standby(fleet, sig):
    st = fleet.status()
    primary, standby = by_role(st, "primary")[0], by_role(st, "standby")[0]
    load = _load(fleet)
    try:
        time.sleep(1.5)
        mark = load.mark()
        os.kill(primary["pid"], getattr(signal, sig))
        fault = time.time()
        swapped = fleet.wait(lambda s: by_role(s, "primary") and by_role(s, "primary")[0]["id"] == standby["id"],
                             timeout=30, what="the standby to become primary", interval=0.1)
        assert swapped
        assert swapped["health"] == "degraded" and any("standby" in w for w in swapped["warnings"]), swapped
        back = fleet.wait(lambda s: all_healthy_exact(s) and by_role(s, "standby")[0]["id"] == primary["id"],
                          what="the failed instance back as standby with the desired versions")
        time.sleep(1.0)
        records = load.since(mark)
    finally:
        load.stop()
        try:
            os.kill(primary["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    failed = load.failed(records)
    assert len(records) > 50, "the load client barely ran"
    assert not failed, f"{len(failed)} of {len(records)} requests failed, first: {failed[0].error}"
    old = next(i for i in back["instances"] if i["id"] == primary["id"])
    assert old["pid"] != primary["pid"] and old["restarts"] >= 1
    events = fleet.stub.GetStatus(pb.GetStatusRequest(events=50)).events
    detected = [e for e in events if e.kind == "detected" and e.instance == primary["id"] and e.ts_unix >= fault]
    assert detected, "no detection event recorded"
    print(f"\n{sig}: {len(records)} requests, 0 failed; detected after {(detected[0].ts_unix - fault) * 1000:.0f} ms")


def test_wrong_answers_mark_the_primary_broken_while_triton_says_ready(fleet):
    st = fleet.status()
    primary = by_role(st, "primary")[0]
    fault_file = Path(fleet.root / "instances" / primary["id"] / "faults" / "search_model")
    fault_file.write_text("wrong")
    try:
        swapped = fleet.wait(lambda s: by_role(s, "primary")[0]["id"] != primary["id"], timeout=30,
                             what="failover away from a wrongly answering primary", interval=0.1)
        assert swapped
        events = fleet.stub.GetStatus(pb.GetStatusRequest(events=50)).events
        assert any(e.kind == "detected" and e.instance == primary["id"] and "wrong answer" in e.message
                   for e in events)
    finally:
        fault_file.unlink(missing_ok=True)
    fleet.wait(all_healthy_exact, what="fleet healthy again")


# ---------------------------------------------------------------------------------------------- rollouts
def _rollover(fleet, model: str, version: int, **kw) -> list:
    req = pb.RolloverRequest(model=model, version=version, **kw)
    return list(fleet.stub.Rollover(req, metadata=fleet.auth, timeout=300))


def test_canary_rollover_under_load_costs_nothing_and_reaches_every_instance(fleet):
    new = make_version(fleet.repository, "retrieval", "copy")
    load = _load(fleet)
    try:
        time.sleep(1.0)
        mark = load.mark()
        stream = fleet.stub.Rollover(pb.RolloverRequest(model="retrieval", version=new, steps=[20, 100],
                                                        bake_seconds=2), metadata=fleet.auth, timeout=300)
        first = next(stream)
        with pytest.raises(grpc.RpcError) as exc:  # a second rollout while one runs
            next(iter(fleet.stub.Rollover(pb.RolloverRequest(model="ranker", version=1), metadata=fleet.auth)))
        assert exc.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS)
        events = [first, *stream]
        records = load.since(mark)
    finally:
        load.stop()
    assert events[-1].status == "succeeded", [e.message for e in events]
    assert {e.weight for e in events if e.phase == "shift"} == {20, 100}
    failed = load.failed(records)
    assert not failed, f"{len(failed)} of {len(records)} failed: {failed[0].error}"
    st = fleet.wait(all_healthy_exact, what="every instance on the new version")
    assert st["desired"]["retrieval"] == [new]
    assert all(i["models"]["retrieval"] == [new] for i in st["instances"])


def test_rollback_returns_every_instance_to_the_previous_version(fleet):
    before = fleet.status()["desired"]["retrieval"][0]
    r = fleet.stub.Rollback(pb.RollbackRequest(model="retrieval"), metadata=fleet.auth, timeout=120)
    assert r.status == "succeeded" and r.to_version < before
    st = fleet.wait(all_healthy_exact, what="rolled back fleet")
    assert st["desired"]["retrieval"] == [r.to_version]
    assert all(i["models"]["retrieval"] == [r.to_version] for i in st["instances"])


def test_blue_green_rollover_switches_in_one_step_without_failures(fleet):
    start = fleet.status()
    old_primary = by_role(start, "primary")[0]["id"]
    new = make_version(fleet.repository, "retrieval", "copy")
    load = _load(fleet)
    try:
        time.sleep(1.0)
        mark = load.mark()
        events = _rollover(fleet, "retrieval", new, strategy="blue-green", bake_seconds=2)
        records = load.since(mark)
    finally:
        load.stop()
    assert events[-1].status == "succeeded", [e.message for e in events]
    shifts = [e for e in events if e.phase == "shift"]
    assert len(shifts) == 1 and shifts[0].weight == 100 and "instant rollback target" in shifts[0].message
    failed = load.failed(records)
    assert not failed, f"{len(failed)} of {len(records)} failed: {failed[0].error}"
    st = fleet.wait(all_healthy_exact, what="every instance on the blue-green version")
    assert st["desired"]["retrieval"] == [new]
    assert by_role(st, "primary")[0]["id"] != old_primary  # the green instance serves


def test_bad_version_is_rolled_back_by_the_gates(fleet):
    start = fleet.status()["desired"]["retrieval"]
    bad = make_version(fleet.repository, "retrieval", "fail-high-users", base=start[0])
    load = _load(fleet, users=(7, BAD_USER_FROM + 7))  # only the second hits the fault; golden requests do not
    try:
        time.sleep(1.0)
        mark = load.mark()
        events = _rollover(fleet, "retrieval", bad, steps=[10, 50, 100], bake_seconds=3)
        time.sleep(0.5)
        records = load.since(mark)
    finally:
        load.stop()
    assert events[-1].status == "rolled_back", [e.message for e in events]
    ro = fleet.stub.GetRollout(pb.GetRolloutRequest(model="retrieval"))
    assert ro.failed_gate == "error_rate" and ro.failed_value > ro.threshold
    assert not any(e.phase == "shift" and e.weight > 10 for e in events), \
        ("traffic moved past the first step", [(e.phase, e.weight, e.message) for e in events])
    failed = load.failed(records)
    share = len(failed) / max(1, len(records))
    assert share <= 0.10, f"{len(failed)}/{len(records)} failed: more than the canary share"
    st = fleet.wait(all_healthy_exact, what="fleet back on the old version")
    assert st["desired"]["retrieval"] == start
    assert all(i["models"]["retrieval"] == start for i in st["instances"])


def test_version_with_reversed_answers_is_caught_before_any_traffic_moves(fleet):
    start = fleet.status()["desired"]
    wrong = make_version(fleet.repository, "ranker", "negate-scores", base=start["ranker"][0])
    load = _load(fleet)
    try:
        time.sleep(0.5)
        mark = load.mark()
        events = _rollover(fleet, "ranker", wrong, steps=[10, 100], bake_seconds=2)
        records = load.since(mark)
    finally:
        load.stop()
    assert events[-1].status == "rolled_back", [e.message for e in events]
    ro = fleet.stub.GetRollout(pb.GetRolloutRequest(model="ranker"))
    assert ro.failed_gate == "answer_overlap" and ro.failed_value < ro.threshold
    assert not any(e.phase == "shift" for e in events)
    assert not load.failed(records)
    st = fleet.wait(all_healthy_exact, what="fleet on the old ranker")
    assert st["desired"]["ranker"] == start["ranker"]


def test_version_that_fails_to_load_is_never_served(fleet):
    start = fleet.status()["desired"]["retrieval"]
    broken = make_version(fleet.repository, "retrieval", "unloadable")
    load = _load(fleet)
    try:
        time.sleep(0.5)
        mark = load.mark()
        r = fleet.recctl("rollover", "retrieval", "--version", str(broken), "--steps", "10,100", "--bake", "1",
                         check=False)
        records = load.since(mark)
    finally:
        load.stop()
    assert r.returncode == 1, r.stdout
    assert "rolled back" in r.stdout and "gate load" in r.stdout, r.stdout
    assert not load.failed(records)
    st = fleet.wait(all_healthy_exact, what="fleet on the old version")
    assert st["desired"]["retrieval"] == start
    assert all(i["models"]["retrieval"] == start for i in st["instances"])


def test_control_plane_sigkill_mid_rollover_leaves_a_consistent_fleet(fleet):
    new = make_version(fleet.repository, "retrieval", "copy")
    pids_before = sorted(i["pid"] for i in fleet.status()["instances"])
    proxy_before = (fleet.root / "haproxy" / "haproxy.pid").read_text()
    load = _load(fleet)
    try:
        time.sleep(1.0)
        mark = load.mark()
        stream = fleet.stub.Rollover(pb.RolloverRequest(model="retrieval", version=new, steps=[30, 100],
                                                        bake_seconds=4), metadata=fleet.auth, timeout=300)
        for ev in stream:
            if ev.phase == "shift":
                break
        os.kill(fleet.control_pid(), signal.SIGKILL)
        time.sleep(3)  # the data path serves on without a control plane
        fleet.reconnect()
        fleet.up()
        st = fleet.wait(all_healthy_exact, what="a consistent fleet after the restart")
        time.sleep(1)
        records = load.since(mark)
    finally:
        load.stop()
    failed = load.failed(records)
    assert not failed, f"{len(failed)} of {len(records)} failed: {failed[0].error}"
    ro = fleet.stub.GetRollout(pb.GetRolloutRequest(model="retrieval"))
    assert ro.status in ("rolled_back", "succeeded") and ro.finished_unix > 0
    want = [new] if ro.status == "succeeded" else [ro.from_version]
    assert st["desired"]["retrieval"] == want
    assert all(i["models"]["retrieval"] == want for i in st["instances"])
    # adopted, not duplicated or restarted: same instance processes, same HAProxy
    events = fleet.stub.GetStatus(pb.GetStatusRequest(events=80)).events
    story = "\n".join(f"{e.ts_unix:.3f} {e.kind} {e.instance} {e.message}" for e in events[-25:])
    assert sorted(i["pid"] for i in st["instances"]) == pids_before, story
    assert (fleet.root / "haproxy" / "haproxy.pid").read_text() == proxy_before
    assert sum(1 for e in events if e.kind == "adopt" and "adopted running instance" in e.message) >= 2


# ---------------------------------------------------------------------------------------------- membership
def test_promote_and_drain_move_traffic_without_failures(fleet):
    st = fleet.status()
    primary, standby = by_role(st, "primary")[0]["id"], by_role(st, "standby")[0]["id"]
    load = _load(fleet)
    try:
        time.sleep(1.0)
        mark = load.mark()
        r = fleet.stub.PromoteInstance(pb.InstanceRequest(id=standby), metadata=fleet.auth, timeout=30)
        assert r.role == "primary" and r.weight == 100
        time.sleep(1.0)
        d = fleet.stub.DrainInstance(pb.InstanceRequest(id=standby), metadata=fleet.auth, timeout=30)
        assert d.state == "drained" and d.role == "standby"  # draining the primary hands traffic over first
        st = fleet.status()
        assert by_role(st, "primary")[0]["id"] == primary
        time.sleep(1.0)
        fleet.stub.PromoteInstance(pb.InstanceRequest(id=standby), metadata=fleet.auth, timeout=30)
        time.sleep(1.0)
        records = load.since(mark)
    finally:
        load.stop()
    failed = load.failed(records)
    assert len(records) > 20 and not failed, f"{len(failed)} of {len(records)} failed"
    st = fleet.wait(all_healthy_exact, what="healthy fleet after promote/drain")
    assert by_role(st, "primary")[0]["id"] == standby


def test_add_and_remove_a_standby(fleet):
    r = fleet.stub.AddInstance(pb.AddInstanceRequest(role="standby"), metadata=fleet.auth, timeout=300)
    assert r.role == "standby" and r.state == "healthy"
    st = fleet.wait(lambda s: all_healthy_exact(s, 3), what="three healthy instances")
    assert len(by_role(st, "standby")) == 2
    primary = by_role(st, "primary")[0]["id"]
    removed = fleet.stub.RemoveInstance(pb.InstanceRequest(id=r.id), metadata=fleet.auth, timeout=60)
    assert removed.state == "removed"
    assert not pid_alive(r.pid)
    st = fleet.wait(all_healthy_exact, what="two instances again")
    assert by_role(st, "primary")[0]["id"] == primary


# ---------------------------------------------------------------------------------------------- backups
def test_snapshot_restore_repairs_a_corrupted_version(fleet):
    snap = fleet.stub.CreateSnapshot(pb.CreateSnapshotRequest(note="test"), metadata=fleet.auth, timeout=120)
    assert snap.files > 0 and "retrieval" in snap.models
    assert snap.id in [s.id for s in fleet.stub.ListSnapshots(pb.ListSnapshotsRequest()).snapshots]
    v = fleet.status()["desired"]["retrieval"][0]
    target = fleet.repository / "retrieval" / str(v) / "model.onnx"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    versions = {x.version: x for x in fleet.stub.ListVersions(pb.ListVersionsRequest(model="retrieval")).versions}
    assert not versions[v].verified
    r = fleet.stub.RestoreSnapshot(pb.RestoreSnapshotRequest(id=snap.id), metadata=fleet.auth, timeout=120)
    assert f"retrieval/{v}/model.onnx" in list(r.repaired) and r.verified_files == snap.files
    versions = {x.version: x for x in fleet.stub.ListVersions(pb.ListVersionsRequest(model="retrieval")).versions}
    assert versions[v].verified


def test_a_dead_haproxy_is_started_again_with_the_current_routing(fleet):
    from recserve.control.client import RecClient

    route = fleet.status()["route"]
    pid = int((fleet.root / "haproxy" / "haproxy.pid").read_text().split()[0])
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    answer = None
    while time.monotonic() < deadline and answer is None:
        try:
            with RecClient(fleet.grpc_url, "grpc", timeout_s=2) as c:
                answer = c.recommend(7, [11, 12, 13])
        except Exception:
            time.sleep(0.2)
    assert answer is not None and len(answer.item_ids) == 20, "clients never got answers again"
    new_pid = int((fleet.root / "haproxy" / "haproxy.pid").read_text().split()[0])
    assert new_pid != pid and pid_alive(new_pid)
    st = fleet.status()
    assert st["route"] == route and all_healthy_exact(st)


# ---------------------------------------------------------------------------------------------- last: down
def test_fleet_down_leaves_no_process_or_port_behind(fleet):
    pids = fleet.all_pids()
    st = fleet.status()
    ports = [fleet.ports["grpc"], fleet.ports["http"], fleet.ports["control"]] + \
        [i[k] for i in st["instances"] for k in ("grpc_port", "http_port", "metrics_port")]
    assert len(pids) >= 4
    r = fleet.recctl("down", "--repository", str(fleet.repository))
    assert "fleet down" in r.stdout
    time.sleep(0.5)
    from recserve.control.triton import port_in_use

    assert not [p for p in pids if pid_alive(p)]
    assert not [p for p in ports if port_in_use(p)]
    assert json.loads((fleet.root / "endpoints.json").read_text())["grpc"] == fleet.grpc_url
