"""Drill spec validation: every committed spec loads, and each kind of mistake is refused with an
error that names the field and the rule, before anything could start."""

from __future__ import annotations

import copy

import pytest
import yaml

from recserve.drills.spec import FAULT_PARAMS, SPECS_DIR, SpecError, load_all, load_file, parse

ISSUE_DRILLS = {"crash", "hang", "gpu-lost", "overload", "rollover-under-load", "bad-rollover",
                "artifact-corruption", "control-plane-crash", "network-partition",
                "lost-host",  # issue 11
                "wrong-answer",  # issue 12
                "proxy-crash", "overload-4x", "flash-crowd", "crash-at-peak",  # issue 9
                "security",  # issue 10
                "scale-out-in",  # issue 9
                "hang-live"}  # a hung server that still answers health


def base() -> dict:
    return {
        "name": "t",
        "targets": ["recommend"],
        "load": {"duration_s": 20, "probe_rps": 10},
        "steady_state": {"slo_p99_ms": 100, "error_rate_max": 0.0, "before_s": 3, "after_s": 3},
        "method": [{"fault": "gpu-hang", "at_s": 5, "duration_s": 5}],
        "expect": {"failed_requests_max": 0},
    }


def refused(raw: dict) -> SpecError:
    with pytest.raises(SpecError) as err:
        parse(raw, "t.yaml")
    return err.value


def test_every_committed_spec_is_valid_and_covers_the_issue():
    specs = load_all()
    assert set(specs) == ISSUE_DRILLS
    assert {a.fault for s in specs.values() for a in s.method} == set(FAULT_PARAMS)
    assert all(specs[n].sized_by_knee for n in ("crash", "hang", "hang-live", "overload", "rollover-under-load"))
    assert not specs["bad-rollover"].sized_by_knee  # a fixed 20 rps: the controls measure no knee for it alone
    for s in specs.values():
        assert s.fault_start_s >= s.steady_state.before_s
        assert s.fault_end_s + s.steady_state.after_s <= s.load.duration_s


def test_defaults_are_filled_from_the_fault_schema():
    spec = parse(base())
    action = spec.method[0]
    assert action.params == {"target": "primary", "then": "cont"}
    assert action.end_s == 10


def test_unknown_fault_names_field_and_lists_known_ones():
    raw = base()
    raw["method"][0]["fault"] = "gpu-melt"
    e = refused(raw)
    assert e.field == "method[0].fault" and "unknown fault 'gpu-melt'" in e.rule and "gpu-xid-crash" in e.rule
    assert str(e).startswith("t.yaml: method[0].fault:")


@pytest.mark.parametrize("section,key", [("spec", "load"), ("spec", "expect"), ("load", "duration_s"),
                                         ("steady_state", "slo_p99_ms")])
def test_missing_field_is_named(section, key):
    raw = base()
    (raw if section == "spec" else raw[section]).pop(key)
    e = refused(raw)
    assert e.field == f"{section}.{key}" and e.rule == "missing required field"


def test_probe_rate_is_fixed_or_a_multiple_of_the_knee_never_both_nor_neither():
    for load in ({"duration_s": 10}, {"duration_s": 10, "probe_rps": 5, "probe_x_knee": 0.7}):
        raw = base()
        raw["load"] = load
        e = refused(raw)
        assert e.field == "load" and "exactly one of probe_rps" in e.rule
    raw = base()
    raw["load"] = {"duration_s": 20, "probe_x_knee": 0.7, "client_retry": True}
    spec = parse(raw)
    assert spec.load.probe_x_knee == 0.7 and spec.load.client_retry is True
    raw["load"]["client_retry"] = "yes"
    assert refused(raw).field == "load.client_retry"


def test_missing_fault_parameter_is_named():
    raw = base()
    raw["method"] = [{"fault": "rollover-under-load", "at_s": 5, "observe_s": 5, "params": {"version": 2}}]
    e = refused(raw)
    assert e.field == "method[0].params.model" and "missing required parameter" in e.rule


def test_rto_basis_is_one_of_the_two_definitions():
    raw = base()
    raw["steady_state"]["rto"] = "before"
    assert parse(raw, "t.yaml").steady_state.rto == "before"
    raw["steady_state"]["rto"] = "fast"
    e = refused(raw)
    assert e.field == "steady_state.rto" and "all-good" in e.rule and "'fast'" in e.rule


