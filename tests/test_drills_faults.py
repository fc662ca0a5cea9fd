"""Fault building blocks on real processes and real ONNX graphs (the fleet-level faults run in the smoke
drills): signals and /proc state, the fault-switch lookup, the wrong-answer version, the fixture models."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from recserve.control.runtime.triton import DEFAULT_REPOSITORY
from recserve.drills.faults import FAULTS, NetworkPartition, _negate_outputs, fault_dir_of, process_state
from recserve.drills.figures import DrillFigures
from recserve.drills.fixture_models import make_repository
from recserve.drills.spec import FAULT_PARAMS


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repository(DEFAULT_REPOSITORY, tmp_path_factory.mktemp("fx") / "repo")


def test_every_spec_fault_has_an_implementation_with_a_simulation_note():
    assert set(FAULTS) == set(FAULT_PARAMS)
    assert all(f.simulation for f in FAULTS.values())


def _wait_exec(pid: int, name: bytes = b"sleep") -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if open(f"/proc/{pid}/cmdline", "rb").read().startswith(name):
                return
        except OSError:
            pass
        time.sleep(0.005)


def test_stop_cont_and_fault_dir_on_a_real_process(tmp_path):
    env = dict(os.environ, RECSERVE_FAULT_DIR=str(tmp_path / "faults"))
    p = subprocess.Popen(["sleep", "30"], env=env)
    try:
        _wait_exec(p.pid)  # before exec, /proc shows the parent's environment
        assert fault_dir_of(p.pid) == tmp_path / "faults"
        os.kill(p.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while process_state(p.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_state(p.pid) == "T"
        os.kill(p.pid, signal.SIGCONT)
        deadline = time.monotonic() + 5
        while process_state(p.pid) == "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_state(p.pid) in ("S", "R")
    finally:
        p.kill()
        p.wait()
    assert process_state(p.pid) == "" and fault_dir_of(p.pid) is None
    plain = subprocess.Popen(["sleep", "30"], env={k: v for k, v in os.environ.items() if k != "RECSERVE_FAULT_DIR"})
    try:
        _wait_exec(plain.pid)
        assert fault_dir_of(plain.pid) is None
    finally:
        plain.kill()
        plain.wait()


def _config_io(repo, model: str) -> tuple[list[str], list[str]]:
    text = (repo / model / "config.pbtxt").read_text()
    block = lambda key: re.findall(r'name:\s*"([^"]+)"', text.split(f"{key} [", 1)[1].split("]\n", 1)[0])  # noqa: E731
    return block("input"), block("output")


@pytest.mark.parametrize("model", ["retrieval", "ranker", "search_model"])
def test_fixture_models_match_the_committed_configs(repo, model):
    sess = ort.InferenceSession(str(repo / model / "1" / "model.onnx"))
    inputs, outputs = _config_io(repo, model)
    assert [i.name for i in sess.get_inputs()] == inputs
    assert [o.name for o in sess.get_outputs()] == outputs
    feeds = {i.name: np.random.default_rng(0).integers(0, 10**6, (2, i.shape[1])).astype(np.int64)
             for i in sess.get_inputs()}
    out = sess.run(None, feeds)
    assert all(o.shape[0] == 2 for o in out)
    assert (repo / model / "1" / "manifest.json").exists()


def test_negated_copy_answers_wrongly(repo, tmp_path):
    src = repo / "ranker" / "1" / "model.onnx"
    bad = tmp_path / "bad.onnx"
    shutil.copy(src, bad)
    _negate_outputs(bad)
    onnx.checker.check_model(onnx.load(str(bad)))
    hist = np.zeros((1, 50), np.int64)
    hist[0, -3:] = [11, 12, 13]
    feeds = {"history": hist, "candidates": np.arange(1, 101, dtype=np.int64)[None]}
    good = ort.InferenceSession(str(src)).run(None, feeds)[0]
    wrong = ort.InferenceSession(str(bad)).run(None, feeds)[0]
    np.testing.assert_allclose(wrong, -good, rtol=1e-6)
    assert list(np.argsort(-good[0])[:20]) != list(np.argsort(-wrong[0])[:20])


def _netns_state() -> tuple[str, str]:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return (subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout,
            "\n".join(ln for ln in links.splitlines() if "rsd" in ln))


def test_network_partition_check_answers_in_one_line_and_leaves_nothing():
    before = _netns_state()
    why = NetworkPartition().check(None)
    assert why is None or ("\n" not in why and "namespace" in why)
    assert _netns_state() == before


@pytest.mark.slow
def test_partitioned_path_cut_is_detected_routed_around_and_cleaned_up(repo, tmp_path):
    """Real namespace, veth, two tritonservers and HAProxy (about 30 s)."""
    from recserve.control.client import RecClient
    from recserve.drills.partition import PartitionedPath

    if NetworkPartition().check(None):
        pytest.skip("network namespaces cannot be made here")
    before = _netns_state()
    path = PartitionedPath(repo, tmp_path / "p")
    try:
        path.start()
        assert path.server_status("inside") == "UP"
        t = time.time()
        path.watch("inside", "DOWN", t, 10)
        path.cut()
        with RecClient(path.url, timeout_s=5) as c:
            answers = [c.recommend(7, [11, 12, 13]).item_ids for _ in range(20)]
        assert len({tuple(a) for a in answers}) == 1, "the standby answers the same during the partition"
        deadline = time.monotonic() + 5
        while "DOWN" not in path.seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "DOWN" in path.seen, "HAProxy never marked the cut-off instance down"
        up = path.watch("inside", "UP", time.time(), 10)
        assert path.restore()
        up.join(10)
        assert "UP" in path.seen, "the instance did not rejoin after the link came back"
    finally:
        path.close()
    assert _netns_state() == before, "namespace or veth left behind"
    assert not [p for p in (path.inside, path.outside) if p.is_alive()]


def test_group_members_finds_children_that_outlive_their_leader():
    from recserve.drills.faults import group_members

    leader = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while len(group_members(leader.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert leader.pid in group_members(leader.pid) and len(group_members(leader.pid)) == 3
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait()
        orphans = group_members(leader.pid)
        assert len(orphans) == 2 and leader.pid not in orphans
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while group_members(leader.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert group_members(leader.pid) == []


def test_background_exit_is_a_failed_request_unless_every_error_is_not_about_requests():
    """perf_analyzer as background load: exit 0 is clean; a non-zero exit is a failed request unless its only
    complaints are statistics calls or a measurement it would not call stable (a fault inside a window does that)."""
    from recserve.drills.background import judge

    unstable = ("Request concurrency: 2\n  Pass [3] throughput: 120 infer/sec. Avg latency: 16000 usec\n"
                "Failed to obtain stable measurement within 3 measurement windows for concurrency 2. Please try to "
                "increase the --measurement-interval.\n")
    assert judge(2, unstable)["not_requests"] and judge(2, unstable)["unstable"]
    stats = "error: failed to find the requested model version\n"
    assert judge(99, stats)["not_requests"] and judge(99, stats)["stats"]
    failed = unstable + "Thread [0] had error: [StatusCode.UNAVAILABLE] failed to connect to all addresses\n"
    assert not judge(99, failed)["not_requests"] and judge(99, failed)["request_errors"]
    assert not judge(1, "")["not_requests"]  # a non-zero exit with nothing said: counted as a failure
    assert not judge(1, "error: something else entirely\n")["not_requests"]
    assert not judge(0, unstable)["not_requests"]  # exit 0 needs no excuse
    # only the unloaded version's statistics call is excused, not any line that mentions statistics
    assert not judge(99, "error: failed to get model statistics: socket closed\n")["not_requests"]
    assert not judge(99, stats + "error: statistics unavailable\n")["not_requests"]


def test_background_exit_time_is_when_perf_analyzer_exited_not_when_the_drill_asked(tmp_path):
    """``covered_fault`` compares the exit time with the fault's end: it must be the process's own exit time,
    recorded as it happens, not the time ``finish()`` was called after the drill (then it always 'covered')."""
    from recserve.drills.background import BackgroundLoad

    log = tmp_path / "perf_analyzer.log"
    log.write_text("")
    t0 = time.time()
    load = BackgroundLoad(subprocess.Popen(["sleep", "0.2"]), ["sleep", "0.2"], log, t0).watch()
    time.sleep(1.5)
    got = load.finish(timeout_s=5)
    assert got["exit_code"] == 0
    assert got["ended_at"] - t0 < 1.0, got["ended_at"] - t0


def test_rollover_fault_waits_for_a_shedding_pool_and_gives_up_on_any_other_refusal(tmp_path, monkeypatch):
    """The control plane refuses to start a rollout while the pool sheds (UNAVAILABLE): the drill waits for the
    peak to pass, bounded, and says how long; any other refusal ends the injection at once (the drill then fails
    its fault_injected check)."""
    from types import SimpleNamespace

    from recserve.drills import faults
    from recserve.drills.fleet import FleetError
    from recserve.drills.spec import Action

    class Fleet:
        def __init__(self, refusals: list[str]):
            self.refusals, self.calls = refusals, 0

        def desired(self):
            return {"ranker": [1]}

        def rollover(self, model, version, strategy, steps, bake_s):
            self.calls += 1
            if self.refusals:
                code = self.refusals.pop(0)
                raise FleetError(f"control plane Rollover: {code}: refused", code)
            return [{"phase": "done", "status": "succeeded", "ts_unix": 1.0}]

    class Clock:  # time advances only by the fault's own sleeps: the wait it reports is exactly theirs
        now = 100.0

        def monotonic(self) -> float:
            return self.now

        def sleep(self, s: float) -> None:
            self.now += s

    monkeypatch.setattr(faults, "time", Clock())
    action = Action(fault="rollover-under-load", at_s=1.0, params={"model": "ranker", "version": 2,
                    "strategy": "canary", "steps": [100], "bake_s": 0})
    shedding = Fleet(["UNAVAILABLE", "UNAVAILABLE"])
    got = faults.Rollover().inject(SimpleNamespace(fleet=shedding, figures=DrillFigures(), desired_before=None), action)
    assert got["status"] == "succeeded" and shedding.calls == 3
    assert got["waited_for_the_pool_to_stop_shedding_s"] == 1.0  # two refusals, 0.5 s apart
    other = Fleet(["FAILED_PRECONDITION"])
    with pytest.raises(FleetError) as exc:
        faults.Rollover().inject(SimpleNamespace(fleet=other, figures=DrillFigures(), desired_before=None), action)
    assert exc.value.code == "FAILED_PRECONDITION" and other.calls == 1
