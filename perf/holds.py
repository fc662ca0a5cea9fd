"""The ~500 ms holds, measured: the same fleet and load under model-config variants, side by side in one run.

Triton 2.51 (r24.10) dispatches a dynamic batch only when its rate limiter reports a free payload slot. Without
"prefetching" that check is ``WaitingConsumerCount() > 0``, and the batcher waits for it on its own condition
variable with a 500 ms timeout (``default_wait_microseconds``); a model instance that becomes free bumps the count
without notifying that condition variable, so a request queued while every instance was busy can wait the full
500 ms unless another request for the same model arrives. Prefetching (``PayloadSlotAvailable`` = "fewer than
2 x instances payloads queued", no consumer count) is on only when the model has NO priority levels and its
default queue policy has no timeout, no timeout override and no queue size (``PriorityQueue`` in
scheduler_utils.cc). Variants here:

- ``committed``: the repository as shipped: no priority levels and no queue policies (prefetching on);
- ``queue-policy``: what the repository shipped before: every composing model with two priority levels (the
  control plane's probes at 1, a queue of 8), a bounded default queue (64) and 1 s REJECT timeouts;
- ``no-timeout``: ``queue-policy`` with every ``default_timeout_microseconds: 0`` and no override (the lead of
  Triton issue 8870): prefetching stays off, because priority levels alone turn it off.

Each variant gets its own private fleet (control plane, 2 instances, HAProxy) on a copy of the repository, and the
open-loop probe sends the golden requests either to ONE instance's gRPC port directly (``--via direct``: a hold shows
its full length) or through the front door as clients do (``--via haproxy``: HAProxy's 200 ms server timeout cuts a
hold and retries the request on the other instance, so a hold reads ~200-230 ms at the client and as a retried or
timed-out request in HAProxy's access log), while the control plane runs its deep checks as usual. ``--busy N`` adds
N busy loops on the host for the measured window (the fleet's context on 2 cores: a load generator and several
processes compete for the CPU, which widens the window in which a wake-up is lost). Reported per variant: requests,
p50/p99/p99.9, the count over 300 ms (direct) or 180 ms (haproxy), over 4x the SLO, and (haproxy) HAProxy's own
count of requests it timed out or retried.

    python -m recserve.perf.holds --rps 150 --seconds 90 [--via haproxy] [--busy 2] [--variants committed,plain]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from recserve.control.defaults import SLO_P99_MS
from recserve.control.runtime.triton import DEFAULT_REPOSITORY
from recserve.control.stats import percentile

VARIANTS = ("committed", "queue-policy", "no-timeout")
#: A hold at the client: direct, its ~500 ms show whole; through HAProxy they are cut at its 200 ms server timeout.
HOLD_MS = {"direct": 300.0, "haproxy": 180.0}


def variant_repository(src: Path, dst: Path, variant: str) -> list[str]:
    """Copy ``src`` to ``dst`` and rewrite every composing model's dynamic_batching for ``variant``; returns the
    models changed. Configs are parsed and re-written with Triton's own protobuf (comments are lost in the copy)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    shutil.copytree(src, dst, symlinks=True)
    changed = []
    if variant == "committed":
        return changed
    for cfg_path in sorted(dst.glob("*/config.pbtxt")):
        cfg = text_format.Parse(cfg_path.read_text(), model_config_pb2.ModelConfig())
        if not cfg.HasField("dynamic_batching"):
            continue
        db = cfg.dynamic_batching
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
        timeout_us = 1_000_000 if variant == "queue-policy" else 0
        db.priority_levels, db.default_priority_level = 2, 2
        for policy, size in ((db.priority_queue_policy[1], 8), (db.default_queue_policy, 64)):
            policy.timeout_action = model_config_pb2.ModelQueuePolicy.REJECT
            policy.default_timeout_microseconds = timeout_us
            policy.allow_timeout_override = bool(timeout_us)
            policy.max_queue_size = size
        cfg_path.write_text(text_format.MessageToString(cfg))
        changed.append(cfg.name)
    return changed


