"""The side-by-side ratios: each measures both sides in the same run, back to back, per round.

Why here and not in the runner: each ratio has its own protocol (what is interleaved with what, what is
reloaded and restored), and keeping them apart keeps the runner about lifecycle and bookkeeping.
"""

from __future__ import annotations

import copy
from dataclasses import asdict

from recserve.control.runtime.triton import TritonServer
from recserve.perf import figures, inprocess
from recserve.perf.console import console
from recserve.perf.suite import RatioSpec
from recserve.perf.suiterun import SuiteRun
from recserve.perf.targets import Endpoint


def served_vs_inprocess(s: SuiteRun, spec: RatioSpec, ep: Endpoint) -> None:
    """Served saturation / in-process onnxruntime (same batch, threads, sessions), per round."""
    pairs, detail, stalled, served_cpu, ref_cpu = [], [], [], [], []
    for rnd in range(spec.rounds):
        ref = inprocess.measure(
            s.repository / spec.model, s.rows[spec.model], spec.batch_size, s.suite.inprocess_seconds
        )
        s.inprocess.append(asdict(ref))
        console.print(
            f"  in-process {spec.model:<13} batch {spec.batch_size:<3} threads {ref.threads} x{ref.workers}  "
            f"{ref.infer_per_sec:>9.1f} infer/s  p50 {ref.p50_ms:7.2f} ms  p99 {ref.p99_ms:7.2f} ms"
        )
        served = s.sweep(ep, f"{spec.model}-served", spec.model, spec.concurrency, spec.batch_size)
        sat = figures.saturation(r.row() for r in served)
        pairs.append((sat, ref.infer_per_sec))
        ref_cpu.append(ref.cpu_ms_per_run)
        top = max(served, key=lambda r: r.infer_per_sec, default=None)
        if top is not None and top.cpu_ms_per_request:
            served_cpu.append(top.cpu_ms_per_request)
        stalls = sum(r.stalls for r in served)
        stalled.append(stalls > 0)
        detail.append(
            {"round": rnd + 1, "served": round(sat, 1), "inprocess": round(ref.infer_per_sec, 1), "stalls": stalls}
        )
    value, excluded = figures.clean_paired_ratio(pairs, stalled)
    s.record_ratio(
        "served_vs_inprocess",
        value,
        0.7,
        spec,
        {
            "served_infer_per_sec": round(max(p[0] for p in pairs), 1),
            "inprocess_infer_per_sec": round(max(p[1] for p in pairs), 1),
            "threads": ref.threads,
            "sessions": ref.workers,
            "rounds": detail,
            "rounds_with_stalls_left_out": excluded,
            **figures.serving_cpu_ceiling(ref_cpu, served_cpu),
        },
    )


def haproxy_vs_direct(s: SuiteRun, spec: RatioSpec, ep: Endpoint, proxied: Endpoint | None, why: str) -> None:
    """Saturation through our HAProxy / direct, interleaved point by point."""
    if proxied is None:
        s.skip_ratio("haproxy_vs_direct", why)
        return
    pairs, detail, proxied_cpu, stalled = [], [], [], []
    for rnd in range(spec.rounds):
        sat = {"direct": 0.0, "haproxy": 0.0}
        stalls = 0
        sides = [("direct", ep), ("haproxy", proxied)]
        for c in spec.concurrency:  # interleaved per point, order flipped per round: same noise on both
            for side, e in sides if rnd % 2 == 0 else sides[::-1]:
                rec = s.measure(e, f"{spec.model}-{side}", spec.model, "concurrency", c, spec.batch_size)
                if not rec.error:
                    sat[side] = max(sat[side], rec.infer_per_sec)
                    stalls += rec.stalls
                    if side == "haproxy" and rec.cpu_ms_per_request:
                        proxied_cpu.append(rec.cpu_ms_per_request)
        pairs.append((sat["haproxy"], sat["direct"]))
        stalled.append(stalls > 0)
        detail.append({"round": rnd + 1, **{k: round(v, 1) for k, v in sat.items()}, "stalls": stalls})
    value, excluded = figures.clean_paired_ratio(pairs, stalled)
    s.record_ratio(
        "haproxy_vs_direct",
        value,
        0.9,
        spec,
        {
            "haproxy_infer_per_sec": round(max(p[0] for p in pairs), 1),
            "direct_infer_per_sec": round(max(p[1] for p in pairs), 1),
            "path": proxied.detail,
            "rounds": detail,
            "rounds_with_stalls_left_out": excluded,
            **figures.proxy_cpu_share(proxied_cpu),
        },
    )


