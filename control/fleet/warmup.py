"""Warm-up of a freshly loaded instance, before it takes traffic: real requests at the batch sizes the batcher forms,
judged warm on Triton's own compute time against an instance already serving.

Triton's ``model_warmup`` (zero data, one batch size) runs at load, and the golden check sends one batch-1 request
per client-facing model. A version's first client requests still met slower executions (docs/holds.md has the
per-second figures): the other model instances and batch sizes had not run real data yet. So, after the golden
check and before the instance is admitted, ``warm_up`` sends, for ``rounds`` rounds at most and within
``deadline_s``:

- the golden / probe requests (a serving spec's golden requests, else the demo's golden set), straight to the
  instance's own gRPC port, never through the front door;
- at every batch size the batcher forms: 1 and the composing models' ``preferred_batch_size`` (capped by
  ``max_batch_size``), each batch made of one real request repeated;
- per round, as many requests per model and batch size as the busiest composing model has instances (the next
  golden requests each round), sent from that many threads, so each model instance executes each size.

After each round it reads Triton's statistics (``/v2/models/<m>/versions/<v>/stats``) of every composing model it
warms, on the new instance and on the reference (an instance that serves now), and ``judge`` compares the
round's compute_infer time per execution at each batch size with the reference's at the same batch size (the
reference's executions during the warm-up, else all of its executions). The instance is warm when every composing
model is within ``ratio`` of the reference at every batch size the reference has figures for. Without a reference
(the fleet's first start, an idle reference) a batch size is judged against the instance's own best round: warm
when it stopped getting faster. Not warm after ``rounds`` rounds (or at the deadline) is reported with the figures
and the instance is admitted all the same: a version that is slower by nature is the rollout gates' to judge.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from recserve.control import defaults as d

#: Executions at one batch size that make a reference figure (fewer: the reference has no figure at that size).
MIN_REF_EXECUTIONS = 5
#: The most client threads a warm-up sends from (the busiest composing model's instance count, within 1..this).
MAX_THREADS = 4
#: Timeout of one warm-up request: generous, the instance's first executions are the slow ones.
REQUEST_TIMEOUT_S = 5.0
#: Timeout of one statistics call.
STATS_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class WarmupConfig:
    """``rounds`` 0 switches the warm-up off."""

    rounds: int = d.WARMUP_ROUNDS
    ratio: float = d.WARMUP_RATIO
    deadline_s: float = d.WARMUP_DEADLINE_S


# ---------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Counters:
    """One model version's cumulative statistics (Triton's, in ns): requests, their queue and compute_infer time,
    executions, and per batch size (executions, compute_infer ns)."""

    requests: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    executions: int = 0
    batches: Mapping[int, tuple[int, int]] = field(default_factory=dict)

    def __sub__(self, other: Counters) -> Counters:
        sizes = set(self.batches) | set(other.batches)
        b = {s: (self.batches.get(s, (0, 0))[0] - other.batches.get(s, (0, 0))[0],
                 self.batches.get(s, (0, 0))[1] - other.batches.get(s, (0, 0))[1]) for s in sizes}
        return Counters(self.requests - other.requests, self.queue_ns - other.queue_ns,
                        self.compute_ns - other.compute_ns, self.executions - other.executions,
                        {s: v for s, v in b.items() if v[0] > 0})

    def per_execution_us(self, batch: int) -> float | None:
        n, ns = self.batches.get(batch, (0, 0))
        return ns / n / 1e3 if n > 0 else None

    def per_request_us(self) -> tuple[float | None, float | None]:
        """(queue, compute_infer) per request in microseconds; None without requests."""
        if self.requests <= 0:
            return None, None
        return self.queue_ns / self.requests / 1e3, self.compute_ns / self.requests / 1e3


def parse_stats(doc: Mapping) -> Counters:
    """Triton's statistics answer for one model version as ``Counters`` (the first entry of ``model_stats``)."""
    entries = doc.get("model_stats") or []
    if not entries:
        return Counters()
    e = entries[0]
    inf = e.get("inference_stats") or {}

    def ns(block: Mapping | None, key: str = "ns") -> int:
        return int((block or {}).get(key, 0) or 0)

    batches = {}
    for b in e.get("batch_stats") or []:
        ci = b.get("compute_infer") or {}
        batches[int(b["batch_size"])] = (int(ci.get("count", 0) or 0), int(ci.get("ns", 0) or 0))
    return Counters(requests=ns(inf.get("success"), "count"), queue_ns=ns(inf.get("queue")),
                    compute_ns=ns(inf.get("compute_infer")), executions=int(e.get("execution_count", 0) or 0),
                    batches=batches)


