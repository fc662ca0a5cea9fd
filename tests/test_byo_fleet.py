"""A repository recserve has never seen, through the product as a user drives it: recctl init -> spec validate ->
up --spec (healthy on golden checks) -> answers through the front door -> a canary of a slightly changed version
(promoted) and of one with reversed scores (rolled back by the drift gate) -> down with nothing left running.

The repository is written at test time by tests/byo_repository.py; nothing below names its models: they are read
from the spec that ``recctl init`` wrote. Real tritonserver, HAProxy, control plane and recctl.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from recserve.control.client import RecClient
from recserve.control.runtime.procs import cmdline, port_in_use
from recserve.control.runtime.triton import shm_regions
from recserve.control.spec.compare import batched, compare_answer, unbatched
from recserve.control.spec.spec import load_spec
from tests.byo_repository import VARIED_MODEL, add_version, make_repository
from tests.fleet_fixtures import FleetProcess


def _pids_naming(text: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and text in cmdline(int(p.name))]


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    base = tmp_path_factory.mktemp("byo")
    repo = make_repository(base / "repo")
    fleet = FleetProcess(base / "root", repo, instances=2)
    yield base, repo, fleet
    fleet.close()


def test_init_writes_a_spec_that_validates_and_a_bad_spec_starts_nothing(byo):
    base, repo, fleet = byo
    r = fleet.recctl("init", "--repository", str(repo), "--out", str(base / "spec.yaml"), "-o", "json")
    doc = json.loads(r.stdout)
    assert doc["models"], doc
    # the user sets rollout gates per model (init proposes only the drift gate); rollovers read them
    spec = yaml.safe_load((base / "spec.yaml").read_text())
    for m in spec["models"].values():
        m.setdefault("gates", {}).update({"errorRateMax": 0.05, "p99Ms": 120})
    (base / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    v = json.loads(fleet.recctl("spec", "validate", str(base / "spec.yaml"), "-o", "json").stdout)
    assert set(v["models"]) == set(doc["models"])
    bad = yaml.safe_load((base / "spec.yaml").read_text())
    first = next(iter(bad["models"]))
    bad["models"][first]["outputs"] = {"no_such_output": {"compare": "exact"}}
    (base / "bad.yaml").write_text(yaml.safe_dump(bad))
    p = fleet.ports
    r = fleet.recctl("up", "--spec", str(base / "bad.yaml"), "--grpc-port", str(p["grpc"]), "--http-port",
                     str(p["http"]), "--control-port", str(p["control"]), "--metrics-port", str(p["metrics"]),
                     check=False)
    assert r.returncode == 2, r.stderr
    assert f"models.{first}.outputs.no_such_output" in r.stderr and "unknown field" in r.stderr
    assert not (fleet.root / "control.pid").exists() and not port_in_use(p["grpc"])


def test_the_fleet_serves_the_spec_models_golden_checked_and_answers_through_the_front_door(byo):
    base, repo, fleet = byo
    policy = base / "backup-policy.yaml"  # backups to a folder, so a backup can be restored on a clean root
    policy.write_text(yaml.safe_dump({"schedule": {"every_hours": 24, "after_rollover": False},
                                      "target": {"path": str(base / "backups")}}))
    fleet.up_args = ("--spec", str(base / "spec.yaml"), "--backup-policy", str(policy))
    fleet.up()
    spec = load_spec(base / "spec.yaml")
    st = fleet.wait(lambda s: sum(i["state"] == "healthy" for i in s["instances"]) == 2, what="2 healthy")
    for inst in st["instances"]:
        assert set(spec.models) <= set(inst["models"]), inst
    client = RecClient(fleet.grpc_url, retry_policy=None)
    try:
        for name, m in spec.models.items():
            g = m.golden[0]
            types = {t.name: t.datatype for t in m.info.inputs}
            got = unbatched(m, client.infer(name, batched(m, g.inputs), types, list(m.outputs)))
            assert compare_answer(m.outputs, got, g.expected) == {}, name
    finally:
        client.close()


def _rollover(fleet: FleetProcess, model: str, version: int, *gates: str):
    return fleet.recctl("rollover", model, "--version", str(version), "--steps", "50,100", "--bake", "2", *gates,
                        "-o", "json", check=False, timeout=600)


def test_a_slightly_changed_version_is_promoted_and_reversed_scores_are_rolled_back_by_the_drift_gate(byo):
    base, repo, fleet = byo
    spec = load_spec(base / "spec.yaml")
    gated = [n for n, m in spec.models.items() if m.gates.drift is not None]
    assert gated, "init proposes a drift gate for models with scores"
    # the model whose versions change is the fixture's own choice (the one it can write variants of); it must be a
    # step behind a drift-gated model for this test to mean anything
    step = VARIED_MODEL
    assert any(step in spec.models[n].steps for n in gated), (step, gated)
    ok = _rollover(fleet, step, add_version(repo, step, "perturbed"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    promoted = json.loads(ok.stdout)
    assert promoted["status"] == "succeeded"
    validate = promoted["events"][0]["message"]  # the gates the rollout met: the spec's, not recserve's defaults
    assert "error rate <= 5.00%" in validate and "p99 over 120 ms" in validate and "the serving spec" in validate, \
        validate
    bad = _rollover(fleet, step, add_version(repo, step, "reversed"), "--max-error-rate", "0.2")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    doc = json.loads(bad.stdout)
    assert doc["status"] == "rolled_back" and doc["failed_gate"] == "answer_overlap", doc
    validate = doc["events"][0]["message"]  # the request's gate wins; the spec's p99 gate stays
    assert "error rate <= 20.00%" in validate and "p99 over 120 ms" in validate, validate


def _golden_answers(fleet: FleetProcess, spec) -> dict:
    """Every spec model's answer to its first golden request, through the front door."""
    client = RecClient(fleet.grpc_url, retry_policy=None)
    try:
        out = {}
        for name, m in spec.models.items():
            types = {t.name: t.datatype for t in m.info.inputs}
            out[name] = unbatched(m, client.infer(name, batched(m, m.golden[0].inputs), types, list(m.outputs)))
        return out
    finally:
        client.close()


