"""Deep health of one Triton instance, and the monitor thread that checks every instance every few hundred ms.

Triton's own readiness can stay green while a model is broken, so a check is only green when the process is
alive, the server is live, every version the instance must serve is READY (and nothing else of those models),
and a real ``recommend`` and ``search`` request returns the golden answer for exactly those versions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from recserve.control.client import RecClient
from recserve.control.fleet.golden import Golden
from recserve.control.runtime.triton import TritonError, TritonServer

#: How long one HTTP health call may take before the instance counts as hung.
HTTP_TIMEOUT_S = 0.5
#: How long a golden inference may take (generous: a busy 2-core host is slow, not broken).
INFER_TIMEOUT_S = 1.0


@dataclass
class Probe:
    """One deep check: ``stage`` says where it stopped (``ok`` when it passed every stage)."""

    ok: bool
    stage: str
    reason: str
    ts: float
    latency_s: float = 0.0
    #: True when the failure is unambiguous (process gone, connection refused): no second check needed.
    fatal: bool = False


def ready_versions(server: TritonServer, timeout: float = HTTP_TIMEOUT_S) -> dict[str, list[int]] | None:
    """Model -> READY versions from the (admin-keyed) repository index; None when the call failed."""
    try:
        return server.loaded_versions(timeout)
    except TritonError:
        return None


def deep_check(server: TritonServer, alive: bool, versions: dict[str, list[int]], golden: Golden,
               client: RecClient) -> Probe:
    t0 = time.time()

    def fail(stage: str, reason: str, fatal: bool = False) -> Probe:
        return Probe(False, stage, reason, t0, time.time() - t0, fatal)

    if not alive:
        return fail("process", "process is gone", fatal=True)
    status = server.live_status(HTTP_TIMEOUT_S)
    if status == 0:
        return fail("live", "no answer on the HTTP port (hung or not listening)")
    if status != 200:
        return fail("live", f"/v2/health/live answered {status}")
    # Server-level /v2/health/ready is not used: with strict readiness it stays 400 after any failed load (the
    # failed version lingers as UNAVAILABLE) and while an old version unloads, although every model serves.
    # Readiness here is per model: each version the instance must serve is READY in the repository index.
    loaded = ready_versions(server)
    if loaded is None:
        return fail("versions", "repository index call failed")
    wrong = {m: loaded.get(m, []) for m, v in versions.items() if sorted(loaded.get(m, [])) != sorted(v)}
    if wrong:
        return fail("versions", f"serving {wrong}, must serve { {m: versions[m] for m in wrong} }")
    try:
        got = golden.ask(client, golden.requests)
    except Exception as exc:  # tritonclient raises its own exception types
        return fail("golden", f"golden inference failed: {str(exc)[:200]}")
    exp = golden.expected(versions)
    if exp is None:  # never the instance's own answer: without an expectation the check cannot pass
        return fail("golden", f"no expected answers for these versions: {golden.problem(versions)}")
    diff = golden.compare(got, exp)
    if diff:
        return fail("golden", f"wrong answer: {diff}")
    return Probe(True, "ok", "", t0, time.time() - t0)


class HealthMonitor:
    """Runs ``check(instance_id) -> Probe`` for every id from ``ids()`` every ``interval_s``, in parallel,
    and hands each result to ``on_probe``; a slow (hung) instance never delays the others."""

    def __init__(self, ids: Callable[[], list[str]], check: Callable[[str], Probe],
                 on_probe: Callable[[str, Probe], None], interval_s: float = 0.3):
        self.ids = ids
        self.check = check
        self.on_probe = on_probe
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._inflight: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="health")
        self._thread = threading.Thread(target=self._loop, name="health-monitor", daemon=True)

    def start(self) -> HealthMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for iid in self.ids():
                with self._lock:
                    if iid in self._inflight:
                        continue
                    self._inflight.add(iid)
                self._pool.submit(self._run, iid)
            self._stop.wait(self.interval_s)

    def _run(self, iid: str) -> None:
        try:
            probe = self.check(iid)
            if not self._stop.is_set():
                self.on_probe(iid, probe)
        except Exception as exc:  # a bug in a check must not stop the monitor
            self.on_probe(iid, Probe(False, "monitor", f"check raised {exc!r}", time.time()))
        finally:
            with self._lock:
                self._inflight.discard(iid)
