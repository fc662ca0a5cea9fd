"""One suite run's state and measurements: load points, sweeps, capacity ladders, ratio bookkeeping, report.json.

Why apart from the runner: the ratio protocols (perf/ratios.py) and the tuner (perf/tune.py) measure through
this object's public methods; the runner (perf/runner.py) only owns lifecycle (servers up, steps, stop).
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from rich.markup import escape

from recserve.control.runtime.triton import DEFAULT_REPOSITORY, TritonError, TritonServer
from recserve.perf import analyzer, figures, inputs, metrics
from recserve.perf.console import console
from recserve.perf.suite import RatioSpec, Suite, Target
from recserve.perf.targets import Endpoint

ONNX_MODELS = ("retrieval", "ranker", "search_model")
#: Stop a concurrency sweep once p99 passes this multiple of the SLO: higher points only queue.
SWEEP_CUTOFF = 3.0
#: Halvings tried below a capacity ladder whose lowest rate already failed.
DESCEND_STEPS = 2


@dataclass
class RunRecord:
    """One load point as it goes into report.json."""

    target: str
    model: str
    via: str
    mode: str
    value: float
    batch_size: int
    variant: str = "committed"
    infer_per_sec: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    #: the tail beyond p99 (issue 22): p99.9, and the requests slower than 4x the suite's SLO
    p999_ms: float = 0.0
    over_4x_slo: int = 0
    requests: int = 0
    stalls: int = 0
    client_queue_us: float = 0.0
    client_compute_us: float = 0.0
    server: dict = field(default_factory=dict)
    rss_mib: dict = field(default_factory=dict)
    #: CPU milliseconds per request spent by tritonserver, its Python stubs and perf_analyzer itself.
    cpu_ms_per_request: dict = field(default_factory=dict)
    csv: str = ""
    error: str | None = None

    def row(self) -> analyzer.Row:
        """Back to the analyzer's row type, for the figure functions."""
        return analyzer.Row(
            infer_per_sec=self.infer_per_sec,
            p50_us=self.p50_ms * 1000,
            p90_us=self.p90_ms * 1000,
            p95_us=self.p95_ms * 1000,
            p99_us=self.p99_ms * 1000,
            concurrency=self.value if self.mode == "concurrency" else None,
            request_rate=self.value if self.mode == "rate" else None,
        )


