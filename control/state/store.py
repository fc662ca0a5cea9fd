"""Durable control-plane state in SQLite (WAL): desired versions, instance membership, rollout journal, events.

Every mutation is one short transaction, so a control plane killed with SIGKILL at any point restarts from a
consistent record: what each instance must serve, which rollout was in which phase, and why.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS desired (
  model TEXT PRIMARY KEY, versions TEXT NOT NULL, last_good TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
  id TEXT PRIMARY KEY, slot INTEGER NOT NULL UNIQUE, role TEXT NOT NULL, state TEXT NOT NULL,
  pid INTEGER NOT NULL DEFAULT 0, grpc_port INTEGER NOT NULL, http_port INTEGER NOT NULL,
  metrics_port INTEGER NOT NULL, workdir TEXT NOT NULL, versions TEXT NOT NULL, weight INTEGER NOT NULL DEFAULT 0,
  restarts INTEGER NOT NULL DEFAULT 0, detail TEXT NOT NULL DEFAULT '', last_healthy REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rollouts (
  id TEXT PRIMARY KEY, model TEXT NOT NULL, from_version INTEGER NOT NULL, to_version INTEGER NOT NULL,
  strategy TEXT NOT NULL, steps TEXT NOT NULL, bake_seconds REAL NOT NULL, gates TEXT NOT NULL,
  phase TEXT NOT NULL, status TEXT NOT NULL, canary TEXT NOT NULL DEFAULT '', failed_gate TEXT NOT NULL DEFAULT '',
  failed_value REAL NOT NULL DEFAULT 0, threshold REAL NOT NULL DEFAULT 0, started REAL NOT NULL,
  finished REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rollout_events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, rollout_id TEXT NOT NULL, ts REAL NOT NULL, phase TEXT NOT NULL,
  message TEXT NOT NULL, weight INTEGER NOT NULL, gates TEXT NOT NULL, status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL, instance TEXT NOT NULL,
  message TEXT NOT NULL);
"""


@dataclass
class InstanceRecord:
    """One Triton instance as the control plane knows it; ``versions`` is exactly what it must serve."""

    id: str
    slot: int
    role: str
    state: str
    grpc_port: int
    http_port: int
    metrics_port: int
    workdir: str
    versions: dict[str, list[int]] = field(default_factory=dict)
    pid: int = 0
    restarts: int = 0
    detail: str = ""
    last_healthy: float = 0.0


@dataclass
class RolloutRecord:
    id: str
    model: str
    from_version: int
    to_version: int
    strategy: str
    steps: list[int]
    bake_seconds: float
    gates: dict[str, float]
    phase: str
    status: str
    started: float
    canary: str = ""
    failed_gate: str = ""
    failed_value: float = 0.0
    threshold: float = 0.0
    finished: float = 0.0


