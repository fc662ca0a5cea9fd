"""Run drills against a real fleet: probe + background load, timed faults, abort checks, rollbacks that
always run, figures, verdict.

Why one loop per drill with the fault in a worker thread: faults such as a rollover block for tens of
seconds, while abort conditions must be watched every few hundred milliseconds; and whatever happens,
the rollbacks in ``finally`` undo every fault that was injected.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from recserve.control.routing import accesslog
from recserve.control.routing.accesslog import AccessEntry
from recserve.drills import alerts, breakdown
from recserve.drills import timeline as tl
from recserve.drills.background import BackgroundLoad, start_background
from recserve.drills.capacity import KNEE_SLO_MS, capacity_rps
from recserve.drills.capacity import knee_mean_ms as ladder_mean_ms
from recserve.drills.faults import FAULTS, Context, process_state
from recserve.drills.figures import DrillFigures
from recserve.drills.fleet import FleetAPI, FleetError
from recserve.drills.journal import Journal
from recserve.drills.probe import Case, OpenLoopProbe, Record, golden_cases, rematch, schedule
from recserve.drills.session import FleetHandle
from recserve.drills.spec import WINDOWED, DrillSpec
from recserve.drills.verdict import evaluate

#: Longest wait before a drill with alert expectations for those alerts to leave Prometheus (rates over 1 min).
ALERTS_QUIET_TIMEOUT_S = 120.0

SETTLE_TIMEOUT_S = 120.0


def cases_for(spec: DrillSpec) -> list[Case]:
    """The golden requests of the ensembles the spec targets: what the probe sends and what is compared."""
    return [c for c in golden_cases() if c.model in spec.targets]


def answers(fleet: FleetAPI, cases: list[Case]) -> tuple[dict[str, set[tuple[int, ...]]], list[str]]:
    """The answer of every healthy instance, asked directly (not through HAProxy); disagreements reported."""
    from recserve.control.client import RecClient

    out: dict[str, set[tuple[int, ...]]] = {}
    notes = []
    for inst in fleet.instances():
        if inst.state != "healthy":
            continue
        try:
            with RecClient(f"127.0.0.1:{inst.grpc_port}", timeout_s=5.0) as c:
                for case in cases:
                    res = c.recommend(case.user_id or 0, list(case.history)) if case.model == "recommend" \
                        else c.search(case.query or "", case.user_id)
                    out.setdefault(case.model, set()).add(tuple(res.item_ids))
        except Exception as exc:
            notes.append(f"{inst.id}: {exc}"[:200])
    for model, got in out.items():
        if len(got) > 1:
            notes.append(f"instances disagree on {model}: {len(got)} different answers")
    return out, notes


def reference_answers(repository, desired: dict[str, list[int]],
                      cases: list[Case]) -> tuple[dict[str, set[tuple[int, ...]]], str]:
    """The right answer of each case's model for exactly ``desired``, from the golden reference the control plane's
    deep checks use (``control.fleet.golden``: ``build.reference`` in-process, or answers recorded for these versions),
    never from the fleet. ``({}, why)`` when no reference can give them: wrong answers are then unmeasured."""
    from recserve.control.fleet.golden import Golden

    golden = Golden(repository)
    exp = golden.expected(desired)
    if exp is None:
        return {}, golden.problem(desired) or "no expected answers"
    models = {c.model for c in cases}
    missing = models - set(exp.answers)
    if missing:
        return {}, f"the reference has no answer for {sorted(missing)}"
    return {m: {tuple(exp.answers[m].item_ids)} for m in models}, ""


def restart_counts(status: dict) -> dict[str, int]:
    """Instance id -> restarts so far, from one ``recctl status`` document (differences give a drill's restarts)."""
    return {i["id"]: i.get("restarts", 0) for i in status.get("instances", [])}


def settle(fleet: FleetAPI, timeout_s: float = SETTLE_TIMEOUT_S) -> float | None:
    """Seconds until every instance is healthy and no rollout runs (None: not within the timeout)."""
    def ok() -> bool:
        st = fleet.status(events=1)
        insts = st.get("instances", [])
        rollout = (st.get("active_rollout") or {}).get("status") or ""
        return bool(insts) and all(i.get("state") == "healthy" for i in insts) and rollout in ("", "succeeded",
                                                                                              "rolled_back", "failed")
    return fleet.wait("fleet settled", ok, timeout_s, interval_s=0.3)


def _fault_window(spec: DrillSpec, journal: Journal, t0: float) -> tuple[float, float]:
    """Actual fault start (first injection) and end (last window end) in wall-clock seconds."""
    injected = [a for a in journal.actions if a.kind == "method"]
    start = min((a.started_at for a in injected), default=t0 + spec.fault_start_s)
    # windowed faults end with their method-end step; instantaneous ones (a rollover) when their action ended
    ends = [a.ended_at for a in journal.actions if a.kind in ("method-end", "method") and a.ended_at]
    inst_end = [start + (a.end_s - a.at_s) for a in spec.method]
    end = max(ends + inst_end) if ends or inst_end else start
    return start, end


class DrillRun:
    """One drill from steady-state check to verdict."""

    def __init__(self, spec: DrillSpec, session: FleetHandle, log=print,
                 knee: tuple[float, str] | None = None, knee_mean_ms: float | None = None):
        """``knee``: (rps, where it came from) measured earlier in this session, used instead of a new ladder
        (the negative controls run on several private fleets with one knee); ``knee_mean_ms``: the mean latency
        measured at that knee (the ``mean`` limit rule's figure), when known."""
        serving = getattr(session, "spec", None)
        self.refused: str | None = None
        if serving is not None:  # a user's repository: targets, background model and rolled model from its spec
            from recserve.drills import serving as sv

            self.refused = sv.refusal(spec, serving, session.roll_model, session.roll_why)
            spec = sv.adapt(spec, serving, session.roll_model)
        self.serving = serving
        self.spec, self.s, self.log = spec, session, log
        self.knee = knee
        self.knee_mean = knee_mean_ms
        self.journal = Journal(spec.name)
        self.records: list[Record] = []
        self.access_entries: list[AccessEntry] = []  # HAProxy's log lines written during the load
        self.faults = [FAULTS[a.fault] for a in spec.method]
        self.ctx = Context(session.fleet, spec, self.journal, session.repository, session.workdir,
                           control=session.control, serving=serving)
        self.injected: list[int] = []
        self.abort_reason: str | None = None
        #: instance restarts and shed deep checks counted just before the load (the drill's are the differences)
        self.restarts_before: dict[str, int] | None = None
        self.probes_shed_before: float | None = None

    # ------------------------------------------------------------------ phases
    def _skip_reason(self) -> str | None:
        if self.refused:
            return self.refused
        for f in dict.fromkeys(self.faults):
            why = f.check(self.ctx)
            if why:
                return f"{f.name}: {why}"
        return None

    def _rate_fn(self):
        segments = []
        for a in self.spec.method:
            if a.fault == "overload":
                peak = a.params["factor"] * (self.ctx.capacity_rps or 0)
                segments.append((a.at_s, a.at_s + a.duration_s, peak, a.params["ramp_s"]))
        return schedule(self._base_rps(), segments)

    def _base_rps(self) -> float:
        """The probe's steady rate: fixed, or a multiple of the knee measured in this session."""
        x = self.spec.load.probe_x_knee
        return x * (self.ctx.capacity_rps or 0) if x else self.spec.load.probe_rps

    def _run_method(self, probe: OpenLoopProbe) -> None:
        """Timed actions; windowed faults end on time; abort checks every 250 ms."""
        spec, t0 = self.spec, probe.t0
        pending = sorted(range(len(spec.method)), key=lambda i: spec.method[i].at_s)
        workers: dict[int, threading.Thread] = {}
        ends: dict[int, float] = {}
        deadline = t0 + spec.load.duration_s + 120  # bounded even if a fault blocks
        while time.time() < deadline:
            now = time.time()
            while pending and now - t0 >= spec.method[pending[0]].at_s:
                i = pending.pop(0)
                workers[i] = threading.Thread(target=self._inject, args=(i,), daemon=True)
                workers[i].start()
                if spec.method[i].fault in WINDOWED:
                    ends[i] = now + spec.method[i].duration_s
            for i, at in list(ends.items()):
                if now >= at:
                    del ends[i]
                    self._end(i)
            reason = tl.abort_reason(probe.snapshot(), now, spec.steady_state.slo_p99_ms, spec.abort.error_budget,
                                     spec.abort.p99_ceiling_ms, spec.abort.p99_over_for_s, spec.abort.min_requests)
            if reason and self.injected:
                self.abort_reason = reason
                self.journal.add("abort", "abort", "succeeded", {"reason": reason})
                self.log(f"  abort: {reason}")
                break
            done = not pending and not ends and all(not w.is_alive() for w in workers.values())
            if done and now - t0 >= spec.load.duration_s:
                break
            time.sleep(0.25)
        for i in list(ends):
            self._end(i)
        probe.stop()
        for w in workers.values():
            w.join(60)

    def _inject(self, i: int) -> None:
        action = self.spec.method[i]
        self.injected.append(i)
        try:
            with self.journal.action(action.fault, "method") as entry:
                entry.detail.update(self.faults[i].inject(self.ctx, action))
        except Exception as exc:
            self.log(f"  fault {action.fault} failed: {exc}")

    def _end(self, i: int) -> None:
        action = self.spec.method[i]
        try:
            with self.journal.action(action.fault, "method-end") as entry:
                entry.detail.update(self.faults[i].end(self.ctx, action))
        except Exception as exc:
            self.log(f"  ending {action.fault} failed: {exc}")

    def _rollbacks(self) -> None:
        """Every injected fault's rollback, newest first, each one even if another failed."""
        for i in reversed(self.injected):
            label = self.faults[i].rollback_label
            try:
                with self.journal.action(label, "rollback") as entry:
                    entry.detail.update(self.faults[i].rollback(self.ctx))
            except Exception as exc:
                self.log(f"  rollback {label} failed: {exc}")

    # ------------------------------------------------------------------ main
    def run(self) -> dict:
        spec, fleet = self.spec, self.s.fleet
        self.log(f"drill {spec.name}: {spec.method[0].fault} at {spec.fault_start_s:.0f}s "
                 f"of {spec.load.duration_s:.0f}s")
        skip = self._skip_reason()
        if skip:
            self.journal.finish("skipped", skip)
            return self._result(DrillFigures(), status="skipped", reason=skip)
        settled = settle(fleet)
        if settled is None:
            self.journal.finish("failed", "fleet not healthy before the drill")
            return self._result(DrillFigures(), status="failed", reason="fleet not in steady state before the drill "
                                f"(status: {fleet.status(events=5)})")
        cpu_before = self.s.monitor.cpu_seconds() if self.s.monitor else {}
        wall_before = time.time()
        cases = self._cases()
        desired_before = fleet.desired()
        notes = self._answer_notes(cases)  # the instances' own answers: only to report disagreements
        self.ctx.desired_before = desired_before
        if spec.sized_by_knee:
            restarts = restart_counts(fleet.status(events=1))
            if self.knee is not None:
                (self.ctx.capacity_rps, source), ladder = self.knee, []
                mean = self.knee_mean
            else:
                # the demo's knee is recommend's; a serving spec's is the mix of its models' golden requests
                label = "recommend" if self.serving is None else "spec:" + "+".join(self.serving.models)
                self.ctx.capacity_rps, source, ladder = capacity_rps(
                    self.s.grpc_url, label, KNEE_SLO_MS, self.s.workdir,
                    use_report=not self.s.fixture_models and self.serving is None, headers=self.s.stats_headers,
                    cases=None if self.serving is None else self._cases(list(self.serving.models)))
                mean = ladder_mean_ms(self.ctx.capacity_rps, ladder)
            # The ladder overloads the fleet on purpose at its top rungs: the drill starts only once the fleet
            # has settled again, and the report says what the measurement cost (restarts it caused).
            resettled = settle(fleet) if ladder else 0.0
            after = restart_counts(fleet.status(events=1))
            self.ctx.figures.knee = {"capacity_rps": self.ctx.capacity_rps, "source": source, "ladder": ladder,
                                     "settled_after_s": None if resettled is None else round(resettled, 2),
                                     "restarts_during": {k: after.get(k, 0) - v for k, v in restarts.items()},
                                     "mean_ms": mean, "limits": self._limits_from_knee(fleet, mean)}
            self.journal.add("capacity", "probe", "succeeded" if self.ctx.capacity_rps else "failed",
                             {"capacity_rps": self.ctx.capacity_rps, "source": source, "ladder": ladder})
            if not self.ctx.capacity_rps:
                reason = f"capacity_rps unknown, the load cannot be sized: {source}"
                self.journal.finish("failed", reason)
                return self._result(DrillFigures(), status="failed", reason=reason)
        self._wait_alerts_quiet()
        bg: BackgroundLoad | None = None
        probe: OpenLoopProbe | None = None
        metrics_before = None
        bg_result = None
        try:
            url = self.s.grpc_url
            for f in dict.fromkeys(self.faults):
                with self.journal.action(f"prepare {f.name}", "setup") as entry:
                    url = f.prepare(self.ctx) or url
                    entry.detail["endpoint"] = url
            self.restarts_before = restart_counts(fleet.status(events=1))
            self.probes_shed_before = self._probes_shed()
            metrics_before = breakdown.scrape(self._metrics_urls())
            probe = OpenLoopProbe(url, cases, self._rate_fn(), spec.load.duration_s, timeout_s=2.0,
                                  max_requests=int(spec.load.duration_s * 4000), retry_policy=spec.load.client_retry)
            if spec.load.background:
                bg = start_background(spec.load.background, url, cases, spec.load.duration_s,
                                      self.ctx.capacity_rps, self.s.workdir / spec.name, self.s.stats_headers,
                                      serving=self.serving)
            log_offset = accesslog.size(self.s.access_log) if self.s.access_log else 0
            probe.start()
            self._run_method(probe)
        finally:
            if probe is not None:
                probe.stop()
                self.records = probe.join(30)
                if self.s.access_log:
                    self.access_entries, _ = accesslog.read_from(self.s.access_log, log_offset)
                if metrics_before is not None:
                    self.ctx.figures.triton_steps = breakdown.triton_steps(
                        metrics_before, breakdown.scrape(self._metrics_urls()))
            self._rollbacks()
            bg_result = bg.finish() if bg else None
            for f in dict.fromkeys(self.faults):
                try:
                    f.teardown(self.ctx)
                except Exception as exc:
                    self.log(f"  teardown of {f.name} failed: {exc}")
        settle_s = settle(fleet)
        more = self._answer_notes(cases)
        if self.serving is not None:
            return self._finish_serving(spec, fleet, probe, bg_result, settle_s, desired_before, notes + more,
                                        cpu_before, wall_before)
        # Right answers come from the golden reference for the versions desired before the fault; only a rollover
        # to a real new version (not a drill-made copy) makes the new version's reference answers right too.
        # Drill-made copies are byte-identical re-releases (same answers) or deliberately wrong.
        acceptable, problem = reference_answers(self.s.repository, desired_before, cases)
        if any(a.fault == "rollover-under-load" and a.params["version"] != "latest" for a in spec.method):
            more_right, problem_after = reference_answers(self.s.repository, fleet.desired(), cases)
            for m, v in more_right.items():
                acceptable.setdefault(m, set()).update(v)
            problem = problem or problem_after
        self.records = rematch(self.records, acceptable)
        figures = self._figures(probe.t0 or self.journal.started_at, bg_result, settle_s)
        figures.answers_notes = notes + more
        if problem:  # nothing to judge answers against: unmeasured, which fails wrong_answers_max (never passes)
            figures.wrong_answers = None
            figures.answers_notes.append(f"wrong answers not judged: {problem}")
        figures.answers_source = "golden reference (control.fleet.golden)" if not problem else None
        return self._complete(figures, cpu_before, wall_before, probe)

    def _complete(self, figures: DrillFigures, cpu_before: dict, wall_before: float, probe) -> dict:
        if self.spec.alerts:
            figures.alerts = self._alert_figures(probe.t0 or self.journal.started_at, figures)
        if self.s.monitor is not None:
            figures.monitoring_cost = monitoring_cost(cpu_before, self.s.monitor.cpu_seconds(),
                                                      time.time() - wall_before)
        status = "aborted" if self.abort_reason else "completed"
        result = self._result(figures, status=status)
        self.journal.finish(status, result["reason"])
        return result

    # ------------------------------------------------------------------ a serving spec's models
    def _cases(self, models: list[str] | None = None) -> list:
        """What the probe sends: the demo's golden pair, or every golden request of the spec's target models."""
        if self.serving is None:
            return cases_for(self.spec)
        from recserve.drills.serving import cases

        return cases(self.serving, models or list(self.spec.targets))

    def _answer_notes(self, cases: list) -> list[str]:
        if self.serving is None:
            return answers(self.s.fleet, cases)[1]
        from recserve.drills.serving import instance_answers

        return instance_answers(self.s.fleet, self.serving, list(self.spec.targets))[1]

    def _finish_serving(self, spec: DrillSpec, fleet: FleetAPI, probe, bg_result, settle_s, desired_before: dict,
                        notes: list[str], cpu_before: dict, wall_before: float) -> dict:
        """Judge a serving spec's answers: right means passing, under the spec's rules, the reference's answer
        for the versions desired before the fault (and, after a rollover to a real new version, for the versions
        desired now); never the fleet's own answers."""
        from recserve.drills.serving import SpecJudge

        judge = SpecJudge(self.serving)
        models = list(spec.targets)
        exp, problem = judge.expected(desired_before, models)
        sets = [exp]
        if any(a.fault == "rollover-under-load" and a.params["version"] != "latest" for a in spec.method):
            more, problem_after = judge.expected(fleet.desired(), models)
            sets.append(more)
            problem = problem or problem_after
        if not problem:
            self.records = judge.rematch(self.records, sets)
        figures = self._figures(probe.t0 or self.journal.started_at, bg_result, settle_s)
        figures.answers_notes = notes
        if problem:  # nothing to judge answers against: unmeasured, which fails wrong_answers_max (never passes)
            figures.wrong_answers = None
            figures.answers_notes.append(f"wrong answers not judged: {problem}")
        figures.answers_source = (f"reference outside Triton by the serving spec's rules ({self.serving.path})"
                                  if not problem else None)
        figures.serving_spec = {"spec": str(self.serving.path), "targets": models,
                                "roll_model": self.s.roll_model, "roll_model_why": self.s.roll_why}
        return self._complete(figures, cpu_before, wall_before, probe)

    def _metrics_urls(self) -> dict[str, str]:
        return {i.id: f"http://127.0.0.1:{i.metrics_port}/metrics" for i in self.s.fleet.instances() if i.metrics_port}

    def _control_plane_reactions(self) -> dict:
        """Restarts during the drill, and deep checks that load kept from their answer ("probes shed": a timeout
        or a full Triton queue, judged busy or not, from the control plane's ``recserve_probes_shed``): a
        saturated but correct fleet must show neither (issue 9); after a fault, restarts of the faulted instance
        are expected."""
        before = self.restarts_before
        if before is None:
            return {}
        try:
            st = self.s.fleet.status(events=1)
        except Exception as exc:  # the fleet's API is the measurement here; say so instead of guessing
            return {"restarts": None, "probes_shed": None, "reactions_error": str(exc)[:200]}
        now = restart_counts(st)
        shed_before, shed_now = self.probes_shed_before, self._probes_shed()
        # a control plane restarted during the drill starts its counter again: then the count is unmeasured
        shed = None if shed_before is None or shed_now is None or shed_now < shed_before else shed_now - shed_before
        return {"restarts": sum(max(0, now.get(k, 0) - v) for k, v in before.items()),
                "probes_shed": None if shed is None else round(shed)}

    def _probes_shed(self) -> float | None:
        """The control plane's count of shed deep checks so far; None when its metrics cannot be read."""
        from recserve.control.monitoring import promtext

        try:
            url = self.s.fleet.status(events=1)["endpoints"]["metrics"]
        except Exception:
            return None
        text = promtext.fetch(url, 2.0) if url else None
        return None if text is None else promtext.total(text, "recserve_probes_shed")

    def _figures(self, t0: float, bg: dict | None, settle_s: float | None) -> DrillFigures:
        """The drill's figures from its requests and the fleet after it, added to what its faults measured
        (``ctx.figures``: one record, so a fault's figure and the runner's cannot drift apart by key)."""
        spec, ss, recs = self.spec, self.spec.steady_state, self.records
        fig = self.ctx.figures
        t_end = t0 + spec.load.duration_s
        f_start, f_end = _fault_window(spec, self.journal, t0)
        if self.ctx.fault_started_at is not None:  # a fault that prepares first (lost-host)
            f_start = self.ctx.fault_started_at
        ph = tl.phases(recs, t0, f_start, f_end, t_end, ss.slo_p99_ms)
        for name, stats in ph.items():
            self.journal.steady_state(name, stats, tl.steady_state_ok(stats, ss.slo_p99_ms, ss.error_rate_max))
        failed = sum(not r.ok for r in recs)
        wrong = sum(r.ok and r.matched is False for r in recs)
        degraded = sum(r.ok and r.degraded for r in recs)
        shed = sum(tl.is_shed(r) for r in recs)
        fig.update(
            fault_at_s=round(f_start - t0, 3), fault_end_s=round(f_end - t0, 3),
            rto_ms=self._rto_ms(recs, f_start, t_end, ph["before"]),
            rto_basis=ss.rto,
            failed_requests=failed, total_requests=len(recs), wrong_answers=wrong,
            # served (real models) / degraded (fallback answers) / shed (refused fast) / failed beyond shedding
            served_requests=len(recs) - failed - degraded, degraded_answers=degraded, shed_requests=shed,
            failed_unshed=failed - shed,
            error_budget_used=tl.error_budget_used(failed, len(recs), ss.error_rate_max),
            p50_ms={k: v["p50_ms"] for k, v in ph.items()},
            p99_ms={k: v["p99_ms"] for k, v in ph.items()},
            tail=_tail(tl.window_stats(recs, t0, t_end, ss.slo_p99_ms), ss.slo_p99_ms),
            throughput_rps={k: v["throughput_rps"] for k, v in ph.items()},
            phases=ph, settled_after_s=None if settle_s is None else round(settle_s, 2),
            statuses=dict(Counter(r.status for r in recs)),
            failures=tl.failure_samples(recs, t0, f_start),
        )
        fig.update(**self._control_plane_reactions())
        fig.client_lag = breakdown.client_lag([r.lag_ms for r in recs])
        hold_from = f_start + next((a.params["ramp_s"] for a in spec.method if a.fault == "overload"), 0.0)
        fig.haproxy_timers = breakdown.haproxy_timers(self.access_entries, hold_from, f_end)
        b, d = ph["before"]["p99_ms"], ph["during"]["p99_ms"]
        fig.p99_during_ratio = round(d / b, 3) if b and d else None
        fig.p99_during_ms = d
        target = self.ctx.target
        # a fault that saw its own detection (network-partition: HAProxy's DOWN) keeps it
        fig.detection_ms = fig.detection_ms or (self._detection_ms(f_start, target) if target else None)
        if fig.detection_ms is not None:
            fig.bad_after_detection = tl.failed_or_wrong_after(recs, f_start + fig.detection_ms / 1000.0)
        if any(a.fault == "overload" for a in spec.method):
            a = next(a for a in spec.method if a.fault == "overload")
            hold = tl.window_stats(recs, f_start + a.params["ramp_s"], f_end, ss.slo_p99_ms)
            cap = self.ctx.capacity_rps
            fig.update(capacity_rps=cap, goodput_rps=hold["goodput_rps"], shed_rate=hold["shed_rate"],
                       rejected_requests=hold["rejected"], hold_window=hold,
                       rejected_p99_ms=hold["rejected_p99_ms"], accepted_p99_ms=hold["p99_ms"],
                       offered_rps=round(hold["total"] / max(hold["seconds"], 1e-9), 1),
                       offered_ratio=round(hold["total"] / max(hold["seconds"], 1e-9) / cap, 3) if cap else None,
                       goodput_ratio=round(hold["goodput_rps"] / cap, 3) if cap else None)
            rec_ms = tl.rto_ms(recs, f_end, ss.slo_p99_ms, t_end)
            fig.recovered_after_s = None if rec_ms is None else rec_ms / 1000.0
            if not fig.measured("instances_alive"):  # a fault's own (security-attacks) stands
                before = self.ctx.pids_before or {}
                now = {i.id: i.pid for i in self.s.fleet.instances()}
                fig.instances_alive = bool(before) and before == now and all(process_state(p) for p in now.values())
        during_total = ph["during"]["total"]
        fig.bad_share = round((ph["during"]["wrong"] + ph["during"]["failed"]) / during_total, 4) \
            if during_total else None
        ok, why = self.s.fleet.versions_consistent(self.s.repository)
        if settle_s is None:
            why = f"fleet not settled {SETTLE_TIMEOUT_S:.0f}s after the drill: {why}"
        fig.versions_consistent, fig.versions_detail = ok, why
        if bg is not None:
            # its exit code speaks for the fault only when it sent requests from before the fault to after its end
            bg["covered_fault"] = bg["started_at"] <= f_start and bg["ended_at"] >= f_end
            fig.background = bg
            fig.background_clean = bg["no_failed_request"] and bg["covered_fault"]
        fig.seconds = tl.per_second(recs, t0, t_end)
        fig.marks = self._marks(t0, f_start, f_end)
        return fig

    def _limits_from_knee(self, fleet, mean_ms: float | None = None) -> dict:
        """A private fleet's in-flight limits are set from the knee just measured (``recctl limits``, with the
        mean latency at it), so its admission matches the load the drill sizes by it; a fleet the run did not
        start keeps its own, and the report says which knee (and limit rule) those came from."""
        st = (fleet.set_knee(self.ctx.capacity_rps, mean_ms) if self.ctx.capacity_rps and self.s.private
              else fleet.status(1))
        return {"knee_rps": st.get("knee_rps"), "source": st.get("knee_source", ""),
                "host_limit": st.get("host_limit"), "limit_rule": st.get("limit_rule", "")}

    def _wait_alerts_quiet(self) -> None:
        """An expected alert already firing cannot be timed: wait (bounded) until Prometheus holds none of them.
        The knee ladder sheds on its top rungs, and a 1-minute rate keeps the shedding alert up ~1 min after."""
        mon, names = self.s.monitor, {a.alert for a in self.spec.alerts}
        if mon is None or not names:
            return
        import json
        import urllib.request

        start, still = time.time(), []
        while time.time() - start < ALERTS_QUIET_TIMEOUT_S:
            try:
                with urllib.request.urlopen(f"{mon.prometheus.url}/api/v1/alerts", timeout=5) as r:
                    still = alerts.active(json.load(r), names)
            except OSError as exc:
                still = [f"prometheus unreachable: {exc}"]
            if not still:
                break
            time.sleep(1.0)
        waited = round(time.time() - start, 1)
        self.ctx.figures.alerts_quiet_after_s = None if still else waited
        self.journal.add("alerts quiet", "setup", "failed" if still else "succeeded",
                         {"waited_s": waited, "still_active": still})
        if still:
            self.log(f"  expected alerts still active after {waited:.0f}s: {', '.join(still)} (time-to-alert "
                     "will read as never received)")

    def _rto_ms(self, recs: list[Record], f_start: float, t_end: float, before: dict) -> float | None:
        """RTO by the spec's ``steady_state.rto``: every request good again, or back to the before-phase's level
        (``before``: that phase's ``window_stats``)."""
        ss = self.spec.steady_state
        if ss.rto == "all-good":
            return tl.rto_ms(recs, f_start, ss.slo_p99_ms, t_end)
        return tl.rto_vs_before_ms(recs, f_start, ss.slo_p99_ms, before["goodput_rps"], t_end)

    def _alert_figures(self, t0: float, fig: DrillFigures) -> list[dict]:
        """Wait (bounded by the spec) for every expected alert to reach the webhook receiver, and resolve; the
        alerts' rows (their arrivals are added to ``fig.marks``)."""
        fault_t = t0 + (fig.fault_at_s or 0.0)
        mon = self.s.monitor
        if mon is None:
            return [alerts.match(a, [], fault_t) | {"note": "no monitoring stack: prometheus/alertmanager missing"}
                    for a in self.spec.alerts]
        deadline = fault_t + max(alerts.wait_s(alerts.match(a, [], fault_t)) for a in self.spec.alerts) + 2.0
        while True:
            rows = [alerts.match(a, mon.notifications(), fault_t) for a in self.spec.alerts]
            if alerts.done(rows) or time.time() > deadline:
                break
            time.sleep(0.5)
        fig.marks = (fig.marks or []) + alerts.marks(rows, t0)
        seen = [{k: n[k] for k in ("received", "receiver", "status", "alertname", "startsAt")}
                for n in mon.notifications() if n["received"] >= fault_t]  # everything that paged, as evidence
        self.journal.add("alerts", "probe", "succeeded" if alerts.done(rows) else "failed",
                         {"alerts": rows, "received_since_fault": seen})
        return rows

    def _detection_ms(self, fault_t: float, instance: str) -> float | None:
        try:
            evs = [e for e in self.s.fleet.events_since(fault_t, instance) if e.get("kind") == "detected"]
        except FleetError:
            return None
        return round((float(evs[0]["ts_unix"]) - fault_t) * 1000.0, 1) if evs else None

    def _marks(self, t0: float, f_start: float, f_end: float) -> list[tuple[float, str]]:
        marks = [(f_start - t0, "fault"), (f_end - t0, "fault end")]
        try:
            for e in self.s.fleet.events_since(f_start):
                if e.get("kind") in ("detected", "failover", "recovered", "rollout", "restart"):
                    marks.append((float(e["ts_unix"]) - t0, f"{e['kind']} {e.get('instance', '')}".strip()))
        except FleetError:
            pass
        return [(round(x, 2), text) for x, text in marks if x >= 0][:12]

    def _result(self, figures: DrillFigures, status: str, reason: str = "") -> dict:
        """The drill's result document (what the journal, report.json and the callers get): what the drill was,
        its figures as JSON (``DrillFigures.to_dict``: the one place they become a dict), its verdict."""
        spec = self.spec
        base = {"name": spec.name, "purpose": spec.purpose, "status": status, "fault": spec.method[0].fault,
                "simulation": "; ".join(dict.fromkeys(f.simulation for f in self.faults)),
                "slo_p99_ms": spec.steady_state.slo_p99_ms, "rto_ms": None, "detection_ms": None,
                "failed_requests": 0, "total_requests": 0, "wrong_answers": 0,
                "p99_ms": {"before": None, "during": None, "after": None}, "versions_consistent": None}
        base.update(figures.to_dict())
        if status in ("skipped", "failed"):
            base.update(passed=None if status == "skipped" else False, reason=reason, checks=[])
            return base
        passed, checks, why = evaluate(spec.expect, figures)
        not_injected = [a for a in self.journal.actions if a.kind == "method" and a.status == "failed"]
        if not_injected:  # a drill whose fault never happened proves nothing, whatever its figures say
            errors = "; ".join(f"{a.name}: {a.detail.get('error', '?')}" for a in not_injected)
            checks = [{"expectation": "fault_injected", "figure": "fault_injected", "target": "== True",
                       "measured": False, "deterministic": True, "ok": False, "missed_by": errors[:300]}, *checks]
            passed, why = False, f"fault not injected ({errors[:300]}); {why}"
        unfelt = overload_not_felt(spec, figures) if status == "completed" else None
        if unfelt:  # an overload the fleet served whole proves nothing about shedding, whatever else passed
            checks = [{"expectation": "fault_effective", "figure": "hold_window", "target": "overloaded",
                       "measured": False, "deterministic": True, "ok": False, "missed_by": unfelt}, *checks]
            passed, why = False, f"fault not effective ({unfelt}); {why}"
        if spec.alerts:
            rows = alerts.checks(figures.alerts or [alerts.match(a, [], 0.0) for a in spec.alerts],
                                 monitored=self.s.monitor is not None)
            missed = [r for r in rows if not r["ok"]]
            checks, passed = checks + rows, passed and not missed
            if missed:
                miss = "; ".join(f"{r['figure']} {r['measured']} vs {r['target']} ({r['missed_by']})" for r in missed)
                why = miss if why.startswith("all ") else f"{why}; {miss}"
            else:
                why += f"; {len(rows)} alert expectations met"
        if status == "aborted":
            passed, why = False, f"aborted: {self.abort_reason}; {why}"
        base.update(passed=passed, checks=checks, reason=why, deviated=self.journal.deviated)
        return base


def overload_not_felt(spec: DrillSpec, figures: DrillFigures) -> str | None:
    """Why an overload fault did not overload the fleet, or None when it did (or the drill has none). Overloaded:
    in the hold window some request was shed, answered degraded or failed, or the answers' p99 passed the SLO.
    None of that at ``factor`` x the knee means the fleet served the whole offer within the SLO: the knee was
    measured too low (a noisy ladder), or the load generator did not offer the load (its lag says which)."""
    factor = max((a.params["factor"] for a in spec.method if a.fault == "overload"), default=0.0)
    hold = figures.hold_window
    if factor <= 1.0 or not hold or not hold.get("total"):
        return None
    slo = spec.steady_state.slo_p99_ms
    if hold["rejected"] or hold["degraded"] or hold["failed"] or (hold["p99_ms"] or 0.0) > slo:
        return None
    lag = (figures.client_lag or {}).get("p99_ms")
    return (f"{factor:g}x a knee of {figures.capacity_rps} rps ({figures.offered_rps} rps offered in the hold, "
            f"load generator lag p99 {lag} ms) was served whole: {hold['total']} requests, none shed, degraded "
            f"or failed, p99 {hold['p99_ms']} ms <= {slo:g} ms; the knee was measured below what the fleet serves")


def _tail(whole: dict, slo_ms: float) -> dict:
    """p99.9 of the whole drill's answers and the requests slower than 4x its SLO (issue 22: report the tail)."""
    return {"p999_ms": whole["p999_ms"], "over_4x_slo": whole["over_4x_slo"],
            "limit_ms": tl.TAIL_SLO_FACTOR * slo_ms, "requests": whole["total"]}


def monitoring_cost(before: dict, after: dict, wall_s: float) -> dict:
    """CPU seconds each monitoring process used during one drill, and Prometheus's share of one core."""
    used = {k: round(after[k] - before[k], 2) for k in after if after.get(k) is not None and before.get(k) is not None}
    share = used.get("prometheus", 0.0) / wall_s if wall_s > 0 else None
    return {"cpu_s": used, "wall_s": round(wall_s, 1), "prometheus_core_share": round(share, 4) if share else share,
            "intervals": "scrape 1 s, evaluation 1 s (drills only)"}