def dynamic_batching_gain(s: SuiteRun, spec: RatioSpec, ep: Endpoint, server: TritonServer) -> None:
    """Committed config / the same config without dynamic_batching (a repository-API override)."""
    committed = server.model_config(spec.model)
    if "dynamic_batching" not in committed:
        s.skip_ratio("dynamic_batching_gain", f"'{spec.model}' has no dynamic_batching in its committed config")
        return
    without = copy.deepcopy(committed)
    without.pop("dynamic_batching")
    pairs, detail, stalled = [], [], []
    cpu: dict[str, list[dict[str, float]]] = {"committed": [], "no_dynamic_batching": []}
    try:
        for rnd in range(spec.rounds):
            sat, stalls = {}, 0
            variants = [("no_dynamic_batching", without), ("committed", None)]
            for variant, cfg in variants if rnd % 2 == 0 else variants[::-1]:
                server.load_model(spec.model, cfg)
                rows = s.sweep(ep, f"{spec.model}-batching", spec.model, spec.concurrency, spec.batch_size, variant)
                sat[variant] = figures.saturation(r.row() for r in rows)
                stalls += sum(r.stalls for r in rows)
                top = max(rows, key=lambda r: r.infer_per_sec, default=None)
                if top is not None and top.cpu_ms_per_request:
                    cpu[variant].append(top.cpu_ms_per_request)
            pairs.append((sat["committed"], sat["no_dynamic_batching"]))
            stalled.append(stalls > 0)
            detail.append({"round": rnd + 1, **{k: round(v, 1) for k, v in sat.items()}, "stalls": stalls})
    finally:
        server.load_model(spec.model)  # back to the committed file
    value, excluded = figures.clean_paired_ratio(pairs, stalled)
    s.record_ratio(
        "dynamic_batching_gain",
        value,
        None,
        spec,
        {
            "with_infer_per_sec": round(max(p[0] for p in pairs), 1),
            "without_infer_per_sec": round(max(p[1] for p in pairs), 1),
            "rounds": detail,
            "rounds_with_stalls_left_out": excluded,
            **figures.batching_cpu_ceiling(cpu["committed"], cpu["no_dynamic_batching"]),
        },
    )


def trt_vs_onnx(s: SuiteRun, spec: RatioSpec, ep: Endpoint, loadable: list[str], skipped: dict[str, str]) -> None:
    """TensorRT engine / ONNX model saturation (GPU hosts only); skipped with check_models' reason."""
    trt = f"{spec.model}_trt"
    if trt not in loadable:
        s.skip_ratio("trt_vs_onnx", skipped.get(trt, f"'{trt}' is not built/loadable on this host"))
        return
    sat = {}
    for m in (spec.model, trt):
        rows = s.sweep(ep, f"{m}-trt-vs-onnx", m, spec.concurrency, spec.batch_size)
        sat[m] = figures.saturation(r.row() for r in rows)
    s.record_ratio(
        "trt_vs_onnx",
        figures.ratio(sat[trt], sat[spec.model]),
        None,
        spec,
        {"trt_infer_per_sec": round(sat[trt], 1), "onnx_infer_per_sec": round(sat[spec.model], 1)},
    )
