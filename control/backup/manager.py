"""Backups as a policy (control/backup/policy.py): what a backup holds, verification, retention, restore.

A backup holds the model repository (configs, Python models, and the built versions that are desired or were
desired within the retention window, with their manifests) plus a consistent copy of ``state.db`` made with
SQLite's online backup API (never a file copy of a live WAL database). Files are stored once by sha256 under
``objects/`` of the target; ``backups/<id>.json`` lists them. After writing, every backup is restored into a
scratch directory: each object's sha256, each version's own manifest and the state copy (integrity check, its
desired versions) are checked, and the result is written back into the backup's record.

A fleet serving a spec (``recctl up --spec``) also backs up the spec file and the files it names (golden requests,
input sample files, degraded answers), by their paths relative to the spec's directory; verification loads the
restored spec against the restored repository, and restore puts them under ``<root>/spec/`` (or ``spec_dir``) so the
rebuilt fleet can ``recctl up --spec`` again.

Restore (``recctl restore --from TARGET``) needs no control plane: it rebuilds a repository and a runtime root
whose state holds the desired versions, rollouts and events, without the old machine's instance membership.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from recserve.control.backup.policy import BackupError, BackupPolicy
from recserve.control.backup.targets import Store, TargetError, TargetSpec, open_store, refuse_inside
from recserve.control.routing.router import forget_routing
from recserve.control.state.snapshots import (
    MANIFEST,
    has_manifests,
    models_of,
    sha256_file,
    verify_version,
    versions_on_disk,
)

DAY_S = 86400.0
STATE_FILE = "state.db"
#: Where restore puts a spec fleet's spec and its files, under the new runtime root (unless told otherwise).
SPEC_DIR = "spec"


# ---------------------------------------------------------------------------------------------- records
@dataclass
class BackupRecord:
    """``backups/<id>.json`` on the target: what the backup holds and whether it was verified."""

    id: str
    created: float
    trigger: str
    files: dict[str, str]
    state_sha256: str
    desired: dict[str, list[int]]
    bytes: int
    uploaded_bytes: int = 0
    host: str = ""
    verified: bool | None = None
    verified_at: float = 0.0
    problem: str = ""
    #: A spec fleet's serving spec: its file name and every file it names, relative to the spec's directory
    #: (path -> sha256; the spec file is one of them). Empty for the demo.
    spec: str = ""
    spec_files: dict[str, str] | None = None
    #: Version directories that hold no file (an ensemble's ``1/``): Triton needs them to exist, and a backup of
    #: files alone would lose them (relative to the repository).
    empty_dirs: list[str] = field(default_factory=list)

    def models(self) -> dict[str, list[int]]:
        return models_of(self.files)


def _object_key(digest: str) -> str:
    return f"objects/{digest[:2]}/{digest}"


def _record_key(backup_id: str) -> str:
    return f"backups/{backup_id}.json"


def write_record(store: Store, rec: BackupRecord) -> None:
    store.put_bytes(_record_key(rec.id), json.dumps(rec.__dict__, indent=1, sort_keys=True).encode())


def list_backups(store: Store) -> list[BackupRecord]:
    out = []
    for key in store.list("backups/"):
        if key.endswith(".json"):
            try:
                out.append(BackupRecord(**json.loads(store.get_bytes(key))))
            except (ValueError, TypeError, TargetError):
                continue  # a half-written or foreign file is not a backup
    return sorted(out, key=lambda r: r.created)


def get_backup(store: Store, backup_id: str | None) -> BackupRecord:
    """One backup by id, or (None) the newest verified one."""
    backups = list_backups(store)
    if backup_id:
        for b in backups:
            if b.id == backup_id:
                return b
        raise BackupError(f"unknown backup {backup_id!r} in {store.describe()} (newest: "
                          f"{[b.id for b in backups[-5:]]})")
    good = [b for b in backups if b.verified]
    if not good:
        raise BackupError(f"no verified backup in {store.describe()} ({len(backups)} backups, none verified)")
    return good[-1]


# ---------------------------------------------------------------------------------------------- content
def copy_state(db_path: Path, dest: Path) -> None:
    """A consistent copy of a live WAL database through SQLite's online backup API, as one self-contained file."""
    src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(str(dest))
    try:
        src.backup(dst)  # pages=-1: one step under one read transaction, so one point in time
        dst.execute("PRAGMA journal_mode=DELETE")
        ok = dst.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            raise BackupError(f"state copy fails SQLite's integrity check: {ok}")
    finally:
        dst.close()
        src.close()