class State:
    """Thread-safe access to the state database (one connection, serialised by a lock)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def transaction(self):
        """``with state.transaction(): ...`` groups several writes atomically."""
        return _Tx(self)

    # ---------------------------------------------------------------- kv
    def get(self, key: str, default: str | None = None) -> str | None:
        rows = self._exec("SELECT value FROM kv WHERE key=?", (key,))
        return rows[0]["value"] if rows else default

    def put(self, key: str, value: str) -> None:
        self._exec("INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                   (key, value))

    # ---------------------------------------------------------------- desired versions
    def desired(self) -> dict[str, list[int]]:
        return {r["model"]: json.loads(r["versions"]) for r in self._exec("SELECT * FROM desired ORDER BY model")}

    def last_good(self, model: str) -> list[int] | None:
        rows = self._exec("SELECT last_good FROM desired WHERE model=?", (model,))
        return json.loads(rows[0]["last_good"]) if rows else None

    def set_desired(self, model: str, versions: list[int], last_good: list[int] | None = None) -> None:
        prev = self.last_good(model)
        good = last_good if last_good is not None else (prev if prev is not None else versions)
        self._exec(
            "INSERT INTO desired(model, versions, last_good) VALUES(?, ?, ?) "
            "ON CONFLICT(model) DO UPDATE SET versions=excluded.versions, last_good=excluded.last_good",
            (model, json.dumps(sorted(versions)), json.dumps(sorted(good))),
        )

    # ---------------------------------------------------------------- instances
    def instances(self) -> list[InstanceRecord]:
        return [_instance(r) for r in self._exec("SELECT * FROM instances ORDER BY slot")]

    def instance(self, instance_id: str) -> InstanceRecord | None:
        rows = self._exec("SELECT * FROM instances WHERE id=?", (instance_id,))
        return _instance(rows[0]) if rows else None

    def save_instance(self, rec: InstanceRecord) -> None:
        d = asdict(rec)
        d["versions"] = json.dumps(rec.versions, sort_keys=True)
        cols = ", ".join(d)
        marks = ", ".join("?" for _ in d)
        updates = ", ".join(f"{k}=excluded.{k}" for k in d if k != "id")
        self._exec(f"INSERT INTO instances({cols}) VALUES({marks}) ON CONFLICT(id) DO UPDATE SET {updates}",
                   tuple(d.values()))

    def update_instance(self, instance_id: str, **fields: object) -> None:
        if "versions" in fields:
            fields["versions"] = json.dumps(fields["versions"], sort_keys=True)
        sets = ", ".join(f"{k}=?" for k in fields)
        self._exec(f"UPDATE instances SET {sets} WHERE id=?", (*fields.values(), instance_id))

    def delete_instance(self, instance_id: str) -> None:
        self._exec("DELETE FROM instances WHERE id=?", (instance_id,))

    # ---------------------------------------------------------------- rollouts
    def save_rollout(self, r: RolloutRecord) -> None:
        d = asdict(r)
        d["steps"] = json.dumps(r.steps)
        d["gates"] = json.dumps(r.gates)
        cols = ", ".join(d)
        marks = ", ".join("?" for _ in d)
        updates = ", ".join(f"{k}=excluded.{k}" for k in d if k != "id")
        self._exec(f"INSERT INTO rollouts({cols}) VALUES({marks}) ON CONFLICT(id) DO UPDATE SET {updates}",
                   tuple(d.values()))

    def rollout(self, rollout_id: str) -> RolloutRecord | None:
        rows = self._exec("SELECT * FROM rollouts WHERE id=?", (rollout_id,))
        return _rollout(rows[0]) if rows else None

    def latest_rollout(self, model: str | None = None) -> RolloutRecord | None:
        if model:
            rows = self._exec("SELECT * FROM rollouts WHERE model=? ORDER BY started DESC LIMIT 1", (model,))
        else:
            rows = self._exec("SELECT * FROM rollouts ORDER BY started DESC LIMIT 1")
        return _rollout(rows[0]) if rows else None

    def running_rollouts(self) -> list[RolloutRecord]:
        return [_rollout(r) for r in self._exec("SELECT * FROM rollouts WHERE status='running' ORDER BY started")]

    def add_rollout_event(self, rollout_id: str, phase: str, message: str, weight: int = 0,
                          gates: dict[str, float] | None = None, status: str = "running") -> dict:
        ev = {"ts": time.time(), "phase": phase, "message": message, "weight": weight, "gates": gates or {},
              "status": status}
        self._exec(
            "INSERT INTO rollout_events(rollout_id, ts, phase, message, weight, gates, status) VALUES(?,?,?,?,?,?,?)",
            (rollout_id, ev["ts"], phase, message, weight, json.dumps(ev["gates"]), status),
        )
        return ev

    def rollout_events(self, rollout_id: str, after_seq: int = 0) -> list[dict]:
        rows = self._exec("SELECT * FROM rollout_events WHERE rollout_id=? AND seq>? ORDER BY seq",
                          (rollout_id, after_seq))
        return [{"seq": r["seq"], "ts": r["ts"], "phase": r["phase"], "message": r["message"], "weight": r["weight"],
                 "gates": json.loads(r["gates"]), "status": r["status"]} for r in rows]

    # ---------------------------------------------------------------- events
    def event(self, kind: str, message: str, instance: str = "") -> None:
        self._exec("INSERT INTO events(ts, kind, instance, message) VALUES(?,?,?,?)",
                   (time.time(), kind, instance, message))

    def events(self, limit: int = 20, kind: str | None = None) -> list[dict]:
        if kind:
            rows = self._exec("SELECT * FROM events WHERE kind=? ORDER BY seq DESC LIMIT ?", (kind, limit))
        else:
            rows = self._exec("SELECT * FROM events ORDER BY seq DESC LIMIT ?", (limit,))
        return [dict(r) for r in reversed(rows)]


class _Tx:
    def __init__(self, state: State):
        self.state = state

    def __enter__(self) -> State:
        self.state._lock.acquire()
        self.state._db.execute("BEGIN IMMEDIATE")
        return self.state

    def __exit__(self, exc_type, *rest: object) -> None:
        try:
            self.state._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.state._lock.release()


def _instance(r: sqlite3.Row) -> InstanceRecord:
    d = dict(r)
    # never written: a canary's traffic share is the Router's (its ``weight:<id>`` keys, ``Router.weight``); the
    # column stays so databases and backups made before still open, and ones made now open in older releases
    d.pop("weight", None)
    d["versions"] = {k: list(v) for k, v in json.loads(d["versions"]).items()}
    return InstanceRecord(**d)


def _rollout(r: sqlite3.Row) -> RolloutRecord:
    d = dict(r)
    d["steps"] = json.loads(d["steps"])
    d["gates"] = json.loads(d["gates"])
    return RolloutRecord(**d)
