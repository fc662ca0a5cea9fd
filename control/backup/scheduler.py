"""The control plane's backup thread: a backup every ``schedule.every_hours`` and after each finished rollover.

Why a thread of its own: a backup hashes, uploads and verifies for seconds to minutes and must never hold up
health checks or rollouts; requests (after a rollover, ``recctl backup now``) queue here and run one at a time.
"""

from __future__ import annotations

import threading

from recserve.control.backup.manager import BackupManager, schedule_due
from recserve.control.backup.policy import BackupError
from recserve.control.state.store import RolloutRecord


class BackupScheduler:
    """Owns the backup thread; ``start``/``stop`` explicit, wakes every ``check_s`` or on a request."""

    def __init__(self, manager: BackupManager, retry_s: float = 300.0, check_s: float = 30.0):
        self.manager = manager
        self.policy = manager.policy
        self.retry_s = retry_s
        self.check_s = check_s
        self._requests: list[str] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> BackupScheduler:
        self.manager.refresh_metrics()
        self._thread = threading.Thread(target=self._loop, name="backup-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Let a running backup finish (up to ``timeout_s``): a half-written one is never recorded anyway."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def request(self, trigger: str) -> None:
        self._requests.append(trigger)
        self._wake.set()

    def on_rollout_finished(self, rec: RolloutRecord) -> None:
        """Rollout listener: the desired versions changed, so back them up now (policy ``after_rollover``)."""
        if self.policy.after_rollover and rec.status == "succeeded":
            self.request(f"after rollout {rec.id} ({rec.model} -> {rec.to_version})")

    def _next_trigger(self) -> str | None:
        if self._requests:
            return self._requests.pop(0)
        due = schedule_due(self.manager.clock(), self.manager.last_verified, self.manager.last_attempt,
                           self.policy.every_s, self.retry_s)
        return f"schedule: {due.reason}" if due.due else None

    def _loop(self) -> None:
        while not self._stop.is_set():
            trigger = self._next_trigger()
            if trigger is not None:
                try:
                    self.manager.run(trigger)
                except BackupError:
                    pass  # counted, logged as an event and in the metrics by the manager
                continue
            self._wake.wait(self.check_s)
            self._wake.clear()
