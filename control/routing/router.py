"""The Router: the one owner of client routing (HAProxy), its runtime state and its keys in the state store.

Why one owner: routing was written from the fleet, the rollouts and the restart path, each with its own idea of
the state keys; a HAProxy restart then had to guess what to restore. Now ``Fleet``, ``RolloutManager`` and the
drills ASK the Router; nothing else calls HAProxy's runtime API or writes these keys:

* ``route``      ``pool`` (active-active: ``balance leastconn`` over the actives), ``first:<slot>`` (primary-standby
                 or a blue-green switch: ``balance first`` with that slot first) or ``split`` (canary weights).
* ``pool``       comma-separated slots in the active-active pool (the rest are out of rotation there).
* ``weight:<id>`` canary weights of the split backend.
* ``limit:<slot>`` the in-flight limit (HAProxy ``maxconn``; for h2 it counts streams) of each slot.
* ``router_mode`` the serving mode last applied (``active-active`` or ``primary-standby``).

Admission (see ``control/routing/haproxy.py`` ``admission_lines``): when the routed backend has no free slot the front
door answers at once, first from the degraded-answer fallback server (its own backend with its own limit,
started and supervised here like HAProxy), and only when that is full too with 429 / RESOURCE_EXHAUSTED
"overloaded, retry later". The control plane's golden probes go to instance ports directly, so they are
never shed.

For the drills and operators (read-only): ``load()`` (in flight, queued, limit, served per slot, from HAProxy's
``show stat``), ``shedding()`` / ``shed_total()``, ``pool_slots()``, ``current_route()``, ``decisions`` (the
adaptive controller's last word per slot) and the access log at ``proxy.config.access_log_path`` (one line per
request: id, ``Tq/Tw/Tc/Tr/Tt/Ta``, status, retries, backend/server; copy-truncated to ``access.log.1`` past
``ACCESS_LOG_MAX_BYTES``). Faults against HAProxy itself (kill it, stop it) are the drills'; ``ensure_running``
brings it back with ``restore()``.

``timeout server`` comes from the SLO: ``timeout_server_ms = clamp(4 x slo_p99_ms, 100, 1000)``. A request
that takes 4x the p99 target is treated as a hang: with ``retries 1`` + ``option redispatch`` it gets one more
try on another instance, so a hung instance costs at most ~4 x SLO + one normal answer.
"""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from recserve.control.defaults import (
    GRPC_PORT,
    HTTP_PORT,
    KNEE_MEAN_MS,
    LIMIT_RULE,
    LIMIT_RULES,
    MODES,
    P99_TO_MEAN,
    SLO_P99_MS,
    SLOTS,
    SQRT_BETA,
)
from recserve.control.defaults import MODE as DEFAULT_MODE
from recserve.control.errors import RecserveError
from recserve.control.routing import accesslog
from recserve.control.routing.admission import (
    AdaptiveLimit,
    IntervalSample,
    LimitBasis,
    LimitConfig,
    initial_limit,
    limit_latency,
)
from recserve.control.routing.frontdoor import FrontDoorConfig
from recserve.control.routing.haproxy import (
    FALLBACK_MAXCONN,
    FALLBACK_QUEUE,
    PROTOS,
    HAProxy,
    HAProxyConfig,
    HAProxyError,
    InitialRouting,
    first_backend,
    pool_backend,
    shed_backends,
    split_backend,
)
from recserve.control.runtime.fallback import FallbackConfig, FallbackError, FallbackServer
from recserve.control.runtime.procs import cmdline, kill_group, pid_alive
from recserve.control.state.store import InstanceRecord, State
from recserve.control.stats import percentile
from recserve.perf import report_reader

#: ``RouterConfig.knee_source`` of a knee set at runtime.
KNEE_SET_BY = "set by recctl limits (a measured knee)"
#: SQL condition on the state store's kv table matching every key the Router owns (a backup restored on a new
#: host drops them: its HAProxy starts empty and the Router rebuilds them; a knee measured there is not this
#: host's).
ROUTER_KEYS_SQL = ("key IN ('route', 'pool', 'router_mode', 'knee', 'knee_mean', 'limit_rule') "
                   "OR key LIKE 'weight:%' OR key LIKE 'limit:%'")
