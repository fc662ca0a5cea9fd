"""Suite files: the shipped ones load, and every schema error names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from recserve.perf import suite

GOOD = """
name: t
slo_ms: 40
targets:
  - {model: recommend, concurrency: [1, 2], capacity: [0.5, 1.0]}
  - {name: r-h, model: recommend, via: haproxy, concurrency: [4]}
ratios:
  served_vs_inprocess: {model: ranker, batch_size: 8, concurrency: [1, 2]}
  trt_vs_onnx: {model: ranker}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


def test_shipped_suites_are_valid():
    names = sorted(p.stem for p in suite.SUITES_DIR.glob("*.yaml"))
    assert {"smoke", "full"} <= set(names)
    for n in names:
        s = suite.load(n)
        assert s.targets or s.ratios


def test_good_suite_parses_with_defaults(tmp_path):
    s = suite.load(write(tmp_path, GOOD))
    assert s.slo_ms == 40 and s.targets[0].name == "recommend-direct" and s.targets[0].capacity == (0.5, 1.0)
    assert s.targets[1].via == "haproxy" and s.ratios["served_vs_inprocess"].batch_size == 8
    assert s.models() == ["recommend", "ranker", "ranker_trt"]


@pytest.mark.parametrize(
    "text, where",
    [
        ("targets: [{model: m, concurency: [1]}]", "targets[0]: unknown key(s) ['concurency']"),
        ("targets: [{model: m, via: ssh, concurrency: [1]}]", "targets[0].via"),
        ("targets: [{model: m}]", "needs 'concurrency' and/or 'rate'"),
        ("targets: [{model: m, concurrency: [0]}]", "targets[0].concurrency[0]: must be >= 1"),
        ("targets: [{model: m, concurrency: 4}]", "expected a non-empty list"),
        ("targets: [{model: m, rate: [10], capacity: [0.5]}]", "need a 'concurrency' sweep"),
        ("targets: [{model: m, concurrency: [1]}, {model: m, concurrency: [2]}]", "duplicate target names"),
        ("ratios: {fastness: {model: m}}", "ratios.fastness: unknown ratio"),
        ("slo_ms: fast\ntargets: [{model: m, concurrency: [1]}]", "slo_ms: expected float"),
        ("name: empty", "nothing to measure"),
        ("- a list", "top level must be a mapping"),
    ],
)
def test_schema_errors_name_file_and_key(tmp_path, text, where):
    path = write(tmp_path, text)
    with pytest.raises(suite.SuiteError) as err:
        suite.load(path)
    assert where in str(err.value) and str(path) in str(err.value)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(suite.SuiteError, match="known suites: .*smoke"):
        suite.load("no-such-suite")
    with pytest.raises(suite.SuiteError, match="not valid YAML"):
        suite.load(write(tmp_path, "targets: [unclosed"))


def test_cli_refuses_a_bad_suite_before_starting_anything(tmp_path, capsys):
    from recserve.perf.__main__ import main

    bad = write(tmp_path, "targets: [{model: ranker, concurency: [1]}]")
    assert main(["--reports", str(tmp_path / "r"), "run", str(bad)]) == 2
    assert "unknown key(s) ['concurency']" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # no report dir, no server: it stopped at validation
