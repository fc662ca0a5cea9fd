"""``make perf-tune MODEL=ranker``: brute-force search of instance count, batching delay and preferred
batch sizes for one model (what Triton's Model Analyzer does), with perf_analyzer.

Every candidate is applied as a config override through Triton's repository API on our own embedded
server, so the committed ``config.pbtxt`` is never touched; the winner is written as a proposed
``config.pbtxt`` next to the report for a human to review and commit.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from recserve.control.runtime.triton import DEFAULT_REPOSITORY, TritonError
from recserve.perf import figures, report
from recserve.perf.console import console
from recserve.perf.suite import Suite
from recserve.perf.suiterun import SuiteRun
from recserve.perf.targets import check_models, direct, start_server


@dataclass(frozen=True)
class Candidate:
    instances: int
    delay_us: int
    preferred: tuple[int, ...]
    queue_policy: bool = True

    @property
    def label(self) -> str:
        pref = "x".join(map(str, self.preferred)) or "none"
        return f"inst{self.instances}-delay{self.delay_us}-pref{pref}" + ("" if self.queue_policy else "-nopolicy")


FULL_GRID = {
    "instances": (1, 2),
    "delay_us": (0, 500, 2000),
    "preferred": ((), (4, 8), (8, 16)),
    # A model's own default_queue_policy is kept (the shipped models have none: with one, Triton 2.51 holds requests
    # ~500 ms, perf/holds.py); pass --try-without-queue-policy to also measure candidates without it.
    "queue_policy": (True,),
}
QUICK_GRID = {"instances": (1, 2), "delay_us": (500,), "preferred": ((8, 16),), "queue_policy": (True,)}


def candidates(grid: dict) -> list[Candidate]:
    keys = ("instances", "delay_us", "preferred", "queue_policy")
    return [Candidate(*vals) for vals in itertools.product(*(grid[k] for k in keys))]


def override(committed: dict, c: Candidate) -> dict:
    """The committed config (as Triton reports it) with the candidate's scheduling applied."""
    cfg = copy.deepcopy(committed)
    groups = cfg.get("instance_group") or [{"kind": "KIND_CPU"}]
    cfg["instance_group"] = [{**groups[0], "count": c.instances}]
    db = cfg.setdefault("dynamic_batching", {})
    db["max_queue_delay_microseconds"] = c.delay_us
    db["preferred_batch_size"] = list(c.preferred)
    if not c.queue_policy:
        db.pop("default_queue_policy", None)
    return cfg


def best(results: list[dict], slo_ms: float) -> dict | None:
    """The candidate with the highest score among those that met the SLO without stalls.

    The score is the lower of the two measurements where a candidate was re-measured (the top ones
    are): on a shared host a single lucky run must not win.
    """

    def score(r: dict) -> float:
        return r.get("score", r["infer_per_sec"])

    pool = [r for r in results if "score" in r] or results  # once leaders were re-measured, only they compete
    ok = [r for r in pool if r["p99_ms"] is not None and r["p99_ms"] <= slo_ms and not r.get("stalls") and score(r) > 0]
    return max(ok, key=score, default=None)


def evaluate(s: SuiteRun, ep, model: str, c: Candidate, conc: tuple[int, ...], slo_ms: float, tag: str) -> dict:
    """One sweep of an applied candidate: best point under the SLO and the stalls seen anywhere."""
    rows = s.sweep(ep, f"{model}-tune", model, conc, 1, tag)
    top = max(rows, key=lambda r: r.infer_per_sec, default=None)
    under = [r for r in rows if r.p99_ms <= slo_ms]
    pick = max(under, key=lambda r: r.infer_per_sec, default=top)
    return {
        "infer_per_sec": pick.infer_per_sec if pick else 0.0,
        "p99_ms": pick.p99_ms if pick else None,
        "concurrency": pick.value if pick else None,
        "saturation": figures.saturation(r.row() for r in rows),
        "stalls": sum(r.stalls for r in rows),
    }


#: Candidates re-measured before one is proposed.
CONFIRM_TOP = 3


