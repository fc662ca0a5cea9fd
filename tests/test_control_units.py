"""Control-plane pieces without a fleet: config rendering and validation, state durability, manifests and
snapshots, gate arithmetic, CLI parsing."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import pytest

from recserve.control.rollout.manager import Gates, p99
from recserve.control.routing.haproxy import HAProxy, HAProxyConfig, HAProxyError, render_config
from recserve.control.runtime.triton import free_port
from recserve.control.state.snapshots import RepositoryError, SnapshotStore, verify_version, write_manifest
from recserve.control.state.store import InstanceRecord, RolloutRecord, State


def test_haproxy_config_validation_names_field_and_rule(tmp_path):
    cases = [
        (dict(grpc_port=0), "grpc_port must be 1..65535"),
        (dict(grpc_port=9000, http_port=9000), "must differ"),
        (dict(slots=0), "slots must be 1..16"),
        (dict(check_inter_ms=100, timeout_check_ms=150), "timeout_check_ms (150) must be below check_inter_ms"),
        (dict(retries=0), "retries must be > 0"),
    ]
    for kw, words in cases:
        with pytest.raises(HAProxyError) as exc:
            render_config(HAProxyConfig(workdir=tmp_path, **kw))
        assert words in str(exc.value)


def test_haproxy_config_has_the_verified_settings(tmp_path):
    text = render_config(HAProxyConfig(workdir=tmp_path, slots=2))
    assert "balance first" in text and "balance roundrobin" in text
    assert "retry-on conn-failure empty-response response-timeout" in text
    assert "option redispatch 1" in text and "check-proto h1" in text
    # the client frontends carry the front door's allow-list (control/routing/frontdoor.py; tests/test_front_door.py)
    assert text.count("acl fd_allowed path /inference.GRPCInferenceService/ServerLive") == 1
    assert text.count("acl fd_infer path_reg") == 1
    assert text.count("track chk/s") == 2 * (2 + 1 + 1) * 2  # 2 protocols x (2 first + split + pool) x 2 slots
    assert " backup" not in text  # backup servers lose requests on a killed primary (runtime notes)


def test_haproxy_config_admits_fast_and_retries_once(tmp_path):
    """Issue 9: every traffic server has an in-flight limit; a full pool is refused before it queues (degraded
    answers first, then 429 / gRPC RESOURCE_EXHAUSTED); one retry, redispatched, never on 503; access log."""
    from recserve.control.routing.haproxy import OVERLOADED, overloaded_reply, pool_backend

    text = render_config(HAProxyConfig(workdir=tmp_path, slots=2, maxconn=7, fallback_maxconn=3))
    lines = [ln.strip() for ln in text.splitlines()]
    servers = [ln for ln in lines if ln.startswith("server s") and "track chk/" in ln]
    assert servers and all("maxconn 7" in ln for ln in servers)
    assert "balance leastconn" in text and f"backend {pool_backend('grpc')}" in text
    assert "retries 1" in lines and "option redispatch 1" in lines and "timeout queue 200ms" in lines
    assert not [ln for ln in lines if ln.startswith("retry-on") and "503" in ln]
    assert "be_conn_free(be_grpc_pool) le 0" in text and "be_conn_free(be_grpc_fallback) gt 0" in text
    # the refusal comes from a server-less backend whose session count is the refusals alone (the frontend's
    # "intercepted" counter also counts the front door's 403s)
    assert "use_backend be_grpc_fallback if pool_full fallback_free || pool_full fallback_up fallback_queue_room" \
        in lines and "use_backend be_grpc_shed if pool_full" in lines
    # primary-standby: a full primary is a full pool (its standbys count in be_conn_free, see admission_lines)
    assert "{ srv_is_up(chk/s1) } { srv_conn_free(be_grpc_first_1/s1) le 0 }" in text
    # a shed request waits at most fallback_timeout_queue_ms for a degraded answer, then gets the refusal
    fb = text[text.index("\nbackend be_grpc_fallback"):].split("\n\n")[0]
    assert "timeout queue 100ms" in fb and f"errorfile 503 {tmp_path}/overloaded-grpc.http" in fb
    # the degraded-answer server too slow under a burst (HAProxy's 504) is the same refusal, not UNAVAILABLE
    assert f"errorfile 504 {tmp_path}/overloaded-grpc.http" in fb
    shed = text[text.index("\nbackend be_grpc_shed"):].split("\n\n")[0]
    assert f"http-request return errorfile {tmp_path}/overloaded-grpc.http" in shed and "server " not in shed
    shed_http = text[text.index("\nbackend be_http_shed"):].split("\n\n")[0]
    assert f"http-request return errorfile {tmp_path}/overloaded-http.http" in shed_http
    # the replies themselves: a Trailers-Only RESOURCE_EXHAUSTED with its content-type (HAProxy drops the
    # content-type of a body-less ``return``, and gRPC clients in Go or Java then see UNKNOWN), HTTP 429
    grpc_reply = overloaded_reply("grpc").decode()
    assert grpc_reply.startswith("HTTP/1.1 200 OK\r\n") and "content-type: application/grpc\r\n" in grpc_reply
    assert "grpc-status: 8\r\n" in grpc_reply and f"grpc-message: {OVERLOADED}\r\n" in grpc_reply
    http_reply = overloaded_reply("http").decode()
    assert http_reply.startswith("HTTP/1.1 429 ") and http_reply.endswith(f'{{"error":"{OVERLOADED}"}}')
    assert "maxconn 3" in next(ln for ln in lines if ln.startswith("server fb") and "check" in ln)
    fe = text[text.index("frontend fe_grpc"):text.index("backend be_grpc_first_0")]
    # the front door's own refusals (403) come before admission; admission before the normal route
    assert fe.index("acl fd_allowed") < fe.index("pool_full") < fe.index("use_backend be_grpc_fallback") \
        < fe.index("use_backend be_grpc_shed") < fe.index("use_backend %[var(txn.route)]")
    assert "%Tq/%Tw/%Tc/%Tr/%Tt" in text and "%rc" in text and "unique-id-format" in text


def test_haproxy_runtime_api_routes_and_refuses_bad_values(tmp_path):
    h = HAProxy(HAProxyConfig(workdir=tmp_path, grpc_port=free_port(), http_port=free_port(), slots=2))
    h.start()
    try:
        h.bind_slot(1, 1111, 2222)
        h.set_weight(1, 30)
        h.route("split")
        assert h.current_route() == "be_grpc_split"
        h.route("first", 1)
        assert h.current_route() == "be_grpc_first_1"
        rows = h.servers()
        assert rows["be_grpc_split/s1"]["srv_uweight"] == "30" and rows["be_grpc_first_0/s1"]["srv_port"] == "1111"
        assert rows["be_http_first_0/s1"]["srv_port"] == "2222"
        for bad in (lambda: h.set_weight(1, 300), lambda: h.set_state(5, "ready"), lambda: h.set_state(0, "up"),
                    lambda: h.route("random"), lambda: h.set_maxconn(0, 0)):
            with pytest.raises(HAProxyError):
                bad()
        again = HAProxy(HAProxyConfig(workdir=tmp_path, grpc_port=h.config.grpc_port, http_port=h.config.http_port,
                                      slots=2))
        assert again.adopt() and again.pid == h.pid
    finally:
        h.stop()
    assert not h.is_alive()


def test_state_survives_reopen_and_uses_wal(tmp_path):
    s = State(tmp_path / "state.db")
    s.set_desired("retrieval", [2], last_good=[1])
    s.save_instance(InstanceRecord(id="t1", slot=0, role="primary", state="healthy", grpc_port=1, http_port=2,
                                   metrics_port=3, workdir="/x", versions={"retrieval": [2]}, pid=42))
    s.save_rollout(RolloutRecord(id="r1", model="retrieval", from_version=1, to_version=2, strategy="canary",
                                 steps=[10, 100], bake_seconds=1, gates={}, phase="shift", status="running",
                                 started=1.0))
    s.add_rollout_event("r1", "shift", "10%", 10, {"error_rate": 0.0})
    s.event("detected", "t1 broken", "t1")
    s.close()
    s2 = State(tmp_path / "state.db")
    assert s2.desired() == {"retrieval": [2]} and s2.last_good("retrieval") == [1]
    assert s2.instance("t1").versions == {"retrieval": [2]} and s2.instance("t1").pid == 42
    assert [r.id for r in s2.running_rollouts()] == ["r1"]
    assert s2.rollout_events("r1")[0]["gates"] == {"error_rate": 0.0}
    assert s2.events(5)[-1]["kind"] == "detected"
    mode = sqlite3.connect(str(tmp_path / "state.db")).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_state_transaction_rolls_back_on_error(tmp_path):
    s = State(tmp_path / "state.db")
    s.set_desired("m", [1])
    with pytest.raises(RuntimeError):
        with s.transaction():
            s.set_desired("m", [2])
            raise RuntimeError("boom")
    assert s.desired() == {"m": [1]}


def _repo(tmp_path):
    repo = tmp_path / "repo"
    v = repo / "retrieval" / "1"
    v.mkdir(parents=True)
    (repo / "retrieval" / "config.pbtxt").write_text('name: "retrieval"\n')
    (v / "model.onnx").write_bytes(b"\x00" * 1000)
    write_manifest(v, {"built_at": "now"})
    return repo


def test_manifest_check_finds_flipped_bytes_and_missing_files(tmp_path):
    repo = _repo(tmp_path)
    assert verify_version(repo, "retrieval", 1).verified
    p = repo / "retrieval" / "1" / "model.onnx"
    p.write_bytes(b"\x01" + b"\x00" * 999)
    info = verify_version(repo, "retrieval", 1)
    assert not info.verified and "sha256" in info.problem and "model.onnx" in info.problem
    p.unlink()
    assert "missing" in verify_version(repo, "retrieval", 1).problem
    with pytest.raises(RepositoryError, match="unknown version 7"):
        verify_version(repo, "retrieval", 7)
    with pytest.raises(RepositoryError, match="unknown model"):
        verify_version(repo, "nope", 1)


def test_manifest_list_form_is_accepted(tmp_path):
    repo = _repo(tmp_path)
    m = repo / "retrieval" / "1" / "manifest.json"
    files = json.loads(m.read_text())["files"]
    m.write_text(json.dumps({"files": [{"path": k, "sha256": v} for k, v in files.items()]}))
    assert verify_version(repo, "retrieval", 1).verified


def test_snapshot_restore_repairs_and_refuses_corrupt_backups(tmp_path):
    repo = _repo(tmp_path)
    store = SnapshotStore(repo, tmp_path / "backups")
    snap = store.create("first")
    assert snap.models() == {"retrieval": [1]} and [s.id for s in store.list()] == [snap.id]
    model = repo / "retrieval" / "1" / "model.onnx"
    model.write_bytes(b"garbage")
    restored, verified, repaired = store.restore(snap.id)
    assert repaired == ["retrieval/1/model.onnx"] and verified == len(snap.files)
    assert verify_version(repo, "retrieval", 1).verified
    assert store.restore(snap.id)[0] == 0  # nothing left to repair
    digest = snap.files["retrieval/1/model.onnx"]
    (tmp_path / "backups" / "objects" / digest[:2] / digest).write_bytes(b"rotten")
    model.write_bytes(b"garbage")
    with pytest.raises(RepositoryError, match="missing or corrupt"):
        store.restore(snap.id)
    assert model.read_bytes() == b"garbage"  # all or nothing
    with pytest.raises(RepositoryError, match="unknown snapshot"):
        store.restore("../etc")


def test_gates_defaults_validation_and_p99():
    g = Gates.from_dict({"max_error_rate": 0, "max_p99_ratio": 0})
    assert g.max_error_rate == 0.01 and g.max_p99_ratio == 3.0
    assert Gates.from_dict({"max_error_rate": 0.05}).max_error_rate == 0.05
    assert g.min_answer_overlap == 0.3 and Gates.from_dict({"min_answer_overlap": -1}).min_answer_overlap == -1
    for bad in ({"max_error_rate": 2}, {"max_p99_ratio": 0.5}, {"min_answer_overlap": 1.5}):
        with pytest.raises(Exception, match="gates"):
            Gates.from_dict(bad)
    assert p99([]) == 0.0
    assert p99(list(range(1, 101))) == 99
    assert p99([5.0]) == 5.0
    assert p99([10.0] * 30 + [560.0]) == 10.0  # one held probe does not decide the gate
    assert p99([10.0] * 30 + [560.0, 540.0]) == 540.0  # two slow ones do


def test_recctl_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "recserve.control.recctl", "--help"], capture_output=True,
                         text=True).stdout
    for cmd in ("status", "rollover", "rollback", "promote", "drain", "instances", "snapshot", "snapshots",
                "restore", "up", "down"):
        assert cmd in out
    r = subprocess.run([sys.executable, "-m", "recserve.control.recctl", "rollover", "retrieval"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--version" in r.stderr


def test_recctl_without_a_control_plane_says_so(tmp_path):
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "recserve.control.recctl", "--root", str(tmp_path), "--control",
                        f"127.0.0.1:{port}", "--timeout", "3", "status"], capture_output=True, text=True, timeout=60)
    # exit 3 (cannot reach the control plane), said on stderr, nothing on stdout (recctl's exit-code table)
    assert r.returncode == 3 and "no control plane" in r.stderr and r.stdout == "", (r.returncode, r.stderr)


class _FakeFleet:
    """Just enough of Fleet for RolloutManager._bake: one instance whose client is slow or failing."""

    def __init__(self, client):
        from types import SimpleNamespace

        from recserve.control.monitoring.metrics import ControlMetrics

        self.metrics = ControlMetrics()
        self.canary_broken: dict[str, str] = {}
        self._client = client
        inst = SimpleNamespace(versions={"retrieval": [2]}, metrics_port=free_port())
        self.state = SimpleNamespace(instance=lambda iid: inst)
        from recserve.control.fleet.golden import ask

        # the golden checker's contract the rollout uses: requests, ask (the instance's answers), expected, compare
        self.golden = SimpleNamespace(requests={"recommend": {"user_id": 1, "history": [1]},
                                                "search": {"query": "q", "user_id": None}},
                                      ask=ask, expected=lambda versions: "expected answers",
                                      compare=lambda got, exp: "")

    def client(self, iid):
        return self._client if iid == "t2" else _Client()

    def metrics_url(self, iid):
        return f"http://127.0.0.1:{self.state.instance(iid).metrics_port}/metrics"


class _Client:
    def __init__(self, delay_s: float = 0.0, fail: bool = False):
        self.delay_s, self.fail, self.calls = delay_s, fail, 0

    def _answer(self):
        import time

        from recserve.control.client import Result

        self.calls += 1
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("INTERNAL: device failure")
        return Result([1, 2], [0.5, 0.4])

    def recommend(self, user_id, history):
        return self._answer()

    def search(self, query, user_id=None):
        return self._answer()


def _bake(client, gates: Gates, base_p99_ms: float, bake_s: float = 1.0, ref=None):
    from recserve.control.rollout.manager import RolloutManager

    rm = RolloutManager.__new__(RolloutManager)
    rm.fleet, rm.probe_interval_s, rm._abort = _FakeFleet(client), 0.01, {}
    rm.state = rm.fleet.state
    if ref is not None:
        rm.fleet.client = lambda iid: client if iid == "t2" else ref
    rec = RolloutRecord(id="r", model="retrieval", from_version=1, to_version=2, strategy="canary", steps=[100],
                        bake_seconds=bake_s, gates={}, phase="bake", status="running", started=0.0)
    return rm._bake(rec, "t2", gates, base_p99_ms, ref_iid="t1")


def test_p99_gate_fails_a_slow_canary_and_records_the_value():
    from recserve.control.rollout.manager import GateFailure

    with pytest.raises(GateFailure) as exc:
        _bake(_Client(delay_s=0.05), Gates(max_p99_ratio=3.0, min_p99_ms=20.0), base_p99_ms=10.0)
    assert exc.value.gate == "p99_ratio" and exc.value.value > 3.0 and exc.value.threshold == 3.0


def test_error_rate_gate_fails_fast_and_green_canary_passes():
    from recserve.control.rollout.manager import GateFailure

    failing = _Client(fail=True)
    with pytest.raises(GateFailure) as exc:
        _bake(failing, Gates(), base_p99_ms=10.0, bake_s=5.0)
    assert exc.value.gate == "error_rate" and exc.value.value == 1.0
    # it did not wait for the whole bake: 5 s of probes every 10 ms would be several hundred calls
    assert failing.calls < 200, failing.calls
    vals = _bake(_Client(), Gates(), base_p99_ms=10.0, bake_s=0.5)
    assert vals["error_rate"] == 0.0 and vals["requests"] > 0
    # contention that slows the old version as much as the new one is not the new version's fault
    both_slow = _bake(_Client(delay_s=0.05), Gates(min_p99_ms=20.0), base_p99_ms=10.0, bake_s=0.5, ref=_Client(0.05))
    assert both_slow["p99_ratio"] < 3
    # a slow canary under the p99 noise floor passes: milliseconds of jitter are not a regression
    assert _bake(_Client(delay_s=0.02), Gates(min_p99_ms=200.0), base_p99_ms=1.0, bake_s=0.3)["p99_ratio"] > 3


def test_bake_without_expected_answers_fails_the_golden_gate():
    """No expectation (reference broken, no recorded fallback) is a red gate, never a pass on the canary's word."""
    from recserve.control.rollout.manager import GateFailure, RolloutManager

    rm = RolloutManager.__new__(RolloutManager)
    rm.fleet, rm.probe_interval_s, rm._abort = _FakeFleet(_Client()), 0.01, {}
    rm.fleet.golden.expected = lambda versions: None
    rm.fleet.golden.problem = lambda versions: "the reference failed: RuntimeError: broken"
    rm.state = rm.fleet.state
    rec = RolloutRecord(id="r", model="retrieval", from_version=1, to_version=2, strategy="canary", steps=[100],
                        bake_seconds=0.3, gates={}, phase="bake", status="running", started=0.0)
    with pytest.raises(GateFailure) as exc:
        rm._bake(rec, "t2", Gates(), 10.0, ref_iid="t1")
    assert exc.value.gate == "golden" and "the reference failed" in str(exc.value)


