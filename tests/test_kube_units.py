"""Pure pieces of the Kubernetes driver: where a pod listens, and how rollout routing maps onto readiness gates."""

from __future__ import annotations

import os
import subprocess

import pytest

from recserve.control.kube.pool import PodEndpoint, ServiceTraffic, pod_endpoint
from recserve.control.state.store import InstanceRecord, State


def _pod(**over) -> dict:
    pod = {"metadata": {"name": "p1"},
           "spec": {"containers": [{"name": "triton", "ports": [{"name": "http", "containerPort": 8000},
                                                               {"name": "grpc", "containerPort": 8001},
                                                               {"name": "metrics", "containerPort": 8002}]}]},
           "status": {"phase": "Running", "podIP": "10.0.0.7"}}
    for k, v in over.items():
        pod[k] = {**pod[k], **v}
    return pod


def test_pod_endpoint_reads_ip_and_named_ports_and_skips_unreachable_pods():
    assert pod_endpoint(_pod()) == PodEndpoint("p1", "10.0.0.7", 8000, 8001, 8002)
    assert pod_endpoint(_pod(status={"phase": "Pending"})) is None
    assert pod_endpoint(_pod(status={"podIP": ""})) is None
    assert pod_endpoint(_pod(metadata={"deletionTimestamp": "2026-01-01T00:00:00Z"})) is None
    no_metrics = _pod()
    no_metrics["spec"]["containers"][0]["ports"].pop()
    assert pod_endpoint(no_metrics) is None


def test_service_traffic_admits_every_pod_unless_a_split_or_maintenance_says_otherwise(tmp_path):
    state = State(tmp_path / "s.db")
    for i, name in enumerate(("a", "b")):
        state.save_instance(InstanceRecord(id=name, slot=i, role="standby", state="healthy", grpc_port=1,
                                           http_port=2, metrics_port=3, workdir="pod://x"))
    changed: list[str] = []
    t = ServiceTraffic(state, changed.append)
    assert t.admitted("a") and t.admitted("b")
    t.set_weight(0, 100)
    t.set_weight(1, 0)
    assert t.admitted("b")  # weights mean nothing outside a split
    t.route("split")
    assert t.admitted("a") and not t.admitted("b")
    t.set_weight(1, 50)
    assert t.admitted("b") and changed[-1] == "b"
    t.set_state(0, "maint")
    assert not t.admitted("a")
    t.set_state(0, "ready")
    t.route("first", 0)
    assert t.admitted("a") and t.admitted("b")
    state.close()


def test_recctl_k8s_refuses_a_missing_kubeconfig_in_one_line(tmp_path, capsys):
    from recserve.control.api.recctl import main

    assert main(["k8s", "--kubeconfig", str(tmp_path / "nope"), "rollouts"]) == 2
    assert "kubeconfig" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the operator image
OPERATOR_REQUIREMENTS = "deploy/docker/operator-requirements.txt"
_IMPORTS = """
import sys, json
for name in json.loads(sys.argv[1]):  # packages the image does not install: importing one now fails
    sys.modules[name] = None
before = {m.split(".")[0] for m in sys.modules}
import recserve.control.kube.operator, recserve.control.fleet.golden, recserve.build.reference
import recserve.control.spec.reference  # the serving spec's golden reference (--spec, ConfigMap recserve-spec)
import recserve.control.kube.modelsync, boto3  # models-fill / models-sync run the same image; S3 via boto3
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} - before)))
"""
#: In python:3.11-slim already.
BASE_IMAGE = {"pip", "setuptools", "wheel"}


def _closure(reqs: list[str]) -> set[str]:
    """Distributions that installing ``reqs`` brings (their requirements, extras included), by normalized name."""
    import importlib.metadata as md

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [Requirement(r) for r in reqs]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        seen.add(name)
        for sub in md.requires(req.name) or []:
            r = Requirement(sub)
            envs = [{**default_environment(), "extra": e} for e in (sorted(req.extras) or [""])]
            if r.marker is None or any(r.marker.evaluate(env) for env in envs):
                todo.append(r)
    return {s for s in seen if "[" not in s}