def versions_in_window(db_path: Path, now: float, window_s: float) -> dict[str, set[int]]:
    """Versions desired now, the last good ones, and both ends of rollouts that started within the window."""
    out: dict[str, set[int]] = {}
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        for model, versions, good in db.execute("SELECT model, versions, last_good FROM desired"):
            out.setdefault(model, set()).update(json.loads(versions) + json.loads(good))
        for model, a, b, status in db.execute("SELECT model, from_version, to_version, status FROM rollouts "
                                              "WHERE started >= ?", (now - window_s,)):
            out.setdefault(model, set()).add(int(a))
            if status == "succeeded":
                out[model].add(int(b))
    finally:
        db.close()
    return out


def empty_version_dirs(repository: Path, keep: dict[str, set[int]]) -> list[str]:
    """Numeric version directories without any file in them (an ensemble's), of the versions a backup keeps."""
    out = []
    for mdir in sorted(p for p in repository.iterdir() if p.is_dir()):
        built = (mdir / "config.pbtxt").exists() and has_manifests(repository, mdir.name)
        for vdir in sorted(p for p in mdir.iterdir() if p.is_dir() and p.name.isdigit()):
            if built and int(vdir.name) not in keep.get(mdir.name, set()):
                continue
            if not any(p.is_file() for p in vdir.rglob("*")):
                out.append(str(vdir.relative_to(repository)))
    return out


def repository_files(repository: Path, keep: dict[str, set[int]]) -> list[Path]:
    """Every committed file (configs, Python models) and, of models built with manifests, only ``keep``."""
    out = sorted(p for p in repository.iterdir() if p.is_file())
    for mdir in sorted(p for p in repository.iterdir() if p.is_dir()):
        built = (mdir / "config.pbtxt").exists() and has_manifests(repository, mdir.name)
        for p in sorted(mdir.rglob("*")):
            if not p.is_file() or "__pycache__" in p.parts:
                continue
            rel = p.relative_to(mdir).parts
            if built and rel[0].isdigit() and int(rel[0]) not in keep.get(mdir.name, set()):
                continue
            out.append(p)
    return out


def spec_files(spec_path: Path, repository: Path) -> tuple[str, dict[str, Path]]:
    """The spec file and every file it names (golden requests, input sample files, degraded answers), each by its
    path relative to the spec's directory: ``(spec file's relative name, {relative path: file})``. The spec must
    load against ``repository`` (a backup of a spec that no longer loads could not bring a fleet back), and every
    file must sit in the spec's directory tree, which is what restore rebuilds."""
    from recserve.control.spec.repository import RepositoryReadError
    from recserve.control.spec.spec import SpecError, load_spec

    try:
        spec = load_spec(Path(spec_path), Path(repository))
    except (SpecError, RepositoryReadError) as exc:
        raise BackupError(f"the fleet's spec no longer loads, so a backup of it could not bring the fleet back: "
                          f"{exc}") from None
    base = spec.path.parent
    named = [spec.path]
    for m in spec.models.values():
        named.append(m.golden_file)
        named += [r.file for r in m.inputs.values() if r.file is not None]
        if m.degraded is not None and m.degraded.file is not None:
            named.append(m.degraded.file)
    out: dict[str, Path] = {}
    for f in named:
        f = Path(f).resolve()
        if not f.is_relative_to(base):
            raise BackupError(f"{spec.path}: {f} is outside the spec's directory {base}: a backup restores that "
                              "directory; keep the spec's files inside it")
        out[str(f.relative_to(base))] = f
    return str(spec.path.relative_to(base)), out


def _spec_dest(spec_dir: Path, rel: str) -> Path:
    """Where a backed-up spec file goes; a path that would leave ``spec_dir`` is refused (a tampered record)."""
    dest = (spec_dir / rel).resolve()
    if os.path.isabs(rel) or not dest.is_relative_to(spec_dir.resolve()):
        raise BackupError(f"spec file path {rel!r} leaves the spec directory")
    return dest


