"""The models initContainer and sidecar (control/kube/modelsync.py) against moto's S3 API server: the initial
fill, a new version synced (by a watch pass and by the operator's POST /sync), a corrupted object refused and
named, and nothing partial left on the volume (a version appears whole or not at all).

moto is an S3-API emulator (tests/test_backup_s3.py says what that proves and what not)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from recserve.control.backup.targets import open_store, parse_target
from recserve.control.kube import modelsync
from recserve.control.kube.modelsync import ModelSync, publish
from recserve.control.state.snapshots import verify_version, write_manifest
from tests.test_backup_s3 import MOTO, MotoS3

pytest.importorskip("boto3")
BUCKET = "recserve-models"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    if MOTO is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]', part of the dev extra)")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = MotoS3(tmp_path_factory.mktemp("moto")).start()
    try:
        yield server
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(moto, request):
    """A fresh prefix per test: s3://recserve-models/<test name>."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1")
    if BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=BUCKET)
    url = f"s3://{BUCKET}/{request.node.name}"
    return url, open_store(parse_target(url, moto.url))


def make_repo(repo: Path) -> Path:
    """A built model with a manifest, a Python model and an ensemble without one (their publish index covers
    them), a warmup file at model level, and a __pycache__ that must never travel."""
    d = repo / "ranker" / "1"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"\x01" * 4096)
    write_manifest(d, {"built_at": "v1"})
    (repo / "ranker" / "config.pbtxt").write_text('name: "ranker"\nbackend: "onnxruntime"\n')
    (repo / "pre" / "1" / "__pycache__").mkdir(parents=True)
    (repo / "pre" / "1" / "model.py").write_text("# python step\n")
    (repo / "pre" / "1" / "__pycache__" / "model.cpython-312.pyc").write_bytes(b"junk")
    (repo / "pre" / "warmup").mkdir()
    (repo / "pre" / "warmup" / "query").write_bytes(b"red boots")
    (repo / "pre" / "config.pbtxt").write_text('name: "pre"\nbackend: "python"\n')
    (repo / "search" / "1").mkdir(parents=True)
    (repo / "search" / "1" / ".gitkeep").write_text("")
    (repo / "search" / "config.pbtxt").write_text('name: "search"\nplatform: "ensemble"\n')
    return repo


def new_version(repo: Path, store, version: int, payload: bytes) -> Path:
    """What a release job uploads: the version's files, then its manifest (no publish index needed)."""
    d = repo / "ranker" / str(version)
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(payload)
    write_manifest(d, {"built_at": f"v{version}"})
    store.put_file(f"ranker/{version}/model.onnx", d / "model.onnx")
    store.put_file(f"ranker/{version}/manifest.json", d / "manifest.json")
    return d


def no_partial(models: Path) -> None:
    """Nothing but whole repository entries: no staging directory, no temp file anywhere."""
    assert [p for p in models.rglob("*") if ".modelsync" in p.name] == []


