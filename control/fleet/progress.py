"""Busy or hung: does an instance still execute while requests wait for it?

A saturated instance and a hung one look alike from outside under load: the golden inference runs out of time and
HAProxy shows the slot at its limit. A hung one (a GPU kernel that never returns) still answers
``/v2/health/live`` and ``/ready``, so neither SIGSTOP-style liveness nor HAProxy's check sees it. What tells them
apart is progress: a busy model's execution count (``nv_inference_exec_count``) keeps rising while requests are
pending (``nv_inference_pending_request_count``); a hung model's stays flat. ``Progress`` keeps, per instance, the
first sample of the current flat stretch and calls the instance stalled when one model had requests pending and
executed nothing across two checks at least ``min_flat_s`` apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from recserve.control.monitoring.promtext import model_sums

EXEC = "nv_inference_exec_count"
PENDING = "nv_inference_pending_request_count"
#: Shortest flat stretch called a stall: one golden inference's timeout (control.fleet.health.INFER_TIMEOUT_S), so two
#: consecutive checks that ran out of time span it; a busy model executes many times within it.
MIN_FLAT_S = 1.0


@dataclass(frozen=True)
class Sample:
    t: float
    executions: Mapping[str, float]  # model -> executions so far
    pending: Mapping[str, float]  # model -> requests waiting now


def sample(metrics_text: str, t: float) -> Sample:
    """One reading of an instance's Triton /metrics."""
    sums = model_sums(metrics_text, (EXEC, PENDING))
    return Sample(t, {m: v.get(EXEC, 0.0) for m, v in sums.items()}, {m: v.get(PENDING, 0.0) for m, v in sums.items()})


class Progress:
    """Per instance: the models that had requests pending and executed nothing since the stretch began."""

    def __init__(self, min_flat_s: float = MIN_FLAT_S):
        self.min_flat_s = min_flat_s
        self._first: dict[str, Sample] = {}

    def observe(self, iid: str, now: Sample) -> str | None:
        """A reason when ``iid`` is stalled, else None. A model counts when it had requests pending at the first
        sample of the stretch and now, and its execution count did not move between them."""
        first = self._first.get(iid)
        flat = [m for m, n in now.pending.items() if n > 0 and first is not None and first.pending.get(m, 0) > 0
                and now.executions.get(m) == first.executions.get(m)]
        if not flat:
            self._first[iid] = now  # progress (or nothing waiting): a new stretch starts here
            return None
        span = now.t - first.t
        if span < self.min_flat_s:
            return None
        waiting = ", ".join(f"{m} ({int(now.pending[m])} pending)" for m in sorted(flat))
        return f"no execution for {span:.1f}s while requests wait: {waiting}"

    def reset(self, iid: str) -> None:
        """The instance answered its check: whatever stretch was open is over."""
        self._first.pop(iid, None)