#: Used when neither --knee-rps nor a perf report gives the knee: about half of the ~1,000 rps measured on a
#: quiet 2-core host (issue 9), so a busy CI host is not overfilled either.
DEFAULT_KNEE_RPS = 500.0
#: How long after the last shed request the pool still counts as shedding (rollouts wait that long).
SHED_WINDOW_S = 2.0
#: The access log is copied to ``access.log.1`` and truncated beyond this size (about 250 bytes a request: 64 MiB
#: is some 4 minutes at 1,000 requests/s), so a long peak cannot fill the disk.
ACCESS_LOG_MAX_BYTES = 64 << 20


def forget_routing(db: sqlite3.Connection) -> None:
    """Delete every key the Router owns from a state database opened directly (a backup restored on a new host:
    its HAProxy starts empty and the Router rebuilds them). Runs in the caller's transaction."""
    db.execute(f"DELETE FROM kv WHERE {ROUTER_KEYS_SQL}")


class RouterError(RecserveError, RuntimeError):
    """A routing request was refused; ``code`` (control/errors.py) says which kind."""


def default_knee_rps(model: str = "recommend", report: Path = report_reader.PERF_REPORT) -> tuple[float, str]:
    """The knee (rps per host) and where it came from: the perf suite's latest capacity, else the default."""
    knee, source, _ = default_knee(model, report)
    return knee, source


def default_knee(model: str = "recommend", report: Path = report_reader.PERF_REPORT
                 ) -> tuple[float, str, float | None]:
    """(knee rps, where it came from, mean latency in ms at that knee or None): the perf suite's latest
    capacity (and its ``mean_ms_at_capacity``), else the default (mean unknown)."""
    try:
        mtime = report.stat().st_mtime_ns
    except OSError:
        mtime = None
    return _knee_from_report(model, report, mtime)


@functools.lru_cache(maxsize=8)
def _knee_from_report(model: str, report: Path, mtime: int | None) -> tuple[float, str, float | None]:
    """Read once per version of the report (by mtime): every route or weight change asks for the limits."""
    cap = report_reader.capacity_rps(model, report) if mtime is not None else None
    if cap and cap > 0:
        return cap, f"perf report {report}", report_reader.knee_mean_ms(model, report)
    return DEFAULT_KNEE_RPS, "conservative default (no perf report)", None