def stats_path(model: str, version: int) -> str:
    return f"/v2/models/{model}/versions/{version}/stats"


def read_stats(http_url: str, key: str | None, versions: Mapping[str, int],
               timeout: float = STATS_TIMEOUT_S) -> dict[str, Counters]:
    """Counters of each ``model: version`` on the Triton at ``http_url`` (``host:port``); ``key``: the statistics
    key where the API is restricted (recserve's local instances), None where it is not. A model whose call failed
    is left out."""
    from recserve.control.runtime.triton import ADMIN_HEADER_HTTP

    out: dict[str, Counters] = {}
    for model, version in versions.items():
        req = urllib.request.Request(f"http://{http_url}{stats_path(model, version)}")
        if key:
            req.add_header(ADMIN_HEADER_HTTP, key)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                out[model] = parse_stats(json.loads(resp.read()))
        except (urllib.error.URLError, OSError, TimeoutError, ValueError):
            continue
    return out


def deltas(after: Mapping[str, Counters], before: Mapping[str, Counters]) -> dict[str, Counters]:
    return {m: c - before.get(m, Counters()) for m, c in after.items()}


# ---------------------------------------------------------------------------------------------- the judgement
@dataclass(frozen=True)
class Figure:
    """One composing model in one round: its compute_infer per execution (µs) against the yardstick's for the
    same executions (``ref_us``; ``source``: ``serving``, an instance that serves now, at the batch sizes in
    ``batches``; ``own``, this instance's best earlier round of the same requests; ``none``: nothing to judge it
    by)."""

    model: str
    new_us: float | None
    ref_us: float | None
    source: str
    ok: bool
    batches: tuple[int, ...] = ()

    @property
    def ratio(self) -> float | None:
        return self.new_us / self.ref_us if self.new_us is not None and self.ref_us else None

    def text(self) -> str:
        if self.new_us is None:
            return f"{self.model}: no execution"
        if self.ref_us is None:
            return f"{self.model} {self.new_us / 1e3:.2f} ms (no yardstick yet)"
        at = f" at batch {','.join(map(str, self.batches))}" if self.batches and self.source == "serving" else ""
        return (f"{self.model} {self.new_us / 1e3:.2f} vs {self.ref_us / 1e3:.2f} ms {self.source}{at} "
                f"(x{self.ratio:.2f}{'' if self.ok else ', slow'})")


@dataclass(frozen=True)
class Judgement:
    warm: bool
    figures: tuple[Figure, ...]

    def text(self) -> str:
        return "; ".join(f.text() for f in self.figures)


def judge(new: Mapping[str, Counters], ref: Mapping[str, Counters], ratio: float, models: Sequence[str],
          own_best: Mapping[str, float] | None = None,
          min_ref_executions: int = MIN_REF_EXECUTIONS) -> Judgement:
    """Warm or not, from one round's statistics deltas (``new``) and the reference's (``ref``, chosen by
    ``reference_counters``). Per composing model in ``models``, one figure:

    - against the serving instance: the round's compute_infer time of the executions at the batch sizes where
      the reference has at least ``min_ref_executions`` executions, over what the same executions take there
      (each batch size at the reference's time per execution at that size);
    - where the reference has no such batch size: the round's compute_infer per execution over this instance's
      best earlier round (``own_best``, model -> µs per execution; every round sends the same requests), i.e.
      it stopped getting faster; the first round has no yardstick.

    The instance is warm when every model's figure is within ``ratio``. A model with no execution in the round,
    or with no yardstick, is not warm."""
    figures = []
    for model in models:
        c = new.get(model)
        if c is None or not any(n > 0 for n, _ in c.batches.values()):
            figures.append(Figure(model, None, None, "none", False))
            continue
        r = ref.get(model)
        sizes = sorted(b for b, (n, _) in c.batches.items()
                       if n > 0 and r is not None and r.batches.get(b, (0, 0))[0] >= min_ref_executions)
        if sizes:
            n = sum(c.batches[b][0] for b in sizes)
            actual = sum(c.batches[b][1] for b in sizes) / n / 1e3
            expected = sum(c.batches[b][0] * r.per_execution_us(b) for b in sizes) / n
            figures.append(Figure(model, actual, expected, "serving", actual <= ratio * expected, tuple(sizes)))
            continue
        n = sum(v[0] for v in c.batches.values())
        mine = sum(v[1] for v in c.batches.values()) / n / 1e3
        best = (own_best or {}).get(model)
        figures.append(Figure(model, mine, best, "own" if best is not None else "none",
                              best is not None and mine <= ratio * best))
    return Judgement(bool(figures) and all(f.ok for f in figures), tuple(figures))


