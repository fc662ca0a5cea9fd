"""The S3 backup target against a real S3-API server process: moto's standalone server (``moto_server``).

Said plainly: moto is an S3-API *emulator* (HTTP, boto3 talks to it exactly as to S3), not AWS and not MinIO;
what this proves is that backup, verification, retention and ``recctl restore --from s3://...`` speak the S3 API.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from recserve.control.backup.manager import BackupManager, list_backups
from recserve.control.backup.policy import load_policy
from recserve.control.backup.targets import open_store
from recserve.control.monitoring.metrics import ControlMetrics
from recserve.control.runtime.triton import free_port
from recserve.control.state.store import State
from tests.test_backup import make_repo

pytest.importorskip("boto3")
MOTO = shutil.which("moto_server", path=str(Path(sys.executable).parent))


class MotoS3:
    """Owns one ``moto_server`` process on a loopback port: start waits for it to answer, stop kills it."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "moto.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> MotoS3:
        self.process = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(self.port)], stdout=open(self.log, "wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self.log.read_text()[-500:]}")
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1)
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("moto_server did not answer")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


@pytest.fixture
def s3(tmp_path, monkeypatch):
    if MOTO is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]', part of the dev extra)")
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION":
                 "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = MotoS3(tmp_path).start()
    try:
        import boto3

        boto3.client("s3", endpoint_url=server.url, region_name="us-east-1").create_bucket(Bucket="recserve-bk")
        yield server
    finally:
        server.stop()


def test_backup_verify_prune_and_restore_through_the_s3_api(tmp_path, s3):
    repo = make_repo(tmp_path / "repo")
    root = tmp_path / "runtime"
    state = State(root / "state.db")
    state.set_desired("ranker", [2])
    state.set_desired("pre", [1])
    (tmp_path / "p.yaml").write_text(f"target: {{s3: 's3://recserve-bk/fleet-a', endpoint_url: '{s3.url}'}}\n"
                                     "retention: {keep_last: 2, daily_days: 0}\n")
    policy = load_policy(tmp_path / "p.yaml", root, repo)
    mgr = BackupManager(policy, repo, root / "state.db", ControlMetrics())
    recs = []
    for i in range(3):
        state.event("tick", str(i))
        recs.append(mgr.run("manual"))
    assert all(r.verified for r in recs), [r.problem for r in recs]
    store = open_store(policy.target)
    assert [b.id for b in list_backups(store)] == [r.id for r in recs[1:]]  # keep_last 2 pruned the first
    assert all(k.startswith("objects/") or k.startswith("backups/") for k in store.list(""))

    # a corrupted object on the bucket is caught by the verification
    digest = recs[-1].files["ranker/2/model.onnx"]
    good = store.get_bytes(f"objects/{digest[:2]}/{digest}")
    store.put_bytes(f"objects/{digest[:2]}/{digest}", good[:-1] + bytes([good[-1] ^ 1]))
    from recserve.control.backup.manager import verify

    bad = verify(store, recs[-1])
    assert bad.verified is False and "ranker/2/model.onnx" in bad.problem
    store.put_bytes(f"objects/{digest[:2]}/{digest}", good)
    assert verify(store, recs[-1]).verified
    state.close()

    # a new machine: the real CLI, no control plane, straight from the bucket
    new = tmp_path / "new"
    r = subprocess.run([sys.executable, "-m", "recserve.control.recctl", "restore", "--from", "s3://recserve-bk/fleet-a",
                        "--endpoint-url", s3.url, "--root", str(new / "runtime"), "--repository", str(new / "repo"),
                        "--json"], capture_output=True, text=True, timeout=120, env={**os.environ,
                                                                                     "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (new / "repo" / "ranker" / "2" / "model.onnx").read_bytes() == (repo / "ranker/2/model.onnx").read_bytes()
    restored = State(new / "runtime" / "state.db")
    assert restored.desired() == {"pre": [1], "ranker": [2]}
    restored.close()
