"""Negative controls: the test switches break exactly what they name, the control verdict is judged by its named
expectation, and (slow, CI) the crash and bad-rollover drills fail against a fleet broken on purpose."""

from __future__ import annotations

import subprocess
import sys

import pytest

from recserve.control.routing.haproxy import HAProxyConfig, render_config
from recserve.control.runtime.triton import DEFAULT_REPOSITORY, REPO_ROOT, servable_models
from recserve.control.testswitch import ENV, SWITCHES, SwitchError, active, broken, warning
from recserve.drills.controls import CI_CONTROLS, CONTROLS, Control, judge, select
from recserve.drills.spec import load_all


def test_switches_come_from_the_environment_only_and_unknown_names_are_refused(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert active() == frozenset() and not broken("no-retries")
    monkeypatch.setenv(ENV, "no-retries, no-gates")
    assert active() == {"no-retries", "no-gates"} and broken("no-gates") and not broken("no-admission")
    monkeypatch.setenv(ENV, "no-retries,no-brakes")
    with pytest.raises(SwitchError, match=r"unknown switch\(es\) \['no-brakes'\] \(known: "):
        active()
    with pytest.raises(SwitchError):
        broken("nonsense")
    monkeypatch.setenv(ENV, "no-gates")
    assert warning() == f"TEST SWITCHES ON ({ENV}): no-gates: this fleet is broken on purpose"
    monkeypatch.delenv(ENV)
    assert warning() is None


def test_no_retries_and_no_admission_break_the_haproxy_config_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    healthy = render_config(HAProxyConfig(workdir=tmp_path, slots=2))
    lines = [ln.strip() for ln in healthy.splitlines()]
    assert "retries 1" in lines and "option redispatch 1" in lines and any(ln.startswith("retry-on") for ln in lines)
    assert "use_backend be_grpc_shed if pool_full" in lines
    monkeypatch.setenv(ENV, "no-retries")
    text = render_config(HAProxyConfig(workdir=tmp_path, slots=2))
    lines = [ln.strip() for ln in text.splitlines()]
    assert "retries 0" in lines and "option redispatch 1" not in lines
    assert not any(ln.startswith("retry-on") and "response-timeout" in ln for ln in lines)
    assert "use_backend be_grpc_shed if pool_full" in lines  # admission untouched
    monkeypatch.setenv(ENV, "no-admission")
    text = render_config(HAProxyConfig(workdir=tmp_path, slots=2))
    assert "pool_full" not in text and "be_conn_free(be_grpc_pool)" not in text and "retries 1" in text


def test_every_control_names_a_real_drill_switch_and_expectation():
    specs = load_all()
    assert {c.name for c in CONTROLS} == {"crash", "bad-rollover", "overload", "hang"}
    assert set(CI_CONTROLS) <= {c.name for c in CONTROLS}
    for c in CONTROLS:
        assert c.switch in SWITCHES
        assert getattr(specs[c.drill].expect, c.expected) is not None, (c, "the drill does not check it")
    # controls that share a fleet must not share a switch's blast radius: one switch per control
    for n in {c.fleet for c in CONTROLS}:
        group = [c for c in CONTROLS if c.fleet == n]
        assert len({c.switch for c in group}) == len(group) and len({c.mode for c in group}) == 1
    with pytest.raises(ValueError, match="no control for"):
        select(["nope"])


def _check(name: str, ok: bool, measured=0) -> dict:
    return {"expectation": name, "ok": ok, "measured": measured, "target": "<= 0"}


def test_a_control_passes_only_when_its_drill_failed_on_the_named_expectation():
    c = Control("crash", "crash", "no-retries", "failed_requests_max", 1)
    failed_right = {"status": "completed", "passed": False,
                    "checks": [_check("failed_requests_max", False, 12), _check("rto_ms_max", False, 3000)]}
    ok, why = judge(c, failed_right)
    assert ok and why.startswith("failed_requests_max: 12 vs <= 0") and "also missed: rto_ms_max" in why
    ok, why = judge(c, {"status": "completed", "passed": True, "checks": [_check("failed_requests_max", True)]})
    assert not ok and "PASSED against a fleet broken by no-retries" in why
    ok, why = judge(c, {"status": "completed", "passed": False, "checks": [_check("rto_ms_max", False, 3000)]})
    assert not ok and "not on failed_requests_max (missed: rto_ms_max)" in why
    ok, why = judge(c, {"status": "failed", "passed": False, "checks": [], "reason": "no knee"})
    assert not ok and "did not run to a verdict: no knee" in why


@pytest.mark.slow
def test_ci_controls_fail_for_their_named_reason_and_leave_nothing_running(tmp_path, capsys):
    """The crash drill without HAProxy's retries loses requests; bad-rollover without the gates promotes the wrong
    version: both verdicts flip, each on its named expectation (one private fleet for both)."""
    if not {"recommend", "search"} <= set(servable_models(DEFAULT_REPOSITORY)):
        pytest.skip("needs the built models (make models)")
    p = subprocess.run([sys.executable, "-m", "recserve.drills", "controls", *CI_CONTROLS, "--reports",
                        str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    for name in CI_CONTROLS:
        assert f"control {name}: failed as it must" in out, out[-4000:]
    with capsys.disabled():  # CI logs show the controls' table (.ci/run runs make test)
        print("\n" + p.stdout[p.stdout.index("recserve drill controls"):])
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [ln for ln in ps.splitlines() if "recserve-drills-" in ln], "the control fleets were left running"
