"""``make demo``: the whole story on one machine, in a few minutes on 2 cores.

fleet up (control plane, two active tritonservers behind HAProxy, the degraded-answer server) -> ask
``recommend`` and ``search`` through HAProxy and show items with titles -> smoke drills (active crash, hang, 2x
overload, canary rollover under load, bad rollover) with their RTO/failed-request table and report -> fleet
down, always. The exit code follows CI's rule (``verdict``).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from recserve.control.client import RecClient, Result
from recserve.control.defaults import GRPC_PORT, HTTP_PORT, REPO_ROOT

CATALOG = REPO_ROOT / "artifacts" / "data" / "catalog.csv"
console = Console()


def load_titles(path: Path = CATALOG) -> dict[int, str]:
    """item_id -> title from the build's catalogue (empty if the build has not run)."""
    if not path.exists():
        return {}
    with path.open() as f:
        return {int(row["item_id"]): row["title"] for row in csv.DictReader(f)}


def show(title: str, result: Result, titles: dict[int, str], n: int = 5) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("item_id", justify="right")
    table.add_column("score", justify="right")
    table.add_column("title")
    for rank, (item, score) in enumerate(zip(result.item_ids[:n], result.scores[:n], strict=True), 1):
        table.add_row(str(rank), str(item), f"{score:.3f}", titles.get(item, "?"))
    console.print(table)


def ask(grpc_url: str) -> None:
    """A few real requests through HAProxy, shown with catalogue titles."""
    titles = load_titles()
    history = list(titles)[100:104] if titles else [1, 2, 3, 4]
    query = " ".join(titles[history[0]].split()[:2]) if titles else "red boots"
    with RecClient(grpc_url) as c:
        shown = ", ".join(f"{i} ({titles.get(i, '?')})" for i in history)
        console.print(f"history: {shown}")
        show(f"recommend(user_id=42, history={history})", c.recommend(42, history), titles)
        show("recommend(new user, no history): popular items", c.recommend(10**9, []), titles)
        show(f"search({query!r})", c.search(query), titles)


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def run(cmd: list[str], check: bool = True) -> int:
    console.print(f"[dim]$ {' '.join(cmd)}[/]")
    code = subprocess.call(cmd, cwd=REPO_ROOT)
    if check and code != 0:
        raise SystemExit(f"demo: '{' '.join(cmd)}' failed with exit code {code}")
    return code


def verdict(report_json: Path) -> int:
    """The demo's exit code, by the rule CI uses: 1 when a drill did not complete or missed a deterministic
    expectation (a lost request, a wrong answer, inconsistent versions, a restart, no rollback); timing goals
    (RTO, p99, rejection latency on shared cores) are printed as figures, not failures."""
    import json

    try:
        drills = json.loads(report_json.read_text())["drills"]
    except (OSError, ValueError, KeyError) as exc:
        console.print(f"[red]no drill report at {report_json}: {exc}[/red]")
        return 1
    code = 0
    for d in drills:
        hard = [c for c in d.get("checks", []) if c.get("deterministic") and not c.get("ok")]
        soft = [c for c in d.get("checks", []) if not c.get("deterministic") and not c.get("ok")]
        if d.get("status") != "completed" or hard:
            code = 1
            console.print(f"[red]{d['name']}: {d.get('status')}; missed {[c['expectation'] for c in hard]}[/red]")
        elif soft:
            console.print(f"[yellow]{d['name']}: timing goals missed on this host (figures in the report): "
                          f"{', '.join(c['expectation'] for c in soft)}[/yellow]")
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="recserve demo: fleet up, answers, smoke drills, fleet down.")
    p.add_argument("--grpc-port", type=int, default=GRPC_PORT)
    p.add_argument("--http-port", type=int, default=HTTP_PORT)
    p.add_argument("--skip-drills", action="store_true", help="only bring the fleet up, ask it, bring it down")
    args = p.parse_args(argv)
    py = sys.executable
    recctl = [py, "-m", "recserve.control.recctl"]
    t0 = time.monotonic()
    drill_code = 0
    step("1/4 fleet up: control plane, two active tritonservers, HAProxy, degraded-answer server")
    try:
        run([*recctl, "up", "--grpc-port", str(args.grpc_port), "--http-port", str(args.http_port)])
        run([*recctl, "status"])
        step(f"2/4 recommend and search through HAProxy (localhost:{args.grpc_port})")
        ask(f"127.0.0.1:{args.grpc_port}")
        if not args.skip_drills:
            step("3/4 smoke drills: crash, hang, 2x overload, canary rollover under load, bad rollover")
            run([py, "-m", "recserve.drills", "smoke"], check=False)
            drill_code = verdict(REPO_ROOT / "reports" / "drills" / "latest" / "report.json")
            run([*recctl, "status"], check=False)
    finally:
        step("4/4 fleet down")
        run([*recctl, "down"], check=False)
    console.print(f"demo finished in {time.monotonic() - t0:.0f} s; drill reports: reports/drills/latest/report.md")
    return drill_code


if __name__ == "__main__":
    sys.exit(main())