def test_the_operator_runs_without_torch_from_its_declared_requirements():
    """The operator image installs recserve with --no-deps plus operator-requirements.txt: the operator (and the
    golden reference it runs) must import with torch blocked, and every package it loads must come from those
    requirements, pinned at the pyproject's versions."""
    import importlib.metadata as md
    import json
    import sys
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from recserve.control.runtime.triton import REPO_ROOT

    lines = [ln.strip() for ln in (REPO_ROOT / OPERATOR_REQUIREMENTS).read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    declared = _closure(lines) | BASE_IMAGE
    dists = md.packages_distributions()
    # every installed top-level module that only undeclared packages provide (torch among them) is blocked, so
    # an optional import (`try: import x`) of an absent package behaves as in the image
    blocked = sorted(m for m, ds in dists.items() if m != "recserve"
                     and not {canonicalize_name(d) for d in ds} & declared)
    assert "torch" in blocked
    out = subprocess.run([sys.executable, "-c", _IMPORTS, json.dumps(blocked)], capture_output=True, text=True,
                         timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(json.loads(out.stdout))
    assert "torch" not in loaded and "onnxruntime" in loaded and "kubernetes" in loaded
    pins = {canonicalize_name(Requirement(r).name): str(Requirement(r).specifier)
            for r in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            + [d for ds in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
                "optional-dependencies"].values() for d in ds]}
    for line in lines:
        r = Requirement(line)
        name = canonicalize_name(r.name)
        assert name != "torch" and name in pins and str(r.specifier) == pins[name], line


def test_the_operator_image_is_built_from_declared_inputs():
    from recserve.control.runtime.triton import REPO_ROOT

    text = (REPO_ROOT / "deploy" / "docker" / "operator.Dockerfile").read_text()
    steps = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    copies = [ln.split()[1] for ln in steps if ln.startswith("COPY") and "--from" not in ln]
    assert "artifacts" not in " ".join(copies) and "model_repository" not in " ".join(copies)
    assert not [ln for ln in steps if "torch" in ln]
    assert any(OPERATOR_REQUIREMENTS in ln for ln in steps) and any("--no-deps" in ln and ".whl" in ln for ln in steps)


# ---------------------------------------------------------------------------------------- cluster drills can fail
FAKE_KUBECTL = r"""#!/usr/bin/env bash
# kubectl stand-in for cluster-drills.sh: answers what a healthy cluster would, except the checks named in
# $FAKE_FAIL (comma-separated), which fail as a broken cluster would.
echo "kubectl $*" >> "$FAKE_DIR/calls"
fails() { [[ ",$FAKE_FAIL," == *",$1,"* ]]; }
args=" $* "
case "$args" in
  *" apply -f - "*) cat >/dev/null; exit 0 ;;
  *"--for=jsonpath={.status.phase}=Succeeded pod/recserve-probe"*) fails probe && exit 1; exit 0 ;;
  *"--for=jsonpath={.status.result}="*) fails rollout && exit 1; exit 0 ;;
  *"--for=condition=Ready"*) fails ready && exit 1; exit 0 ;;
  *"get events"*"reason=PodDeleted"*) fails detect || echo "event/recserve-triton-a.1"; exit 0 ;;
  *"get deploy recserve-triton"*) echo true; exit 0 ;;
  *"get pods -l app.kubernetes.io/name=recserve-triton -o jsonpath"*) echo "recserve-triton-a recserve-triton-b" ;;
  *"get hpa recserve-triton -o jsonpath"*)
    n=$(cat "$FAKE_DIR/hpa" 2>/dev/null || echo 0); echo $((n + 1)) > "$FAKE_DIR/hpa"
    if fails scale || [ "$n" -eq 0 ]; then echo 2; else echo 3; fi ;;
  *) exit 0 ;;
esac
"""

DRILLS = [  # (drill argv, the failure that must fail it)
    (["crash"], "probe"), (["crash"], "ready"), (["hang"], "detect"), (["hang"], "ready"),
    (["overload"], "scale"), (["overload"], "probe"), (["operator-crash"], "ready"), (["operator-crash"], "probe"),
    (["bad-rollout", "3"], "rollout"), (["rollover", "3"], "probe"),
]


def _drill(tmp_path, argv: list[str], fail: str = "") -> subprocess.CompletedProcess:
    from recserve.control.runtime.triton import REPO_ROOT

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")  # the drills' waits, instant
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "hpa").unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "FAKE_FAIL": fail,
           "DETECT_S": "1", "SCALE_S": "1"}
    return subprocess.run(["bash", str(REPO_ROOT / "deploy" / "k8s" / "drills" / "cluster-drills.sh"), *argv],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize(("argv", "fail"), DRILLS, ids=[f"{' '.join(a)}-{f}" for a, f in DRILLS])
def test_every_cluster_drill_verdict_decides_its_exit_code(tmp_path, argv, fail):
    ok = _drill(tmp_path, argv)
    assert ok.returncode == 0 and "VERDICT" in ok.stdout and ": PASS" in ok.stdout, ok.stdout + ok.stderr
    bad = _drill(tmp_path, argv, fail)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL" in bad.stdout.splitlines()[-1], bad.stdout


def test_the_drill_probe_meets_the_namespace_pod_security_and_policy(tmp_path):
    _drill(tmp_path, ["crash"])
    run = next(c for c in (tmp_path / "calls").read_text().splitlines() if " run recserve-probe" in c)
    assert "--labels=recserve.io/role=drill-probe" in run and '"allowPrivilegeEscalation":false' in run
    assert '"RuntimeDefault"' in run and '"drop":["ALL"]' in run
    assert _drill(tmp_path, ["nope"]).returncode == 2


# ---------------------------------------------------------------------------------------- TensorRT golden checks
def _version(repo, model: str, v: int, manifest: dict) -> None:
    import json

    d = repo / model / str(v)
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps(manifest))


