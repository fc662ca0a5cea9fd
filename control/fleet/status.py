"""What the fleet says about itself: ``Fleet.status()`` returns a ``FleetStatus`` of ``InstanceStatus`` rows.

Typed here, once: the API edge (control/api/server.py) turns it into the ``FleetStatus`` protobuf, and recctl's JSON
is that message's fields; nothing between the fleet and the edge reshapes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class InstanceStatus:
    """One instance: its record, what it has loaded, its traffic share and HAProxy's view of its load."""

    id: str
    role: str
    state: str
    pid: int
    slot: int
    grpc_port: int
    http_port: int
    metrics_port: int
    detail: str
    restarts: int
    last_healthy_unix: float
    #: share of client traffic on the route in force, percent (the split route: its canary weight)
    weight: int
    #: the versions Triton reports ready (empty when it was not asked: not healthy, drained or broken)
    models: dict[str, list[int]] = field(default_factory=dict)
    shm_regions: int = 0
    shm_bytes: int = 0
    in_pool: bool = False
    in_flight: int = 0
    queued: int = 0
    limit: int = 0
    limit_decision: str = ""


@dataclass(frozen=True)
class FleetStatus:
    """The fleet as a whole: health with its warnings, routing, limits, desired versions and every instance."""

    health: str
    warnings: list[str]
    route: str
    mode: str
    active_target: int
    shedding: bool
    knee_rps: float
    knee_source: str
    host_limit: int
    desired: dict[str, list[int]]
    instances: list[InstanceStatus]

    def instance(self, iid: str) -> InstanceStatus | None:
        return next((i for i in self.instances if i.id == iid), None)
