"""Numbered, immutable model versions with a manifest each.

Why: rollback and disaster recovery need to know exactly what a version is (file hashes, the data and
code it came from, its offline metrics and parity) and must never find an old version silently rewritten.
A version is assembled in a hidden staging dir and renamed into place, so Triton never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def numeric_versions(model_dir: str | Path) -> list[int]:
    """Existing numeric version dirs of a model, ascending (non-numeric entries are ignored)."""
    d = Path(model_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(model_dir: str | Path) -> int:
    """1 + the highest existing numeric version (1 if none): gaps are never reused."""
    v = numeric_versions(model_dir)
    return (v[-1] + 1) if v else 1


def file_hashes(version_dir: str | Path) -> dict[str, str]:
    """sha256 of every file under the version dir (relative POSIX paths), the manifest excepted."""
    root = Path(version_dir)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    }


def git_commit(repo_root: str | Path) -> str:
    """HEAD commit of the checkout, or "unknown" (no git, no commits yet)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo_root), "rev-parse", "--verify", "-q", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def git_dirty(repo_root: str | Path, paths: list[str]) -> bool | None:
    """Whether ``paths`` have uncommitted changes (None when git cannot tell)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo_root), "status", "--porcelain", "--", *paths],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def runtime_versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import torch

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }
    try:
        import tensorrt  # type: ignore[import-not-found]

        v["tensorrt"] = tensorrt.__version__
    except Exception:  # noqa: BLE001 - any failure simply means "no TensorRT here"
        pass
    return v


def utc_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def publish_version(repository: str | Path, model: str, files: dict[str, Path], fields: dict) -> Path:
    """Copy ``files`` (name in version dir -> source) into a NEW version of ``model`` with a manifest.

    Never touches an existing version: the version is staged in ``<model>/.staging-*`` and renamed to
    ``<model>/<n>``; if another build claimed ``n`` meanwhile, the next number is taken.
    """
    model_dir = Path(repository) / model
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        for name, src in files.items():
            dst = staging / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        for _ in range(100):
            version = next_version(model_dir)
            manifest = {"model": model, "version": version, **fields, "files": file_hashes(staging)}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
            target = model_dir / str(version)
            try:
                target.mkdir()  # atomic claim of the number; an existing dir raises
            except FileExistsError:
                continue
            os.replace(staging, target)  # replaces only the empty dir we just created
            return target
        raise RuntimeError(f"could not claim a version number under {model_dir}")
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def verify_manifest(version_dir: str | Path) -> list[str]:
    """Problems of a version dir against its manifest (missing/extra/changed files); [] when intact."""
    root = Path(version_dir)
    mpath = root / MANIFEST
    if not mpath.is_file():
        return [f"{root}: no {MANIFEST}"]
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        return [f"{mpath}: not valid JSON ({e})"]
    want: dict[str, str] = manifest.get("files", {})
    have = file_hashes(root)
    problems = [f"{root / n}: missing" for n in sorted(set(want) - set(have))]
    problems += [f"{root / n}: not in the manifest" for n in sorted(set(have) - set(want))]
    problems += [
        f"{root / n}: sha256 {have[n][:12]}... != manifest {want[n][:12]}..."
        for n in sorted(set(want) & set(have))
        if want[n] != have[n]
    ]
    if str(manifest.get("version")) != root.name:
        problems.append(f"{mpath}: version {manifest.get('version')!r} does not match the directory {root.name!r}")
    return problems
