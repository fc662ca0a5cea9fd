"""Issue 21 item 7: the serving spec on the cluster, in the ConfigMap recserve-spec that the operator and the front
door read.

Offline: the cluster spec (deploy/k8s/base/spec/) is specs/demo.yaml's models and rules; Kustomize's
configMapGenerator renders exactly those files; the operator mounts that ConfigMap and is told to read it; the
committed front-door config was rendered from the same files (their digest, ``recserve.io/spec-sha256``); the
files as mounted load as a spec; the operator refuses a fleet whose models the spec does not cover. The generator
takes the body limits, the SLO and the no-degraded refusals from a spec, and REAL HAProxy enforces a spec's limit
(not the demo contract's). Then the operator against the in-memory API (kmock) with one REAL tritonserver pod:
golden checks by the spec's rules open the pod's gate, a spec whose recorded answers are wrong closes it naming the
spec's output, and a front door rendered from another spec makes the fleet Degraded (``FrontDoorSpecStale``). The
degraded-answer Deployment mounts the same ConfigMap and runs with ``--spec``: its rendered command, run as a real
process on loopback against the ConfigMap's files as a pod mounts them, answers each model as the spec's
``degraded`` says and refuses a model without one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from recserve.control.fleet.config import FleetError
from recserve.control.kube import frontdoor as kfd
from recserve.control.kube.manifests import K8S_DIR, OVERLAYS, find, render
from recserve.control.runtime.triton import REPO_ROOT
from recserve.control.spec.spec import load_spec

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def rendered():
    return {o: render(o) for o in OVERLAYS}


def _models_without_golden(doc: dict) -> dict:
    return {n: {k: v for k, v in m.items() if k != "golden"} for n, m in doc["models"].items()}


def test_the_cluster_spec_is_the_demo_spec_and_kustomize_ships_every_file_it_names():
    ours = yaml.safe_load((kfd.SPEC_DIR / kfd.SPEC_FILE).read_text())
    demo = yaml.safe_load((REPO_ROOT / "specs" / "demo.yaml").read_text())
    assert _models_without_golden(ours) == _models_without_golden(demo), "deploy/k8s/base/spec drifted from specs/demo"
    assert (kfd.SPEC_DIR / ours["repository"]).resolve() == kfd.REPOSITORY
    kust = yaml.safe_load((K8S_DIR / "base" / "kustomization.yaml").read_text())
    gen = next(g for g in kust["configMapGenerator"] if g["name"] == kfd.SPEC_CONFIGMAP)
    shipped = {Path(f).name for f in gen["files"]}
    assert shipped == set(kfd.spec_files(kfd.SPEC_DIR)), "every file of base/spec/ goes into the ConfigMap"
    assert {m["golden"] for m in ours["models"].values()} <= shipped


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_spec_configmap_is_what_the_operator_mounts_and_the_front_door_was_rendered_from(rendered, overlay,
                                                                                            tmp_path):
    from recserve.control.kube.operator import serving_spec

    objs = rendered[overlay]
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(kfd.SPEC_CONFIGMAP)]
    assert cm["metadata"]["name"] != kfd.SPEC_CONFIGMAP  # a content-hash suffix: an edited spec rolls the operator
    assert cm["data"] == kfd.spec_files(kfd.SPEC_DIR)
    fd = find(objs, "ConfigMap", kfd.CONFIGMAP)["metadata"]["annotations"]
    assert fd[kfd.SPEC_ANNOTATION] == kfd.data_digest(cm["data"]) == kfd.spec_digest(kfd.SPEC_DIR), (
        "the front door was rendered from another spec: python -m recserve.control.kube.frontdoor "
        "-o deploy/k8s/base/frontdoor-config.yaml")
    pod = find(objs, "Deployment", "recserve-operator")["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if (v.get("configMap") or {}).get("name") == cm["metadata"]["name"])
    assert not vol["configMap"].get("optional")
    op = next(c for c in pod["containers"] if c["name"] == "operator")
    mount = next(m for m in op["volumeMounts"] if m["name"] == vol["name"])
    assert mount["mountPath"] == str(kfd.SPEC_MOUNT) and mount["readOnly"]
    assert f"--spec={kfd.SPEC_MOUNT}/{kfd.SPEC_FILE}" in op["args"]
    _as_mounted(cm["data"], tmp_path)
    assert kfd.spec_digest(tmp_path) == fd[kfd.SPEC_ANNOTATION]
    fleet_models = find(objs, "RecServeFleet", "recserve")["spec"]["models"]
    spec = serving_spec(tmp_path / kfd.SPEC_FILE, kfd.REPOSITORY, fleet_models)  # gpu: the *_trt ensembles besides
    assert spec.model_names() == ["recommend", "search"]


def _as_mounted(data: dict[str, str], into: Path) -> Path:
    """A ConfigMap's files as a pod sees them: Kubernetes' ..data link and timestamped directory beside the keys."""
    into.mkdir(parents=True, exist_ok=True)
    stamp = into / "..2026_01_01_00_00_00.1"
    stamp.mkdir()
    for name, text in data.items():
        (stamp / name).write_text(text)
        (into / name).symlink_to(Path("..data") / name)
    (into / "..data").symlink_to(stamp.name)
    return into


def test_the_operator_refuses_a_fleet_whose_models_the_spec_does_not_cover():
    from recserve.control.kube.operator import serving_spec

    path = kfd.SPEC_DIR / kfd.SPEC_FILE
    with pytest.raises(FleetError, match=r"not in spec.models: \['search'\]"):
        serving_spec(path, kfd.REPOSITORY, ["recommend"])
    with pytest.raises(FleetError, match=r"not in the serving spec: \['ranker'\]"):
        serving_spec(path, kfd.REPOSITORY, ["recommend", "search", "ranker"])


def _edited_spec(tmp_path: Path, edit) -> Path:
    d = tmp_path / "spec"
    shutil.copytree(kfd.SPEC_DIR, d)
    doc = yaml.safe_load((d / kfd.SPEC_FILE).read_text())
    doc["repository"] = str(kfd.REPOSITORY)
    edit(doc["models"])
    (d / kfd.SPEC_FILE).write_text(yaml.safe_dump(doc))
    return d


def _small(models: dict) -> None:
    models["recommend"]["maxBatch"] = 2
    models["search"]["maxBatch"] = 2
    models["search"]["sloP99Ms"] = 40
    del models["search"]["degraded"]


def test_the_generator_takes_limits_slo_and_refusals_from_the_spec(tmp_path):
    from recserve.control.routing.frontdoor import GRPC_MAX_BODY, HTTP_MAX_BODY
    from recserve.control.routing.haproxy import render_config

    committed = kfd.with_spec()
    assert committed.no_degraded_models() == () and committed.slo_ms() == 50
    gen = kfd.with_spec(_edited_spec(tmp_path, _small))
    limits = gen.body_limits()
    assert limits.http < HTTP_MAX_BODY and limits.grpc < GRPC_MAX_BODY  # batch 2, not the contract's 4 / 8
    assert gen.slo_ms() == 40 and gen.pod_limit() == 20  # 500 rps x the strictest SLO, 40 ms
    assert gen.no_degraded_models() == ("search",)
    cfg = render_config(gen.haproxy_config())
    assert f"over the {limits.http} byte limit" in cfg and f"req.body_len gt {limits.grpc}" in cfg
    assert "acl no_degraded path_reg ^/v2/models/(search)(/.*)?$" in cfg
    cm = gen.configmap()["metadata"]["annotations"]
    assert cm[kfd.SPEC_ANNOTATION] == kfd.spec_digest(tmp_path / "spec") != kfd.spec_digest(kfd.SPEC_DIR)
    assert "search" in cm["recserve.io/spec"]
    bare = kfd.ClusterFrontDoor()  # --no-spec: the demo contract's limits, no digest
    assert bare.body_limits() is None and bare.configmap()["metadata"]["annotations"][kfd.SPEC_ANNOTATION] == ""
    assert f"over the {HTTP_MAX_BODY} byte limit" in render_config(bare.haproxy_config())


def _post(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_real_haproxy_enforces_the_spec_limit_not_the_contract_one(tmp_path):
    """HAProxy from a spec with maxBatch 2: a body between the spec's limit and the demo contract's is refused (413
    naming the spec's limit); one under it passes the door (no pod is listed, so admission answers 429)."""
    from recserve.control.routing.frontdoor import HTTP_MAX_BODY
    from recserve.control.routing.haproxy import HAProxy
    from recserve.control.runtime.procs import free_port

    gen = kfd.with_spec(_edited_spec(tmp_path, _small))
    limit = gen.body_limits().http
    assert limit + 1000 < HTTP_MAX_BODY
    work = tmp_path / "haproxy"
    work.mkdir()
    cfg = gen.haproxy_config(config_dir=work, run_dir=work, nameservers=("127.0.0.1:9",), grpc_port=free_port(),
                             http_port=free_port(), bind="127.0.0.1", metrics_port=free_port())
    proxy = HAProxy(cfg).start()
    try:
        url = f"http://127.0.0.1:{cfg.http_port}/v2/models/recommend/infer"
        code, text = _post(url, b" " * (limit + 500))
        assert code == 413 and f"over the {limit} byte limit" in text, (code, text)
        code, text = _post(url, b" " * (limit - 500))
        assert code == 429, (code, text)
    finally:
        proxy.stop()


# ------------------------------------------------------------------- the degraded-answer server reads the spec too
def _spec_configmap(objs: list[dict]) -> dict:
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(kfd.SPEC_CONFIGMAP)]
    return cm


