"""Fill a Triton model repository from S3-compatible storage and keep it in sync, verifying every file first.

    python -m recserve.control.kube.modelsync --from s3://bucket/prefix --to /models --once     # initContainer
    python -m recserve.control.kube.modelsync --from s3://bucket/prefix --to /models --watch    # sidecar
    python -m recserve.control.kube.modelsync --publish --from model_repository --to s3://bucket/prefix

Why: a Triton pod must not start on an empty or half-copied repository, and a new version must reach every pod
before the operator loads it, byte for byte as built. The store is read through the backup target code
(``control/backup/targets.py``: boto3, any S3 API, or a directory).

Verification, before anything is placed:

- a version with a ``manifest.json`` (every version the build pipeline or ``recctl release`` writes) is downloaded
  into a staging directory on the same volume, each file's sha256 compared with its manifest as it arrives, then
  the staged version is checked again with ``control.state.snapshots.verify_version`` and only then renamed into
  place (``<model>/<version>/`` appears whole or not at all);
- everything else (``config.pbtxt``, warmup files, the Python models' and ensembles' manifest-less versions) is
  checked against the publish index ``.modelsync/<model>.json`` that ``--publish`` writes next to the models
  (relative path -> sha256); a file with no sha256 to check against is refused, never placed;
- a file listed in the store but in no manifest or index is not placed (a stray object must not become code that
  Triton runs); a corrupt object is refused and named, and its version is left out whole.

Versions are immutable: a version already on disk that differs from the store's is refused by name, never
rewritten under a serving Triton. Versions that disappear from the store stay on disk (a pod may serve them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from recserve.control.backup.targets import TargetError, open_store, parse_target
from recserve.control.state.snapshots import MANIFEST, manifest_files, sha256_file, verify_version

log = logging.getLogger("recserve.modelsync")

#: Store keys under this prefix are the publish indexes; locally, the staging area (removed after each pass).
META = ".modelsync"


class SyncError(RuntimeError):
    """The store cannot be read (address, credentials, network); nothing was placed by the failed call."""


@dataclass
class SyncResult:
    placed: list[str] = field(default_factory=list)       # "ranker/2", "ranker/config.pbtxt"
    unchanged: int = 0                                    # versions and files already in place and equal
    refused: list[str] = field(default_factory=list)      # why, naming the model, version and file
    ignored: list[str] = field(default_factory=list)      # store keys in no manifest or index: not placed
    unservable: list[str] = field(default_factory=list)   # models with no verified version or no config

    @property
    def ok(self) -> bool:
        return not self.refused

    def as_dict(self) -> dict:
        return {"placed": self.placed, "unchanged": self.unchanged, "refused": self.refused,
                "ignored": self.ignored, "unservable": self.unservable}


def _index_key(model: str) -> str:
    return f"{META}/{model}.json"


def _layout(keys: list[str]) -> dict[str, dict]:
    """Store keys -> {model: {"files": {rel: key}, "versions": {n: {rel: key}}}} (``rel`` relative to the
    model directory for model files, to the version directory for version files)."""
    out: dict[str, dict] = {}
    for key in keys:
        parts = key.split("/")
        if key.startswith(META + "/") or "__pycache__" in parts or len(parts) < 2 or not all(parts):
            continue
        m = out.setdefault(parts[0], {"files": {}, "versions": {}})
        if parts[1].isdigit() and len(parts) >= 3:
            m["versions"].setdefault(int(parts[1]), {})["/".join(parts[2:])] = key
        else:
            m["files"]["/".join(parts[1:])] = key
    return out


def _download(store, key: str, dest: Path, want: str) -> str | None:
    """Fetch ``key`` to ``dest`` and check its sha256; on a mismatch delete it and say why (None when right)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    store.get_file(key, dest)
    got = sha256_file(dest)
    if got != want:
        dest.unlink(missing_ok=True)
        return f"sha256 {got[:12]}.. does not match {want[:12]}.."
    return None