def _fallback_pid(pid_file: Path) -> int | None:
    """The pid ``pid_file`` names when it still runs control/fallback/app.py, else None."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    # recserve.control.fallback.app, or recserve.control.fallback_app before control/ had subpackages (a fleet
    # started by the previous layout is still stopped by this one)
    line = cmdline(pid)
    if pid_alive(pid) and ("recserve.control.fallback.app" in line or "fallback_app" in line):
        return pid
    return None


def _kill_fallback(pid_file: Path) -> None:
    """Stop the fallback server named by ``pid_file`` when that pid still runs control/fallback/app.py."""
    pid = _fallback_pid(pid_file)
    if pid is not None:
        kill_group(pid)
    pid_file.unlink(missing_ok=True)


@dataclass
class RouterConfig:
    """Routing settings; ``validate`` names the field and the rule."""

    workdir: Path
    grpc_port: int = GRPC_PORT
    http_port: int = HTTP_PORT
    slots: int = SLOTS
    metrics_port: int = 0
    mode: str = DEFAULT_MODE
    #: Knee of the host (requests/s at which p99 stays under the SLO); 0 = ``default_knee_rps()``.
    knee_rps: float = 0.0
    #: p99 latency target of admitted requests.
    slo_p99_ms: float = SLO_P99_MS
    #: How the host limit follows from the knee: ``p99`` (knee x SLO) or ``mean`` (knee x the knee's mean
    #: latency; SLO / ``p99_to_mean`` where none is known): control/routing/admission.py ``limit_latency``.
    limit_rule: str = LIMIT_RULE
    #: Mean latency at the knee in ms (0 = unknown: the perf report's, when the knee is the report's).
    knee_mean_ms: float = KNEE_MEAN_MS
    p99_to_mean: float = P99_TO_MEAN
    min_limit: int = 2
    #: At most 64 requests in flight per instance: Triton's queues (unbounded in the shipped configs, whose queue
    #: policies brought back the ~500 ms holds, perf/holds.py) hold at most this many client requests.
    max_limit: int = 64
    #: Start the degraded-answer fallback server and route shed requests to it.
    fallback: bool = True
    fallback_maxconn: int = FALLBACK_MAXCONN
    #: Shed requests that may wait for a fallback slot, at most ``fallback_wait_ms()``; 0 = refuse at once.
    fallback_queue: int = FALLBACK_QUEUE
    fallback_repository: Path | None = None
    #: A serving spec: the degraded-answer server answers its models as their ``degraded`` says.
    fallback_spec: Path | None = None
    #: Models whose shed requests get the refusal at once (a spec's models without ``degraded``).
    no_degraded_models: tuple[str, ...] = ()
    #: Let the AIMD controller (control/routing/admission.py) move each limit; off = the fixed limit.
    adaptive: bool = False
    #: Override of the derived ``timeout server`` (0 = derived from the SLO): for hosts whose latency tail is
    #: far fatter than the SLO (a shared CI machine), where 4 x SLO would cut slow-but-correct answers.
    timeout_server_ms_override: int = 0
    #: The client frontends' rules: bind address, TLS, allow-list, size limits, timeouts (control/routing/frontdoor.py).
    frontdoor: FrontDoorConfig = field(default_factory=FrontDoorConfig)
    knee_source: str = field(default="", init=False)
    #: Who set ``knee_rps`` when it was not the command line (``Router.set_knee``).
    knee_set_by: str = field(default="", init=False)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise RouterError(f"mode must be one of {list(MODES)}, got {self.mode!r}", "INVALID_ARGUMENT")
        if self.knee_rps < 0:
            raise RouterError(f"knee_rps must be >= 0 (0 = from the perf report), got {self.knee_rps}",
                              "INVALID_ARGUMENT")
        if not 1 <= self.slo_p99_ms <= 10000:
            raise RouterError(f"slo_p99_ms must be within 1..10000, got {self.slo_p99_ms}", "INVALID_ARGUMENT")
        if self.limit_rule not in LIMIT_RULES:
            raise RouterError(f"limit_rule must be one of {list(LIMIT_RULES)}, got {self.limit_rule!r}",
                              "INVALID_ARGUMENT")
        if not 0 <= self.knee_mean_ms <= 10000:
            raise RouterError(f"knee_mean_ms must be within 0..10000 (0 = unknown), got {self.knee_mean_ms}",
                              "INVALID_ARGUMENT")
        if not 1 <= self.min_limit <= self.max_limit:
            raise RouterError(f"limits must satisfy 1 <= min_limit <= max_limit, got {self.min_limit}.."
                              f"{self.max_limit}", "INVALID_ARGUMENT")
        if self.timeout_server_ms_override and not 50 <= self.timeout_server_ms_override <= 60000:
            raise RouterError(f"timeout_server_ms must be 0 (derived) or within 50..60000, got "
                              f"{self.timeout_server_ms_override}", "INVALID_ARGUMENT")
        if self.fallback_maxconn < 1:
            raise RouterError(f"fallback_maxconn must be >= 1, got {self.fallback_maxconn}", "INVALID_ARGUMENT")
        if not 0 <= self.fallback_queue <= 10000:
            raise RouterError(f"fallback_queue must be within 0..10000, got {self.fallback_queue}",
                              "INVALID_ARGUMENT")

    def knee(self) -> float:
        if self.knee_rps > 0:
            self.knee_source = self.knee_set_by or "configured (--knee-rps)"
            return self.knee_rps
        knee, self.knee_source = default_knee_rps()
        return knee

    def limit_basis(self) -> LimitBasis:
        """The latency the knee is multiplied by for the host limit, and why (``recctl status``/``limits``): the
        configured or measured mean at the knee, else (a knee from the perf report) the report's mean."""
        mean_ms = self.knee_mean_ms
        if not mean_ms and not self.knee_rps:
            mean_ms = default_knee()[2] or 0.0
        return limit_latency(self.limit_rule, self.slo_p99_ms / 1000, mean_ms / 1000, self.p99_to_mean,
                             knee_rps=self.knee(), beta=SQRT_BETA)

    def timeout_server_ms(self) -> int:
        """4 x the p99 target, within 100..1000 ms (see the module docstring), unless overridden."""
        if self.timeout_server_ms_override:
            return self.timeout_server_ms_override
        return int(min(1000, max(100, 4 * self.slo_p99_ms)))

    def fallback_wait_ms(self) -> int:
        """Longest wait of a shed request for a degraded answer: 2 x the SLO, within 20..1000 ms. Sized for the
        burst of every client reconnecting after a HAProxy restart (proxy-crash drill at 0.7x the knee: with
        100 ms and 64 places no request was refused, with 25 ms and 32 places 42 were: the degraded-answer
        server, CPU-starved at nice 10 behind the burst, answered in 37 ms at the median). Under a lasting
        overload the refusals that follow such a wait take that long: the price of serving a degraded answer
        whenever one can be had (docs/peak-traffic.md "Admission")."""
        return int(min(1000, max(20, 2 * self.slo_p99_ms)))

    def host_limit(self) -> int:
        """In-flight requests the host can take within the SLO (Little's law on the knee x the rule's latency)."""
        return initial_limit(self.knee(), self.limit_basis().latency_s, self.min_limit, self.max_limit * self.slots)

    def haproxy_config(self) -> HAProxyConfig:
        return HAProxyConfig(workdir=self.workdir, grpc_port=self.grpc_port, http_port=self.http_port,
                             slots=self.slots, metrics_port=self.metrics_port,
                             timeout_server_ms=self.timeout_server_ms(), maxconn=self.min_limit,
                             fallback_maxconn=self.fallback_maxconn, fallback_queue=self.fallback_queue,
                             fallback_timeout_queue_ms=self.fallback_wait_ms(), frontdoor=self.frontdoor,
                             no_degraded_models=tuple(self.no_degraded_models))


