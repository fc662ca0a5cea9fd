"""build.manifest: version numbering never overwrites, manifests verify file hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from recserve.build.manifest import (
    MANIFEST,
    file_hashes,
    git_commit,
    next_version,
    numeric_versions,
    publish_version,
    verify_manifest,
)
from recserve.build.reference import latest_version_dir


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fake model repository: retrieval has versions 1 and 3 (a gap), a config and stray entries."""
    r = tmp_path / "model_repository"
    m = r / "retrieval"
    for v in ("1", "3"):
        (m / v).mkdir(parents=True)
        (m / v / "model.onnx").write_bytes(f"old weights {v}".encode())
    (m / "config.pbtxt").write_text('name: "retrieval"\n')
    (m / "latest").mkdir()  # non-numeric dirs are not versions
    (m / "7").write_text("a file named like a version is not a version dir")
    return r


def _src(tmp_path: Path, content: bytes, name: str = "model.onnx") -> Path:
    p = tmp_path / "src" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content)
    return p


def test_next_version_is_one_past_the_highest(repo: Path, tmp_path: Path) -> None:
    assert numeric_versions(repo / "retrieval") == [1, 3]
    assert next_version(repo / "retrieval") == 4
    assert next_version(repo / "ranker") == 1  # no model dir yet
    assert next_version(tmp_path / "nowhere") == 1


def test_publish_never_touches_existing_versions(repo: Path, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in (repo / "retrieval").rglob("*") if p.is_file()}
    v4 = publish_version(repo, "retrieval", {"model.onnx": _src(tmp_path, b"new weights")}, {"metrics": {"x": 1}})
    v5 = publish_version(repo, "retrieval", {"model.onnx": _src(tmp_path, b"newer weights")}, {})
    assert (v4.name, v5.name) == ("4", "5")
    assert {p: p.read_bytes() for p in before} == before  # every old file byte-identical
    assert (v4 / "model.onnx").read_bytes() == b"new weights"
    assert not [p for p in (repo / "retrieval").iterdir() if p.name.startswith(".staging")]
    first = publish_version(repo, "ranker", {"model.onnx": _src(tmp_path, b"r")}, {})
    assert first == repo / "ranker" / "1"
    assert latest_version_dir(repo, "retrieval") == v5


def test_manifest_records_sha256_and_fields(repo: Path, tmp_path: Path) -> None:
    content = b"\x08\x07onnx bytes"
    v = publish_version(repo, "search_model", {"model.onnx": _src(tmp_path, content)}, {"data": {"seed": 7}})
    m = json.loads((v / MANIFEST).read_text())
    assert m["model"] == "search_model" and m["version"] == 1 and m["data"] == {"seed": 7}
    assert m["files"] == {"model.onnx": hashlib.sha256(content).hexdigest()}
    assert verify_manifest(v) == []


def test_verify_manifest_detects_changed_missing_and_extra_files(repo: Path, tmp_path: Path) -> None:
    v = publish_version(
        repo, "ranker", {"model.onnx": _src(tmp_path, b"abc"), "extra/vocab.txt": _src(tmp_path, b"w", "v.txt")}, {}
    )
    assert set(file_hashes(v)) == {"model.onnx", "extra/vocab.txt"}
    (v / "model.onnx").write_bytes(b"abd")
    assert any("model.onnx: sha256" in p for p in verify_manifest(v))
    (v / "model.onnx").write_bytes(b"abc")
    assert verify_manifest(v) == []
    (v / "extra" / "vocab.txt").unlink()
    (v / "model.plan").write_bytes(b"engine")
    problems = verify_manifest(v)
    assert any("vocab.txt: missing" in p for p in problems)
    assert any("model.plan: not in the manifest" in p for p in problems)
    assert verify_manifest(repo / "retrieval" / "1") == [f"{repo / 'retrieval' / '1'}: no {MANIFEST}"]


def test_verify_manifest_detects_a_renamed_version(repo: Path, tmp_path: Path) -> None:
    v = publish_version(repo, "ranker", {"model.onnx": _src(tmp_path, b"abc")}, {})
    moved = v.rename(v.parent / "9")
    assert any("does not match the directory" in p for p in verify_manifest(moved))


def test_git_commit_unknown_outside_a_repository(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown"


def test_training_cache_key_follows_seed_hparams_and_data(tmp_path: Path) -> None:
    from dataclasses import replace

    from recserve.build.pipeline import cache_key
    from recserve.build.train import HParams

    data = tmp_path / "events.csv"
    data.write_text("1,2,3,pv,4\n")
    base = cache_key([str(data)], 7, HParams())
    assert cache_key([str(data)], 7, HParams()) == base
    assert cache_key([str(data)], 8, HParams()) != base
    assert cache_key([str(data)], 7, replace(HParams(), retr_epochs=4)) != base
    data.write_text("1,2,3,buy,4\n")
    assert cache_key([str(data)], 7, HParams()) != base
