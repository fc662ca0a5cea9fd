"""The control plane for real: one control-plane process, two tritonserver instances and HAProxy per module.

Tests run in file order against the same fleet and each leaves it healthy for the next (that is checked too).
Clients only ever talk to HAProxy; a bounded recording client counts every failed request.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from recserve.control.api.proto import control_pb2 as pb
from recserve.control.runtime.hostcheck import EXPOSURE
from recserve.control.runtime.procs import pid_alive
from tests.fleet_fixtures import (
    BAD_USER_FROM,
    FleetProcess,
    LoadClient,
    all_healthy_exact,
    by_role,
    make_version,
    running_fleet,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    # These tests pin primary-standby (balance first); tests/test_router.py covers the active-active default.
    # The 1 s server timeout they were written for: a rollover on the shared 2-core CI host has a tail past
    # 4 x SLO, and a cut slow-but-correct answer would read as a failed request.
    with running_fleet(tmp_path_factory.mktemp("fleet"),
                       up_args=("--mode", "primary-standby", "--timeout-server-ms", "1000")) as f:
        yield f


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
    # the only warning a healthy fleet may carry is the host's: keys on command lines that /proc lets others read
    assert st["health"] == "ok" and not [w for w in st["warnings"] if not w.startswith(EXPOSURE)], st["warnings"]
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
    # expected golden answers come from the torch-free reference, for every version set in use
    assert "recserve_golden_reference_ok 1.0" in text
    assert 'recserve_golden_expectations{source="none"} 0.0' in text
    assert 'recserve_golden_expectations{source="build.reference"} 0.0' not in text


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


def test_each_instance_has_its_own_admin_key_and_the_fleet_holds_only_the_statistics_key(fleet):
    """No fleet-wide admin key: each instance's is its own (0600 in its workdir, where a restarted control plane
    reads it back), on no other command line; the statistics key every instance shares opens statistics only."""
    stats = (fleet.root / "stats.key").read_text().strip()
    assert (fleet.root / "stats.key").stat().st_mode & 0o777 == 0o600
    assert not (fleet.root / "admin.key").exists()
    keys = {}
    for i in fleet.status()["instances"]:
        f = fleet.root / "instances" / i["id"] / "admin.key"
        assert f.stat().st_mode & 0o777 == 0o600
        key = keys[i["id"]] = f.read_text().strip()
        args = Path(f"/proc/{i['pid']}/cmdline").read_bytes().split(b"\0")
        assert [a for a in args if a.endswith(f"model-repository:admin-key={key}".encode())], i["id"]
        assert [a for a in args if a.endswith(f"=statistics:admin-key={stats}".encode())], i["id"]
        for key_, path, code in ((key, "/v2/repository/index", 200), (stats, "/v2/repository/index", 403),
                                 (stats, "/v2/models/recommend/stats", 200), (key, "/v2/models/recommend/stats", 403)):
            req = urllib.request.Request(f"http://127.0.0.1:{i['http_port']}{path}", headers={"admin-key": key_},
                                         data=b"{}" if "repository" in path else None)
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    got = r.status
            except urllib.error.HTTPError as exc:
                got = exc.code
            assert got == code, (i["id"], path, key_ == stats)
    assert len(set(keys.values())) == len(keys) >= 2 and stats not in keys.values()


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
    # loaded at nice 19 (out of rotation), serving at the fleet's instance nice: tritonserver and every backend
    # stub of its group, like the instance that never restarted
    from recserve.control.fleet.config import FleetConfig
    from recserve.drills.faults import group_members

    for iid in (primary["id"], standby["id"]):
        pid = next(i for i in back["instances"] if i["id"] == iid)["pid"]
        nices = {p: os.getpriority(os.PRIO_PROCESS, p) for p in group_members(pid)}
        assert len(nices) > 1 and set(nices.values()) == {FleetConfig().instance_nice}, (iid, nices)
    events = fleet.stub.GetStatus(pb.GetStatusRequest(events=50)).events
    detected = [e for e in events if e.kind == "detected" and e.instance == primary["id"] and e.ts_unix >= fault]
    assert detected, "no detection event recorded"
    # a killed process is found dead (its pidfd at once, control/fleet/exits.py, or a deep check that runs at that
    # moment: both are the process stage); a stopped one is alive, and only the checks can find it
    assert (": process: " in detected[0].message) == (sig == "SIGKILL"), detected[0].message
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
        # The default gates, p99 included (issue 22): a clean-clone CI run had rolled this back on p99 55.2 ms vs
        # 13.4 ms while Triton held requests ~0.5 s (docs/holds.md); with the holds gone the gate is not widened.
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
        # The default gates, p99 included (issue 22): a clean-clone CI run had rolled this back on p99 313 ms vs
        # 21 ms while Triton held requests ~0.5 s (docs/holds.md); with the holds gone the gate is not widened.
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


# ---------------------------------------------------------------------------------------------- issue 8 hotfix
def _restarts(st: dict) -> dict[str, int]:
    return {i["id"]: i["restarts"] for i in st["instances"]}


def _one_primary_all_healthy(st: dict) -> bool:
    return all_healthy_exact(st) and len(by_role(st, "primary")) == 1


def _assert_no_restart_loop(fleet, quiet: float, what: str) -> None:
    """Within a minute of quiet the fleet is whole with one primary, and then no instance is restarted again."""
    settled = fleet.wait(_one_primary_all_healthy, timeout=60, what=f"one primary and every instance healthy {what}")
    settle_s = time.time() - quiet
    counts = _restarts(settled)
    time.sleep(8.0)  # the loop restarted a healthy instance every few seconds: 8 s of quiet shows it
    later = fleet.status()
    assert _one_primary_all_healthy(later), later
    assert _restarts(later) == counts, f"restarts kept growing after quiet: {counts} -> {_restarts(later)}"
    events = fleet.stub.GetStatus(pb.GetStatusRequest(events=200)).events
    refused = [e.message for e in events if e.ts_unix >= quiet and "only a healthy instance" in e.message]
    assert not refused, refused
    print(f"\n{what}: whole again {settle_s:.1f} s after quiet; restarts {counts}, none in the 8 s after")


def test_health_checks_failing_everywhere_then_quiet_do_not_start_a_restart_loop(fleet):
    """Regression (issue 8): every instance fails its deep check, as when a burst fills the queues, then quiet.

    Before the fix a restarted instance kept the failed probe that caused its restart, ``promote()`` refused it
    ("only a healthy instance can become primary"), the restart loop counted that as a failed restart and
    restarted the healthy process again, for minutes, with no primary. The fault switch makes the checks fail
    deterministically (``fail``: every search_model request errors) on both instances at once.
    """
    st = fleet.status()
    faults = [fleet.root / "instances" / i["id"] / "faults" / "search_model" for i in st["instances"]]
    for f in faults:
        f.write_text("fail")
    try:
        fleet.wait(lambda s: all(i["state"] in ("broken", "restarting", "starting", "loading")
                                 for i in s["instances"]), timeout=30, interval=0.1,
                   what="both instances taken out by their failing checks")
    finally:
        for f in faults:
            f.unlink(missing_ok=True)
    _assert_no_restart_loop(fleet, time.time(), "after every check failed")


def test_a_burst_then_quiet_leaves_one_primary_and_no_restart_loop(fleet):
    """The reproduction of issue 8 through HAProxy: an open-loop burst far over what two cores serve, then quiet.
    Whatever the burst does to the health checks (queue-full rejections, slow golden answers), the fleet is whole
    again within a minute and stays so."""
    from recserve.drills.probe import Case, OpenLoopProbe, constant

    cases = [Case("recommend", user_id=7, history=(11, 12, 13)), Case("search", query="red running shoes")]
    probe = OpenLoopProbe(fleet.grpc_url, cases, constant(1500.0), duration_s=6.0, timeout_s=2.0, max_requests=9000)
    records = probe.start().join()
    quiet = time.time()
    failed = [r for r in records if not r.ok]
    print(f"\nburst: {len(records)} requests in 6 s, {len(failed)} failed "
          f"({sorted({r.status for r in failed})})")
    _assert_no_restart_loop(fleet, quiet, "after a 6 s burst")


def _call_refused(call) -> str:
    """Run an admin call a client should not be able to make; return the refusal's text."""
    with pytest.raises(InferenceServerException) as exc:
        call()
    return f"{exc.value.status()} {exc.value}"


