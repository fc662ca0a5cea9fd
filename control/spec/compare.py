"""Served outputs against expected ones, by the spec's rule per output: exact, close (atol/rtol), topk with ties.

recserve compares golden answers itself (perf_analyzer's own validation is exact, so files it is fed carry no
tolerance-judged outputs). A mismatch says which output, which rule and by how much.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from recserve.control.spec.spec import ModelSpec, OutputRule

Answer = dict[str, np.ndarray]


def _flat(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).reshape(-1)


def compare_output(rule: OutputRule, served: np.ndarray, expected: np.ndarray,
                   served_scores: np.ndarray | None = None, expected_scores: np.ndarray | None = None) -> str:
    """'' when ``served`` matches ``expected`` under ``rule``, else why not (one line)."""
    s, e = np.asarray(served), np.asarray(expected)
    if rule.compare != "topk" and s.shape != e.shape:
        return f"shape {list(s.shape)} != expected {list(e.shape)}"
    if rule.compare == "exact":
        if s.dtype == object or e.dtype == object:
            same = [bytes(a) == bytes(b) for a, b in zip(_flat(s), _flat(e), strict=True)]
            bad = same.count(False)
        else:
            bad = int(np.count_nonzero(s != e))
        return f"{bad} of {e.size} values differ (exact)" if bad else ""
    if rule.compare == "close":
        s64, e64 = s.astype(np.float64), e.astype(np.float64)
        ok = np.isclose(s64, e64, atol=rule.atol, rtol=rule.rtol)
        if ok.all():
            return ""
        worst = float(np.max(np.abs(s64 - e64)))
        return f"{int((~ok).sum())} of {e.size} values outside atol {rule.atol} rtol {rule.rtol} (max |diff| {worst:g})"
    return _topk(rule, _flat(s), _flat(e), None if served_scores is None else _flat(served_scores),
                 None if expected_scores is None else _flat(expected_scores))


def _topk(rule: OutputRule, s: np.ndarray, e: np.ndarray, ss: np.ndarray | None, es: np.ndarray | None) -> str:
    """Overlap of the first k ids; ids tied with the k-th expected score are interchangeable."""
    k = min(rule.k, e.size)
    if s.size < k:
        return f"served {s.size} ids, the rule needs the first {k}"
    allowed = set(e[:k].tolist())
    if es is not None and es.size >= k:
        edge = float(es[k - 1])
        allowed |= {int(i) for i, sc in zip(e.tolist(), es.tolist(), strict=False) if float(sc) == edge}
    matched = sum(1 for i in s[:k].tolist() if i in allowed)
    overlap = matched / k if k else 1.0
    if overlap + 1e-12 >= rule.min_overlap:
        return ""
    return f"top-{k} overlap {overlap:.2f} < {rule.min_overlap:.2f}"


def compare_answer(rules: dict[str, OutputRule], served: dict[str, np.ndarray],
                   expected: dict[str, np.ndarray]) -> dict[str, str]:
    """Per compared output, why it does not match (only the mismatches; {} is a match)."""
    out = {}
    for name, rule in rules.items():
        if name not in served:
            out[name] = "not in the answer"
            continue
        sc = rule.scores or ""
        why = compare_output(rule, served[name], expected[name], served.get(sc) if sc else None,
                             expected.get(sc) if sc else None)
        if why:
            out[name] = why
    return out


def batched(spec: ModelSpec, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Golden tensors (no batch dimension) as one request: a batch of 1 when the model batches."""
    return {k: np.asarray(v)[None, ...] for k, v in arrays.items()} if spec.info.max_batch_size > 0 else dict(arrays)


def unbatched(spec: ModelSpec, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[0] for k, v in arrays.items()} if spec.info.max_batch_size > 0 else dict(arrays)


def drift_of(m: ModelSpec, pairs: list[tuple[Answer, Answer]], default_min: float) -> tuple[float, float]:
    """(agreement, minimum) of one model's new answers with its old ones: the spec's drift gate (score
    correlation, or top-k overlap, over all the requests) where it names one, else the share of requests whose
    new answer passes the old one under the comparison rules (minimum ``default_min``)."""
    d = m.gates.drift
    if d is None:
        ok = [not compare_answer(m.outputs, new, old) for old, new in pairs]
        return sum(ok) / max(1, len(ok)), default_min
    if d.compare == "correlation":
        a = np.concatenate([np.asarray(old[d.output], dtype=np.float64).reshape(-1) for old, _ in pairs])
        b = np.concatenate([np.asarray(new[d.output], dtype=np.float64).reshape(-1) for _, new in pairs])
        return correlation(a, b), d.min
    shares = []
    for old, new in pairs:
        a = set(np.asarray(old[d.output]).reshape(-1)[:d.k].tolist())
        b = set(np.asarray(new[d.output]).reshape(-1)[:d.k].tolist())
        shares.append(len(a & b) / max(1, len(a)))
    return sum(shares) / max(1, len(shares)), d.min


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; two constant series count as agreeing only when they are equal."""
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])