def test_reload_of_an_instance_the_route_sends_nothing_to_loads_at_nice_19():
    """The promote phase of a canary rollover reloads the old primary while the canary alone serves (its weight is
    0, but it is still a pool member): loading it at the serving priority took the CPU from the one instance every
    request waited on. An instance taking traffic keeps its priority while it loads."""
    from types import SimpleNamespace

    from recserve.control.fleet.instances import Instances
    from recserve.control.state.store import InstanceRecord

    class Lifecycle(Instances):
        def __init__(self, serving: set[int]):
            self.recs = {iid: InstanceRecord(id=iid, slot=slot, role=role, state="healthy", pid=slot + 1,
                                             grpc_port=0, http_port=0, metrics_port=0, workdir="w")
                         for iid, slot, role in (("t1", 0, "standby"), ("t2", 1, "primary"))}
            state = SimpleNamespace(update_instance=lambda iid, **kw: None, instance=self.recs.get,
                                    instances=lambda: list(self.recs.values()), event=lambda *a, **kw: None)
            router = SimpleNamespace(pool_slots=lambda: {0}, serving_slots=lambda: serving,
                                     set_pool=lambda slots: None)
            supervisor = SimpleNamespace(hold=lambda iid: None, release=lambda iid: None,
                                         passed=lambda iid, probe: None)
            # warm-up off: this unit is about the nice a load runs at (tests/test_warmup*.py cover the warm-up)
            config = SimpleNamespace(mode="active-active", instance_nice=5, warmup_rounds=0, warmup_ratio=1.5,
                                     warmup_deadline_s=20.0)
            super().__init__(config, Path("root"), Path("repo"), "",
                             state, router, None, None, None, supervisor, threading.Lock())
            self.nices: list[int] = []

        def renice(self, rec, nice):
            self.nices.append(nice)

        def server(self, rec):
            return None

        def load_versions(self, server, versions, only=None):
            self.nices.append("loaded")

        def settle(self, iid, timeout_s=30.0):
            return SimpleNamespace(ok=True)

    idle = Lifecycle(serving={1})  # split route: t2 (the canary) at weight 100, t1 at 0
    with mock.patch("recserve.control.fleet.instances.can_raise_priority", return_value=True):
        idle.reload("t1", {"ranker": [2]}, only=["ranker"])
        assert idle.nices == [19, "loaded", 5]
        serving = Lifecycle(serving={0, 1})
        serving.reload("t1", {"ranker": [2]}, only=["ranker"])
        assert serving.nices == [5, "loaded"]


