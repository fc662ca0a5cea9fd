"""The backup part of the control plane's gRPC API, and its wiring into ``python -m recserve.control.server``.

Why a mixin of its own: the servicer in control/api/server.py stays small and other work on it merges cleanly;
the backup RPCs only need ``self.backups`` (a BackupScheduler, or None without a policy) and ``self._auth``.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from recserve.control.api import errors
from recserve.control.api.proto import control_pb2 as pb
from recserve.control.backup.manager import BackupManager, BackupRecord, list_backups
from recserve.control.backup.policy import BackupError, load_policy
from recserve.control.backup.scheduler import BackupScheduler
from recserve.control.errors import ErrorCode

POLICY_ENV = "RECSERVE_BACKUP_POLICY"


def backup_pb(r: BackupRecord) -> pb.Backup:
    return pb.Backup(id=r.id, created_unix=r.created, trigger=r.trigger, files=len(r.files), bytes=r.bytes,
                     uploaded_bytes=r.uploaded_bytes, verified=bool(r.verified), verified_unix=r.verified_at,
                     problem=r.problem, models={k: pb.Versions(versions=v) for k, v in r.models().items()},
                     desired={k: pb.Versions(versions=v) for k, v in r.desired.items()})


def policy_path(arg: Path | None) -> Path | None:
    """``--backup-policy`` wins, else ``$RECSERVE_BACKUP_POLICY``; None: no policy, no scheduled backups."""
    if arg is not None:
        return arg
    env = os.environ.get(POLICY_ENV)
    return Path(env) if env else None


def make_scheduler(policy_file: Path | None, root: Path, repository: Path, metrics, event,
                   spec: Path | None = None) -> BackupScheduler | None:
    """Load the policy (BackupError names the field on a bad one) and build, not start, the scheduler; ``spec``:
    a spec fleet's serving spec, backed up with the files it names."""
    if policy_file is None:
        return None
    policy = load_policy(policy_file, runtime_root=root, repository=repository)
    manager = BackupManager(policy, repository, root / "state.db", metrics,
                            event=lambda kind, msg: event(kind, msg), spec=spec)
    return BackupScheduler(manager)


class BackupApi:
    """GetBackupPolicy, RunBackup, ListBackups."""

    backups: BackupScheduler | None = None

    def _need_policy(self, context: grpc.ServicerContext) -> BackupScheduler:
        if self.backups is None:
            errors.refuse(context, ErrorCode.FAILED_PRECONDITION, "no backup policy: start the control plane with "
                          f"--backup-policy FILE (or ${POLICY_ENV}); see docs/operations.md 'Backup and recovery'")
        return self.backups

    def GetBackupPolicy(self, request, context):
        if self.backups is None:
            return pb.BackupPolicyInfo(configured=False)
        p = self.backups.policy
        return pb.BackupPolicyInfo(configured=True, source=p.source, target=p.target.describe(),
                                   every_hours=p.every_s / 3600, slack_minutes=p.slack_s / 60,
                                   after_rollover=p.after_rollover, keep_last=p.keep_last, daily_days=p.daily_days,
                                   max_age_seconds=p.max_age_s)

    def RunBackup(self, request, context):
        self._auth(context)
        sched = self._need_policy(context)
        try:
            rec = sched.manager.run("manual" + (f": {request.note}" if request.note else ""))
        except BackupError as exc:
            errors.abort(context, BackupError(f"backup failed: {exc}", exc.code))
        return backup_pb(rec)

    def ListBackups(self, request, context):
        sched = self._need_policy(context)
        try:
            backups = list_backups(sched.manager.store)
        except Exception as exc:  # an unreachable target is an answer, not a crash
            errors.abort(context, BackupError(f"backup target {sched.manager.store.describe()}: {exc}",
                                              ErrorCode.UNAVAILABLE))
        return pb.ListBackupsResponse(target=sched.manager.store.describe(), backups=[backup_pb(b) for b in backups])
