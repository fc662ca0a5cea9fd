"""``make demo``: build if needed, serve, ask ``recommend`` and ``search``, show items with titles, stop."""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from control.client import RecClient, Result
from control.triton import DEFAULT_REPOSITORY, REPO_ROOT, TritonConfig, TritonError, TritonServer

CATALOG = REPO_ROOT / "artifacts" / "data" / "catalog.csv"
console = Console()


def load_titles(path: Path = CATALOG) -> dict[int, str]:
    """item_id -> title from the build's catalogue (empty if the build has not run)."""
    if not path.exists():
        return {}
    with path.open() as f:
        return {int(row["item_id"]): row["title"] for row in csv.DictReader(f)}


def show(title: str, result: Result, titles: dict[int, str], n: int = 5) -> None:
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("item_id", justify="right")
    table.add_column("score", justify="right")
    table.add_column("title")
    for rank, (item, score) in enumerate(zip(result.item_ids[:n], result.scores[:n], strict=True), 1):
        table.add_row(str(rank), str(item), f"{score:.3f}", titles.get(item, "?"))
    console.print(table)


def serve_and_ask(repository: Path) -> None:
    titles = load_titles()
    with tempfile.TemporaryDirectory(prefix="recserve-demo-") as tmp:
        server = TritonServer(TritonConfig(model_repository=repository, workdir=Path(tmp), name="demo"))
        t0 = time.monotonic()
        with console.status("starting tritonserver (embedded, CPU) ..."):
            server.start()
        try:
            took = time.monotonic() - t0
            console.print(f"[green]ready[/] in {took:.1f}s: gRPC {server.grpc_url}, HTTP {server.http_url}")
            with RecClient(server.grpc_url) as c:
                history = [int(i) for i in list(titles)[:3]] if titles else [1, 2, 3]
                show(f"recommend(user_id=42, history={history})", c.recommend(42, history), titles)
                show("recommend(new user, no history): popular items", c.recommend(10**9, []), titles)
                query = _example_query(titles)
                show(f"search({query!r})", c.search(query), titles)
                show(f"search({query!r}, user_id=42)", c.search(query, user_id=42), titles)
        finally:
            server.stop()
            console.print("server stopped.")


def _example_query(titles: dict[int, str]) -> str:
    if not titles:
        return "red leather boots"
    words = next(iter(titles.values())).split()
    return " ".join(words[:2])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="recserve demo: serve the model repository and ask it questions.")
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    args = p.parse_args(argv)
    try:
        serve_and_ask(args.repository.resolve())
    except TritonError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
