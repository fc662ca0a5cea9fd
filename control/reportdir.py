"""Timestamped report directories with a ``latest`` link, shared by perf/ and drills/ reports."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path


def new_run_dir(base: Path) -> Path:
    """``<base>/<UTC timestamp>/`` (created), unique even for two runs in one second."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path, n = base / stamp, 1
    while path.exists():
        n += 1
        path = base / f"{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def link_latest(run_dir: Path) -> Path:
    """Point ``<base>/latest`` at ``run_dir`` atomically (a relative link, so the tree can move)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)
    return link
