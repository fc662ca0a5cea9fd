"""Per-server in-flight limits: the fixed default from Little's law and an adaptive AIMD controller.

Why: a server admitted more concurrent requests than it can serve within the SLO only queues them (latency grows
past the knee of its curve and every request gets slower); one admitted fewer wastes capacity. The fixed limit
``initial_limit(knee_rps, target_latency_s)`` is the default. ``AdaptiveLimit`` may move it, in the spirit of
Netflix concurrency-limits and Envoy's adaptive concurrency, from what each interval measured.

The controller is pure: no threads, no I/O; the caller (the Router) feeds one ``IntervalSample`` per interval and
applies the returned limit (HAProxy ``set maxconn server``). Time comes from an injected clock, so the same code
runs in the control plane and in unit tests on a simulated latency curve.

Rules, per interval (all thresholds in ``LimitConfig``):

- **Decrease** (multiplicative, ``limit * backoff``) when the server is overloaded: measured p99 above the SLO, or
  any queue-full rejection from the server behind the limit. At most once per ``cooldown_s``: the effect of a cut
  shows only after the requests admitted under the old limit have left.
- **Increase** (additive, ``+ step``) only after ``patience`` consecutive good intervals: p99 at most
  ``headroom * slo`` (a band below the SLO, the hysteresis that keeps noise around the SLO from flapping the
  limit), no queue-full, and the limit actually binding (clients were shed by it, or in-flight reached
  ``utilization`` of it), and never within ``cooldown_s`` of a decrease. A limit nobody uses is never raised.
- **Hold** otherwise (p99 between ``headroom * slo`` and the SLO, an idle server, or no latency measured).

The result always lies in ``[min_limit, max_limit]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AdaptiveLimit", "Decision", "IntervalSample", "LimitConfig", "LimitBasis", "initial_limit",
           "limit_latency"]

#: The rules ``limit_latency`` knows (control/defaults.py ``LIMIT_RULES``; kept here too so this module imports
#: nothing of recserve).
LIMIT_RULES = ("p99", "mean", "sqrt")


@dataclass(frozen=True)
class LimitBasis:
    """The latency a fixed limit multiplies the knee by, and why (for status lines and events)."""

    rule: str
    latency_s: float
    why: str


def limit_latency(rule: str, slo_p99_s: float, knee_mean_s: float | None = None,
                  p99_to_mean: float = 2.5, knee_rps: float | None = None, beta: float = 2.0) -> LimitBasis:
    """The latency of Little's law (L = lambda x W) for the fixed limit ``initial_limit(knee, W)``:

    - ``p99``: W = the SLO p99. At the knee the p99 is the SLO but the MEAN is well below it (~20 ms for a 50 ms
      p99 on a 2-core host), so this admits ~p99/mean times the concurrency the knee ran at: the excess waits in
      the instances and stretches the admitted tail under overload.
    - ``mean``: W = the mean latency measured at the knee (``knee_mean_s``, the ladder's or the perf report's),
      capped at the SLO; when none is known, SLO / ``p99_to_mean`` (the documented ratio, said in ``why``).
    - ``sqrt``: the ``mean`` rule's concurrency L = knee x W plus ``beta`` x sqrt(L) (square-root staffing): a cap
      at the mean concurrency turns away the arrivals of every moment above the mean and leaves the servers idle
      in the moments below it; beta standard deviations of a Poisson-like count keep them busy. Needs
      ``knee_rps``; the latency returned is (L + beta x sqrt(L)) / knee, so ``initial_limit`` gives that limit.

    ValueError names the argument and the rule."""
    if rule not in LIMIT_RULES:
        raise ValueError(f"limit rule must be one of {list(LIMIT_RULES)}, got {rule!r}")
    if not (slo_p99_s > 0 and math.isfinite(slo_p99_s)):
        raise ValueError(f"slo_p99_s must be a finite number > 0, got {slo_p99_s!r}")
    if not (p99_to_mean >= 1 and math.isfinite(p99_to_mean)):
        raise ValueError(f"p99_to_mean must be a finite number >= 1, got {p99_to_mean!r}")
    if knee_mean_s is not None and not (knee_mean_s >= 0 and math.isfinite(knee_mean_s)):
        raise ValueError(f"knee_mean_s must be a finite number >= 0 (0 or None: unknown), got {knee_mean_s!r}")
    slo_ms = slo_p99_s * 1000
    if rule == "p99":
        return LimitBasis("p99", slo_p99_s, f"p99: knee x SLO p99 {slo_ms:g} ms")
    if knee_mean_s:
        w = min(knee_mean_s, slo_p99_s)
        capped = " (capped at the SLO)" if knee_mean_s > slo_p99_s else ""
        mean = LimitBasis("mean", w, f"mean: knee x mean latency at the knee {knee_mean_s * 1000:.1f} ms{capped}")
    else:
        mean = LimitBasis("mean", slo_p99_s / p99_to_mean,
                          f"mean: knee x SLO p99 {slo_ms:g} ms / {p99_to_mean:g} (no mean latency measured at the "
                          f"knee; assumed p99-to-mean ratio)")
    if rule == "mean":
        return mean
    if not (knee_rps is not None and knee_rps > 0 and math.isfinite(knee_rps)):
        raise ValueError(f"knee_rps must be a finite number > 0 for the sqrt rule, got {knee_rps!r}")
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    in_flight = knee_rps * mean.latency_s
    w = (in_flight + beta * math.sqrt(in_flight)) / knee_rps
    return LimitBasis("sqrt", w, f"sqrt: L + {beta:g} x sqrt(L), L = {mean.why.removeprefix('mean: ')} "
                                 f"= {in_flight:.1f} in flight")


def initial_limit(knee_rps: float, target_latency_s: float, min_limit: int = 1, max_limit: int = 1024) -> int:
    """The fixed per-server in-flight limit: knee rate x target latency (Little's law: L = lambda x W),
    rounded up and clamped to ``[min_limit, max_limit]``. ValueError names the argument and the rule."""
    if not (knee_rps > 0 and math.isfinite(knee_rps)):
        raise ValueError(f"knee_rps must be a finite number > 0, got {knee_rps!r}")
    if not (target_latency_s > 0 and math.isfinite(target_latency_s)):
        raise ValueError(f"target_latency_s must be a finite number > 0, got {target_latency_s!r}")
    _check_bounds(min_limit, max_limit)
    return max(min_limit, min(max_limit, math.ceil(knee_rps * target_latency_s)))


def _check_bounds(min_limit: int, max_limit: int) -> None:
    if not isinstance(min_limit, int) or min_limit < 1:
        raise ValueError(f"min_limit must be an integer >= 1, got {min_limit!r}")
    if not isinstance(max_limit, int) or max_limit < min_limit:
        raise ValueError(f"max_limit must be an integer >= min_limit ({min_limit}), got {max_limit!r}")


@dataclass(frozen=True)
class LimitConfig:
    """Bounds and thresholds of the controller; checked on creation."""

    slo_p99_s: float
    min_limit: int = 1
    max_limit: int = 1024
    #: Multiplicative decrease factor on overload, in (0, 1).
    backoff: float = 0.8
    #: Additive increase per step, >= 1.
    step: int = 1
    #: Increase only while p99 <= headroom x SLO, in (0, 1]: the hysteresis band below the SLO.
    headroom: float = 0.8
    #: Consecutive good intervals before one increase, >= 1.
    patience: int = 2
    #: Minimum seconds between two decreases, and from a decrease to the next increase, >= 0.
    cooldown_s: float = 1.0
    #: In-flight / limit at which the limit counts as binding, in (0, 1].
    utilization: float = 0.9

    def __post_init__(self) -> None:
        if not (self.slo_p99_s > 0 and math.isfinite(self.slo_p99_s)):
            raise ValueError(f"slo_p99_s must be a finite number > 0, got {self.slo_p99_s!r}")
        _check_bounds(self.min_limit, self.max_limit)
        for name in ("backoff",):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise ValueError(f"{name} must be in (0, 1), got {v!r}")
        for name in ("headroom", "utilization"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")
        for name in ("step", "patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.cooldown_s >= 0:
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s!r}")


@dataclass(frozen=True)
class IntervalSample:
    """What one interval measured for one server."""

    #: Latency p99 of the requests that completed in the interval; None when none completed.
    p99_s: float | None
    #: Requests the front door refused because this limit was full (demand above the limit).
    shed: int = 0
    #: Requests the server itself rejected with a full queue (the server is overloaded behind the limit).
    queue_full: int = 0
    #: Peak (or mean) requests in flight on the server during the interval.
    in_flight: int = 0


@dataclass(frozen=True)
class Decision:
    """The controller's answer for one interval, with the reason (for status lines, metrics and logs)."""

    limit: int
    action: str  # "increase" | "decrease" | "hold"
    reason: str


class AdaptiveLimit:
    """AIMD in-flight limit with hysteresis for one server; see the module docstring for the rules."""

    def __init__(self, config: LimitConfig, initial: int, clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(initial, int) or not config.min_limit <= initial <= config.max_limit:
            raise ValueError(
                f"initial must be an integer in [min_limit, max_limit] = [{config.min_limit}, {config.max_limit}], "
                f"got {initial!r}"
            )
        self.config = config
        self._clock = clock
        self._limit = initial
        self._good = 0
        self._last_decrease: float | None = None
        self.changes = 0

    @property
    def limit(self) -> int:
        return self._limit

    def update(self, sample: IntervalSample) -> Decision:
        """Feed one interval; returns the (possibly unchanged) limit and why."""
        c = self.config
        now = self._clock()
        overloaded = sample.queue_full > 0 or (sample.p99_s is not None and sample.p99_s > c.slo_p99_s)
        if overloaded:
            self._good = 0
            why = f"queue-full {sample.queue_full}" if sample.queue_full > 0 else f"p99 {sample.p99_s:.4f}s > SLO"
            if self._last_decrease is not None and now - self._last_decrease < c.cooldown_s:
                return Decision(self._limit, "hold", f"{why}, in cooldown after the last decrease")
            new = max(c.min_limit, math.floor(self._limit * c.backoff))
            self._last_decrease = now
            return self._set(new, "decrease", why)
        binding = sample.shed > 0 or sample.in_flight >= c.utilization * self._limit
        fast = sample.p99_s is not None and sample.p99_s <= c.headroom * c.slo_p99_s
        if not (fast and binding):
            self._good = 0
            if sample.p99_s is None:
                why = "no latency measured"
            elif not fast:
                why = f"p99 {sample.p99_s:.4f}s in the hysteresis band below the SLO"
            else:
                why = "limit not binding"
            return Decision(self._limit, "hold", why)
        if self._last_decrease is not None and now - self._last_decrease < c.cooldown_s:
            self._good = 0
            return Decision(self._limit, "hold", "in cooldown after the last decrease")
        self._good += 1
        if self._good < c.patience:
            return Decision(self._limit, "hold", f"good interval {self._good} of {c.patience}")
        self._good = 0
        return self._set(min(c.max_limit, self._limit + c.step), "increase", "p99 below the band and limit binding")

    def _set(self, new: int, action: str, reason: str) -> Decision:
        if new == self._limit:
            return Decision(new, "hold", f"{reason}; already at the {'minimum' if action == 'decrease' else 'maximum'}")
        self._limit = new
        self.changes += 1
        return Decision(new, action, reason)
