"""Golden requests and their expected answers, for deep health checks and rollout gates.

Expected answers come from ``build.reference`` (numpy + onnxruntime, the served Python steps' own modules, no
torch) run on exactly the versions an instance must serve. An instance's own answer is never the truth.
When the reference cannot compute them, that is a loud state (an event, ``recserve_golden_reference_ok`` 0,
``recserve_golden_expectations{source}``, a ``recctl status`` warning) and the documented fallback applies:
the answers the build recorded in ``artifacts/golden.json`` (``expected``), but only for exactly the versions
they were recorded for. For any other version set there is no expectation and the golden check fails.

This module owns the golden requests too (one copy): the build's ``artifacts/golden.json`` when it exists,
else ``DEFAULT_SET`` (a repository without a build's golden.json, such as a fixture repository).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from recserve.control.client import RecClient, Result

#: Golden request pairs used when no build wrote artifacts/golden.json; the first pair is the deep-check one.
DEFAULT_SET: list[dict[str, dict]] = [
    {"recommend": {"user_id": uid, "history": hist}, "search": {"query": query, "user_id": None}}
    for uid, hist, query in [(7, [11, 12, 13], "red running shoes"), (1, [11, 5, 9], "red running shoes sale"),
                             (42, [11, 100, 200, 300, 400], "coffee mug"), (77, [11, 31], "kids toy car")]
]

SOURCE_REFERENCE = "build.reference"
SOURCE_RECORDED = "golden.json (recorded at build time)"
SOURCE_NONE = "none"
SOURCES = (SOURCE_REFERENCE, SOURCE_RECORDED, SOURCE_NONE)


@dataclass
class Expected:
    answers: dict[str, Result]
    source: str


def golden_json_path(repository: Path) -> Path:
    """The build's golden.json for ``repository``: ``<repository>/../artifacts/golden.json``, else the checkout's."""
    path = Path(repository).parent / "artifacts" / "golden.json"
    if path.exists():
        return path
    from recserve.control.runtime.triton import REPO_ROOT

    return REPO_ROOT / "artifacts" / "golden.json"


def _read(path: Path | None) -> dict:
    """golden.json as a dict; {} when absent. A file that exists but is not JSON is an error, not a default."""
    if path is None or not Path(path).exists():
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _recommend(e: dict) -> dict:
    return {"user_id": int(e["user_id"]), "history": [int(x) for x in e.get("history", [])]}


def _search(e: dict) -> dict:
    uid = e.get("user_id")
    return {"query": str(e["query"]), "user_id": None if uid is None else int(uid)}


def load_request_set(path: Path | None) -> list[dict[str, dict]]:
    """Golden request pairs: every entry of the build's golden.json (recommend i with search i, the shorter list
    wrapping), else ``DEFAULT_SET``. The first pair is the one deep health asks."""
    data = _read(path)
    recs, srch = data.get("recommend") or [], data.get("search") or []
    if not (recs and srch):
        return [{k: dict(v) for k, v in pair.items()} for pair in DEFAULT_SET]
    n = max(len(recs), len(srch))
    return [{"recommend": _recommend(recs[i % len(recs)]), "search": _search(srch[i % len(srch)])} for i in range(n)]


def load_requests(path: Path | None) -> dict[str, dict]:
    """The deep-check pair: one recommend and one search request."""
    return load_request_set(path)[0]


def ask(client: RecClient, requests: dict[str, dict]) -> dict[str, Result]:
    r = requests["recommend"]
    s = requests["search"]
    return {"recommend": client.recommend(r["user_id"], r["history"]),
            "search": client.search(s["query"], s["user_id"])}


def _as_result(ids, scores) -> Result:
    return Result([int(i) for i in list(ids)], [float(s) for s in list(scores)])


def reference_answers(repository: Path, versions: Mapping[str, int], requests: dict[str, dict]) -> dict[str, Result]:
    """Answers of ``build.reference`` on exactly ``versions``; raises whatever stops it (the caller reports it)."""
    from recserve.build.reference import Reference

    ref = Reference(repository, versions)
    r, s = requests["recommend"], requests["search"]
    return {"recommend": _as_result(*ref.recommend(r["user_id"], r["history"])),
            "search": _as_result(*ref.search(s["query"], s["user_id"]))}


def recorded_answers(path: Path | None, versions: Mapping[str, int]) -> tuple[dict[str, Result] | None, str]:
    """(answers, why not): the build-time expectations of golden.json's first pair, when recorded for ``versions``."""
    data = _read(path)
    exp = data.get("expected")
    if not exp:
        return None, f"{path} records no expected answers (older build: run 'python -m recserve.build.reference')"
    rec_versions = {m: int(v) for m, v in exp["versions"].items()}
    differ = {m: (versions.get(m), v) for m, v in rec_versions.items() if versions.get(m) != v}
    if differ:
        return None, f"{path} has expectations for other versions (serving vs recorded: {differ})"
    return {"recommend": _as_result(exp["recommend"][0]["item_ids"], exp["recommend"][0]["scores"]),
            "search": _as_result(exp["search"][0]["item_ids"], exp["search"][0]["scores"])}, ""


ReferenceFn = Callable[[Path, Mapping[str, int], dict[str, dict]], dict[str, Result]]


@dataclass
class _Entry:
    expected: Expected | None
    problem: str  # empty when the reference computed the answers
    at: float
    asked: float = 0.0  # last time a check asked for it: only version sets in use count in status and metrics


