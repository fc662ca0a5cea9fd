"""The fleet's settings and its error type (shared by every fleet module, so none imports another's class)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from recserve.control import defaults as d
from recserve.control.errors import RecserveError
from recserve.control.routing.frontdoor import FrontDoorConfig

FAULT_DIR_ENV = "RECSERVE_FAULT_DIR"
ROLES = ("active", "primary", "standby", "canary")


class FleetError(RecserveError, RuntimeError):
    """A fleet operation was refused or failed; ``code`` (control/errors.py) says which kind."""


@dataclass
class FleetConfig:
    root: Path = d.DEFAULT_ROOT
    repository: Path = d.DEFAULT_REPOSITORY
    grpc_port: int = d.GRPC_PORT
    http_port: int = d.HTTP_PORT
    instances: int = d.INSTANCES
    slots: int = d.SLOTS
    #: Top-level models to serve; None = every servable ensemble (recommend, search; *_trt on GPU hosts).
    models: list[str] | None = None
    #: The serving spec (control/spec/spec.py): its models are served and golden-checked by its rules; None = the
    #: demo's recommend/search golden checks (control/fleet/golden.py).
    spec: Path | None = None
    health_interval_s: float = d.HEALTH_INTERVAL_S
    #: Consecutive failed deep checks before an instance is marked broken (1 for fatal failures).
    fail_threshold: int = 2
    restart_backoff_s: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
    instance_start_timeout_s: float = 180.0
    #: CPU niceness of a serving instance (0..19). Above 0 so that, when the instances saturate the host, HAProxy
    #: (which refuses the excess in microseconds) and the control plane's health checks still get the CPU at once:
    #: measured in the overload drill, 2 cores, 2x the knee: rejection p99 43 ms with all at 0. Loading instances
    #: (out of rotation) run at 19; the degraded-answer server at ``FallbackConfig.nice``, below them.
    instance_nice: int = 5
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Warm-up after a load, before traffic (control/fleet/warmup.py): rounds (0: none), the compute ratio to a
    #: serving instance that counts as warm, and its deadline in seconds.
    warmup_rounds: int = d.WARMUP_ROUNDS
    warmup_ratio: float = d.WARMUP_RATIO
    warmup_deadline_s: float = d.WARMUP_DEADLINE_S
    #: HAProxy's Prometheus exporter port (0 = none).
    haproxy_metrics_port: int = d.HAPROXY_METRICS_PORT
    #: ``active-active`` (actives behind ``balance leastconn``, the rest hot standbys) or ``primary-standby``.
    mode: str = d.MODE
    #: Active instances in active-active mode on first start (``recctl scale --active N`` changes it later).
    active: int = d.ACTIVE
    #: The host's knee in requests/s (per-server limits derive from it); 0 = the latest perf report or default.
    knee_rps: float = d.KNEE_RPS
    #: p99 target of admitted requests: sets the in-flight limits and HAProxy's ``timeout server``.
    slo_p99_ms: float = d.SLO_P99_MS
    #: Start the degraded-answer fallback server for shed requests.
    fallback: bool = True
    #: In-flight limit of the fallback server's backend (beyond it: 429 / RESOURCE_EXHAUSTED).
    fallback_maxconn: int = d.FALLBACK_MAXCONN
    #: Shed requests that may wait (up to 2 x SLO) for a fallback slot before the refusal (0: none wait).
    fallback_queue: int = d.FALLBACK_QUEUE
    #: Let the AIMD controller move the per-server limits (off: the fixed limit).
    adaptive_limits: bool = False
    #: HAProxy ``timeout server`` override (0: derived from the SLO, see control/routing/router.py).
    timeout_server_ms: int = d.TIMEOUT_SERVER_MS
    #: Client front door: bind address, TLS, limits (control/routing/frontdoor.py); its admin key file is the fleet's.
    frontdoor: FrontDoorConfig = field(default_factory=FrontDoorConfig)

    def validate(self) -> None:
        """FleetError naming the field and the rule."""
        if self.mode not in d.MODES:
            raise FleetError(f"mode must be 'active-active' or 'primary-standby', got {self.mode!r}",
                             "INVALID_ARGUMENT")
        if not 0 <= self.instance_nice <= 19:
            raise FleetError(f"instance_nice must be 0..19, got {self.instance_nice}", "INVALID_ARGUMENT")
        if self.warmup_rounds < 0 or self.warmup_ratio < 1 or self.warmup_deadline_s <= 0:
            raise FleetError(f"warm-up: rounds must be >= 0, ratio >= 1 and deadline > 0, got {self.warmup_rounds}, "
                             f"{self.warmup_ratio}, {self.warmup_deadline_s}", "INVALID_ARGUMENT")
        if not 1 <= self.instances <= self.slots:
            raise FleetError(f"instances must be within 1..slots ({self.slots}), got {self.instances}",
                             "INVALID_ARGUMENT")
        if self.mode == "active-active" and not 1 <= self.active <= self.instances:
            raise FleetError(f"active must be within 1..instances ({self.instances}), got {self.active}",
                             "INVALID_ARGUMENT")
