"""Test-only switches that break a fleet on purpose: the drills' negative controls (``make drill-controls``).

A drill is trusted only when it has been seen to fail against a fleet broken on purpose. The switches live in the
environment of the control plane's process alone (``RECSERVE_TEST_BREAK=no-retries,no-gates``), never in a recctl
flag or a settings file, so no operator turns one on by accident; the control plane prints every active switch
at start and ``recctl status`` warns while any is on. An unknown name is refused at start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV = "RECSERVE_TEST_BREAK"

#: name -> what it breaks (the drills' control table prints this)
SWITCHES: dict[str, str] = {
    "no-retries": "HAProxy neither retries nor redispatches a request (retries 0, no retry-on)",
    "no-gates": "rollout gates judge nothing: answer overlap, error rate and p99 never fail a canary",
    "no-admission": "admission refuses nothing: no fast RESOURCE_EXHAUSTED, every request goes to an instance",
    "no-progress": "a golden check that timed out at the in-flight limit reads busy without asking for progress",
    "no-exit-watch": "an instance's exit is found by the next deep check, not at once by its pidfd",
}


class SwitchError(ValueError):
    """An unknown switch name in the environment."""


def active(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The switches ``environ`` (default: this process's) turns on; an unknown name raises naming the known ones."""
    raw = (os.environ if environ is None else environ).get(ENV, "")
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    unknown = sorted(names - set(SWITCHES))
    if unknown:
        raise SwitchError(f"{ENV}: unknown switch(es) {unknown} (known: {', '.join(sorted(SWITCHES))})")
    return names


def broken(name: str) -> bool:
    """Whether test switch ``name`` is on in this process."""
    if name not in SWITCHES:
        raise SwitchError(f"no test switch {name!r}")
    return name in active()


def warning() -> str | None:
    """A line for the control plane's log and ``recctl status`` while any switch is on."""
    on = sorted(active())
    return f"TEST SWITCHES ON ({ENV}): {', '.join(on)}: this fleet is broken on purpose" if on else None
