"""The one rich console every perf module prints progress to (stderr, wide: tables of figures)."""

from rich.console import Console

console = Console(stderr=True, width=200)