class ModelSync:
    """One store -> one local repository. ``sync()`` is one pass; ``watch()`` repeats it; both thread-safe."""

    def __init__(self, store, dest: Path):
        self.store = store
        self.dest = Path(dest)
        self._lock = threading.Lock()
        self.last: SyncResult | None = None
        self.last_at = 0.0
        #: (model, version) -> the manifest (or index entries) its files on disk were verified against: a later
        #: pass compares that only, not every file's sha256 again (a pass runs before every load).
        self._verified: dict[tuple[str, int], object] = {}

    # ------------------------------------------------------------------ one pass
    def sync(self) -> SyncResult:
        with self._lock:
            stage = self.dest / META / f"stage-{os.getpid()}"
            self._clean_stages()
            try:
                keys = self.store.list("")
            except Exception as exc:  # botocore's errors, a missing directory: nothing placed
                raise SyncError(f"{self.store.describe()}: cannot list the store: {exc}") from exc
            res = SyncResult()
            try:
                for model, layout in sorted(_layout(keys).items()):
                    self._model(model, layout, stage, res)
            finally:
                self._clean_stages()
            self.last, self.last_at = res, time.time()
            return res

    def _clean_stages(self) -> None:
        """Staging leftovers (this pass, or a pass killed half way) are never part of the repository."""
        meta = self.dest / META
        if meta.is_dir():
            for p in meta.glob("stage-*"):
                shutil.rmtree(p, ignore_errors=True)
            if not any(meta.iterdir()):
                meta.rmdir()  # an empty repository entry Triton's index would list

    def _index(self, model: str, res: SyncResult) -> tuple[dict[str, str], list[int]]:
        """The publish index: sha256 per file no manifest covers, and the versions that hold no file at all."""
        key = _index_key(model)
        if not self.store.exists(key):
            return {}, []
        try:
            doc = json.loads(self.store.get_bytes(key))
            return ({str(k): str(v) for k, v in doc["files"].items()},
                    sorted(int(v) for v in doc.get("empty_versions", [])))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            res.refused.append(f"{model}: publish index {key} is unreadable ({exc}): its files are not placed")
            return {}, []

    def _model(self, model: str, layout: dict, stage: Path, res: SyncResult) -> None:
        index, empty_versions = self._index(model, res)
        mdir = self.dest / model
        for version in empty_versions:  # an ensemble's version: a directory Triton needs, with nothing in it
            if version not in layout["versions"] and not (mdir / str(version)).is_dir():
                (mdir / str(version)).mkdir(parents=True)
                res.placed.append(f"{model}/{version}")
        # The config first into the staging copy (verify_version needs <model>/config.pbtxt), into place last:
        # a model directory without its config is no model to Triton, so a new model appears when it is whole.
        config_ok = self._stage_config(model, layout, index, stage, res)
        for version, files in sorted(layout["versions"].items()):
            if MANIFEST in files:
                self._manifest_version(model, version, files, stage, res)
            else:
                self._indexed_version(model, version, files, index, stage, res)
        for rel, key in sorted(layout["files"].items(), key=lambda kv: kv[0] == "config.pbtxt"):
            if rel == "config.pbtxt" and not config_ok:
                continue
            self._model_file(model, rel, key, index, stage, res)
        verified = [v for v in sorted(set(layout["versions"]) | set(empty_versions)) if (mdir / str(v)).is_dir()]
        if not (mdir / "config.pbtxt").is_file() or not verified:
            res.unservable.append(model)

    def _stage_config(self, model: str, layout: dict, index: dict, stage: Path, res: SyncResult) -> bool:
        key = layout["files"].get("config.pbtxt")
        if key is None:
            res.refused.append(f"{model}: no config.pbtxt in the store")
            return False
        want = index.get("config.pbtxt")
        if not want:
            res.refused.append(f"{model}/config.pbtxt: no sha256 to verify it against (no publish index "
                               f"{_index_key(model)}: publish with --publish)")
            return False
        why = _download(self.store, key, stage / model / "config.pbtxt", want)
        if why:
            res.refused.append(f"{model}/config.pbtxt: {why} (publish index)")
            return False
        return True

    def _manifest_version(self, model: str, version: int, files: dict, stage: Path, res: SyncResult) -> None:
        name = f"{model}/{version}"
        try:
            manifest_bytes = self.store.get_bytes(files[MANIFEST])
            want = manifest_files(json.loads(manifest_bytes))
        except (ValueError, TargetError) as exc:
            res.refused.append(f"{name}/{MANIFEST}: unreadable ({exc})")
            return
        if not want:
            res.refused.append(f"{name}/{MANIFEST}: lists no files")
            return
        res.ignored += [f"{name}/{rel}" for rel in sorted(files) if rel != MANIFEST and rel not in want]
        final = self.dest / model / str(version)
        if final.exists():
            self._compare(name, final, want, manifest_bytes, res, (model, version))
            return
        if not (stage / model / "config.pbtxt").is_file():
            res.refused.append(f"{name}: not placed: its model's config.pbtxt was refused")
            return
        vstage = stage / model / str(version)
        if not self._fetch_all(name, files, want, vstage, res, "manifest"):
            return
        (vstage / MANIFEST).write_bytes(manifest_bytes)
        info = verify_version(stage, model, version)  # the repository's own check, on the staged copy
        if not info.verified:
            shutil.rmtree(vstage, ignore_errors=True)
            res.refused.append(f"{name}: {info.problem}")
            return
        self._place(vstage, final, name, res)

    def _indexed_version(self, model: str, version: int, files: dict, index: dict, stage: Path,
                         res: SyncResult) -> None:
        name = f"{model}/{version}"
        prefix = f"{version}/"
        want = {k[len(prefix):]: v for k, v in index.items() if k.startswith(prefix)}
        if not want:
            res.refused.append(f"{name}: no {MANIFEST} and no publish index entry: its files cannot be verified")
            return
        res.ignored += [f"{name}/{rel}" for rel in sorted(files) if rel not in want]
        final = self.dest / model / str(version)
        if final.exists():
            self._compare(name, final, want, None, res, (model, version))
            return
        vstage = stage / model / str(version)
        if self._fetch_all(name, files, want, vstage, res, "publish index"):
            self._place(vstage, final, name, res)

    def _fetch_all(self, name: str, files: dict, want: dict, vstage: Path, res: SyncResult, source: str) -> bool:
        for rel, digest in sorted(want.items()):
            if rel not in files:
                res.refused.append(f"{name}/{rel}: listed in its {source} but missing in the store")
                shutil.rmtree(vstage, ignore_errors=True)
                return False
            why = _download(self.store, files[rel], vstage / rel, digest)
            if why:
                res.refused.append(f"{name}/{rel}: {why} ({source}): the version is not placed")
                shutil.rmtree(vstage, ignore_errors=True)
                return False
        return True

    def _place(self, vstage: Path, final: Path, name: str, res: SyncResult) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(vstage, final)  # same volume: atomic; the version appears whole
        res.placed.append(name)
        log.info("placed %s (verified)", name)

    def _compare(self, name: str, final: Path, want: dict, manifest_bytes: bytes | None, res: SyncResult,
                 key: tuple[str, int]) -> None:
        seen = (manifest_bytes, sorted(want.items()))
        if self._verified.get(key) == seen:
            res.unchanged += 1
            return
        if manifest_bytes is not None and (final / MANIFEST).read_bytes() != manifest_bytes:
            res.refused.append(f"{name}: on disk with another {MANIFEST} than the store's: versions are "
                               "immutable, publish a new version number (the one on disk is kept)")
            return
        for rel, digest in sorted(want.items()):
            p = final / rel
            if not p.is_file() or sha256_file(p) != digest:
                res.refused.append(f"{name}/{rel}: on disk and different from the store: versions are immutable "
                                   "(the one on disk is kept)")
                return
        self._verified[key] = seen
        res.unchanged += 1

    def _model_file(self, model: str, rel: str, key: str, index: dict, stage: Path, res: SyncResult) -> None:
        name = f"{model}/{rel}"
        want = index.get(rel)
        if not want:
            res.ignored.append(name)
            return
        final = self.dest / model / rel
        if final.is_file() and sha256_file(final) == want:
            res.unchanged += 1
            return
        staged = stage / model / rel
        if not (rel == "config.pbtxt" and staged.is_file()):
            why = _download(self.store, key, staged, want)
            if why:
                res.refused.append(f"{name}: {why} (publish index)")
                return
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.modelsync")
        shutil.copyfile(staged, tmp)
        if sha256_file(tmp) != want:
            tmp.unlink(missing_ok=True)
            res.refused.append(f"{name}: changed while being placed")
            return
        os.replace(tmp, final)
        res.placed.append(name)
        log.info("placed %s (verified)", name)

    # ------------------------------------------------------------------ repeated passes
    def watch(self, interval_s: float, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        while True:
            report(self.run_pass())
            if stop.wait(interval_s):
                return

    def run_pass(self) -> SyncResult | str:
        try:
            return self.sync()
        except SyncError as exc:
            return str(exc)

    def versions(self) -> dict[str, list[int]]:
        """Versions on disk per model (each one placed whole and verified)."""
        out: dict[str, list[int]] = {}
        if self.dest.is_dir():
            for mdir in sorted(p for p in self.dest.iterdir() if p.is_dir() and not p.name.startswith(".")):
                out[mdir.name] = sorted(int(p.name) for p in mdir.iterdir() if p.is_dir() and p.name.isdigit())
        return out


def publish(src: Path, store) -> list[str]:
    """Upload a built repository and write one publish index per model (sha256 of every file a manifest does
    not cover). Each version's manifest is uploaded after its files, each index after its model's files."""
    src = Path(src)
    done = []
    for mdir in sorted(p for p in src.iterdir() if (p / "config.pbtxt").is_file()):
        index: dict[str, str] = {}
        files = sorted(p for p in mdir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        manifested = {p.parent.name for p in files if p.name == MANIFEST and p.parent.parent == mdir}
        for p in sorted(files, key=lambda p: p.name == MANIFEST):
            rel = p.relative_to(mdir).as_posix()
            top = rel.split("/")[0]
            if not (top.isdigit() and top in manifested):
                index[rel] = sha256_file(p)
            store.put_file(f"{mdir.name}/{rel}", p)
        empty = [int(v.name) for v in sorted(mdir.iterdir()) if v.is_dir() and v.name.isdigit()
                 and not any(p.is_file() for p in v.rglob("*"))]  # no key in a store can stand for them
        store.put_bytes(_index_key(mdir.name), json.dumps({"model": mdir.name, "files": index,
                                                           "empty_versions": empty}, indent=1,
                                                          sort_keys=True).encode())
        done.append(mdir.name)
    return done


def report(res: SyncResult | str) -> None:
    if isinstance(res, str):
        log.error("sync failed: %s", res)
        return
    for name in res.refused:
        log.error("refused: %s", name)
    for name in res.ignored:
        log.warning("not placed (in no manifest or publish index): %s", name)
    log.info("sync: %d placed, %d unchanged, %d refused%s", len(res.placed), res.unchanged, len(res.refused),
             f"; models without a servable version: {res.unservable}" if res.unservable else "")


class _Handler(BaseHTTPRequestHandler):
    sync: ModelSync

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/healthz":
            self._send(200, {"ok": True})
        elif self.path == "/versions":
            last = self.sync.last
            self._send(200, {"versions": self.sync.versions(), "lastSyncAt": self.sync.last_at,
                             "last": last.as_dict() if last else None})
        else:
            self._send(404, {"error": "GET /healthz, /versions; POST /sync"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/sync":
            self._send(404, {"error": "POST /sync"})
            return
        res = self.sync.run_pass()
        report(res)
        if isinstance(res, str):
            self._send(503, {"error": res})
        else:
            self._send(200, {**res.as_dict(), "versions": self.sync.versions()})

    def log_message(self, fmt: str, *args) -> None:
        log.debug(fmt, *args)


def serve(sync: ModelSync, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """``POST /sync`` runs a pass now and answers with its result and the versions on disk (what the operator
    calls before it loads a version on the pod); ``GET /versions``; ``GET /healthz``."""
    handler = type("Handler", (_Handler,), {"sync": sync})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="modelsync-http", daemon=True).start()
    return server


def sidecar_url(pod: dict) -> str | None:
    """``http://<pod IP>:<port>`` of a pod's models-sync sidecar (a container port named ``modelsync``)."""
    ip = (pod.get("status") or {}).get("podIP")
    for c in (pod.get("spec") or {}).get("containers") or []:
        for port in c.get("ports") or []:
            if port.get("name") == "modelsync" and ip:
                return f"http://{ip}:{int(port['containerPort'])}"
    return None


def ensure_versions(url: str, versions: dict[str, list[int]], timeout_s: float = 300.0) -> None:
    """Ask a sidecar for a pass now (``POST /sync``) and raise SyncError naming every wanted version it does not
    hold afterwards, with what it refused (a corrupt object is why a load would fail)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + "/sync", data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        raise SyncError(f"models-sync sidecar {url}: POST /sync failed: {exc}") from exc
    held = body.get("versions") or {}
    missing = [f"{m}/{v}" for m, vs in sorted(versions.items()) for v in vs if v not in held.get(m, [])]
    if missing:
        refused = "; ".join(body.get("refused") or []) or "nothing refused: not in the store?"
        raise SyncError(f"the pod's models-sync sidecar does not hold {', '.join(missing)} ({refused})")


def sync_pod_first(load, pods, timeout_s: float = 300.0):
    """Wrap ``KubePool.load_versions(iid, versions, only=None)``: the pod's sidecar syncs first, and a version it
    does not hold is refused by name before Triton is asked to load it. ``pods()`` maps pod names to Pod objects;
    a pod without a ``modelsync`` port (a volume-based repository) is loaded as before."""

    def load_versions(iid: str, versions: dict[str, list[int]], only: list[str] | None = None) -> None:
        url = sidecar_url(pods().get(iid) or {})
        if url is not None:
            wanted = versions if only is None else {m: v for m, v in versions.items() if m in only}
            ensure_versions(url, wanted, timeout_s)
        return load(iid, versions, only=only)

    return load_versions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recserve.control.kube.modelsync", description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="src", required=True, help="s3://bucket/prefix (or a directory); with "
                   "--publish: the built model repository")
    p.add_argument("--to", dest="dest", required=True, help="the local model repository (an emptyDir the Triton "
                   "container mounts read-only); with --publish: s3://bucket/prefix")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="one pass (initContainer; the default)")
    mode.add_argument("--watch", action="store_true", help="a pass every --interval seconds (sidecar)")
    mode.add_argument("--publish", action="store_true", help="upload --from to --to with the publish indexes")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between --watch passes")
    p.add_argument("--port", type=int, default=0, help="with --watch: serve POST /sync, GET /versions (0: off)")
    p.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL") or None,
                   help="S3 API endpoint (MinIO, Ceph RGW, ...; default: $AWS_ENDPOINT_URL, then AWS)")
    p.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.publish:
        store = open_store(parse_target(a.dest, a.endpoint_url, a.region))
        print("published:", " ".join(publish(Path(a.src), store)))
        return 0
    sync = ModelSync(open_store(parse_target(a.src, a.endpoint_url, a.region)), Path(a.dest))
    if a.watch:
        if a.port:
            serve(sync, a.port)
        try:
            sync.watch(a.interval)
        except KeyboardInterrupt:
            pass
        return 0
    res = sync.run_pass()
    report(res)
    # The pod may start when every model can serve: a refused NEW version is named in the log and left out (the
    # operator refuses a rollout to a version that is not there), it does not keep new pods from starting.
    if isinstance(res, str) or res.unservable:
        print(f"modelsync: the repository at {a.dest} cannot serve: "
              f"{res if isinstance(res, str) else 'models ' + ', '.join(res.unservable)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