def proposed_pbtxt(text: str, c: Candidate) -> str:
    """The committed config.pbtxt text with instance count, queue delay and preferred sizes replaced."""
    text = re.sub(r"(instance_group\s*\[\s*\{\s*count:\s*)\d+", rf"\g<1>{c.instances}", text)
    text = re.sub(r"max_queue_delay_microseconds:\s*\d+", f"max_queue_delay_microseconds: {c.delay_us}", text)
    pref = f"preferred_batch_size: [ {', '.join(map(str, c.preferred))} ]\n  " if c.preferred else ""
    text = re.sub(r"preferred_batch_size:\s*\[[^\]]*\]\s*\n\s*", pref, text)
    if c.preferred and "preferred_batch_size" not in text:
        text = text.replace("dynamic_batching {\n", f"dynamic_batching {{\n  {pref.rstrip()}\n", 1)
    if not c.queue_policy:
        text = re.sub(r"\n\s*default_queue_policy\s*\{[^}]*\}", "", text)
    return text


def main(args: argparse.Namespace) -> int:
    repository: Path = (args.repository or DEFAULT_REPOSITORY).resolve()
    model = args.model
    loadable, skipped = check_models(repository, [model])
    if not loadable:
        print(f"perf-tune: error: {skipped.get(model, model)}")
        return 2
    out = report.new_run_dir(args.reports / "tune")
    grid = dict(QUICK_GRID if args.quick else FULL_GRID)
    if getattr(args, "try_without_queue_policy", False):
        grid["queue_policy"] = (True, False)
    conc = (1, 4) if args.quick else (1, 4, 8)
    suite = Suite(
        name=f"tune-{model}", path=Path("tune"), slo_ms=args.slo_ms, seconds_per_point=1.5 if args.quick else 2.0
    )
    s = SuiteRun(suite, out, repository, args.data)
    results: list[dict] = []
    server = None
    try:
        s.prepare_payloads([model])
        server = start_server(repository, [model], out / "server")
        ep = direct(server)
        s.collect_versions(server)
        committed = server.model_config(model)
        for c in candidates(grid):
            console.print(f"[bold cyan]{model}[/] {c.label}")
            try:
                server.load_model(model, override(committed, c))
            except TritonError as exc:
                results.append({"candidate": c.label, "error": str(exc), "infer_per_sec": 0.0, "p99_ms": None})
                continue
            results.append(
                {"candidate": c.label, **c.__dict__, "preferred": list(c.preferred)}
                | evaluate(s, ep, model, c, conc, args.slo_ms, c.label)
            )
        ranked = sorted(
            (r for r in results if "error" not in r and not r["stalls"] and (r["p99_ms"] or 1e9) <= args.slo_ms),
            key=lambda r: r["infer_per_sec"],
            reverse=True,
        )[:CONFIRM_TOP]
        by_label = {c.label: c for c in candidates(grid)}
        for r in ranked:  # a second measurement of the leaders; the lower one counts
            c = by_label[r["candidate"]]
            console.print(f"[bold cyan]{model}[/] {c.label} (re-measured)")
            server.load_model(model, override(committed, c))
            again = evaluate(s, ep, model, c, conc, args.slo_ms, c.label + "-confirm")
            r["confirm"] = again
            ok = again["p99_ms"] is not None and again["p99_ms"] <= args.slo_ms and not again["stalls"]
            r["score"] = min(r["infer_per_sec"], again["infer_per_sec"]) if ok else 0.0
    except (TritonError, OSError) as exc:
        s.errors.append(str(exc))
        console.print(f"[red]error: {exc}[/]")
    finally:
        if server is not None:
            server.stop()
    winner = best(results, args.slo_ms)
    doc = s.doc() | {"tune": {"model": model, "slo_ms": args.slo_ms, "results": results, "best": winner}}
    report.write(doc, out)
    report.link_latest(out)
    if winner is None:
        print(f"perf-tune: no candidate met p99 <= {args.slo_ms} ms; see {out}/report.md")
        return 1
    c = next(x for x in candidates(grid) if x.label == winner["candidate"])
    proposal = out / "config.pbtxt"
    proposal.write_text(proposed_pbtxt((repository / model / "config.pbtxt").read_text(), c))
    print(
        f"perf-tune: best {winner['candidate']}: {winner.get('score', winner['infer_per_sec']):.1f} infer/s "
        f"(lower of two measurements) at p99 {winner['p99_ms']:.1f} ms"
    )
    print(f"proposed config (not applied): {proposal}\nreport: {out}/report.md")
    return 0
