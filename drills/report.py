"""Drill reports: ``reports/drills/<timestamp>/`` with report.json, report.md, report.html, one PNG per drill,
per-drill journals and raw request records, and a ``reports/drills/latest`` link.

Why these files: report.json is what CI and people's scripts read (fields fixed by the issue),
report.md the summary a person reads, report.html the same in a browser with the plots inline (one file that
travels alone), the PNG shows what happened when. The journals are the record:
report.json, report.md, report.html and the PNGs are rendered from them alone (``render``), and the raw requests
let anyone recompute every figure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from recserve.control import htmlpage, reportdir
from recserve.control.defaults import REPO_ROOT
from recserve.control.htmlpage import Markup, bullets, esc, tag
from recserve.control.reportdir import link_latest
from recserve.drills.figures import DrillFigures
from recserve.drills.journal import Journal
from recserve.drills.probe import Record

REPORTS_ROOT = REPO_ROOT / "reports" / "drills"

#: Fields every drill entry of report.json has (the issue's list first).
REQUIRED = ("name", "passed", "rto_ms", "detection_ms", "failed_requests", "total_requests", "wrong_answers",
            "p99_ms", "versions_consistent")


def new_run_dir(root: Path = REPORTS_ROOT) -> Path:
    """A fresh ``<root>/<UTC timestamp>/`` for one run's report."""
    return reportdir.new_run_dir(root)



def _figures(d: dict) -> DrillFigures:
    """A drill entry's figures, typed (what the drill was and its verdict stay in ``d``)."""
    return DrillFigures.from_dict(d)


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}{unit}" if abs(v) >= 100 else f"{v:.1f}{unit}"
    return f"{v}{unit}"


def _verdict(d: dict) -> str:
    verdict = "SKIP" if d.get("status") == "skipped" else ("PASS" if d["passed"] else "FAIL")
    return verdict + (" (aborted)" if d.get("status") == "aborted" else "")


def summary_rows(drills: Sequence[dict]) -> list[list[str]]:
    """Rows of the summary table: drill, verdict, RTO, failed/total, p99 before/during/after."""
    rows = []
    for d in drills:
        verdict, f = _verdict(d), _figures(d)
        p99 = f.p99_ms or {}
        tail = f.tail or {}
        rows.append([d["name"], verdict, _fmt(f.rto_ms, " ms"),
                     f"{f.failed_requests or 0}/{f.total_requests or 0}"
                     + (f" ({f.wrong_answers} wrong)" if f.wrong_answers else ""),
                     " / ".join(_fmt(p99.get(k)) for k in ("before", "during", "after")),
                     f"{_fmt(tail.get('p999_ms'))} / {tail.get('over_4x_slo', '-')}"])
    return rows


HEADER = ["drill", "verdict", "RTO", "failed/total", "p99 ms before/during/after", "p99.9 ms / over 4x SLO"]


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """An indented markdown table (a blank line before and after, so it renders inside a drill's list)."""
    def line(cells: Sequence[object]) -> str:
        return "  | " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    return ["", line(columns), "  |" + "---|" * len(columns), *(line(r) for r in rows), ""]


def breakdown_facts(d: dict) -> list[str]:
    """Served / degraded / shed / failed apart (a degraded answer never counts as good), the control plane's
    reactions and the client's own lag: one line each."""
    out, f = [], _figures(d)
    if f.served_requests is not None:
        out.append(f"requests: {f.served_requests} served, {f.degraded_answers} degraded, "
                   f"{f.shed_requests} shed, {f.failed_unshed} failed otherwise "
                   f"(of {f.total_requests})")
    if f.restarts is not None:
        out.append(f"control plane: {f.restarts} restarts, {f.probes_shed} health probes shed "
                   "(timed out or met a full queue) during the drill")
    if f.proxy_restart_gap_s is not None:
        out.append(f"HAProxy restart gap (kill to accepting connections): {f.proxy_restart_gap_s} s")
    lag = f.client_lag or {}
    if lag.get("p99_ms") is not None:
        out.append(f"load generator lag behind its schedule: p50 {lag['p50_ms']} ms, p99 {lag['p99_ms']} ms, "
                   f"max {lag['max_ms']} ms")
    return out


