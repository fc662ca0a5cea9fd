"""Golden requests and their expected answers, for deep health checks and rollout gates.

Expected answers come from the build: ``build.reference`` (the in-process pipeline) run on the exact versions an
instance must serve. Where that module is not available yet, the first answer of an instance that has just loaded
exactly those versions and passed Triton's warmup becomes the expectation for that version set (recorded as
``source = "first-answer"``); from then on every other instance, and the same one later, must agree with it.
Ids must match exactly; scores within ``score_tol``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from recserve.control.client import RecClient, Result

DEFAULT_REQUESTS: dict[str, dict] = {
    "recommend": {"user_id": 7, "history": [11, 12, 13]},
    "search": {"query": "red running shoes", "user_id": None},
}


@dataclass
class Expected:
    answers: dict[str, Result]
    source: str


@dataclass
class CheckResult:
    ok: bool
    reason: str = ""
    latency_s: dict[str, float] = field(default_factory=dict)


def load_requests(path: Path | None) -> dict[str, dict]:
    """One recommend and one search request from ``artifacts/golden.json`` when present, else the defaults."""
    reqs = {k: dict(v) for k, v in DEFAULT_REQUESTS.items()}
    if path is None or not Path(path).exists():
        return reqs
    try:
        data = json.loads(Path(path).read_text())
    except ValueError:
        return reqs
    for model in ("recommend", "search"):
        entry = data.get(model)
        if isinstance(entry, list) and entry:
            entry = entry[0]
        if isinstance(entry, dict):
            entry = entry.get("inputs", entry.get("request", entry))
            if model == "recommend" and "user_id" in entry:
                reqs[model] = {"user_id": int(entry["user_id"]), "history": [int(x) for x in entry.get("history", [])]}
            if model == "search" and "query" in entry:
                uid = entry.get("user_id")
                reqs[model] = {"query": str(entry["query"]), "user_id": None if uid is None else int(uid)}
    return reqs


def golden_request_set(requests: dict[str, dict], path: Path | None = None) -> list[dict[str, dict]]:
    """Several request pairs for answer comparisons: every entry of ``artifacts/golden.json`` when present,
    else the golden request plus a few variations (other users, histories, queries)."""
    try:
        data = json.loads(Path(path).read_text()) if path is not None else {}
        recs = [e for e in data.get("recommend", []) if isinstance(e, dict) and "user_id" in e]
        srch = [e for e in data.get("search", []) if isinstance(e, dict) and "query" in e]
    except (OSError, ValueError, AttributeError):
        recs, srch = [], []
    if recs and srch:
        n = max(len(recs), len(srch))
        return [{"recommend": {"user_id": int(recs[i % len(recs)]["user_id"]),
                               "history": [int(x) for x in recs[i % len(recs)].get("history", [])]},
                 "search": {"query": str(srch[i % len(srch)]["query"]),
                            "user_id": None if srch[i % len(srch)].get("user_id") is None
                            else int(srch[i % len(srch)]["user_id"])}} for i in range(n)]
    r, s = requests["recommend"], requests["search"]
    out = [requests]
    for i, (uid, hist, query) in enumerate([(1, [5, 9], "phone case"), (42, [100, 200, 300, 400], "coffee mug"),
                                            (77, [31], "kids toy car")]):
        out.append({"recommend": {"user_id": uid, "history": list(r["history"])[:1] + hist},
                    "search": {"query": query if i else s["query"] + " sale", "user_id": s.get("user_id")}})
    return out


def ask(client: RecClient, requests: dict[str, dict]) -> dict[str, Result]:
    r = requests["recommend"]
    s = requests["search"]
    return {"recommend": client.recommend(r["user_id"], r["history"]),
            "search": client.search(s["query"], s["user_id"])}


def reference_pipeline(repository: Path, versions: dict[str, list[int]]):
    """``build.reference.Reference`` on exactly ``versions`` (it picks the latest by itself), or None."""
    try:
        from recserve.build import reference as R  # the build's in-process pipeline
    except Exception:
        return None
    try:
        dirs = {m: Path(repository) / m / str(max(versions[m])) for m in R.MODELS}
    except (KeyError, ValueError, AttributeError):
        return None
    try:
        ref = R.Reference.__new__(R.Reference)
        ref.versions = dirs
        ref.sessions = {m: R.ort_session(d / "model.onnx", 1) for m, d in dirs.items()}
        ref.tokenizer = R.load_tokenizer()
        return ref
    except Exception:
        return None


def _reference_answers(repository: Path, versions: dict[str, list[int]], requests: dict[str, dict]):
    """Answers of the build's reference pipeline for exactly ``versions``, or None when it is not usable."""
    ref = reference_pipeline(repository, versions)
    if ref is None:
        return None
    try:
        r, s = requests["recommend"], requests["search"]
        rec = ref.recommend(r["user_id"], r["history"])
        srch = ref.search(s["query"], s["user_id"])
        return {"recommend": _as_result(rec), "search": _as_result(srch)}
    except Exception:
        return None