# ---------------------------------------------------------------------------------------------- retention
def select_keep(backups: list[BackupRecord], now: float, keep_last: int, daily_days: int) -> set[str]:
    """Ids to keep: the last ``keep_last`` verified backups, the newest verified backup of each UTC day of the last
    ``daily_days`` days, and the newest backup when it is unverified (so its failure can be looked at)."""
    good = sorted((b for b in backups if b.verified), key=lambda b: b.created)
    keep = {b.id for b in good[-keep_last:]}
    per_day: dict[int, BackupRecord] = {}
    for b in good:
        day = int(b.created // DAY_S)
        if int(now // DAY_S) - day < daily_days:
            per_day[day] = b  # sorted by time: the newest of the day wins
    keep |= {b.id for b in per_day.values()}
    if backups:
        newest = max(backups, key=lambda b: b.created)
        if not newest.verified:
            keep.add(newest.id)
    return keep


def prune(store: Store, policy: BackupPolicy, now: float) -> list[str]:
    """Delete backups outside the retention policy, then objects no kept backup references."""
    backups = list_backups(store)
    keep = select_keep(backups, now, policy.keep_last, policy.daily_days)
    removed = [b.id for b in backups if b.id not in keep]
    for bid in removed:
        store.delete(_record_key(bid))
    live = {_object_key(d) for b in backups if b.id in keep
            for d in [*b.files.values(), *(b.spec_files or {}).values(), b.state_sha256]}
    for key in store.list("objects/"):
        if key not in live:
            store.delete(key)
    return removed


# ---------------------------------------------------------------------------------------------- verify/restore
def _fetch(store: Store, digest: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".restore-tmp")
    store.get_file(_object_key(digest), tmp)
    got = sha256_file(tmp)
    if got != digest:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"object for {dest.name} has sha256 {got[:12]}.., the backup records {digest[:12]}..")
    tmp.replace(dest)


def materialize(store: Store, rec: BackupRecord, repository: Path, state_dest: Path,
                spec_dir: Path | None = None) -> Path | None:
    """Write every file of ``rec`` under ``repository``, its state copy to ``state_dest`` and, for a spec fleet's
    backup, the spec and its files under ``spec_dir``, sha256 checked; the restored spec must load against the
    restored repository. Returns the restored spec file (None: the backup holds none)."""
    for rel, digest in sorted(rec.files.items()):
        try:
            _fetch(store, digest, repository / rel)
        except (BackupError, TargetError) as exc:
            raise BackupError(f"backup {rec.id}: {rel}: {exc}") from exc
    for rel in rec.empty_dirs:
        dest = (repository / rel).resolve()
        if not dest.is_relative_to(repository.resolve()):
            raise BackupError(f"backup {rec.id}: empty directory {rel!r} is outside the repository")
        dest.mkdir(parents=True, exist_ok=True)
    spec_path = None
    if rec.spec:
        if spec_dir is None:
            raise BackupError(f"backup {rec.id} holds a serving spec: give a directory to restore it into")
        for rel, digest in sorted((rec.spec_files or {}).items()):
            try:
                _fetch(store, digest, _spec_dest(spec_dir, rel))
            except (BackupError, TargetError) as exc:
                raise BackupError(f"backup {rec.id}: spec file {rel}: {exc}") from exc
        spec_path = _spec_dest(spec_dir, rec.spec)
        if rec.spec not in (rec.spec_files or {}):
            raise BackupError(f"backup {rec.id}: the spec {rec.spec} is not among its spec files")
        spec_files(spec_path, repository)  # loads against the restored repository, or says why not
    try:
        _fetch(store, rec.state_sha256, state_dest)
    except (BackupError, TargetError) as exc:
        raise BackupError(f"backup {rec.id}: {STATE_FILE}: {exc}") from exc
    for model, versions in rec.models().items():
        if has_manifests(repository, model):
            for v in versions:
                info = verify_version(repository, model, v)
                if not info.verified:
                    raise BackupError(f"backup {rec.id}: {info.problem}")
    db = sqlite3.connect(f"file:{state_dest}?mode=ro", uri=True)
    try:
        ok = db.execute("PRAGMA integrity_check").fetchone()[0]
        desired = {m: json.loads(v) for m, v in db.execute("SELECT model, versions FROM desired")}
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"backup {rec.id}: {STATE_FILE} does not open as SQLite: {exc}") from exc
    finally:
        db.close()
    if ok != "ok":
        raise BackupError(f"backup {rec.id}: {STATE_FILE} fails the integrity check: {ok}")
    if desired != rec.desired:
        raise BackupError(f"backup {rec.id}: {STATE_FILE} desires {desired}, the record says {rec.desired}")
    missing = [f"{m}/{v}" for m, vs in desired.items() for v in vs
               if (repository / m / "config.pbtxt").exists() and v not in versions_on_disk(repository, m)]
    if missing:
        raise BackupError(f"backup {rec.id}: desired versions {missing} are not in the backup")
    return spec_path


def verify(store: Store, rec: BackupRecord, scratch_parent: Path | None = None) -> BackupRecord:
    """Restore into a scratch directory and check everything; the result is written into the record."""
    with tempfile.TemporaryDirectory(prefix="recserve-verify-", dir=scratch_parent) as tmp:
        try:
            materialize(store, rec, Path(tmp) / "repository", Path(tmp) / STATE_FILE, Path(tmp) / SPEC_DIR)
            rec.verified, rec.problem = True, ""
        except (BackupError, TargetError, OSError) as exc:
            rec.verified, rec.problem = False, str(exc)[:500]
    rec.verified_at = time.time()
    write_record(store, rec)
    return rec


