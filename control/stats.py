"""The one percentile rule of recserve: nearest rank, used by drills, perf and the rollout gates alike.

Why one: the same p99 computed three ways (nearest rank, a rounded index, numpy's interpolation) gave
figures that differed between the drill report, the perf report and the rollout gate for the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (the smallest sample with at least q% of samples at or below it); None for
    no samples."""
    if not values:
        return None
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100.0 * len(ordered)) - 1)]