class Golden:
    """Expected answers per exact version set, cached; thread-safe. Never an instance's own answer."""

    def __init__(self, repository: Path, score_tol: float = 1e-3, metrics=None,
                 event: Callable[[str], None] | None = None, retry_s: float = 30.0,
                 reference: ReferenceFn = reference_answers, golden_json: Path | None = None,
                 active_s: float = 60.0):
        """``metrics``: a ``ControlMetrics`` for the golden gauges; ``event``: records a control-plane event;
        ``retry_s``: how soon a failed reference is tried again; ``reference``: computes the answers (tests pass
        a broken one); ``golden_json``: the build's requests and recorded answers (default: beside the
        repository's checkout); ``active_s``: a version set nobody asked about for this long (rolled back,
        say) no longer counts in ``problems()`` and the metrics."""
        self.repository = Path(repository)
        self.path = Path(golden_json) if golden_json is not None else golden_json_path(self.repository)
        self.request_set = load_request_set(self.path)
        self.requests = self.request_set[0]
        self.score_tol = score_tol
        self.metrics = metrics
        self.event = event or (lambda message: None)
        self.retry_s = retry_s
        self.active_s = active_s
        self.reference = reference
        self._cache: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._compute = threading.Lock()  # one reference computation at a time (parallel deep checks)
        self._publish()

    @staticmethod
    def key(versions: Mapping[str, list[int]]) -> str:
        return json.dumps({m: sorted(v) for m, v in sorted(versions.items())})

    def expected(self, versions: Mapping[str, list[int]]) -> Expected | None:
        """Expected answers for an instance serving exactly ``versions``; None when nothing can provide them."""
        k = self.key(versions)
        with self._lock:
            hit = self._cache.get(k)
            if hit is not None:
                hit.asked = time.time()
        if hit is not None and (not hit.problem or time.time() - hit.at < self.retry_s):
            self._publish()
            return hit.expected
        with self._compute:
            with self._lock:
                hit = self._cache.get(k)
            if hit is not None and (not hit.problem or time.time() - hit.at < self.retry_s):
                return hit.expected
            entry = self._determine(versions)
            entry.asked = time.time()
            with self._lock:
                before = self._cache.get(k)
                self._cache[k] = entry
            self._report(versions, before, entry)
            self._publish()
            return entry.expected

    def _determine(self, versions: Mapping[str, list[int]]) -> _Entry:
        latest = {m: max(v) for m, v in versions.items() if v}
        try:
            answers = self.reference(self.repository, latest, self.requests)
            return _Entry(Expected(answers, SOURCE_REFERENCE), "", time.time())
        except Exception as exc:  # noqa: BLE001 - any failure of the reference is reported, never swallowed
            problem = f"the reference failed: {type(exc).__name__}: {str(exc)[:300]}"
        recorded, why = self.recorded(latest)
        if recorded is not None:
            return _Entry(Expected(recorded, SOURCE_RECORDED), problem, time.time())
        return _Entry(None, f"{problem}; no fallback: {why}", time.time())

    def recorded(self, latest: Mapping[str, int]) -> tuple[dict | None, str]:
        """(answers, why not) recorded ahead of time for exactly ``latest``: the documented fallback."""
        try:
            return recorded_answers(self.path, latest)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            return None, f"{self.path} unreadable: {type(exc).__name__}: {exc}"

    def ask(self, client: RecClient, requests: dict[str, dict]) -> dict[str, Result]:
        """The instance's answers to ``requests`` (one of ``request_set``)."""
        return ask(client, requests)

    def drift(self, pairs: list[tuple[dict[str, Result], dict[str, Result]]], default_min: float
              ) -> dict[str, tuple[float, float]]:
        """Per model, (agreement, minimum) of a new version's answers with the serving one's over ``pairs`` of
        (old, new) answers to the golden requests: the mean share of top items in common."""
        shares: dict[str, list[float]] = {}
        for old, new in pairs:
            for m in old:
                a, b = set(old[m].item_ids), set(new[m].item_ids)
                shares.setdefault(m, []).append(len(a & b) / max(1, len(a)))
        return {m: (sum(v) / len(v), default_min) for m, v in shares.items()}

    def _report(self, versions: Mapping[str, list[int]], before: _Entry | None, now: _Entry) -> None:
        src = now.expected.source if now.expected else SOURCE_NONE
        old = (before.expected.source if before.expected else SOURCE_NONE) if before else None
        if before is not None and src == old and bool(now.problem) == bool(before.problem):
            return
        what = f"expected answers for {self.key(versions)}"
        if not now.problem:
            self.event(f"{what} come from {src}" + (" (the reference works again)" if before else ""))
        elif now.expected is not None:
            self.event(f"{what} come from {src}: {now.problem}")
        else:
            self.event(f"NO {what}: {now.problem}; golden checks fail until this is fixed")

    def _publish(self) -> None:
        if self.metrics is None:
            return
        entries = [e for _, e in self._active()]
        self.metrics.golden_reference_ok.set(0 if any(e.problem for e in entries) else 1)
        for s in SOURCES:
            n = sum(1 for e in entries if (e.expected.source if e.expected else SOURCE_NONE) == s)
            self.metrics.golden_expectations.labels(s).set(n)

    def problems(self) -> list[str]:
        """One line per version set whose expectations do not come from the reference (``recctl status``)."""
        return [f"golden answers for {k}: {e.problem}; "
                + (f"using {e.expected.source}" if e.expected else "golden checks fail")
                for k, e in self._active() if e.problem]

    def _active(self) -> list[tuple[str, _Entry]]:
        """Version sets some check asked about within ``active_s``."""
        since = time.time() - self.active_s
        with self._lock:
            return [(k, e) for k, e in self._cache.items() if e.asked >= since]

    def problem(self, versions: Mapping[str, list[int]]) -> str:
        """Why the expectations of ``versions`` do not come from the reference ('' when they do)."""
        with self._lock:
            e = self._cache.get(self.key(versions))
        return e.problem if e else ""

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