def run_cli(*args: str, env_url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recserve.control.kube.modelsync", *args, "--endpoint-url", env_url],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_initial_fill_through_the_cli_then_a_new_version_by_watch_and_by_post_sync(tmp_path, moto, bucket):
    url, store = bucket
    src = make_repo(tmp_path / "src")
    r = run_cli("--publish", "--from", str(src), "--to", url, env_url=moto.url)
    assert r.returncode == 0, r.stderr
    assert not any("__pycache__" in k for k in store.list(""))
    assert sorted(k for k in store.list(".modelsync")) == [".modelsync/pre.json", ".modelsync/ranker.json",
                                                            ".modelsync/search.json"]

    models = tmp_path / "models"
    r = run_cli("--from", url, "--to", str(models), "--once", env_url=moto.url)  # the initContainer
    assert r.returncode == 0, r.stderr
    for rel in ("ranker/config.pbtxt", "ranker/1/model.onnx", "ranker/1/manifest.json", "pre/1/model.py",
                "pre/warmup/query", "pre/config.pbtxt", "search/1/.gitkeep", "search/config.pbtxt"):
        assert (models / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert verify_version(models, "ranker", 1).verified
    assert not (models / "pre" / "1" / "__pycache__").exists()
    no_partial(models)

    # the sidecar: a watch pass brings a version a release job uploaded (its manifest is all it needs)
    sync = ModelSync(store, models)
    stop = threading.Event()
    new_version(src, store, 2, b"\x02" * 4096)
    t = threading.Thread(target=sync.watch, args=(0.2, stop), daemon=True)
    t.start()
    try:
        for _ in range(100):
            if (models / "ranker" / "2").is_dir():
                break
            stop.wait(0.1)
    finally:
        stop.set()
        t.join(10)
    assert verify_version(models, "ranker", 2).verified

    # the operator's call before it loads a version on a pod: POST /sync answers after the pass, with the versions
    server = modelsync.serve(sync, 0, host="127.0.0.1")
    try:
        new_version(src, store, 3, b"\x03" * 4096)
        port = server.server_address[1]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/sync", method="POST", data=b"")
        body = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert body["placed"] == ["ranker/3"] and body["refused"] == []
        assert body["versions"]["ranker"] == [1, 2, 3]
        got = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/versions", timeout=10).read())
        assert got["versions"] == {"pre": [1], "ranker": [1, 2, 3], "search": [1]}
    finally:
        server.shutdown()
    assert verify_version(models, "ranker", 3).verified
    no_partial(models)


def test_an_ensembles_empty_version_directory_reaches_the_pod(tmp_path, bucket):
    """A store has no key for an empty directory, yet Triton needs an ensemble's ``1/``: the publish index names
    it, and the sync makes it (without it the ensemble would be unservable on every pod)."""
    url, store = bucket
    src = make_repo(tmp_path / "src")
    (src / "page" / "1").mkdir(parents=True)  # a user's ensemble, as Triton's docs lay it out: nothing in 1/
    (src / "page" / "config.pbtxt").write_text('name: "page"\nplatform: "ensemble"\n')
    publish(src, store)
    assert json.loads(store.get_bytes(modelsync._index_key("page")))[
        "empty_versions"] == [1]
    models = tmp_path / "models"
    res = ModelSync(store, models).sync()
    assert res.refused == [] and "page" not in res.unservable and "page/1" in res.placed, res
    assert (models / "page" / "1").is_dir() and (models / "page" / "config.pbtxt").is_file()
    assert ModelSync(store, models).sync().placed == []  # the next pass finds it in place


def test_a_corrupted_object_is_refused_and_named_and_nothing_partial_is_left(tmp_path, bucket, capfd):
    url, store = bucket
    src = make_repo(tmp_path / "src")
    publish(src, store)
    models = tmp_path / "models"
    assert ModelSync(store, models).sync().refused == []

    # version 2: two files; the second object's bytes flipped on the bucket after the manifest was written
    d = src / "ranker" / "2"
    d.mkdir(parents=True)
    (d / "a.bin").write_bytes(b"a" * 1000)
    (d / "model.onnx").write_bytes(b"\x02" * 4096)
    write_manifest(d)
    for name in ("a.bin", "model.onnx", "manifest.json"):
        store.put_file(f"ranker/2/{name}", d / name)
    store.put_bytes("ranker/2/model.onnx", b"\x02" * 4095 + b"\x03")
    store.put_bytes("ranker/2/extra.py", b"import os  # in no manifest")
    res = ModelSync(store, models).sync()
    assert len(res.refused) == 1 and res.refused[0].startswith("ranker/2/model.onnx: sha256 "), res.refused
    assert res.ignored == ["ranker/2/extra.py"] and res.unservable == []
    assert not (models / "ranker" / "2").exists()  # not even a.bin, which was right
    no_partial(models)

    # the initContainer's exit: a refused NEW version is named but keeps no pod from starting ...
    r = subprocess.run([sys.executable, "-m", "recserve.control.kube.modelsync", "--from", url, "--to", str(models),
                        "--once", "--endpoint-url", store.spec.endpoint_url], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0 and "refused: ranker/2/model.onnx: sha256" in r.stderr, r.stderr
    # ... a repository that cannot serve does: a fresh volume whose only ranker version is corrupt
    store.put_bytes("ranker/1/model.onnx", b"\x09" * 4096)
    fresh = tmp_path / "fresh"
    res = ModelSync(store, fresh).sync()
    assert "ranker" in res.unservable and any(x.startswith("ranker/1/model.onnx: sha256") for x in res.refused)
    assert not (fresh / "ranker" / "1").exists() and (fresh / "pre" / "1" / "model.py").is_file()
    no_partial(fresh)
    # a version already on disk is never rewritten (nor its objects fetched again): the store's version 1 was
    # republished with other bytes and another manifest; the local one is kept and the change named
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.onnx").write_bytes(b"\x09" * 4096)
    write_manifest(other, {"built_at": "republished"})
    store.put_file("ranker/1/manifest.json", other / "manifest.json")
    res = ModelSync(store, models).sync()
    assert any(x.startswith("ranker/1: on disk with another manifest.json") for x in res.refused), res.refused
    assert verify_version(models, "ranker", 1).verified
    assert (models / "ranker" / "1" / "model.onnx").read_bytes() == b"\x01" * 4096

    # a model file with no sha256 to check against is not placed (no publish index)
    store.delete(".modelsync/pre.json")
    res = ModelSync(store, tmp_path / "noindex").sync()
    assert any(x.startswith("pre/config.pbtxt: no sha256") for x in res.refused) and "pre" in res.unservable
    assert not (tmp_path / "noindex" / "pre").exists()


def test_a_pass_killed_half_way_leaves_nothing_partial(tmp_path, bucket, monkeypatch):
    _, store = bucket
    src = make_repo(tmp_path / "src")
    publish(src, store)
    models = tmp_path / "models"
    d = src / "ranker" / "2"
    d.mkdir(parents=True)
    for i in range(3):
        (d / f"part{i}.bin").write_bytes(bytes([i]) * 512)
    write_manifest(d)
    for p in sorted(d.iterdir()):
        store.put_file(f"ranker/2/{p.name}", p)

    real, calls = modelsync._download, []

    def dies_on_the_third(store_, key, dest, want):
        calls.append(key)
        if key == "ranker/2/part2.bin":
            raise KeyboardInterrupt  # the container killed mid-copy
        return real(store_, key, dest, want)

    monkeypatch.setattr(modelsync, "_download", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        ModelSync(store, models).sync()
    assert "ranker/2/part1.bin" in calls and not (models / "ranker" / "2").exists()
    no_partial(models)
    # a leftover of a process that was SIGKILLed (no finally) is removed by the next pass, never placed
    leftover = models / ".modelsync" / "stage-999" / "ranker" / "2"
    leftover.mkdir(parents=True)
    (leftover / "part0.bin").write_bytes(b"half")
    monkeypatch.setattr(modelsync, "_download", real)
    res = ModelSync(store, models).sync()
    assert "ranker/2" in res.placed and verify_version(models, "ranker", 2).verified
    no_partial(models)
    shutil.rmtree(models)


def test_the_operator_asks_the_pods_sidecar_before_it_loads_a_version(tmp_path):
    """``sync_pod_first`` (wrapped around KubePool.load_versions by the operator): the pod's sidecar runs a pass,
    a version it does not hold is refused naming it and what the sidecar refused, Triton is asked only after."""
    from recserve.control.backup.targets import PathStore
    from recserve.control.kube.modelsync import SyncError, sync_pod_first

    src = make_repo(tmp_path / "store")
    store = PathStore(tmp_path / "bucket")
    publish(src, store)
    sync = ModelSync(store, tmp_path / "models")
    server = modelsync.serve(sync, 0, host="127.0.0.1")
    port = server.server_address[1]
    pod = {"status": {"podIP": "127.0.0.1"}, "spec": {"containers": [
        {"name": "triton", "ports": [{"name": "http", "containerPort": 8000}]},
        {"name": "models-sync", "ports": [{"name": "modelsync", "containerPort": port}]}]}}
    loads = []
    load = sync_pod_first(lambda iid, versions, only=None: loads.append((iid, versions)),
                          lambda: {"p1": pod, "volume-pod": {"spec": {"containers": [{"name": "triton"}]}}})
    try:
        load("p1", {"ranker": [1], "pre": [1]})
        assert loads == [("p1", {"ranker": [1], "pre": [1]})]
        assert verify_version(tmp_path / "models", "ranker", 1).verified  # the call brought it first
        new_version(src, store, 2, b"\x02" * 4096)
        store.put_bytes("ranker/2/model.onnx", b"\x00" * 4096)  # corrupt on the store
        with pytest.raises(SyncError, match=r"does not hold ranker/2 \(ranker/2/model.onnx: sha256"):
            load("p1", {"ranker": [2], "pre": [1]})
        assert len(loads) == 1  # Triton was not asked
        load("volume-pod", {"ranker": [2]})  # no sidecar: loaded as before
        assert loads[-1] == ("volume-pod", {"ranker": [2]})
    finally:
        server.shutdown()


def test_manifests_fill_and_sync_every_pods_repository_and_the_image_variant_renders():
    from recserve.control.kube.manifests import K8S_DIR, find, pss_violations, render, validate

    objs = render("cpu")
    assert find(objs, "ConfigMap", "recserve-models-source")["data"]["MODELS_URL"].startswith("s3://")
    for name, main in (("recserve-triton", "triton"), ("recserve-operator", "operator")):
        pod = find(objs, "Deployment", name)["spec"]["template"]["spec"]
        (fill,) = pod["initContainers"]
        conts = {c["name"]: c for c in pod["containers"]}
        assert list(conts)[0] == main  # the overlays patch containers/0
        sync = conts["models-sync"]
        assert fill["command"][-1] == "--once" and "--watch" in sync["command"]
        for c in (fill, sync):
            assert "--from=$(MODELS_URL)" in c["command"] and "--to=/models" in c["command"]
            assert {"name": "models", "mountPath": "/models"} in c["volumeMounts"]  # writable: the filler
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in conts[main]["volumeMounts"]
        vols = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in vols["models"]
    triton = find(objs, "Deployment", "recserve-triton")["spec"]["template"]["spec"]
    assert {"name": "modelsync", "containerPort": 8090} in triton["containers"][1]["ports"]
    assert pss_violations(objs) == []

    image = render(K8S_DIR / "overlays" / "models-image")
    validate(image)
    for name in ("recserve-triton", "recserve-operator"):
        pod = find(image, "Deployment", name)["spec"]["template"]["spec"]
        assert "initContainers" not in pod and [c["name"] for c in pod["containers"]] in (["triton"], ["operator"])
        assert {v["name"]: v for v in pod["volumes"]}["models"]["image"]["reference"] == "recserve-models:1"
