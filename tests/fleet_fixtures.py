"""Shared helpers for the control-plane tests: a recording load client and process/port hygiene checks."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Record:
    t: float
    model: str
    ok: bool
    latency_s: float
    error: str = ""
    ids: tuple = ()
    user: int = -1


@dataclass
class LoadClient:
    """Bounded closed-loop client through HAProxy: ``threads`` workers, each one request at a time, records all.

    ``expect`` (model -> item ids) lets callers count wrong answers as well as failed requests.
    """

    url: str
    threads: int = 2
    max_seconds: float = 120.0
    records: list[Record] = field(default_factory=list)
    expect: dict[str, tuple] | None = None
    #: recommend requests cycle through these user ids
    users: tuple[int, ...] = (7,)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def start(self) -> LoadClient:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _run(self, i: int) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + self.max_seconds
        n = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            model = "recommend" if (n + i) % 2 == 0 else "search"
            n += 1
            t0 = time.monotonic()
            try:
                if model == "recommend":
                    a = grpcclient.InferInput("user_id", [1, 1], "INT64")
                    a.set_data_from_numpy(np.asarray([[self.users[n // 2 % len(self.users)]]], dtype=np.int64))
                    b = grpcclient.InferInput("history", [1, 3], "INT64")
                    b.set_data_from_numpy(np.asarray([[11, 12, 13]], dtype=np.int64))
                    inputs = [a, b]
                else:
                    a = grpcclient.InferInput("query", [1, 1], "BYTES")
                    a.set_data_from_numpy(np.asarray([[b"red running shoes"]], dtype=object))
                    inputs = [a]
                r = client.infer(model, inputs, client_timeout=10.0)
                ids = tuple(int(x) for x in r.as_numpy("item_ids")[0])
                rec = Record(t0, model, True, time.monotonic() - t0, ids=ids)
                rec.user = self.users[(n - 1) // 2 % len(self.users)] if model == "recommend" else -1
            except Exception as exc:  # every failure is data here
                rec = Record(t0, model, False, time.monotonic() - t0, error=str(exc)[:300])
            with self._lock:
                self.records.append(rec)
        client.close()

    def stop(self) -> LoadClient:
        self._stop.set()
        for t in self._workers:
            t.join(30)
        return self

    def mark(self) -> int:
        with self._lock:
            return len(self.records)

    def since(self, start: int) -> list[Record]:
        with self._lock:
            return list(self.records[start:])

    @staticmethod
    def failed(records: list[Record]) -> list[Record]:
        return [r for r in records if not r.ok]

    def wrong(self, records: list[Record]) -> list[Record]:
        if not self.expect:
            return []
        return [r for r in records if r.ok and r.model in self.expect and r.ids != self.expect[r.model]]


#: Users from this id on make the ``fail-high-users`` version fail (golden requests use ids below it).
BAD_USER_FROM = 5000


def make_version(repository, model: str, mode: str = "copy", base: int | None = None) -> int:
    """Write version n+1 of ``model`` from version ``base`` (default: the latest) with a valid manifest.

    ``mode``: ``copy`` (same bytes: a good new version), ``fail-high-users`` (a retrieval graph that errors for
    user ids >= BAD_USER_FROM but passes warmup and the golden requests, so only live traffic and metrics reveal
    it), ``negate-scores`` (float outputs negated: reversed answers), or
    ``corrupt`` (valid manifest first, then one byte of model.onnx flipped: fails its sha256), or ``unloadable``
    (a model.onnx that is not ONNX, with a valid manifest: Triton refuses to load it).
    """
    import shutil
    from pathlib import Path

    import onnx
    from onnx import TensorProto, helper

    from recserve.control.state.snapshots import write_manifest

    mdir = Path(repository) / model
    versions = sorted(int(p.name) for p in mdir.iterdir() if p.is_dir() and p.name.isdigit())
    src = mdir / str(base if base is not None else versions[-1])
    new = versions[-1] + 1
    dst = mdir / str(new)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "manifest.json"))
    if mode == "fail-high-users":
        if model != "retrieval":
            raise ValueError("fail-high-users is a retrieval graph")
        g = onnx.load(str(dst / "model.onnx"))
        out = next(o for o in g.graph.output if o.name == "cand_scores")
        for node in g.graph.node:
            node.output[:] = ["cand_scores_inner" if o == "cand_scores" else o for o in node.output]
        table = helper.make_tensor("bad_table", TensorProto.FLOAT, [BAD_USER_FROM], [0.0] * BAD_USER_FROM)
        g.graph.initializer.append(table)
        g.graph.node.extend([
            helper.make_node("Gather", ["bad_table", "user_id"], ["bad_g"], axis=0),  # out of range: error
            helper.make_node("Add", ["cand_scores_inner", "bad_g"], [out.name]),
        ])
        onnx.save(g, str(dst / "model.onnx"))
    if mode == "negate-scores":  # every float output negated: answers fine, but reversed (wrong)
        g = onnx.load(str(dst / "model.onnx"))
        for out in g.graph.output:
            if out.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            for node in g.graph.node:
                node.output[:] = [out.name + "_pos" if o == out.name else o for o in node.output]
            g.graph.node.append(helper.make_node("Neg", [out.name + "_pos"], [out.name]))
        onnx.save(g, str(dst / "model.onnx"))
    if mode == "unloadable":
        (dst / "model.onnx").write_bytes(b"this is not an onnx graph")
    write_manifest(dst, {"built_at": "test helper", "note": f"{mode} copy of {src.name}"})
    if mode == "corrupt":
        p = dst / "model.onnx"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    elif mode not in ("copy", "fail-high-users", "unloadable", "negate-scores"):
        raise ValueError(f"mode must be copy, fail-high-users, unloadable or corrupt, got {mode!r}")
    return new


BUILT_MODELS = ("retrieval", "ranker", "search_model")


def has_built_versions(repository) -> bool:
    from pathlib import Path

    return all(any((p / "model.onnx").exists() for p in (Path(repository) / m).glob("[0-9]*")) for m in BUILT_MODELS)


def fleet_repository(dest, source=None):
    """A private copy of the model repository for one test module: the real built versions when they exist,
    else tiny ONNX stand-ins with the same contracts (so control-plane tests never wait for training)."""
    import shutil
    from pathlib import Path

    from recserve.control.runtime.triton import DEFAULT_REPOSITORY
    from recserve.control.state.snapshots import MANIFEST, write_manifest

    source = Path(source or DEFAULT_REPOSITORY)
    dest = Path(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*_trt"))
    if has_built_versions(source):
        return dest
    for m in BUILT_MODELS:
        for v in dest.glob(f"{m}/[0-9]*"):
            shutil.rmtree(v)
    _write_fakes(dest)
    for m in BUILT_MODELS:
        if not (dest / m / "1" / MANIFEST).exists():
            write_manifest(dest / m / "1", {"built_at": "test stand-in"})
    return dest


def _write_fakes(repo) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    n_items = 3000

    class Retrieval(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(n_items + 1, 8)

        def forward(self, user_id, history, exclude):
            h = self.e(history).mean(1) + user_id.float() * 0
            sc = (h @ self.e.weight.T).scatter(1, exclude, float("-inf"))
            v, i = torch.topk(sc, 100)
            return i, v

    class Ranker(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(n_items + 1, 8)

        def forward(self, history, candidates):
            return (self.e(candidates) * self.e(history).mean(1, keepdim=True)).sum(-1)

    class Search(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Embedding(50000, 8)
            self.i = nn.Embedding(n_items + 1, 8)

        def forward(self, tokens, user_id):
            q = self.t(tokens).mean(1) + user_id.float() * 0
            v, i = torch.topk(q @ self.i.weight.T, 20)
            return i, v

    z = torch.zeros
    specs = [
        ("retrieval", Retrieval(), ["user_id", "history", "exclude"], ["cand_ids", "cand_scores"],
         (z(2, 1, dtype=torch.long), z(2, 50, dtype=torch.long), z(2, 1000, dtype=torch.long))),
        ("ranker", Ranker(), ["history", "candidates"], ["scores"],
         (z(2, 50, dtype=torch.long), z(2, 100, dtype=torch.long))),
        ("search_model", Search(), ["tokens", "user_id"], ["item_ids", "scores"],
         (z(2, 16, dtype=torch.long), z(2, 1, dtype=torch.long))),
    ]
    for name, model, ins, outs, args in specs:
        d = repo / name / "1"
        d.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(model, args, str(d / "model.onnx"), input_names=ins, output_names=outs,
                          dynamic_axes={n: {0: "b"} for n in ins + outs}, opset_version=17, dynamo=False)


class FleetProcess:
    """A real control plane (``recctl up``) on free ports with a private root; ``close`` stops everything it
    started by pid (control plane, instances, HAProxy) even when the control plane itself is dead."""

    def __init__(self, root, repository, instances: int = 2, up_args: tuple[str, ...] = (), ca=None):
        from pathlib import Path

        from recserve.control.runtime.triton import free_port

        self.root = Path(root)
        self.repository = Path(repository)
        self.instances = instances
        self.up_args = up_args  # extra ``recctl up`` flags, e.g. --tls-cert/--tls-key
        self.ca = ca  # CA file the control API's TLS certificate chains to (None: plaintext)
        self.ports = {"grpc": free_port(), "http": free_port(), "control": free_port(), "metrics": free_port()}
        self._stub = None
        self._channel = None

    # ----------------------------------------------------------------- processes
    def recctl(self, *args: str, timeout: float = 600, check: bool = True):
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "recserve.control.recctl", "--root", str(self.root), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}")
        return r

    def up(self, check: bool = True):
        p = self.ports
        return self.recctl("up", "--repository", str(self.repository), "--grpc-port", str(p["grpc"]),
                           "--http-port", str(p["http"]), "--control-port", str(p["control"]),
                           "--metrics-port", str(p["metrics"]), "--instances", str(self.instances), *self.up_args,
                           check=check)

    def control_pid(self) -> int:
        return int((self.root / "control.pid").read_text())

    def all_pids(self) -> set[int]:
        """Every pid this fleet may own: control plane, instances (from the state db), HAProxy."""
        import sqlite3

        pids: set[int] = set()
        for f in ("control.pid", "haproxy/haproxy.pid", "haproxy/fallback.pid"):
            try:
                pids.add(int((self.root / f).read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        try:
            db = sqlite3.connect(str(self.root / "state.db"))
            pids |= {int(r[0]) for r in db.execute("SELECT pid FROM instances") if r[0]}
            db.close()
        except sqlite3.Error:
            pass
        for p in self.root.glob("instances/*/triton.pid"):
            try:
                pids.add(int(p.read_text()))
            except (OSError, ValueError):
                pass
        return pids

    def close(self) -> None:
        import os
        import signal

        pids = self.all_pids()
        try:
            self.recctl("down", "--repository", str(self.repository), timeout=120, check=False)
        finally:
            if self._channel is not None:
                self._channel.close()
            for pid in pids:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass

    # ----------------------------------------------------------------- API
    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    @property
    def stub(self):
        from recserve.control.api.proto import control_pb2_grpc as pbg
        from recserve.control.api.tls import control_channel

        if self._stub is None:
            self._channel = control_channel(f"127.0.0.1:{self.ports['control']}", self.ca is not None, self.ca)
            self._stub = pbg.ControlPlaneStub(self._channel)
        return self._stub

    def reconnect(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._stub = self._channel = None

    @property
    def auth(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {(self.root / 'token').read_text().strip()}")]

    def status(self) -> dict:
        import json

        return json.loads(self.recctl("status", "--json").stdout)

    def wait(self, predicate, timeout: float = 180.0, what: str = "condition", interval: float = 0.3):
        """Poll ``predicate(status)`` until truthy; fail with the last status."""
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            try:
                st = self.status()
                if predicate(st):
                    return st
            except AssertionError:
                pass
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last status: {st}")


def by_role(status: dict, role: str) -> list[dict]:
    return [i for i in status["instances"] if i["role"] == role]


def all_healthy_exact(status: dict, n: int = 2) -> bool:
    """n instances, all healthy, one primary, each serving exactly the desired versions."""
    inst = status["instances"]
    if len(inst) != n or any(i["state"] != "healthy" for i in inst) or len(by_role(status, "primary")) != 1:
        return False
    return all({m: i["models"].get(m) for m in status["desired"]} == status["desired"] for i in inst)


@contextlib.contextmanager
def running_fleet(base: Path, ready: Callable[[dict], bool] = all_healthy_exact,
                  what: str = "two healthy instances on the desired versions", **kw) -> Iterator[FleetProcess]:
    """The shared shape of the fleet-backed test modules' fixtures: a fleet on a copy of the repository under
    ``base`` (``kw`` go to ``FleetProcess``), up and waited for ``ready``; closed and ``base`` removed after."""
    f = FleetProcess(base / "runtime", fleet_repository(base / "model_repository"), **kw)
    try:
        f.up()
        f.wait(ready, what=what)
        yield f
    finally:
        f.close()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def pool_router(tmp_path: Path, slots: int = 2, knee_rps: float = 400) -> Iterator:
    """A real HAProxy under a Router with two healthy actives (t1, t2 in slots 0 and 1, bound to ports nothing
    listens on) in the pool, the route on it, SLO p99 50 ms: yields (router, its config, the state store)."""
    from recserve.control.routing.router import Router, RouterConfig
    from recserve.control.runtime.procs import free_port
    from recserve.control.state.store import InstanceRecord, State

    cfg = RouterConfig(workdir=tmp_path / "haproxy", grpc_port=free_port(), http_port=free_port(), slots=slots,
                       fallback=False, knee_rps=knee_rps, slo_p99_ms=50)
    state = State(tmp_path / "state.db")
    for iid, slot in (("t1", 0), ("t2", 1)):
        state.save_instance(InstanceRecord(id=iid, slot=slot, role="active", state="healthy", grpc_port=1111 + slot,
                                           http_port=2222 + slot, metrics_port=0, workdir="w"))
    router = Router(cfg, state)
    router.start()
    try:
        for slot in (0, 1):
            router.bind(slot, 1111 + slot, 2222 + slot)
        router.set_pool({0, 1})
        router.route("pool")
        yield router, cfg, state
    finally:
        router.stop()
