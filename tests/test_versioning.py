"""``make build-engines`` adds version n+1 with a valid manifest and never touches version n."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recserve.build.manifest import verify_manifest
from recserve.control.runtime.triton import DEFAULT_REPOSITORY, REPO_ROOT

MODELS = ("retrieval", "ranker", "search_model")


def _versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _tree_digest(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_second_build_adds_version_and_leaves_previous_byte_identical(tmp_path):
    repo = tmp_path / "model_repository"
    shutil.copytree(DEFAULT_REPOSITORY, repo)
    before = {m: _versions(repo / m) for m in MODELS}
    if not all(before.values()):
        pytest.skip("no built versions: run 'make models'")
    digests = {m: _tree_digest(repo / m / str(before[m][-1])) for m in MODELS}
    # Same work dir as 'make models': unchanged code and data reuse the cached training.
    run = subprocess.run(
        [sys.executable, "-m", "recserve.build.pipeline", "--repository", str(repo), "--no-trt"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "training: cached" in run.stdout + run.stderr, "unchanged code and data must reuse the cached training"
    for m in MODELS:
        after = _versions(repo / m)
        assert after == before[m] + [before[m][-1] + 1], f"{m}: {before[m]} -> {after}"
        assert _tree_digest(repo / m / str(before[m][-1])) == digests[m], f"{m}: previous version changed"
        new = repo / m / str(after[-1])
        manifest = json.loads((new / "manifest.json").read_text())
        assert manifest["version"] == after[-1]
        files = manifest["files"]
        assert "model.onnx" in files
        for name, digest in files.items():
            assert hashlib.sha256((new / name).read_bytes()).hexdigest() == digest, f"{m}/{name} sha256"
        assert verify_manifest(new) == []
        for key in ("metrics", "parity", "git_commit", "built_at_utc"):
            assert manifest.get(key), f"{m}: manifest lacks {key}"
        assert "seed" in manifest["data"]
        assert manifest["parity"]["passed"] is True