def failures_table(d: dict) -> tuple[list[str], list[list]]:
    """The failed requests by status and message, with the time each kind was first seen."""
    return (["failed requests: status", "message", "count", "first at s (after the fault)", "its latency ms"],
            [[f["status"], f["detail"] or "-", f["count"], f"{f['first_at_s']} ({f['first_after_fault_s']})",
              f["first_latency_ms"]] for f in _figures(d).failures or []])


def steps_table(d: dict) -> tuple[list[str], list[list]]:
    """Triton's queue and compute per ensemble step over the drill."""
    return (["Triton step", "requests", "failures", "queue ms/req", "compute ms/req", "mean batch"],
            [[m, v["requests"], v["failures"], _fmt(v["queue_ms"]), _fmt(v["compute_ms"]), _fmt(v["mean_batch"])]
             for m, v in (_figures(d).triton_steps or {}).items()])


TIMERS_NOTE = ("HAProxy's own timers during the fault (overload: its hold phase), from its access log: where a "
               "request went, its wait for a server slot (Tw), the server's answer (Tr) and its active time in "
               "HAProxy (Ta); statuses with HAProxy's termination state (sQ: timed out while queued for a server "
               "slot; SC: the server refused the connection; PR: refused by a rule); the client's figures add the "
               "load generator's own delays.")


def timers_table(d: dict) -> tuple[list[str], list[list]]:
    """HAProxy's timers per route during the fault."""
    return (["routed to", "requests", "Tw p99 ms", "Tr p50 / p99 ms", "Ta p50 / p99 ms", "retried (redispatched)",
             "statuses other than 200"],
            [[k, v["requests"], _fmt(v["tw_p99_ms"]), f"{_fmt(v['tr_p50_ms'])} / {_fmt(v['tr_p99_ms'])}",
              f"{_fmt(v['ta_p50_ms'])} / {_fmt(v['ta_p99_ms'])}", f"{v['retried']} ({v['redispatched']})",
              ", ".join(f"{s}: {n}" for s, n in v["statuses"].items()) or "-"]
             for k, v in (_figures(d).haproxy_timers or {}).items()])


def breakdown_lines(d: dict) -> list[str]:
    """Served / degraded / shed / failed apart (a degraded answer never counts as good), the control plane's
    reactions, the client's own lag, Triton's queue and compute per ensemble step over the drill, and HAProxy's
    timers per route during the fault."""
    out = [f"- {f}" for f in breakdown_facts(d)]
    for tab in (failures_table(d), steps_table(d)):
        if tab[1]:
            out += table(*tab)
    timers = timers_table(d)
    if timers[1]:
        out += [f"  {TIMERS_NOTE}", *table(*timers)]
    return out


def _rung(r: dict) -> str:
    if r.get("warmup"):
        return "warm-up (not judged)"
    kind = "bisect" if r.get("refined") else ""
    return " ".join(k for k in (kind, "repeat" if r.get("repeated") else "") if k)


def knee_facts(knee: dict | None) -> list[str]:
    """The knee the load was sized by and the limits it set: one line each."""
    if not knee:
        return []
    out = [f"knee: {_fmt(knee.get('capacity_rps'), ' rps')}; {knee.get('source', '')}; the fleet settled "
           f"{_fmt(knee.get('settled_after_s'), ' s')} after the ladder (restarts it caused: "
           f"{knee.get('restarts_during', {})})"]
    lim = knee.get("limits") or {}
    if lim:
        out.append(f"the fleet's in-flight limits: host limit {_fmt(lim.get('host_limit'))} (knee "
                   f"{_fmt(lim.get('knee_rps'), ' rps')}; {lim.get('limit_rule') or 'p99: knee x SLO p99'}; shared "
                   f"by the servers taking traffic); that knee: {lim.get('source') or '?'}; mean latency at it: "
                   f"{_fmt(knee.get('mean_ms'), ' ms')}")
    return out


