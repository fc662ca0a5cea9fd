"""Shared helpers for the control-plane tests: a recording load client and process/port hygiene checks."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Record:
    t: float
    model: str
    ok: bool
    latency_s: float
    error: str = ""
    ids: tuple = ()


@dataclass
class LoadClient:
    """Bounded closed-loop client through HAProxy: ``threads`` workers, each one request at a time, records all.

    ``expect`` (model -> item ids) lets callers count wrong answers as well as failed requests.
    """

    url: str
    threads: int = 2
    max_seconds: float = 120.0
    records: list[Record] = field(default_factory=list)
    expect: dict[str, tuple] | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def start(self) -> LoadClient:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _run(self, i: int) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + self.max_seconds
        n = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            model = "recommend" if (n + i) % 2 == 0 else "search"
            n += 1
            t0 = time.monotonic()
            try:
                if model == "recommend":
                    a = grpcclient.InferInput("user_id", [1, 1], "INT64")
                    a.set_data_from_numpy(np.asarray([[7]], dtype=np.int64))
                    b = grpcclient.InferInput("history", [1, 3], "INT64")
                    b.set_data_from_numpy(np.asarray([[11, 12, 13]], dtype=np.int64))
                    inputs = [a, b]
                else:
                    a = grpcclient.InferInput("query", [1, 1], "BYTES")
                    a.set_data_from_numpy(np.asarray([[b"red running shoes"]], dtype=object))
                    inputs = [a]
                r = client.infer(model, inputs, client_timeout=10.0)
                ids = tuple(int(x) for x in r.as_numpy("item_ids")[0])
                rec = Record(t0, model, True, time.monotonic() - t0, ids=ids)
            except Exception as exc:  # every failure is data here
                rec = Record(t0, model, False, time.monotonic() - t0, error=str(exc)[:300])
            with self._lock:
                self.records.append(rec)
        client.close()

    def stop(self) -> LoadClient:
        self._stop.set()
        for t in self._workers:
            t.join(30)
        return self

    def mark(self) -> int:
        with self._lock:
            return len(self.records)

    def since(self, start: int) -> list[Record]:
        with self._lock:
            return list(self.records[start:])

    @staticmethod
    def failed(records: list[Record]) -> list[Record]:
        return [r for r in records if not r.ok]

    def wrong(self, records: list[Record]) -> list[Record]:
        if not self.expect:
            return []
        return [r for r in records if r.ok and r.model in self.expect and r.ids != self.expect[r.model]]
