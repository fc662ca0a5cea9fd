"""Degraded answers for the models of a serving spec (``degraded`` in docs/bring-your-own-models.md).

Why: a fleet started with ``recctl up --spec`` sheds requests for models the demo's answers know nothing of. Per
spec model:

- ``degraded: {file: PATH}``: the answer file (``{output: {"content": [...], "shape": [...]}}`` for every output,
  without the batch dimension; read and checked against config.pbtxt by ``control/spec/spec.py``), the same answer
  for every row of the request's batch (as written for ``max_batch_size: 0``);
- ``degraded: {provider: popular_items | lexical_search}``: the demo's answers (``answers.py``), for models whose
  outputs are ``item_ids`` INT64 [N] and ``scores`` FP32 [N] (the spec refuses any other): ``popular_items`` the
  most popular items of the build's data (the categories of an integer ``history`` input first, when the model has
  one), ``lexical_search`` the items whose titles hold the words of the model's BYTES query input (``query``, else
  its first BYTES input). On the demo's own ensembles (``CONTRACT_MODELS`` in a repository that has their rule
  modules) the provider is exactly today's answer, with the served steps' rules (``contract.py``);
- no ``degraded``: no degraded answer. HAProxy sends such a model's shed requests its refusal (``haproxy.py``,
  ``no_degraded_models``); one that reaches this server anyway gets the same words (RESOURCE_EXHAUSTED / 429).

Every request is first validated against the model's config (``contract.validate`` on ``spec_of(info)``), so the
fallback refuses what Triton would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.control.fallback.answers import TOP_N, FallbackAnswers
from recserve.control.fallback.contract import (
    CONTRACT_MODELS,
    RULE_FILES,
    EnsembleSpec,
    Tensor,
    load_specs,
    recommend_rows,
    search_queries,
    spec_of,
)
from recserve.control.spec.repository import ModelInfo
from recserve.control.spec.spec import ServingSpec, read_degraded_answer

__all__ = ["Answerer", "ModelAnswers", "demo_models", "has_rules", "spec_models"]

#: (validated tensors, batch size) -> output arrays by name.
Answerer = Callable[[dict[str, Tensor], int], dict[str, np.ndarray]]
#: Which demo answer each provider is.
PROVIDER_KIND = {"popular_items": "recommend", "lexical_search": "search"}


@dataclass
class ModelAnswers:
    """What the fallback serves: each model's contract, and its answerer (None: no degraded answer, refused)."""

    specs: dict[str, EnsembleSpec]
    answerers: dict[str, Answerer | None]


def has_rules(repository: Path) -> bool:
    """True when ``repository`` has the demo's rule modules (the served Python steps' numpy rules)."""
    return all((Path(repository) / step / "1" / name).is_file() for step, name in RULE_FILES.values())


def _demo(answers: Callable[[], FallbackAnswers], repository: Path, model: str, kind: str) -> Answerer:
    if kind == "recommend":
        return lambda t, _b: dict(
            zip(("item_ids", "scores"), answers().recommend(recommend_rows(t, repository, model)), strict=True)
        )
    return lambda t, _b: dict(
        zip(("item_ids", "scores"), answers().search(search_queries(t, repository, model)), strict=True)
    )


def demo_models(answers: Callable[[], FallbackAnswers], repository: Path) -> ModelAnswers:
    """The demo's ensembles (recommend, search and their _trt twins) that ``repository`` has: today's answers."""
    specs = load_specs(repository)
    return ModelAnswers(dict(specs), {m: _demo(answers, repository, m, CONTRACT_MODELS[m]) for m in specs})


def _file(info: ModelInfo, path: Path) -> Answerer:
    answer = read_degraded_answer(path, info)
    if info.max_batch_size == 0:
        return lambda _t, _b: answer
    return lambda _t, b: {n: np.broadcast_to(a, (b, *a.shape)) for n, a in answer.items()}


def _provider(
    info: ModelInfo, provider: str, answers: Callable[[], FallbackAnswers], tokenize: Callable[[str], list[str]]
) -> Answerer:
    width = info.output("item_ids").dims[0]
    n = TOP_N if width == -1 else width
    batching = info.max_batch_size > 0

    def rows(arr: np.ndarray, batch: int) -> np.ndarray:
        return arr.reshape(batch, -1) if batching else arr.reshape(1, -1)

    def shaped(ids: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
        return {"item_ids": ids, "scores": scores} if batching else {"item_ids": ids[0], "scores": scores[0]}

    if provider == "popular_items":
        hist = next(
            (t.name for t in info.inputs if t.name == "history" and t.datatype.startswith(("INT", "UINT"))), None
        )

        def popular(t: dict[str, Tensor], b: int) -> dict[str, np.ndarray]:
            count = b if batching else 1
            h = rows(t[hist][2].astype(np.int64), b) if hist in t else np.zeros((count, 0), np.int64)
            return shaped(*answers().recommend(h, n))

        return popular
    byte_inputs = [t.name for t in info.inputs if t.datatype == "BYTES"]
    query = "query" if "query" in byte_inputs else byte_inputs[0]

    def search(t: dict[str, Tensor], b: int) -> dict[str, np.ndarray]:
        if query not in t:  # an optional query left out: popular items
            words = [[] for _ in range(b if batching else 1)]
        else:
            words = [[w for v in row for w in tokenize(_text(v))] for row in rows(t[query][2], b)]
        return shaped(*answers().search(words, n))

    return search


def _text(v: object) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def spec_models(
    spec: ServingSpec, answers: Callable[[], FallbackAnswers], tokenize: Callable[[str], list[str]]
) -> ModelAnswers:
    """Every spec model's contract, answered as its ``degraded`` says (``answers`` is called on first use of a
    provider only, so a spec of answer files needs no build data)."""
    demo_rules = has_rules(spec.repository)
    demo = load_specs(spec.repository) if demo_rules else {}
    out = ModelAnswers({}, {})
    for name, m in spec.models.items():
        out.specs[name] = demo.get(name) or spec_of(m.info)
        d = m.degraded
        if d is None:
            out.answerers[name] = None
        elif d.file is not None:
            out.answerers[name] = _file(m.info, d.file)
        elif name in demo and CONTRACT_MODELS[name] == PROVIDER_KIND[d.provider]:
            out.answerers[name] = _demo(answers, spec.repository, name, CONTRACT_MODELS[name])
        else:
            out.answerers[name] = _provider(m.info, d.provider, answers, tokenize)
    return out