def ladder_table(knee: dict | None) -> tuple[list[str], list[list]]:
    """The open-loop rungs around the knee."""
    return (["offered rps", "sent", "failed", "served rps", "mean ms", "p99 ms", "client CPU", "rung"],
            [[r["offered_rps"], r["sent"], r["failed"], r["achieved_rps"], _fmt(r.get("mean_ms")), _fmt(r["p99_ms"]),
              f"{r.get('client_cpu', 0):.2f}", _rung(r)]
             for r in (knee or {}).get("ladder") or [] if "offered_rps" in r])


def knee_lines(knee: dict | None) -> list[str]:
    """The knee the load was sized by, and the ladder of open-loop rungs around it (issue 9: the figure must be
    measured, and shown)."""
    out = [f"- {f}" for f in knee_facts(knee)]
    ladder = ladder_table(knee)
    if knee and ladder[1]:
        out += table(*ladder)
    return out


def drill_facts(d: dict) -> list[str]:
    """The lines after a drill's verdict: detection, RTO, answers, how the fault was made, RPO, background load."""
    f = _figures(d)
    out = [f"detection: {_fmt(f.detection_ms, ' ms')}, RTO: {_fmt(f.rto_ms, ' ms')}"
           + (" (back to the before-phase's level)" if f.rto_basis == "before" else "") + ", "
           f"wrong answers: {f.wrong_answers}, versions consistent: {f.versions_consistent}"]
    if d.get("simulation"):
        out.append(f"how the fault was made: {d['simulation']}")
    if d.get("first_attempt"):
        out.append(f"run twice: the first attempt's overload was not felt (knee "
                   f"{d['first_attempt'].get('capacity_rps')} rps), so the knee was measured again: "
                   f"{d['first_attempt']['reason']}")
    if f.rpo_s is not None:
        out.append(f"RPO: {f.rpo_s} s since the last verified backup; lost: {f.rpo_lost}; "
                   f"rebuild: {f.rebuild}")
    if f.background:
        out.append(f"background load (perf_analyzer): {f.background.get('summary', f.background)}")
    return out


def alert_facts(d: dict) -> list[str]:
    """Expected alerts (quiet before the fault, time-to-alert and -resolve) and what monitoring cost."""
    out, f = [], _figures(d)
    if f.alerts and f.measured("alerts_quiet_after_s"):
        q = f.alerts_quiet_after_s
        out.append("expected alerts quiet before the fault: " + (
            f"after {q} s" if q is not None else "NO, still active (time-to-alert cannot be measured)"))
    for a in f.alerts or []:
        out.append(f"alert `{a['alert']}`: time-to-alert {_fmt(a.get('time_to_alert_s'), ' s')} "
                   f"(target {a['within_s']} s), time-to-resolve {_fmt(a.get('time_to_resolve_s'), ' s')}"
                   + (f" (target {a['resolve_within_s']} s)" if a.get("resolve_within_s") else "")
                   + (f", receiver {a['receiver']}" if a.get("receiver") else "")
                   + (f"; {a['note']}" if a.get("note") else ""))
    if f.monitoring_cost:
        m = f.monitoring_cost
        out.append(f"monitoring cost ({m['intervals']}): CPU seconds {m['cpu_s']} over {m['wall_s']} s; "
                   f"Prometheus used {m['prometheus_core_share'] or 0:.1%} of one core")
    return out