def _as_result(x) -> Result:
    if isinstance(x, Result):
        return x
    if isinstance(x, dict):
        return Result([int(i) for i in x["item_ids"]], [float(s) for s in x["scores"]])
    ids, scores = x
    return Result([int(i) for i in list(ids)], [float(s) for s in list(scores)])


class Golden:
    """Expected answers per exact version set, cached; thread-safe."""

    def __init__(self, repository: Path, requests: dict[str, dict] | None = None, score_tol: float = 1e-3,
                 store: tuple[Callable[[str], str | None], Callable[[str, str], None]] | None = None):
        """``store`` = (get, put) of a durable key-value store: first-answer expectations survive a control-plane
        restart, so an instance that went wrong meanwhile cannot become the reference."""
        self.repository = Path(repository)
        self.store = store
        path = self.repository.parent / "artifacts" / "golden.json"
        if not path.exists():
            from recserve.control.triton import REPO_ROOT

            path = REPO_ROOT / "artifacts" / "golden.json"
        self.requests = requests or load_requests(path)
        self.request_set = golden_request_set(self.requests, path)
        self.score_tol = score_tol
        self._cache: dict[str, Expected] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(versions: dict[str, list[int]]) -> str:
        return json.dumps({m: sorted(v) for m, v in sorted(versions.items())})

    def expected(self, versions: dict[str, list[int]], first_answer: Callable[[], dict[str, Result]] | None = None
                 ) -> Expected | None:
        k = self.key(versions)
        with self._lock:
            if k in self._cache:
                return self._cache[k]
        ans = _reference_answers(self.repository, versions, self.requests)
        exp = Expected(ans, "build.reference") if ans else None
        if exp is None and self.store is not None:
            saved = self.store[0](f"golden:{k}")
            if saved:
                d = json.loads(saved)
                exp = Expected({m: Result(v["item_ids"], v["scores"]) for m, v in d.items()}, "first-answer")
        if exp is None and first_answer is not None:
            exp = Expected(first_answer(), "first-answer")
            if self.store is not None:
                self.store[1](f"golden:{k}", json.dumps({m: {"item_ids": r.item_ids, "scores": r.scores}
                                                          for m, r in exp.answers.items()}))
        if exp is not None:
            with self._lock:
                self._cache.setdefault(k, exp)
                return self._cache[k]
        return None

    def forget(self, versions: dict[str, list[int]]) -> None:
        with self._lock:
            self._cache.pop(self.key(versions), None)

    def compare(self, got: dict[str, Result], exp: Expected) -> str:
        """Empty string when ``got`` matches ``exp``; else what differs."""
        for model, want in exp.answers.items():
            have = got.get(model)
            if have is None:
                return f"{model}: no answer"
            if list(have.item_ids) != list(want.item_ids):
                return f"{model}: item ids {have.item_ids[:5]}... differ from expected {want.item_ids[:5]}..."
            worst = max((abs(a - b) for a, b in zip(have.scores, want.scores, strict=False)), default=0.0)
            if worst > self.score_tol * max(1.0, max((abs(b) for b in want.scores), default=1.0)):
                return f"{model}: scores differ by {worst:.4g} (> tolerance {self.score_tol})"
        return ""
