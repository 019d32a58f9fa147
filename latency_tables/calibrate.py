"""The overhead term: whole models measured end to end against the sum of their units.

A sum of separately timed units misses what a whole program does differently: one delegate call
instead of one per unit, activations passed in cache, weights that no longer stay hot. So a table
also holds a few whole models (the unpruned one and uniformly pruned variants) and a prediction is

    measured ~ scale * sum(units) + offset

fitted by least squares; with too few or too similar points, scale stays 1 and only the offset
(the median difference) is used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .network import UnitNetwork

from .schema import CalibrationRow
from .space import DEFAULT_GRID, uniform_channels

DEFAULT_VARIANTS = 5
MIN_SCALE, MAX_SCALE = 0.25, 4.0


def calibration_variants(graph: UnitNetwork, scope: str, grid: int = DEFAULT_GRID,
                         n: int = DEFAULT_VARIANTS) -> list[tuple[str, dict[int, int]]]:
    """The unpruned model plus uniformly pruned variants down to AMC's lower bound, deduplicated."""
    out: list[tuple[str, dict[int, int]]] = [("full", {})]
    seen = {()}
    sizes = graph.full_channels()
    for ratio in np.linspace(1.0, 0.2, max(1, n))[1:]:
        ch = uniform_channels(graph, scope, float(ratio), grid)
        ch = {g: c for g, c in ch.items() if c < sizes[g]}
        key = tuple(sorted(ch.items()))
        if key in seen:
            continue
        seen.add(key)
        out.append((f"uniform-{ratio:.2f}", ch))
    return out


@dataclass(frozen=True)
class Overhead:
    scale: float
    offset: float
    method: str  # "least-squares", "offset-only", "none"
    points: int
    rmspe: float  # of the fit on its own points, in %

    def to_dict(self) -> dict:
        return asdict(self)


def fit_overhead(raw_sums: np.ndarray, measured: np.ndarray) -> Overhead:
    s = np.asarray(raw_sums, dtype=float)
    m = np.asarray(measured, dtype=float)
    if s.size == 0:
        return Overhead(1.0, 0.0, "none", 0, float("nan"))
    method = "offset-only"
    scale, offset = 1.0, float(np.median(m - s))
    if s.size >= 2 and s.max() > 1.1 * s.min():
        A = np.stack([s, np.ones_like(s)], axis=1)
        (a, b), *_ = np.linalg.lstsq(A, m, rcond=None)
        if MIN_SCALE <= a <= MAX_SCALE:
            scale, offset, method = float(a), float(b), "least-squares"
    pred = scale * s + offset
    rmspe = float(np.sqrt(np.mean(((pred - m) / m) ** 2)) * 100)
    return Overhead(scale, offset, method, int(s.size), rmspe)


def calibration_for(rows: list[CalibrationRow], mhash: str) -> list[CalibrationRow]:
    return [r for r in rows if r.model_hash == mhash]
