"""recctl as a command line: output formats, exit codes, parse-time validation, --dry-run, --wait, --version and
shell completion (issue 23, item 1).

Nothing here starts a fleet: the parser is walked, and the commands talk to a fake control plane (``recctl._stub``)
and a fake Kubernetes API (``ctl._api``, and kmock's in-memory API in the last test), the only ways recctl reaches
either. recctl against one real fleet (every --dry-run changes nothing, the docs' fleet examples, the status page in
Chromium) is tests/test_recctl_fleet.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from recserve.control.api import recctl
from recserve.control.api.cli_output import FORMATS
from recserve.control.api.proto import control_pb2 as pb
from recserve.control.kube import ctl
from recserve.control.runtime.triton import free_port
from recserve.control.spec.init import init_spec
from tests.byo_repository import VARIED_MODEL, _save, ctr_graph, make_repository

MUTATING = {"AddInstance", "RemoveInstance", "DrainInstance", "PromoteInstance", "Scale", "SetKnee", "Rollover",
            "Rollback", "CreateSnapshot", "RestoreSnapshot", "RunBackup"}


# ---------------------------------------------------------------------------------------------- fakes
def _versions(*v: int) -> pb.Versions:
    return pb.Versions(versions=list(v))


def _instance(iid: str, role: str) -> pb.Instance:
    return pb.Instance(id=iid, role=role, state="healthy", pid=100 + int(iid[1:]), grpc_port=9001, http_port=9002,
                       weight=1, models={"ranker": _versions(2)}, limit=2, in_pool=role == "active")


class FakeControlPlane:
    """The ControlPlaneStub surface recctl uses, answering real protobuf messages; records every call."""

    def __init__(self, verdict: str = "succeeded"):
        self.calls: list[str] = []
        self.verdict = verdict

    def __getattr__(self, name):
        answer = getattr(self, f"_{name}")

        def call(req, metadata=None, timeout=None):
            self.calls.append(name)
            return answer(req)

        return call

    def _GetStatus(self, req):
        return pb.FleetStatus(
            endpoints=pb.Endpoints(grpc="127.0.0.1:8001", http="127.0.0.1:8000", control="127.0.0.1:50051",
                                   metrics="127.0.0.1:9108"),
            instances=[_instance("t1", "active"), _instance("t2", "standby")], desired={"ranker": _versions(2)},
            health="ok", warnings=["the host is not hardened [test]"], mode="active-active", active_target=1,
            knee_rps=40, knee_source="configured (--knee-rps)", host_limit=2, route="pool")

    _Scale = _SetKnee = _GetStatus

    def _rollout(self, status: str) -> pb.Rollout:
        return pb.Rollout(id="r1", model="ranker", from_version=1, to_version=2, strategy="canary", phase="done",
                          status=status, failed_gate="p99_ratio" if status == "rolled_back" else "",
                          failed_value=4.2, threshold=3.0)

    def _GetRollout(self, req):
        return self._rollout("succeeded" if self.verdict == "succeeded" else self.verdict)

    def _Rollback(self, req):
        return self._rollout("succeeded")

    def _Rollover(self, req):
        steps = list(req.steps) or [10, 50, 100]
        for w in steps:
            yield pb.RolloutEvent(rollout_id="r1", phase="shift", weight=w, message=f"canary at {w}%",
                                  gates={"error_rate": 0.0, "p99_ratio": 1.2}, status="running", ts_unix=time.time())
        msg = "ranker at version 3" if self.verdict == "succeeded" else "rolled back to ranker 2: gate p99_ratio"
        yield pb.RolloutEvent(rollout_id="r1", phase="done", weight=100, message=msg, done=True, status=self.verdict,
                              ts_unix=time.time())

    def _AddInstance(self, req):
        return _instance("t3", req.role)

    def _RemoveInstance(self, req):
        return _instance(req.id, "standby")

    _DrainInstance = _PromoteInstance = _RemoveInstance

    def _ListVersions(self, req):
        return pb.ListVersionsResponse(model=req.model, versions=[
            pb.VersionInfo(version=v, verified=True, desired=v == 2, files=3, built_at="today") for v in (1, 2, 3)])

    def _snapshot(self) -> pb.Snapshot:
        return pb.Snapshot(id="s1", created_unix=1.7e9, files=12, bytes=4096, models={"ranker": _versions(1, 2)},
                           note="n")

    def _CreateSnapshot(self, req):
        return self._snapshot()

    def _ListSnapshots(self, req):
        return pb.ListSnapshotsResponse(snapshots=[self._snapshot()])

    def _RestoreSnapshot(self, req):
        return pb.RestoreSnapshotResponse(id=req.id, restored_files=2, verified_files=12)

    def _GetBackupPolicy(self, req):
        return pb.BackupPolicyInfo(configured=True, source="policy.yaml", target="/backups", every_hours=6,
                                   keep_last=3, daily_days=5, after_rollover=True, max_age_seconds=23400)

    def _backup(self) -> pb.Backup:
        return pb.Backup(id="b1", created_unix=1.7e9, trigger="manual", files=12, bytes=4096, verified=True,
                         verified_unix=1.7e9, desired={"ranker": _versions(2)})

    def _RunBackup(self, req):
        return self._backup()

    def _ListBackups(self, req):
        return pb.ListBackupsResponse(target="/backups", backups=[self._backup()])


class _Channel:
    def close(self) -> None:
        pass


class FakeCustom:
    """CustomObjectsApi: create, get (each read moves the rollout one status on), delete."""

    def __init__(self, statuses: list[dict]):
        self.statuses = list(statuses)
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.reads = 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append(body)
        return {**body, "metadata": {**body["metadata"], "uid": "u1"}}

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.reads += 1
        st = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {**self.created[-1], "status": st}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)


ROLLING = [{"result": "Running", "phase": "shift", "history": [{"weight": 10}], "gates": {"error_rate": 0.0}},
           {"result": "Running", "phase": "shift", "history": [{"weight": 10}], "gates": {"error_rate": 0.0}},
           {"result": "Running", "phase": "bake", "history": [{"weight": 10}, {"weight": 100}],
            "gates": {"error_rate": 0.0, "p99_ratio": 1.1}}]


class FakeKube:
    def __init__(self, final: dict | None = None):
        self.custom = FakeCustom(ROLLING + [final or {"result": "Succeeded", "phase": "done", "message": "at v3"}])

    def rollouts(self) -> list[dict]:
        return [{"metadata": {"name": "ranker-v3"}, "spec": {"model": "ranker", "version": 3},
                 "status": {"result": "Running", "phase": "bake", "fromVersion": 2}},
                {"metadata": {"name": "ranker-v2"}, "spec": {"model": "ranker", "version": 2},
                 "status": {"result": "Succeeded", "phase": "done", "fromVersion": 1}}]

    def fleet(self, name: str) -> dict:
        return {"status": {"pods": 2, "readyPods": 2, "versionsText": "ranker:2",
                           "instances": [{"pod": "p1", "role": "active", "state": "healthy", "goldenOk": True}]}}


@pytest.fixture(scope="module")
def byo_spec(tmp_path_factory) -> tuple:
    """A user's repository and the spec recctl init wrote for it (``init``, ``spec validate``), once per module."""
    base = tmp_path_factory.mktemp("byo")
    byo = make_repository(base / "repo")
    init_spec(byo, base / "spec" / "spec.yaml", n_requests=2)
    _save(ctr_graph("perturbed"), base / "new.onnx")
    return byo, base / "spec" / "spec.yaml"