def reference_counters(window: Mapping[str, Counters], total: Mapping[str, Counters],
                       min_ref_executions: int = MIN_REF_EXECUTIONS) -> dict[str, Counters]:
    """Per model and batch size, the reference's executions during the warm-up (``window``: same host, same
    moment) where it had at least ``min_ref_executions`` there, else all of its executions so far (``total``)."""
    out = {}
    for m in set(window) | set(total):
        w, t = window.get(m, Counters()), total.get(m, Counters())
        sizes = set(w.batches) | set(t.batches)
        chosen = {b: (w.batches[b] if w.batches.get(b, (0, 0))[0] >= min_ref_executions else t.batches.get(b, (0, 0)))
                  for b in sizes}
        out[m] = Counters(t.requests, t.queue_ns, t.compute_ns, t.executions, chosen)
    return out


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Target:
    """One client-facing model the warm-up sends to: ``requests(batch)`` gives the calls of one round at that
    batch size, each ``call(client)``; ``steps``: its composing models (whose statistics are judged)."""

    model: str
    batches: tuple[int, ...]
    steps: tuple[str, ...]
    requests: Callable[[int], list[Callable[[object], object]]]


def batch_sizes(configs: Mapping[str, Mapping], top: str, steps: Sequence[str]) -> tuple[int, ...]:
    """The batch sizes the batcher forms for ``top``'s steps: 1 and every ``preferred_batch_size`` of a step with a
    dynamic batcher, each within ``top``'s and every step's ``max_batch_size``; (1,) for a model without
    batching. A step whose served preferred sizes are just its ``max_batch_size`` names none (Triton fills that
    in): it adds nothing."""
    tops = int(configs.get(top, {}).get("max_batch_size", 0) or 0)
    if tops <= 0:
        return (1,)
    limit = min([tops] + [int(configs[s].get("max_batch_size", 0) or 0) or tops for s in steps if s in configs])
    sizes = {1}
    for s in steps:
        cfg = configs.get(s, {})
        preferred = [int(x) for x in (cfg.get("dynamic_batching") or {}).get("preferred_batch_size") or []]
        if preferred == [int(cfg.get("max_batch_size", 0) or 0)]:
            continue  # what Triton fills in where the config names none: batches that full only under a backlog
        sizes |= set(preferred)
    return tuple(sorted(b for b in sizes if 1 <= b <= limit))


def instance_count(config: Mapping) -> int:
    """Model instances of one model (Triton's answer to /config: every group's count, at least 1)."""
    groups = config.get("instance_group") or []
    return max(1, sum(int(g.get("count", 1) or 1) for g in groups))


def step_closure(configs: Mapping[str, Mapping], top: str) -> tuple[str, ...]:
    """The non-ensemble models ``top`` runs (itself when it is not an ensemble), from the served configs."""
    out: list[str] = []

    def walk(m: str) -> None:
        cfg = configs.get(m, {})
        steps = ((cfg.get("ensemble_scheduling") or {}).get("step")) or []
        if not steps:
            if m not in out:
                out.append(m)
            return
        for s in steps:
            walk(s["model_name"])

    walk(top)
    return tuple(out)


def _repeat(arrays: Mapping[str, np.ndarray], b: int) -> dict[str, np.ndarray]:
    return {k: np.repeat(np.asarray(v)[None, ...], b, axis=0) for k, v in arrays.items()}