def test_admin_apis_are_refused_through_haproxy_and_directly_and_the_instance_keeps_serving(fleet):
    """Issue 8: one system-shared-memory registration of a live stub's /dev/shm region killed the primary;
    log and trace settings were open to any client. Each call is refused, and nothing is restarted."""
    import tritonclient.http as httpclient

    from recserve.control.client import RecClient
    from recserve.control.runtime.triton import shm_prefix

    before = fleet.status()
    primary = by_role(before, "primary")[0]
    prefix = shm_prefix(fleet.root / "instances" / primary["id"], primary["id"])
    region = next(p for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix))  # a live stub's IPC region
    size = region.stat().st_size
    direct = {"grpc": f"127.0.0.1:{primary['grpc_port']}", "http": f"127.0.0.1:{primary['http_port']}"}
    for where, urls in (("haproxy", {"grpc": fleet.grpc_url, "http": fleet.http_url}), ("direct", direct)):
        g = grpcclient.InferenceServerClient(urls["grpc"])
        h = httpclient.InferenceServerClient(urls["http"])
        calls = {
            "grpc system shm": lambda c=g: c.register_system_shared_memory("x", region.name, size),
            "grpc shm status": lambda c=g: c.get_system_shared_memory_status(),
            "grpc cuda shm": lambda c=g: c.register_cuda_shared_memory("x", b"\0" * 64, 0, size),
            "grpc log": lambda c=g: c.update_log_settings({"log_verbose_level": 1}),
            "grpc trace": lambda c=g: c.update_trace_settings(settings={"trace_rate": "1"}),
            "http system shm": lambda c=h: c.register_system_shared_memory("x", region.name, size),
            "http cuda shm": lambda c=h: c.register_cuda_shared_memory("x", b"\0" * 64, 0, size),
            "http log": lambda c=h: c.update_log_settings({"log_verbose_level": 1}),
            "http trace": lambda c=h: c.update_trace_settings(settings={"trace_rate": "1"}),
            "http trace of a model": lambda c=h: c.update_trace_settings("recommend", {"trace_rate": "1"}),
        }
        for name, call in calls.items():
            text = _call_refused(call)
            if where == "haproxy" or name.startswith("http"):
                assert "403" in text or "PERMISSION_DENIED" in text or "forbidden" in text.lower(), (where, name, text)
            else:  # Triton's own gRPC answer for a restricted protocol
                assert "restricted" in text, (where, name, text)
        g.close()
        h.close()
    with RecClient(fleet.grpc_url, "grpc") as c:
        assert len(c.recommend(7, [11, 12, 13]).item_ids) == 20
    after = fleet.status()
    assert all_healthy_exact(after)
    assert {i["id"]: i["pid"] for i in after["instances"]} == {i["id"]: i["pid"] for i in before["instances"]}
    assert region.exists() and region.stat().st_size == size


