"""Error-tolerant probe: async gRPC requests at a fixed (or scheduled) rate that record every outcome.

Why our own client: perf_analyzer aborts on the first failed request, so it cannot measure a fault.
The probe is open-loop (a slow or failing server does not lower the send rate, as with real users),
bounded in request count and time, refuses anything but loopback, and records per request the send
time, latency, status code and whether the answer matched the expected golden answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

#: Status recorded when the client gave up waiting (gRPC deadline) - a failed request like any other.
OK = "OK"


@dataclass(frozen=True)
class Case:
    """One golden request: its model and inputs, and the expected top items (None: not checked)."""

    model: str
    user_id: int | None = None
    history: tuple[int, ...] = ()
    query: str | None = None
    expected: tuple[int, ...] | None = None


def golden_cases() -> list[Case]:
    """The control plane's deep-check pair (``control.fleet.golden`` owns the golden requests: the build's
    ``artifacts/golden.json``, or its one built-in set when no build wrote it)."""
    from recserve.control.fleet.golden import golden_json_path, load_requests
    from recserve.control.runtime.triton import DEFAULT_REPOSITORY

    reqs = load_requests(golden_json_path(DEFAULT_REPOSITORY))
    r, s = reqs["recommend"], reqs["search"]
    return [Case("recommend", int(r["user_id"]), tuple(r.get("history") or ())),
            Case("search", s.get("user_id"), (), s["query"])]


@dataclass(frozen=True)
class Record:
    """One probe request as the client saw it; times are wall-clock seconds (align with events)."""

    seq: int
    model: str
    t_send: float
    latency_ms: float
    status: str
    matched: bool | None = None
    detail: str = ""
    items: tuple[int, ...] | None = None  # the answer, kept so it can be matched after the drill
    #: answered by the degraded-answer fallback (response parameter ``degraded: true``): served, never good
    degraded: bool = False
    #: how late the probe sent it against its open-loop schedule (the load generator's own lag)
    lag_ms: float = 0.0
    #: a serving spec's golden request: its index among the model's golden requests (drills/serving.py)
    golden: int | None = None
    #: a serving spec's answer (output name -> array), judged after the drill; not written to requests.jsonl
    answer: Any = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "answer"}


def check_loopback(url: str) -> None:
    """Load only goes to loopback: raise ValueError for any other address."""
    host = url.rsplit(":", 1)[0].strip("[]")
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ValueError(f"probe target {url!r}: cannot resolve {host!r}") from exc
    bad = [a for a in addrs if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if bad or not addrs:
        raise ValueError(f"probe target {url!r} resolves to {sorted(addrs)}: drills send load to loopback only")


def status_name(exc: BaseException) -> str:
    """'StatusCode.UNAVAILABLE' -> 'UNAVAILABLE'; non-gRPC errors by class name."""
    status = getattr(exc, "status", None)
    code = status() if callable(status) else None
    if code:
        return str(code).rsplit(".", 1)[-1]
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "DEADLINE_EXCEEDED"
    return type(exc).__name__.upper()


def _inputs(case):
    import tritonclient.grpc as g

    from recserve.drills.serving import SpecCase

    def tensor(name: str, array: np.ndarray, dtype: str):
        t = g.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    if isinstance(case, SpecCase):  # a serving spec's golden request: the tensors RecClient.infer would send
        return [tensor(n, np.asarray(a), case.datatypes[n]) for n, a in case.inputs.items()]
    if case.model == "recommend":
        hist = np.asarray([list(case.history) or [0]], dtype=np.int64)
        return [tensor("user_id", np.asarray([[case.user_id or 0]], dtype=np.int64), "INT64"),
                tensor("history", hist, "INT64")]
    if case.model == "search":
        ins = [tensor("query", np.asarray([[(case.query or "").encode()]], dtype=object), "BYTES")]
        if case.user_id is not None:
            ins.append(tensor("user_id", np.asarray([[case.user_id]], dtype=np.int64), "INT64"))
        return ins
    raise ValueError(f"probe knows the recommend and search ensembles, not {case.model!r}")


RateFn = Callable[[float], float]


#: Connections the probe spreads its requests over, like a few client processes rather than one: HAProxy lets
#: one HTTP/2 connection carry 100 streams at once (``tune.h2.max-concurrent-streams``), and gRPC queues the
#: calls beyond that in the client, where they would count as server latency (measured in an overload drill:
#: refusals p99 202 ms at the client, 34 ms in HAProxy, with one connection).
CONNECTIONS = 8


def constant(rps: float) -> RateFn:
    return lambda _t: rps


def schedule(base_rps: float, segments: Sequence[tuple[float, float, float, float]]) -> RateFn:
    """Rate over time: ``base_rps``, or inside a segment (start_s, end_s, peak_rps, ramp_s) a linear
    ramp from base to peak over ramp_s, held until end_s (the overload drill's shape)."""

    def rate(t: float) -> float:
        for start, end, peak, ramp in segments:
            if start <= t < end:
                frac = min(1.0, (t - start) / ramp) if ramp > 0 else 1.0
                return base_rps + (peak - base_rps) * frac
        return base_rps

    return rate


class OpenLoopProbe:
    """Sends ``cases`` round-robin at ``rate(t)`` for ``duration_s`` (at most ``max_requests``)."""

    def __init__(self, url: str, cases: Sequence[Case], rate: RateFn, duration_s: float,
                 timeout_s: float = 2.0, max_requests: int = 50_000, max_in_flight: int = 1024,
                 retry_policy: bool = False, connections: int = CONNECTIONS):
        check_loopback(url)
        if not cases:
            raise ValueError("probe needs at least one golden case")
        self.url, self.cases, self.rate = url, list(cases), rate
        self.duration_s, self.timeout_s = duration_s, timeout_s
        self.max_requests, self.max_in_flight = max_requests, max_in_flight
        #: True: the channel carries the documented client retry policy (control.client.RETRY_SERVICE_CONFIG),
        #: as a client following docs/peak-traffic.md would; False: every failure is seen as it happens.
        self.retry_policy = retry_policy
        if not 1 <= connections <= 64:
            raise ValueError(f"connections must be 1..64, got {connections}")
        self.connections = connections
        self.records: list[Record] = []
        self.t0: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -------------------------------------------------------------- async core
    async def _one(self, client, seq: int, case: Case, inputs, sem: asyncio.Semaphore, lag_ms: float = 0.0) -> None:
        import tritonclient.grpc as g

        t_send = time.time()
        start = time.perf_counter()
        status, matched, detail, items, degraded = OK, None, "", None, False
        spec_case = getattr(case, "outputs", None) is not None
        answer, golden = None, getattr(case, "index", None)
        try:
            from recserve.control.client import is_degraded

            names = list(case.outputs) if spec_case else ["item_ids"]
            outputs = [g.InferRequestedOutput(n) for n in names]
            result = await client.infer(case.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
            degraded = is_degraded(result)
            if spec_case:  # judged after the drill against the reference (drills/serving.SpecJudge)
                answer = {n: result.as_numpy(n) for n in names}
                batched = case.spec_batched
                answer = {n: a[0] for n, a in answer.items()} if batched else answer
            else:
                items = tuple(int(x) for x in result.as_numpy("item_ids")[0].tolist())
                if case.expected is not None and not degraded:
                    matched = items == case.expected
        except Exception as exc:  # every failure is data here, never a crash of the probe
            status, detail, items, answer = status_name(exc), str(exc)[:200], None, None
        finally:
            sem.release()
        rec = Record(seq, case.model, t_send, (time.perf_counter() - start) * 1000.0, status, matched, detail, items,
                     degraded, round(lag_ms, 3), golden, answer)
        with self._lock:
            self.records.append(rec)

    async def run_async(self) -> list[Record]:
        import tritonclient.grpc.aio as aio

        from recserve.control.client import grpc_channel_args, tritonclient_channel_args

        # each client its own TCP connection (gRPC would otherwise share one subchannel among equal channels)
        args = (grpc_channel_args() if self.retry_policy else tritonclient_channel_args()) + [
            ("grpc.use_local_subchannel_pool", 1)]
        clients = [aio.InferenceServerClient(self.url, channel_args=args) for _ in range(self.connections)]
        prepared = [(c, _inputs(c)) for c in self.cases]
        sem = asyncio.Semaphore(self.max_in_flight)
        tasks: set[asyncio.Task] = set()
        self.t0 = time.time()
        start = time.perf_counter()
        next_at, seq = 0.0, 0
        try:
            while seq < self.max_requests and not self._stop.is_set():
                now = time.perf_counter() - start
                if next_at >= self.duration_s:
                    break
                if next_at > now:
                    await asyncio.sleep(min(next_at - now, 0.05))
                    continue
                await sem.acquire()
                case, inputs = prepared[seq % len(prepared)]
                lag_ms = max(0.0, (time.perf_counter() - start) - next_at) * 1000.0
                client = clients[seq % len(clients)]
                task = asyncio.create_task(self._one(client, seq, case, inputs, sem, lag_ms))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                seq += 1
                next_at += 1.0 / max(self.rate(next_at), 0.1)
            if tasks:
                await asyncio.wait(tasks, timeout=self.timeout_s + 2.0)
        finally:
            for t in tasks:
                t.cancel()
            for client in clients:
                await client.close()
        with self._lock:
            self.records.sort(key=lambda r: r.t_send)
            return list(self.records)

    # -------------------------------------------------------------- thread API for the runner
    def start(self) -> OpenLoopProbe:
        """Run in a background thread with its own event loop (the runner injects faults meanwhile)."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self.run_async()), name="probe", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while self.t0 is None and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float | None = None) -> list[Record]:
        if self._thread is not None:
            self._thread.join(timeout_s if timeout_s is not None else self.duration_s + self.timeout_s + 10)
        return self.snapshot()

    def snapshot(self) -> list[Record]:
        """Records so far (the abort checks read these while the probe runs)."""
        with self._lock:
            return sorted(self.records, key=lambda r: r.t_send)


def rematch(records: Sequence[Record], acceptable: dict[str, set[tuple[int, ...]]]) -> list[Record]:
    """Set ``matched`` after the drill: an answer is right when it is one of the acceptable answers for its
    model (several during a rollover: the old and the new version's). Models without answers stay None."""
    from dataclasses import replace

    out = []
    for r in records:
        ok_set = acceptable.get(r.model)
        fits = r.ok and not r.degraded and ok_set and r.items is not None  # a degraded answer is not judged
        out.append(replace(r, matched=(r.items in ok_set)) if fits else r)
    return out