def golden_targets(golden, configs: Mapping[str, Mapping]) -> list[Target]:
    """The targets of a ``Golden`` (the demo's recommend and search) or ``SpecGolden`` (the spec's models), with
    their own golden requests as the warm-up data."""
    spec = getattr(golden, "spec", None)
    targets = []
    if spec is not None:
        for name, m in spec.models.items():
            steps = step_closure(configs, name) if name in configs else tuple(m.steps)
            sizes = batch_sizes(configs, name, steps) if m.info.max_batch_size > 0 else (1,)
            types = {t.name: t.datatype for t in m.info.inputs}
            outs = [t.name for t in m.info.outputs]
            batched = m.info.max_batch_size > 0

            def requests(b: int, m=m, name=name, types=types, outs=outs, batched=batched):
                calls = []
                for g in m.golden:
                    arrays = _repeat(g.inputs, b) if batched else dict(g.inputs)
                    calls.append(lambda c, arrays=arrays: c.infer(name, arrays, types, outs))
                return calls

            targets.append(Target(name, sizes, steps, requests))
        return targets
    pairs = golden.request_set
    for name in ("recommend", "search"):
        if name not in configs:
            continue
        steps = step_closure(configs, name)
        sizes = batch_sizes(configs, name, steps)
        if name == "recommend":
            def requests(b: int):
                calls = []
                for p in pairs:
                    r = p["recommend"]
                    arrays = {"user_id": np.full((b, 1), r["user_id"], dtype=np.int64),
                              "history": np.repeat(np.asarray([r["history"] or [0]], dtype=np.int64), b, axis=0)}
                    calls.append(lambda c, arrays=arrays: c.infer("recommend", arrays, {"user_id": "INT64",
                                                                                        "history": "INT64"},
                                                                  ["item_ids", "scores"]))
                return calls
        else:
            def requests(b: int):
                calls = []
                for p in pairs:
                    s = p["search"]
                    arrays = {"query": np.asarray([[s["query"].encode()]] * b, dtype=object)}
                    types = {"query": "BYTES"}
                    if s.get("user_id") is not None:
                        arrays["user_id"] = np.full((b, 1), s["user_id"], dtype=np.int64)
                        types["user_id"] = "INT64"
                    calls.append(lambda c, arrays=arrays, types=types: c.infer("search", arrays, types,
                                                                               ["item_ids", "scores"]))
                return calls
        targets.append(Target(name, sizes, steps, requests))
    return targets


# ---------------------------------------------------------------------------------------------- the warm-up
@dataclass(frozen=True)
class Endpoint:
    """A Triton to read statistics from: ``http_url`` (host:port), its statistics key (None: unrestricted) and
    the versions it serves (model -> version)."""

    http_url: str
    key: str | None
    versions: Mapping[str, int]

    def read(self, models: Sequence[str]) -> dict[str, Counters]:
        return read_stats(self.http_url, self.key, {m: self.versions[m] for m in models if m in self.versions})


@dataclass
class WarmupResult:
    warm: bool
    rounds: int
    requests: int
    seconds: float
    judgement: Judgement | None
    reason: str = ""  # why it did not run or stopped early

    def text(self) -> str:
        if self.reason and self.rounds == 0:
            return f"warm-up skipped: {self.reason}"
        head = (f"warm after {self.rounds} round(s)" if self.warm
                else f"not warm after {self.rounds} round(s)" + (f" ({self.reason})" if self.reason else ""))
        fig = self.judgement.text() if self.judgement else ""
        return f"{head}, {self.requests} requests in {self.seconds:.1f}s" + (f": {fig}" if fig else "")


