"""Triton's Prometheus text, read once: per-model sums of named samples, parsed by prometheus_client.

Why one reader: the rollout gates (control/monitoring/metrics.py) and the perf figures (perf/metrics.py) both read
Triton's /metrics; hand-written regexes for the exposition format drift apart (escaped label values,
timestamps, exemplars), the library's parser does not.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families


def model_sums(text: str, names: Iterable[str]) -> dict[str, dict[str, float]]:
    """model -> sample name -> value summed over the other labels (versions, failure reasons); samples
    without a ``model`` label and names not asked for are left out."""
    wanted = set(names)
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        # a typed counter's samples read <name>_total (the parser's OpenMetrics naming); its family keeps <name>
        values = {family.name, family.name + "_total"}
        for sample in family.samples:
            model = sample.labels.get("model")
            if sample.name not in values or model is None:
                continue
            per = out.setdefault(model, {})
            per[family.name] = per.get(family.name, 0.0) + float(sample.value)
    return out


def total(text: str, name: str) -> float:
    """One family's samples summed over every label (a counter's ``<name>_total``); 0 when it has none yet."""
    out = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == name:
            out += sum(float(s.value) for s in family.samples if s.name in (name, name + "_total"))
    return out


def fetch(url: str, timeout_s: float) -> str | None:
    """The text of a /metrics endpoint; None when it cannot be reached (callers say what that means)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.read().decode(errors="replace")
    except OSError:
        return None