@dataclass
class SuiteRun:
    """State of one suite run; ``doc()`` is report.json."""

    suite: Suite
    out_dir: Path
    repository: Path = DEFAULT_REPOSITORY
    data_dir: Path = inputs.DEFAULT_DATA
    runs: list[RunRecord] = field(default_factory=list)
    ratios: dict[str, dict] = field(default_factory=dict)
    capacity: dict[str, dict] = field(default_factory=dict)
    inprocess: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    transient: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    payloads: dict = field(default_factory=dict)
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    _rate_estimate: dict[str, float] = field(default_factory=dict)
    _files: dict[str, Path] = field(default_factory=dict)
    #: payload rows per model (what perf_analyzer sends; the in-process reference runs the same rows)
    rows: dict[str, list] = field(default_factory=dict)
    #: A run for a serving spec: the report's ``spec`` entry (perf/specsuite.describe); None for the demo's suites.
    spec: dict | None = None

    # ------------------------------------------------------------------ payloads
    def prepare_payloads(self, models: list[str]) -> None:
        """perf_analyzer --input-data JSON per model from the generated data (synthetic fallback)."""
        try:
            corpus = inputs.load_corpus(self.data_dir)
        except inputs.InputError as exc:
            console.print(f"[yellow]{exc}; using the project's generator for payloads[/]")
            corpus = inputs.synthetic_corpus(self.out_dir / "data")
        self.payloads["source"] = corpus.source
        for m in models:
            recipe = m.removesuffix("_trt")
            if recipe not in inputs.TARGETS:
                self.errors.append(f"no payload recipe for model '{m}'")
                continue
            rows = inputs.samples(recipe, corpus, self.suite.payload_rows)
            self.rows[m] = rows
            self._files[m] = inputs.write_input_data(
                rows, self.out_dir / "inputs" / f"{m}.json", inputs.VARIABLE_INPUTS.get(recipe, ())
            )
            if recipe == "recommend":
                self.payloads["recommend_history_length"] = inputs.history_lengths(rows)
        self.payloads["rows_per_model"] = self.suite.payload_rows

    def prepare_spec_payloads(self, spec, models: list[str]) -> None:
        """perf_analyzer --input-data JSON per spec model from its golden requests (data only; more from its
        confirmed input rules when the golden requests are few)."""
        from recserve.perf import specsuite

        self.payloads["source"] = f"serving spec {spec.path} (golden requests, data only)"
        per_model = {}
        for m in models:
            try:
                self.rows[m], per_model[m] = specsuite.payloads(spec.models[m], self.out_dir / "inputs" / f"{m}.json",
                                                                self.suite.payload_rows)
            except ValueError as exc:
                self.errors.append(f"no perf inputs for spec model '{m}': {exc}")
                continue
            self._files[m] = Path(per_model[m]["file"])
        self.payloads["models"] = per_model

    # ------------------------------------------------------------------ one load point
    def measure(
        self,
        ep: Endpoint,
        target: str,
        model: str,
        mode: str,
        value: float,
        batch_size: int,
        variant: str = "committed",
        probing: bool = False,
    ) -> RunRecord:
        """One perf_analyzer run with metric deltas and peak RSS around it; errors land in the record.

        ``probing``: a capacity probe past the knee, where failed requests (queue timeouts, rejections) are
        the finding, not an error of the suite; they are reported with the capacity, not in ``errors``.
        """
        rec = RunRecord(target, model, ep.via, mode, value, batch_size, variant)
        seconds = self.suite.seconds_per_point
        if mode == "rate":
            count = max(20, int(value * seconds), int(value) + 1)  # perf_analyzer refuses count < rate
        else:
            count = max(20, int(self._rate_estimate.get(model, 100.0) * seconds))
        tag = f"{target}_{variant}_{ep.via}_{mode}{value:g}".replace("/", "_")
        csv_path = self.out_dir / "csv" / f"{tag}.csv"
        point = analyzer.LoadPoint(
            model,
            ep.grpc_url,
            mode,
            value,
            batch_size=batch_size,
            input_data=self._files.get(model),
            request_count=count,
            timeout_s=max(60.0, seconds * 20),
            headers=ep.headers,
            slow_ms=4 * self.suite.slo_for(model),
        )
        before = [metrics.scrape(u) for u in ep.metrics_urls]
        sampler = metrics.RssSampler(list(ep.pids)).__enter__()  # peaks of the servers behind this endpoint
        cpu0, client0, proxy0 = metrics.tree_cpu_s(ep.pids), metrics.children_cpu_s(), metrics.cpu_s(ep.proxy_pids)
        try:
            row = analyzer.run(point, csv_path)
        except (analyzer.PerfAnalyzerError, ValueError) as exc:
            sampler.__exit__(None, None, None)
            rec.error = str(exc)
            if not probing:
                self.errors.append(f"{target} [{variant}, {ep.via}, {mode} {value:g}]: {exc}")
            console.print(f"  [{'yellow' if probing else 'red'}]{target} {mode} {value:g}: {escape(str(exc))}[/]")
            self.runs.append(rec)
            return rec
        sampler.__exit__(None, None, None)
        cpu1, client1, proxy1 = metrics.tree_cpu_s(ep.pids), metrics.children_cpu_s(), metrics.cpu_s(ep.proxy_pids)
        after = [metrics.scrape(u) for u in ep.metrics_urls]
        if row.requests:
            per = 1000.0 / row.requests
            spent = metrics.cpu_delta(cpu0, cpu1)
            rec.cpu_ms_per_request = {
                "server": round(spent["server"] * per, 3),
                "stubs": round(spent["stubs"] * per, 3),
                "perf_analyzer": round((client1 - client0) * per, 3),
            }
            if ep.proxy_pids:
                rec.cpu_ms_per_request["haproxy"] = round((proxy1 - proxy0) * per, 3)
        server: dict[str, dict] = {}
        for b, a in zip(before, after, strict=True):
            for name, figs in metrics.deltas(b, a).items():
                server[name] = asdict(figs) | {"avg_batch": round(figs.avg_batch, 2)}
        rec.infer_per_sec = round(row.infer_per_sec, 2)
        rec.p50_ms, rec.p90_ms, rec.p95_ms, rec.p99_ms = (
            round(x / 1000, 3) for x in (row.p50_us, row.p90_us, row.p95_us, row.p99_us)
        )
        rec.requests, rec.stalls = row.requests, row.stalls
        rec.p999_ms, rec.over_4x_slo = round(row.p999_us / 1000, 3), row.slow
        rec.client_queue_us, rec.client_compute_us = row.server_queue_us, row.server_compute_infer_us
        rec.server = server
        rec.rss_mib = asdict(sampler.peaks)
        rec.csv = str(csv_path.relative_to(self.out_dir))
        if mode == "concurrency":  # requests/s seen last: sizes the next point to about seconds_per_point
            self._rate_estimate[model] = max(10.0, row.infer_per_sec / batch_size)
        console.print(
            f"  {target:<24} {variant:<20} {ep.via:<8} {mode:<11} {value:>7g}  "
            f"{rec.infer_per_sec:>9.1f} infer/s  p50 {rec.p50_ms:7.2f} ms  p99 {rec.p99_ms:7.2f} ms"
        )
        self.runs.append(rec)
        return rec

    def sweep(
        self,
        ep: Endpoint,
        target: str,
        model: str,
        values: tuple[int, ...],
        batch_size: int,
        variant: str = "committed",
    ) -> list[RunRecord]:
        """Concurrency sweep, stopped at a repeated error or once p99 is far past the SLO.

        A point whose perf_analyzer run failed is measured once more: perf_analyzer aborts on the first
        failed request, and one request timed out by a scheduler stall should not cost the sweep. The
        first failure stays in the report (``transient_failures``); a second one is an error.
        """
        out = []
        for c in values:
            rec = self.measure(ep, target, model, "concurrency", c, batch_size, variant, probing=True)
            if rec.error:
                first = rec.error
                rec = self.measure(ep, target, model, "concurrency", c, batch_size, variant, probing=True)
                where = f"{target} [{variant}, {ep.via}, concurrency {c:g}]"
                if rec.error:
                    self.errors.append(f"{where}: {rec.error}")
                else:
                    self.transient.append(f"{where} (passed when re-measured): {first}")
            out.append(rec)
            if rec.error or rec.p99_ms > SWEEP_CUTOFF * self.suite.slo_for(model):
                break
        return [r for r in out if not r.error]

    # ------------------------------------------------------------------ targets
    def run_target(self, t: Target, ep: Endpoint) -> None:
        conc = self.sweep(ep, t.name, t.model, t.concurrency, t.batch_size) if t.concurrency else []
        rates = list(t.rate)
        if t.capacity and conc:
            rates = sorted(
                set(rates)
                | set(figures.rate_ladder(figures.saturation(r.row() for r in conc), t.capacity, t.batch_size))
            )
        rate_rows, retried, refused = [], [], None
        for r in rates:
            rec = self.measure(ep, t.name, t.model, "rate", r, t.batch_size, probing=bool(rate_rows))
            if rec.error and not rate_rows:
                break  # the first rate of the ladder failing is an error of the run, reported as such
            if rec.error or self._violates(rec, r * t.batch_size):
                # A violation must repeat to count: a neighbour's burst on a shared host is not capacity.
                retried.append(r)
                again = self.measure(ep, t.name, t.model, "rate", r, t.batch_size, "retry", probing=True)
                if not again.error and not self._violates(again, r * t.batch_size):
                    rec = again
            if rec.error:  # requests failed at this rate (queue timeouts/rejections): past capacity
                refused = {"rate": r, "why": rec.error}
                break
            rate_rows.append(rec.row())
            if self._violates(rec, r * t.batch_size):
                break  # past capacity: higher rates only add queueing
        for _ in range(DESCEND_STEPS):  # the lowest rate failed: walk down instead of reporting 0
            if not rate_rows or not self._violates_row(rate_rows[0], t.batch_size, t.model):
                break
            r = max(1.0, round((rate_rows[0].request_rate or 2.0) / 2))
            if r >= (rate_rows[0].request_rate or 0):
                break
            rec = self.measure(ep, t.name, t.model, "rate", r, t.batch_size, "descend")
            if rec.error:
                break
            rate_rows.insert(0, rec.row())
            if not self._violates(rec, r * t.batch_size):
                break
        if rate_rows:
            cap = figures.capacity(
                [analyzer.Row(**{**asdict(x), "infer_per_sec": x.infer_per_sec / t.batch_size}) for x in rate_rows],
                self.suite.slo_for(t.model),
            )
            entry = {"model": t.model, "via": t.via, **asdict(cap), "retried_rates": retried}
            if refused and cap.first_violation_rps is None:
                entry["first_violation_rps"] = refused["rate"]
                entry["reason"] = f"requests failed at {refused['rate']:g}/s: {refused['why'][-300:]}"
            self.capacity[t.name] = entry

    def _violates(self, rec: RunRecord, offered_ips: float) -> bool:
        return rec.p99_ms > self.suite.slo_for(rec.model) or rec.infer_per_sec < figures.KEEP_UP * offered_ips

    def _violates_row(self, row: analyzer.Row, batch_size: int, model: str) -> bool:
        offered = (row.request_rate or 0.0) * batch_size
        return row.p99_ms > self.suite.slo_for(model) or row.infer_per_sec < figures.KEEP_UP * offered

    # ------------------------------------------------------------------ ratio bookkeeping
    def record_ratio(self, name: str, value: float | None, target: float | None, spec: RatioSpec, detail: dict) -> None:
        self.ratios[name] = {
            "value": None if value is None else round(value, 3),
            "target": target,
            "meets_target": None if value is None or target is None else value >= target,
            "model": spec.model,
            "batch_size": spec.batch_size,
            "concurrency": list(spec.concurrency),
            **detail,
        }
        shown = "n/a (a side failed)" if value is None else f"{value:.3f}"
        console.print(f"[bold]{name}[/] = {shown}" + (f" (target >= {target})" if target else ""))

    def skip_ratio(self, name: str, why: str) -> None:
        self.ratios[name] = {"value": None, "skipped": why}
        self.skipped.append(f"{name}: {why}")
        console.print(f"[yellow]{name} skipped: {why}[/]")

    # ------------------------------------------------------------------ versions
    def collect_versions(self, server: TritonServer | None) -> None:
        v: dict = {
            "client": _pkg("tritonclient"),
            "perf_analyzer": analyzer.version(),
            "onnxruntime": _pkg("onnxruntime"),
            "python": platform.python_version(),
            "host": {"cpus": _cpus(), "machine": platform.machine()},
        }
        if server is not None and server.is_alive():
            try:
                v["server"] = server.server_metadata().get("version")
            except TritonError as exc:
                v["server"] = f"unknown ({exc})"
            models = {}
            for name, versions in server.loaded_versions().items():
                entry: dict = {"versions": versions}
                manifest = self.repository / name / str(versions[-1]) / "manifest.json"
                if manifest.exists():
                    try:
                        entry["manifest"] = json.loads(manifest.read_text())
                    except ValueError:
                        entry["manifest"] = "unreadable"
                models[name] = entry
            v["models"] = models
        self.versions = v

    # ------------------------------------------------------------------ report
    def doc(self) -> dict:
        cap_by_model = {}
        for c in self.capacity.values():
            if c["via"] == "direct" and c["model"] not in cap_by_model:
                cap_by_model[c["model"]] = c["capacity_rps"]
        extra = {} if self.spec is None else {"spec": self.spec}
        return {
            **extra,
            "suite": self.suite.name,
            "suite_file": str(self.suite.path),
            "started": self.started,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "slo_ms": self.suite.slo_ms,
            "versions": self.versions,
            "payloads": self.payloads,
            "ratios": self.ratios,
            "capacity_rps": cap_by_model,
            "capacity": self.capacity,
            "inprocess": self.inprocess,
            "runs": [asdict(r) for r in self.runs],
            "errors": self.errors,
            "transient_failures": self.transient,
            "skipped": self.skipped,
        }


def _pkg(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))
