"""Runs a suite: servers up, load points measured, ratios side by side, everything stopped, report written.

The report is written in ``finally``: a failed target, a dead server or Ctrl-C still leaves the runs
that finished (and the error, quoting perf_analyzer) in ``report.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.markup import escape

from recserve.control.runtime.triton import DEFAULT_REPOSITORY, TritonError, TritonServer, top_level_models
from recserve.control.spec.spec import ServingSpec
from recserve.perf import inputs, ratios, report
from recserve.perf.console import console
from recserve.perf.suite import Suite
from recserve.perf.suiterun import SuiteRun
from recserve.perf.targets import Endpoint, LocalProxy, Unavailable, check_models, direct, fleet, start_server


def run_suite(
    suite: Suite,
    out_dir: Path,
    repository: Path = DEFAULT_REPOSITORY,
    data_dir: Path = inputs.DEFAULT_DATA,
    spec: ServingSpec | None = None,
) -> dict:
    """Run ``suite`` and write the report into ``out_dir``; returns report.json's document.

    ``spec``: a run for a serving spec (``suite`` expanded by perf/specsuite.expand): inputs from the spec's golden
    requests, and the demo's ratios reported as skipped, each with its reason."""
    out_dir.mkdir(parents=True, exist_ok=True)
    s = SuiteRun(suite, out_dir, repository, data_dir)
    if spec is not None:
        from recserve.perf import specsuite

        s.spec = specsuite.describe(spec, list(dict.fromkeys(t.model for t in suite.targets)))
        for name, why in specsuite.DEMO_RATIOS.items():
            s.skip_ratio(name, why)
    server: TritonServer | None = None
    proxy: LocalProxy | None = None
    t0 = time.monotonic()
    try:
        wanted = suite.models()
        loadable, skipped = check_models(repository, wanted)
        for why in skipped.values():
            (s.skipped if "skipped" in why else s.errors).append(why)
            console.print(f"[yellow]{escape(why)}[/]")
        if not loadable:
            raise Unavailable("nothing to measure: " + "; ".join(skipped.values()))
        if spec is not None:
            s.prepare_spec_payloads(spec, loadable)
        else:
            s.prepare_payloads(loadable)
        console.print(f"[bold]starting tritonserver[/] with {', '.join(top_level_models(repository, loadable))}")
        server = start_server(repository, loadable, out_dir / "server")
        ep = direct(server)
        s.collect_versions(server)
        proxied: Endpoint | None = None
        proxy_why = ""
        needs_proxy = "haproxy_vs_direct" in suite.ratios or any(t.via == "haproxy" for t in suite.targets)
        if needs_proxy:
            try:
                proxy = LocalProxy(server, out_dir / "haproxy")
                proxied = proxy.start()
            except Exception as exc:  # HAProxyError, Unavailable, missing binary: one line in the report
                proxy_why = f"own HAProxy could not start: {exc}"
                s.errors.append(proxy_why)
        fleet_ep: Endpoint | None = None
        fleet_why = ""
        if any(t.via == "fleet" for t in suite.targets):
            try:
                fleet_ep = fleet()
            except Unavailable as exc:
                fleet_why = str(exc)
        for t in suite.targets:
            if t.model not in loadable:
                continue
            e = {"direct": ep, "haproxy": proxied, "fleet": fleet_ep}[t.via]
            if e is None:
                why = f"target '{t.name}' skipped: {fleet_why if t.via == 'fleet' else proxy_why}"
                s.skipped.append(why)
                console.print(f"[yellow]{escape(why)}[/]")
                continue
            console.print(f"[bold cyan]target {t.name}[/] ({t.model} via {t.via}, batch {t.batch_size})")
            s.run_target(t, e)
            if not server.is_alive():
                raise TritonError(f"tritonserver exited during '{t.name}': {server.load_errors()}")
        for name, spec in suite.ratios.items():
            if spec.model not in loadable:
                s.skip_ratio(name, f"model '{spec.model}' is not loadable here")
                continue
            console.print(f"[bold cyan]ratio {name}[/] ({spec.model}, batch {spec.batch_size})")
            if name == "served_vs_inprocess":
                ratios.served_vs_inprocess(s, spec, ep)
            elif name == "haproxy_vs_direct":
                ratios.haproxy_vs_direct(s, spec, ep, proxied, proxy_why)
            elif name == "dynamic_batching_gain":
                ratios.dynamic_batching_gain(s, spec, ep, server)
            elif name == "trt_vs_onnx":
                ratios.trt_vs_onnx(s, spec, ep, loadable, skipped)
    except (TritonError, Unavailable, inputs.InputError, OSError) as exc:
        s.errors.append(str(exc))
        console.print(f"[red]error: {escape(str(exc))}[/]")
    except KeyboardInterrupt:
        s.errors.append("interrupted (Ctrl-C); partial results")
    finally:
        if proxy is not None:
            proxy.stop()
        if server is not None:
            if not s.versions.get("server"):
                s.collect_versions(server if server.is_alive() else None)
            server.stop()
        doc = s.doc()
        doc["wall_s"] = round(time.monotonic() - t0, 1)
        report.write(doc, out_dir)
    return doc
