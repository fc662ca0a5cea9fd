"""Can other local users read the keys on our command lines? One check, said at control-plane start and in status.

Triton 2.51 takes its restricted-API keys nowhere but its command line, and perf_analyzer its headers nowhere but
``-H``: every running tritonserver carries its admin key, and perf_analyzer the statistics key, in
``/proc/<pid>/cmdline``, which any local user may read unless ``/proc`` is mounted with ``hidepid``
(``hidepid=invisible``/``2`` hides other users' processes, ``noaccess``/``1`` their details).

Under systemd the picture has a trap: ``ProtectProc=invisible`` gives the unit a procfs of ITS OWN, mounted with
``hidepid``. That hides other users' processes from recserve, not recserve's from them, and it makes ``/proc/mounts``
as seen from inside the unit say ``hidepid`` whatever the host's ``/proc`` says. So when the unit has ProtectProc set,
the host's mount is read through PID 1 (``/proc/1/mounts``), and when that cannot be read the answer is "unknown".
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["EXPOSURE", "proc_exposure_warning", "proc_hidepid", "systemd_unit", "unit_protect_proc"]

#: hidepid values that keep other users out of /proc/<pid>/cmdline (numbers, and since Linux 5.8 names too).
HIDING = {"1", "2", "4", "noaccess", "invisible", "ptraceable"}
#: ProtectProc values that give the unit its own hidepid procfs (what it sees of /proc is not the host's).
PROTECTING = {"noaccess", "invisible", "ptraceable"}
#: How every warning of this check begins (tests and readers of ``recctl status`` can tell it from serving warnings).
EXPOSURE = ("tritonserver's admin key and perf_analyzer's statistics key are on their command lines "
            "(/proc/<pid>/cmdline)")
FIX = ("mount /proc with hidepid=invisible (mount -o remount,hidepid=invisible /proc; in /etc/fstab: "
       "proc /proc proc defaults,hidepid=invisible 0 0) and run recserve as its own user")


def proc_hidepid(mounts: Path = Path("/proc/mounts")) -> str | None:
    """The ``hidepid`` option of the procfs mounted at /proc in ``mounts`` ("0" when it has none); None when the file
    cannot be read or names no procfs at /proc."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "/proc" and parts[2] == "proc":
            opts = dict(o.split("=", 1) if "=" in o else (o, "") for o in parts[3].split(","))
            found = opts.get("hidepid", "0")  # the last mount at /proc is the one in force
    return found


def systemd_unit(cgroup: Path = Path("/proc/self/cgroup")) -> str | None:
    """This process's systemd unit (``recserve.service``) from its cgroup path; None when it names none."""
    try:
        text = cgroup.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        for part in reversed(line.rsplit(":", 1)[-1].split("/")):
            if part.endswith((".service", ".scope")):
                return part
    return None


def unit_protect_proc(unit: str | None) -> str | None:
    """``systemctl show -p ProtectProc --value UNIT``; None (unknown) without systemctl, a unit, or an answer
    (systemd before 247 has no ProtectProc and prints nothing)."""
    exe = shutil.which("systemctl")
    if not exe or not unit:
        return None
    try:
        p = subprocess.run([exe, "show", "-p", "ProtectProc", "--value", unit], capture_output=True, text=True,
                           timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (p.stdout.strip() or None) if p.returncode == 0 else None


def proc_exposure_warning(mounts: Path = Path("/proc/mounts"), env: Mapping[str, str] | None = None,
                          protect_proc: Callable[[str | None], str | None] = unit_protect_proc,
                          cgroup: Path = Path("/proc/self/cgroup"),
                          host_mounts: Path = Path("/proc/1/mounts")) -> str | None:
    """A one-line warning when other local users can (or may) read the keys on tritonserver's and perf_analyzer's
    command lines; None when /proc hides them."""
    env = os.environ if env is None else env
    what = EXPOSURE
    unit_note = ""
    seen = proc_hidepid(mounts)
    if env.get("INVOCATION_ID"):  # started by systemd
        unit = systemd_unit(cgroup)
        pp = protect_proc(unit)
        unit_note = f"; systemd unit {unit or 'unknown'}: ProtectProc={pp or 'unknown'}"
        if pp in PROTECTING:  # what we see is the unit's own procfs: ask PID 1's view for the host's
            seen = proc_hidepid(host_mounts)
            if seen is None:
                return (f"{what}; whether other local users can read them is unknown: this unit's ProtectProc={pp} "
                        f"gives it a /proc of its own (it hides others from recserve, not recserve from others) and "
                        f"the host's /proc mount cannot be read here; make sure to {FIX}")
        elif pp is None and seen in HIDING:
            unit_note += " (so the hidepid seen here may be the unit's own /proc, not the host's)"
            return f"{what}; /proc here is mounted hidepid={seen}, but{unit_note}; make sure to {FIX}"
    if seen is None:
        return f"{what}; whether other local users can read them is unknown: no procfs at /proc in {mounts}{unit_note}"
    if seen in HIDING:
        return None
    return f"{what}, readable by every local user: /proc is mounted without hidepid{unit_note}; {FIX}"
