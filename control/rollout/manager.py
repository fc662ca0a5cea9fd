"""Metric-gated rollovers (canary, blue-green) and rollbacks of one model's version across the fleet.

Every phase is written to the rollout journal before it acts, and an instance's record names the versions it
may serve before they are loaded, so a control plane killed at any point can finish (after ``promote``) or roll
back (before it) on restart, and no instance serves a version the state does not record.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from recserve.control.fleet.fleet import FleetError
from recserve.control.fleet.pool import ServingPool
from recserve.control.monitoring.metrics import triton_request_counts
from recserve.control.state.snapshots import verify_version, versions_on_disk
from recserve.control.state.store import RolloutRecord
from recserve.control.stats import percentile
from recserve.control.testswitch import broken

PHASES = ("validate", "baseline", "load", "shift", "bake", "promote", "rollback", "done")
STRATEGIES = ("canary", "blue-green")


@dataclass
class Gates:
    max_error_rate: float = 0.01
    max_p99_ratio: float = 3.0
    min_p99_ms: float = 50.0
    min_answer_overlap: float = 0.3

    @classmethod
    def from_dict(cls, d: dict | None, base: Gates | None = None) -> Gates:
        """``base`` (the serving spec's gates for the model, else the defaults) with the request's set values."""
        g = replace(base) if base is not None else cls()
        for k, v in (d or {}).items():
            if v:  # proto3 zero = not set: keep the default
                setattr(g, k, float(v))
        if not 0 <= g.max_error_rate <= 1:
            raise FleetError(f"gates.max_error_rate must be within 0..1, got {g.max_error_rate}", "INVALID_ARGUMENT")
        if g.min_answer_overlap > 1:
            raise FleetError(f"gates.min_answer_overlap must be <= 1 (-1 disables), got {g.min_answer_overlap}",
                             "INVALID_ARGUMENT")
        if g.max_p99_ratio < 1:
            raise FleetError(f"gates.max_p99_ratio must be >= 1, got {g.max_p99_ratio}", "INVALID_ARGUMENT")
        return g


class GateFailure(Exception):
    def __init__(self, gate: str, value: float, threshold: float, message: str = ""):
        super().__init__(message or f"gate {gate} failed: {value:.4g} > {threshold:.4g}")
        self.gate, self.value, self.threshold = gate, value, threshold


def candidate(recs: list) -> object | None:
    """Who takes the new version first: a healthy standby, else (active-active) a healthy active that is not
    the primary (it leaves the pool for the canary: the rest of the pool keeps serving)."""
    return (next((r for r in recs if r.role == "standby" and r.state == "healthy"), None)
            or next((r for r in recs if r.role == "active" and r.state == "healthy"), None))


def p99(samples: list[float]) -> float:
    """p99 of the gate's probe latencies (control.stats' rule), never decided by one probe; 0 when there are none.

    A bake step sends tens of probes, and the nearest-rank p99 of fewer than 100 is their maximum: one request the
    host held (Triton 2.51 here holds an occasional request ~0.5 s: a clean-clone CI run rolled back a byte-
    identical canary on p99 22x its baseline) would roll a good version back. So the second-slowest probe is the
    most the figure can be: a slow version is slow on more than one probe."""
    p = percentile(samples, 99) or 0.0
    return min(p, sorted(samples)[-2]) if len(samples) >= 2 else p


class RolloutManager:
    """Runs at most one rollout at a time, each in its own thread; ``events`` are read from the journal."""

    def __init__(self, fleet: ServingPool, probe_interval_s: float = 0.05):
        self.fleet = fleet
        self.state = fleet.state
        self.probe_interval_s = probe_interval_s
        self._abort: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        #: Called with every finished rollout record (the backup scheduler backs up after a rollover).
        self.listeners: list[Callable[[RolloutRecord], None]] = []

    # ------------------------------------------------------------------ validation
    def validate(self, model: str, version: int, strategy: str, steps: list[int], bake: float) -> None:
        f = self.fleet
        if model not in f.model_closure():
            raise FleetError(f"unknown model {model!r}: the fleet serves {f.model_closure()}", "NOT_FOUND")
        if model not in f.versioned_models():
            raise FleetError(f"model {model!r} has no built versions with manifests; rollouts move "
                             f"{f.versioned_models()}", "INVALID_ARGUMENT")
        if version not in versions_on_disk(f.repository, model):
            raise FleetError(f"unknown version {version} of model {model!r} (on disk: "
                             f"{versions_on_disk(f.repository, model)})", "NOT_FOUND")
        info = verify_version(f.repository, model, version)
        if not info.verified:
            raise FleetError(f"model {model!r} version {version} fails verification: {info.problem}",
                             "FAILED_PRECONDITION")
        if f.desired().get(model) == [version]:
            raise FleetError(f"model {model!r} is already at version {version}", "ALREADY_EXISTS")
        if strategy not in STRATEGIES:
            raise FleetError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}", "INVALID_ARGUMENT")
        if strategy == "canary":
            if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)) or steps[-1] != 100:
                raise FleetError(f"steps must be increasing percentages in 1..100 ending at 100, got {steps}",
                                 "INVALID_ARGUMENT")
        if not 0 <= bake <= 3600:
            raise FleetError(f"bake_seconds must be within 0..3600, got {bake}", "INVALID_ARGUMENT")
        running = self.state.running_rollouts()
        if running:
            r = running[0]
            raise FleetError(f"rollout {r.id} of {r.model} to version {r.to_version} is still running "
                             f"(phase {r.phase})", "FAILED_PRECONDITION")
        recs = self.state.instances()
        if not any(r.role == "primary" and r.state == "healthy" for r in recs):
            raise FleetError("no healthy primary: a rollout needs a serving primary to compare with",
                             "FAILED_PRECONDITION")
        if candidate(recs) is None:
            raise FleetError("no healthy standby (or second active) to take the new version first",
                             "FAILED_PRECONDITION")
        if f.shedding():
            raise FleetError("the pool is shedding load: a rollout would take capacity away; retry when the "
                             "peak is over", "UNAVAILABLE")

    def _spec_gates(self, model: str) -> Gates | None:
        """The serving spec's p99 and error-rate gates for ``model`` (the strictest of the models using it)."""
        spec = getattr(self.fleet, "spec", None)  # a Fleet started with --spec; the kube pool when it has one
        found = spec.rollout_gates(model) if spec is not None else None
        if found is None:
            return None
        return Gates(max_error_rate=found.error_rate_max, min_p99_ms=found.p99_ms)

    # ------------------------------------------------------------------ public API
    def start(self, model: str, version: int, strategy: str = "canary", steps: list[int] | None = None,
              bake: float = 5.0, gates: dict | None = None) -> str:
        strategy = strategy or "canary"
        steps = list(steps or ([10, 50, 100] if strategy == "canary" else [100]))
        spec_gates = self._spec_gates(model)
        g = Gates.from_dict(gates, spec_gates)
        with self._lock:
            self.validate(model, version, strategy, steps, bake)
            f = self.fleet
            prim = next(r for r in self.state.instances() if r.role == "primary")
            rid = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
            rec = RolloutRecord(id=rid, model=model, from_version=f.desired()[model][-1], to_version=version,
                                strategy=strategy, steps=steps, bake_seconds=bake, gates=asdict(g), phase="validate",
                                status="running", started=time.time())
            self.state.save_rollout(rec)
            self.state.add_rollout_event(rid, "validate", f"{model} {rec.from_version} -> {version} ({strategy}); "
                                         f"primary {prim.id}; gates: error rate <= {g.max_error_rate:.2%}, p99 over "
                                         f"{g.min_p99_ms:g} ms and {g.max_p99_ratio:g}x the old version's, answer "
                                         f"overlap >= {g.min_answer_overlap:g} (defaults from "
                                         f"{'the serving spec' if spec_gates else 'recserve'})")
            self._abort[rid] = threading.Event()
            t = threading.Thread(target=self._run, args=(rid,), name=f"rollout-{rid}", daemon=True)
            self._threads[rid] = t
            t.start()
        return rid

    def wait(self, rid: str, timeout: float | None = None) -> RolloutRecord:
        t = self._threads.get(rid)
        if t is not None:
            t.join(timeout)
        return self.state.rollout(rid)

    def rollback(self, model: str, timeout: float = 120.0) -> RolloutRecord:
        """Abort a running rollout of ``model``, or return the fleet to the version before the last rollout."""
        f = self.fleet
        if model not in f.model_closure():
            raise FleetError(f"unknown model {model!r}: the fleet serves {f.model_closure()}", "NOT_FOUND")
        for r in self.state.running_rollouts():
            if r.model == model:
                ev = self._abort.get(r.id)
                if ev is None:
                    raise FleetError(f"rollout {r.id} is running but not owned by this process", "UNAVAILABLE")
                ev.set()
                return self.wait(r.id, timeout)
        last = self.state.latest_rollout(model)
        if last is None or last.status != "succeeded" or f.desired().get(model) != [last.to_version]:
            raise FleetError(f"nothing to roll back for {model!r}: no completed rollout to undo "
                             f"(desired {f.desired().get(model)})", "FAILED_PRECONDITION")
        target = [last.from_version]
        verify = verify_version(f.repository, model, last.from_version)
        if not verify.verified:
            raise FleetError(f"cannot roll back to {model} version {last.from_version}: {verify.problem}",
                             "FAILED_PRECONDITION")
        rid = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-rb{uuid.uuid4().hex[:4]}"
        rec = RolloutRecord(id=rid, model=model, from_version=last.to_version, to_version=last.from_version,
                            strategy="rollback", steps=[100], bake_seconds=0, gates={}, phase="promote",
                            status="running", started=time.time())
        self.state.save_rollout(rec)
        with f.lock:
            f.state.set_desired(model, target, last_good=target)
        self._emit(rec, "promote", f"rolling every instance back to {model} version {last.from_version}")
        self._reload_all(rec, exclude=set())
        self._finish(rec, "succeeded", "done", f"{model} back at version {last.from_version} on every instance")
        return self.state.rollout(rid)

    # ------------------------------------------------------------------ the run
    def _emit(self, rec: RolloutRecord, phase: str, message: str, weight: int = 0, gates: dict | None = None,
              status: str = "running") -> None:
        rec.phase = phase
        self.state.save_rollout(rec)
        self.state.add_rollout_event(rec.id, phase, message, weight, gates, status)
        self.fleet.metrics.set_phase(rec.model, phase, PHASES)
        for k, v in (gates or {}).items():
            self.fleet.metrics.gate_value.labels(rec.model, k).set(v)

    def _finish(self, rec: RolloutRecord, status: str, phase: str, message: str) -> None:
        rec.status = status
        rec.finished = time.time()
        self._emit(rec, phase, message, status=status)
        self.fleet.metrics.rollout_results.labels(rec.model, status).inc()
        self.fleet.metrics.set_phase(rec.model, "done", PHASES)
        for listener in self.listeners:
            listener(rec)

    def _run(self, rid: str) -> None:
        rec = self.state.rollout(rid)
        f = self.fleet
        g = Gates(**rec.gates)
        prim = next(r for r in self.state.instances() if r.role == "primary")
        cand = candidate(self.state.instances())
        rec.canary = cand.id
        new_versions = {**cand.versions, rec.model: [rec.to_version]}
        try:
            self._emit(rec, "baseline", f"measuring baseline p99 on primary {prim.id}")
            base = self._measure(prim.id, 3.0, None)
            base_p99 = base["p99_ms"]
            self._emit(rec, "load", f"loading {rec.model} {rec.to_version} on {cand.id} (baseline p99 "
                       f"{base_p99:.1f} ms)", gates={"baseline_p99_ms": base_p99})
            with f.lock:
                self.state.update_instance(cand.id, role="canary")
                f.metrics.set_role(cand.id, "canary")
                f.ensure_canary_out(cand.slot)
            f.canary_broken.pop(cand.id, None)
            try:
                f.reload(cand.id, new_versions, only=[rec.model])
            except Exception as exc:
                raise GateFailure("load", 1, 0, f"{cand.id} could not serve the new version: {exc}") from exc
            model, overlap, minimum = self._answer_overlap(prim.id, cand.id, g.min_answer_overlap)
            self._emit(rec, "load", f"{cand.id} serves {rec.model} {rec.to_version}; golden answers agree "
                       f"{overlap:.0%} with {prim.id}" + (f" ({model}, the least)" if model else ""),
                       gates={"answer_overlap": overlap})
            if overlap < minimum:
                self._gate_failed(rec, GateFailure(
                    "answer_overlap", overlap, minimum,
                    f"the new version's golden answers of {model} agree only {overlap:.0%} with the current "
                    f"version's (minimum {minimum:.0%})"))
            if rec.strategy == "canary":
                f.traffic.set_weight(prim.slot, 100)
                f.traffic.set_weight(cand.slot, 0)
                with f.lock:
                    f.traffic.route("split")
                for pct in rec.steps:
                    self._abort_check(rec)
                    self._wait_not_shedding(rec)
                    f.traffic.set_weight(cand.slot, pct)
                    f.traffic.set_weight(prim.slot, 100 - pct)
                    self._emit(rec, "shift", f"{pct}% of traffic on {cand.id}", weight=pct)
                    vals = self._bake(rec, cand.id, g, base_p99, ref_iid=prim.id)
                    self._emit(rec, "bake", f"step {pct}% green: {self._fmt(vals)}", weight=pct, gates=vals)
            else:
                self._wait_not_shedding(rec)
                with f.lock:
                    f.route_first(cand.slot)
                self._emit(rec, "shift", f"all traffic on {cand.id}; {prim.id} keeps version "
                           f"{rec.from_version} as the instant rollback target", weight=100)
                vals = self._bake(rec, cand.id, g, base_p99, ref_iid=prim.id)
                self._emit(rec, "bake", f"green: {self._fmt(vals)}", weight=100, gates=vals)
            self._promote(rec, cand.id)
        except GateFailure as gf:
            rec.failed_gate, rec.failed_value, rec.threshold = gf.gate, gf.value, gf.threshold
            self._rollback_run(rec, prim.id, cand.id, str(gf))
        except Exception as exc:  # anything unexpected: roll back, and say why
            rec.failed_gate, rec.failed_value, rec.threshold = "error", 1, 0
            self._rollback_run(rec, prim.id, cand.id, f"unexpected error: {exc!r}")
        finally:
            self._abort.pop(rid, None)

    def _wait_not_shedding(self, rec: RolloutRecord, max_wait_s: float = 120.0) -> None:
        """Pause (before shifting more traffic) while the pool sheds load; roll back after ``max_wait_s``."""
        f = self.fleet
        if not f.shedding():
            return
        self._emit(rec, rec.phase, "paused: the pool is shedding load")
        deadline = time.monotonic() + max_wait_s
        while f.shedding():
            self._abort_check(rec)
            if time.monotonic() > deadline:
                raise GateFailure("shedding", 1, 0, f"the pool kept shedding for {max_wait_s:.0f}s")
            time.sleep(0.2)
        self._emit(rec, rec.phase, "resumed: the pool no longer sheds")

    def _abort_check(self, rec: RolloutRecord) -> None:
        ev = self._abort.get(rec.id)
        if ev is not None and ev.is_set():
            raise GateFailure("operator", 1, 0, "rollback requested by the operator")

    def _answer_overlap(self, ref_iid: str, new_iid: str, default_min: float) -> tuple[str, float, float]:
        """(model, agreement, its minimum) of the model whose golden answers on ``new_iid`` agree least with
        ``ref_iid``'s, measured by the golden checker (its drift rule per model; ``default_min`` where it has none)."""
        f = self.fleet
        pairs = []
        for reqs in f.golden.request_set:
            try:
                pairs.append((f.golden.ask(f.client(ref_iid), reqs), f.golden.ask(f.client(new_iid), reqs)))
            except Exception as exc:  # tritonclient's own exception types
                raise GateFailure("golden", 1, 0, f"golden request failed during the answer comparison: "
                                  f"{str(exc)[:200]}") from exc
        drift = f.golden.drift(pairs, default_min)
        if not drift:
            return "", 1.0, default_min
        model = min(drift, key=lambda m: drift[m][0] - drift[m][1])
        return model, *drift[model]

    @staticmethod
    def _fmt(vals: dict) -> str:
        return ", ".join(f"{k}={v:.4g}" for k, v in vals.items())

    def _measure(self, iid: str, seconds: float, expected) -> dict:
        """Golden probes straight to one instance: latency p99 and how many failed or answered wrongly."""
        f = self.fleet
        client = f.client(iid)
        lat, bad, n = [], 0, 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                got = f.golden.ask(client, f.golden.requests)
                ok = not f.golden.compare(got, expected)
            except Exception:
                ok = False
            lat.append((time.monotonic() - t0) * 1000)
            n += 1
            bad += 0 if ok else 1
            time.sleep(self.probe_interval_s)
        return {"p99_ms": p99(lat), "probes": n, "probe_failures": bad, "latencies": lat}

    def _bake(self, rec: RolloutRecord, iid: str, g: Gates, base_p99: float, ref_iid: str | None = None) -> dict:
        """Watch the gates on ``iid`` for the bake time; raise GateFailure as soon as one is red.

        The p99 reference is the pre-rollout baseline, raised to the p99 that ``ref_iid`` (the old version)
        shows over the same window when the whole host got slower: on a shared 2-core machine, contention
        that slows both versions alike is not a regression of the new one.
        """
        f = self.fleet
        inst = self.state.instance(iid)
        expected = f.golden.expected(inst.versions)
        if expected is None:  # nothing to judge the answers by: the gate cannot pass (never self-reference)
            raise GateFailure("golden", 1, 0, f"no expected golden answers for {iid}'s versions: "
                              f"{f.golden.problem(inst.versions)}")
        metrics_url = f.metrics_url(iid)
        start_counts = triton_request_counts(metrics_url) or (0.0, 0.0)
        lat: list[float] = []
        ref_lat: list[float] = []
        probes = bad = 0
        end = time.monotonic() + rec.bake_seconds
        vals: dict[str, float] = {}
        while True:
            self._abort_check(rec)
            if iid in f.canary_broken:
                raise GateFailure("health", 1, 0, f"deep health marked {iid} broken: {f.canary_broken[iid]}")
            m = self._measure(iid, min(0.5, max(0.0, end - time.monotonic())) or 0.05, expected)
            lat += m["latencies"]
            if ref_iid is not None:
                ref_lat += self._measure(ref_iid, 0.2, None)["latencies"]
            probes += m["probes"]
            bad += m["probe_failures"]
            counts = triton_request_counts(metrics_url)
            d_ok, d_bad = ((counts[0] - start_counts[0], counts[1] - start_counts[1]) if counts else (0.0, 0.0))
            total = probes + d_ok + d_bad
            err = (bad + d_bad) / total if total else 0.0
            cur = p99(lat)
            ref = max(base_p99, p99(ref_lat))
            ratio = cur / ref if ref > 0 else 1.0
            vals = {"error_rate": err, "p99_ms": cur, "p99_ratio": ratio, "reference_p99_ms": ref,
                    "requests": total, "failed": bad + d_bad}
            for k, v in vals.items():
                f.metrics.gate_value.labels(rec.model, k).set(v)
            if ((bad + d_bad) >= 3 or (total >= 20 and err > g.max_error_rate)) and err > g.max_error_rate \
                    and not broken("no-gates"):
                raise GateFailure("error_rate", err, g.max_error_rate,
                                  f"error rate {err:.3%} > {g.max_error_rate:.3%} ({bad + d_bad}/{total:.0f})")
            if time.monotonic() >= end:
                break
        if err > g.max_error_rate and total > 0:
            self._gate_failed(rec, GateFailure("error_rate", err, g.max_error_rate, f"error rate {err:.3%} > "
                                               f"{g.max_error_rate:.3%} ({bad + d_bad}/{total:.0f})"))
        if cur > g.min_p99_ms and ratio > g.max_p99_ratio:
            self._gate_failed(rec, GateFailure("p99_ratio", ratio, g.max_p99_ratio,
                                               f"p99 {cur:.1f} ms is {ratio:.2f}x the reference {ref:.1f} ms "
                                               f"(baseline {base_p99:.1f} ms)"))
        return vals

    def _gate_failed(self, rec: RolloutRecord, failure: GateFailure) -> None:
        """Raise ``failure`` (the rollout rolls back), unless test switch ``no-gates`` is on: then only say so."""
        if not broken("no-gates"):
            raise failure
        self._emit(rec, "bake", f"TEST SWITCH no-gates: ignoring a failed gate: {failure}")

    def _promote(self, rec: RolloutRecord, canary: str) -> None:
        f = self.fleet
        with f.lock:
            target = [rec.to_version]
            f.state.set_desired(rec.model, target, last_good=target)
        self._emit(rec, "promote", f"{rec.model} {rec.to_version} is the desired version; loading it everywhere")
        self._reload_all(rec, exclude={canary})
        with f.lock:
            c = self.state.instance(canary)
            for r in self.state.instances():
                if r.role == "primary":
                    self.state.update_instance(r.id, role="standby")
                    f.metrics.set_role(r.id, "standby")
            self.state.update_instance(canary, role="primary")
            f.metrics.set_role(canary, "primary")
            f.route_serving(c.slot)
            for r in self.state.instances():
                f.traffic.set_weight(r.slot, 0)
        f.ensure_primary()  # active-active: the pool back at its size (the old primary rejoins it)
        self._finish(rec, "succeeded", "done", f"{rec.model} {rec.to_version} on every instance; {canary} is primary")

    def _reload_all(self, rec: RolloutRecord, exclude: set[str]) -> None:
        f = self.fleet
        errors = []
        for r in self.state.instances():
            if r.id in exclude or r.state in ("restarting", "starting"):
                if r.id not in exclude:  # a restart reloads the desired versions itself
                    with f.lock:
                        self.state.update_instance(r.id, versions=f.desired())
                continue
            try:
                f.reload(r.id, {**r.versions, rec.model: f.desired()[rec.model]}, only=[rec.model])
            except Exception as exc:
                errors.append(f"{r.id}: {exc}")
                f.schedule_restart(r.id, f"reload failed: {exc}")
        if errors:
            self.state.add_rollout_event(rec.id, rec.phase, f"reload errors (instances restarted): {errors}")

    def _rollback_run(self, rec: RolloutRecord, primary: str, canary: str, why: str) -> None:
        f = self.fleet
        self._emit(rec, "rollback", f"rolling back: {why}")
        with f.lock:
            p = self.state.instance(primary)
            f.route_serving(p.slot)  # traffic back on the old version at once
            for r in self.state.instances():
                f.traffic.set_weight(r.slot, 0)
            c = self.state.instance(canary)
        old = f.desired()
        try:
            f.reload(canary, {**c.versions, rec.model: old[rec.model]}, only=[rec.model])
            with f.lock:
                self.state.update_instance(canary, role="standby", state="healthy")
                f.metrics.set_role(canary, "standby")
                f.traffic.set_state(c.slot, "ready")
        except Exception as exc:
            with f.lock:
                self.state.update_instance(canary, role="standby", versions=old)
            f.canary_broken.pop(canary, None)
            f.schedule_restart(canary, f"rollback reload failed: {exc}")
        f.canary_broken.pop(canary, None)
        self._finish(rec, "rolled_back", "done", f"rolled back to {rec.model} {rec.from_version}: "
                     f"gate {rec.failed_gate} = {rec.failed_value:.4g} (threshold {rec.threshold:.4g})")
        f.ensure_primary()

    # ------------------------------------------------------------------ crash recovery
    def recover_records(self) -> None:
        """Before adoption, after a control-plane restart: make the records say what must be served.

        A rollout that reached ``promote`` (desired already updated) is finished; any earlier one is rolled
        back. Instances then get adopted (and reloaded where they differ) or restarted by the fleet.
        """
        f = self.fleet
        for rec in self.state.running_rollouts():
            recs = {r.id: r for r in self.state.instances()}
            canary = recs.get(rec.canary)
            desired = f.desired()
            if rec.phase == "promote":
                for r in recs.values():
                    self.state.update_instance(r.id, versions=desired, role="standby" if r.id != rec.canary
                                               else "primary")
                if canary is not None:
                    f.route_serving(canary.slot)
                self._finish(rec, "succeeded", "done", "finished after a control-plane restart")
            else:
                rec.failed_gate, rec.failed_value, rec.threshold = "control_plane_restart", 1, 0
                if canary is not None:
                    self.state.update_instance(canary.id, versions=desired, role="standby")
                prim = next((r for r in recs.values() if r.role == "primary"), None)
                if prim is not None:
                    f.route_serving(prim.slot)
                self._finish(rec, "rolled_back", "done", "rolled back after a control-plane restart during "
                             f"phase {rec.phase}")
