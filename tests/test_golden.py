"""Golden answers: computed by the torch-free reference, never an instance's own answer, loud when unavailable.

The deep checks here run against the session's real tritonserver (tests/conftest.py); the "broken reference"
is a function that raises, passed to ``Golden`` the way the control plane passes the real one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from recserve.build.reference import MODELS, Reference, latest_versions, record_expectations
from recserve.control.client import RecClient, Result
from recserve.control.fleet.golden import (
    SOURCE_NONE,
    SOURCE_RECORDED,
    SOURCE_REFERENCE,
    Golden,
    golden_json_path,
    load_request_set,
)
from recserve.control.fleet.health import deep_check, ready_versions
from recserve.control.monitoring.metrics import ControlMetrics
from recserve.control.runtime.triton import DEFAULT_REPOSITORY, REPO_ROOT

LATEST = {m: [v] for m, v in latest_versions(DEFAULT_REPOSITORY).items()}


def _broken(*_args):
    raise RuntimeError("deliberately broken reference")


def _recorded(tmp_path, versions=None):
    """A golden.json with the build's requests and the answers the reference records at build time."""
    path = golden_json_path(DEFAULT_REPOSITORY)
    doc = json.loads(path.read_text()) if path.exists() else {"recommend": [], "search": []}
    pairs = load_request_set(path)
    doc["recommend"], doc["search"] = [p["recommend"] for p in pairs], [p["search"] for p in pairs]
    doc["expected"] = record_expectations(doc, Reference.latest(DEFAULT_REPOSITORY))
    if versions is not None:
        doc["expected"]["versions"] = versions
    out = tmp_path / "golden.json"
    out.write_text(json.dumps(doc))
    return out


def _gauges(metrics: ControlMetrics) -> dict[str, float]:
    out = {}
    for fam in metrics.registry.collect():
        for s in fam.samples:
            if s.name.startswith("recserve_golden"):
                out[s.name + (f"{{{s.labels['source']}}}" if "source" in s.labels else "")] = s.value
    return out


