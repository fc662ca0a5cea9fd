"""Writes a run's report: report.json (the record), report.md (summary + plots), PNG plots.

Kept separate from the runner so a partial document (a run that failed half way) renders the same way
and the tests can render recorded documents without a server.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from recserve.control import reportdir
from recserve.control.reportdir import link_latest as link_latest  # re-exported for perf callers

REPORTS_DIR = Path(__file__).resolve().parent.parent / "reports" / "perf"


def new_run_dir(root: Path = REPORTS_DIR) -> Path:
    """A fresh ``<root>/<UTC timestamp>/`` for one run's report."""
    return reportdir.new_run_dir(root)



def curves(doc: dict) -> dict[str, list[dict]]:
    """Successful runs grouped per curve (target + variant + path + mode), ordered by load."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in doc.get("runs", []):
        if r.get("error"):
            continue
        out[f"{r['target']} [{r['variant']}, {r['via']}, {r['mode']}]"].append(r)
    return {k: sorted(v, key=lambda r: r["value"]) for k, v in out.items()}


def plot(doc: dict, out_dir: Path) -> list[Path]:
    """One PNG per target: throughput vs p50/p99 latency, each curve labelled, SLO drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_target: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for name, runs in curves(doc).items():
        by_target[runs[0]["target"]][name] = runs
    paths = []
    for target, series in sorted(by_target.items()):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, runs in series.items():
            x = [r["infer_per_sec"] for r in runs]
            label = name.split(" ", 1)[1]
            ax.plot(x, [r["p99_ms"] for r in runs], "o-", label=f"p99 {label}")
            ax.plot(x, [r["p50_ms"] for r in runs], "x--", label=f"p50 {label}")
        ax.axhline(doc.get("slo_ms", 50), color="red", lw=0.8, ls=":", label=f"SLO {doc.get('slo_ms', 50):g} ms")
        ax.set_xlabel("throughput (inferences/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{target}: throughput vs latency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{target.replace('/', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


READING_NOTES = [
    "- Ratios are medians of per-round ratios, both sides measured back to back; rounds in which a side saw"
    " requests over 400 ms (Triton 2.51's dynamic-batcher stalls, counted per load point) are left out.",
    "- `served_vs_inprocess` can exceed 1: the server merges client batches (dynamic batching), and on a"
    " contended host its several processes get a larger CPU share than the reference's threads.",
    "- `cpu_bound_ratio` (HAProxy) is all / (all + HAProxy) CPU per request: the most HAProxy can cost when"
    " the host is CPU-bound; it is steadier than throughput on a shared host.",
    "- `capacity_rps` is the highest offered rate with p99 under the SLO while the server kept up (>= 90% of"
    " the offered rate); a violation counts only when a re-measurement repeats it.",
]


def _retried(cap: dict) -> str:
    rates = cap.get("retried_rates") or []
    return f" (violations re-measured at {', '.join(f'{r:g}' for r in rates)}/s)" if rates else ""


def _stalls(run: dict) -> str:
    n = run.get("stalls", 0)
    return f" ({n} over 400 ms)" if n else ""


def markdown(doc: dict, plots: list[Path]) -> str:
    """report.md: ratios, capacity, per-point table, errors, plots."""
    v = doc.get("versions", {})
    lines = [
        f"# recserve perf report: suite `{doc.get('suite')}`",
        "",
        f"Started {doc.get('started')} - finished {doc.get('finished')} ({doc.get('wall_s', '?')} s). "
        f"Triton {v.get('server', '?')}, tritonclient/perf_analyzer {v.get('client', '?')}, "
        f"onnxruntime {v.get('onnxruntime', '?')}, {v.get('host', {}).get('cpus', '?')} CPUs. "
        f"SLO p99 <= {doc.get('slo_ms')} ms. Payloads: {doc.get('payloads', {}).get('source', '?')}.",
        "",
        "## Ratios (measured side by side in this run)",
        "",
        "| ratio | value | target | detail |",
        "|---|---|---|---|",
    ]
    for name, r in doc.get("ratios", {}).items():
        if r.get("skipped"):
            lines.append(f"| {name} | skipped | | {r['skipped']} |")
            continue
        detail = ", ".join(
            f"{k}={_fmt(x, 1 if k.endswith('per_sec') else 3)}"
            for k, x in r.items()
            if k.endswith(("per_sec", "per_request"))
            or k.startswith("cpu_ceiling")
            or k.endswith("per_batch")
            or k in ("model", "batch_size", "threads", "sessions", "cpu_bound_ratio", "rounds_with_stalls_left_out")
        )
        ok = r.get("meets_target")
        tgt = f">= {r['target']}" + (" ok" if ok else " MISSED" if ok is False else "") if r.get("target") else ""
        lines.append(f"| {name} | {_fmt(r.get('value'))} | {tgt} | {detail} |")
    lines += [
        "",
        "## Capacity (highest request rate with p99 under the SLO)",
        "",
        "| target | model | via | capacity_rps | p99 at capacity (ms) | why it stops |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in doc.get("capacity", {}).items():
        lines.append(
            f"| {name} | {c['model']} | {c['via']} | {_fmt(c['capacity_rps'], 0)} | "
            f"{_fmt(c.get('p99_ms_at_capacity'), 1)} | {c['reason']}{_retried(c)} |"
        )
    lines += [
        "",
        "## Load points",
        "",
        "| target | variant | via | mode | load | infer/s | p50 ms | p99 ms | p99.9 ms | over 4x SLO | server queue us "
        "| server compute us | avg batch | peak RSS MiB (server + stubs) | CPU ms/request (server / stubs / "
        "perf_analyzer) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc.get("runs", []):
        if r.get("error"):
            lines.append(
                f"| {r['target']} | {r['variant']} | {r['via']} | {r['mode']} | {r['value']:g} | error "
                "| | | | | | | | |"
            )
            continue
        srv = r.get("server", {}).get(r["model"], {})
        rss = r.get("rss_mib", {})
        cpu = r.get("cpu_ms_per_request", {})
        lines.append(
            f"| {r['target']} | {r['variant']} | {r['via']} | {r['mode']} | {r['value']:g} | "
            f"{r['infer_per_sec']:.1f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f}{_stalls(r)} | {_fmt(r.get('p999_ms') or None, 1)} | "
            f"{r.get('over_4x_slo', '-')} | {_fmt(srv.get('queue_us'), 0)} | "
            f"{_fmt(srv.get('compute_infer_us'), 0)} | {_fmt(srv.get('avg_batch'), 2)} | "
            f"{_fmt(rss.get('server_mib'), 0)} + {_fmt(rss.get('stubs_mib'), 0)} ({rss.get('stub_count', 0)} stubs) | "
            f"{_fmt(cpu.get('server'), 2)} / {_fmt(cpu.get('stubs'), 2)} / {_fmt(cpu.get('perf_analyzer'), 2)} |"
        )
    tune = doc.get("tune")
    if tune:
        win = (tune.get("best") or {}).get("candidate", "none met the SLO")
        lines += [
            "",
            f"## Tuning `{tune['model']}` (best under p99 {tune['slo_ms']} ms: **{win}**)",
            "",
            "| candidate | infer/s (best under SLO) | p99 ms | at concurrency | saturation infer/s | stalls "
            "| re-measured infer/s | score |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in tune["results"]:
            lines.append(
                f"| {r['candidate']} | {_fmt(r.get('infer_per_sec'), 1)} | {_fmt(r.get('p99_ms'), 1)} | "
                f"{_fmt(r.get('concurrency'))} | {_fmt(r.get('saturation'), 1)} | {_fmt(r.get('stalls'))} | "
                f"{_fmt((r.get('confirm') or {}).get('infer_per_sec'), 1)} | {_fmt(r.get('score'), 1)} |"
            )
        lines += ["", "Proposed `config.pbtxt` (not applied) is next to this report."]
    if doc.get("inprocess"):
        lines += [
            "",
            "## In-process onnxruntime reference",
            "",
            "| model | batch | threads x sessions | infer/s | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|",
        ]
        for r in doc["inprocess"]:
            lines.append(
                f"| {r['model']} | {r['batch_size']} | {r['threads']} x {r.get('workers', 1)} | "
                f"{r['infer_per_sec']:.1f} | "
                f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
            )
    if doc.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in doc["skipped"]]
    if doc.get("transient_failures"):
        lines += ["", "## Transient failures (the point passed when re-measured)", ""]
        lines += [f"- {e}" for e in doc["transient_failures"]]
    if doc.get("errors"):
        lines += ["", "## Errors (partial results above)", ""] + [f"- {e}" for e in doc["errors"]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## How to read this", "", *READING_NOTES, ""]
    lines += ["", "Raw perf_analyzer CSVs and logs: `csv/`; payloads: `inputs/`; server log: `server/`.", ""]
    return "\n".join(lines)


def write(doc: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.json, PNG plots and report.md into ``out_dir``; plotting errors never lose the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json"}
    paths["json"].write_text(json.dumps(doc, indent=2, default=str))
    try:
        plots = plot(doc, out_dir)
    except Exception as exc:  # a broken plot must not cost the report
        doc.setdefault("errors", []).append(f"plotting failed: {exc}")
        plots = []
    paths["md"] = out_dir / "report.md"
    paths["md"].write_text(markdown(doc, plots))
    return paths