def sanitize_state(db_path: Path, rec: BackupRecord) -> None:
    """A restored state is for a new machine: drop the old instance membership (pids, ports, workdirs) and
    routing, keep desired versions, last good, rollouts, events and golden answers."""
    db = sqlite3.connect(str(db_path), isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM instances")
        forget_routing(db)  # the Router's keys: the Router says which they are
        db.execute("INSERT INTO events(ts, kind, instance, message) VALUES(?,?,?,?)",
                   (time.time(), "restore", "", f"runtime rebuilt from backup {rec.id} (taken "
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(rec.created))} on {rec.host or '?'})"))
        db.execute("COMMIT")
    finally:
        db.close()


def restore(target: TargetSpec, backup_id: str | None, root: Path, repository: Path,
            spec_dir: Path | None = None) -> dict:
    """Rebuild a runtime root and a repository (a new machine) from a backup; refuses a root in use. A spec
    fleet's spec and its files go to ``spec_dir`` (default ``<root>/spec``), refused if it holds files already."""
    root, repository = Path(root).resolve(), Path(repository).resolve()
    spec_dir = Path(spec_dir).resolve() if spec_dir is not None else root / SPEC_DIR
    if (root / STATE_FILE).exists():
        raise BackupError(f"--root {root} already holds {STATE_FILE}: restore rebuilds a clean runtime root "
                          "(move it away, or choose an empty directory)")
    try:
        refuse_inside(target, "--from", runtime_root=root, model_repository=repository)
    except TargetError as exc:
        raise BackupError(str(exc)) from exc
    store = open_store(target)
    rec = get_backup(store, backup_id)
    if rec.verified is False:
        raise BackupError(f"backup {rec.id} failed its verification ({rec.problem}); choose another with --id")
    if rec.spec and spec_dir.is_dir() and any(spec_dir.iterdir()):
        raise BackupError(f"{spec_dir} already holds files: the backup's serving spec is restored into an empty "
                          "directory (move them away)")
    root.mkdir(parents=True, exist_ok=True)
    repository.mkdir(parents=True, exist_ok=True)
    tmp_state = root / (STATE_FILE + ".restore")
    spec_path = materialize(store, rec, repository, tmp_state, spec_dir)
    sanitize_state(tmp_state, rec)
    tmp_state.replace(root / STATE_FILE)
    return {"id": rec.id, "created": rec.created, "files": len(rec.files), "bytes": rec.bytes,
            "desired": rec.desired, "root": str(root), "repository": str(repository),
            "spec": str(spec_path) if spec_path else None, "spec_files": len(rec.spec_files or {})}