def test_control_plane_computes_expectations_without_torch(tmp_path):
    """torch made unimportable: the control plane's modules import and the reference answers as at build time."""
    recorded = _recorded(tmp_path)
    code = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch"] = None  # any 'import torch' now raises ImportError
        import recserve.control.api.server, recserve.control.fleet.fleet  # the control plane's whole import graph
        from recserve.control.fleet.golden import Golden
        g = Golden({str(DEFAULT_REPOSITORY)!r}, golden_json={str(recorded)!r})
        exp = g.expected({LATEST!r})
        assert not [m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m] is not None]
        print(json.dumps({{"source": exp.source, "answers": {{m: r.item_ids for m, r in exp.answers.items()}}}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    build_time = json.loads(recorded.read_text())["expected"]
    assert got["source"] == SOURCE_REFERENCE
    assert got["answers"] == {m: build_time[m][0]["item_ids"] for m in ("recommend", "search")}
    # and where the checkout's own build recorded answers for these versions, they are the same
    path = golden_json_path(DEFAULT_REPOSITORY)
    real = json.loads(path.read_text()).get("expected") if path.exists() else None
    if real and real["versions"] == {m: v[0] for m, v in LATEST.items()}:
        assert got["answers"] == {m: real[m][0]["item_ids"] for m in ("recommend", "search")}


@pytest.fixture(scope="module")
def served(server):
    versions = {m: v for m, v in (ready_versions(server) or {}).items() if m in MODELS}
    assert set(versions) == set(MODELS), versions
    with RecClient(server.grpc_url) as client:
        yield server, versions, client


def test_reference_agrees_with_the_served_ensembles(served):
    server, versions, client = served
    metrics = ControlMetrics()
    g = Golden(DEFAULT_REPOSITORY, metrics=metrics)
    probe = deep_check(server, True, versions, g, client)
    assert probe.ok, probe
    assert g.expected(versions).source == SOURCE_REFERENCE and not g.problems()
    assert _gauges(metrics)["recserve_golden_reference_ok"] == 1


def test_broken_reference_without_fallback_turns_the_golden_check_red(served, tmp_path):
    server, versions, client = served
    events: list[str] = []
    metrics = ControlMetrics()
    other = {m: 999 for m in MODELS}  # recorded for versions nobody serves: no fallback
    g = Golden(DEFAULT_REPOSITORY, metrics=metrics, event=events.append, reference=_broken,
               golden_json=_recorded(tmp_path, other))
    probe = deep_check(server, True, versions, g, client)
    assert not probe.ok and probe.stage == "golden", probe  # a healthy instance, but nothing to judge it by
    assert "deliberately broken reference" in probe.reason and "other versions" in probe.reason
    assert g.expected(versions) is None  # the instance's own answer did not become the truth
    assert any("NO expected answers" in e and "deliberately broken" in e for e in events), events
    assert any("golden checks fail" in p for p in g.problems())
    gauges = _gauges(metrics)
    assert gauges["recserve_golden_reference_ok"] == 0 and gauges[f"recserve_golden_expectations{{{SOURCE_NONE}}}"] == 1


def test_broken_reference_falls_back_loudly_to_build_time_answers(served, tmp_path):
    server, versions, client = served
    events: list[str] = []
    metrics = ControlMetrics()
    g = Golden(DEFAULT_REPOSITORY, metrics=metrics, event=events.append, reference=_broken,
               golden_json=_recorded(tmp_path))
    assert deep_check(server, True, versions, g, client).ok
    exp = g.expected(versions)
    assert exp.source == SOURCE_RECORDED
    assert any(SOURCE_RECORDED in e and "deliberately broken" in e for e in events), events
    assert g.problems() and "using golden.json" in g.problems()[0]
    gauges = _gauges(metrics)
    assert gauges["recserve_golden_reference_ok"] == 0
    assert gauges[f"recserve_golden_expectations{{{SOURCE_RECORDED}}}"] == 1
    # the fallback really judges: a wrong answer is red
    wrong = {m: type(r)(list(reversed(r.item_ids)), r.scores) for m, r in exp.answers.items()}
    assert "differ from expected" in g.compare(wrong, exp)


def test_broken_reference_is_a_status_warning(tmp_path):
    """``recctl status`` prints the fleet's warnings: the golden problem is one of them (no process started)."""
    from recserve.control.fleet.fleet import Fleet, FleetConfig

    fleet = Fleet(FleetConfig(root=tmp_path / "runtime", repository=DEFAULT_REPOSITORY))
    try:
        fleet.golden = Golden(DEFAULT_REPOSITORY, reference=_broken, golden_json=tmp_path / "absent.json",
                              event=lambda msg: fleet.state.event("golden", msg))
        assert fleet.golden.expected(LATEST) is None
        warnings = fleet.status().warnings
        assert any("golden answers" in w and "deliberately broken" in w for w in warnings), warnings
        golden_events = [e["message"] for e in fleet.state.events(10, kind="golden")]
        assert any("NO expected answers" in m for m in golden_events), golden_events
    finally:
        fleet.state.close()


def test_failed_reference_is_retried_and_recovery_is_an_event(tmp_path):
    calls = {"n": 0}

    def flaky(repository, versions, requests):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("model.onnx not readable yet")
        return {"recommend": Result([1, 2], [0.5, 0.4]), "search": Result([3], [0.1])}

    events: list[str] = []
    g = Golden(DEFAULT_REPOSITORY, event=events.append, reference=flaky, retry_s=0.0,
               golden_json=tmp_path / "absent.json")
    assert g.expected(LATEST) is None
    exp = g.expected(LATEST)
    assert exp is not None and exp.source == SOURCE_REFERENCE and not g.problems()
    assert "works again" in events[-1], events


def test_a_version_set_no_longer_asked_about_leaves_status_and_metrics(tmp_path):
    """A rolled-back version set whose reference failed must not keep the fleet's status red for ever."""
    metrics = ControlMetrics()
    g = Golden(DEFAULT_REPOSITORY, metrics=metrics, reference=_broken, golden_json=tmp_path / "absent.json",
               active_s=0.2)
    assert g.expected(LATEST) is None and g.problems()
    assert _gauges(metrics)["recserve_golden_reference_ok"] == 0
    time.sleep(0.3)
    assert not g.problems()
    g.expected({**LATEST, "retrieval": [LATEST["retrieval"][0]]})  # still asked: counts again (cached, no retry)
    assert g.problems()