def warm_up(client, new: Endpoint, reference: Endpoint | None, configs: Mapping[str, Mapping], golden,
            config: WarmupConfig, models: Sequence[str] | None = None,
            progress: Callable[[str], None] = lambda msg: None) -> WarmupResult:
    """Warm up the instance ``client`` (a ``RecClient`` on its own port) reaches and ``new`` reads statistics
    of, judged against ``reference`` (None: none serves). ``configs``: model -> the config Triton serves on the
    new instance; ``golden``: the fleet's ``Golden`` or ``SpecGolden`` (its requests); ``models``: the composing
    models to judge (the ones just loaded; None: all of the targets' steps). ``progress`` gets one line a round."""
    t0 = time.monotonic()
    if config.rounds <= 0:
        return WarmupResult(True, 0, 0, 0.0, None, "switched off (rounds 0)")
    targets = golden_targets(golden, configs)
    judged = {s for t in targets for s in t.steps if models is None or s in models}
    judged = {s for s in judged if s in new.versions}
    targets = [t for t in targets if judged & set(t.steps)]
    if not targets:
        return WarmupResult(True, 0, 0, 0.0, None, "no client-facing model uses the models loaded")
    threads = min(MAX_THREADS, max(instance_count(configs.get(s, {})) for s in judged))
    per_size = {(t.model, b): t.requests(b) for t in targets for b in t.batches}

    def round_calls(rnd: int) -> list[Callable]:
        """``threads`` requests per model and batch size (one per model instance), the next golden requests each
        round: every instance and size runs real data while the burst stays small beside the serving instances
        (on a 2-core host a round of every golden request at every size cost the one instance serving alone)."""
        return [reqs[(rnd * threads + i) % len(reqs)] for reqs in per_size.values() if reqs for i in range(threads)]

    deadline = t0 + config.deadline_s
    before = new.read(sorted(judged))
    ref_start = reference.read(sorted(judged)) if reference is not None else {}
    own_best: dict[str, float] = {}
    sent = 0
    last: Judgement | None = None
    reason = ""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="warmup") as pool:
        for rnd in range(1, config.rounds + 1):
            if time.monotonic() > deadline:
                reason = f"deadline {config.deadline_s:g}s"
                return WarmupResult(False, rnd - 1, sent, time.monotonic() - t0, last, reason)
            calls = round_calls(rnd - 1)
            errors = [f.exception() for f in [pool.submit(c, client) for c in calls]]
            sent += len(calls)
            failed = [e for e in errors if e is not None]
            now = new.read(sorted(judged))
            round_delta = deltas(now, before)
            before = now
            ref_now = reference.read(sorted(judged)) if reference is not None else {}
            ref = reference_counters(deltas(ref_now, ref_start), ref_now)
            last = judge(round_delta, ref, config.ratio, sorted(judged), own_best)
            for m in judged:  # this round as the yardstick of the next: every executions of the same requests
                c = round_delta.get(m)
                n = sum(v[0] for v in c.batches.values()) if c is not None else 0
                if n > 0:
                    mine = sum(v[1] for v in c.batches.values()) / n / 1e3
                    own_best[m] = min(mine, own_best.get(m, mine))
            progress(f"warm-up round {rnd}/{config.rounds}: {len(calls)} requests"
                     + (f", {len(failed)} failed ({str(failed[0])[:120]})" if failed else "")
                     + f"; {'warm' if last.warm else 'not warm'}: {last.text()}")
            if failed:
                reason = f"{len(failed)} warm-up requests failed: {str(failed[0])[:200]}"
                continue
            if last.warm:
                return WarmupResult(True, rnd, sent, time.monotonic() - t0, last)
    return WarmupResult(False, config.rounds, sent, time.monotonic() - t0, last, reason)


def served_configs(server, tops: Sequence[str]) -> dict[str, dict]:
    """model -> the config Triton serves (``TritonServer.model_config``) for ``tops`` and every model their
    ensembles use; a model that does not answer is left out (and so out of the plan)."""
    out: dict[str, dict] = {}
    todo = list(tops)
    while todo:
        m = todo.pop()
        if m in out:
            continue
        try:
            out[m] = server.model_config(m)
        except Exception:  # noqa: BLE001 - TritonError, or no answer at all
            continue
        todo += [s["model_name"] for s in ((out[m].get("ensemble_scheduling") or {}).get("step") or [])]
    return out


def top_models(golden) -> list[str]:
    """The client-facing models a fleet's golden checks ask: the spec's models, else the demo's two."""
    spec = getattr(golden, "spec", None)
    return list(spec.models) if spec is not None else ["recommend", "search"]


def warm_up_instance(server, client, stats_key: str | None, versions: Mapping[str, Sequence[int]],
                     reference: Endpoint | None, golden, config: WarmupConfig, only: Sequence[str] | None = None,
                     progress: Callable[[str], None] = lambda msg: None) -> WarmupResult:
    """``warm_up`` for one Triton (``server``: a ``TritonServer`` handle, its served configs and statistics) that
    serves ``versions`` (model -> versions; the newest is judged), through ``client`` on its own port: the local
    fleet's and the Kubernetes operator's one call."""
    if config.rounds <= 0:
        return WarmupResult(True, 0, 0, 0.0, None, "switched off (rounds 0)")
    configs = served_configs(server, top_models(golden))
    new = Endpoint(server.http_url, stats_key, {m: max(v) for m, v in versions.items() if v})
    return warm_up(client, new, reference, configs, golden, config, only, progress)