def test_typo_in_a_key_is_an_unknown_field_not_ignored():
    raw = base()
    raw["steady_state"]["slo_p99"] = 50
    e = refused(raw)
    assert e.field == "steady_state.slo_p99" and e.rule.startswith("unknown field")


@pytest.mark.parametrize("mutate,field,words", [
    (lambda r: r["method"][0].update(at_s=1), "method[0].at_s", "no steady-state before window"),
    (lambda r: r["method"][0].update(duration_s=15), "method[0].at_s", "needs load.duration_s >= 23"),
    (lambda r: r["method"][0].update(duration_s=0), "method[0].duration_s", "must be > 0"),
    (lambda r: r["method"][0].update(at_s=-1), "method[0].at_s", "must be >= 0"),
    (lambda r: r["method"].__setitem__(0, {"fault": "gpu-xid-crash", "at_s": 5, "duration_s": 2}),
     "method[0].duration_s", "instantaneous"),
    (lambda r: r.update(abort={"p99_ceiling_ms": 10}), "abort.p99_ceiling_ms", "below the SLO"),
    (lambda r: r.update(abort={"p99_over_for_s": 60}), "abort.p99_over_for_s", "longer than the drill"),
])
def test_impossible_timing_is_refused(mutate, field, words):
    raw = base()
    mutate(raw)
    e = refused(raw)
    assert e.field == field and words in e.rule, str(e)


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r["method"][0].update(params={"target": "canary"}), "method[0].params.target"),
    (lambda r: r["method"][0].update(params={"then": "resume"}), "method[0].params.then"),
    (lambda r: r["load"].update(probe_rps="fast"), "load.probe_rps"),
    (lambda r: r["load"].update(probe_rps=True), "load.probe_rps"),
    (lambda r: r.update(targets=["checkout"]), "spec.targets"),
    # each fault's own rollback always runs; a list of names nothing read was a promise, so it is gone
    (lambda r: r.update(rollbacks=["sigcont"]), "spec.rollbacks"),
    (lambda r: r.update(expect={}), "expect"),
    (lambda r: r["expect"].update(goodput_ratio_min=90), "expect.goodput_ratio_min"),
    (lambda r: r["expect"].update(versions_consistent="yes"), "expect.versions_consistent"),
    (lambda r: r["load"].update(background={"concurrency": 2, "rate_x_capacity": 0.5}), "load.background"),
    (lambda r: r.update(method=[]), "spec.method"),
])
def test_bad_values_are_refused_with_the_field(mutate, field):
    raw = base()
    mutate(raw)
    assert refused(raw).field == field


@pytest.mark.parametrize("fault,params,field", [
    ("bad-rollover", {"model": "ranker", "mode": "wrong"}, "method[0].params.mode"),
    ("network-partition", {"target": "standby"}, "method[0].params.target"),
])
def test_parameters_nothing_reads_are_refused(fault, params, field):
    raw = base()
    windowed = {"duration_s": 5} if fault == "network-partition" else {"observe_s": 3}
    raw["method"] = [{"fault": fault, "at_s": 5, "params": params, **windowed}]
    assert refused(raw).field == field


def test_every_fault_names_its_rollback_and_targets_choose_the_probe_cases():
    from recserve.drills.faults import FAULTS
    from recserve.drills.runner import cases_for

    assert set(FAULTS) == set(FAULT_PARAMS) and all(f.rollback_label for f in FAULTS.values())
    assert {c.model for c in cases_for(parse(base()))} == {"recommend"}
    both = base() | {"targets": ["recommend", "search"]}
    assert {c.model for c in cases_for(parse(both))} == {"recommend", "search"}


def test_bad_steps_and_factor():
    raw = base()
    raw["method"] = [{"fault": "rollover-under-load", "at_s": 5, "observe_s": 5,
                      "params": {"model": "ranker", "steps": [50, 20, 100]}}]
    assert refused(copy.deepcopy(raw)).field == "method[0].params.steps"
    raw["method"] = [{"fault": "overload", "at_s": 5, "duration_s": 5, "params": {"factor": 0.5}}]
    assert refused(raw).field == "method[0].params.factor"


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("name: x\n  : [")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_file(bad)
    other = tmp_path / "y.yaml"
    other.write_text(yaml.safe_dump(base()))
    with pytest.raises(SpecError) as err:
        load_file(other)
    assert err.value.field == "spec.name" and str(other) in str(err.value)
    assert (SPECS_DIR / "crash.yaml").exists()
