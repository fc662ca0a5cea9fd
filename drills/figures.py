"""What a drill measured, as one typed record: ``DrillFigures``, a field per figure, None = not measured.

Why a record and not a dict of string keys: faults write figures, the runner computes more, the verdict, the
journal and the report read them; with a dict a misspelt key was silently a figure nobody measured (and a
``None`` fails its expectation as "not measured", so the drill failed for the wrong reason or, worse, a
check read another key than the one written). Here an unknown name is an ``AttributeError`` where it is
written, and the expectations' figure names are checked against these fields when the specs load
(drills/spec.py ``EXPECT_FIGURES``), chaostoolkit's way: an experiment is data, checked against the one
function that runs it.

What is not here: a fault's private scratch (pids it signalled, files it wrote, its namespace) lives in that
fault's own scratch object (drills/faults.py ``Context.scratch``), and what the runner hands a fault (the
versions desired before the drill, the instance under fault) in ``Context``'s typed fields.

The journal edge: ``to_dict`` writes the same JSON keys the dict did. A figure assigned (even None: measured,
came out unknown, e.g. ``wrong_answers`` with no reference to judge by) is written; a figure never assigned
has no key, as the dict had none. ``from_dict`` reads a drill result back (re-rendering a report from its
journals) and keeps keys it does not know, from older journals, so nothing is lost on a re-render.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

#: Keys of a drill result that are not figures: what the drill was and how it was judged (drills/runner.py
#: ``_result``), and the report's own additions (``plot``).
RESULT_KEYS = frozenset({"name", "purpose", "status", "fault", "simulation", "slo_p99_ms", "passed", "checks",
                         "reason", "deviated", "plot"})


class UnknownFigure(ValueError):
    """A figure name that ``DrillFigures`` does not define; the message names where, the name and the known ones."""

    def __init__(self, source: str, where: str, name: str):
        super().__init__(f"{source}: {where}: unknown figure {name!r} (DrillFigures defines: "
                         f"{', '.join(sorted(FIGURE_NAMES))})")
        self.source, self.where, self.name = source, where, name


@dataclass(eq=True)
class DrillFigures:
    """Every figure one drill measured. Units are in the names (``_ms``, ``_s``, ``_rps``); phase maps are keyed
    ``before`` / ``during`` / ``after``. Assigning a name that is not a field raises ``AttributeError``."""

    # ------------------------------------------------------------------ the fault window and recovery (runner)
    #: seconds from the probe's start to the fault (its first injection; lost-host: the loss itself)
    fault_at_s: float | None = None
    #: seconds from the probe's start to the fault's end (last window end, or the instant fault's own end)
    fault_end_s: float | None = None
    #: fault to the first full good second (drills/README.md "Figures"); None: never recovered in the drill
    rto_ms: float | None = None
    #: what "recovered" meant for ``rto_ms``: ``all-good`` or ``before`` (spec ``steady_state.rto``)
    rto_basis: str | None = None
    # ------------------------------------------------------------------ requests (probe, runner)
    #: probe requests that got no answer
    failed_requests: int | None = None
    total_requests: int | None = None
    #: answers that are not the golden reference's for the desired versions; None: nothing to judge against
    wrong_answers: int | None = None
    #: answered by the real models (not failed, not degraded)
    served_requests: int | None = None
    #: answers from the degraded-answer server (served, never good)
    degraded_answers: int | None = None
    #: refused fast by admission (RESOURCE_EXHAUSTED "overloaded, retry later")
    shed_requests: int | None = None
    #: failed requests other than admission's refusals
    failed_unshed: int | None = None
    #: share of the spec's error budget spent; None when the budget is zero and was exceeded
    error_budget_used: float | None = None
    #: nearest-rank p50 / p99 of successful requests per phase
    p50_ms: dict[str, float | None] | None = None
    p99_ms: dict[str, float | None] | None = None
    #: p99.9 of the whole drill and the requests over 4x the SLO (runner ``_tail``)
    tail: dict[str, Any] | None = None
    throughput_rps: dict[str, float | None] | None = None
    #: per phase: drills.timeline ``window_stats``
    phases: dict[str, dict[str, Any]] | None = None
    #: seconds until the fleet was healthy with no rollout running after the drill; None: not within the timeout
    settled_after_s: float | None = None
    #: probe request count per status
    statuses: dict[str, int] | None = None
    #: failed requests by status and message, with when each kind was first seen (drills.timeline)
    failures: list[dict[str, Any]] | None = None
    # ------------------------------------------------------------------ the control plane's reactions (runner)
    #: instance restarts during the drill
    restarts: int | None = None
    #: deep checks shed (timed out or met a full queue) during the drill, ``recserve_probes_shed``
    probes_shed: int | None = None
    #: why restarts / probes_shed could not be read
    reactions_error: str | None = None
    #: the load generator's lag behind its own schedule (drills.breakdown ``client_lag``)
    client_lag: dict[str, Any] | None = None
    #: HAProxy's timers per route during the fault, from its access log (drills.breakdown ``haproxy_timers``)
    haproxy_timers: dict[str, dict[str, Any]] | None = None
    #: p99 during the fault over p99 before it, and p99 during it
    p99_during_ratio: float | None = None
    p99_during_ms: float | None = None
    #: fault to the control plane's ``detected`` event for the instance (network-partition: to HAProxy's DOWN)
    detection_ms: float | None = None
    #: failed or wrong requests sent after the detection
    bad_after_detection: int | None = None
    # ------------------------------------------------------------------ overload (runner, over the hold window)
    #: the knee the load was sized by
    capacity_rps: float | None = None
    goodput_rps: float | None = None
    shed_rate: float | None = None
    rejected_requests: int | None = None
    #: drills.timeline ``window_stats`` over the hold (after the ramp, to the fault's end)
    hold_window: dict[str, Any] | None = None
    rejected_p99_ms: float | None = None
    accepted_p99_ms: float | None = None
    offered_rps: float | None = None
    #: offered rate over the knee
    offered_ratio: float | None = None
    #: goodput over the knee
    goodput_ratio: float | None = None
    #: the fault's end to the first full good second
    recovered_after_s: float | None = None
    #: every instance kept its pid and is alive (overload: over the drill; security-attacks: over the attacks)
    instances_alive: bool | None = None
    #: failed or wrong share of the requests during the fault
    bad_share: float | None = None
    # ------------------------------------------------------------------ measured by the faults (drills/faults.py)
    #: bad-rollover: the control plane's record of this rollout says rolled_back by a named gate
    rolled_back: bool | None = None
    #: artifact-corruption: the corrupt rollover was refused and RestoreSnapshot repaired the file
    repaired: bool | None = None
    #: bad-rollover: the gate that rolled this rollout back
    failed_gate: str | None = None
    #: gpu-xid-crash: seconds until the killed instance was healthy again; None: not within 120 s
    instance_back_s: float | None = None
    #: bad-rollover: the canary asked directly while the rollout ran (asked / differs / errors / canary)
    canary_direct: dict[str, Any] | None = None
    #: network-partition: link restored to HAProxy marking the server UP; None: not within 15 s
    rejoined_after_s: float | None = None
    #: gpu-xid-crash: the killed server's stubs still alive after the control plane replaced it
    orphaned_stubs: int | None = None
    #: gpu-xid-crash: the fleet's /dev/shm regions after recovery minus before the fault
    shm_growth: int | None = None
    #: proxy-crash: SIGKILL of HAProxy to a new one accepting client connections
    proxy_restart_gap_s: float | None = None
    #: Triton's queue and compute per ensemble step over the drill (drills.breakdown ``triton_steps``)
    triton_steps: dict[str, dict[str, Any]] | None = None
    #: lost-host: the rebuilt fleet's desired versions are the backup's, consistently served
    restored_exact: bool | None = None
    #: lost-host: every rebuilt instance answers as the host did before the loss
    answers_same: bool | None = None
    #: lost-host: age of the verified backup at the loss
    rpo_s: float | None = None
    #: lost-host: what the rebuilt fleet no longer has (desired versions, rollouts, events)
    rpo_lost: dict[str, Any] | None = None
    #: lost-host: restore, fleet-up and first-good-answer seconds
    rebuild: dict[str, Any] | None = None
    #: the knee measured for this drill: rps, source, ladder, limits it set (runner)
    knee: dict[str, Any] | None = None
    #: security-attacks: every attack was refused
    attacks_refused: bool | None = None
    #: security-attacks: per attack, refused / status / ms
    attacks: dict[str, dict[str, Any]] | None = None
    #: seconds the run waited for the expected alerts to be quiet before the drill; None: still active
    alerts_quiet_after_s: float | None = None
    #: bad-rollover: the canary, asked directly, answered differently from the primary
    bad_version_live: bool | None = None
    #: rollover-under-load: the status this rollout ended with
    rollout_status: str | None = None
    #: rollover-under-load: that status is ``succeeded``
    rollout_succeeded: bool | None = None
    # ------------------------------------------------------------------ after the drill (runner)
    versions_consistent: bool | None = None
    versions_detail: str | None = None
    #: perf_analyzer's background load: its summary, exit, and whether it covered the fault
    background: dict[str, Any] | None = None
    #: the background load covered the fault and lost no request
    background_clean: bool | None = None
    #: per-second series of the drill (drills.timeline ``per_second``): the timeline PNG's data
    seconds: list[dict[str, Any]] | None = None
    #: (seconds since the start, label) of the fault and the control plane's events, for the PNG
    marks: list[Any] | None = None
    #: the instances' own answers where they disagree, and why answers were not judged
    answers_notes: list[str] | None = None
    #: what right answers were judged against; None: not judged
    answers_source: str | None = None
    #: a serving spec's drill: the spec, its target models and the rolled model
    serving_spec: dict[str, Any] | None = None
    #: expected alerts: time-to-alert / -resolve rows (drills.alerts ``match``)
    alerts: list[dict[str, Any]] | None = None
    #: CPU seconds the monitoring processes used during the drill
    monitoring_cost: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # figures given to the constructor count as assigned; a None given there reads as never assigned
        object.__setattr__(self, "_given", {n for n in FIGURE_NAMES if getattr(self, n) is not None})
        object.__setattr__(self, "_extra", {})

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in FIGURE_NAMES:
            raise AttributeError(f"DrillFigures has no figure {name!r} (known: {', '.join(sorted(FIGURE_NAMES))})")
        object.__setattr__(self, name, value)
        given = self.__dict__.get("_given")
        if given is not None:  # None while the dataclass __init__ sets the defaults
            given.add(name)

    # ------------------------------------------------------------------ what was measured
    def measured(self, name: str) -> bool:
        """``name`` was assigned in this drill (possibly to None: measured, came out unknown)."""
        if name not in FIGURE_NAMES:
            raise UnknownFigure("DrillFigures.measured", "name", name)
        return name in self._given

    def update(self, **values: Any) -> None:
        """Assign several figures at once (each name checked)."""
        for name, value in values.items():
            setattr(self, name, value)

    @property
    def unknown(self) -> dict[str, Any]:
        """Keys read by ``from_dict`` that are neither figures nor result keys (an older journal's figures)."""
        return dict(self._extra)

    # ------------------------------------------------------------------ the journal edge
    def to_dict(self) -> dict[str, Any]:
        """The JSON shape journals and report.json have always had: assigned figures (None included) by name,
        in field order, then the keys an older journal had that this record does not know."""
        every = asdict(self)
        return {**{n: every[n] for n in FIGURE_NAMES if n in self._given}, **self._extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DrillFigures:
        """The figures of a drill result (a journal's ``result``, a report.json entry): its keys that are figures
        are assigned as they are (None included); the result's own keys (``RESULT_KEYS``) are left out; any
        other key, from an older journal, is kept as it is and written back by ``to_dict``."""
        out = cls()
        for key, value in d.items():
            if key in FIGURE_NAMES:
                setattr(out, key, value)
            elif key not in RESULT_KEYS:
                out._extra[key] = value
        return out

    @classmethod
    def from_journal(cls, journal: Any) -> DrillFigures:
        """The figures a drill journal (drills.journal ``Journal``, or its JSON as a dict) recorded."""
        result = journal.get("result") if isinstance(journal, Mapping) else journal.result
        return cls.from_dict(result or {})


#: Every figure's name, in field order.
FIGURE_NAMES: tuple[str, ...] = tuple(f.name for f in fields(DrillFigures))


def check_names(names: Iterable[tuple[str, str]], source: str) -> None:
    """Refuse the first ``(where, figure name)`` pair whose name is not a ``DrillFigures`` field, naming the file
    (``source``), where it was named, the name and the known names."""
    for where, name in names:
        if name not in FIGURE_NAMES:
            raise UnknownFigure(source, where, name)
