"""Writes a run's report: report.json (the record), report.md (summary + plots), report.html (the same with the
plots inline, one file a browser opens), PNG plots.

Kept separate from the runner so a partial document (a run that failed half way) renders the same way
and the tests can render recorded documents without a server.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from recserve.control import htmlpage, reportdir
from recserve.control.htmlpage import bullets, inline, tag
from recserve.control.reportdir import link_latest as link_latest  # re-exported for perf callers
from recserve.perf.report_reader import REPORTS_DIR as REPORTS_DIR  # one definition, beside the reader


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


Table = tuple[list[str], list[list[str]], list[str | None]]  # columns, rows, a class per row (bad, warn, good)


def ratios_table(doc: dict) -> Table:
    """Each ratio with its value, target (ok / MISSED) and the figures behind it."""
    rows, classes = [], []
    for name, r in doc.get("ratios", {}).items():
        if r.get("skipped"):
            rows.append([name, "skipped", "", r["skipped"]])
            classes.append("warn")
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
        rows.append([name, _fmt(r.get("value")), tgt, detail])
        classes.append("bad" if ok is False else None)
    return ["ratio", "value", "target", "detail"], rows, classes


def capacity_table(doc: dict) -> Table:
    rows = [[name, c["model"], c["via"], _fmt(c["capacity_rps"], 0), _fmt(c.get("p99_ms_at_capacity"), 1),
             f"{c['reason']}{_retried(c)}"] for name, c in doc.get("capacity", {}).items()]
    return (["target", "model", "via", "capacity_rps", "p99 at capacity (ms)", "why it stops"], rows,
            [None] * len(rows))


POINT_COLUMNS = ["target", "variant", "via", "mode", "load", "infer/s", "p50 ms", "p99 ms", "p99.9 ms", "over 4x SLO",
                 "server queue us", "server compute us", "avg batch", "peak RSS MiB (server + stubs)",
                 "CPU ms/request (server / stubs / perf_analyzer)"]


def points_table(doc: dict) -> Table:
    """One row per load point; a failed point says error (its message is under Errors)."""
    rows, classes = [], []
    for r in doc.get("runs", []):
        head = [r["target"], r["variant"], r["via"], r["mode"], f"{r['value']:g}"]
        if r.get("error"):
            rows.append(head + ["error"] + [""] * (len(POINT_COLUMNS) - len(head) - 1))
            classes.append("bad")
            continue
        srv = r.get("server", {}).get(r["model"], {})
        rss = r.get("rss_mib", {})
        cpu = r.get("cpu_ms_per_request", {})
        rows.append(head + [
            f"{r['infer_per_sec']:.1f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}{_stalls(r)}",
            _fmt(r.get("p999_ms") or None, 1), str(r.get("over_4x_slo", "-")), _fmt(srv.get("queue_us"), 0),
            _fmt(srv.get("compute_infer_us"), 0), _fmt(srv.get("avg_batch"), 2),
            f"{_fmt(rss.get('server_mib'), 0)} + {_fmt(rss.get('stubs_mib'), 0)} ({rss.get('stub_count', 0)} stubs)",
            f"{_fmt(cpu.get('server'), 2)} / {_fmt(cpu.get('stubs'), 2)} / {_fmt(cpu.get('perf_analyzer'), 2)}"])
        classes.append("warn" if r.get("stalls") or r.get("over_4x_slo") else None)
    return POINT_COLUMNS, rows, classes


def tune_table(tune: dict) -> Table:
    best = (tune.get("best") or {}).get("candidate")
    rows = [[r["candidate"], _fmt(r.get("infer_per_sec"), 1), _fmt(r.get("p99_ms"), 1), _fmt(r.get("concurrency")),
             _fmt(r.get("saturation"), 1), _fmt(r.get("stalls")),
             _fmt((r.get("confirm") or {}).get("infer_per_sec"), 1), _fmt(r.get("score"), 1)]
            for r in tune["results"]]
    return (["candidate", "infer/s (best under SLO)", "p99 ms", "at concurrency", "saturation infer/s", "stalls",
             "re-measured infer/s", "score"], rows,
            ["good" if r["candidate"] == best else None for r in tune["results"]])


def spec_table(doc: dict) -> Table:
    """A spec run: per spec model its SLO, batching, inputs and the knee found directly and through the front door."""
    spec = doc.get("spec") or {}
    per_model = (doc.get("payloads") or {}).get("models") or {}
    rows, classes = [], []
    for m, info in spec.get("models", {}).items():
        caps = {c["via"]: c for c in doc.get("capacity", {}).values() if c.get("model") == m}
        direct, front = caps.get("direct"), caps.get("haproxy")
        p = per_model.get(m, {})
        inputs = f"{p.get('golden_rows', '?')} golden" + (f" + {p['generated_rows']} from rules"
                                                        if p.get("generated_rows") else "")
        batching = "none (batch 1)" if info.get("max_batch_size") == 0 else f"max {info.get('max_batch_size')}"
        rows.append([m, _fmt(info.get("slo_p99_ms"), 1), batching, inputs,
                     _fmt(direct["capacity_rps"], 0) if direct else "not measured",
                     _fmt(direct.get("p99_ms_at_capacity"), 1) if direct else "n/a",
                     _fmt(front["capacity_rps"], 0) if front else "no ladder",
                     direct["reason"] if direct else "no capacity ladder ran (see Errors)"])
        classes.append("bad" if not direct or not direct.get("capacity_rps") else None)
    return (["model", "SLO p99 ms", "batching", "inputs", "capacity_rps (the knee, direct)", "p99 at knee (ms)",
             "capacity_rps (front door)", "why it stops"], rows, classes)


def _spec_lines(doc: dict) -> list[str]:
    spec = doc.get("spec")
    if not spec:
        return []
    return [f"Serving spec `{spec['path']}`, repository `{spec['repository']}`: each model judged against its own "
            "`sloP99Ms`; inputs are its golden requests (data only). The demo's ratios are skipped (see Ratios)."]


def inprocess_table(doc: dict) -> Table:
    rows = [[r["model"], str(r["batch_size"]), f"{r['threads']} x {r.get('workers', 1)}",
             f"{r['infer_per_sec']:.1f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}"]
            for r in doc.get("inprocess") or []]
    return ["model", "batch", "threads x sessions", "infer/s", "p50 ms", "p99 ms"], rows, [None] * len(rows)


def _md(tab: Table) -> list[str]:
    columns, rows, _ = tab
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def _intro(doc: dict) -> str:
    v = doc.get("versions", {})
    return (f"Started {doc.get('started')} - finished {doc.get('finished')} ({doc.get('wall_s', '?')} s). "
            f"Triton {v.get('server', '?')}, tritonclient/perf_analyzer {v.get('client', '?')}, "
            f"onnxruntime {v.get('onnxruntime', '?')}, {v.get('host', {}).get('cpus', '?')} CPUs. "
            f"SLO p99 <= {doc.get('slo_ms')} ms. Payloads: {doc.get('payloads', {}).get('source', '?')}.")


def _tune_title(tune: dict) -> str:
    win = (tune.get("best") or {}).get("candidate", "none met the SLO")
    return f"Tuning `{tune['model']}` (best under p99 {tune['slo_ms']} ms: **{win}**)"


#: The lists after the tables: (title, key of doc).
LISTS = [("Skipped", "skipped"), ("Transient failures (the point passed when re-measured)", "transient_failures"),
         ("Errors (partial results above)", "errors")]


def markdown(doc: dict, plots: list[Path]) -> str:
    """report.md: ratios, capacity, per-point table, errors, plots."""
    lines = [f"# recserve perf report: suite `{doc.get('suite')}`", "", _intro(doc), ""]
    if doc.get("spec"):
        lines += ["## Serving spec: capacity per model", "", *_spec_lines(doc), "", *_md(spec_table(doc)), ""]
    lines += ["## Ratios (measured side by side in this run)", "", *_md(ratios_table(doc)), "",
             "## Capacity (highest request rate with p99 under the SLO)", "", *_md(capacity_table(doc)), "",
             "## Load points", "", *_md(points_table(doc))]
    tune = doc.get("tune")
    if tune:
        lines += ["", f"## {_tune_title(tune)}", "", *_md(tune_table(tune)),
                  "", "Proposed `config.pbtxt` (not applied) is next to this report."]
    if doc.get("inprocess"):
        lines += ["", "## In-process onnxruntime reference", "", *_md(inprocess_table(doc))]
    for title, key in LISTS:
        if doc.get(key):
            lines += ["", f"## {title}", ""] + [f"- {e}" for e in doc[key]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## How to read this", "", *READING_NOTES, ""]
    lines += ["", "Raw perf_analyzer CSVs and logs: `csv/`; payloads: `inputs/`; server log: `server/`.", ""]
    return "\n".join(lines)


def html(doc: dict, plots: list[Path]) -> str:
    """report.html: what report.md says, missed ratios and failed points highlighted, the plots inline; one static
    page with nothing outside it (control/htmlpage.py)."""

    def section(title: str, tab: Table) -> list[object]:
        return [tag("h2", inline(title)), htmlpage.table(*tab)]

    parts: list[object] = [tag("h1", inline(f"recserve perf report: suite `{doc.get('suite')}`")),
                           tag("p", _intro(doc)),
                           *([tag("h2", "Serving spec: capacity per model"),
                              *(tag("p", inline(x)) for x in _spec_lines(doc)),
                              htmlpage.table(*spec_table(doc))] if doc.get("spec") else []),
                           *section("Ratios (measured side by side in this run)", ratios_table(doc)),
                           *section("Capacity (highest request rate with p99 under the SLO)", capacity_table(doc)),
                           *section("Load points", points_table(doc))]
    tune = doc.get("tune")
    if tune:
        parts += [*section(_tune_title(tune).replace("**", ""), tune_table(tune)),
                  tag("p", inline("Proposed `config.pbtxt` (not applied) is next to this report."))]
    if doc.get("inprocess"):
        parts += section("In-process onnxruntime reference", inprocess_table(doc))
    for title, key in LISTS:
        if doc.get(key):
            parts += [tag("h2", title), bullets(doc[key], "warnings" if key == "errors" else None)]
    if plots:
        parts += [tag("h2", "Plots"), *(htmlpage.image(p, f"{p.stem}: throughput vs latency") for p in plots)]
    parts += [tag("h2", "How to read this"), bullets(n.removeprefix("- ") for n in READING_NOTES),
              tag("p", inline("Raw perf_analyzer CSVs and logs: `csv/`; payloads: `inputs/`; server log: `server/` "
                              "(next to this page)."), "note")]
    return htmlpage.page(f"recserve perf {doc.get('suite')} {doc.get('started', '')}", parts)


def write(doc: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.json, PNG plots, report.md and report.html into ``out_dir``; plotting errors never lose the
    JSON."""
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
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(html(doc, plots), encoding="utf-8")
    return paths