#: The figure definitions at the end of report.md and report.html.
DEFINITIONS = [
    "RTO: client-measured, from the fault to the start of the first full second (sliding, by send "
    "time) in which every probe request succeeded with the right answer under the SLO. Drills above the "
    "knee (`steady_state.rto: before`) shed in their steady state: for them the window needs no failure "
    "beyond shedding, no wrong answer, and good answers per second at >= 90% of the before-phase's "
    "(windows every 0.1 s).",
    "detection: from the fault to the control plane's first event marking the instance.",
    "RPO (lost-host): age of the newest verified backup when the host was lost, and what the rebuilt "
    "fleet no longer has (desired versions, control-plane events recorded after that backup).",
    "time-to-alert / time-to-resolve: from the fault to the moment recserve's webhook receiver got "
    "Alertmanager's firing / resolved notification (drills run Prometheus and Alertmanager with 1 s "
    "scrape and evaluation intervals and no notification batching; the rules' `for` durations are the "
    "production ones).",
    "p50/p99: nearest-rank over successful probe requests; before/during/after are the spec's windows.",
    "rejected (shed): refused by the front door's admission, RESOURCE_EXHAUSTED \"overloaded, retry later\" "
    "(gRPC) or 429 (HTTP); any other failure, UNAVAILABLE included, is a failure beyond shedding.",
    "anchors to beat (detection of a dead or hung backend elsewhere): Kubernetes readiness probes take "
    "about 30 s to mark a pod unready, Envoy outlier detection sweeps every 10 s, Ray Serve's health "
    "check waits 30 s.",
]


