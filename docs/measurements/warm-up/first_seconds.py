"""A version's first seconds (docs/holds.md): per-second Triton statistics of a freshly started instance B against a
serving instance A, under one client load that B shares once it is admitted.

    .venv/bin/python docs/measurements/warm-up/first_seconds.py none|warmup OUT.json [RATE_RPS]

``none``: B as the control plane admitted an instance before the warm-up (started at nice 19 with its
model_warmup, one golden recommend + search, reniced to 5); ``warmup``: the same, then control/fleet/warmup.py's
warm-up judged against A. Phases: A alone (8 s), B loading, golden check (+ warm-up), B admitted (20 s: every
second, per composing model, requests, queue and compute_infer per request on A and B, and every client request's
latency). Load: two open-loop client threads, RATE_RPS in all (default 60), recommend and search alternating,
random users and histories, batch 1, round robin over the admitted instances.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from recserve.control.client import RecClient
from recserve.control.fleet import warmup as w
from recserve.control.fleet.golden import Golden
from recserve.control.runtime.triton import TritonConfig, TritonServer

ROOT = Path(__file__).resolve().parents[3]
MODELS = ["recommend", "search"]
STEPS = ["recommend_pre", "retrieval", "ranker", "recommend_post", "search_pre", "search_model"]
KEY = "first-seconds-statistics-key"


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    rate = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    repo = (ROOT / "model_repository").resolve()
    base = Path(tempfile.mkdtemp(prefix=f"first-seconds-{mode}-"))
    golden_json = json.loads((ROOT / "artifacts" / "golden.json").read_text())
    queries = [s["query"] for s in golden_json["search"]]
    load_at_start = os.getloadavg()
    stop = threading.Event()
    targets: list[str] = []
    lat: list[tuple[float, str, float]] = []  # (start, url, seconds; -1 failed)

    def server(name: str, nice: int) -> TritonServer:
        return TritonServer(TritonConfig(model_repository=repo, workdir=base / name, models=MODELS, stats_key=KEY,
                                         nice=nice, name=name))

    def worker(i: int) -> None:
        clients: dict[str, grpcclient.InferenceServerClient] = {}
        rnd = random.Random(i)
        n, period, nxt = 0, 2.0 / rate, time.monotonic()
        while not stop.is_set():
            url = targets[(n // 2) % len(targets)]
            c = clients.get(url) or clients.setdefault(url, grpcclient.InferenceServerClient(url))
            t0 = time.monotonic()
            try:
                if n % 2 == 0:
                    user = grpcclient.InferInput("user_id", [1, 1], "INT64")
                    user.set_data_from_numpy(np.asarray([[rnd.randrange(golden_json["n_users"])]], dtype=np.int64))
                    h = rnd.sample(range(1, golden_json["n_items"]), rnd.randint(1, 20))
                    hist = grpcclient.InferInput("history", [1, len(h)], "INT64")
                    hist.set_data_from_numpy(np.asarray([h], dtype=np.int64))
                    c.infer("recommend", [user, hist], client_timeout=10)
                else:
                    q = grpcclient.InferInput("query", [1, 1], "BYTES")
                    q.set_data_from_numpy(np.asarray([[rnd.choice(queries).encode()]], dtype=object))
                    c.infer("search", [q], client_timeout=10)
                lat.append((t0, url, time.monotonic() - t0))
            except Exception:  # noqa: BLE001 - a failed request is data
                lat.append((t0, url, -1.0))
            n += 1
            nxt += period
            time.sleep(max(0.0, nxt - time.monotonic()))

    def read(srv: TritonServer) -> dict[str, w.Counters]:
        return w.read_stats(srv.http_url, KEY, {m: 1 for m in STEPS})

    def client_figures(url: str, t0: float, t1: float) -> dict:
        ls = sorted(x * 1e3 for t, u, x in lat if u == url and t0 <= t < t1 and x >= 0)
        return {"n": len(ls), "p50_ms": ls[len(ls) // 2] if ls else None,
                "p99_ms": ls[int(len(ls) * 0.99)] if ls else None, "max_ms": ls[-1] if ls else None}

    phases = []

    def phase(name: str, t0: float, t1: float, before: dict, after: dict, url: str) -> None:
        d = w.deltas(after, before)
        p = {"phase": name, "s": round(t1 - t0, 1), "A_client": client_figures(url, t0, t1),
             "A_queue_us": {m: round(c.per_request_us()[0] or 0) for m, c in d.items()},
             "A_compute_us": {m: round(c.per_request_us()[1] or 0) for m, c in d.items()}}
        phases.append(p)
        print(json.dumps(p), flush=True)

    a = server("A", 5).start()
    b = server("B", 19)
    result = None
    try:
        targets.append(a.grpc_url)
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(15)  # A warm under load
        a0, t0 = read(a), time.monotonic()
        time.sleep(8)
        a1, t1 = read(a), time.monotonic()
        phase("A alone", t0, t1, a0, a1, a.grpc_url)
        b.start()
        a2, t2 = read(a), time.monotonic()
        phase("B loading at nice 19", t1, t2, a1, a2, a.grpc_url)
        golden = Golden(repo)
        with RecClient(b.grpc_url, timeout_s=5, retry_policy=None) as rc:
            golden.ask(rc, golden.requests)  # the golden check's requests
            os.setpriority(os.PRIO_PGRP, os.getpgid(b.pid), 5)
            if mode == "warmup":
                versions = {m: 1 for m in STEPS}
                result = w.warm_up(rc, w.Endpoint(b.http_url, KEY, versions), w.Endpoint(a.http_url, KEY, versions),
                                   w.served_configs(b, MODELS), golden, w.WarmupConfig(),
                                   progress=lambda m: print(m, flush=True))
                print(result.text(), flush=True)
        sa, sb, t_admit = read(a), read(b), time.monotonic()
        phase("golden check + warm-up" if mode == "warmup" else "golden check", t2, t_admit, a2, sa, a.grpc_url)
        targets.append(b.grpc_url)
        rows = []
        for sec in range(1, 21):
            time.sleep(1.0)
            na, nb = read(a), read(b)
            row: dict = {"s": sec}
            for tag, d in (("A", w.deltas(na, sa)), ("B", w.deltas(nb, sb))):
                for m in STEPS:
                    c = d.get(m, w.Counters())
                    q, ci = c.per_request_us()
                    row[f"{tag}.{m}"] = {"requests": c.requests, "queue_us": q, "compute_us": ci}
            sa, sb = na, nb
            now = time.monotonic()
            row["A.client"] = client_figures(a.grpc_url, now - 1, now)
            row["B.client"] = client_figures(b.grpc_url, now - 1, now)
            rows.append(row)
            print(sec, " ".join(f"{m} B/A {row['B.' + m]['compute_us'] or 0:.0f}/{row['A.' + m]['compute_us'] or 0:.0f}"
                                for m in STEPS), "client max B/A", row["B.client"]["max_ms"], row["A.client"]["max_ms"],
                  flush=True)
        stop.set()
        for t in threads:
            t.join(5)
        summary = {f"{tag} {lo}-{hi}s": client_figures(url, t_admit + lo, t_admit + hi)
                   for tag, url in (("B", b.grpc_url), ("A", a.grpc_url)) for lo, hi in ((0, 5), (5, 21))}
        print(json.dumps(summary), flush=True)
        out.write_text(json.dumps({
            "mode": mode, "rate_rps": rate, "host_load_at_start": load_at_start, "host_load_at_end": os.getloadavg(),
            "warmup": result.text() if result else None, "phases": phases, "per_second": rows, "summary": summary,
            "latencies": [(round(t - t_admit, 4), "B" if u == b.grpc_url else "A", round(x * 1e3, 3))
                          for t, u, x in lat if t >= t_admit]}, indent=1))
    finally:
        stop.set()
        b.stop()
        a.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
