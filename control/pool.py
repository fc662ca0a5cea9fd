"""The set of serving backends that rollouts and health reactions act on, whatever runs them.

``control.fleet.Fleet`` (local tritonserver processes behind HAProxy) and ``control.kube.pool.KubePool`` (Triton
pods of a Kubernetes Deployment) both provide it, so ``control.rollout.RolloutManager`` runs the same canary,
gates and rollback against either. Instances are named by id; each has an ``InstanceRecord`` in ``state``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

from recserve.control.client import RecClient
from recserve.control.golden import Golden
from recserve.control.metrics import ControlMetrics
from recserve.control.state import State


@runtime_checkable
class Traffic(Protocol):
    """Who gets client requests: HAProxy's runtime API locally, pod readiness gates on Kubernetes."""

    def set_weight(self, slot: int, weight: int) -> None: ...
    def set_state(self, slot: int, state: str) -> None: ...
    def route(self, mode: str, slot: int | None = None) -> None: ...


@runtime_checkable
class ServingPool(Protocol):
    state: State
    metrics: ControlMetrics
    golden: Golden
    repository: Path
    lock: threading.RLock
    canary_broken: dict[str, str]

    @property
    def haproxy(self) -> Traffic: ...

    def model_closure(self) -> list[str]: ...
    def versioned_models(self) -> list[str]: ...
    def desired(self) -> dict[str, list[int]]: ...
    def client(self, iid: str) -> RecClient: ...
    def metrics_url(self, iid: str) -> str: ...
    def reload(self, iid: str, versions: dict[str, list[int]], only: list[str] | None = None) -> None: ...
    def route_first(self, slot: int) -> None: ...
    def schedule_restart(self, iid: str, reason: str) -> None: ...
    def ensure_primary(self) -> None: ...