def measure(variant: str, rps: float, seconds: float, slo_ms: float, via: str = "direct", busy: int = 0,
            log=print) -> dict:
    """One private fleet on ``variant``'s repository; the probe at ``rps`` to one instance or through HAProxy."""
    from recserve.control.routing import accesslog
    from recserve.drills.probe import OpenLoopProbe, constant, golden_cases
    from recserve.drills.session import FleetOwner
    from recserve.drills.timeline import TAIL_SLO_FACTOR

    tmp = Path(tempfile.mkdtemp(prefix="recserve-holds-"))
    try:
        repo = tmp / "model_repository"
        changed = variant_repository(DEFAULT_REPOSITORY, repo, variant)
        with FleetOwner(private=True, repository=repo, log=log) as session:
            inst = session.fleet.instances()[0]
            url = f"127.0.0.1:{inst.grpc_port}" if via == "direct" else session.grpc_url
            cases = golden_cases()
            OpenLoopProbe(url, cases, constant(rps), 10.0, timeout_s=3.0).start().join()  # warm, not counted
            offset = accesslog.size(session.access_log) if session.access_log else 0
            t = time.time()
            with busy_loops(busy):
                records = OpenLoopProbe(url, cases, constant(rps), seconds, timeout_s=3.0).start().join(seconds + 20)
            entries = accesslog.read_from(session.access_log, offset)[0] if session.access_log else []
            lat = [r.latency_ms for r in records if r.ok]
            holds = sorted(r.latency_ms for r in records if r.latency_ms > HOLD_MS[via])
            cut = [e for e in entries if e.retries > 0 or e.tr >= 190 or e.termination.startswith("sH")]
            return {"variant": variant, "via": via, "busy_loops": busy, "changed_models": changed,
                    "instance": inst.id if via == "direct" else "front door", "rps": rps, "seconds": seconds,
                    "started": t, "requests": len(records), "failed": sum(not r.ok for r in records),
                    "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "p999_ms": percentile(lat, 99.9),
                    "holds": len(holds), "hold_ms": HOLD_MS[via],
                    "over_4x_slo": sum(r.latency_ms > TAIL_SLO_FACTOR * slo_ms for r in records),
                    "haproxy_cut_or_retried": len(cut) if via == "haproxy" else None,
                    "holds_ms": [round(h, 1) for h in holds[:20]]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def busy_loops(n: int):
    """``n`` processes spinning on the CPU for the block (stopped, with their process group, whatever happens)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recserve.perf.holds", description=__doc__.split("\n\n")[0])
    p.add_argument("--rps", type=float, default=150.0, help="open-loop rate to one instance (default %(default)s)")
    p.add_argument("--seconds", type=float, default=90.0, help="measured seconds per variant (default %(default)s)")
    p.add_argument("--slo-ms", type=float, default=SLO_P99_MS,
                   help="SLO p99 for the over-4x count (default %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, run in this order")
    p.add_argument("--via", choices=("direct", "haproxy"), default="direct", help="one instance's port, or the "
                   "front door (default %(default)s)")
    p.add_argument("--busy", type=int, default=0, choices=range(0, 9), metavar="N",
                   help="busy loops on the host while measuring (0-8, default 0)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad} (known: {', '.join(VARIANTS)})")
    rows = []
    for v in names:
        r = measure(v, args.rps, args.seconds, args.slo_ms, args.via, args.busy,
                    log=lambda m: print(m, file=sys.stderr))
        rows.append(r)
        print(f"{r['variant']:<11} {r['via']:<8} busy {r['busy_loops']}  {r['requests']:>6} req  failed "
              f"{r['failed']:>3}  p50 {r['p50_ms']:.1f}  p99 {r['p99_ms']:.1f}  p99.9 {r['p999_ms']:.1f} ms  over "
              f"{r['hold_ms']:.0f} ms: {r['holds']:>3}  HAProxy cut/retried: {r['haproxy_cut_or_retried']}  "
              f"{r['holds_ms'][:8]}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