@dataclass
class SlotLoad:
    """One slot as HAProxy counts it now, summed over the traffic backends."""

    in_flight: int = 0
    queued: int = 0
    limit: int = 0
    served: int = 0


class Router:
    """Owns HAProxy (process via ``HAProxy``, config, runtime state), the fallback server and the routing keys."""

    def __init__(self, config: RouterConfig, state: State, event: Callable[[str, str], None] | None = None):
        config.validate()
        self.config = config
        self.state = state
        self.proxy = HAProxy(config.haproxy_config())
        self._event = event or (lambda kind, msg: state.event(kind, msg))
        self.fallback: FallbackServer | None = None
        self._lock = threading.RLock()
        self._slot_state: dict[int, str] = {}
        self._shed_total = 0
        self._last_shed = 0.0
        self.controllers: dict[int, AdaptiveLimit] = {}
        self._log_offset = 0
        self._adapt_shed = 0
        self.decisions: dict[int, str] = {}

    def set_degraded(self, spec: Path | None, no_degraded_models: tuple[str, ...]) -> None:
        """Before ``start()``: the serving spec the degraded-answer server answers from, and the models whose shed
        requests HAProxy refuses at once (no degraded answer)."""
        self.config.fallback_spec = spec
        self.config.no_degraded_models = tuple(no_degraded_models)
        self.proxy.config.no_degraded_models = tuple(no_degraded_models)

    def set_limit_rule(self, rule: str, knee_mean_ms: float = 0.0) -> None:
        """Before ``start()``: the server's ``--limit-rule`` and ``--knee-mean-ms`` (settings the FleetConfig does
        not carry; ``set_knee`` changes them at runtime)."""
        self.config.limit_rule, self.config.knee_mean_ms = rule, float(knee_mean_ms)
        self.config.validate()

    # ================================================================== lifecycle
    @property
    def mode(self) -> str:
        return self.config.mode

    def start(self) -> bool:
        """Adopt a running HAProxy or start one; start the fallback. True when HAProxy is fresh (needs restore)."""
        if self.proxy.adopt():
            self._event("haproxy", f"adopted haproxy (pid {self.proxy.pid})")
            fresh = False
        else:
            self.proxy.start()
            how = ("overridden" if self.config.timeout_server_ms_override
                   else f"4 x the SLO p99 {self.config.slo_p99_ms:g} ms")
            self._event("haproxy", f"haproxy started (pid {self.proxy.pid}); timeout server "
                        f"{self.proxy.config.timeout_server_ms} ms ({how})")
            fresh = True
        self.state.put("router_mode", self.config.mode)
        stored = self.state.get("knee", "") or ""
        if stored and not self.config.knee_rps:  # set by ``recctl limits`` before a control-plane restart
            self.config.knee_rps, self.config.knee_set_by = float(stored), KNEE_SET_BY
            # the mean and the rule set with that knee come back with it
            self.config.knee_mean_ms = float(self.state.get("knee_mean", "") or 0.0)
            self.config.limit_rule = self.state.get("limit_rule", "") or self.config.limit_rule
        elif self.config.knee_rps:  # the command line's knee wins over an earlier ``recctl limits``
            for key in ("knee", "knee_mean", "limit_rule"):
                self.state.put(key, "")
        self.ensure_fallback(force_bind=fresh)
        return fresh

    def ensure_running(self, stopping: bool = False) -> bool:
        """Supervision: restart a dead HAProxy (then ``restore()``) or fallback. True when HAProxy restarted."""
        if stopping:
            return False
        restarted = False
        with self._lock:
            if not self.proxy.is_alive():
                self._event("haproxy", "haproxy is gone: starting it again")
                try:
                    self.proxy.forget()
                    self.proxy.config.initial = self.initial_routing()  # serving from its first connection
                    self.proxy.start()
                    self.ensure_fallback(force_bind=True)
                    self.restore()
                    self._event("haproxy", f"haproxy restarted (pid {self.proxy.pid})")
                    restarted = True
                except (HAProxyError, OSError) as exc:
                    self._event("haproxy-error", f"restart failed: {exc}"[:500])
                    raise
            else:
                self.ensure_fallback()
        return restarted

    def ensure_fallback(self, force_bind: bool = False) -> None:
        """Start (or restart) the degraded-answer server and bind it; without it shed requests get 429/8."""
        if not self.config.fallback:
            return
        fb = self.fallback
        if fb is not None and fb.is_alive():
            if force_bind:
                self.proxy.bind_fallback(fb.config.grpc_port, fb.config.http_port)
            return
        pid_file = self.config.workdir / "fallback.pid"
        _kill_fallback(pid_file)  # one left by an earlier control plane (its ports are unknown to this one)
        cfg = FallbackConfig(workdir=self.config.workdir / "fallback", max_concurrent=self.config.fallback_maxconn * 2)
        if self.config.fallback_repository is not None:
            cfg.model_repository = self.config.fallback_repository
        cfg.spec = self.config.fallback_spec
        self.fallback = FallbackServer(cfg)
        try:
            self.fallback.start(wait=True)
        except FallbackError as exc:
            self.fallback = None
            pid_file.unlink(missing_ok=True)
            self._event("fallback-error", f"degraded answers unavailable, shed requests get 429/"
                        f"RESOURCE_EXHAUSTED: {exc}"[:500])
            return
        pid_file.write_text(f"{self.fallback.pid}\n")
        self.proxy.bind_fallback(cfg.grpc_port, cfg.http_port)
        self._event("fallback", f"degraded-answer server pid {self.fallback.pid} on grpc {cfg.grpc_port}")

    def stop(self) -> None:
        self.stop_processes()
        for key in ("route", "pool"):
            self.state.put(key, "")

    def stop_processes(self) -> list[str]:
        """Stop HAProxy (ours, or the one its pid file names) and the fallback server, leaving the routing in the
        state store as it is; returns what was running, one ``"<what> (pid N)"`` each."""
        if not self.proxy.pid:
            self.proxy.adopt()
        stopped = [f"haproxy (pid {self.proxy.pid})"] if self.proxy.is_alive() else []
        self.proxy.stop()
        fb = self.fallback
        if fb is not None and fb.is_alive():
            stopped.append(f"fallback server (pid {fb.pid})")
        elif (pid := _fallback_pid(self.config.workdir / "fallback.pid")) is not None:
            stopped.append(f"fallback server (pid {pid})")
        self.stop_fallback()
        return stopped

    def stop_fallback(self) -> None:
        """Stop the fallback server: ours, or one an earlier control plane left (by its pid file)."""
        if self.fallback is not None:
            self.fallback.stop()
            self.fallback = None
        _kill_fallback(self.config.workdir / "fallback.pid")

    def initial_routing(self) -> InitialRouting:
        """The routing a restarted HAProxy's config starts with, from the state store: what ``restore()`` would
        set first (healthy instances, the pool, limits, weights) and the running degraded-answer server. Drained
        instances and canaries start out of traffic; ``restore()`` then sets them."""
        recs = [r for r in self.state.instances()
                if r.grpc_port and r.state == "healthy" and r.role != "canary"]
        fb = self.fallback if self.fallback is not None and self.fallback.is_alive() else None
        limits = {r.slot: int(v) for r in recs if (v := self.state.get(f"limit:{r.slot}", "") or "")}
        weights = {r.slot: self.weight(r.id) for r in recs}
        return InitialRouting(slots={r.slot: (r.grpc_port, r.http_port) for r in recs},
                              pool=self.pool_slots() & {r.slot for r in recs}, limits=limits, weights=weights,
                              fallback=(fb.config.grpc_port, fb.config.http_port) if fb else None)

    def restore(self) -> None:
        """After a HAProxy (re)start: slots, states, pool, limits, weights and route from the state store."""
        recs = self.state.instances()
        for r in recs:
            if r.grpc_port and r.state in ("healthy", "drained"):
                self.bind(r.slot, r.grpc_port, r.http_port)
                if r.role != "canary":
                    self.set_state(r.slot, "drain" if r.state == "drained" else "ready")
        for r in recs:
            lim = self.state.get(f"limit:{r.slot}", "")
            if lim:
                self.proxy.set_maxconn(r.slot, int(lim))
        route = self.current_route()
        if route.startswith("first:"):
            self.route("first", int(route.split(":")[1]))
        elif route == "split":
            for r in recs:
                self.proxy.set_weight(r.slot, self.weight(r.id))
            self.route("split")
        elif route == "pool":
            self.route("pool")

    # ================================================================== slots and traffic (pool.Traffic)
    def bind(self, slot: int, grpc_port: int, http_port: int) -> None:
        """Point ``slot`` at an instance's ports (it stays out of traffic until ``set_state``)."""
        with self._lock:
            self.proxy.bind_slot(slot, grpc_port, http_port)
            stored = self.state.get(f"limit:{slot}", "") if self.config.adaptive else ""
            self.set_limit(slot, int(stored) if stored else self.slot_limit())  # a changed knee applies

    def set_state(self, slot: int, state: str) -> None:
        """``ready`` / ``drain`` / ``maint`` of the instance in ``slot``; in the pool backend only pool members
        follow it (the others stay out of rotation there)."""
        with self._lock:
            self._slot_state[slot] = state
            self.proxy.set_state(slot, state, pool_state=state if slot in self.pool_slots() else "maint")

    def set_weight(self, slot: int, weight: int) -> None:
        """Canary weight of ``slot`` in the split backend (0..256), recorded as ``weight:<instance>``."""
        with self._lock:
            self.proxy.set_weight(slot, weight)
            iid = next((r.id for r in self.state.instances() if r.slot == slot), None)
            if iid is not None:
                self.state.put(f"weight:{iid}", str(weight))
            self.apply_limits()

    def route(self, mode: str, slot: int | None = None) -> None:
        """Send clients to ``pool`` (active-active), ``first`` (``slot`` first) or ``split`` (weights)."""
        if mode not in ("pool", "first", "split"):
            raise RouterError(f"route must be 'pool', 'first' or 'split', got {mode!r}", "INVALID_ARGUMENT")
        with self._lock:
            self.proxy.route(mode, slot or 0)
            self.state.put("route", f"first:{slot or 0}" if mode == "first" else mode)
            self.apply_limits()

    def serve(self, primary_slot: int | None) -> None:
        """Normal serving for the mode: the pool (active-active) or ``primary_slot`` first (primary-standby)."""
        if self.mode == "active-active":
            self.route("pool")
        elif primary_slot is not None:
            self.route("first", primary_slot)

    def pool_slots(self) -> set[int]:
        text = self.state.get("pool", "") or ""
        return {int(s) for s in text.split(",") if s.strip()}

    def set_pool(self, slots: set[int]) -> None:
        """The active-active members; a slot leaving the pool drains there (in-flight requests finish).

        The pool's in-flight room never dips on the way: a shrinking pool raises the limits of the members left
        before one leaves (its load lands on them at once), a growing one lowers them after the new member
        takes traffic."""
        with self._lock:
            old = self.pool_slots()
            self.state.put("pool", ",".join(str(s) for s in sorted(slots)))
            shrinking = len(slots) < len(old)
            if shrinking:
                self.apply_limits()
            cmds = []
            for s in sorted(old | slots):
                st = self._slot_state.get(s) or self._admin_state(s)
                if st is None:
                    continue
                pool_st = st if s in slots else ("drain" if s in old else "maint")
                cmds += [f"set server {pool_backend(p)}/s{s} state {pool_st}" for p in PROTOS]
            self.proxy.commands(cmds)
            if not shrinking:
                self.apply_limits()

    def _admin_state(self, slot: int) -> str | None:
        """The slot's state as HAProxy holds it (after a control-plane restart adopted a running HAProxy, this
        Router has not set it itself): maint/drain from ``show servers state``'s admin bits, else ready."""
        try:
            row = self.proxy.servers().get(f"chk/s{slot}")
        except HAProxyError:
            return None
        if row is None:
            return None
        admin = int(row.get("srv_admin_state") or 0)
        # HAProxy's SRV_ADMF_* bits: forced/inherited/resolver/health maint 0x63, drain 0x18; 0x04 is the config's
        # "disabled", which stays set after "state ready" (seen on 2.6.12)
        state = "maint" if admin & 0x63 else ("drain" if admin & 0x18 else "ready")
        self._slot_state[slot] = state
        return state

    def current_route(self) -> str:
        return self.state.get("route", "") or ""

    def splitting(self) -> bool:
        """The split route (canary weights) is in force: a rollout owns routing."""
        return self.current_route() == "split"

    def weight(self, iid: str) -> int:
        """The canary weight last set for instance ``iid`` on the split backend (0 when none)."""
        return int(self.state.get(f"weight:{iid}", "0") or 0)

    def shares(self, recs: list[InstanceRecord]) -> dict[str, int]:
        """Each instance's share of client traffic (percent) on the route in force: its canary weight on the
        split route, an equal share of the pool, or all of it for the slot a ``first`` route sends to."""
        route = self.current_route()
        pool = self.pool_slots()
        out = {}
        for r in recs:
            if route == "split":
                out[r.id] = self.weight(r.id)
            elif route == "pool":  # leastconn over the pool members: an equal share each
                out[r.id] = round(100 / len(pool)) if r.slot in pool else 0
            else:  # balance first: the instance in the routed slot takes everything
                out[r.id] = 100 if route == f"first:{r.slot}" else 0
        return out

    # ================================================================== limits
    def set_knee(self, knee_rps: float, knee_mean_ms: float = 0.0, limit_rule: str = "") -> None:
        """A measured knee replaces the configured one: the host limit and every fixed per-server limit follow
        at once (the adaptive controller keeps its own), and it outlives a control-plane restart (state key
        ``knee``) unless that restart names ``--knee-rps``. ``knee_mean_ms``: the mean latency measured at that
        knee (0: unknown); ``limit_rule``: ``p99`` or ``mean`` ("" keeps the rule in force); both are kept
        with the knee."""
        if not 1 <= knee_rps <= 1_000_000:
            raise RouterError(f"knee_rps must be within 1..1000000 requests/s, got {knee_rps:g}", "INVALID_ARGUMENT")
        if not 0 <= knee_mean_ms <= 10000:
            raise RouterError(f"knee_mean_ms must be within 0..10000 ms (0 = unknown), got {knee_mean_ms:g}",
                              "INVALID_ARGUMENT")
        if limit_rule and limit_rule not in LIMIT_RULES:
            raise RouterError(f"limit_rule must be one of {list(LIMIT_RULES)}, got {limit_rule!r}",
                              "INVALID_ARGUMENT")
        with self._lock:
            self.config.knee_rps, self.config.knee_set_by = float(knee_rps), KNEE_SET_BY
            self.config.knee_mean_ms = float(knee_mean_ms)
            self.config.limit_rule = limit_rule or self.config.limit_rule
            self.state.put("knee", f"{knee_rps:g}")
            self.state.put("knee_mean", f"{knee_mean_ms:g}" if knee_mean_ms else "")
            self.state.put("limit_rule", self.config.limit_rule)
            self.apply_limits()
        self._event("limits", f"knee set to {knee_rps:g} rps: host limit {self.config.host_limit()} in flight "
                    f"({self.config.limit_basis().why}), {self.slot_limit()} per server")

    def serving_slots(self) -> set[int]:
        """The slots the current route sends requests to: the pool's members, the primary of a ``first`` route,
        the slots with a canary weight above 0 on the ``split`` route (active-active before a route is set: the
        pool's members)."""
        route = self.current_route()
        if route == "split":
            return {r.slot for r in self.state.instances() if self.weight(r.id) > 0}
        if route.startswith("first:"):
            return {int(route.split(":")[1])}
        return self.pool_slots() if self.mode == "active-active" else set()

    def traffic_slots(self) -> int:
        """How many servers share the host's limit: those the current route sends requests to (at least 1)."""
        return max(1, len(self.serving_slots()))

    def slot_limit(self) -> int:
        """Per-server limit: the host's limit shared by the servers taking traffic (on one host extra
        instances add no capacity), within [min_limit, max_limit]."""
        per = -(-self.config.host_limit() // self.traffic_slots())
        return max(self.config.min_limit, min(self.config.max_limit, per))

    def apply_limits(self) -> None:
        """Set every bound slot to the fixed limit (unless the adaptive controller owns it)."""
        lim = self.slot_limit()
        for r in self.state.instances():
            if not r.grpc_port or (self.config.adaptive and r.slot in self.controllers):
                continue
            self.set_limit(r.slot, lim)

    def set_limit(self, slot: int, limit: int) -> None:
        with self._lock:
            self.proxy.set_maxconn(slot, limit)
            self.state.put(f"limit:{slot}", str(limit))

    def load(self) -> dict[int, SlotLoad]:
        """In-flight (scur), queued (qcur), limit (slim) and served (stot) per slot from ``show stat``."""
        out: dict[int, SlotLoad] = {}
        traffic = {pool_backend(p) for p in PROTOS} | {split_backend(p) for p in PROTOS} | {
            first_backend(p, k) for p in PROTOS for k in range(self.config.slots)}
        for row in self.proxy.stat():
            if row.get("pxname") not in traffic or not row.get("svname", "").startswith("s"):
                continue
            try:
                slot = int(row["svname"][1:])
            except ValueError:
                continue
            ld = out.setdefault(slot, SlotLoad())
            ld.in_flight += int(row.get("scur") or 0)
            ld.queued += int(row.get("qcur") or 0)
            ld.served += int(row.get("stot") or 0)
            ld.limit = max(ld.limit, int(row.get("slim") or 0))
        return out

    def shed_total(self) -> int:
        """Requests shed so far: sent to the fallback, or answered 429/RESOURCE_EXHAUSTED by HAProxy."""
        counted = set(shed_backends())  # not the frontends' "intercepted": that counts the front door's 403s too
        return sum(int(row.get("stot") or 0) for row in self.proxy.stat()
                   if row.get("pxname") in counted and row.get("svname") == "BACKEND")

    @property
    def shed_seen(self) -> int:
        """Shed requests counted at the last ``shedding()`` call."""
        return self._shed_total

    def shedding(self) -> bool:
        """True while requests are being shed, or were within ``SHED_WINDOW_S``."""
        try:
            total = self.shed_total()
        except HAProxyError:
            return False
        now = time.monotonic()
        if total > self._shed_total:
            self._last_shed = now
        self._shed_total = total
        return self._last_shed > 0 and now - self._last_shed < SHED_WINDOW_S

    def rotate_access_log(self, max_bytes: int = ACCESS_LOG_MAX_BYTES) -> bool:
        """Copy-truncate the access log past ``max_bytes`` (HAProxy appends to the same open file: O_APPEND
        writes land at the new end); True when it rotated."""
        path = self.proxy.config.access_log_path
        try:
            if path.stat().st_size <= max_bytes:
                return False
            shutil.copyfile(path, path.with_name(path.name + ".1"))
            os.truncate(path, 0)
        except OSError:
            return False
        self._log_offset = 0
        return True

    def interval_samples(self) -> tuple[dict[int, float | None], dict[int, int]]:
        """Per slot, from the access log lines written since the last call: p99 of the server response time
        (``Tr``, seconds) and the count of 503 answers (Triton's queue-full)."""
        entries, self._log_offset = accesslog.read_from(self.proxy.config.access_log_path, self._log_offset)
        lat: dict[int, list[float]] = {}
        full: dict[int, int] = {}
        for e in entries:
            if e.slot is None:
                continue
            if e.tr >= 0:
                lat.setdefault(e.slot, []).append(e.tr / 1000)
            if e.status == 503:
                full[e.slot] = full.get(e.slot, 0) + 1
        p99 = {s: percentile(v, 99) for s, v in lat.items()}  # the project's one percentile rule
        return p99, full

    def adapt(self) -> None:
        """One interval of the adaptive controller (only with ``adaptive``): each serving slot's limit moves
        with its measured p99 against the SLO and its queue-full count (control/routing/admission.py's rules)."""
        if not self.config.adaptive:
            return
        p99_s, queue_full = self.interval_samples()
        cfg = LimitConfig(slo_p99_s=self.config.slo_p99_ms / 1000, min_limit=self.config.min_limit,
                          max_limit=self.config.max_limit)
        total = self.shed_total()
        shed, self._adapt_shed = max(0, total - self._adapt_shed), total
        for slot, ld in self.load().items():
            if self.mode == "active-active" and slot not in self.pool_slots():
                continue
            start = max(cfg.min_limit, min(cfg.max_limit, ld.limit or cfg.min_limit))
            ctl = self.controllers.setdefault(slot, AdaptiveLimit(cfg, start))
            d = ctl.update(IntervalSample(p99_s=p99_s.get(slot), shed=shed, queue_full=queue_full.get(slot, 0),
                                          in_flight=ld.in_flight))
            self.decisions[slot] = f"{d.action}: {d.reason}"
            if d.limit != ld.limit:
                self.set_limit(slot, d.limit)