def _fallback_container(objs: list[dict]) -> tuple[dict, dict]:
    pod = find(objs, "Deployment", "recserve-fallback")["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "fallback"]
    return pod, c


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_degraded_answer_server_mounts_the_spec_and_is_told_to_answer_by_it(rendered, overlay):
    objs = rendered[overlay]
    cm = _spec_configmap(objs)
    pod, c = _fallback_container(objs)
    vol = next(v for v in pod["volumes"] if (v.get("configMap") or {}).get("name") == cm["metadata"]["name"])
    assert not vol["configMap"].get("optional")  # no spec, no start: never the demo's answers for a spec's models
    mount = next(m for m in c["volumeMounts"] if m["name"] == vol["name"])
    assert mount["mountPath"] == str(kfd.SPEC_MOUNT) and mount["readOnly"]
    assert f"--spec={kfd.SPEC_MOUNT}/{kfd.SPEC_FILE}" in c["args"]
    repo = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--repository="))
    assert any(m["mountPath"] == repo for m in c["volumeMounts"])  # the spec's models' configs, the pod's own


def _fallback_command(objs: list[dict], local: dict[str, Path], grpc_port: int, http_port: int) -> list[str]:
    """The degraded-answer container's command and args as rendered, run here: each volume's mount path replaced
    by the local directory standing for that volume (``local``, by volume name), the pod's address by loopback."""
    _, c = _fallback_container(objs)
    paths = {m["mountPath"]: local[m["name"]] for m in c["volumeMounts"]}
    args = []
    for arg in c["args"]:
        key, _, value = arg.partition("=")
        value = {"--host": "127.0.0.1", "--grpc-port": str(grpc_port), "--http-port": str(http_port)}.get(key, value)
        for mount, here in paths.items():
            if value == mount or value.startswith(mount + "/"):
                value = str(here) + value[len(mount):]
                break
        args.append(f"{key}={value}")
    assert c["command"][:1] == ["python"], c["command"]
    return [sys.executable, *c["command"][1:], *args]


class _Fallback:
    """The degraded-answer program as its container runs it (real process, loopback); stopped by ``close``."""

    def __init__(self, objs: list[dict], spec_dir: Path, work: Path):
        from recserve.control.runtime.fallback import DATA_DIR
        from recserve.control.runtime.procs import free_port

        work.mkdir(parents=True, exist_ok=True)
        self.grpc_port, self.http_port = free_port(), free_port()
        local = {"models": kfd.REPOSITORY, "data": DATA_DIR, "spec": spec_dir, "tmp": work}
        self.cmd = _fallback_command(objs, local, self.grpc_port, self.http_port)
        self.log = work / "fallback.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get(
            "PYTHONPATH", "")) if p)}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"fallback exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.close()
        raise AssertionError(f"fallback not ready: {self.log.read_text()[-2000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _recommend_inputs(mod, row: dict):
    uid = mod.InferInput("user_id", [1, 1], "INT64")
    uid.set_data_from_numpy(np.array([row["user_id"]["content"]], dtype=np.int64))
    hist = mod.InferInput("history", [1, len(row["history"]["content"])], "INT64")
    hist.set_data_from_numpy(np.array([row["history"]["content"]], dtype=np.int64))
    return [uid, hist]


def _search_inputs(mod, text: bytes = b"red running shoes"):
    q = mod.InferInput("query", [1, 1], "BYTES")
    q.set_data_from_numpy(np.array([[text]], dtype=object))
    return [q]


BUSY = {"item_ids": {"content": list(range(101, 121)), "shape": [20]},
        "scores": {"content": [0.5] * 20, "shape": [20]}}


def test_the_degraded_answer_server_run_as_deployed_answers_by_the_mounted_spec(rendered, tmp_path):
    """The rendered container's command and args, run here against the ConfigMap's files as a pod mounts them: the
    cluster spec's providers answer both models (degraded flag); a spec whose recommend answers from a file in the
    ConfigMap and whose search has no ``degraded`` gets that file's answer and search refused in HAProxy's words."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from recserve.control.client import is_degraded
    from recserve.control.runtime.fallback import DATA_DIR

    if not (DATA_DIR / "events.csv").is_file():
        pytest.skip("the build's data (artifacts/data) is not built: make models")
    objs = rendered["cpu"]
    data = _spec_configmap(objs)["data"]
    row = json.loads(data["recommend.json"])["data"][0]

    fb = _Fallback(objs, _as_mounted(data, tmp_path / "cluster-spec"), tmp_path / "fb1")
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{fb.http_port}")
        r = client.infer("recommend", _recommend_inputs(httpclient, row))
        ids = r.as_numpy("item_ids")
        assert is_degraded(r) and ids.shape == (1, 20) and len(set(ids[0].tolist())) == 20  # popular_items
        r = client.infer("search", _search_inputs(httpclient))
        assert is_degraded(r) and r.as_numpy("item_ids").shape == (1, 20)  # lexical_search
        client.close()
    finally:
        fb.close()

    doc = yaml.safe_load(data[kfd.SPEC_FILE])
    doc["models"]["recommend"]["degraded"] = {"file": "recommend-busy.json"}
    del doc["models"]["search"]["degraded"]
    edited = {**data, kfd.SPEC_FILE: yaml.safe_dump(doc), "recommend-busy.json": json.dumps(BUSY)}
    fb = _Fallback(objs, _as_mounted(edited, tmp_path / "edited-spec"), tmp_path / "fb2")
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{fb.http_port}")
        r = client.infer("recommend", _recommend_inputs(httpclient, row))
        assert is_degraded(r)
        assert r.as_numpy("item_ids").tolist() == [BUSY["item_ids"]["content"]]
        np.testing.assert_allclose(r.as_numpy("scores"), [BUSY["scores"]["content"]])
        with pytest.raises(InferenceServerException) as exc:
            client.infer("search", _search_inputs(httpclient))
        assert "overloaded" in str(exc.value), exc.value  # no degraded: refused, as the front door refuses it
        assert "429" in str(exc.value.status()), exc.value.status()
        client.close()
    finally:
        fb.close()


# ---------------------------------------------------------------------------------- the operator, kmock, a real pod
def _recorded_wrong(tmp_path: Path, repo: Path) -> Path:
    """A spec of recommend alone whose recorded answers are wrong (every item 0) for the versions the pod serves."""
    from recserve.control.spec.repository import closure, read_repository

    models = read_repository(repo)
    d = tmp_path / "wrong"
    d.mkdir()
    golden = json.loads((kfd.SPEC_DIR / "recommend.json").read_text())
    golden["data"] = golden["data"][:2]
    golden["validation_data"] = [{"item_ids": {"content": [0] * 20, "shape": [20]},
                                  "scores": {"content": [0.0] * 20, "shape": [20]}} for _ in golden["data"]]
    (d / "recommend.json").write_text(json.dumps(golden))
    versions = {m: max(int(v.name) for v in (repo / m).iterdir() if v.name.isdigit())
                for m in closure(models, "recommend")}
    doc = {"schemaVersion": 1, "repository": str(repo), "models": {"recommend": {
        "golden": "recommend.json", "expected": "recorded", "recordedVersions": versions,
        "outputs": {"item_ids": {"compare": "exact"}, "scores": {"compare": "close", "atol": 0.001}}}}}
    (d / kfd.SPEC_FILE).write_text(yaml.safe_dump(doc))
    return d / kfd.SPEC_FILE


def test_the_operator_golden_checks_by_the_mounted_spec_and_flags_a_front_door_of_another(tmp_path, monkeypatch):
    from kubernetes import client

    from recserve.control.fleet.spec_golden import SpecGolden
    from recserve.control.kube import operator as kop
    from recserve.control.kube.api import GATE, GROUP, VERSION, KubeApi
    from tests.fleet_fixtures import fleet_repository
    from tests.kube_fixtures import NAMESPACE, DeploymentController, KubeEmulator

    class Emulator(KubeEmulator):
        RESOURCES = {**KubeEmulator.RESOURCES, "v1/configmaps": ("ConfigMap", [])}

    monkeypatch.setattr(kop, "FRONTDOOR_CHECK_S", 0.0)
    repo = fleet_repository(tmp_path / "model_repository")
    spec_dir = tmp_path / "spec"  # the ConfigMap as mounted (its files; the repository is the pod's, as --repository)
    shutil.copytree(kfd.SPEC_DIR, spec_dir)
    objects = render("cpu")
    emu = Emulator().start()
    ctl = op = None
    try:
        fleet = find(objects, "RecServeFleet", "recserve")
        fleet["spec"]["pool"]["checkIntervalSeconds"] = 0.5
        emu.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "recservefleets", fleet)
        op = kop.Operator(kop.OperatorConfig(namespace=NAMESPACE, repository=repo, workdir=tmp_path / "operator",
                                             reconcile_interval_s=0.3, spec=spec_dir / kfd.SPEC_FILE),
                          api=KubeApi(emu.api, NAMESPACE)).start()
        assert isinstance(op.pool.golden, SpecGolden) and op.spec_sha256 == kfd.spec_digest(kfd.SPEC_DIR)
        ctl = DeploymentController(emu.core, find(objects, "Deployment", "recserve-triton"), repo, tmp_path / "pods",
                                   op.pool.admin_key, replicas=1)
        (name,) = ctl.start_pods(1)

        def gate() -> tuple[str | None, str]:
            try:
                pod = emu.api.sanitize_for_serialization(emu.core.read_namespaced_pod(name, NAMESPACE))
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
                # a pod that kept failing is deleted (its Deployment replaces it), on a busy machine possibly
                # between two polls: its gate's last word is the GoldenFailed Event the operator wrote on it
                failed = [e for e in emu.events("GoldenFailed") if e.involved_object.name == name]
                return ("False", failed[-1].message) if failed else ("Deleted", "")
            c = next((c for c in pod.get("status", {}).get("conditions") or [] if c["type"] == GATE), {})
            return c.get("status"), c.get("message", "")

        def degraded() -> dict:
            st = emu.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "recservefleets", "recserve")
            return next((c for c in (st.get("status") or {}).get("conditions") or [] if c["type"] == "Degraded"), {})

        def wait(pred, what: str, timeout: float = 180.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if (got := pred()):
                    return got
                time.sleep(0.3)
            raise AssertionError(f"timed out waiting for {what}: gate {gate()}, degraded {degraded()}")

        wait(lambda: gate()[0] == "True", "the pod's gate to open on the spec's golden check")
        assert op.pool.golden.expected(op.pool.desired()) is not None  # answers of the spec's reference
        wait(lambda: degraded().get("status") == "False", "Degraded False (no front-door ConfigMap yet)")

        # a front door rendered from another spec: Degraded, naming it; re-rendered from this one: not
        cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(
            name=kfd.CONFIGMAP, namespace=NAMESPACE, annotations={kfd.SPEC_ANNOTATION: "0" * 64}))
        emu.core.create_namespaced_config_map(NAMESPACE, cm)
        d = wait(lambda: (c := degraded()).get("reason") == "FrontDoorSpecStale" and c, "FrontDoorSpecStale")
        assert d["status"] == "True" and "another serving spec" in d["message"]
        emu.core.patch_namespaced_config_map(kfd.CONFIGMAP, NAMESPACE, {
            "metadata": {"annotations": {kfd.SPEC_ANNOTATION: op.spec_sha256}}})
        wait(lambda: degraded().get("status") == "False", "Degraded False once the front door matches")

        # the spec decides what "right" is: recorded answers that this model never gives close the gate
        op.pool.golden = SpecGolden(load_spec(_recorded_wrong(tmp_path, repo), repo))
        wait(lambda: gate()[0] == "False", "the gate to close on the wrong recorded answers")
        assert "recommend.item_ids" in gate()[1], gate()
    finally:
        if op is not None:
            op.stop()
        if ctl is not None:
            ctl.close()
        emu.stop()
