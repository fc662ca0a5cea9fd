"""``recctl backup ...``, ``recctl restore --from TARGET`` and the backups table of ``recctl snapshots``.

Why apart from recctl.py: restore from a target must work on a new machine where no control plane runs, so
these commands talk to the target directly when given ``--from``, and to the control plane otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from recserve.control.backup import BackupRecord, list_backups, restore
from recserve.control.backup_policy import BackupError, load_policy
from recserve.control.backup_targets import TargetError, open_store, parse_target

ENDPOINT_ENV = "AWS_ENDPOINT_URL"


def _target(args: argparse.Namespace):
    return parse_target(args.source, args.endpoint_url or os.environ.get(ENDPOINT_ENV))


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def backups_table(rows: list[dict], title: str) -> Table:
    t = Table("id", "created", "trigger", "verified", "MB", "desired", "problem", title=title, title_justify="left")
    for b in rows:
        desired = ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in sorted(b["desired"].items())
                            if not k.endswith(("_pre", "_post")))
        ok = "[green]yes[/green] " + _when(b["verified_unix"]) if b["verified"] else "[red]no[/red]"
        t.add_row(b["id"], _when(b["created_unix"]), b["trigger"][:40], ok, f"{b['bytes'] / 1e6:.1f}", desired,
                  b["problem"][:80])
    return t


def record_row(r: BackupRecord) -> dict:
    return {"id": r.id, "created_unix": r.created, "trigger": r.trigger, "verified": bool(r.verified),
            "verified_unix": r.verified_at, "bytes": r.bytes, "files": len(r.files), "desired": r.desired,
            "problem": r.problem}


def pb_row(b) -> dict:
    return {"id": b.id, "created_unix": b.created_unix, "trigger": b.trigger, "verified": b.verified,
            "verified_unix": b.verified_unix, "bytes": b.bytes, "files": b.files, "problem": b.problem,
            "desired": {k: list(v.versions) for k, v in b.desired.items()}}


def list_from_target(args: argparse.Namespace, console: Console) -> int:
    """Backups at a target, read directly (no control plane needed)."""
    try:
        rows = [record_row(r) for r in list_backups(open_store(_target(args)))]
    except (TargetError, BackupError) as exc:
        console.print(f"[red]recctl:[/red] {exc}")
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        console.print(backups_table(rows, f"backups at {args.source}"))
    return 0


def cmd_restore_from(args: argparse.Namespace, console: Console) -> int:
    """Rebuild ``--root`` and ``--repository`` from a backup target with no control plane running."""
    if not args.restore_root or not args.repository:
        console.print("[red]recctl restore --from:[/red] --root DIR and --repository DIR are required "
                      "(the new runtime root and model repository)")
        return 2
    try:
        out = restore(_target(args), args.backup_id, Path(args.restore_root), Path(args.repository))
    except (BackupError, TargetError) as exc:
        console.print(f"[red]recctl restore:[/red] {exc}")
        return 2
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        desired = ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in sorted(out["desired"].items()))
        console.print(f"restored backup {out['id']} ({out['files']} files, {out['bytes'] / 1e6:.1f} MB, every sha256 "
                      f"checked) into {out['repository']} and {out['root']}; desired {desired}\n"
                      f"next: recctl --root {out['root']} up --repository {out['repository']}")
    return 0


def cmd_backup(args: argparse.Namespace, console: Console, stub_auth) -> int:
    """``backup policy [--check FILE]`` / ``backup now`` / ``backup list [--from TARGET]``."""
    if args.action == "policy" and args.check:
        try:
            p = load_policy(Path(args.check))
        except BackupError as exc:
            console.print(f"[red]invalid backup policy:[/red] {exc}")
            return 2
        print(json.dumps(p.describe(), indent=2)) if args.json else console.print(f"ok: {p.describe()}")
        return 0
    if args.action == "list" and args.source:
        return list_from_target(args, console)
    from recserve.control.proto import control_pb2 as pb

    stub, ch, auth = stub_auth()
    try:
        if args.action == "policy":
            r = stub.GetBackupPolicy(pb.GetBackupPolicyRequest(), timeout=10)
            if args.json:
                print(json.dumps(json_format.MessageToDict(r, preserving_proto_field_name=True), indent=2))
            elif not r.configured:
                console.print("no backup policy: nothing is backed up on a schedule (start the fleet with "
                              "--backup-policy FILE)")
            else:
                console.print(f"policy {r.source}: every {r.every_hours:g} h (+{r.slack_minutes:g} min slack, "
                              f"stale after {r.max_age_seconds:.0f} s), after rollover: {r.after_rollover}; keep the "
                              f"last {r.keep_last} and one per day for {r.daily_days} days; target {r.target}")
        elif args.action == "now":
            r = stub.RunBackup(pb.RunBackupRequest(note=args.note or ""), metadata=auth(), timeout=args.timeout)
            if args.json:
                print(json.dumps(pb_row(r), indent=2))
            else:
                console.print(f"backup {r.id}: {r.files} files, {r.bytes / 1e6:.1f} MB "
                              f"({r.uploaded_bytes / 1e6:.1f} MB new), verified: {r.verified} {r.problem}")
            return 0 if r.verified else 1
        else:
            r = stub.ListBackups(pb.ListBackupsRequest(), timeout=60)
            rows = [pb_row(b) for b in r.backups]
            print(json.dumps(rows, indent=2)) if args.json else console.print(backups_table(rows, f"backups at "
                                                                                                   f"{r.target}"))
    finally:
        ch.close()
    return 0


def add_commands(sub, add) -> None:
    """Register ``backup`` (``add`` is recctl's helper that adds --json and the function)."""
    bk = add("backup", None, "backup policy: show it, back up now, list backups (also straight from a target)")
    bk.add_argument("action", choices=("policy", "now", "list"))
    bk.add_argument("--check", metavar="FILE", help="policy: validate a policy file offline")
    bk.add_argument("--note", default="")
    target_options(bk)


def target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", metavar="TARGET", help="a backup target: DIR or s3://BUCKET/PREFIX "
                   "(read directly; no control plane needed)")
    p.add_argument("--endpoint-url", default=None, help=f"S3-compatible endpoint (default ${ENDPOINT_ENV})")