@pytest.fixture
def env(tmp_path, monkeypatch, byo_spec):
    """A runtime root with a token, a fake control plane, a fake cluster, and `run(argv) -> (rc, out, err)`."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "token").write_text("t0k3n\n")
    uproot = tmp_path / "uproot"  # a root whose control plane "runs" (recctl up: already up)
    uproot.mkdir()
    (uproot / "control.pid").write_text("4242")
    repo = tmp_path / "repo"
    repo.mkdir()
    target = tmp_path / "backups"
    target.mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"target": {"path": str(target)}}))
    plane = FakeControlPlane()
    kube: list[FakeKube] = []
    monkeypatch.setattr(recctl, "_stub", lambda args: (plane, _Channel()))
    monkeypatch.setattr(recctl, "_control_pid", lambda r: 4242 if (r / "control.pid").exists() else None)
    monkeypatch.setattr(recctl, "read_endpoints", lambda r: {})

    def api(args):
        kube.append(FakeKube())
        return kube[-1]

    monkeypatch.setattr(ctl, "_api", api)
    byo, byospec = byo_spec
    env = argparse.Namespace(root=root, uproot=uproot, repo=repo, target=target, policy=policy, plane=plane,
                             kube=kube, tmp=tmp_path, byo=byo, byospec=byospec)

    def run(argv: list[str]) -> tuple[int, str, str]:
        argv = argv if argv[:1] == ["--root"] else ["--root", "{root}", *argv]
        rc = recctl.main([a.format(**vars(env)) for a in argv])
        got = env.capsys.readouterr()
        return rc, got.out, got.err

    env.run = run
    return env


@pytest.fixture
def cli(env, capsys):
    env.capsys = capsys
    return env


#: Every command recctl has (its path in the parser) with argument lists that exercise it against the fakes;
#: `test_every_command_is_walked` fails when a command is added without an entry here.
SAMPLES: dict[str, list[list[str]]] = {
    "up": [["--root", "{uproot}", "up"], ["--root", "{tmp}/fresh", "up", "--repository", "{repo}", "--dry-run"]],
    "down": [["down"], ["down", "--dry-run"]],
    "status": [["status"], ["status", "--html", "{tmp}/status.html"]],
    "rollover": [["rollover", "ranker", "--version", "3", "--steps", "10,100", "--bake", "0"],
                 ["rollover", "ranker", "--version", "3", "--dry-run"]],
    "rollback": [["rollback", "ranker"], ["rollback", "ranker", "--dry-run"]],
    "rollout": [["rollout", "ranker"]],
    "promote": [["promote", "t2"], ["promote", "t2", "--dry-run"]],
    "drain": [["drain", "t1"], ["drain", "t1", "--dry-run"]],
    "scale": [["scale", "--active", "2"], ["scale", "--active", "2", "--dry-run"]],
    "limits": [["limits"], ["limits", "--knee-rps", "100"], ["limits", "--knee-rps", "100", "--dry-run"]],
    "instances add": [["instances", "add", "--role", "active"], ["instances", "add", "--dry-run"]],
    "instances remove": [["instances", "remove", "t2"], ["instances", "remove", "t2", "--dry-run"]],
    "versions": [["versions", "ranker"]],
    "snapshot": [["snapshot", "--note", "n"], ["snapshot", "--dry-run"]],
    "snapshots": [["snapshots"], ["snapshots", "--from", "{target}"]],
    "restore": [["restore", "s1"], ["restore", "s1", "--dry-run"]],
    "backup": [["backup", "policy"], ["backup", "policy", "--check", "{policy}"], ["backup", "now"],
               ["backup", "now", "--dry-run"], ["backup", "list"], ["backup", "list", "--from", "{target}"]],
    "init": [["init", "--repository", "{byo}", "--out", "{tmp}/s/spec.yaml", "--force", "--requests", "2"]],
    "spec": [["spec", "validate", "{byospec}"]],
    "release": [["release", VARIED_MODEL, "--onnx", "{byospec.parent.parent}/new.onnx", "--spec", "{byospec}",
                 "--dry-run"]],
    "k8s status": [["k8s", "status"]],
    "k8s rollouts": [["k8s", "rollouts"]],
    "k8s rollover": [["k8s", "rollover", "ranker", "--version", "3", "--name", "r3"],
                     ["k8s", "rollover", "ranker", "--version", "3", "--name", "r3", "--wait", "--poll", "0.1"],
                     ["k8s", "rollover", "ranker", "--version", "3", "--name", "r3", "--dry-run"]],
    "k8s rollback": [["k8s", "rollback", "ranker"], ["k8s", "rollback", "ranker", "--dry-run"]],
}
#: Commands without -o, and why.
NO_OUTPUT = {"completion": "prints a shell script"}


def _leaves(p: argparse.ArgumentParser, path: str = "") -> dict[str, argparse.ArgumentParser]:
    sub = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None:
        return {path: p}
    out: dict[str, argparse.ArgumentParser] = {}
    for name, child in sub.choices.items():
        out |= _leaves(child, f"{path} {name}".strip())
    return out


# ---------------------------------------------------------------------------------------------- the walk
def test_every_command_is_walked_and_takes_o():
    leaves = _leaves(recctl.build_parser())
    assert set(leaves) == set(SAMPLES) | set(NO_OUTPUT), "add the new command to SAMPLES (or NO_OUTPUT, with why)"
    for path, p in leaves.items():
        outputs = [a for a in p._actions if a.dest == "output"]
        if path in NO_OUTPUT:
            assert not outputs, path
            continue
        opts = {o: a for a in outputs for o in a.option_strings}
        assert set(opts) == {"-o", "--output", "--json"}, (path, opts)
        assert tuple(opts["-o"].choices) == FORMATS and opts["--json"].const == "json", path
        assert p.parse_args(["-o", "yaml"] + _required(p)).output == "yaml", path


def _required(p: argparse.ArgumentParser) -> list[str]:
    """Values for the required arguments of ``p`` (enough to parse)."""
    argv: list[str] = []
    for a in p._actions:
        if a.option_strings and a.required:
            value = {"existing_dir": os.path.dirname(__file__), "existing_file": __file__}.get(
                getattr(a.type, "__name__", ""), "3")
            argv += [a.option_strings[-1], value]
        elif not a.option_strings and a.nargs is None and a.dest != "help":
            path = {"existing_dir": os.path.dirname(__file__), "existing_file": __file__}.get(
                getattr(a.type, "__name__", ""))
            argv.append(str(a.choices[0]) if a.choices else path or "ranker")
    return argv


@pytest.mark.parametrize("path", sorted(SAMPLES))
def test_output_flags_are_honoured(cli, path):
    """json: one document and nothing else on stdout; yaml: the same document; table: not that document;
    --json: the same as -o json. Errors, warnings and progress are on stderr only."""
    for argv in SAMPLES[path]:
        docs = {}
        for fmt in FORMATS:
            rc, out, err = cli.run(argv + ["-o", fmt])
            assert rc == 0, (argv, fmt, out, err)
            assert "Traceback" not in err
            if fmt == "json":
                docs[fmt] = json.loads(out)
            elif fmt == "yaml":
                docs[fmt] = yaml.safe_load(out)
            else:
                assert out.strip(), (argv, "table printed nothing")
                with pytest.raises(ValueError):
                    json.loads(out)
        assert docs["yaml"] == docs["json"], argv
        rc, out, _ = cli.run(argv + ["--json"])
        assert rc == 0 and json.loads(out) == docs["json"], argv
        if "--dry-run" in argv:
            assert docs["json"]["dry_run"] is True, argv


def test_warnings_and_progress_go_to_stderr(cli):
    rc, out, err = cli.run(["status", "-o", "json"])
    assert rc == 0 and json.loads(out)["warnings"] == ["the host is not hardened [test]"]
    assert "warning: the host is not hardened [test]" in err
    rc, out, err = cli.run(["rollover", "ranker", "--version", "3", "--steps", "10,100", "-o", "json"])
    doc = json.loads(out)
    assert rc == 0 and doc["status"] == "succeeded" and doc["id"] == "r1"
    assert "shift" in err and "canary at 10%" in err and "p99_ratio=1.2" in err


def test_status_html_writes_the_page_and_leaves_the_output_as_it_was(cli):
    """--html FILE is a page next to the -o output, not another format: stdout is the same document with or without
    it; the page (control/htmlpage.py, checked in Chromium with a real fleet in tests/test_recctl_fleet.py) holds the
    instances and the warning."""
    page = cli.tmp / "status.html"
    rc, plain, _ = cli.run(["status", "-o", "json"])
    rc2, out, err = cli.run(["status", "--html", str(page), "-o", "json"])
    assert rc == rc2 == 0 and json.loads(out) == json.loads(plain)
    assert f"status page written to {page}" in " ".join(err.split())
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "the host is not hardened [test]" in text
    assert ">t1<" in text and ">t2<" in text and "<script" not in text


def test_a_rolled_back_rollover_exits_1_with_its_verdict(cli):
    cli.plane.verdict = "rolled_back"
    rc, out, err = cli.run(["rollover", "ranker", "--version", "3"])
    assert rc == 1 and "rolled_back" in out and "rolled back to ranker 2" in out, (out, err)
    assert "canary at 50%" in err and "canary at 50%" not in out
    rc, out, _ = cli.run(["rollover", "ranker", "--version", "3", "-o", "yaml"])
    assert rc == 1 and yaml.safe_load(out)["failed_gate"] == "p99_ratio"


def test_k8s_rollover_wait_streams_each_change_and_ends_with_the_verdict(cli, monkeypatch):
    rc, out, err = cli.run(["k8s", "rollover", "ranker", "--version", "3", "--name", "r3", "--wait", "--poll", "0.1",
                            "-o", "json"])
    assert rc == 0 and json.loads(out)["status"]["result"] == "Succeeded", (out, err)
    assert "ModelRollout r3 created; waiting" in err
    lines = [ln for ln in err.splitlines() if " r3 " in ln and "created" not in ln]
    assert len(lines) == 3, err  # shift 10%, bake 100%, done: the unchanged second read prints nothing
    assert "shift" in lines[0] and " 10%" in lines[0] and "error_rate=0" in lines[0]
    assert "bake" in lines[1] and "100%" in lines[1] and "p99_ratio=1.1" in lines[1]
    assert "Succeeded" in lines[2]
    monkeypatch.setattr(ctl, "_api", lambda args: FakeKube({"result": "RolledBack", "phase": "done",
                                                            "failedGate": "p99_ratio", "message": "p99 x4"}))
    rc, out, err = cli.run(["k8s", "rollover", "ranker", "--version", "3", "--name", "r3", "--wait", "--poll", "0.1"])
    assert rc == 1 and "RolledBack" in out and "failed gate p99_ratio" in out, (out, err)


# ---------------------------------------------------------------------------------------------- exit codes
def test_status_without_a_control_plane_is_one_stderr_line_and_exit_3(tmp_path):
    r = subprocess.run([sys.executable, "-m", "recserve.control.recctl", "--root", str(tmp_path), "--control",
                        f"127.0.0.1:{free_port()}", "--timeout", "5", "status", "-o", "json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r
    assert r.stdout == ""
    assert r.stderr.startswith("recctl: no control plane at 127.0.0.1:") and len(r.stderr.splitlines()) == 1, r.stderr


def test_refusals_map_to_their_exit_codes(cli, monkeypatch):
    import grpc

    class Refused(grpc.RpcError):
        def __init__(self, code, details):
            self._c, self._d = code, details

        def code(self):
            return self._c

        def details(self):
            return self._d

    def refusing(code, details):
        def call(req, metadata=None, timeout=None):
            raise Refused(code, details)

        return call

    for code, rc_want in ((grpc.StatusCode.INVALID_ARGUMENT, 2), (grpc.StatusCode.FAILED_PRECONDITION, 1),
                          (grpc.StatusCode.PERMISSION_DENIED, 1), (grpc.StatusCode.UNAVAILABLE, 3)):
        cli.plane.__dict__["Scale"] = refusing(code, "failed to connect to all addresses" if rc_want == 3 else "no")
        rc, out, err = cli.run(["scale", "--active", "3", "-o", "json"])
        assert (rc, out) == (rc_want, ""), (code, rc, out, err)
        assert err.startswith("recctl: ") and "Traceback" not in err
    rc, out, err = cli.run(["--root", "{tmp}/nofleet", "snapshot"])  # no token: no fleet there
    assert rc == 3 and "token" in err and out == ""


@pytest.mark.parametrize("argv, message", [
    (["rollover", "m", "--version", "2", "--steps", "10,x"],
     "recctl rollover: --steps: '10,x' is not a comma-separated list of percentages 1..100"),
    (["rollover", "m", "--version", "2", "--steps", "0,100"], "recctl rollover: --steps: '0,100' is not"),
    (["rollover", "m", "--version", "2", "--steps", "50,10"], "recctl: --steps: 50,10 must be increasing"),
    (["rollover", "m", "--version", "zero"], "recctl rollover: --version: 'zero' is not an integer >= 1"),
    (["rollover", "m", "--version", "2", "--bake", "-1"], "recctl rollover: --bake: '-1' is not a number within"),
    (["rollover", "m", "--version", "2", "--bake", "nan"], "recctl rollover: --bake: 'nan' is not a number"),
    (["--timeout", "0", "status"], "recctl: --timeout: '0' is not a number >= 0.001 seconds"),
    (["status", "--events", "-1"], "recctl status: --events: '-1' is not an integer within 0..1000"),
    (["status", "-o", "xml"], "recctl status: --output: invalid choice: 'xml'"),
    (["status", "--html", "/no/such/dir/s.html"], "recctl status: --html: '/no/such/dir/s.html': no such directory"),
    (["status", "--html", "/tmp"], "recctl status: --html: '/tmp' is a directory, not a file to write"),
    (["up", "--grpc-port", "70000"], "recctl up: --grpc-port: '70000' is not an integer within 1..65535"),
    (["up", "--instances", "0"], "recctl up: --instances: '0' is not an integer >= 1"),
    (["up", "--timeout-server-ms", "10"], "recctl up: --timeout-server-ms: '10' is not an integer within 50..60000"),
    (["up", "--tls-cert", "/no/such.pem"], "recctl up: --tls-cert: '/no/such.pem': no such file"),
    (["up", "--repository", "/no/such/repo"], "recctl up: --repository: '/no/such/repo': no such directory"),
    (["scale", "--active", "x"], "recctl scale: --active: 'x' is not an integer >= 1"),
    (["limits", "--knee-rps", "0"], "recctl: --knee-rps: knee_rps must be within 1..1000000 requests/s, got 0"),
    (["limits", "--dry-run"], "recctl: --dry-run: only setting a knee"),
    (["restore", "--from", "ftp://x"], "recctl restore: --from: target 'ftp://x': only a path or an s3:// URL"),
    (["restore"], "recctl: restore: give a snapshot ID"),
    (["restore", "s1", "--root", "/x"], "recctl: restore: --root goes with --from TARGET"),
    (["backup", "list", "--dry-run"], "recctl: backup list: --dry-run goes with 'backup now'"),
    (["backup", "policy", "--from", "/x"], "recctl: backup policy: --from goes with 'backup list'"),
    (["rollback", " "], "recctl rollback: model: ' ' is not a model name"),
    (["k8s", "--kubeconfig", "/no/kubeconfig", "rollouts"], "recctl k8s: --kubeconfig: '/no/kubeconfig': no such"),
    (["k8s", "rollover", "m", "--version", "2", "--steps", "5,a"], "recctl k8s rollover: --steps: '5,a' is not"),
    (["k8s", "rollover", "m", "--version", "2", "--timeout", "5"], "recctl: k8s: --timeout goes with --wait"),
    (["k8s", "rollover", "m", "--version", "2", "--poll", "0"], "recctl k8s rollover: --poll: '0' is not a number"),
    (["k8s", "rollover", "m", "--version", "2", "--dry-run", "--wait"], "recctl: k8s: --wait: a --dry-run creates"),
    (["completion", "fish"], "recctl completion: shell: invalid choice: 'fish'"),
    (["rollover", "m"], "recctl rollover: the following arguments are required: --version"),
])
def test_bad_values_are_refused_naming_the_field_with_exit_2(cli, argv, message):
    rc, out, err = cli.run(argv)
    assert rc == 2, (rc, out, err)
    assert out == "" and "Traceback" not in err
    assert message in " ".join(err.split()), err
    assert not cli.plane.calls and not cli.kube, "a refused command reached the control plane"


# ---------------------------------------------------------------------------------------------- --dry-run
@pytest.mark.parametrize("path", sorted(p for p, s in SAMPLES.items() if any("--dry-run" in a for a in s)))
def test_dry_run_calls_nothing_that_changes_state(cli, path):
    for argv in (a for a in SAMPLES[path] if "--dry-run" in a):
        before = sorted(p.relative_to(cli.tmp) for p in cli.tmp.rglob("*"))
        rc, out, err = cli.run(argv + ["-o", "json"])
        assert rc == 0 and json.loads(out)["dry_run"] is True, (argv, out, err)
        assert not MUTATING & set(cli.plane.calls), (argv, cli.plane.calls)
        assert not any(k.custom.created or k.custom.deleted for k in cli.kube), argv
        assert sorted(p.relative_to(cli.tmp) for p in cli.tmp.rglob("*")) == before, argv


def test_dry_run_tells_what_the_control_plane_would_refuse(cli):
    rc, out, err = cli.run(["rollover", "ranker", "--version", "2", "--dry-run", "-o", "json"])
    assert rc == 1 and json.loads(out)["refused"] == ["ranker is already at version 2"], (out, err)
    rc, out, _ = cli.run(["instances", "remove", "t9", "--dry-run"])
    assert rc == 1 and out == ""
    assert not MUTATING & set(cli.plane.calls)


def test_down_and_up_dry_run_leave_processes_and_files_alone(tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (root / "control.pid").write_text(str(sleeper.pid))
        rc = recctl.main(["--root", str(root), "down", "--dry-run", "-o", "json"])
        doc = json.loads(capsys.readouterr().out)
        assert rc == 0 and doc["control_pid"] == sleeper.pid and sleeper.poll() is None
        fresh = tmp_path / "fresh"
        rc = recctl.main(["--root", str(fresh), "up", "--dry-run", "-o", "yaml"])
        doc = yaml.safe_load(capsys.readouterr().out)
        assert rc == 0 and "recserve.control.server" in doc["command"] and not fresh.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_restore_from_a_target_dry_run_writes_nothing(tmp_path, capsys):
    from recserve.control.backup.manager import BackupManager
    from recserve.control.backup.policy import load_policy
    from recserve.control.monitoring.metrics import ControlMetrics
    from recserve.control.state.snapshots import write_manifest
    from recserve.control.state.store import State

    repo, root, target = tmp_path / "repo", tmp_path / "runtime", tmp_path / "offhost"
    for v in (1, 2):
        (repo / "ranker" / str(v)).mkdir(parents=True)
        (repo / "ranker" / str(v) / "model.onnx").write_bytes(bytes([v]) * 1024)
        write_manifest(repo / "ranker" / str(v), {"built_at": f"v{v}"})
    (repo / "ranker" / "config.pbtxt").write_text('name: "ranker"\n')
    state = State(root / "state.db")
    state.set_desired("ranker", [2])
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"target": {"path": str(target)}}))
    rec = BackupManager(load_policy(tmp_path / "policy.yaml", root, repo), repo, root / "state.db",
                        ControlMetrics()).run("manual")
    state.close()
    new = tmp_path / "new"
    argv = ["restore", "--from", str(target), "--root", str(new / "runtime"), "--repository", str(new / "repo")]
    assert recctl.main(argv + ["--dry-run", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dry_run"] and doc["backup"]["id"] == rec.id and not new.exists()
    assert recctl.main(argv + ["-o", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["id"] == rec.id and (new / "runtime" / "state.db").exists()


# ---------------------------------------------------------------------------------------------- version, completion
def test_version_names_recserve_and_the_triton_it_is_built_for(capsys):
    from importlib.metadata import version

    assert recctl.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert f"recctl (recserve) {version('recserve')}" in out
    assert f"tritonclient {version('tritonclient')}" in out and f"nvidia-pytriton {version('nvidia-pytriton')}" in out


def test_help_documents_the_exit_codes(capsys):
    assert recctl.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for line in ("0 ok", "1 the operation failed", "2 usage", "3 the control plane cannot be reached"):
        assert line in out
    from recserve.control.api import cli_output

    for line in ("0     ok", "2     usage", "3     the control plane cannot be reached"):
        assert line in cli_output.__doc__  # the one table; recctl's docstring points to it


COMPLETION_CASES = [  # words typed (the last one is under the cursor) -> what must be offered
    (["recctl", ""], {"rollover", "k8s", "completion", "instances"}),
    (["recctl", "--root", "/tmp", "k8s", "r"], {"rollouts", "rollover", "rollback"}),
    (["recctl", "k8s", "-n", "x", "rollover", "m", "--st"], {"--strategy", "--steps"}),
    (["recctl", "k8s", "rollover", "m", "--strategy", ""], {"canary", "blue-green"}),
    (["recctl", "status", "-o", ""], set(FORMATS)),
    (["recctl", "instances", "add", "--role", ""], {"standby", "primary", "active"}),
    (["recctl", "backup", ""], {"policy", "now", "list"}),
]


def test_bash_completion_completes_commands_flags_and_choices(capsys, tmp_path):
    assert recctl.main(["completion", "bash"]) == 0
    script = tmp_path / "recctl.bash"
    script.write_text(capsys.readouterr().out)
    calls = "\n".join(
        "COMP_WORDS=(" + " ".join(f"'{w}'" for w in words) + f"); COMP_CWORD={len(words) - 1}; COMPREPLY=(); "
        "_recctl; echo \"${COMPREPLY[*]}\"" for words, _ in COMPLETION_CASES)
    r = subprocess.run(["bash", "-c", f"source {script}\ncomplete -p recctl\n{calls}"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "complete -F _recctl recctl"
    for (words, want), got in zip(COMPLETION_CASES, lines[1:], strict=True):
        assert want <= set(got.split()), (words, got)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_completes_commands_flags_and_choices(capsys, tmp_path):
    assert recctl.main(["completion", "zsh"]) == 0
    script = tmp_path / "_recctl"
    script.write_text(capsys.readouterr().out)
    calls = "\n".join("words=(" + " ".join(f"'{w}'" for w in words) + f"); CURRENT={len(words)}; _recctl; print"
                      for words, _ in COMPLETION_CASES)
    stubs = "compdef() { print compdef $*; }\ncompadd() { shift; print -n -- \"$* \"; }\n_files() { :; }"
    r = subprocess.run(["zsh", "-f", "-c", f"{stubs}\nsource {script}\n{calls}"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "compdef _recctl recctl"
    for (words, want), got in zip(COMPLETION_CASES, lines[1:], strict=True):
        assert want <= set(got.split()), (words, got)


# ---------------------------------------------------------------------------------------------- a real Kubernetes API
def test_k8s_commands_through_a_real_api_client(tmp_path, capsys):
    """kmock's in-memory Kubernetes API (no pods, no operator: this test plays the operator by patching the
    ModelRollout's status): --wait prints each change on stderr and the final object on stdout; a refused create
    is 1; a kubeconfig whose API does not answer is 3."""
    import threading

    pytest.importorskip("kmock")
    from recserve.control.kube.api import GROUP, ROLLOUTS, VERSION
    from tests.kube_fixtures import NAMESPACE, KubeEmulator

    def kubeconfig(url: str) -> str:
        path = tmp_path / f"kubeconfig-{url.rsplit(':', 1)[-1]}"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": url}}], "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u", "namespace": NAMESPACE}}]}))
        return str(path)

    emu = KubeEmulator().start()
    try:
        k8s = ["k8s", "--kubeconfig", kubeconfig(emu.url), "-n", NAMESPACE]

        def operator() -> None:  # waits for the CR, then moves it through shift -> bake -> RolledBack
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    emu.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, ROLLOUTS, "r9")
                    break
                except Exception:  # noqa: BLE001 (404 until recctl created it)
                    time.sleep(0.05)
            for st in ({"result": "Running", "phase": "shift", "history": [{"weight": 50}],
                        "gates": {"p99_ratio": 1.0}},
                       {"result": "RolledBack", "phase": "done", "failedGate": "p99_ratio", "message": "p99 x4"}):
                time.sleep(0.4)
                emu.custom.patch_namespaced_custom_object_status(GROUP, VERSION, NAMESPACE, ROLLOUTS, "r9",
                                                                 {"status": st})

        op = threading.Thread(target=operator, daemon=True)
        op.start()
        rc = recctl.main(k8s + ["rollover", "ranker", "--version", "9", "--steps", "50,100", "--name", "r9", "--wait",
                                "--poll", "0.1", "-o", "json"])
        op.join(10)
        got = capsys.readouterr()
        assert rc == 1 and json.loads(got.out)["status"]["result"] == "RolledBack", got
        assert "shift" in got.err and " 50%" in got.err and "p99_ratio=1" in got.err and "RolledBack" in got.err
        rc = recctl.main(k8s + ["rollover", "ranker", "--version", "9", "--name", "r9"])  # the name is taken
        got = capsys.readouterr()
        assert rc == 1 and got.out == "" and "409" in got.err, got
        assert recctl.main(k8s + ["rollouts", "-o", "yaml"]) == 0
        assert [r["name"] for r in yaml.safe_load(capsys.readouterr().out)] == ["r9"]
    finally:
        emu.stop()
    rc = recctl.main(["k8s", "--kubeconfig", kubeconfig(f"http://127.0.0.1:{free_port()}"), "rollouts", "-o", "json"])
    got = capsys.readouterr()
    assert rc == 3 and got.out == "" and "does not answer" in got.err, got
