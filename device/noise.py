"""How noisy a device is right now, in words every measuring command can print (issue 19).

The figure is the largest of a drift reference's robust spread (1.4826 MAD / median of its samples over
interleaved rounds, `LatencyStats.noise`), the drift between five consecutive slices of those rounds
(`pass_drift`) and, over many batches, how far its level moved between them (`level_spread`): on the
shared dev VM the per-sample spread stayed at 1-3 % while pass medians moved by 5-17 %. A device whose spread exceeds the tolerance a result is asked to hold
(±10 % for `table validate`) cannot be trusted to that tolerance: results are kept and marked noisy.
"""

from __future__ import annotations

import math

import numpy as np

from .stats import LatencyStats, robust_cv


def noise_sentence(noise: float, tolerance: float = 0.10) -> str:
    """One line: the noise figure, and the warning when it is too high for `tolerance`."""
    if noise is None or math.isnan(noise):
        return "device noise: not measured (no drift reference in these measurements)"
    if noise > tolerance:
        return (f"device too noisy for ±{100 * tolerance:g} %: reference spread {100 * noise:.0f} %; "
                f"results kept, marked noisy")
    return f"device noise: reference spread {100 * noise:.1f} % (within ±{100 * tolerance:g} %)"


def is_noisy(noise: float, tolerance: float = 0.10) -> bool:
    return noise is not None and not math.isnan(noise) and noise > tolerance


def pass_drift(samples_ms, passes: int = 5) -> float:
    """The spread of the medians of `passes` consecutive slices of the samples, (max - min) / median:
    drift over time, which per-sample spread alone does not show. NaN below 3 samples per slice."""
    s = np.asarray(list(samples_ms), dtype=float)
    if s.size < 3 * passes:
        return float("nan")
    meds = [float(np.median(c)) for c in np.array_split(s, passes)]
    mid = float(np.median(meds))
    return (max(meds) - min(meds)) / mid if mid > 0 else float("nan")


def noise_figure(*values: float) -> float:
    """The figure a verdict uses: the largest of the spreads given (a per-sample spread misses slow
    stretches that a drift between slices or between batches shows), NaN when none is known."""
    known = [float(v) for v in values if v is not None and not math.isnan(v)]
    return max(known) if known else float("nan")


def level_spread(levels) -> float:
    """How far the reference's level moved between batches: (p90 - p10) / median of its medians."""
    v = np.asarray([x for x in levels if x == x], dtype=float)
    if v.size < 3:
        return float("nan")
    return float((np.percentile(v, 90) - np.percentile(v, 10)) / np.median(v))


def reference_noise(stats: list[LatencyStats]) -> float:
    """The median reference spread over results that carry one (NaN when none does)."""
    vals = [s.noise for s in stats if s.ok and s.has_reference and not math.isnan(s.noise)]
    return float(np.median(vals)) if vals else float("nan")


__all__ = ["noise_sentence", "is_noisy", "level_spread", "noise_figure", "pass_drift", "reference_noise", "robust_cv"]