def markdown(drills: Sequence[dict], meta: dict) -> str:
    lines = ["# recserve drill report", "", f"Run {meta.get('run', '')} on {meta.get('host', '')}: "
             f"{sum(d['passed'] is True for d in drills)}/{len(drills)} passed, "
             f"{sum(d['passed'] is None for d in drills)} skipped.",
             f"Models: {meta.get('models', '?')}; fleet: {meta.get('fleet', '?')}.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(drills)]
    lines += ["", "## Drills", ""]
    for d in drills:
        lines += [f"### {d['name']}", "", d.get("purpose", "").strip(), "",
                  f"- verdict: **{_verdict(d)}** ({d.get('status', '')}): {d.get('reason', '')}"]
        lines += [f"- {f}" for f in drill_facts(d)]
        lines += knee_lines(_figures(d).knee)
        lines += breakdown_lines(d)
        lines += [f"- {f}" for f in alert_facts(d)]
        missed = [c for c in d.get("checks", []) if not c["ok"]]
        for c in missed:
            lines.append(f"- missed: `{c['figure']}` measured {c['measured']}, target {c['target']}, "
                         f"by {c['missed_by']}")
        if d.get("plot"):
            lines += ["", f"![{d['name']}]({d['plot']})"]
        lines.append("")
    lines += ["## Definitions", "", *(f"- {x}" for x in DEFINITIONS), ""]
    return "\n".join(lines)


def _row_class(d: dict) -> str:
    return {"PASS": "good", "SKIP": "warn"}.get(_verdict(d).split()[0], "bad")


def _badge(d: dict) -> Markup:
    return tag("span", _verdict(d), f"verdict {_verdict(d).split()[0]}")


def tail_fact(d: dict) -> str:
    tail = _figures(d).tail or {}
    if not tail:
        return "tail beyond p99: not measured"
    return (f"tail beyond p99: p99.9 {_fmt(tail.get('p999_ms'), ' ms')}, {tail.get('over_4x_slo', '-')} requests "
            f"over 4x the SLO ({_fmt(tail.get('limit_ms'), ' ms')}) of {tail.get('requests', '-')}")


def _html_table(title: str, tab: tuple[list[str], list[list]], note: str = "") -> list[object]:
    return [tag("h3", title), tag("p", note, "note") if note else "", htmlpage.table(*tab)] if tab[1] else []


def _html_drill(d: dict, run_dir: Path, i: int) -> Markup:
    """One drill's section: verdict and reason, its figures, the checks (missed ones highlighted), the failed
    requests and the other tables of report.md, its plot."""
    f = _figures(d)
    p99 = f.p99_ms or {}
    checks = d.get("checks") or []
    parts: list[object] = [
        Markup(f"<h2>{esc(d['name'])} {_badge(d)}</h2>"),
        tag("p", d.get("purpose", "").strip(), "note") if d.get("purpose") else "",
        Markup(f"<p><b>verdict:</b> {esc(_verdict(d))} ({esc(d.get('status', ''))}): "
               f"<span class=\"reason\">{esc(d.get('reason', ''))}</span></p>"),
        bullets(["p99 ms before / during / after: "
                 + " / ".join(_fmt(p99.get(k)) for k in ("before", "during", "after")), tail_fact(d),
                 *drill_facts(d), *knee_facts(f.knee), *breakdown_facts(d), *alert_facts(d)]),
    ]
    if checks:
        parts += [tag("h3", "expectations"), htmlpage.table(
            ["expectation", "figure", "measured", "target", "missed by", "kind"],
            [[c.get("expectation", ""), c["figure"], c["measured"], c["target"], c.get("missed_by") or "-",
              "deterministic" if c.get("deterministic") else "timing"] for c in checks],
            ["bad" if not c["ok"] else None for c in checks], cls="checks")]
    parts += _html_table("failed requests", failures_table(d))
    parts += _html_table("the load's knee", ladder_table(f.knee))
    parts += _html_table("Triton per ensemble step", steps_table(d))
    parts += _html_table("HAProxy's timers", timers_table(d), TIMERS_NOTE)
    if d.get("plot"):
        parts.append(htmlpage.image(Path(run_dir) / d["plot"], f"timeline of drill {d['name']}"))
    body = "\n".join(esc(x) for x in parts if x)
    return Markup(f'<section class="drill" id="drill-{i}">\n{body}\n</section>')


def html(drills: Sequence[dict], meta: dict, run_dir: Path) -> str:
    """report.html: the summary table (each drill linked to its section), one section per drill with its plot
    inline, the definitions; one static page with nothing outside it (control/htmlpage.py)."""
    rows = [[Markup(f'<a href="#drill-{i}">{esc(r[0])}</a>'), _badge(d), *r[2:]]
            for i, (d, r) in enumerate(zip(drills, summary_rows(drills), strict=True))]
    passed, skipped = sum(d["passed"] is True for d in drills), sum(d["passed"] is None for d in drills)
    return htmlpage.page(f"recserve drills {meta.get('run', '')}", [
        tag("h1", "recserve drill report"),
        tag("p", f"Run {meta.get('run', '')} on {meta.get('host', '')}: {passed}/{len(drills)} passed, "
                 f"{skipped} skipped. Models: {meta.get('models', '?')}; fleet: {meta.get('fleet', '?')}."),
        htmlpage.table(HEADER, rows, [_row_class(d) for d in drills], cls="summary"),
        *(_html_drill(d, run_dir, i) for i, d in enumerate(drills)),
        tag("h2", "Definitions"), bullets(DEFINITIONS)])


def plot(path: Path, name: str, seconds: Sequence[dict], fault_s: float, fault_end_s: float,
         marks: Sequence[tuple[float, str]] = (), slo_ms: float | None = None) -> Path:
    """requests/s, p99 and errors per second; the fault window shaded; phases and events marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] + 0.5 for s in seconds]
    fig, axes = plt.subplots(3, 1, figsize=(9, 6.5), sharex=True)
    series = [("requests/s", [("sent", [s["sent"] for s in seconds]), ("ok", [s["ok"] for s in seconds])]),
              ("p99 ms", [("p99", [s["p99_ms"] if s["p99_ms"] is not None else float("nan") for s in seconds])]),
              ("errors/s", [("failed", [s["errors"] for s in seconds]), ("wrong", [s["wrong"] for s in seconds])])]
    for ax, (label, lines) in zip(axes, series, strict=True):
        for lname, ys in lines:
            ax.plot(t, ys, marker=".", label=lname)
        ax.axvspan(fault_s, fault_end_s, color="tab:red", alpha=0.15, label="fault window")
        for x, _text in marks:
            ax.axvline(x, color="gray", linestyle="--", linewidth=0.8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if slo_ms:
        axes[1].axhline(slo_ms, color="tab:orange", linewidth=0.8, label="SLO")
    last_x, level = None, 0
    for x, text in sorted(marks):
        level = level + 1 if last_x is not None and x - last_x < 0.6 else 0  # stagger marks that nearly coincide
        axes[0].annotate(text, (x, 1 - 0.22 * (level % 4)), xycoords=("data", "axes fraction"), rotation=0,
                         fontsize=6, va="top", ha="left", bbox={"boxstyle": "round,pad=0.1", "fc": "white",
                                                                  "alpha": 0.7, "lw": 0})
        last_x = x
    axes[0].legend(loc="lower left", fontsize=7)
    axes[1].legend(loc="upper left", fontsize=7)
    axes[2].legend(loc="upper left", fontsize=7)
    axes[2].set_xlabel("seconds since drill start (phases: before | fault | after)")
    fig.suptitle(f"drill {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def record(run_dir: Path, drills: list[dict], journals: dict[str, Journal], records: dict[str, list[Record]],
           meta: dict | None = None) -> None:
    """Keep what a run measured: one journal per drill, carrying its result and the run's meta, and the raw
    probe requests. Everything else in the run dir is rendered from the journals."""
    meta = {"run": run_dir.name, "host": os.uname().nodename, **(meta or {})}
    for d in drills:
        _require_fields(d)
        journal = journals.get(d["name"]) or Journal(d["name"])
        journal.result, journal.meta = d, meta
        journal.write(run_dir / f"{d['name']}.journal.json")
    for name, recs in records.items():
        with (run_dir / f"{name}.requests.jsonl").open("w") as fh:
            for r in recs:
                fh.write(json.dumps(r.to_dict()) + "\n")


def render(run_dir: Path) -> dict[str, Path]:
    """report.json, report.md, report.html and one PNG per drill from the ``*.journal.json`` files alone, in run
    order.

    Why: the journal is the record (Chaos Toolkit's model); a report is a view of it that anyone can
    re-render (``python -m recserve.drills report DIR``) after changing the template, and the runner uses this
    same path, so what a run prints and what a re-render prints cannot differ.
    """
    paths = sorted(Path(run_dir).glob("*.journal.json"))
    if not paths:
        raise FileNotFoundError(f"no *.journal.json in {run_dir}: not a drill run directory")
    journals = sorted((Journal.read(p) for p in paths), key=lambda j: j.started_at)
    drills = []
    for j in journals:
        if not j.result:
            raise ValueError(f"{run_dir}/{j.drill}.journal.json holds no result: it cannot be rendered")
        d = dict(j.result)
        _require_fields(d)
        f = j.figures()  # typed; an older journal's unknown keys stay in d, as they were
        if f.seconds:
            png = plot(run_dir / f"{d['name']}.png", d["name"], f.seconds, f.fault_at_s, f.fault_end_s,
                       f.marks or [], d.get("slo_p99_ms"))
            d["plot"] = png.name
        drills.append(d)
    meta = journals[0].meta or {"run": Path(run_dir).name}
    public = [{k: v for k, v in d.items() if k != "seconds"} for d in drills]
    (run_dir / "report.json").write_text(json.dumps({"meta": meta, "drills": public}, indent=2, default=str) + "\n")
    (run_dir / "report.md").write_text(markdown(public, meta))
    (run_dir / "report.html").write_text(html(public, meta, run_dir), encoding="utf-8")
    return {"dir": run_dir, "json": run_dir / "report.json", "md": run_dir / "report.md",
            "html": run_dir / "report.html", "drills": public}


def write(run_dir: Path, drills: list[dict], journals: dict[str, Journal], records: dict[str, list[Record]],
          meta: dict | None = None) -> dict:
    """A run's files: the journals and requests (``record``), the report rendered from them, the latest link."""
    record(run_dir, drills, journals, records, meta)
    paths = render(run_dir)
    paths["latest"] = link_latest(run_dir)
    return paths


def _require_fields(d: dict) -> None:
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ValueError(f"drill {d.get('name')!r} result lacks report fields {missing}")


def console_table(drills: Sequence[dict]):
    """The same summary as a rich Table (what make drill-smoke prints)."""
    from rich.table import Table

    table = Table(title="recserve drills", title_justify="left")
    for h in HEADER:
        table.add_column(h, justify="left" if h in ("drill", "verdict") else "right")
    for row in summary_rows(drills):
        style = "green" if row[1] == "PASS" else ("yellow" if row[1] == "SKIP" else "red")
        table.add_row(*row, style=style)
    return table