def test_a_sigkilled_instance_leaves_no_shm_regions_behind(fleet):
    """Issue 8: a SIGKILLed server leaves its stubs' /dev/shm regions; the fleet removes exactly that instance's."""
    from recserve.control.runtime.triton import shm_usage

    before = fleet.status()
    standby = by_role(before, "standby")[0]
    prefix_regions = before["shm"]["regions"]
    assert prefix_regions > 0 and before["shm"]["bytes"] > 0, before["shm"]
    os.kill(standby["pid"], signal.SIGKILL)
    back = fleet.wait(lambda s: all_healthy_exact(s) and next(i for i in s["instances"] if i["id"] == standby["id"])
                      ["pid"] != standby["pid"], what="the killed standby back")
    assert back["shm"]["regions"] == prefix_regions, (before["shm"], back["shm"])
    for i in back["instances"]:
        from recserve.control.runtime.triton import shm_prefix

        assert shm_usage(shm_prefix(fleet.root / "instances" / i["id"], i["id"]))[0] == i["shm_regions"]


# ---------------------------------------------------------------------------------------------- last: down
def test_fleet_down_leaves_no_process_or_port_behind(fleet):
    from recserve.control.runtime.triton import shm_prefix, shm_regions

    pids = fleet.all_pids()
    st = fleet.status()
    prefixes = [shm_prefix(fleet.root / "instances" / i["id"], i["id"]) for i in st["instances"]]
    ports = [fleet.ports["grpc"], fleet.ports["http"], fleet.ports["control"]] + \
        [i[k] for i in st["instances"] for k in ("grpc_port", "http_port", "metrics_port")]
    assert len(pids) >= 4
    r = fleet.recctl("down", "--repository", str(fleet.repository))
    assert "fleet down" in r.stdout
    time.sleep(0.5)
    from recserve.control.runtime.triton import port_in_use

    assert not [p for p in pids if pid_alive(p)]
    assert not [p for p in ports if port_in_use(p)]
    assert not [r for p in prefixes for r in shm_regions(p)], "fleet-down left /dev/shm regions behind"
    assert json.loads((fleet.root / "endpoints.json").read_text())["grpc"] == fleet.grpc_url
