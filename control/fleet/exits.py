"""Instance process exits, seen the moment they happen: one pidfd per watched tritonserver, polled by one thread.

The deep check finds a dead process on its next round (every ``health_interval_s``, plus the check itself); until
then HAProxy keeps the dead instance's share of the host's in-flight limit, and the instances left serve the whole
load on their own share of it. A pidfd (Linux 5.3+, ``os.pidfd_open``) becomes readable when its process exits,
whether or not this process is its parent (an adopted instance is not), so the reaction starts at once.

Where pidfds are missing (another OS, an old kernel, a seccomp filter), ``available`` is False and ``why`` says
so: the deep checks still find every exit, only later.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable


class ExitWatch:
    """Calls ``on_exit(instance_id, pid)`` once when a process from ``pids()`` exits.

    ``pids()`` (read every ``interval_s``) says which processes to watch now: instance id -> pid. A pid that leaves
    that map is no longer watched; one that is gone before it could be opened is reported at once.
    """

    def __init__(self, pids: Callable[[], dict[str, int]], on_exit: Callable[[str, int], None],
                 interval_s: float = 0.2):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self._pids = pids
        self._on_exit = on_exit
        self._interval_ms = int(interval_s * 1000)
        self._fds: dict[tuple[str, int], int] = {}
        self._reported: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="exit-watch", daemon=True)
        self.why = _unavailable()
        self.available = not self.why

    def start(self) -> ExitWatch:
        if self.available:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                exited = self._sync(self._pids())
                exited += self._poll()
            except Exception:  # a failed read of the watch list: the deep checks still run; try again
                self._stop.wait(self._interval_ms / 1000)
                continue
            for key in exited:
                if self._stop.is_set():
                    return
                self._reported.add(key)
                try:
                    self._on_exit(*key)
                except Exception:  # a bug in the reaction must not stop the watch
                    pass

    def _sync(self, want: dict[str, int]) -> list[tuple[str, int]]:
        """Open pidfds for new pids, close those no longer wanted; the pids already gone are returned."""
        keys = {(iid, pid) for iid, pid in want.items() if pid > 0}
        for key in set(self._fds) - keys:
            os.close(self._fds.pop(key))
        self._reported &= keys
        gone = []
        for key in keys - set(self._fds) - self._reported:
            try:
                self._fds[key] = os.pidfd_open(key[1])
            except ProcessLookupError:
                gone.append(key)
        return gone

    def _poll(self) -> list[tuple[str, int]]:
        if not self._fds:
            self._stop.wait(self._interval_ms / 1000)
            return []
        poller = select.poll()
        by_fd = {fd: key for key, fd in self._fds.items()}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        out = []
        for fd, _ in poller.poll(self._interval_ms):
            key = by_fd[fd]
            os.close(self._fds.pop(key))
            out.append(key)
        return out


def _unavailable() -> str:
    """Why pidfds cannot be used here ("" when they can)."""
    if not hasattr(os, "pidfd_open"):
        return "os.pidfd_open is missing (Linux 5.3+ and Python 3.9+ only)"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        return f"pidfd_open failed: {exc}"
    return ""
