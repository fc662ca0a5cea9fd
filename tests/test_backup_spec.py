"""Backups of a spec fleet carry its serving spec: the spec file and every file it names (golden requests, an input
sample file) are backed up by their paths relative to the spec's directory, verified by loading the restored spec
against the restored repository, kept by retention, and restored under ``<root>/spec`` so ``recctl up --spec`` works
on the new machine. Real files, real SQLite, a user repository written by tests/byo_repository.py; no fleet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recserve.control.backup.manager import BackupManager, list_backups, prune, restore, spec_files
from recserve.control.backup.policy import BackupError, load_policy
from recserve.control.backup.targets import open_store
from recserve.control.monitoring.metrics import ControlMetrics
from recserve.control.spec.spec import load_spec
from recserve.control.state.store import State
from tests.byo_repository import make_repository

ROOT = Path(__file__).resolve().parent.parent
RANK_PAGE = [{"raw": {"content": [0.5] * 8, "shape": [8]}, "item_ids": {"content": [1, 2, 3, 4], "shape": [4]}}]
QUERY = [{"text": {"content": ["red shoes"], "shape": [1]}}]


def write_spec(dest: Path, repo: Path) -> Path:
    """A spec beside golden/ and samples/ (as recctl init lays it out), naming its repository relatively."""
    (dest / "golden").mkdir(parents=True)
    (dest / "samples").mkdir()
    (dest / "golden" / "rank_page.json").write_text(json.dumps({"data": RANK_PAGE}))
    (dest / "golden" / "query_norm.json").write_text(json.dumps({"data": QUERY}))
    (dest / "samples" / "queries.txt").write_text("red shoes\nblue hat\n")
    doc = {"schemaVersion": 1, "repository": str(Path("..") / repo.name),
           "models": {"rank_page": {"golden": "golden/rank_page.json",
                                    "outputs": {"ctr": {"compare": "close", "atol": 1e-5}}},
                      "query_norm": {"golden": "golden/query_norm.json",
                                     "inputs": {"text": {"file": "samples/queries.txt"}},
                                     "outputs": {"token_ids": {"compare": "exact"}}}}}
    (dest / "spec.yaml").write_text("# my fleet's spec\n" + yaml.safe_dump(doc))
    return dest / "spec.yaml"


@pytest.fixture
def env(tmp_path):
    repo = make_repository(tmp_path / "repo")
    spec = write_spec(tmp_path / "specdir", repo)
    root = tmp_path / "runtime"
    state = State(root / "state.db")
    for m in ("features", "ctr_ranker", "query_norm", "rank_page"):
        state.set_desired(m, [1])
    (tmp_path / "policy.yaml").write_text(json.dumps({"target": {"path": str(tmp_path / "offhost")}}))
    policy = load_policy(tmp_path / "policy.yaml", root, repo)
    yield repo, spec, root, policy
    state.close()


def test_a_spec_fleets_backup_holds_the_spec_and_its_files_and_restore_puts_them_back(env, tmp_path):
    repo, spec, root, policy = env
    rec = BackupManager(policy, repo, root / "state.db", ControlMetrics(), spec=spec).run("manual")
    assert rec.verified, rec.problem
    assert rec.spec == "spec.yaml"
    assert set(rec.spec_files) == {"spec.yaml", "golden/rank_page.json", "golden/query_norm.json",
                                   "samples/queries.txt"}
    new_root, new_repo = tmp_path / "new" / "runtime", tmp_path / "new" / "repo"
    out = restore(policy.target, None, new_root, new_repo)
    restored = Path(out["spec"])
    assert restored == new_root / "spec" / "spec.yaml" and out["spec_files"] == 4
    for rel in rec.spec_files:  # byte for byte, the comment of the spec file included
        assert (restored.parent / rel).read_bytes() == (spec.parent / rel).read_bytes()
    # what recctl up --spec <restored> --repository <new repo> loads: the spec's models, its golden requests
    s = load_spec(restored, new_repo)
    assert set(s.models) == {"rank_page", "query_norm"} and s.repository == new_repo.resolve()
    assert s.models["rank_page"].golden[0].inputs["raw"].tolist() == [0.5] * 8
    assert s.models["query_norm"].inputs["text"].file == restored.parent / "samples" / "queries.txt"


def test_retention_keeps_the_spec_objects_and_verification_catches_a_bad_one(env, tmp_path):
    repo, spec, root, policy = env
    mgr = BackupManager(policy, repo, root / "state.db", ControlMetrics(), spec=spec)
    rec = mgr.run("manual")
    store = open_store(policy.target)
    prune(store, policy, rec.created)
    digest = rec.spec_files["golden/rank_page.json"]
    obj = policy.target.path / "objects" / digest[:2] / digest
    assert obj.exists()  # referenced by a kept backup: not pruned
    obj.write_text(json.dumps({"data": RANK_PAGE[:0] + [{"raw": RANK_PAGE[0]["raw"]}]}))  # a flipped file
    from recserve.control.backup.manager import verify

    bad = verify(store, rec)
    assert not bad.verified and "golden/rank_page.json" in bad.problem and "sha256" in bad.problem


def test_a_spec_that_no_longer_loads_or_names_a_file_outside_its_directory_fails_the_backup_loudly(env, tmp_path):
    repo, spec, root, policy = env
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"data": RANK_PAGE}))
    doc = yaml.safe_load(spec.read_text())
    doc["models"]["rank_page"]["golden"] = "../elsewhere.json"
    spec.write_text(yaml.safe_dump(doc))
    with pytest.raises(BackupError, match="outside the spec's directory"):
        spec_files(spec, repo)
    events = []
    mgr = BackupManager(policy, repo, root / "state.db", ControlMetrics(), spec=spec,
                        event=lambda k, m: events.append((k, m)))
    with pytest.raises(BackupError, match="outside the spec's directory"):
        mgr.run("manual")
    assert events[-1][0] == "backup-failed"
    doc["models"]["rank_page"]["outputs"] = {"nope": {"compare": "exact"}}
    spec.write_text(yaml.safe_dump(doc))
    with pytest.raises(BackupError, match="no longer loads"):
        spec_files(spec, repo)
    assert list_backups(open_store(policy.target)) == []


def test_an_ensembles_empty_version_directory_survives_backup_and_restore(env, tmp_path):
    """Triton needs ``rank_page/1/`` although an ensemble's version holds no file: a backup of files alone lost it
    and a restored fleet could not load the ensemble. A record without the directory fails verification by name."""
    repo, spec, root, policy = env
    assert (repo / "rank_page" / "1").is_dir() and not any((repo / "rank_page" / "1").iterdir())
    rec = BackupManager(policy, repo, root / "state.db", ControlMetrics(), spec=spec).run("manual")
    assert rec.verified, rec.problem
    assert "rank_page/1" in rec.empty_dirs
    new_repo = tmp_path / "new" / "repo"
    restore(policy.target, None, tmp_path / "new" / "runtime", new_repo)
    assert (new_repo / "rank_page" / "1").is_dir()
    from dataclasses import replace

    from recserve.control.backup.manager import verify

    lost = verify(open_store(policy.target), replace(rec, empty_dirs=[], verified=None), tmp_path)
    assert not lost.verified and "rank_page/1" in lost.problem, lost.problem


def test_restore_refuses_a_spec_directory_that_holds_files_and_a_demo_backup_restores_no_spec(env, tmp_path):
    repo, spec, root, policy = env
    BackupManager(policy, repo, root / "state.db", ControlMetrics(), spec=spec).run("manual")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "spec.yaml").write_text("mine\n")
    with pytest.raises(BackupError, match="already holds files"):
        restore(policy.target, None, tmp_path / "r1", tmp_path / "repo1", spec_dir=busy)
    assert (busy / "spec.yaml").read_text() == "mine\n" and not (tmp_path / "r1" / "state.db").exists()
    # a fleet without a spec: a backup without one, restored without one
    plain = BackupManager(policy, repo, root / "state.db", ControlMetrics()).run("manual")
    assert plain.spec == "" and not plain.spec_files
    out = restore(policy.target, plain.id, tmp_path / "r2", tmp_path / "repo2")
    assert out["spec"] is None and not (tmp_path / "r2" / "spec").exists()


def test_recctl_restore_says_where_the_spec_went(env, tmp_path):
    repo, spec, root, policy = env
    BackupManager(policy, repo, root / "state.db", ControlMetrics(), spec=spec).run("manual")
    new_root, new_repo = tmp_path / "new" / "runtime", tmp_path / "new" / "repo"
    r = subprocess.run([sys.executable, "-m", "recserve.control.recctl", "restore", "--from",
                        str(policy.target.path), "--root", str(new_root), "--repository", str(new_repo), "-o", "json"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["spec"] == str(new_root / "spec" / "spec.yaml") and out["spec_files"] == 4
    assert set(load_spec(Path(out["spec"]), new_repo).models) == {"rank_page", "query_norm"}