# ---------------------------------------------------------------------------------------------- backup
class BackupManager:
    """Takes, verifies and prunes backups of one fleet (one at a time); reports to metrics and the state log."""

    def __init__(self, policy: BackupPolicy, repository: Path, state_db: Path, metrics=None,
                 event: Callable[[str, str], None] | None = None, clock: Callable[[], float] = time.time,
                 spec: Path | None = None):
        self.policy = policy
        self.repository = Path(repository).resolve()
        #: The fleet's serving spec (``recctl up --spec``): backed up with the files it names.
        self.spec = Path(spec).resolve() if spec is not None else None
        self.state_db = Path(state_db)
        self.metrics = metrics
        self.event = event or (lambda kind, msg: None)
        self.clock = clock
        self.store = open_store(policy.target)
        self._lock = threading.Lock()
        self.last_attempt = 0.0
        self.last_verified: float | None = None  # created time of the newest verified backup
        if metrics is not None:
            metrics.backup_policy_start.set(self.clock())  # before max_age: never a promise without its start
            metrics.backup_max_age.set(policy.max_age_s)

    def refresh_metrics(self) -> BackupRecord | None:
        """Set the gauges from the target's newest verified backup (also after a control-plane restart)."""
        good = [b for b in list_backups(self.store) if b.verified]
        last = good[-1] if good else None
        self.last_verified = last.created if last else None
        if self.metrics is not None and last is not None:
            self.metrics.backup_last_success.set(last.verified_at or last.created)
            self.metrics.backup_last_size.set(last.bytes)
        return last

    def run(self, trigger: str) -> BackupRecord:
        """Back up, verify, prune; a failure is counted and logged, and raises BackupError."""
        with self._lock:
            self.last_attempt = self.clock()
            try:
                rec = self._take(trigger)
            except (BackupError, TargetError, OSError, sqlite3.Error) as exc:
                self._failed(f"backup ({trigger}) failed: {exc}")
                raise BackupError(str(exc)) from exc
            except Exception as exc:  # boto3/botocore errors: reported the same way
                self._failed(f"backup ({trigger}) failed: {type(exc).__name__}: {exc}")
                raise BackupError(f"{type(exc).__name__}: {exc}") from exc
            rec = verify(self.store, rec)
            if not rec.verified:
                self._failed(f"backup {rec.id} ({trigger}) failed verification: {rec.problem}")
                return rec
            self.last_verified = rec.created
            if self.metrics is not None:
                self.metrics.backup_last_success.set(rec.verified_at)
                self.metrics.backup_last_size.set(rec.bytes)
            removed = prune(self.store, self.policy, self.clock())
            self.event("backup", f"backup {rec.id} ({trigger}) verified: {len(rec.files)} files, "
                       f"{rec.bytes / 1e6:.1f} MB ({rec.uploaded_bytes / 1e6:.1f} MB new) at "
                       f"{self.store.describe()}" + (f"; pruned {removed}" if removed else ""))
            return rec

    def _failed(self, message: str) -> None:
        if self.metrics is not None:
            self.metrics.backup_failures.inc()
        self.event("backup-failed", message[:500])

    def _take(self, trigger: str) -> BackupRecord:
        now = self.clock()
        with tempfile.TemporaryDirectory(prefix="recserve-backup-") as tmp:
            state_copy = Path(tmp) / STATE_FILE
            copy_state(self.state_db, state_copy)  # first: the versions to keep come from this same snapshot
            db = sqlite3.connect(str(state_copy))
            desired = {m: json.loads(v) for m, v in db.execute("SELECT model, versions FROM desired")}
            db.close()
            keep = versions_in_window(state_copy, now, self.policy.daily_days * DAY_S)
            files: dict[str, str] = {}
            total = uploaded = 0
            for p in repository_files(self.repository, keep):
                rel = str(p.relative_to(self.repository))
                digest = sha256_file(p)
                size = p.stat().st_size
                if not self.store.exists(_object_key(digest)):
                    self.store.put_file(_object_key(digest), p)
                    uploaded += size
                files[rel] = digest
                total += size
            empty = empty_version_dirs(self.repository, keep)
            for model, versions in desired.items():
                for v in versions:
                    if has_manifests(self.repository, model) and not any(
                            r.startswith(f"{model}/{v}/{MANIFEST}") for r in files):
                        raise BackupError(f"desired version {model}/{v} has no {MANIFEST} in {self.repository}")
            spec_name, spec_digests = "", None
            if self.spec is not None:
                spec_name, named = spec_files(self.spec, self.repository)
                spec_digests = {}
                for rel, p in sorted(named.items()):
                    digest = sha256_file(p)
                    if not self.store.exists(_object_key(digest)):
                        self.store.put_file(_object_key(digest), p)
                        uploaded += p.stat().st_size
                    spec_digests[rel] = digest
                    total += p.stat().st_size
            state_digest = sha256_file(state_copy)
            if not self.store.exists(_object_key(state_digest)):
                self.store.put_file(_object_key(state_digest), state_copy)
                uploaded += state_copy.stat().st_size
            total += state_copy.stat().st_size
        held = [files, state_digest] + ([spec_digests] if spec_digests else []) + ([empty] if empty else [])
        digest = hashlib.sha256(json.dumps(held, sort_keys=True).encode()).hexdigest()[:8]
        bid = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + f"-{digest}"
        rec = BackupRecord(id=bid, created=now, trigger=trigger, files=files, state_sha256=state_digest,
                           desired=desired, bytes=total, uploaded_bytes=uploaded, host=socket.gethostname(),
                           spec=spec_name, spec_files=spec_digests, empty_dirs=empty)
        write_record(self.store, rec)
        return rec


@dataclass
class Due:
    """Why a backup is due now (or not): the scheduler's decision, kept pure for tests."""

    due: bool
    reason: str = ""


def schedule_due(now: float, last_verified: float | None, last_attempt: float, every_s: float,
                 retry_s: float) -> Due:
    if last_verified is None and now - last_attempt >= retry_s:
        return Due(True, "no verified backup at the target")
    if last_verified is not None and now - last_verified >= every_s and now - last_attempt >= retry_s:
        return Due(True, f"last verified backup is {now - last_verified:.0f}s old (every {every_s:.0f}s)")
    return Due(False)
