"""Machine-readable drill journal: what ran, when, and how the steady state held.

Why a journal beside the report: the report holds verdicts and figures; the journal is the audit
trail (every fault action, rollback and abort with wall-clock timestamps) that lets someone replay a
drill against the control plane's own events, as Chaos Toolkit's journal does.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recserve.drills.figures import DrillFigures

STATUSES = ("running", "completed", "aborted", "failed", "skipped")


@dataclass
class ActionEntry:
    """One action: a fault, a rollback, a probe or an abort; ``status`` is succeeded/failed/skipped."""

    name: str
    kind: str
    started_at: float
    ended_at: float | None = None
    status: str = "running"
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Journal:
    drill: str
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    status: str = "running"
    deviated: bool = False
    reason: str = ""
    steady_states: dict[str, dict] = field(default_factory=dict)
    actions: list[ActionEntry] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    #: The drill's figures, checks and verdict (with its per-second series) and the run's meta: everything
    #: the report is rendered from (drills/report.py render), so a journal alone re-renders it.
    result: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, kind: str, status: str, detail: dict | None = None, started_at: float | None = None,
            ended_at: float | None = None) -> ActionEntry:
        now = time.time()
        entry = ActionEntry(name, kind, started_at or now, ended_at or now, status, dict(detail or {}))
        self.actions.append(entry)
        return entry

    @contextmanager
    def action(self, name: str, kind: str):
        """Time an action; an exception marks it failed (with the message) and propagates."""
        entry = ActionEntry(name, kind, time.time())
        self.actions.append(entry)
        try:
            yield entry
        except BaseException as exc:
            entry.status = "failed"
            entry.detail.setdefault("error", f"{type(exc).__name__}: {exc}")
            raise
        else:
            if entry.status == "running":
                entry.status = "succeeded"
        finally:
            entry.ended_at = time.time()

    def steady_state(self, phase: str, stats: dict, met: bool) -> None:
        self.steady_states[phase] = {"met": met, **stats}
        if not met and phase != "during":
            self.deviated = True

    def finish(self, status: str, reason: str = "") -> None:
        if status not in STATUSES:
            raise ValueError(f"journal status must be one of {STATUSES}, got {status!r}")
        self.status, self.reason, self.ended_at = status, reason, time.time()

    def first(self, name: str, kind: str | None = None) -> ActionEntry | None:
        return next((a for a in self.actions if a.name == name and (kind is None or a.kind == kind)), None)

    def figures(self) -> DrillFigures:
        """The drill's figures, typed, read from ``result`` (an older journal's unknown keys are kept)."""
        return DrillFigures.from_journal(self)

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path

    @classmethod
    def read(cls, path: Path) -> Journal:
        raw = json.loads(Path(path).read_text())
        raw["actions"] = [ActionEntry(**a) for a in raw.get("actions", [])]
        return cls(**raw)
