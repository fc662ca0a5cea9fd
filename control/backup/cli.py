"""Rows and the table of backups, for ``recctl backup``, ``recctl snapshots`` and ``recctl restore --from``.

The commands themselves live in recctl.py (one place for output formats and exit codes); a backup read straight
from a target (``--from``, no control plane needed) and one listed by the control plane become the same row.
"""

from __future__ import annotations

import time

from rich.table import Table

from recserve.control.backup.manager import BackupRecord

ENDPOINT_ENV = "AWS_ENDPOINT_URL"


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
            "problem": r.problem, "spec": r.spec, "spec_files": len(r.spec_files or {})}


def pb_row(b) -> dict:
    return {"id": b.id, "created_unix": b.created_unix, "trigger": b.trigger, "verified": b.verified,
            "verified_unix": b.verified_unix, "bytes": b.bytes, "files": b.files, "problem": b.problem,
            "desired": {k: list(v.versions) for k, v in b.desired.items()}}