def test_the_knee_from_the_perf_report_is_read_once_per_version_of_the_report(tmp_path):
    """Every route or weight change asks for the limits, hence the knee: the report is parsed again only when
    it changed (a new perf run), and a missing report gives the conservative default."""
    import os

    from recserve.control.routing.router import DEFAULT_KNEE_RPS, default_knee_rps
    from recserve.perf import report_reader

    report = tmp_path / "report.json"
    assert default_knee_rps("recommend", report) == (DEFAULT_KNEE_RPS, "conservative default (no perf report)")
    report.write_text(json.dumps({"capacity_rps": {"recommend": 640}}))
    with mock.patch("recserve.perf.report_reader.capacity_rps", wraps=report_reader.capacity_rps) as read:
        assert default_knee_rps("recommend", report)[0] == 640
        assert default_knee_rps("recommend", report)[0] == 640
        assert read.call_count == 1
        report.write_text(json.dumps({"capacity_rps": {"recommend": 700}}))
        st = report.stat()
        os.utime(report, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new run, even within one tick
        assert default_knee_rps("recommend", report)[0] == 700 and read.call_count == 2


def test_the_rollover_stream_ends_with_the_terminal_event_even_when_the_record_is_saved_first(tmp_path):
    """The manager saves a finished record before it writes the terminal event; a stream that ended on the record
    alone lost that event (a CI run saw a succeeded blue-green rollover end its stream at status 'running')."""
    from types import SimpleNamespace

    from recserve.control.api.proto import control_pb2 as pb
    from recserve.control.api.server import ControlPlane

    state = State(tmp_path / "state.db")
    rec = RolloutRecord("r1", "ranker", 1, 2, "canary", [100], 1.0, {}, "bake", "running", 0.0)
    state.save_rollout(rec)
    state.add_rollout_event("r1", "bake", "green")
    polls = []

    class Context:
        def is_active(self) -> bool:
            polls.append(1)
            if len(polls) == 1:  # between the record's save and the terminal event
                rec.status = "succeeded"
                state.save_rollout(rec)
            elif len(polls) == 3:
                state.add_rollout_event("r1", "done", "on every instance", status="succeeded")
            return True

    plane = SimpleNamespace(_auth=lambda c: None, _ready=lambda c: None, fleet=SimpleNamespace(state=state),
                            _call=lambda c, f, *a: "r1", rollouts=SimpleNamespace(start=None))
    events = list(ControlPlane.Rollover(plane, pb.RolloverRequest(model="ranker", version=2), Context()))
    assert [e.status for e in events] == ["running", "succeeded"] and events[-1].done
    state.close()