class _Golden:
    """Golden's surface TrtGolden uses: expectations per version set, the instance's answers."""

    def __init__(self, expected, got):
        self.requests = {"recommend": {}, "search": {}}
        self._expected, self._got, self.asked = expected, got, []

    def expected(self, versions):
        self.asked.append(versions)
        return self._expected

    def problem(self, versions):
        return "reference broken"

    def ask(self, client, requests):
        assert client.suffix == "_trt"
        return self._got


def test_trt_ensembles_are_golden_checked_against_the_onnx_version_their_engine_came_from(tmp_path):
    from recserve.control.client import Result
    from recserve.control.fleet.golden import Expected
    from recserve.control.kube.trtgolden import TrtGolden, source_versions, trt_models

    repo = tmp_path / "repo"
    _version(repo, "ranker", 1, {"files": {"model.onnx": "aaa"}})
    _version(repo, "ranker", 2, {"files": {"model.onnx": "bbb"}})
    _version(repo, "ranker_trt", 1, {"source_onnx_sha256": "aaa", "files": {"model.plan": "x"}})
    _version(repo, "ranker_trt", 2, {"source_onnx_sha256": "zzz", "files": {"model.plan": "y"}})
    assert source_versions(repo, {"ranker": [2], "ranker_trt": [1]}) == {"ranker": 1}
    with pytest.raises(ValueError, match="not in the repository"):
        source_versions(repo, {"ranker_trt": [2]})
    assert trt_models(["recommend", "search", "recommend_trt", "search_trt"]) == ["recommend_trt", "search_trt"]
    assert trt_models(["recommend", "search"]) == []

    ids = list(range(20))
    ref = Expected({"recommend": Result(ids, [1.0] * 20), "search": Result(ids, [1.0] * 20)}, "build.reference")
    models = ["recommend", "search", "recommend_trt", "search_trt"]
    versions = {"ranker": [2], "ranker_trt": [1]}
    drift = ids[:9] + [99] + ids[10:]  # one item of the top 10 differs, scores differ: TensorRT's FP16 drift
    g = _Golden(ref, {"recommend": Result(drift, [0.9] * 20), "search": Result(ids, [1.1] * 20)})
    probe = TrtGolden(repo, g).check("pod-a", "127.0.0.1:1", versions, models)
    assert probe.ok, probe
    assert g.asked == [{"ranker": [1]}]  # the reference ran on ranker 1, the engine's source, not the served ONNX 2
    wrong = list(reversed(ids))[:10] + ids[10:]
    g = _Golden(ref, {"recommend": Result(ids, [1.0] * 20), "search": Result(wrong, [1.0] * 20)})
    probe = TrtGolden(repo, g).check("pod-a", "127.0.0.1:1", versions, models)
    assert not probe.ok and probe.stage == "golden" and "search_trt" in probe.reason, probe
    probe = TrtGolden(repo, _Golden(None, {})).check("pod-a", "127.0.0.1:1", versions, models)
    assert not probe.ok and "reference broken" in probe.reason
    probe = TrtGolden(repo, _Golden(ref, {})).check("pod-a", "127.0.0.1:1", {"ranker_trt": [2]}, models)
    assert not probe.ok and "not in the repository" in probe.reason