def test_down_leaves_nothing_running(byo):
    base, repo, fleet = byo
    # before down: a backup of what it serves now (the promoted version), for the clean-root restore below
    fleet.served = json.loads(fleet.recctl("status", "-o", "json").stdout)["desired"]
    fleet.answers = _golden_answers(fleet, load_spec(base / "spec.yaml"))
    fleet.recctl("backup", "now", "--note", "before down")
    pids = fleet.all_pids()
    prefixes = [p.name for p in (fleet.root / "instances").iterdir()]
    fleet.recctl("down")
    assert not [p for p in pids if os.path.exists(f"/proc/{p}") and str(fleet.root) in cmdline(p)]
    assert not _pids_naming(str(fleet.root))
    assert not any(port_in_use(p) for p in fleet.ports.values())
    from recserve.control.runtime.triton import shm_prefix

    assert not [r for name in prefixes for r in shm_regions(shm_prefix(fleet.root / "instances" / name, name))]


def test_a_backup_restored_on_a_clean_root_serves_the_same_versions_golden_checked(byo):
    """Backup and restore on a clean root: rebuild the runtime root and repository from the backup target (no
    control plane), then ``recctl up --spec`` with the restored spec; it serves what the old fleet served."""
    base, repo, old = byo
    root, new_repo = base / "restored-root", base / "restored-repo"
    r = old.recctl("restore", "--from", str(base / "backups"), "--root", str(root), "--repository", str(new_repo),
                   "-o", "json")
    restored_spec = Path(json.loads(r.stdout)["spec"])
    assert restored_spec.is_file() and restored_spec.is_relative_to(root)
    fleet = FleetProcess(root, new_repo, instances=2, up_args=("--spec", str(restored_spec)))
    try:
        fleet.up()
        st = fleet.wait(lambda s: sum(i["state"] == "healthy" for i in s["instances"]) == 2, what="2 healthy")
        assert st["desired"] == old.served, (st["desired"], old.served)
        got = _golden_answers(fleet, load_spec(restored_spec, new_repo))
        assert got.keys() == old.answers.keys()
        for name, outs in got.items():  # the same versions answer bit for bit
            for out, arr in outs.items():
                was = old.answers[name][out]
                same = arr.tolist() == was.tolist() if arr.dtype == object else arr.tobytes() == was.tobytes()
                assert arr.dtype == was.dtype and arr.shape == was.shape and same, (name, out)
        fleet.recctl("down")
        assert not _pids_naming(str(root))
    finally:
        fleet.close()
