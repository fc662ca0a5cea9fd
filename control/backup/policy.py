"""The backup policy file: schedule, retention and target, checked field by field before anything starts.

Why strict: a typo in a policy silently means no backups, or backups into the directory they should protect;
so every refusal names the field and the rule, and a target inside the runtime root or the repository is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from recserve.control.backup.targets import TargetError, TargetSpec, parse_target, refuse_inside
from recserve.control.errors import ErrorCode, RecserveError


class BackupError(RecserveError, RuntimeError):
    """A backup, verification or restore that could not be done (the message says which step and why).

    UNAVAILABLE by default: what fails a backup the API was asked for is mostly the target or the disk, and a
    retry may succeed; a bad policy file never reaches the API (the control plane refuses to start with it).
    """

    default_code = ErrorCode.UNAVAILABLE


@dataclass(frozen=True)
class BackupPolicy:
    """The backup policy file (YAML); see ``deploy/backup-policy.yaml`` and docs/operations.md "Backup and recovery"."""

    target: TargetSpec
    every_s: float
    slack_s: float
    after_rollover: bool
    keep_last: int
    daily_days: int
    source: str = ""

    @property
    def max_age_s(self) -> float:
        """What the stale-backup alert compares the age of the last verified backup with."""
        return self.every_s + self.slack_s

    def describe(self) -> dict:
        return {"source": self.source, "target": self.target.describe(), "every_hours": self.every_s / 3600,
                "slack_minutes": self.slack_s / 60, "after_rollover": self.after_rollover,
                "keep_last": self.keep_last, "daily_days": self.daily_days, "max_age_seconds": self.max_age_s}


def _num(d: dict, key: str, path: str, default: float, positive: bool) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BackupError(f"{path}.{key}: must be a number, got {type(v).__name__}")
    if v < 0 or (positive and v == 0):
        raise BackupError(f"{path}.{key}: must be {'> 0' if positive else '>= 0'}, got {v}")
    return float(v)


def _keys(d: object, path: str, allowed: set[str]) -> dict:
    if not isinstance(d, dict):
        raise BackupError(f"{path}: must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise BackupError(f"{path}.{unknown[0]}: unknown field (allowed: {', '.join(sorted(allowed))})")
    return d


def load_policy(path: Path, runtime_root: Path | None = None, repository: Path | None = None) -> BackupPolicy:
    """Parse and check a policy file; every refusal names the field and the rule."""
    src = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BackupError(f"{src}: cannot read the backup policy: {exc}") from exc
    d = _keys(raw, "policy", {"schedule", "retention", "target"})
    sched = _keys(d.get("schedule", {}), "schedule", {"every_hours", "slack_minutes", "after_rollover"})
    ret = _keys(d.get("retention", {}), "retention", {"keep_last", "daily_days"})
    if "target" not in d:
        raise BackupError("target: missing required field (path: DIR or s3: s3://BUCKET/PREFIX)")
    tgt = _keys(d["target"], "target", {"path", "s3", "endpoint_url", "region"})
    if ("path" in tgt) == ("s3" in tgt):
        raise BackupError("target: set exactly one of target.path and target.s3")
    if "path" in tgt:
        if not isinstance(tgt["path"], str) or not tgt["path"]:
            raise BackupError("target.path: must be a non-empty string")
        p = Path(tgt["path"])
        if not p.is_absolute():
            p = (Path(path).resolve().parent / p)
        spec = TargetSpec(path=p.resolve())
        field_name = "target.path"
    else:
        if not isinstance(tgt["s3"], str) or not tgt["s3"].startswith("s3://"):
            raise BackupError(f"target.s3: must be an s3://BUCKET[/PREFIX] URL, got {tgt['s3']!r}")
        try:
            spec = parse_target(tgt["s3"], tgt.get("endpoint_url"), str(tgt.get("region", "us-east-1")))
        except TargetError as exc:
            raise BackupError(f"target.s3: {exc}") from exc
        field_name = "target.s3"
    try:
        refuse_inside(spec, field_name, runtime_root=runtime_root, model_repository=repository)
    except TargetError as exc:
        raise BackupError(str(exc)) from exc
    after = sched.get("after_rollover", True)
    if not isinstance(after, bool):
        raise BackupError(f"schedule.after_rollover: must be true or false, got {after!r}")
    keep_last, daily = ret.get("keep_last", 7), ret.get("daily_days", 14)
    for key, v in (("keep_last", keep_last), ("daily_days", daily)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "keep_last" else 0):
            raise BackupError(f"retention.{key}: must be an integer >= {1 if key == 'keep_last' else 0}, got {v!r}")
    return BackupPolicy(target=spec, every_s=_num(sched, "every_hours", "schedule", 6, True) * 3600,
                        slack_s=_num(sched, "slack_minutes", "schedule", 30, False) * 60, after_rollover=after,
                        keep_last=keep_last, daily_days=daily, source=src)
