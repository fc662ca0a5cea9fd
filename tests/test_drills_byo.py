"""Drills on a repository recserve has never seen (issue 18): the spec ``recctl init`` wrote decides what the probe
and perf_analyzer send, what a right answer is (the reference outside Triton, by the spec's rules) and which model
the bad-rollover drill rolls. A small subset, shortened (crash and bad-rollover on a private fleet, ~3 minutes);
``make drill-smoke SPEC=...`` runs all five. Real tritonserver, HAProxy, control plane and perf_analyzer.

Nothing below names the repository's models: they come from the spec (tests/byo_repository.py writes it).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from recserve.control.runtime.triton import REPO_ROOT
from recserve.drills.spec import SPECS_DIR, load_file
from tests.byo_repository import make_repository


def _marked(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if marker in ln and ("tritonserver" in ln or "haproxy" in ln
                                                               or "control.server" in ln)]


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("byo-drills")
    make_repository(base / "repo")
    subprocess.run([sys.executable, "-m", "recserve.control.recctl", "init", "--repository", str(base / "repo"),
                    "--out", str(base / "spec.yaml")], cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    return base / "spec.yaml"


def _short(name: str, duration_s: float):
    """The shipped spec at a fixed probe rate (no knee ladder) and without alerts (no monitoring stack)."""
    s = load_file(SPECS_DIR / f"{name}.yaml")
    load = dataclasses.replace(s.load, duration_s=duration_s, probe_rps=20.0, probe_x_knee=None)
    if load.background is not None:
        load = dataclasses.replace(load, background=dataclasses.replace(load.background, concurrency=1,
                                                                        rate_x_capacity=None))
    return dataclasses.replace(s, load=load, alerts=())


def test_cli_refuses_a_roll_model_without_a_spec():
    p = subprocess.run([sys.executable, "-m", "recserve.drills", "smoke", "--roll-model", "x"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--spec" in p.stdout, p.stdout + p.stderr


def test_bad_version_is_one_the_specs_gates_catch_and_only_for_onnx(spec_path, tmp_path):
    import shutil

    from recserve.control.spec.spec import load_spec
    from recserve.drills import serving
    from recserve.drills.bad_version import BadVersionError, write_bad_version

    repo = shutil.copytree(load_spec(spec_path).repository, tmp_path / "repo")
    spec = load_spec(spec_path, repo)
    model, why = serving.roll_model(spec)
    assert model and why, why
    desired = {m: [1] for m in spec.models} | {s: [1] for m in spec.models.values() for s in m.steps}
    made = write_bad_version(spec, model, 1, 2, desired, note="test")
    # whatever strategy was kept, the spec's own drift rule rolls it back and its answers differ
    assert made["strategy"] and made["predicted"]["answers_differ"], made
    assert any(d["agreement"] < d["min"] for d in made["predicted"]["drift"].values()), made
    assert (repo / model / "2" / "manifest.json").is_file()
    python_step = next(s for m in spec.models.values() for s in m.steps if s in spec.models
                       and spec.models[s].info.kind == "python")
    with pytest.raises(BadVersionError, match="ONNX"):
        write_bad_version(spec, python_step, 1, 2, desired, note="test")
    assert not (repo / python_step / "2").exists()


@pytest.mark.slow
def test_crash_and_bad_rollover_on_a_user_repository(spec_path):
    from recserve.control.spec.spec import load_spec
    from recserve.drills.runner import DrillRun
    from recserve.drills.session import FleetOwner

    spec = load_spec(spec_path)
    results, logs = {}, []
    with FleetOwner(private=True, spec=spec_path, log=logs.append) as session:
        marker = str(session.workdir.parent)
        assert session.spec is not None and session.roll_model, logs
        # a fault that still knows only the demo's models is refused by name, before anything is touched
        lost = DrillRun(load_file(SPECS_DIR / "gpu-lost.yaml"), session, log=logs.append).run()
        assert lost["status"] == "skipped" and "serving spec" in lost["reason"], lost["reason"]
        for name, duration in (("crash", 16.0), ("bad-rollover", 30.0)):
            run = DrillRun(_short(name, duration), session, log=logs.append)
            results[name] = run.run()
            results[name]["_records"] = run.records
    assert not _marked(marker), "processes of the private fleet left running"

    for name, d in results.items():
        assert d["status"] == "completed", (name, d["reason"], logs)
        missed = [c for c in d["checks"] if c["deterministic"] and not c["ok"]]
        assert not missed, (name, missed, d.get("failures"), (d.get("background") or {}).get("summary"))
        # right answers come from the reference by the spec's rules, and every answer was judged
        assert d["wrong_answers"] == 0 and "reference" in d["answers_source"], (name, d.get("answers_notes"))
        recs = d["_records"]
        assert recs and {r.model for r in recs} <= set(spec.models)
        assert all(r.golden is not None for r in recs)
        assert all(r.matched is not None for r in recs if r.ok and not r.degraded), name

    crash = results["crash"]
    assert crash["failed_requests"] == 0 and crash["versions_consistent"] is True, crash["reason"]
    # every spec model was sent, and perf_analyzer sent a spec model's golden requests without a failure
    assert {r.model for r in crash["_records"]} == set(spec.models)
    assert crash["background_clean"] is True, crash["background"]["summary"]
    assert any(f"-m {m} " in crash["background"]["command"] for m in spec.models), crash["background"]["command"]

    bad = results["bad-rollover"]
    assert bad["rolled_back"] is True and bad["bad_version_live"] is True, bad["reason"]
    rolled = bad["serving_spec"]["roll_model"]
    assert all(rolled in spec.models[m].steps for m in bad["serving_spec"]["targets"])
