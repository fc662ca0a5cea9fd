"""``recctl status`` as a static HTML page: ``recctl status --html status.html`` (or, from a saved document,
``recctl status -o json | python -m recserve.control.api.statushtml > status.html``).

Why ``--html FILE`` and not ``-o html``: every recctl command takes the same ``-o table|json|yaml`` (one output layer,
control/api/cli_output.py, and a test holds every command to it); a format only one command had would break that
promise, so the page is written to a file next to the usual output. The JSON document is the interface: this renders
it (the fields of the control plane's ``FleetStatus`` message, control/api/server.py, plus ``monitoring``) as one
self-contained page (control/htmlpage.py: inline style, no script, nothing fetched) with the fleet's health,
warnings, instances (broken ones highlighted), desired versions, the active rollout and the recent events.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from recserve.control import htmlpage
from recserve.control.htmlpage import Markup, bullets, tag

#: Instance states that need a look (warn) or are broken (bad); others (healthy, drained) are plain.
STATE_CLASS = {"starting": "warn", "restarting": "warn", "draining": "warn", "broken": "bad", "dead": "bad"}


def _versions(v: object) -> list:
    """A model's versions, as recctl prints them ([1, 2]) or as the control plane's proto dict has them."""
    return list(v.get("versions", [])) if isinstance(v, dict) else list(v or [])


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def _models(inst: dict, desired: dict) -> str:
    """The loaded versions of the desired models (recctl's table leaves out the ensembles' _pre/_post steps)."""
    return ", ".join(f"{k}:{','.join(map(str, _versions(v)))}" for k, v in sorted((inst.get("models") or {}).items())
                     if (k in desired or not desired) and not k.endswith(("_pre", "_post")))


def render(doc: dict, rendered_at: str | None = None) -> str:
    """The status page of ``doc`` (``recctl status -o json``'s document)."""
    health = str(doc.get("health", "?"))
    ep = doc.get("endpoints") or {}
    desired = {k: _versions(v) for k, v in (doc.get("desired") or {}).items()}
    instances = doc.get("instances") or []
    shm = doc.get("shm") or {"regions": sum(i.get("shm_regions", 0) for i in instances),
                             "bytes": sum(int(i.get("shm_bytes", 0)) for i in instances)}
    mon = doc.get("monitoring")
    facts = [
        f"endpoints: gRPC {ep.get('grpc', '-')}, HTTP {ep.get('http', '-')}, control {ep.get('control', '-')}, "
        f"metrics {ep.get('metrics', '-')}; route {doc.get('route', '')}",
        f"mode {doc.get('mode', '')}, actives wanted {doc.get('active_target', 0)}, "
        f"shedding {'YES' if doc.get('shedding') else 'no'}",
        f"knee {doc.get('knee_rps', 0):g} rps ({doc.get('knee_source', '')}): host limit {doc.get('host_limit', 0)} "
        "in flight, shared by the servers taking traffic",
        f"/dev/shm: {shm['regions']} regions, {int(shm['bytes']) / 2**20:.1f} MiB held by this fleet's instances",
        (f"monitoring: Prometheus {mon.get('prometheus')}, Alertmanager {mon.get('alertmanager')}, "
         f"receiver {mon.get('receiver')}") if mon else "monitoring: not running (make monitor-up)",
    ]
    parts: list[object] = [
        Markup(f"<h1>recserve fleet {tag('span', health, f'verdict {health}')}</h1>"),
        tag("p", f"rendered {rendered_at}", "note") if rendered_at else "",
    ]
    if doc.get("warnings"):
        parts += [tag("h2", "warnings"), bullets(doc["warnings"], "warnings")]
    parts += [bullets(facts), tag("h2", "instances"), htmlpage.table(
        ["id", "role", "state", "pid", "grpc", "http", "weight", "in flight", "limit", "restarts", "models", "shm",
         "last healthy", "detail"],
        [[i.get("id", ""), i.get("role", ""), i.get("state", ""), i.get("pid", ""), i.get("grpc_port", ""),
          i.get("http_port", ""), i.get("weight", 0), f"{i.get('in_flight', 0)}+{i.get('queued', 0)}q",
          i.get("limit", 0), i.get("restarts", 0), _models(i, desired), i.get("shm_regions", 0),
          _when(i.get("last_healthy_unix")), i.get("detail", "") or "-"] for i in instances],
        [STATE_CLASS.get(i.get("state", "")) for i in instances], cls="instances")]
    parts += [tag("h2", "desired versions"),
              htmlpage.table(["model", "versions"], [[k, ", ".join(map(str, v))] for k, v in sorted(desired.items())])]
    r = doc.get("active_rollout") or {}
    if r.get("id"):
        parts += [tag("h2", "active rollout"), tag(
            "p", f"rollout {r['id']}: {r.get('model')} {r.get('from_version')} -> {r.get('to_version')} "
                 f"({r.get('strategy', '')}) phase {r.get('phase')}, status {r.get('status', '')}"
                 + (f", canary {r['canary']}" if r.get("canary") else ""))]
    events = doc.get("events") or []
    if events:
        parts += [tag("h2", "recent events"), htmlpage.table(
            ["time (UTC)", "kind", "instance", "message"],
            [[_when(e.get("ts_unix")), e.get("kind", ""), e.get("instance", "") or "-", e.get("message", "")]
             for e in events], cls="events")]
    return htmlpage.page(f"recserve fleet {health}", parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recserve.control.api.statushtml",
                                description="render `recctl status -o json` (stdin or FILE) as one static HTML page")
    p.add_argument("file", nargs="?", type=Path, help="the JSON document (default: stdin)")
    p.add_argument("-o", "--out", type=Path, help="write the page here (default: stdout)")
    args = p.parse_args(argv)
    try:
        doc = json.loads(args.file.read_text() if args.file else sys.stdin.read())
    except (OSError, ValueError) as exc:
        print(f"statushtml: no status document: {exc}", file=sys.stderr)
        return 2
    if not isinstance(doc, dict) or "instances" not in doc:
        print("statushtml: not a `recctl status -o json` document (no instances)", file=sys.stderr)
        return 2
    page = render(doc, time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()))
    if args.out:
        args.out.write_text(page, encoding="utf-8")
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
