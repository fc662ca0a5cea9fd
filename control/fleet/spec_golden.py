"""Golden checks from a serving spec: the user's models, their golden requests and comparison rules.

Same contract as ``Golden`` (expected answers per exact version set, cached, never an instance's own answer), for
any repository: expected answers come per model from the spec's source, the reference outside Triton
(``control/spec/reference.py``) on exactly the versions the instance must serve, or the answers recorded in the
golden file, and then only for the versions the spec names. Answers are compared by the spec's rule per output.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from recserve.control.client import RecClient
from recserve.control.fleet.golden import SOURCE_RECORDED, SOURCE_REFERENCE, Expected, Golden, _Entry
from recserve.control.spec.compare import Answer, batched, compare_answer, drift_of, unbatched
from recserve.control.spec.spec import ServingSpec


class SpecGolden(Golden):
    """``Golden`` for the models a serving spec names."""

    def __init__(self, spec: ServingSpec, metrics=None, event: Callable[[str], None] | None = None,
                 retry_s: float = 30.0, active_s: float = 60.0, reference_cls=None):
        if reference_cls is None:
            from recserve.control.spec.reference import Reference as reference_cls
        self.spec = spec
        self.repository = spec.repository
        self.path = spec.path
        n = max(len(m.golden) for m in spec.models.values())
        self.request_set = [{name: m.golden[i % len(m.golden)].inputs for name, m in spec.models.items()}
                            for i in range(n)]
        self.requests = self.request_set[0]
        self.score_tol = 0.0
        self.metrics = metrics
        self.event = event or (lambda message: None)
        self.retry_s = retry_s
        self.active_s = active_s
        self.reference_cls = reference_cls
        self.reference = self._reference_answers
        self._cache: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._compute = threading.Lock()
        self._publish()

    def _reference_answers(self, models: list[str], latest: Mapping[str, int],
                           requests: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Answer]:
        ref = self.reference_cls(self.repository, dict(latest))
        out = {}
        for name in models:
            m = self.spec.models[name]
            out[name] = unbatched(m, ref.infer(name, batched(m, requests[name])))
        return out

    def _recorded(self, name: str, latest: Mapping[str, int]) -> tuple[Answer | None, str]:
        m = self.spec.models[name]
        differ = {s: (latest.get(s), v) for s, v in m.recorded_versions.items() if latest.get(s) != v}
        if differ:
            return None, (f"{m.golden_file} holds answers for other versions of {name} (serving vs recorded: "
                          f"{differ})")
        return dict(m.golden[0].expected), ""

    def _determine(self, versions: Mapping[str, list[int]]) -> _Entry:
        latest = {m: max(v) for m, v in versions.items() if v}
        answers: dict[str, Answer] = {}
        problems: list[str] = []
        by_reference = [n for n, m in self.spec.models.items() if m.expected == "reference"]
        if by_reference:
            try:
                answers.update(self._reference_answers(by_reference, latest, self.requests))
            except Exception as exc:  # noqa: BLE001 - any failure of the reference is reported, never swallowed
                problems.append(f"the reference failed: {type(exc).__name__}: {str(exc)[:300]}")
        for name, m in self.spec.models.items():
            if m.expected == "recorded":
                got, why = self._recorded(name, latest)
                if got is None:
                    problems.append(why)
                else:
                    answers[name] = got
        source = SOURCE_RECORDED if any(m.expected == "recorded" for m in self.spec.models.values()) \
            else SOURCE_REFERENCE
        if problems:
            return _Entry(None, "; ".join(problems), time.time())
        return _Entry(Expected(answers, source), "", time.time())

    def ask(self, client: RecClient, requests: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Answer]:
        out = {}
        for name, m in self.spec.models.items():
            types = {t.name: t.datatype for t in m.info.inputs}
            got = client.infer(name, batched(m, requests[name]), types, [t.name for t in m.info.outputs])
            out[name] = unbatched(m, got)
        return out

    def compare(self, got: dict[str, Answer], exp: Expected) -> str:
        for name, want in exp.answers.items():
            have = got.get(name)
            if have is None:
                return f"{name}: no answer"
            diff = compare_answer(self.spec.models[name].outputs, have, want)
            if diff:
                return "; ".join(f"{name}.{o}: {why}" for o, why in diff.items())
        return ""

    def drift(self, pairs: list[tuple[dict[str, Answer], dict[str, Answer]]], default_min: float
              ) -> dict[str, tuple[float, float]]:
        """Per model, (agreement, minimum) of a new version's golden answers with the serving version's over
        ``pairs`` of (old, new) answers: ``drift_of`` for each model of the spec."""
        return {name: drift_of(m, [(old[name], new[name]) for old, new in pairs], default_min)
                for name, m in self.spec.models.items()}
