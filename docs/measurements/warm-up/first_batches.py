"""The first executions at each batch size on a freshly loaded instance (docs/holds.md, warm-up section).

    .venv/bin/python docs/measurements/warm-up/first_batches.py OUT.json

Starts one tritonserver with recommend and search (their model_warmup runs at load), sends the golden check's
recommend + search, then, for batch sizes 1, 8 and 16 in turn, the same recommend and search request 6 times one
after another, and records each composing model's compute_infer per execution at that batch size after every
request (Triton's statistics), so the first executions at a size show against the later ones.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from recserve.control.client import RecClient
from recserve.control.fleet import warmup as w
from recserve.control.fleet.golden import Golden
from recserve.control.runtime.triton import TritonConfig, TritonServer

ROOT = Path(__file__).resolve().parents[3]
STEPS = ["recommend_pre", "retrieval", "ranker", "recommend_post", "search_pre", "search_model"]
KEY = "first-batches-statistics-key"


def main() -> None:
    out = Path(sys.argv[1])
    repo = (ROOT / "model_repository").resolve()
    base = Path(tempfile.mkdtemp(prefix="first-batches-"))
    load_at_start = os.getloadavg()
    srv = TritonServer(TritonConfig(model_repository=repo, workdir=base / "b", models=["recommend", "search"],
                                    stats_key=KEY, name="b"))
    rows = []
    try:
        srv.start()
        golden = Golden(repo)
        configs = w.served_configs(srv, ["recommend", "search"])
        targets = w.golden_targets(golden, configs)
        with RecClient(srv.grpc_url, timeout_s=10, retry_policy=None) as client:
            golden.ask(client, golden.requests)
            before = w.read_stats(srv.http_url, KEY, {m: 1 for m in STEPS})
            for b in (1, 8, 16):
                for i in range(6):
                    for t in targets:
                        t.requests(b)[0](client)
                    now = w.read_stats(srv.http_url, KEY, {m: 1 for m in STEPS})
                    d = w.deltas(now, before)
                    before = now
                    row = {"batch": b, "request": i + 1}
                    for m in STEPS:
                        c = d.get(m, w.Counters())
                        n = sum(v[0] for v in c.batches.values())
                        row[m] = round(sum(v[1] for v in c.batches.values()) / n / 1e3) if n else None
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
    out.write_text(json.dumps({"host_load_at_start": load_at_start, "host_load_at_end": os.getloadavg(),
                               "unit": "compute_infer microseconds per execution", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
