"""Model repository versions, their manifests, and content-addressed snapshots of the repository.

A version directory ``<repo>/<model>/<n>/`` is *verified* when every file its ``manifest.json`` lists has the
recorded sha256 (and the listed files exist). The control plane never loads an unverified version.

Snapshots copy every file of every version (plus the manifests and configs) into ``<backup_root>/objects/<sha256>``
once, and describe each snapshot in ``<backup_root>/snapshots/<id>.json`` (path -> sha256). Restore rewrites
any file whose bytes differ, from objects whose own sha256 is checked first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from recserve.control.errors import ErrorCode, RecserveError

MANIFEST = "manifest.json"


class RepositoryError(RecserveError, ValueError):
    """Unknown model, version or snapshot (raised with ``ErrorCode.NOT_FOUND``), or files that do not match their
    manifest or snapshot (FAILED_PRECONDITION, the default)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_files(manifest: dict) -> dict[str, str]:
    """Relative path -> sha256 from a manifest; accepts ``files`` as a mapping or a list of {path, sha256}."""
    files = manifest.get("files", manifest.get("sha256", {}))
    out: dict[str, str] = {}
    if isinstance(files, dict):
        for path, v in files.items():
            out[path] = v if isinstance(v, str) else str(v.get("sha256", ""))
    elif isinstance(files, list):
        for entry in files:
            out[str(entry.get("path") or entry.get("name"))] = str(entry.get("sha256", ""))
    return out


@dataclass
class VersionInfo:
    model: str
    version: int
    path: Path
    verified: bool
    problem: str = ""
    files: int = 0
    built_at: str = ""
    metrics: dict = field(default_factory=dict)


def versions_on_disk(repository: Path, model: str) -> list[int]:
    d = repository / model
    if not (d / "config.pbtxt").exists():
        raise RepositoryError(f"unknown model {model!r}: no {d}/config.pbtxt", ErrorCode.NOT_FOUND)
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def has_manifests(repository: Path, model: str) -> bool:
    """Models built by the pipeline carry manifests; the committed Python models do not."""
    return any((repository / model / str(v) / MANIFEST).exists() for v in versions_on_disk(repository, model))


def verify_version(repository: Path, model: str, version: int) -> VersionInfo:
    """Check every manifest-listed file's sha256; ``verified`` False with the reason otherwise."""
    if version not in versions_on_disk(repository, model):
        raise RepositoryError(f"unknown version {version} of model {model!r} (on disk: "
                              f"{versions_on_disk(repository, model)})", ErrorCode.NOT_FOUND)
    vdir = repository / model / str(version)
    info = VersionInfo(model, version, vdir, verified=False)
    mpath = vdir / MANIFEST
    if not mpath.exists():
        info.problem = f"{mpath} missing"
        return info
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as exc:
        info.problem = f"{mpath}: not JSON ({exc})"
        return info
    files = manifest_files(manifest)
    info.files = len(files)
    info.built_at = str(manifest.get("built_at_utc") or manifest.get("built_at") or manifest.get("build_time") or "")
    info.metrics = manifest.get("metrics", {}) if isinstance(manifest.get("metrics"), dict) else {}
    if not files:
        info.problem = f"{mpath} lists no files"
        return info
    for rel, want in sorted(files.items()):
        p = vdir / rel
        if not p.is_file():
            info.problem = f"{model}/{version}/{rel}: listed in manifest but missing"
            return info
        got = sha256_file(p)
        if got != want:
            info.problem = f"{model}/{version}/{rel}: sha256 {got[:12]}.. does not match manifest {want[:12]}.."
            return info
    info.verified = True
    return info


def list_versions(repository: Path, model: str) -> list[VersionInfo]:
    return [verify_version(repository, model, v) for v in versions_on_disk(repository, model)]


def write_manifest(vdir: Path, extra: dict | None = None) -> dict:
    """(Re)write ``manifest.json`` listing every file of ``vdir`` with its sha256 (used by test helpers)."""
    files = {str(p.relative_to(vdir)): sha256_file(p) for p in sorted(vdir.rglob("*"))
             if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts}
    manifest = dict(extra or {})
    manifest["files"] = files
    (vdir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


# ---------------------------------------------------------------------------- snapshots
def models_of(files: Iterable[str]) -> dict[str, list[int]]:
    """Model -> versions held, from repository-relative paths ``<model>/<version>/...``."""
    out: dict[str, set[int]] = {}
    for rel in files:
        parts = rel.split("/")
        if len(parts) >= 3 and parts[1].isdigit():
            out.setdefault(parts[0], set()).add(int(parts[1]))
    return {m: sorted(v) for m, v in sorted(out.items())}


@dataclass
class Snapshot:
    id: str
    created: float
    files: dict[str, str]
    bytes: int
    note: str = ""

    def models(self) -> dict[str, list[int]]:
        return models_of(self.files)


class SnapshotStore:
    """Content-addressed backups of one model repository under ``root``."""

    def __init__(self, repository: Path, root: Path):
        self.repository = Path(repository)
        self.root = Path(root)

    def _object(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def create(self, note: str = "") -> Snapshot:
        files: dict[str, str] = {}
        total = 0
        for p in sorted(self.repository.rglob("*")):
            if not p.is_file() or "__pycache__" in p.parts:
                continue
            rel = str(p.relative_to(self.repository))
            digest = sha256_file(p)
            obj = self._object(digest)
            if not obj.exists():
                obj.parent.mkdir(parents=True, exist_ok=True)
                tmp = obj.with_suffix(".tmp")
                shutil.copy2(p, tmp)
                os.replace(tmp, obj)
            files[rel] = digest
            total += p.stat().st_size
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:8]
        snap_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{digest}"
        snap = Snapshot(snap_id, time.time(), files, total, note)
        d = self.root / "snapshots"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{snap_id}.json").write_text(json.dumps(snap.__dict__, indent=1, sort_keys=True))
        return snap

    def list(self) -> list[Snapshot]:
        d = self.root / "snapshots"
        if not d.is_dir():
            return []
        return sorted((Snapshot(**json.loads(p.read_text())) for p in d.glob("*.json")), key=lambda s: s.created)

    def get(self, snap_id: str) -> Snapshot:
        p = self.root / "snapshots" / f"{snap_id}.json"
        if not snap_id or "/" in snap_id or not p.exists():
            known = [s.id for s in self.list()]
            raise RepositoryError(f"unknown snapshot {snap_id!r} (known: {known[-5:]})", ErrorCode.NOT_FOUND)
        return Snapshot(**json.loads(p.read_text()))

    def restore(self, snap_id: str) -> tuple[int, int, list[str]]:
        """Make the repository hold every file of the snapshot again; returns (restored, verified, repaired)."""
        snap = self.get(snap_id)
        for rel, digest in snap.files.items():  # verify every object first: restore all or nothing
            obj = self._object(digest)
            if not obj.exists() or sha256_file(obj) != digest:
                raise RepositoryError(f"snapshot {snap_id}: backup object for {rel} is missing or corrupt")
        restored, repaired = 0, []
        for rel, digest in sorted(snap.files.items()):
            target = self.repository / rel
            if target.is_file() and sha256_file(target) == digest:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".restore-tmp")
            shutil.copy2(self._object(digest), tmp)
            os.replace(tmp, target)
            restored += 1
            repaired.append(rel)
        verified = sum(1 for rel, d in snap.files.items() if sha256_file(self.repository / rel) == d)
        if verified != len(snap.files):
            raise RepositoryError(f"snapshot {snap_id}: {len(snap.files) - verified} files still differ after restore")
        return restored, verified, repaired
